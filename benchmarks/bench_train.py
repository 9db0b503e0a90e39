"""Training throughput of the published networks on this machine, side by side with
what the hardware and the input pipeline can do, in one run.

Prints:
  - training images/s at batch 104 (decoder + discriminator, one full step),
    with XLA (default on one device) and without
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
    """Multiply-adds per image of every convolution in a Keras model."""
    from keras import layers

    total = 0
    for layer in model.layers:
        conv = layer.layer if isinstance(layer, layers.SpectralNormalization) else layer
        if isinstance(conv, layers.Conv2D):
            kh, kw, cin, cout = conv.kernel.shape
            _, h, w, _ = layer.output.shape
            total += kh * kw * cin * cout * h * w
    return total


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
    parser.add_argument("--batch", type=int, default=104)
    args = parser.parse_args()

    import tensorflow as tf

    from cp2image_tf.training.config import FitConfig
    from cp2image_tf.training.train import Trainer
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

        def dataset():
            return make_dataset(data, "train", args.batch, stratify=False, manifest=manifest)

        results = {}
        for jit in (True, False):
            trainer = Trainer(manifest, FitConfig(batch_size=args.batch, jit_compile=jit), strategy)
            step = trainer.train_step_fn()
            a, b = iter(dataset()), iter(dataset())
            float(step(a, b)["pixel"])  # trace and compile
            start = time.perf_counter()
            for _ in range(args.steps):
                losses = step(a, b)
            float(losses["pixel"])
            results[jit] = args.steps * args.batch / (time.perf_counter() - start)
        macs_dec = conv_macs(trainer.decoder)
        macs_disc = conv_macs(trainer.discriminator)
        # Per trained cell: decoder forward + backward; discriminator over 3 images
        # (real, generated, target) forward + backward.
        flops_per_image = 3 * 2 * macs_dec + 3 * 3 * 2 * macs_disc

        it = iter(dataset())
        for _ in range(10):
            next(it)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < 5:
            count += int(next(it)[1].shape[0])
        input_rate = count / (time.perf_counter() - start)
        peak = matmul_flops()

        print(f"\nbatch {args.batch}, {n_features} features, crops "
              f"{manifest['crop']['height']}x{manifest['crop']['width']}x{manifest['crop']['channels']}, "
              f"{os.cpu_count()} CPUs")
        print(f"decoder {macs_dec / 1e6:.1f} M multiply-adds per image, discriminator "
              f"{macs_disc / 1e6:.1f} M; one training step {flops_per_image / 1e9:.2f} GFLOP per cell")
        print(f"float32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s")
        print(f"\n{'':<28} {'images/s':>9} {'GFLOP/s':>8} {'x matmul':>9}")
        for jit, rate in results.items():
            achieved = rate * flops_per_image
            print(f"{'training step, XLA' if jit else 'training step, no XLA':<28} {rate:>9.1f} "
                  f"{achieved / 1e9:>8.1f} {achieved / peak:>9.2f}")
        print(f"{'input pipeline alone':<28} {input_rate:>9.0f}")
        print(f"\ninput pipeline share of a step: {results[True] / input_rate:.1%} "
              f"(its crops/s is {input_rate / results[True]:.0f}x what training consumes)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
