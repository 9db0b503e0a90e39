"""`cp2image-tf featurize`: CellProfiler measurements for images and masks, no CellProfiler."""
import click

from cli.main import call, main, parse_list


@main.command("featurize")
@click.argument("load_data_csv", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--channels", required=True,
              help="Channels to load and measure, comma-separated: the <name> of the CSV's "
                   "FileName_<name> / PathName_<name> columns, e.g. DNA,Tubulin,Actin.")
@click.option("--objects", required=True,
              help="Label masks to measure, comma-separated: the <name> of the CSV's "
                   "ObjectsFileName_<name> / ObjectsPathName_<name> columns, e.g. Nuclei,Cells.")
@click.option("--modules", default="default", show_default=True,
              help="Measurement modules, comma-separated (e.g. sizeshape,intensity,texture), "
                   "'default' (fast: AreaShape incl. Zernike, Intensity, Texture, Granularity "
                   "1-4, RadialDistribution) or 'all' (every cp-measure module, incl. Costes).")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Divide integer pixels by this instead of their dtype maximum "
                   "(e.g. 4095 for 12-bit images in 16-bit files).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes measuring image sets in parallel.")
@click.option("--overwrite", is_flag=True, help="Replace Image.csv and object CSVs in OUT_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def featurize_command(load_data_csv, out_dir, channels, objects, modules, scale, workers,
                      overwrite, quiet):
    """Measure every object in the image sets of LOAD_DATA_CSV; write CellProfiler CSVs to OUT_DIR.

    LOAD_DATA_CSV is a CellProfiler LoadData CSV: one row per image set, FileName_<channel> and
    PathName_<channel> per channel, ObjectsFileName_<object> and ObjectsPathName_<object> per
    label mask (TIFF; labels are ObjectNumbers), optional ImageNumber and Metadata_* columns.
    Relative paths are read relative to the CSV's folder. OUT_DIR receives Image.csv and one
    <object>.csv per object set, laid out as CellProfiler's ExportToSpreadsheet writes them.
    """
    from cp2image_tf.featurize import featurize

    summary = call(featurize, load_data_csv, out_dir, channels=parse_list(channels),
                   objects=parse_list(objects), modules=parse_list(modules), workers=workers,
                   overwrite=overwrite, scale=scale, progress=not quiet)
    counts = ", ".join(f"{n} {obj}" for obj, n in summary["objects"].items())
    click.echo(f"Measured {summary['image_sets']} image sets ({counts}) in "
               f"{summary['seconds']} s; wrote {summary['out_dir']}")
