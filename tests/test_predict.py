"""serving.remote.RemoteModel against fakes of TensorFlow Serving's REST and gRPC APIs."""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import requests
import tensorflow as tf
from PIL import Image

from fake_serving import ServedModels, grpc_server, rest_server

from cp2image_tf.serving import remote as serving_client
from cp2image_tf.serving.export import serving_module
from cp2image_tf.training.published.networks import build_decoder
from cp2image_tf.serving.remote import RemoteModel
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import load_manifest

APIS = ("rest", "grpc")


@pytest.fixture(scope="module")
def model(disc_dataset, tmp_path_factory):
    """An untrained decoder exported as export.py does: MODEL_BASE/1 with the three signatures."""
    manifest = load_manifest(disc_dataset)
    keras.utils.set_random_seed(0)
    decoder = build_decoder(manifest["features"]["count"], crop_size=48, channels=2)
    module = serving_module(decoder, manifest, "standard")
    base = tmp_path_factory.mktemp("served") / "cells"
    tf.saved_model.save(module, str(base / "1"), signatures={
        "serving_default": module.serve, "generate_png": module.generate_png,
        "describe": module.describe})
    return SimpleNamespace(manifest=manifest, base=base, n_features=manifest["features"]["count"],
                           saved=tf.saved_model.load(str(base / "1")))


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory):
    """A SavedModel with other signatures: x -> doubled, label_bytes (not from cp2image-tf)."""
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
    def serve(x):
        return {"doubled": 2.0 * x, "label_bytes": tf.fill(tf.shape(x)[:1], b"\x00\xffcell")}

    module.serve = serve
    base = tmp_path_factory.mktemp("plain") / "plain"
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": serve})
    return base


@pytest.fixture(scope="module")
def servers(model, plain_base):
    models = ServedModels({"cells": model.base, "plain": plain_base})
    with rest_server(models) as url, grpc_server(models) as address:
        yield SimpleNamespace(models=models, rest=url, grpc=address)


def connect(servers, api, name="cells", **kwargs):
    return RemoteModel(getattr(servers, api), name, grpc=api == "grpc", **kwargs)


def raw_features(model, n, seed=0):
    """Raw values around the training distribution, with NaN and inf in rows 1-4."""
    stats = model.manifest["features"]["stats"]
    rng = np.random.default_rng(seed)
    raw = (np.asarray(stats["mean"]) + 2 * np.asarray(stats["std"]) *
           rng.standard_normal((n, model.n_features))).astype(np.float32)
    if n > 4:
        raw[1, 0], raw[2, -1], raw[3, 0], raw[4] = np.nan, np.inf, -np.inf, np.nan
    return raw


def reference_images(model, raw):
    return model.saved.signatures["serving_default"](features=tf.constant(raw))["images"].numpy()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def reference_pngs(model, raw):
    return list(model.saved.signatures["generate_png"](features=tf.constant(raw))["png_bytes"].numpy())


def batches(servers, start, api):
    return [(signature, rows) for a, signature, rows in servers.models.log[start:] if a == api]


@pytest.mark.parametrize("api", APIS)
def test_reads_the_model_description(servers, model, api):
    # A REST URL may leave out http://; a gRPC address may carry a scheme.
    url = servers.rest.removeprefix("http://") if api == "rest" else "grpc://" + servers.grpc
    with RemoteModel(url, "cells", grpc=api == "grpc") as remote:
        stats = model.manifest["features"]["stats"]
        assert remote.feature_names == model.manifest["features"]["names"]
        assert len(remote.feature_names) == model.n_features == 2
        assert remote.channels == ["DNA", "Actin"]
        assert remote.crop_shape == (48, 48, 2)
        np.testing.assert_array_equal(remote.median, np.float32(stats["median"]))
        np.testing.assert_array_equal(remote.sd, np.float32(stats["std"]))
        assert remote.description["normalization"] == "standard"
        assert remote.description["treatments"] == model.manifest["treatments"]["names"]
        assert getattr(servers, api) in remote.source and "model cells" in remote.source


@pytest.mark.parametrize("api", APIS)
def test_images_equal_the_saved_models_output(servers, model, api):
    raw = raw_features(model, 8)
    want = reference_images(model, raw)
    # An untrained decoder still draws a different image for each profile.
    assert want.std() > 0.05 and np.abs(want[0] - want[5]).max() > 0.1
    with connect(servers, api) as remote:
        got = remote.images(raw)
    assert got.dtype == np.float32 and got.shape == (8, 48, 48, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # NaN and inf were sent as the medians, which is how the graph imputes them.
    median_row = reference_images(model, np.float32(model.manifest["features"]["stats"]["median"])[None])
    np.testing.assert_allclose(got[4], median_row[0], rtol=0, atol=1e-6)


def test_rest_requests_are_columnar_and_strict_json(servers, model, monkeypatch):
    sent = []
    send = requests.Session.request

    def spy(self, method, url, **kwargs):
        sent.append((method, url.removeprefix(servers.rest), kwargs.get("json")))
        return send(self, method, url, **kwargs)

    monkeypatch.setattr(requests.Session, "request", spy)
    raw = raw_features(model, 6)
    with connect(servers, "rest") as remote:
        remote.images(raw)
    assert [(method, path) for method, path, _ in sent] == [
        ("GET", "/v1/models/cells/metadata"), ("POST", "/v1/models/cells:predict"),
        ("POST", "/v1/models/cells:predict")]
    assert sent[1][2] == {"signature_name": "describe", "inputs": {"key": ["model"]}}
    body = sent[2][2]
    assert list(body) == ["signature_name", "inputs"] and body["signature_name"] == "serving_default"
    json.dumps(body, allow_nan=False)  # no NaN or inf: they were sent as the medians
    median = np.float32(model.manifest["features"]["stats"]["median"])
    sent_rows = np.float32(body["inputs"]["features"])
    np.testing.assert_array_equal(sent_rows[4], median)
    np.testing.assert_array_equal(sent_rows[[0, 5]], raw[[0, 5]])


@pytest.mark.parametrize("api", APIS)
def test_pngs_decode_to_the_generate_png_pixels(servers, model, api):
    raw = raw_features(model, 6, seed=1)
    with connect(servers, api) as remote:
        got = remote.pngs(raw)
    want = reference_pngs(model, raw)
    assert len(got) == 6 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in got)
    for mine, theirs in zip(got, want):
        pixels = decode_png(mine)
        assert pixels.shape == (48, 48, 3) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, decode_png(theirs))
    assert len({p.tobytes() for p in map(decode_png, got)}) == 6


def test_requests_of_more_than_256_rows_are_split_and_reassembled_in_order(servers, model,
                                                                           monkeypatch):
    raw = raw_features(model, 300, seed=2)
    start = len(servers.models.log)
    with connect(servers, "grpc") as remote:
        np.testing.assert_allclose(remote.images(raw), reference_images(model, raw), rtol=0, atol=1e-6)
    # REST images at 256 rows are 13 MB of JSON: smaller batches check the same assembly.
    monkeypatch.setattr(serving_client, "BATCH", 4)
    with connect(servers, "rest") as remote:
        images = remote.images(raw[:10])
        pngs = remote.pngs(raw[:10])
    np.testing.assert_allclose(images, reference_images(model, raw[:10]), rtol=0, atol=1e-6)
    assert pngs == reference_pngs(model, raw[:10])
    assert batches(servers, start, "grpc") == [("describe", 1), ("serving_default", 256),
                                               ("serving_default", 44)]
    assert batches(servers, start, "rest") == [("describe", 1)] + [
        (signature, rows) for signature in ("serving_default", "generate_png") for rows in (4, 4, 2)]


def test_no_rows_make_no_request(servers, model):
    start = len(servers.models.log)
    with connect(servers, "rest") as remote:
        assert remote.images(np.zeros((0, 2))).shape == (0, 48, 48, 2)
        assert remote.pngs(np.zeros((0, 2))) == []
    assert batches(servers, start, "rest") == [("describe", 1)]


def test_fake_rest_metadata_is_tf_servings(servers):
    url = servers.rest + "/v1/models/cells"
    meta = requests.get(url + "/metadata", timeout=10).json()
    assert meta["model_spec"] == {"name": "cells", "signature_name": "", "version": "1"}
    # TF Serving writes the packed SignatureDefMap unpacked (no "@type"), with proto field names.
    defs = meta["metadata"]["signature_def"]
    assert list(defs) == ["signature_def"]
    assert {"serving_default", "generate_png", "describe"} <= set(defs["signature_def"])
    serving = defs["signature_def"]["serving_default"]
    assert serving["method_name"] == "tensorflow/serving/predict"
    assert serving["inputs"]["features"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in serving["inputs"]["features"]["tensor_shape"]["dim"]] == ["-1", "2"]
    assert [d["size"] for d in serving["outputs"]["images"]["tensor_shape"]["dim"]] == \
        ["-1", "48", "48", "2"]
    assert requests.get(url + "/versions/1/metadata", timeout=10).json() == meta


def test_fake_rest_predict_has_tf_servings_row_and_columnar_formats(servers, model):
    url = servers.rest + "/v1/models/cells"
    raw = raw_features(model, 2)
    raw[1, 0] = 3.0  # JSON has no NaN
    want = reference_images(model, raw)
    # Row format, default signature: one prediction per instance; named or bare instances.
    rows = requests.post(url + ":predict", json={"instances": raw.tolist()}, timeout=10).json()
    named = requests.post(url + ":predict", json={"instances": [{"features": r} for r in raw.tolist()]},
                          timeout=10).json()
    assert list(rows) == ["predictions"] and named == rows
    np.testing.assert_allclose(np.float32(rows["predictions"]), want, rtol=0, atol=1e-6)
    # Columnar format: a single output's tensor bare under "outputs".
    columns = requests.post(url + "/versions/1:predict", json={
        "signature_name": "serving_default", "inputs": {"features": raw.tolist()}}, timeout=10).json()
    assert list(columns) == ["outputs"]
    np.testing.assert_allclose(np.float32(columns["outputs"]), want, rtol=0, atol=1e-6)
    # Outputs named *_bytes are {"b64": ...}; string inputs may be {"b64": ...}.
    pngs = requests.post(url + ":predict", json={"signature_name": "generate_png",
                                                 "inputs": raw.tolist()}, timeout=10).json()
    assert [base64.b64decode(p["b64"]) for p in pngs["outputs"]] == reference_pngs(model, raw)
    described = requests.post(url + ":predict", json={
        "signature_name": "describe",
        "instances": [{"b64": base64.b64encode(b"model").decode()}, "manifest", "other"]},
        timeout=10).json()["predictions"]
    assert json.loads(described[0])["feature_names"] == model.manifest["features"]["names"]
    assert json.loads(described[1]) == model.manifest and described[2] == ""
    # Several outputs: objects per instance (rows) or per output (columns).
    plain = servers.rest + "/v1/models/plain:predict"
    assert requests.post(plain, json={"instances": [[1, 2]]}, timeout=10).json() == {
        "predictions": [{"doubled": [2.0, 4.0],
                         "label_bytes": {"b64": base64.b64encode(b"\x00\xffcell").decode()}}]}
    assert requests.post(plain, json={"inputs": {"x": [[1, 2]]}}, timeout=10).json() == {
        "outputs": {"doubled": [[2.0, 4.0]],
                    "label_bytes": [{"b64": base64.b64encode(b"\x00\xffcell").decode()}]}}


def test_fake_rest_errors_are_tf_servings(servers):
    def error(path, body=None):
        response = requests.request("POST" if body is not None else "GET", servers.rest + path,
                                    json=body, timeout=10)
        return response.status_code, response.json()["error"]

    assert error("/v1/models/nope/metadata") == (404, "Servable not found for request: Latest(nope)")
    assert error("/v1/models/cells/versions/9:predict", {"instances": [[1, 2]]}) == \
        (404, "Servable not found for request: Specific(cells, 9)")
    assert error("/v1/models/cells:predict", {"instances": [[1, 2]], "inputs": [[1, 2]]})[0] == 400
    assert error("/v1/models/cells:predict", {"signature_name": "x", "inputs": [[1, 2]]}) == \
        (400, 'Serving signature name: "x" not found in signature def')
    assert error("/v1/models/cells:predict", {"inputs": [[1, 2, 3]]})[0] == 400
    assert error("/v1/models/cells:predict", {"inputs": {"other": [[1, 2]]}}) == \
        (400, "Missing named input: features in 'inputs' object.")
    assert error("/v1/models/cells/predict", {"inputs": [[1, 2]]}) == \
        (400, "Malformed request: POST /v1/models/cells/predict")


@pytest.mark.parametrize("api", APIS)
def test_unreachable_server_is_one_clear_line(model, api):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UserInputError, match=f"127.0.0.1:{port}: cannot reach") as err:
        RemoteModel(f"127.0.0.1:{port}", "cells", grpc=api == "grpc")
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value)
    if api == "rest":
        assert f"http://127.0.0.1:{port}" in str(err.value)


def test_rest_client_on_the_grpc_port_is_told_so(servers):
    with pytest.raises(UserInputError, match="no HTTP answer, so not TensorFlow Serving's REST API"):
        RemoteModel(servers.grpc, "cells")


@pytest.mark.parametrize("api", APIS)
def test_unknown_model_or_version_is_named(servers, api):
    with pytest.raises(UserInputError, match="has no model 'nope'; give the --model_name"):
        connect(servers, api, "nope")
    with pytest.raises(UserInputError, match="has no model 'cells' version 9"):
        connect(servers, api, version=9)
    with connect(servers, api, version=1) as remote:
        assert remote.source.endswith("model cells version 1")


@pytest.mark.parametrize("api", APIS)
def test_model_without_cp2image_signatures_is_refused(servers, api):
    with pytest.raises(UserInputError, match=r"model plain: not a cp2image-tf model: it lacks the "
                       r"signatures serving_default \(features -> images\); generate_png"):
        connect(servers, api, "plain")


@pytest.mark.parametrize("api", APIS)
def test_wrong_feature_count_is_refused(servers, api):
    with connect(servers, api) as remote:
        shape = r"takes \[N, 2\] \(feature_names Nuclei_AreaShape_Area, Nuclei_Intensity"
        for bad, message in ((np.zeros((3, 3)), shape), (np.zeros(3), shape),
                             (np.zeros((2, 2, 2)), shape), ([["a", "b"]], "not numbers")):
            with pytest.raises(UserInputError, match=message):
                remote.images(bad)
        with pytest.raises(UserInputError, match=r"features of shape \[3, 3\]"):
            remote.pngs(np.zeros((3, 3)))
        with pytest.raises(UserInputError, match=r"features of shape \[3\]:"):
            remote.pngs(np.zeros(3))
        # One profile [F] is one cell, as for a local model.
        assert remote.images(remote.median).shape == (1, 48, 48, 2)


def test_rest_client_does_not_import_tensorflow(servers):
    script = ("import sys, numpy as np\n"
              "from cp2image_tf.serving.remote import RemoteModel\n"
              f"remote = RemoteModel({servers.rest!r}, 'cells')\n"
              "assert remote.images(np.ones((2, 2))).shape == (2, 48, 48, 2)\n"
              "assert len(remote.pngs(np.ones((2, 2)))) == 2\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("api", APIS)
def test_predict_command_writes_what_generate_writes(api, model, servers, disc_dataset, tmp_path):
    """`cp2image-tf predict` against the server gives the TIFFs `generate` gives locally."""
    import pandas as pd
    import tifffile
    from click.testing import CliRunner

    from cli.main import main
    from cp2image_tf.drawing.generate import generate
    from cp2image_tf.serving.local import load_model

    table = disc_dataset.parent / "cp" / "Nuclei.csv"
    args = ["predict", str(table), str(tmp_path / "served"), "--server", getattr(servers, api),
            "--model-name", "cells", "--limit", "5"] + (["--grpc"] if api == "grpc" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    generate(load_model(model.base), table, tmp_path / "local", limit=5)
    served = pd.read_csv(tmp_path / "served" / "profiles.csv")
    local = pd.read_csv(tmp_path / "local" / "profiles.csv")
    pd.testing.assert_frame_equal(served, local)
    for name in served["file"]:
        np.testing.assert_allclose(tifffile.imread(tmp_path / "served" / name),
                                   tifffile.imread(tmp_path / "local" / name), atol=1e-6)
    result = CliRunner().invoke(main, ["predict", str(table), str(tmp_path / "none"), "--server",
                                       "http://127.0.0.1:9", "--model-name", "cells"])
    assert result.exit_code == 1 and "http://127.0.0.1:9: cannot reach" in result.output
