"""The sample-data command: draw and measure the embedded synthetic screen."""
import click

from cli.common import call


@click.command("sample-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--cells", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Cells in all, spread over 2 plates, 7 treatments and their wells.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Same seed and --cells give the same files, byte for byte.")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Processes drawing fields and measuring cells [default: min(2, CPUs)].")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def sample_data(out_dir, cells, seed, workers, overwrite, quiet):
    """Draw a synthetic 3-channel fluorescence screen and measure it like CellProfiler.

    OUT_DIR receives images/ (16-bit TIFFs: DNA, Tubulin, Actin), masks/ (nuclei and
    cell labels), load_data.csv, cellprofiler/ (Image.csv, Nuclei.csv, Cells.csv),
    ground_truth.csv (the generator's per-cell parameters) and README.txt (the
    treatments and what each changes).
    """
    from cp2image_tf.sampledata import make_sample_data

    summary = call(make_sample_data, out_dir, cells=cells, seed=seed, overwrite=overwrite,
                   workers=workers, progress=not quiet)
    per_treatment = ", ".join(f"{name} {n}" for name, n in summary["cells_per_treatment"].items())
    seconds = summary["seconds"]
    click.echo(f"Drew {summary['cells']} cells in {summary['fields']} fields ({per_treatment}) "
               f"in {seconds['draw']} s and measured them in {seconds['measure']} s.")
    click.echo(f"  images, masks, README.txt: {summary['out_dir']}")
    click.echo(f"  CellProfiler measurements: {summary['cellprofiler']}")
    click.echo(f"  LoadData CSV:              {summary['load_data']}")
    click.echo(f"  generator ground truth:    {summary['ground_truth']}")
