"""evaluate: the report's figures against independent computations, and bad input."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from cli.main import main
from cp2image_tf.evaluate import evaluate, nearest_neighbours, stratified_quota
from cp2image_tf.generate import load_model
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import load_manifest


@pytest.fixture(scope="module")
def evaluated(disc_run, disc_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "out"
    model = load_model(disc_run)
    report = evaluate(model, disc_dataset, out, split="test", workers=1, progress=False)
    return SimpleNamespace(report=report, model=model, out=out)


def split_cells(data, split):
    from tfrecords_tools.reader import make_dataset

    _, crops, meta = next(iter(make_dataset(data, split, 10_000, shuffle=False, repeat=False,
                                            with_metadata=True, normalization="none")))
    return meta["raw_features"].numpy(), crops.numpy().astype(np.float64)


def test_report_agrees_with_independent_computation(evaluated, disc_dataset):
    from cp2image_tf.remeasure import plan, remeasure

    report, model = evaluated.report, evaluated.model
    raw, crops = split_cells(disc_dataset, "test")
    train_raw, train_crops = split_cells(disc_dataset, "train")
    assert report["cells"] == len(crops) and report["reference_cells"] == len(train_crops)
    mean_image = train_crops.mean(0)
    pixels = report["pixels"]
    np.testing.assert_allclose(pixels["mean image"]["all"]["mse"]["mean"],
                               ((crops - mean_image) ** 2).mean(axis=(1, 2, 3)).mean(), rtol=1e-5)
    generated = model.images(raw)
    np.testing.assert_allclose(pixels["model"]["all"]["mse"]["mean"],
                               ((generated - crops) ** 2).mean(axis=(1, 2, 3)).mean(), rtol=1e-4)
    # Nearest neighbour by brute force on standardised features.
    stats_ = load_manifest(disc_dataset)["features"]["stats"]
    z = lambda x: (x - np.asarray(stats_["mean"])) / np.asarray(stats_["std"])  # noqa: E731
    brute = np.argmin(((z(raw)[:, None] - z(train_raw)[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(pixels["nearest neighbour"]["all"]["mse"]["mean"],
                               ((train_crops[brute] - crops) ** 2).mean(axis=(1, 2, 3)).mean(),
                               rtol=1e-5)

    table = pd.read_csv(evaluated.out / "features.csv", index_col="feature")
    assert list(table.index) == ["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"]
    # Real discs re-measured recover the input area and intensity: the ceiling is near 1.
    assert (table["ceiling pearson"] > 0.95).all(), table
    # The report pairs each cell's input with its own cell's measurement.
    channels = ["DNA", "Actin"]
    for method, crops_ in (("ceiling", crops.astype(np.float32)), ("model", generated)):
        measured = remeasure(crops_, plan(model.feature_names, channels), channels)
        for j, feature in enumerate(table.index):
            x, y = raw[:, j], measured[feature].to_numpy()
            ok = np.isfinite(y)
            expected = (stats.pearsonr(x[ok], y[ok])[0] if ok.sum() >= 10 and np.ptp(y[ok]) > 0
                        else np.nan)
            assert table.loc[feature, f"{method} pearson"] == pytest.approx(expected, abs=1e-6,
                                                                            nan_ok=True)
    assert report["modules"]["all"]["mean image"]["fraction"] == 0.0  # one picture for all cells
    assert report["treatments"]["model"]["chance"] == 0.5


def test_outputs_are_written(evaluated):
    out = evaluated.out
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and report["features"]["remeasured"] == 2
    assert set(report["modules"]) == {"AreaShape", "Intensity", "all"}
    markdown = (out / "report.md").read_text()
    assert "| AreaShape | 1 |" in markdown and "min per 1,000 cells" in markdown
    for png in ("cells.png", "modules.png", "scatter.png"):
        assert (out / png).stat().st_size > 5000, png
    assert report["timing"]["seconds_per_1000_cells"] > 0


def test_stratified_quota():
    assert stratified_quota({"a": 10, "b": 3, "c": 50}, 21) == {"a": 9, "b": 3, "c": 9}
    assert stratified_quota({"a": 10, "b": 3}, None) == {"a": 10, "b": 3}
    assert sum(stratified_quota({"a": 5, "b": 5, "c": 5}, 7).values()) == 7


def test_nearest_neighbours_skip_nan_by_imputing_medians(disc_dataset):
    manifest = load_manifest(disc_dataset)
    reference = np.array([[100.0, 0.1], [400.0, 0.5]], np.float32)
    query = np.array([[390.0, np.nan], [90.0, 0.12]], np.float32)
    assert list(nearest_neighbours(query, reference, manifest, "standard")) == [1, 0]


def test_bad_input(evaluated, disc_dataset, cp_folder, tmp_path):
    from tfrecords_tools.convert import ConvertConfig, convert

    model = evaluated.model
    with pytest.raises(UserInputError, match="--split nope: not a split of"):
        evaluate(model, disc_dataset, tmp_path / "a", split="nope", progress=False)
    other = tmp_path / "other"
    convert(ConvertConfig(input=str(cp_folder), out_dir=str(other), channels=["DNA", "Actin"],
                          objects=["Nuclei"], crop_size=48), progress=False)
    with pytest.raises(UserInputError, match="are not the model's 2"):
        evaluate(model, other, tmp_path / "b", progress=False)

    # A dataset whose only features are CalculateMath results: nothing cp-measure re-measures.
    cp = tmp_path / "math" / "cp"
    shutil.copytree(disc_dataset.parent / "cp", cp)
    nuclei = pd.read_csv(cp / "Nuclei.csv").rename(columns={
        "AreaShape_Area": "Math_Score", "Intensity_MeanIntensity_DNA": "Math_Ratio"})
    nuclei.to_csv(cp / "Nuclei.csv", index=False)
    math_data = tmp_path / "math" / "data"
    convert(ConvertConfig(input=str(cp), out_dir=str(math_data), channels=["DNA", "Actin"],
                          objects=["Nuclei"], crop_size=48, split_by=["Metadata_Well"]),
            progress=False)
    names = load_manifest(math_data)["features"]["names"]
    fake = SimpleNamespace(feature_names=names, description={}, source="a stand-in model",
                           images=lambda raw: np.zeros((len(raw), 48, 48, 2), np.float32))
    with pytest.raises(UserInputError, match="re-measure"):
        evaluate(fake, math_data, tmp_path / "c", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()

    result = CliRunner().invoke(main, ["evaluate", str(evaluated.out.parent), str(disc_dataset),
                                       str(tmp_path / "d")])
    assert result.exit_code == 1 and "neither a run folder" in result.output


def test_distributions_classifier_and_ceilings(evaluated):
    """Discs: treatments differ in size and brightness, so the re-measured real cells classify
    well above chance; one picture for every cell is far from the real distribution."""
    report = evaluated.report
    cls = report["classification"]
    assert cls["chance"] == 0.5 and cls["classes"] == ["large", "small"]
    assert cls["accuracy"]["ceiling"] >= 0.9
    assert cls["unseen_treatments"] == []
    dist = report["distributions"]
    assert dist["mean image"]["pooled"]["kid"] > dist["ceiling"]["pooled"]["kid"]
    assert dist["mean image"]["pooled"]["frechet"] > dist["ceiling"]["pooled"]["frechet"]
    n = report["cells"]
    assert dist["model"]["pooled"]["n"] == [n, n]
    assert sum(dist["ceiling"]["pooled"]["n"]) == n
    assert report["treatments"]["ceiling"]["splits"] == 20  # (2 features: r itself means little)
    markdown = (evaluated.out / "report.md").read_text()
    assert "| real cells (ceiling) | 1 (itself) |" in markdown
