"""The evaluate command: a model against a dataset's cells, written to a report."""
import click

from cli.common import call, checkpoint_option, start_tensorflow
from cp2image_tf.evaluation.controllability import DEFAULT_CELLS, DEFAULT_FEATURES


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("data_dir", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--split", default="test", show_default=True, help="Cells to evaluate on.")
@click.option("--max-cells", type=click.IntRange(min=1), default=1000, show_default=True,
              help="At most this many cells, an even share per treatment.")
@click.option("--reference-cells", type=click.IntRange(min=1), default=10000, show_default=True,
              help="Training cells for the nearest-neighbour and mean-image baselines.")
@click.option("--train-cells", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Training cells re-measured to standardise features and train the treatment "
                   "classifier.")
@click.option("--moa-column", default=None, metavar="COLUMN",
              help="Also classify by this Metadata_* column holding one value per treatment, "
                   "e.g. Metadata_MoA (mechanism of action).")
@click.option("--classifier/--no-classifier", default=True, show_default=True,
              help="Train the treatment classifier (left out, and said so, where the training "
                   "split has a single treatment).")
@click.option("--controllability-cells", type=click.IntRange(min=0), default=DEFAULT_CELLS,
              show_default=True, metavar="N",
              help="Test cells traversed along chosen features to see whether the pictures "
                   "change as far as asked (0: leave it out).")
@click.option("--controllability-features", type=click.IntRange(min=1), default=DEFAULT_FEATURES,
              show_default=True, metavar="N",
              help="At most this many features traversed (chosen from the data, each kind of "
                   "feature of each object before a second channel).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes re-measuring cells [default: min(2, CPUs)]; with --scheduler "
                   "local, the LocalCluster's workers.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Re-measure on Dask: 'local' (a LocalCluster on this machine) or a running "
                   "dask-scheduler's address, e.g. tcp://host:8786.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the cell sample.")
@checkpoint_option()
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def evaluate(model_path, data_dir, out_dir, split, max_cells, reference_cells, train_cells,
             moa_column, classifier, controllability_cells, controllability_features, workers,
             scheduler, seed, checkpoint, overwrite, quiet):
    """Measure how much of the CellProfiler profile survives generation.

    Segments and re-measures (cp-measure) real, generated, nearest-neighbour and
    mean-image crops, and correlates the re-measured features with the input
    features, per feature and per module; plus pixel MSE/PSNR/SSIM, Fréchet
    distance and KID on re-measured features, treatment (and --moa-column)
    classification, and mean-profile agreement, each against a real-vs-real
    ceiling; unseen treatments are reported apart. Controllability: test cells
    moved along chosen features (with their correlated features, and alone),
    re-measured, and the gain of each (1: the picture changes as a real cell
    would), beside the nearest-training-cell lookup. Writes report.md (headline
    table first), report.json, features.csv, remeasured.parquet and PNGs
    (cells.png, overview.png, treatments/<treatment>.png, modules.png, scatter.png,
    controllability/<feature>.png) to OUT_DIR.
    """
    from cp2image_tf.evaluation.compare import THRESHOLD
    from cp2image_tf.evaluation.evaluate import evaluate as run
    from cp2image_tf.evaluation.report import fmt
    from cp2image_tf.evaluation.retrieval import retrieval_summary
    from cp2image_tf.serving.local import load_model

    start_tensorflow()
    model = call(load_model, model_path, checkpoint)
    report = call(run, model, data_dir, out_dir, split=split, max_cells=max_cells,
                  reference_cells=reference_cells, train_cells=train_cells, workers=workers,
                  seed=seed, moa_column=moa_column, classifier=classifier,
                  scheduler=scheduler, controllability_cells=controllability_cells,
                  controllability_features=controllability_features,
                  progress=not quiet, overwrite=overwrite)
    check = report["ceiling_check"]
    if not check["passed"]:
        click.echo(f"No headline: {check['why']} Tables for diagnosis: "
                   f"{report['out_dir']}/report.md")
        return
    overall = report["modules"]["all"]
    click.echo(f"{report['cells']} {split} cells, {report['features']['remeasured']} features "
               f"re-measured; share of features with r >= {THRESHOLD} (median r):")
    for method in ("model", "nearest neighbour", "mean image", "ceiling"):
        row = overall[method]
        click.echo(f"  {method:<18} {row['fraction']:.2f} ({row['median_r']:.2f})")
    if report["unseen_treatments"]:
        click.echo(f"Unseen treatments (not in training): {', '.join(report['unseen_treatments'])}"
                   "; reported apart in report.md.")
    treatments = report["treatments"]
    click.echo(f"Treatment retrieval: model {fmt(treatments['model']['retrieval_top1'], 2)}, "
               f"nearest neighbour {fmt(treatments['nearest neighbour']['retrieval_top1'], 2)}, "
               f"chance {fmt(treatments['model']['chance'], 2)}. Pixel SSIM: model "
               f"{report['pixels']['model']['all']['ssim']['mean']:.3f}.")
    if report["classifier_left_out"] and report["classifier_left_out"] != "--no-classifier":
        click.echo(f"No treatment classifier: {report['classifier_left_out']}.")
    for line in retrieval_summary(report["retrieval"]):
        click.echo(line)
    control = report["controllability"]
    if control.get("cells"):
        summary = control["summary"]
        n = len(control["features"])
        click.echo(f"Controllability ({control['cells']} cells, {n} feature{'s' * (n != 1)}): "
                   f"median gain {fmt(summary['correlated']['gain'], 2)} with "
                   f"correlated features, {fmt(summary['alone']['gain'], 2)} alone; the lookup "
                   f"{fmt(summary['lookup']['gain'], 2)} (1: as a real cell would re-measure).")
    click.echo(f"{report['timing']['seconds']:.0f} s for {report['cells']} cells. "
               f"Tables: {report['out_dir']}/report.md; pictures: {report['out_dir']}/cells.png")
