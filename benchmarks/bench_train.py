"""Training throughput of both models on this machine, side by side with what the hardware
and the input pipeline can do, in one run.

Prints:
  - training images/s of one full step, with XLA and without: the published model
    (decoder + discriminator) at batch 104, the film model (decoder + critic + the frozen
    measurer's reading of the generated crops) and the exemplar model (the nearest-cell
    lookup, the editor, the critic, the measurer's reading of edit and exemplar) at batch
    32, and each one's measurer step (phase 1)
  - analytic FLOPs per trained image (2 FLOPs per multiply-add; backward = 2x forward)
  - a large float32 matmul's FLOP/s, and the training step's achieved share of it
  - the input pipeline's crops/s at the same batch, and its share of step time

    python benchmarks/bench_train.py [--data DIR] [--steps 6]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a converted dataset (else sample data)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=None,
                        help="[default: each model's own, published 104, film and exemplar 32]")
    args = parser.parse_args()

    import tensorflow as tf

    from cp2image_tf.training.run_folder import config_from_dict
    from cp2image_tf.training.trainer import make_trainer
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

        results, flops = {}, {}
        for model in ("published", "film", "exemplar"):
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
            if model == "published":
                continue
            name = f"{model} measurer step (batch {batch})"
            results[name] = images_per_s(trainer.measurer_step_fn(), iterators[:1], batch,
                                         args.steps * 4, "measurer")
            flops[name] = 3 * 2 * conv_macs(trainer.measurer)
        batch = args.batch or 104

        it = iter(dataset(batch))
        for _ in range(10):
            next(it)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 5:
            count += int(next(it)[1].shape[0])
        input_rate = count / (time.perf_counter() - start)
        peak = matmul_flops()

        print(f"\n{n_features} features, crops "
              f"{manifest['crop']['height']}x{manifest['crop']['width']}x{manifest['crop']['channels']}, "
              f"{os.cpu_count()} CPUs; float32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s")
        print(f"\n{'':<40} {'GFLOP/cell':>10} {'images/s':>9} {'GFLOP/s':>8} {'x matmul':>9}")
        for name, rate in results.items():
            achieved = rate * flops[name]
            print(f"{name:<40} {flops[name] / 1e9:>10.2f} {rate:>9.1f} {achieved / 1e9:>8.1f} "
                  f"{achieved / peak:>9.2f}")
        fastest = max(v for k, v in results.items() if "measurer" not in k)
        print(f"{'input pipeline alone (batch ' + str(batch) + ')':<40} {'':>10} {input_rate:>9.0f}")
        print(f"\ninput pipeline share of the fastest step: {fastest / input_rate:.1%} "
              f"(its crops/s is {input_rate / fastest:.0f}x what training consumes)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
