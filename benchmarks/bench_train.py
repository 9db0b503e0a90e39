"""Training throughput of both models on this machine, side by side with what the hardware
and the input pipeline can do, in one run.

Prints:
  - training images/s of one full step, with XLA and without: the published model
    (decoder + discriminator) at batch 104, the film model (decoder + critic + the frozen
    measurer's reading of the generated crops) and the exemplar model (the nearest-cell
    lookup, the editor, the critic, the measurer's reading of edit and exemplar) at batch
    32, and each one's measurer step (phase 1)
  - analytic FLOPs per trained image (2 FLOPs per multiply-add; backward = 2x forward)
  - the exemplar (default) model's FLOPs per step counted by TensorFlow's profiler on the traced
    graph of its forward and backward pass (every op with a registered FLOP count: convolutions
    and their gradients, matmuls, elementwise ops, reductions), by op type
  - a large float32 matmul's FLOP/s, and the training step's achieved share of it
  - the FLOP/s the model's largest convolution alone reaches (forward and backward, same batch):
    what the step's FLOP mix allows
  - the input pipeline's crops/s at the same batch, and its share of step time

    python benchmarks/bench_train.py [--data DIR] [--steps 6] [--models exemplar]
"""
import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _sample import sample_folder

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def conv_macs(model) -> int:
    """Multiply-adds per image of every convolution and dense layer in a Keras model (the film
    layers' own dense layers included)."""
    from keras import layers

    total = 0
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, layers.SpectralNormalization) else layer
        if isinstance(inner, layers.Conv2D):
            kh, kw, cin, cout = inner.kernel.shape
            _, h, w, _ = layer.output.shape
            total += kh * kw * cin * cout * h * w
        elif isinstance(inner, layers.Dense):
            total += int(inner.kernel.shape[0] * inner.kernel.shape[1])
        elif inner.__class__.__name__ == "FiLM":
            total += 2 * int(inner.gamma.kernel.shape[0] * inner.gamma.kernel.shape[1])
        elif inner.__class__.__name__ == "ExemplarBank":  # distances to every bank cell
            total += inner.size * inner.n_features
    return total


def step_flops(trainer) -> float:
    """FLOPs per trained cell (2 per multiply-add; backward = 2x forward)."""
    if hasattr(trainer, "critic"):
        # Decoder forward + backward; critic over target and generated forward + backward;
        # the measurer over the generated crop, forward + backward to the image (and, for the
        # exemplar model, forward over the exemplar).
        exemplar = getattr(trainer, "editor", None) is not None
        return (3 * 2 * conv_macs(trainer.decoder) + 2 * 3 * 2 * conv_macs(trainer.critic)
                + (3 + exemplar) * 2 * conv_macs(trainer.measurer))
    # Discriminator over 3 images (real, generated, target) forward + backward.
    return 3 * 2 * conv_macs(trainer.decoder) + 3 * 3 * 2 * conv_macs(trainer.discriminator)


def graph_flops(trainer, element_spec, batch: int) -> tuple[float, dict]:
    """(FLOPs of one step's forward and backward pass at `batch`, FLOPs by op type): TensorFlow's
    profiler on the graph of trainer.losses_and_gradients traced at a fixed batch. The
    optimizers' updates (elementwise over the weights) are left out."""
    import tensorflow as tf

    specs = [tf.TensorSpec([batch, *spec.shape[1:]], spec.dtype) for spec in element_spec]
    graph = tf.function(trainer.losses_and_gradients).get_concrete_function(*specs).graph
    options = dict(tf.compat.v1.profiler.ProfileOptionBuilder.float_operation(), output="none")
    by_op = tf.compat.v1.profiler.profile(graph=graph, cmd="op", options=options)
    kinds, nodes = {}, list(by_op.children)
    while nodes:  # the op view nests each op type under the one before it
        node = nodes.pop()
        kinds[node.name] = float(node.float_ops)
        nodes += node.children
    return float(by_op.total_float_ops), dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def largest_conv(model):
    """(layer, FLOPs of its forward pass per image) of the convolution with the most."""
    from keras import layers

    best, most = None, 0
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, layers.SpectralNormalization) else layer
        if isinstance(inner, layers.Conv2D):
            kh, kw, cin, cout = inner.kernel.shape
            _, h, w, _ = layer.output.shape
            if 2 * kh * kw * cin * cout * h * w > most:
                best, most = inner, 2 * kh * kw * cin * cout * h * w
    return best, most


def conv_flops_per_s(layer, batch: int, seconds: float = 3.0) -> float:
    """FLOP/s of `layer`'s convolution alone, forward and backward (3x forward) at `batch`."""
    import tensorflow as tf

    _, h, w, cin = layer.input.shape
    kh, kw, _, cout = layer.kernel.shape
    x = tf.random.normal((batch, h, w, cin))
    kernel = tf.Variable(tf.random.normal((kh, kw, cin, cout)))
    padding = layer.padding.upper()

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tf.nn.conv2d(x, kernel, layer.strides, padding))
        return tape.gradient(y, [x, kernel])

    step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        grads = step()
        count += 1
    float(tf.reduce_sum(grads[1]))
    _, oh, ow, _ = layer.output.shape
    return 3 * 2 * kh * kw * cin * cout * oh * ow * batch * count / (time.perf_counter() - start)


def images_per_s(step, iterators, batch: int, steps: int, key: str) -> float:
    float(step(*iterators)[key])  # trace and compile
    start = time.perf_counter()
    for _ in range(steps):
        losses = step(*iterators)
    float(losses[key])
    return steps * batch / (time.perf_counter() - start)


def matmul_flops(seconds: float = 3.0, n: int = 2048) -> float:
    import tensorflow as tf

    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    mm = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    mm().numpy()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mm().numpy()
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def step_rates(args, manifest, dataset, strategy) -> tuple[dict, dict, dict]:
    """(images/s, analytic FLOPs per image, the exemplar's profiler count) of each model's step
    with and without XLA, and of its measurer step."""
    from cp2image_tf.training.run_folder import config_from_dict
    from cp2image_tf.training.trainer import make_trainer

    results, flops, counted = {}, {}, {}
    for model in args.models.split(","):
        for jit in (True, False):
            config = config_from_dict({"model": model, "batch_size": args.batch,
                                      model: {"jit_compile": jit}})
            trainer = make_trainer(manifest, config, strategy)
            batch = config.batch_size
            iterators = [iter(dataset(batch)) for _ in range(1 + trainer.needs_real_batch)]
            name = f"{model} step (batch {batch}), {'XLA' if jit else 'no XLA'}"
            results[name] = images_per_s(trainer.train_step_fn(), iterators, batch,
                                         args.steps, "pixel")
            flops[name] = step_flops(trainer)
        if model == "exemplar":
            spec = dataset(batch).element_spec
            counted["step"], counted["by_op"] = graph_flops(trainer, spec, batch)
            counted["step"] /= batch
            counted["batch"], counted["conv"] = batch, largest_conv(trainer.decoder)
        if model == "published":
            continue
        name = f"{model} measurer step (batch {batch})"
        results[name] = images_per_s(trainer.measurer_step_fn(), iterators[:1], batch,
                                     args.steps * 4, "measurer")
        flops[name] = 3 * 2 * conv_macs(trainer.measurer)
    return results, flops, counted


def input_rate(dataset, seconds: float = 5.0) -> float:
    """Crops/s of the input pipeline alone (after 10 warm-up batches)."""
    it = iter(dataset)
    for _ in range(10):
        next(it)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += int(next(it)[1].shape[0])
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a converted dataset (else sample data)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--models", default="published,film,exemplar",
                        help="comma-separated: published, film, exemplar [default: all three]")
    parser.add_argument("--batch", type=int, default=None,
                        help="[default: each model's own, published 104, film and exemplar 32]")
    args = parser.parse_args()

    import tensorflow as tf

    from tfrecords_tools.manifest import load_manifest
    from tfrecords_tools.reader import make_dataset

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    try:
        data = args.data
        if data is None:
            from tfrecords_tools.convert import ConvertConfig, convert

            sample = sample_folder(None, root, 1000)
            data = root / "data"
            convert(ConvertConfig(input=str(sample / "cellprofiler"), out_dir=str(data),
                                  channels=["DNA", "Tubulin", "Actin"], objects=["Nuclei", "Cells"],
                                  split_by=["Metadata_Plate", "Metadata_Well"]), progress=False)
        manifest = load_manifest(data)
        n_features = manifest["features"]["count"]
        strategy = tf.distribute.get_strategy()

        def dataset(batch):
            return make_dataset(data, "train", batch, stratify=False, manifest=manifest)

        # The matmul before and after the steps, the faster taken: on a shared machine one
        # window of a few seconds can fall in another job's burst.
        peak = matmul_flops()
        results, flops, counted = step_rates(args, manifest, dataset, strategy)
        batch = args.batch or 104

        rate_in = input_rate(dataset(batch))
        peak = max(peak, matmul_flops())

        print(f"\n{n_features} features, crops "
              f"{manifest['crop']['height']}x{manifest['crop']['width']}x{manifest['crop']['channels']}, "
              f"{os.cpu_count()} CPUs; float32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s")
        print(f"\n{'':<40} {'GFLOP/cell':>10} {'images/s':>9} {'GFLOP/s':>8} {'x matmul':>9}")
        for name, rate in results.items():
            achieved = rate * flops[name]
            print(f"{name:<40} {flops[name] / 1e9:>10.2f} {rate:>9.1f} {achieved / 1e9:>8.1f} "
                  f"{achieved / peak:>9.2f}")
        fastest = max(v for k, v in results.items() if "measurer" not in k)
        print(f"{'input pipeline alone (batch ' + str(batch) + ')':<40} {'':>10} {rate_in:>9.0f}")
        print(f"\ninput pipeline share of the fastest step: {fastest / rate_in:.1%} "
              f"(its crops/s is {rate_in / fastest:.0f}x what training consumes)")
        if counted:
            exemplar_flops(results, counted, peak)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def exemplar_flops(results: dict, counted: dict, peak: float) -> None:
    """The exemplar step's profiler-counted FLOPs, its share of the matmul with and without XLA,
    the FLOP mix by op type and what the largest convolution alone reaches."""
    batch, per_image = counted["batch"], counted["step"]
    print(f"\nexemplar step, FLOPs counted by TensorFlow's profiler on the traced graph "
          f"(forward + backward, batch {batch}): {per_image / 1e9:.3f} GFLOP per image, "
          f"{per_image * batch / 1e9:.2f} GFLOP per step")
    for name, rate in results.items():
        if name.startswith("exemplar step"):
            achieved = rate * per_image
            print(f"  {name:<38} {rate:>7.1f} images/s {achieved / 1e9:>7.1f} GFLOP/s "
                  f"{achieved / peak:>6.2f} x matmul")
    total = sum(counted["by_op"].values())
    print("  FLOPs by op type: " + ", ".join(f"{op} {v / total:.0%}" for op, v in
                                             list(counted["by_op"].items())[:8]))
    layer, forward = counted["conv"]
    if layer is not None:
        rate = conv_flops_per_s(layer, batch)
        print(f"  the decoder's largest convolution ({layer.name}, {forward / 1e6:.0f} MFLOP "
              f"forward per image) alone, forward + backward: {rate / 1e9:.1f} GFLOP/s, "
              f"{rate / peak:.2f} x matmul")


if __name__ == "__main__":
    main()
