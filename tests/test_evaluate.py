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
from cp2image_tf.evaluation.evaluate import evaluate
from cp2image_tf.evaluation.neighbours import nearest_neighbours
from tfrecords_tools.reader import stratified_quota
from cp2image_tf.serving.local import load_model
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import load_manifest


@pytest.fixture(scope="module")
def evaluated(disc_run, disc_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "out"
    model = load_model(disc_run)
    report = evaluate(model, disc_dataset, out, split="test", workers=1, progress=False,
                      moa_column="Metadata_MoA")
    return SimpleNamespace(report=report, model=model, out=out)


def split_cells(data, split):
    from tfrecords_tools.reader import make_dataset

    _, crops, meta = next(iter(make_dataset(data, split, 10_000, shuffle=False, repeat=False,
                                            with_metadata=True, normalization="none")))
    return meta["raw_features"].numpy(), crops.numpy().astype(np.float64)


def test_report_agrees_with_independent_computation(evaluated, disc_dataset):
    from cp2image_tf.measuring.remeasure import Segmentation, plan_measurement as plan, remeasure

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
    # Every picture segmented with the settings report.json states (the disc dataset's Image.csv
    # has no thresholds: pooled over training crops).
    used = report["segmentation"]
    assert used["from"]["nucleus_threshold"] == "pooled over real training crops"
    settings = Segmentation(**{k: used[k] for k in ("dna", "nucleus_threshold", "cell_threshold",
                                                    "nucleus_diameter")})
    for method, crops_ in (("ceiling", crops.astype(np.float32)), ("model", generated)):
        measured = remeasure(crops_, plan(model.feature_names, channels), channels,
                             segmentation=settings)
        for j, feature in enumerate(table.index):
            x, y = raw[:, j], measured[feature].to_numpy()
            ok = np.isfinite(y)
            expected = (stats.pearsonr(x[ok], y[ok])[0] if ok.sum() >= 10 and np.ptp(y[ok]) > 0
                        else np.nan)
            assert table.loc[feature, f"{method} pearson"] == pytest.approx(expected, abs=1e-6,
                                                                            nan_ok=True)
    assert report["modules"]["all"]["mean image"]["fraction"] == 0.0  # one picture for all cells
    assert report["treatments"]["model"]["chance"] == 0.5


def test_controllability_section(evaluated):
    """The discs' size and brightness, traversed on test cells and re-measured: the section in
    report.json, its tables in report.md, a strip per feature, the summary line."""
    out = evaluated.out
    section = json.loads((out / "report.json").read_text())["controllability"]
    features = [entry["feature"] for entry in section["features"]]
    assert features == ["Nuclei_AreaShape_Area", "Nuclei_Intensity_MeanIntensity_DNA"]
    assert section["steps"] == 5 and section["span"] == 1.5
    assert section["cells"] == min(8, evaluated.report["cells"])
    for entry in section["features"]:
        assert entry["ceiling_r"] > 0.95 and entry["real_slope"] > 0
        for way in ("correlated", "alone", "lookup"):
            assert np.array(entry[way]["asked"]).shape == (section["cells"], 5)
            assert np.array(entry[way]["measured"]).shape == (section["cells"], 5)
            assert entry[way]["gain"] is not None, (entry["feature"], way)
        png = out / "controllability" / f"{entry['feature']}.png"
        assert png.stat().st_size > 5000
    for way in ("correlated", "alone", "lookup"):
        gains = [entry[way]["gain"] for entry in section["features"]]
        assert section["summary"][way]["gain"] == pytest.approx(np.median(gains))
    assert set(section["modules"]) == {"AreaShape", "Intensity"}
    assert section["timing"]["measured_crops"] > 0
    assert evaluated.report["timing"]["controllability_seconds"] > 0
    markdown = (out / "report.md").read_text()
    assert "## Controllability" in markdown and "| correlated |" in markdown
    assert "![Nuclei_AreaShape_Area](controllability/Nuclei_AreaShape_Area.png)" in markdown
    assert markdown.index("## Controllability") < markdown.index("## Time")


def test_outputs_are_written(evaluated):
    out = evaluated.out
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and report["features"]["remeasured"] == 2
    assert set(report["modules"]) == {"AreaShape", "Intensity", "all"}
    markdown = (out / "report.md").read_text()
    assert "| AreaShape | 1 |" in markdown and "min per 1,000 cells" in markdown
    for png in ("cells.png", "overview.png", "modules.png", "scatter.png"):
        assert (out / png).stat().st_size > 5000, png
    assert report["timing"]["seconds_per_1000_cells"] > 0


STAGES = ("sample", "draw", "lookup", "segmentation", "remeasure", "compare", "distributions",
          "classifier", "retrieval", "controllability", "outputs", "other")


def test_timing_gives_each_stage_and_they_add_up(evaluated):
    timing = evaluated.report["timing"]
    stages = timing["stages"]
    assert set(stages) == set(STAGES)
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) == pytest.approx(timing["seconds"], rel=1e-9)
    for stage in ("draw", "segmentation", "remeasure", "classifier", "retrieval", "outputs"):
        assert stages[stage] > 0, stage
    # The re-measurement's wall time is the segmentation settings' and the remeasure call's.
    assert timing["measure_seconds"] == pytest.approx(
        stages["segmentation"] + stages["remeasure"], rel=0.02, abs=0.02)
    assert stages["controllability"] >= timing["controllability_seconds"]
    # In the workers: the CPU seconds of segmenting every crop and of measuring them.
    assert timing["in_workers"]["segment_seconds"] > 0
    assert timing["in_workers"]["measure_seconds"] > 0
    on_disk = json.loads((evaluated.out / "report.json").read_text())["timing"]
    assert on_disk["stages"] == pytest.approx(stages)
    assert "classifier" in (evaluated.out / "report.md").read_text().split("## Time")[1]


def test_stratified_quota():
    assert stratified_quota({"a": 10, "b": 3, "c": 50}, 21) == {"a": 9, "b": 3, "c": 9}
    assert stratified_quota({"a": 10, "b": 3}, None) == {"a": 10, "b": 3}
    assert sum(stratified_quota({"a": 5, "b": 5, "c": 5}, 7).values()) == 7


def test_nearest_neighbours_skip_nan_by_imputing_medians(disc_dataset):
    manifest = load_manifest(disc_dataset)
    reference = np.array([[100.0, 0.1], [400.0, 0.5]], np.float32)
    query = np.array([[390.0, np.nan], [90.0, 0.12]], np.float32)
    assert list(nearest_neighbours(query, reference, manifest, "standard")) == [1, 0]


def test_bad_input(evaluated, disc_run, disc_dataset, cp_folder, tmp_path):
    from tfrecords_tools.convert import ConvertConfig, convert

    model = evaluated.model
    with pytest.raises(UserInputError, match="--split nope: not a split of"):
        evaluate(model, disc_dataset, tmp_path / "a", split="nope", progress=False)
    other = tmp_path / "other"
    convert(ConvertConfig(input=str(cp_folder), out_dir=str(other), channels=["DNA", "Actin"],
                          objects=["Nuclei"], crop_size=48), progress=False)
    with pytest.raises(UserInputError, match="are not the model's 2"):
        evaluate(model, other, tmp_path / "b", progress=False)
    with pytest.raises(UserInputError, match="--moa-column Metadata_Nope: .* has no such column"
                                             ".*it has: Metadata_MoA"):
        evaluate(model, disc_dataset, tmp_path / "a", moa_column="Metadata_Nope", progress=False)

    # One treatment (one control plate): legitimate data, evaluated without the classifier, and
    # the report says why; --no-classifier says it was asked for.
    from conftest import make_disc_folder

    one = tmp_path / "one"
    convert(ConvertConfig(input=str(make_disc_folder(one, n_fields=6, treatments=("large",))),
                          out_dir=str(one / "data"), channels=["DNA", "Actin"],
                          objects=["Nuclei"], crop_size=48, split_by=["Metadata_Well"],
                          split=(0.5, 0.0, 0.5)), progress=False)
    report = evaluate(model, one / "data", one / "out", progress=False, workers=1,
                      max_cells=10, reference_cells=30, train_cells=20, controllability_cells=0)
    assert report["classification"] == {}
    assert report["classifier_left_out"].startswith("the training split has 1 treatment (large)")
    assert "treatment_accuracy" not in report["headline"]["all"]["methods"]["model"]
    assert report["modules"]["all"]["ceiling"]["fraction"] > 0  # the rest is evaluated
    markdown = (one / "out" / "report.md").read_text()
    assert "No treatment classifier: the training split has 1 treatment (large)" in markdown
    assert report["controllability"]["why"] == "left out (--controllability-cells 0)"
    assert "Not measured: left out (--controllability-cells 0)." in markdown
    report = evaluate(model, one / "data", one / "asked", progress=False, workers=1,
                      classifier=False, max_cells=10, reference_cells=30, train_cells=20,
                      controllability_cells=0)
    assert report["classification"] == {} and report["classifier_left_out"] == "--no-classifier"
    assert "No treatment classifier (--no-classifier)." in (one / "asked" / "report.md").read_text()
    result = CliRunner().invoke(main, ["evaluate", str(disc_run), str(one / "data"),
                                       str(one / "cli"), "--max-cells", "10", "--reference-cells",
                                       "30", "--train-cells", "20", "--controllability-cells",
                                       "2", "--controllability-features", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "No treatment classifier: the training split has 1 treatment (large)" in result.output
    section = json.loads((one / "cli" / "report.json").read_text())["controllability"]
    assert section["cells"] == 2 and len(section["features"]) == 1
    gain = section["summary"]["correlated"]["gain"]
    assert f"Controllability (2 cells, 1 feature): median gain {gain:.2f} with correlated" \
        in result.output
    seconds = json.loads((one / "cli" / "report.json").read_text())["timing"]["seconds"]
    assert f"{seconds:.0f} s for 10 cells. Tables: {one / 'cli'}/report.md" in result.output

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
    # Re-measuring on Dask: an address where no scheduler answers is one line naming it.
    result = CliRunner().invoke(main, ["evaluate", str(disc_run), str(disc_dataset),
                                       str(tmp_path / "e"), "--scheduler", "tcp://127.0.0.1:9"])
    assert result.exit_code == 1, result.output
    assert "--scheduler tcp://127.0.0.1:9: no Dask scheduler answered" in result.output
    assert not (tmp_path / "e").exists()


def test_distributions_classifier_and_ceilings(evaluated):
    """Discs: treatments differ in size and brightness, so the re-measured real cells classify
    well above chance; one picture for every cell is far from the real distribution."""
    report = evaluated.report
    cls = report["classification"]
    assert cls["chance"] == 0.5 and cls["classes"] == ["large", "small"]
    assert cls["accuracy"]["ceiling"] >= 0.9
    assert cls["unseen"] == []
    dist = report["distributions"]
    assert dist["mean image"]["pooled"]["kid"] > dist["ceiling"]["pooled"]["kid"]
    assert dist["mean image"]["pooled"]["frechet"] > dist["ceiling"]["pooled"]["frechet"]
    n = report["cells"]
    # Generated pictures without a nucleus above the dataset threshold are left out (NaN rows).
    found = n - report["segmentation_failures"]["model"]
    assert dist["model"]["pooled"]["n"] == [found, n] and found > 0
    assert sum(dist["ceiling"]["pooled"]["n"]) == n
    assert report["treatments"]["ceiling"]["splits"] == 20  # (2 features: r itself means little)
    markdown = (evaluated.out / "report.md").read_text()
    assert "| real cells (ceiling) | 1 (itself) |" in markdown


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_distances_and_accuracy_agree_with_independent_computation(evaluated):
    """Fréchet distance, KID and classifier accuracy recomputed from remeasured.parquet with
    scipy and scikit-learn directly."""
    from scipy import linalg
    from sklearn.linear_model import LogisticRegression

    report = evaluated.report
    table = pd.read_parquet(evaluated.out / "remeasured.parquet")
    features = [c for c in table.columns if c not in ("method", "cell_id", "treatment")]
    train = table[table["method"] == "training"]
    assert len(train) == report["training_cells_measured"]
    mean, sd = train[features].mean(), train[features].std(ddof=0)
    z = lambda m: ((table.loc[table["method"] == m, features] - mean) / sd)  # noqa: E731
    model, real = z("model").to_numpy(), z("ceiling").to_numpy()
    # Each method's cells with every feature measured (a picture without a nucleus has none).
    x, y = model[np.isfinite(model).all(1)], real[np.isfinite(real).all(1)]

    covmean = linalg.sqrtm(np.cov(x, rowvar=False) @ np.cov(y, rowvar=False)).real
    frechet = (((x.mean(0) - y.mean(0)) ** 2).sum()
               + np.trace(np.cov(x, rowvar=False) + np.cov(y, rowvar=False) - 2 * covmean))
    pooled = report["distributions"]["model"]["pooled"]
    assert pooled["frechet"] == pytest.approx(frechet, rel=1e-6, abs=1e-9)
    assert report["headline"]["all"]["methods"]["model"]["frechet"] == pytest.approx(frechet,
                                                                                     rel=1e-6)
    # KID: the unbiased MMD^2 averaged over 100 subsets of m = the smaller sample's size, drawn
    # as metrics.kernel_inception_distance documents (seed 0: evaluate's).
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731
    m = min(len(x), len(y))
    assert pooled["n"] == [len(x), len(y)] and m >= 2
    rng, values = np.random.default_rng(0), []
    for _ in range(100):
        a, b = x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                      + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
    assert pooled["kid"] == pytest.approx(np.mean(values), rel=1e-6, abs=1e-9)

    classifier = LogisticRegression(max_iter=2000, random_state=0)
    classifier.fit(np.nan_to_num(((train[features] - mean) / sd).to_numpy()), train["treatment"])
    cls = report["classification"]
    for method in ("model", "ceiling", "nearest neighbour"):
        rows = table[table["method"] == method]
        predicted = classifier.predict(np.nan_to_num(z(method).to_numpy()))
        expected = float(np.mean(predicted == rows["treatment"].to_numpy()))
        assert cls["accuracy"][method] == pytest.approx(expected)
        assert report["headline"]["all"]["methods"][method]["treatment_accuracy"] == \
            pytest.approx(expected)
    # The discs' treatments are told apart from the re-measured real cells.
    assert cls["accuracy"]["ceiling"] >= 0.9 and cls["chance"] == 0.5
    # MoA here maps one to one onto treatments (large -> grow, small -> shrink): same figures.
    assert cls["moa"]["classes"] == ["grow", "shrink"] and cls["moa"]["column"] == "Metadata_MoA"
    assert cls["moa"]["accuracy"] == pytest.approx(cls["accuracy"])
    markdown = (evaluated.out / "report.md").read_text()
    assert markdown.index("| model |") < markdown.index("## Pixels")
    table = markdown[markdown.index("| |"):]  # the headline table, after what was re-measured
    assert "MoA accuracy" in table.splitlines()[0]
    assert markdown.index("2 of 2 features re-measured") < markdown.index("| |")
    for t in ("small", "large"):
        assert (evaluated.out / "treatments" / f"{t}.png").stat().st_size > 5000


def test_classify_unseen_labels_by_held_out_halves():
    from cp2image_tf.evaluation.classify import classify

    rng = np.random.default_rng(0)
    centres = {"a": [4, 0], "b": [0, 4], "c": [-4, -4]}
    def cells(labels):
        x = np.array([centres[t] for t in labels]) + rng.normal(0, 1, (len(labels), 2))
        return pd.DataFrame(x, columns=["f1", "f2"])
    train_labels = ["a", "b"] * 50
    test_labels = np.array(["a", "b", "c", "c"] * 25)
    real = cells(test_labels)
    shuffled = real.sample(frac=1, random_state=1).reset_index(drop=True)
    summary, correct = classify(cells(train_labels), train_labels,
                                {"ceiling": real, "model": shuffled}, test_labels, seed=0,
                                unseen_halves=True)
    assert summary["unseen"] == ["c"] and summary["cells"] == 50
    assert summary["accuracy"]["ceiling"] >= 0.95
    protocol = summary["unseen_protocol"]
    assert protocol["learned_cells"] == 25 and protocol["scored_cells"] == 25
    assert protocol["chance"] == pytest.approx(1 / 3)
    assert summary["unseen_accuracy"]["ceiling"] >= 0.95  # c is far from a and b
    assert summary["unseen_accuracy"]["model"] < 0.7      # shuffled rows: mostly wrong
    # Every test cell is scored once, except the unseen half the second classifier learned.
    assert np.isfinite(correct["ceiling"]).sum() == 75
    with pytest.raises(ValueError, match="at least 2 classes"):
        classify(cells(["a"] * 5), ["a"] * 5, {"ceiling": real}, test_labels, seed=0)


def test_unseen_treatments_reported_apart(disc_run, tmp_path):
    """Data converted with whole treatments in the test split: the report says so and gives
    every headline figure for them apart."""
    from conftest import make_disc_folder
    from tfrecords_tools.convert import ConvertConfig, convert

    cp_dir = make_disc_folder(tmp_path, n_fields=9, treatments=("small", "medium", "large"))
    data = tmp_path / "data"
    convert(ConvertConfig(input=str(cp_dir), out_dir=str(data), channels=["DNA", "Actin"],
                          objects=["Nuclei"], crop_size=48, split_by=["Metadata_Treatment"],
                          split=(0.6, 0.0, 0.4), seed=1), progress=False)
    counts = load_manifest(data)["counts"]["treatments"]
    unseen = sorted(t for t, k in counts["test"].items() if k and not counts["train"][t])
    assert unseen == ["medium"]  # the split put a whole treatment in test
    report = evaluate(load_model(disc_run), data, tmp_path / "out", workers=1, progress=False,
                      max_cells=40, reference_cells=60, train_cells=40,
                      moa_column="Metadata_MoA")
    assert report["unseen_treatments"] == unseen
    head = report["headline"]
    assert head["unseen"]["treatments"] == unseen
    assert head["unseen"]["cells"] + head.get("seen", {"cells": 0})["cells"] == report["cells"]
    for method, row in head["unseen"]["methods"].items():
        assert row["treatment_accuracy"] is not None and row["frechet"] is not None, method
    protocol = report["classification"]["unseen_protocol"]
    assert protocol["learned_cells"] + protocol["scored_cells"] == head["unseen"]["cells"]
    # Its mechanism (shrink, as for small) is among the training cells: scored by MoA too.
    assert report["classification"]["moa"]["unseen"] == []
    assert head["unseen"]["methods"]["ceiling"]["moa_accuracy"] is not None
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Unseen treatments" in markdown
    assert "Every test treatment is unseen" in markdown and "### Unseen" not in markdown
    assert (tmp_path / "out" / "treatments" / f"{unseen[0]}.png").is_file()


def test_split_half_ceiling_leaves_out_single_cell_treatments():
    from cp2image_tf.evaluation.compare import split_half_profiles

    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 10 + ["b"] * 10)
    real = pd.DataFrame(rng.normal(size=(20, 5)) + np.where(labels == "a", 3.0, -3.0)[:, None]
                        * np.array([1, -1, 1, -1, 1]))
    both = split_half_profiles(real, labels, seed=0)
    lone = split_half_profiles(pd.concat([real, real.iloc[[0]]], ignore_index=True),
                               np.append(labels, "c"), seed=0)
    assert lone == both and both["splits"] == 20 and both["retrieval_top1"] == 1.0
    assert split_half_profiles(real.iloc[:1], labels[:1], seed=0)["median_r"] is None


def test_no_headline_when_the_ceiling_says_measurement_fails(evaluated):
    from cp2image_tf.evaluation.evaluate import ceiling_check
    from cp2image_tf.evaluation.report import report_markdown

    def modules(share):
        return pd.DataFrame({"module": ["all", "all"], "method": ["model", "ceiling"],
                             "fraction": [0.9, share]})

    assert ceiling_check(modules(0.5))["passed"]
    failed = ceiling_check(modules(0.39))
    assert not failed["passed"] and "only 39% of CellProfiler's features" in failed["why"]
    report = dict(evaluated.report, ceiling_check=failed)
    markdown = report_markdown(report)
    assert "No headline: re-measuring the real crops reproduces only 39%" in markdown
    assert "| | pixel SSIM |" not in markdown and "## Pixels" in markdown
    assert "| | pixel SSIM |" in report_markdown(evaluated.report)


def test_retrieval_agrees_with_copairs_and_ranks_by_hand(evaluated, disc_dataset):
    """Treatment mAP recomputed from remeasured.parquet with copairs directly; each picture's
    rank of its own cell's input profile recomputed by hand; both as report.json has them."""
    from copairs.map import average_precision, mean_average_precision
    from tfrecords_tools.reader import make_dataset

    report = json.loads((evaluated.out / "report.json").read_text())
    retrieval = report["retrieval"]
    table = pd.read_parquet(evaluated.out / "remeasured.parquet")
    features = [c for c in table.columns if c not in ("method", "cell_id", "treatment")]
    train = table[table["method"] == "training"]
    mean, sd = train[features].mean(), train[features].std(ddof=0)

    def z(method):
        rows = table[table["method"] == method]
        return rows, ((rows[features] - mean) / sd).fillna(0.0).to_numpy()

    jittered = retrieval["map"]["tied_rows_jittered"]
    for method in ("model", "ceiling", "nearest neighbour"):
        if jittered[method]:  # two test cells drew one training cell: ties broken at random
            continue
        rows, values = z(method)
        meta = rows[["treatment"]].reset_index(drop=True)
        ap = average_precision(meta, values, pos_sameby=["treatment"], pos_diffby=[],
                               neg_sameby=[], neg_diffby=["treatment"], progress_bar=False)
        maps = mean_average_precision(ap, sameby=["treatment"], null_size=10000, threshold=0.05,
                                      seed=0, progress_bar=False)
        got = retrieval["map"]["methods"][method]
        assert got["map"] == pytest.approx(ap["average_precision"].mean(), abs=1e-6)
        assert report["headline"]["all"]["methods"][method]["map"] == pytest.approx(got["map"])
        for row in maps.itertuples():
            entry = got["per_treatment"][row.treatment]
            assert entry["map"] == pytest.approx(row.mean_average_precision, abs=1e-6)
            assert entry["p_value"] == pytest.approx(row.p_value)
            assert entry["retrieved"] == bool(row.below_corrected_p)
        assert got["fraction_retrieved"] == pytest.approx(maps["below_corrected_p"].mean())
    assert jittered["model"] == 0 and jittered["ceiling"] == 0
    # Discs of two sizes: the real cells retrieve their treatment; one picture for all cells
    # does not (its ties broken at random, not in copairs' positives-first order).
    assert retrieval["map"]["methods"]["ceiling"]["fraction_retrieved"] == 1.0
    mean_image = retrieval["map"]["methods"]["mean image"]
    assert jittered["mean image"] == report["cells"]
    assert mean_image["fraction_retrieved"] == 0.0 and mean_image["map"] < 0.9

    # Self-retrieval by hand: cosine similarity of each picture's re-measured z-scores to every
    # test cell's input z-scores (manifest statistics); the rank of its own, ties against it.
    _, _, meta = next(iter(make_dataset(disc_dataset, "test", 10_000, shuffle=False,
                                        repeat=False, with_metadata=True,
                                        normalization="none")))
    ids = [c.decode() for c in meta["cell_id"].numpy()]
    raw = dict(zip(ids, meta["raw_features"].numpy().astype(np.float64)))
    manifest = load_manifest(disc_dataset)
    names = manifest["features"]["names"]
    stats_ = manifest["features"]["stats"]
    cols = [names.index(f) for f in features]
    order = list(table.loc[table["method"] == "ceiling", "cell_id"])
    inputs = [[(raw[c][j] - stats_["mean"][j]) / stats_["std"][j] for j in cols] for c in order]
    n = len(order)
    chance = retrieval["self"]["chance"]
    assert chance["top1"] == pytest.approx(1 / n)
    assert chance["top10pct"] == pytest.approx(np.ceil(n / 10) / n)

    def cos(a, b):
        norm = lambda v: sum(x * x for x in v) ** 0.5  # noqa: E731
        return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))

    for method in ("model", "ceiling", "nearest neighbour", "mean image"):
        rows, values = z(method)
        assert list(rows["cell_id"]) == order
        ranks = []
        for i, picture in enumerate(values):
            if not any(picture):  # nothing measured: last
                ranks.append(n)
                continue
            sims = [cos(picture, profile) for profile in inputs]
            ranks.append(sum(s >= sims[i] for s in sims))
        got = retrieval["self"]["methods"][method]
        assert got["top1"] == pytest.approx(np.mean([r == 1 for r in ranks]))
        assert got["top10pct"] == pytest.approx(np.mean([r <= np.ceil(n / 10) for r in ranks]))
        assert got["median_rank"] == pytest.approx(np.median(ranks))
        assert report["headline"]["all"]["methods"][method]["self_top1"] == \
            pytest.approx(got["top1"])
    markdown = (evaluated.out / "report.md").read_text()
    assert "treatment mAP | self-retrieval top-1 | top 10% |" in markdown
    assert "## Retrieval" in markdown and "Self-retrieval" in markdown


def test_self_ranks_small_case():
    from cp2image_tf.evaluation.retrieval import self_ranks

    inputs = pd.DataFrame([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], columns=["a", "b"])
    pictures = pd.DataFrame([[1.0, 0.1], [1.0, 0.1], [np.nan, np.nan]], columns=["a", "b"])
    # Picture 0 is nearest its own profile [1, 0]; picture 1 (the same picture) finds its own
    # [0, 1] last of three; picture 2 has nothing measured: last.
    assert list(self_ranks(pictures, inputs)) == [1, 3, 3]
