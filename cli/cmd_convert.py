"""The convert command: CellProfiler output to sharded TFRecords and a manifest."""
import sys

import click

from cli.common import call, parse_list


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--channels", required=True,
              help="Images to crop, in order, as named in Image.csv's FileName_<name> columns "
                   "(e.g. DNA,Tubulin,Actin).")
@click.option("--objects", default="Nuclei", show_default=True,
              help="Object tables to take features from; the first one's Location_Center_X/Y "
                   "centres the crops. Tables are joined on ImageNumber and ObjectNumber.")
@click.option("--table", is_flag=True,
              help="INPUT is a single-cell CSV/Parquet table (CytoTable/pycytominer style) "
                   "with a column of crop files, instead of an ExportToSpreadsheet folder.")
@click.option("--crop-column", default=None,
              help="With --table: the column of crop files (TIFF or .npy) "
                   "[default: Metadata_CropFile].")
@click.option("--crop-size", default=68, show_default=True, type=int, help="Crop side in pixels.")
@click.option("--edge", type=click.Choice(["skip", "pad"]), default="skip", show_default=True,
              help="Cells whose crop leaves the field: skip them (listed in rejects.csv) or "
                   "pad with zeros.")
@click.option("--include", default=None, help="Keep only features whose name matches this regex.")
@click.option("--exclude", default=None, help="Leave out features whose name matches this regex.")
@click.option("--features-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file with the feature names to use, one per line, in order.")
@click.option("--split-by", default=None,
              help="Column(s) keeping cells together across splits, e.g. Metadata_Well or "
                   "Metadata_Plate [default: ImageNumber, i.e. by field].")
@click.option("--split", "split_fractions", default="0.8,0.1,0.1", show_default=True,
              help="Train,val,test fractions of cells (whole groups at a time).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split.")
@click.option("--treatment-column", default=None,
              help="Column(s) naming each cell's treatment [default: the first of "
                   "Metadata_Treatment, Metadata_Compound, Metadata_pert_iname, ...].")
@click.option("--shard-size", default=1000, show_default=True, type=int,
              help="Cells per shard at most (whole fields; shards hold one treatment each).")
@click.option("--compression", type=click.Choice(["none", "GZIP"]), default="none",
              show_default=True, help="TFRecord compression.")
@click.option("--intensity-percentile", default=99.99, show_default=True, type=float,
              help="Per-channel percentile of training-split pixels that maps to 1.0 in "
                   "the reader's default (dataset-level) scaling.")
@click.option("--measured-as", default=None, metavar="CHANNEL=IMAGE,...",
              help="The image each channel's features were measured on, when the features "
                   "are named after another image than the one cropped (e.g. "
                   "rawGFP=CorrGreen,rawDNA=CorrBlue; CHANNEL=none for a channel without "
                   "features) [default: the channel itself, or the unique name that differs by "
                   "an Orig/Raw/Corr/Illum prefix, as OrigDNA/CorrDNA].")
@click.option("--illum", default=None, metavar="CHANNEL=ILLUM,...",
              help="Crop the illumination-corrected image, as CellProfiler's "
                   "CorrectIlluminationApply (Divide) made it: the channel divided by the "
                   "function Image.csv names as FileName_<ILLUM> (.mat, .npy or TIFF), e.g. "
                   "rawGFP=IllumGFP,rawDNA=IllumDNA. Crops are then float32.")
@click.option("--workers", default=1, show_default=True, type=int,
              help="Processes writing shards in parallel (with --scheduler local: the "
                   "LocalCluster's worker processes).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Write shards on Dask: a running scheduler (tcp://host:8786) or 'local' "
                   "(a LocalCluster of --workers processes on this machine).")
@click.option("--part", default=None, metavar="I/N",
              help="Write only the I-th of N groups of shards (I from 1; e.g. a Slurm array: "
                   "$((SLURM_ARRAY_TASK_ID+1))/N); then run once with --finalize.")
@click.option("--finalize", is_flag=True,
              help="Gather the parts written with --part into manifest.json (same INPUT, "
                   "OUT_DIR and options); names any part missing or corrupt.")
@click.option("--chunk-rows", default=10000, show_default=True, type=int,
              help="Table rows read at a time while planning: planning's memory follows it, "
                   "not the size of the screen. The dataset does not depend on it.")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in OUT_DIR.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(input_path, out_dir, channels, objects, table, crop_column, crop_size, edge, include,
            exclude, features_file, split_by, split_fractions, seed, treatment_column, shard_size,
            compression, intensity_percentile, measured_as, illum, workers, scheduler, part,
            finalize, chunk_rows, overwrite, quiet):
    """Cut single-cell crops and pair them with CellProfiler features as sharded TFRecords.

    INPUT is a CellProfiler ExportToSpreadsheet folder (Image.csv plus one CSV per
    object set) or, with --table, a single-cell table. OUT_DIR receives
    <split>-<i>-of-<n>.tfrecord shards, manifest.json and rejects.csv. An
    interrupted run is finished by running the same command again. However it
    runs (one process, --workers, --scheduler, --part + --finalize), the same
    command gives the same shards and manifest.
    """
    from cp2image_tf.training.config import MIN_CROP_SIZE
    from tfrecords_tools.convert import ConvertConfig, convert as run

    if crop_size is not None and 0 < crop_size < MIN_CROP_SIZE:
        click.echo(f"Warning: --crop-size {crop_size}: `cp2image-tf fit` trains on crops from "
                   f"{MIN_CROP_SIZE} px (the exemplar and film models; the published one from "
                   f"48 px); convert with --crop-size {MIN_CROP_SIZE} or more to train on this "
                   "dataset.", err=True)

    config = ConvertConfig(
        input=input_path, out_dir=out_dir, channels=parse_list(channels),
        objects=parse_list(objects), table=table, crop_column=crop_column, crop_size=crop_size,
        edge=edge, include=include, exclude=exclude, features_file=features_file,
        split_by=parse_list(split_by), split=split_fractions, seed=seed,
        treatment_column=parse_list(treatment_column), shard_size=shard_size,
        compression="" if compression == "none" else compression,
        intensity_percentile=intensity_percentile, workers=workers, overwrite=overwrite,
        scheduler=scheduler, measured_as=measured_as, illum=illum, chunk_rows=chunk_rows)
    manifest = call(run, config, progress=not quiet, command=["cp2image-tf"] + sys.argv[1:],
                    part=part, finalize=finalize)
    if part is not None:
        index, count = manifest["part"]
        click.echo(f"Part {index}/{count}: {len(manifest['shards'])} of {manifest['total_shards']} "
                   f"shards complete ({manifest['written']} written now, "
                   f"{manifest['already_complete']} already complete; {manifest['cells']} cells) "
                   f"in {out_dir}. When every part is done: the same command with --finalize "
                   "instead of --part.")
        return
    counts = manifest["counts"]
    click.echo(f"Wrote {counts['cells']} cells ({counts['splits']['train']} train, "
               f"{counts['splits']['val']} val, {counts['splits']['test']} test) with "
               f"{manifest['features']['count']} features in {len(manifest['shards'])} shards "
               f"to {out_dir}; {counts['rejected']} cells rejected (see rejects.csv), "
               f"{len(manifest['features']['dropped'])} features dropped (see manifest.json).")
    renamed = {ch: m for ch, m in manifest.get("measured_as", {}).items() if ch != m}
    if renamed:
        click.echo("Features measured on: " + ", ".join(f"{ch} -> {m}" for ch, m in renamed.items())
                   + ".")
    for ch, how in manifest["crop"].get("rescaled", {}).items():
        click.echo(f"{ch}: {how['fields']} of {how['of']} fields are 8-bit images among 16-bit "
                   f"ones; their pixels were multiplied by {how['factor']} to the 16-bit range "
                   "(as CellProfiler scales each file by its own bit depth).")
    without = [t for t, n in counts["treatments"]["test"].items() if not n]
    if without:
        click.echo(f"{len(without)} of {len(counts['treatments']['test'])} treatments have no test "
                   f"cells (too few --split-by groups): {', '.join(without)}.")
    named = manifest.get("cellprofiler", {}).get("illumination_functions", [])
    if named and not illum:
        click.echo(f"Image.csv names illumination functions ({', '.join(named)}): if the features "
                   "were measured on corrected images, convert with --illum CHANNEL=NAME to crop "
                   "them as CellProfiler measured them.")
