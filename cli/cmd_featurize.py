"""`cp2image-tf featurize`: CellProfiler measurements for images and masks, no CellProfiler."""
import click

from cli.common import call, parse_list


@click.command("featurize")
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
              help="Processes measuring image sets in parallel (with --scheduler local: the "
                   "LocalCluster's worker processes).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Measure on Dask: a running scheduler (tcp://host:8786) or 'local' "
                   "(a LocalCluster of --workers processes on this machine).")
@click.option("--part-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Image sets per part (the unit of work, of resuming and of --part).")
@click.option("--part", default=None, metavar="I/N",
              help="Measure only the I-th of N groups of parts (I from 1; e.g. a Slurm array: "
                   "$((SLURM_ARRAY_TASK_ID+1))/N); then run once with --finalize.")
@click.option("--finalize", is_flag=True,
              help="Write the CSVs from the parts measured with --part (same arguments).")
@click.option("--overwrite", is_flag=True, help="Replace Image.csv and object CSVs in OUT_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def featurize_command(load_data_csv, out_dir, channels, objects, modules, scale, workers,
                      scheduler, part_size, part, finalize, overwrite, quiet):
    """Measure every object in the image sets of LOAD_DATA_CSV; write CellProfiler CSVs to OUT_DIR.

    LOAD_DATA_CSV is a CellProfiler LoadData CSV: one row per image set, FileName_<channel> and
    PathName_<channel> per channel, ObjectsFileName_<object> and ObjectsPathName_<object> per
    label mask (TIFF; labels are ObjectNumbers), optional ImageNumber and Metadata_* columns.
    Relative paths are read relative to the CSV's folder. OUT_DIR receives Image.csv and one
    <object>.csv per object set, laid out as CellProfiler's ExportToSpreadsheet writes them.
    """
    from cp2image_tf.measuring.featurize import featurize

    summary = call(featurize, load_data_csv, out_dir, channels=parse_list(channels),
                   objects=parse_list(objects), modules=parse_list(modules), workers=workers,
                   overwrite=overwrite, scale=scale, progress=not quiet, scheduler=scheduler,
                   part=part, finalize=finalize, part_size=part_size)
    if part is not None:
        click.echo(f"Part {summary['part'][0]}/{summary['part'][1]}: {len(summary['parts'])} "
                   f"parts ({summary['image_sets']} image sets; {summary['measured']} measured "
                   f"now) in {summary['seconds']} s. When every part is done: the same command "
                   "with --finalize instead of --part.")
        return
    counts = ", ".join(f"{n} {obj}" for obj, n in summary["objects"].items())
    click.echo(f"Measured {summary['image_sets']} image sets ({counts}) in "
               f"{summary['seconds']} s; wrote {summary['out_dir']}")
