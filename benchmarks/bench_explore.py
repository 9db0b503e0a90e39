"""explore's latency: one-image requests through the page's HTTP API vs the bare signature.

Saves a decoder with random weights for the sample data's shape (598 features, 68x68 crops,
DNA/Tubulin/Actin) as a SavedModel with export's three signatures (or takes --model, e.g.
demo-output/models/cp2image, with --data for the nearest-cell search), starts
`cp2image-tf explore` on it in a separate process (uvicorn, as a user runs it) and times,
side by side (round-robin: one call of each way in turn, so that other processes on the
machine disturb all of them alike), one profile with one feature moved per call, as a
slider does:
  - signature serving_default   loaded.signatures["serving_default"](features=raw) in this
                                process: the model alone
  - signature generate_png      the same for the composite PNG
  - GET /api/render             what the page asks on every slider move: the channels as a
                                greyscale PNG strip in JSON (serving_default + PNG + base64)
  - GET /api/image.png          the generate_png signature's PNG over HTTP
  - GET /api/neighbours         the 6 nearest real cells (only with --data)
HTTP requests use one kept-alive connection (requests.Session), as a browser does.

Prints p50 and p95 latency per way over --calls calls after warm-up, and the ratio of each
HTTP way's p50 to its bare signature's p50, with the overhead in ms.

    python benchmarks/bench_explore.py [--calls 200] [--model PATH --data DATA_DIR]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import CHANNELS, make_manifest, timed_rounds  # noqa: E402


def save_random_model(root: Path, n_features: int, crop: int) -> Path:
    import tensorflow as tf

    from cp2image_tf.serving.export import serving_module
    from cp2image_tf.training.published.networks import build_decoder

    manifest = make_manifest(n_features, crop)
    decoder = build_decoder(n_features, crop, len(CHANNELS))
    module = serving_module(decoder, manifest, "standard")
    path = root / "model" / "1"
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.serve, "generate_png": module.generate_png,
        "describe": module.describe})
    return path


def start_explore(model: str, data: str | None):
    """`cp2image-tf explore` in its own process on a free port; (process, url)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "cp2image-tf"), "explore", model,
               "--port", str(port)] + (["--data", data] if data else [])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("Open "):
            return process, line.split()[1]
        if line.startswith("Error"):
            break
    process.kill()
    raise SystemExit(f"explore did not start: {line.strip()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="timed calls per way")
    parser.add_argument("--model", default=None, help="a SavedModel [default: random weights]")
    parser.add_argument("--data", default=None, help="its dataset (times /api/neighbours)")
    parser.add_argument("--features", type=int, default=598)
    parser.add_argument("--crop", type=int, default=68)
    args = parser.parse_args()

    import requests
    import tensorflow as tf

    from cp2image_tf.serving.local import load_model, resolve_saved_model

    root = Path(tempfile.mkdtemp(prefix="bench_explore_"))
    process = None
    try:
        model_path = args.model or str(save_random_model(root, args.features, args.crop))
        model = load_model(model_path)
        loaded = tf.saved_model.load(str(resolve_saved_model(Path(model_path))))
        images_sig = loaded.signatures["serving_default"]
        png_sig = loaded.signatures["generate_png"]
        process, url = start_explore(model_path, args.data)
        session = requests.Session()

        names, median, sd = model.feature_names, model.median, model.sd
        movable = [j for j in range(len(names)) if sd[j] > 0]
        rng = np.random.default_rng(0)
        plan = [(movable[k % len(movable)], float(np.round(rng.uniform(-3, 3), 1)))
                for k in range(10_000)]
        counter = {"k": 0}

        def next_move():
            j, z = plan[counter["k"] % len(plan)]
            counter["k"] += 1
            raw = median.copy()
            raw[j] += z * sd[j]
            return raw[None], {"base": "median", names[j]: z}

        def bare(signature, key):
            return lambda _: signature(features=tf.constant(next_move()[0]))[key].numpy()

        def http(path):
            def call(_):
                answer = session.get(f"{url}{path}", params=next_move()[1], timeout=30)
                answer.raise_for_status()
                return answer.content
            return call

        ways = {"signature serving_default": bare(images_sig, "images"),
                "GET /api/render": http("/api/render"),
                "signature generate_png": bare(png_sig, "png_bytes"),
                "GET /api/image.png": http("/api/image.png")}
        if args.data:
            ways["GET /api/neighbours"] = http("/api/neighbours")
        times = timed_rounds(ways, {name: None for name in ways}, args.calls, warmup=10)
        sizes = {name: len(ways[name](None)) for name in ways if name.startswith("GET")}
        server_ms = [session.get(f"{url}/api/render", params=next_move()[1]).json()["model_ms"]
                     for _ in range(50)]
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{len(model.feature_names)} features, crops {'x'.join(map(str, model.crop_shape))}, "
          f"model {args.model or 'random weights'}, {os.cpu_count()} CPUs, TensorFlow "
          f"{tf.__version__}, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"one image per call, one feature moved per call, {args.calls} calls per way\n")
    print(f"{'':<28} {'p50 ms':>8} {'p95 ms':>8} {'bytes':>8}")
    for name, t in times.items():
        print(f"{name:<28} {1000 * np.percentile(t, 50):>8.2f} {1000 * np.percentile(t, 95):>8.2f} "
              f"{sizes.get(name, ''):>8}")
    print("\nHTTP / bare signature (p50)")
    for http_way, bare_way in (("GET /api/render", "signature serving_default"),
                               ("GET /api/image.png", "signature generate_png")):
        h, b = np.percentile(times[http_way], 50), np.percentile(times[bare_way], 50)
        print(f"  {http_way:<20} {h / b:>5.2f} x  (+{1000 * (h - b):.1f} ms)")
    print(f"\nmodel time inside /api/render (server's own measure): p50 "
          f"{np.percentile(server_ms, 50):.2f} ms")


if __name__ == "__main__":
    main()
