"""explore: the page's API through FastAPI's test client, checked against the SavedModel.

Sliders move their feature with its correlated features unless alone=1, and every picture is
the SavedModel's `edit` of the base's cell (pinned); most checks of exact pictures ask alone=1
so that the expected profile is the base with one value changed."""
import base64
import io
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tifffile
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from fake_serving import ServedModels, rest_server

from cli.main import main
from cp2image_tf import explore
from cp2image_tf.serving.export import export
from cp2image_tf.drawing.profiles import read_profiles, treatment_means
from cp2image_tf.drawing.traverse import (correlated_offsets, feature_correlations_with,
                                          traverse)
from cp2image_tf.measuring.remeasure import plan_measurement, remeasure
from cp2image_tf.serving.local import load_model
from tfrecords_tools.reader import iter_cells as _records
from cp2image_tf.serving.remote import RemoteModel
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import load_manifest

AREA = "Nuclei_AreaShape_Area"
DNA = "Nuclei_Intensity_MeanIntensity_DNA"


@pytest.fixture(scope="module")
def exported(disc_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("explore_models") / "discs"
    return Path(export(disc_run, base, warmup=False)["path"])


@pytest.fixture(scope="module")
def saved(exported):
    """The SavedModel loaded on its own: the reference the API's answers are checked against."""
    return tf.saved_model.load(str(exported))


@pytest.fixture(scope="module")
def model(exported):
    return load_model(exported)


@pytest.fixture(scope="module")
def stats(disc_dataset):
    manifest = load_manifest(disc_dataset)
    s = manifest["features"]["stats"]
    return {"names": manifest["features"]["names"], "median": np.asarray(s["median"], np.float32),
            "sd": np.asarray(s["std"], np.float32)}


@pytest.fixture(scope="module")
def client(model, disc_dataset):
    return TestClient(explore.create_app(model, disc_dataset))


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def strip_channels(url: str, channels: int) -> np.ndarray:
    """A /api/render strip (data URL, greyscale [H, W*C]) -> uint8 [H, W, C]."""
    assert url.startswith("data:image/png;base64,")
    strip = png_pixels(base64.b64decode(url.split(",", 1)[1]))
    h, wc = strip.shape
    return strip.reshape(h, channels, wc // channels).transpose(0, 2, 1)


def signature(saved, name, raw):
    key = {"serving_default": "images", "generate_png": "png_bytes"}[name]
    features = tf.constant(np.asarray(raw, np.float32).reshape(1, -1))
    return saved.signatures[name](features=features)[key].numpy()[0]


def edit(saved, raw, like):
    """The SavedModel's picture of `raw` as an edit of the training cell nearest `like`."""
    features, like = (tf.constant(np.asarray(v, np.float32).reshape(1, -1)) for v in (raw, like))
    return saved.signatures["edit"](features=features, like=like)["images"].numpy()[0]


def composite_png(image) -> np.ndarray:
    """generate_png's colouring of a picture, as pixels."""
    from cp2image_tf.viz import composite

    return composite(image, ["DNA", "Actin"])


def as_uint8(images):
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def test_png_is_the_pinned_picture_coloured_as_generate_png(client, saved, stats):
    j = stats["names"].index(AREA)
    answer = client.get(f"/api/image.png?base=median&alone=1&{AREA}=1.5")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    raw = stats["median"].copy()
    raw[j] += 1.5 * stats["sd"][j]
    expected = composite_png(edit(saved, raw, stats["median"]))
    assert np.abs(png_pixels(answer.content).astype(int) - expected).max() <= 1
    # generate_png colours the same way (within rounding), and this is not the median's picture.
    median = edit(saved, stats["median"], stats["median"])
    assert np.abs(png_pixels(signature(saved, "generate_png", stats["median"])).astype(int)
                  - composite_png(median)).max() <= 1
    assert not np.array_equal(png_pixels(answer.content), composite_png(median))


def test_render_gives_the_pinned_edit_of_the_base_cell(client, saved, stats):
    j = stats["names"].index(AREA)
    answer = client.get(f"/api/render?base=median&alone=1&{AREA}=-1").json()
    raw = stats["median"].copy()
    raw[j] -= stats["sd"][j]
    expected = as_uint8(edit(saved, raw, stats["median"]))
    assert np.array_equal(strip_channels(answer["strip"], expected.shape[-1]), expected)
    assert answer["offsets"] == {AREA: -1.0} and answer["notes"] == [] and answer["clamped"] == []
    assert answer["label"] == "the training median cell"
    assert answer["alone"] is True and answer["moved_with"] == [] and answer["pinned"] is True


def test_the_main_view_edits_the_base_cell_and_never_swaps_it(client, saved):
    """Pinned to the cell the base starts from: the lookup never picks another training cell
    for a moved profile (serving_default picks the cell nearest each profile)."""
    base = np.asarray(client.get("/api/base?base=small").json()["raw"], np.float32)
    for offsets in (f"{AREA}=3", f"{AREA}=3&{DNA}=3", f"{AREA}=-2&{DNA}=2"):
        answer = client.get(f"/api/render?base=small&{offsets}").json()
        raw = client.get(f"/api/profile?base=small&{offsets}").json()["raw"]
        raw = np.asarray([raw[AREA], raw[DNA]], np.float32)
        expected = as_uint8(edit(saved, raw, base))
        assert np.array_equal(strip_channels(answer["strip"], 2), expected), offsets


def test_a_slider_alone_changes_exactly_one_feature(client, stats):
    before = client.get("/api/profile?base=large").json()
    after = client.get(f"/api/profile?base=large&alone=1&{AREA}=0.7").json()
    changed = [name for name in stats["names"] if before["raw"][name] != after["raw"][name]]
    assert changed == [AREA]
    j = stats["names"].index(AREA)
    assert after["raw"][AREA] == pytest.approx(before["raw"][AREA] + 0.7 * stats["sd"][j], rel=1e-5)
    assert after["offsets"] == {AREA: 0.7}


def test_a_slider_moves_its_correlated_features_by_default(client, model, disc_dataset, stats):
    """The direction traverse draws: each other feature by its training correlation."""
    base = client.get("/api/profile?base=large").json()["raw"]
    answer = client.get(f"/api/render?base=large&{AREA}=0.7").json()
    after = client.get(f"/api/profile?base=large&{AREA}=0.7").json()
    rows = feature_correlations_with(disc_dataset, model, [0])
    move = correlated_offsets(rows, [0], [0.7])
    assert move[1] > 0.2  # large discs are brighter
    assert after["raw"][AREA] == pytest.approx(base[AREA] + 0.7 * stats["sd"][0], rel=1e-5)
    assert after["raw"][DNA] == pytest.approx(base[DNA] + move[1] * stats["sd"][1], rel=1e-4)
    assert after["offsets"] == {AREA: 0.7}
    assert answer["alone"] is False and answer["moved_with_count"] == 1
    assert answer["moved_with"] == [[DNA, pytest.approx(move[1], abs=0.006)]]
    # The CSV says so; without --data the slider moves alone and the notes say why.
    assert "correlated features moved with it" in client.get(
        f"/api/profile.csv?base=large&{AREA}=0.7").text
    plain = TestClient(explore.create_app(model, remeasure=False))
    alone = plain.get(f"/api/render?{AREA}=0.7").json()
    assert alone["alone"] is True and "needs the dataset" in " ".join(alone["notes"])
    assert plain.get("/api/info").json()["correlated"] is False


def test_remeasure_reads_the_moved_features_on_the_drawn_cell(client, saved, model, stats):
    """cp-measure on the drawn cell and on the base's picture, the change brought to the
    feature's units by the slope over real training crops."""
    explorer = client.app.state.explorer
    query = f"base=small&alone=1&{AREA}=1.5"
    answer = client.get(f"/api/remeasure?{query}").json()
    assert answer["available"] is True and answer["why"] is None
    [reading] = answer["features"]
    raw = client.get(f"/api/profile?{query}").json()["raw"]
    base = np.asarray(client.get("/api/base?base=small").json()["raw"], np.float32)
    assert reading["feature"] == AREA and reading["asked"] == pytest.approx(raw[AREA], rel=1e-6)
    assert reading["base"] == pytest.approx(base[0], rel=1e-6)
    # Independently: the same segmentation and slope applied to the SavedModel's pictures.
    drawn = edit(saved, [raw[AREA], raw[DNA]], base)
    before = edit(saved, base, base)
    plan = plan_measurement([AREA], ["DNA", "Actin"])
    seg = explorer.readout.segmentation
    m = remeasure(np.stack([drawn, before]), plan, ["DNA", "Actin"], segmentation=seg)[AREA]
    slope = explorer.readout.calibration.slope[AREA]
    assert slope > 0 and explorer.readout.calibration.r[AREA] > 0.8  # discs' areas re-measure well
    assert reading["measured"] == pytest.approx(base[0] + (m[0] - m[1]) / slope, rel=1e-6)
    assert reading["r"] == pytest.approx(explorer.readout.calibration.r[AREA], abs=1e-3)
    # Two moved features, two readings; the unmoved profile has none.
    both = client.get(f"/api/remeasure?base=small&{AREA}=1&{DNA}=-1").json()["features"]
    assert [r["feature"] for r in both] == [AREA, DNA]
    assert all(np.isfinite(r["measured"]) for r in both)
    assert client.get("/api/remeasure?base=small").json()["features"] == []
    # Without the dataset, the answer (and the page's description) says what it needs.
    plain = TestClient(explore.create_app(model))
    why = plain.get("/api/info").json()["remeasure"]
    assert "--data DATA_DIR" in why
    assert plain.get(f"/api/remeasure?{AREA}=1").json() == {
        "available": False, "why": why, "features": [], "ms": pytest.approx(0, abs=50)}


def test_bases_are_the_treatment_means_and_the_cells_of_data(client, model, disc_dataset, stats):
    means = treatment_means(disc_dataset, model, ["small", "large"])
    for treatment in ("small", "large"):
        base = client.get(f"/api/base?base={treatment}").json()
        expected = means.loc[treatment].to_numpy(np.float32)
        expected = np.where(np.isfinite(expected), expected, stats["median"])
        assert np.allclose(base["raw"], expected, rtol=1e-6)
        assert base["label"] == f"the {treatment} mean"
    manifest = load_manifest(disc_dataset)
    # A training cell (in memory) and a test cell (found by reading DATA_DIR).
    for split in ("train", "test"):
        cell_id, values = next(iter(_records(disc_dataset, manifest, splits=(split,))))
        base = client.get(f"/api/base?base={cell_id}").json()
        assert base["label"] == f"cell {cell_id}"
        assert np.allclose(base["raw"], np.where(np.isfinite(values), values, stats["median"]))
        assert client.get(f"/api/cells?q={cell_id}&lookup=1").json()["exact"] is True
        assert client.get(f"/api/cells?q={cell_id}").json()["exact"] is (split == "train")


def test_unknown_feature_cell_or_treatment_is_a_4xx_naming_it(client):
    answer = client.get("/api/render?base=median&Nuclei_AreaShape_Aera=1")
    assert answer.status_code == 400
    assert "Nuclei_AreaShape_Aera" in answer.json()["error"]
    assert "Did you mean Nuclei_AreaShape_Area" in answer.json()["error"]
    answer = client.get(f"/api/image.png?{AREA}=lots")
    assert answer.status_code == 400 and "'lots'" in answer.json()["error"]
    answer = client.get("/api/render?base=999-1")
    assert answer.status_code == 404 and "cell 999-1: not in" in answer.json()["error"]
    assert client.get("/api/cells?q=999-1&lookup=1").json()["exact"] is False
    answer = client.get("/api/render?base=Taxol")
    assert answer.status_code == 404 and "base Taxol" in answer.json()["error"]
    answer = client.get("/api/interpolate?a=small&b=Taxol")
    assert answer.status_code == 404 and "treatment Taxol" in answer.json()["error"]
    answer = client.get(f"/api/traverse?feature={AREA}&steps=100")
    assert answer.status_code == 400 and "steps 100" in answer.json()["error"]
    answer = client.get("/api/neighbours?k=x")
    assert answer.status_code == 400 and "k" in answer.json()["error"]


def test_out_of_range_offsets_are_clamped_and_reported(client, model, saved, stats):
    j = stats["names"].index(AREA)
    # Extrapolating: only +-5 SD.
    plain = TestClient(explore.create_app(model, extrapolate=True))
    answer = plain.get(f"/api/render?base=median&alone=1&{AREA}=12").json()
    at_limit = float(stats["median"][j] + 5 * stats["sd"][j])
    note = f"{AREA}: +12 SD is beyond the ±5 SD range; drawn at +5 SD."
    assert answer["clamped"] == [{"feature": AREA, "asked": 12.0, "used": explore.OFFSET_LIMIT,
                                  "value": pytest.approx(at_limit), "note": note}]
    assert answer["notes"] == [answer["clamped"][0]["note"]]
    raw = stats["median"].copy()
    raw[j] += explore.OFFSET_LIMIT * stats["sd"][j]
    expected = as_uint8(edit(saved, raw, stats["median"]))
    assert np.array_equal(strip_channels(answer["strip"], expected.shape[-1]), expected)
    # Otherwise also within the training range (the largest area seen here): the manifest's,
    # the model's own without DATA_DIR.
    high = client.get("/api/info").json()["features"][j]["high"]
    assert high < stats["median"][j] + 5 * stats["sd"][j]
    without_data = TestClient(explore.create_app(model))
    assert without_data.get(f"/api/render?base=median&{AREA}=12").json()["clamped"][0]["value"] \
        == pytest.approx(high)
    answer = client.get(f"/api/render?base=median&alone=1&{AREA}=12").json()
    [clamp] = answer["clamped"]
    assert clamp["value"] == pytest.approx(high)
    assert clamp["used"] == pytest.approx((high - stats["median"][j]) / stats["sd"][j], abs=1e-3)
    assert "beyond the values of the training cells" in clamp["note"] and "+12 SD" in clamp["note"]
    assert answer["offsets"] == {AREA: clamp["used"]}
    raw = stats["median"].copy()
    raw[j] = high
    expected = as_uint8(edit(saved, raw, stats["median"]))
    assert np.array_equal(strip_channels(answer["strip"], expected.shape[-1]), expected)
    low = client.get("/api/info").json()["features"][j]["low"]
    profile = client.get(f"/api/profile?{AREA}=-40").json()
    assert profile["raw"][AREA] == pytest.approx(max(low, stats["median"][j] - 5 * stats["sd"][j]))
    assert "-40 SD" in profile["notes"][0]


def test_tiff_has_named_channels_and_the_images(client, saved, stats, model):
    answer = client.get(f"/api/image.tiff?base=median&alone=1&{AREA}=2")
    assert answer.status_code == 200
    assert answer.headers["content-disposition"] == \
        'attachment; filename="cp2image_median_1changed.tif"'
    j = stats["names"].index(AREA)
    raw = stats["median"].copy()
    raw[j] += 2 * stats["sd"][j]
    with tifffile.TiffFile(io.BytesIO(answer.content)) as tif:
        assert tif.imagej_metadata["Labels"] == model.channels
        data = tif.asarray()
    assert np.array_equal(data, np.moveaxis(edit(saved, raw, stats["median"]), -1, 0))


def test_profile_csv_is_a_profiles_table_for_generate(client, tmp_path, stats):
    answer = client.get(f"/api/profile.csv?base=small&{AREA}=1")
    path = tmp_path / "profile.csv"
    path.write_bytes(answer.content)
    values, extra = read_profiles(path, stats["names"])
    expected = client.get(f"/api/profile?base=small&{AREA}=1").json()["raw"]
    assert np.allclose(values.iloc[0].to_numpy(), [expected[n] for n in stats["names"]], rtol=1e-6)
    assert extra["label"][0] == (f"the small mean, {AREA} +1 SD (and 1 correlated features "
                                 "moved with it)")


def test_neighbours_are_the_nearest_training_cells_in_sd_units(client, disc_dataset, stats):
    manifest = load_manifest(disc_dataset)
    cells = list(_records(disc_dataset, manifest, splits=("train",)))
    ids = [c for c, _ in cells]
    raw = np.stack([v for _, v in cells])
    z = (np.where(np.isfinite(raw), raw, stats["median"]) - stats["median"]) / stats["sd"]
    query = client.get(f"/api/profile?base=large&{AREA}=-1").json()["raw"]
    qz = (np.asarray([query[n] for n in stats["names"]]) - stats["median"]) / stats["sd"]
    order = np.argsort(np.linalg.norm(z - qz, axis=1))[:4]
    answer = client.get(f"/api/neighbours?base=large&{AREA}=-1&k=4").json()
    assert answer["searched"] == len(ids)
    assert [c["id"] for c in answer["cells"]] == [ids[i] for i in order]
    crop = strip_channels(answer["cells"][0]["strip"], 2)
    assert crop.shape == (48, 48, 2) and crop.max() > 0


def test_traverse_draws_what_generate_traverse_draws(client, model, disc_dataset, tmp_path):
    summary = traverse(model, tmp_path / "t", [AREA], start=-1, stop=1, steps=3, base="large",
                       data=disc_dataset, correlated=True)
    answer = client.get(f"/api/traverse?base=large&feature={AREA}&start=-1&stop=1&steps=3"
                        "&correlated=1").json()
    assert [f["label"] for f in answer["frames"]] == ["-1.0 SD", "+0.0 SD", "+1.0 SD"]
    got = np.stack([strip_channels(f["strip"], 2) for f in answer["frames"]])
    # float64 profile arithmetic here and there: allow a rounding step of 1/255.
    assert np.abs(got.astype(int) - as_uint8(summary["images"][0]).astype(int)).max() <= 1
    plain = client.get(f"/api/traverse?base=large&feature={AREA}&steps=3").json()
    middle = client.get("/api/render?base=large").json()["strip"]
    assert plain["frames"][1]["strip"] == middle  # the 0 SD step is the profile itself


def test_interpolation_runs_from_one_treatment_mean_to_the_other(client, model, stats):
    answer = client.get("/api/interpolate?a=small&b=large&steps=4").json()
    assert [f["label"] for f in answer["frames"]] == ["small", "0.33", "0.67", "large"]
    small, large = (np.asarray([client.get(f"/api/profile?base={t}").json()["raw"][n]
                                for n in stats["names"]], np.float32) for t in ("small", "large"))
    # The exemplar model edits one training cell along the strip: the one nearest its middle.
    assert model.can_pin
    middle = small + (large - small) * 2 / 3
    want = as_uint8(model.edits(np.stack([small, large]), middle))
    got = [strip_channels(answer["frames"][k]["strip"], 2) for k in (0, -1)]
    assert all(np.abs(g.astype(int) - w.astype(int)).max() <= 1 for g, w in zip(got, want))


def test_without_data_the_median_works_and_the_rest_says_what_it_needs(model):
    client = TestClient(explore.create_app(model))
    info = client.get("/api/info").json()
    assert info["treatments"] == [] and set(info["model_treatments"]) == {"small", "large"}
    assert info["channel_labels"] == info["channels"] == ["DNA", "Actin"]  # measured as named
    assert client.get("/api/render").status_code == 200
    for url in ("/api/render?base=large", "/api/neighbours", "/api/interpolate?a=small&b=large",
                f"/api/traverse?feature={AREA}&correlated=1"):
        answer = client.get(url)
        assert answer.status_code == 400 and "--data DATA_DIR" in answer.json()["error"], url


def test_data_with_other_features_is_refused(model, disc_dataset, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(disc_dataset, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["features"]["names"] = manifest["features"]["names"][::-1]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match=r"not the model.s 2 \(in order\)"):
        explore.create_app(model, other)


def test_page_and_its_files_are_served_with_nothing_from_the_internet(client):
    page = client.get("/")
    assert page.status_code == 200 and 'src="static/explore.js"' in page.text
    for name in ("explore.js", "explore.css"):
        answer = client.get(f"/static/{name}")
        assert answer.status_code == 200 and len(answer.text) > 1000
    for path in explore.STATIC.iterdir():
        assert "http://" not in path.read_text() and "https://" not in path.read_text(), path


def test_served_model_gives_the_same_pictures_and_a_stopped_server_a_503(exported, saved, stats,
                                                                        disc_dataset):
    models = ServedModels({"cells": exported.parent})
    j = stats["names"].index(AREA)
    raw = stats["median"].copy()
    raw[j] += stats["sd"][j]
    with rest_server(models) as url:
        remote = RemoteModel(url, "cells")
        client = TestClient(explore.create_app(remote, disc_dataset))
        info = client.get("/api/info").json()
        assert info["remote"] is True and info["pinned"] is False
        # Not pinned, so no re-measured readout: the page says why.
        assert "edits one chosen cell" in info["remeasure"]
        answer = client.get(f"/api/remeasure?{AREA}=1").json()
        assert answer["available"] is False and answer["why"] == info["remeasure"]
        png = client.get(f"/api/image.png?alone=1&{AREA}=1").content
        assert np.array_equal(png_pixels(png), png_pixels(signature(saved, "generate_png", raw)))
        strip = client.get(f"/api/render?alone=1&{AREA}=1").json()["strip"]
        expected = as_uint8(signature(saved, "serving_default", raw))
        assert np.array_equal(strip_channels(strip, 2), expected)
    # The fake's handler threads outlive its shutdown on kept-alive connections, which a
    # stopped TF Serving closes: drop them, so that the next request finds nobody listening.
    remote.close()
    answer = client.get(f"/api/render?{AREA}=1")
    assert answer.status_code == 503
    assert answer.json()["error"].startswith("TensorFlow Serving did not answer: ")
    assert "cannot reach" in answer.json()["error"]
    assert client.get("/api/profile").status_code == 200  # what needs no model still works


def test_busy_port_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(UserInputError, match=f"127.0.0.1:{port}.*choose another --port"):
            explore.bind("127.0.0.1", port)


def test_cli_warns_about_a_public_host_and_serves(exported, disc_dataset, monkeypatch):
    served = {}

    def fake_serve(app, host, port, ready=None, sock=None):
        served.update(host=host, app=app)
        sock.close()
        ready(f"http://{host}:{port}")

    monkeypatch.setattr(explore, "serve", fake_serve)
    result = CliRunner().invoke(main, ["explore", str(exported), "--data", str(disc_dataset),
                                       "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert "Warning: --host 0.0.0.0: the page will be reachable from other machines" in result.output
    assert "Open http://0.0.0.0:0 in a browser" in result.output
    assert served["host"] == "0.0.0.0" and served["app"].state.explorer.reference is not None
    result = CliRunner().invoke(main, ["explore"])
    assert result.exit_code == 2 and "Give MODEL" in result.output
    result = CliRunner().invoke(main, ["explore", "--server", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "--model-name" in result.output


def test_an_unexpected_error_is_a_json_500_and_one_log_line(model, monkeypatch, caplog):
    app = explore.create_app(model)

    def broken(params):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(app.state.explorer, "render", broken)
    answer = TestClient(app).get("/api/render")
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error (ZeroDivisionError: a bug)"}
    [record] = [r for r in caplog.records if r.name == "cp2image_tf.explore"]
    assert record.getMessage().startswith("explore: GET /api/render failed: ZeroDivisionError: a bug")
    assert "Traceback" not in caplog.text


def test_strips_stay_within_the_training_range_unless_extrapolating(client, model, disc_dataset):
    s = load_manifest(disc_dataset)["features"]["stats"]
    answer = client.get(f"/api/traverse?feature={AREA}&start=-5&stop=5&steps=3").json()
    assert [f["label"] for f in answer["frames"]] == ["-5.0 SD (min)", "+0.0 SD", "+5.0 SD (max)"]
    values = [f["value"] for f in answer["frames"]]
    assert values[0] == pytest.approx(s["min"][0], rel=1e-6)
    assert values[2] == pytest.approx(s["max"][0], rel=1e-6)
    assert "training range" in answer["range"]
    area = client.get("/api/info").json()["features"][0]
    assert area["low"] == pytest.approx(s["min"][0]) and area["high"] == pytest.approx(s["max"][0])
    free = TestClient(explore.create_app(model, extrapolate=True))
    answer = free.get(f"/api/traverse?feature={AREA}&start=-5&stop=5&steps=3").json()
    assert answer["frames"][0]["value"] == pytest.approx(model.median[0] - 5 * model.sd[0],
                                                         rel=1e-5)
    assert answer["range"] == "not limited to the training range"
