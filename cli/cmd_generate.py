"""Drawing cells from profiles: generate (a local model) and predict (TensorFlow Serving)."""
import click

from cli.common import (call, checkpoint_option, echo_outputs, missing_option, parse_list,
                        start_tensorflow)


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("paths", nargs=-1, required=True, metavar="MODEL [PROFILES] OUT_DIR")
@click.option("--treatment-mean", default=None,
              help="Draw these treatments' mean profiles (comma-separated, or 'all'), "
                   "from --data, instead of PROFILES.")
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="The converted dataset the model was trained on (for --treatment-mean).")
@click.option("--object", "object_name", default=None,
              help="PROFILES is one object's table (e.g. Nuclei): prefix its columns with this "
                   "[default: from the file name, e.g. Nuclei.csv].")
@missing_option
@click.option("--label-column", default=None, help="PROFILES column to label cells with.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N rows of PROFILES.")
@checkpoint_option()
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def generate(paths, treatment_mean, data_dir, object_name, missing, label_column, limit,
             checkpoint, overwrite):
    """Draw cells from CellProfiler profiles.

    MODEL is a run folder of `fit`, an exported SavedModel or a model base of
    versions. PROFILES is a CSV/Parquet table of CellProfiler rows (a Nuclei.csv,
    or a pycytominer single-cell table), or a CellProfiler ExportToSpreadsheet
    folder (its object tables are joined per cell): columns are matched by
    feature name, extra columns are ignored. Writes OUT_DIR/cells/*.tif (one ImageJ hyperstack
    per cell, channels named), OUT_DIR/montage.png and OUT_DIR/profiles.csv.
    """
    from cp2image_tf.drawing.generate import generate as run
    from cp2image_tf.serving.local import load_model

    if len(paths) not in (2, 3):
        raise click.UsageError("Give MODEL PROFILES OUT_DIR, or MODEL OUT_DIR with "
                               "--treatment-mean NAME --data DATA_DIR.")
    model_path, profiles, out_dir = (paths[0], None, paths[1]) if len(paths) == 2 else paths
    if profiles is None and treatment_mean is None:
        raise click.UsageError("Give PROFILES, or --treatment-mean NAME --data DATA_DIR.")
    start_tensorflow()
    model = call(load_model, model_path, checkpoint)
    summary = call(run, model, profiles, out_dir, treatment_mean=parse_list(treatment_mean),
                   data=data_dir, object_name=object_name, missing=missing,
                   label_column=label_column, limit=limit, overwrite=overwrite)
    echo_outputs(summary, f" and {summary['cells']} TIFF(s) in {summary['out_dir']}/cells")


@click.command()
@click.argument("profiles", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--server", required=True,
              help="TensorFlow Serving address: http://host:8501 (REST) or host:8500 with --grpc.")
@click.option("--model-name", required=True, help="The served model's name (MODEL_NAME).")
@click.option("--grpc", "use_grpc", is_flag=True, help="Use the gRPC API instead of REST.")
@click.option("--model-version", type=int, default=None, help="[default: the latest served]")
@click.option("--object", "object_name", default=None,
              help="PROFILES is one object's table: prefix its columns with this.")
@missing_option
@click.option("--label-column", default=None, help="PROFILES column to label cells with.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N rows of PROFILES.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def predict(profiles, out_dir, server, model_name, use_grpc, model_version, object_name, missing,
            label_column, limit, overwrite):
    """Draw cells with a model served by TensorFlow Serving.

    Reads the feature names from the server, builds requests from PROFILES by
    column name and writes the same outputs as `generate`.
    """
    from cp2image_tf.drawing.generate import generate as run
    from cp2image_tf.serving.remote import RemoteModel

    if use_grpc:
        start_tensorflow()
    model = call(RemoteModel, server, model_name, grpc=use_grpc, version=model_version)
    summary = call(run, model, profiles, out_dir, object_name=object_name, missing=missing,
                   label_column=label_column, limit=limit, overwrite=overwrite)
    echo_outputs(summary, f" and {summary['cells']} TIFF(s) in {summary['out_dir']}/cells")
