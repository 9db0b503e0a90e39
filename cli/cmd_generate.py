"""Model commands: export, generate, traverse and predict."""
import click

from cli.main import call, main, parse_list, start_tensorflow

MODEL_HELP = "a run folder of `fit`, an exported SavedModel, or a model base of versions"


@main.command()
@click.argument("run_dir", type=click.Path())
@click.argument("model_base", type=click.Path())
@click.option("--version", type=int, default=None,
              help="Version folder to write [default: one more than the highest present].")
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="best",
              show_default=True, help="best: lowest validation pixel MSE; latest: last step.")
@click.option("--no-warmup", is_flag=True, help="Leave out assets.extra/tf_serving_warmup_requests.")
def export(run_dir, model_base, version, checkpoint, no_warmup):
    """Export a trained model as a SavedModel for TensorFlow Serving.

    Writes MODEL_BASE/<version>/ (saved_model.pb, variables/, assets/ with the
    manifest and feature_names.txt, and warmup requests). Signatures:
    serving_default (raw CellProfiler features -> images in [0, 1]), generate_png
    (-> composite PNGs) and describe (feature names, channels). An existing
    version is never overwritten.
    """
    start_tensorflow()
    from cp2image_tf.serving.export import export as run

    summary = call(run, run_dir, model_base, version=version, checkpoint=checkpoint,
                   warmup=not no_warmup)
    click.echo(f"Exported {summary['checkpoint']} checkpoint (step {summary['step']}) of "
               f"{run_dir} to {summary['path']}.")
    click.echo(f"Serve it: docker run -p 8501:8501 -v $(realpath {model_base}):/models/cp2image "
               "-e MODEL_NAME=cp2image tensorflow/serving")


def _echo_outputs(summary, extra=""):
    click.echo(f"Wrote {summary['out_dir']}/{summary['montage']}{extra}.")


@main.command(context_settings={"ignore_unknown_options": False})
@click.argument("paths", nargs=-1, required=True, metavar="MODEL [PROFILES] OUT_DIR")
@click.option("--treatment-mean", default=None,
              help="Draw these treatments' mean profiles (comma-separated, or 'all'), "
                   "from --data, instead of PROFILES.")
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="The converted dataset the model was trained on (for --treatment-mean).")
@click.option("--object", "object_name", default=None,
              help="PROFILES is one object's table (e.g. Nuclei): prefix its columns with this "
                   "[default: from the file name, e.g. Nuclei.csv].")
@click.option("--missing", type=click.Choice(["error", "median"]), default="error",
              show_default=True, help="Features PROFILES lacks: an error, or the training medians.")
@click.option("--label-column", default=None, help="PROFILES column to label cells with.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N rows of PROFILES.")
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="best",
              show_default=True, help="For a run folder MODEL.")
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
    from cp2image_tf.drawing.generate import generate as run, load_model

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
    _echo_outputs(summary, f" and {summary['cells']} TIFF(s) in {summary['out_dir']}/cells")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--feature", "features", multiple=True,
              help="Feature to vary (repeat for several; one row each). A unique end of the "
                   "name is enough, e.g. Nuclei_AreaShape_Area or AreaShape_Eccentricity.")
@click.option("--from", "start", type=float, default=-2.0, show_default=True,
              help="First value, in training SDs from the base.")
@click.option("--to", "stop", type=float, default=2.0, show_default=True,
              help="Last value, in training SDs from the base.")
@click.option("--steps", type=click.IntRange(min=2), default=7, show_default=True)
@click.option("--base", default="median", show_default=True,
              help="Profile to start from: median (the training median cell), a treatment "
                   "name (its mean, needs --data) or a cell id like 12-3 (needs --data).")
@click.option("--correlated", is_flag=True,
              help="Move the other features with it by their training correlation (needs "
                   "--data): the average cell with that value, not that value alone.")
@click.option("--interpolate", nargs=2, default=None, metavar="TREATMENT_A TREATMENT_B",
              help="Also draw the way from A's mean profile to B's (needs --data).")
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="The converted dataset the model was trained on.")
@click.option("--checkpoint", type=click.Choice(["best", "latest"]), default="best",
              show_default=True, help="For a run folder MODEL.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def traverse(model_path, out_dir, features, start, stop, steps, base, correlated, interpolate,
             data_dir, checkpoint, overwrite):
    """Show what changing one feature does to a cell.

    Varies each --feature from --from to --to training SDs around a base profile,
    holding every other feature (or, with --correlated, moving them by their
    correlation with it), and draws each step. Writes OUT_DIR/traverse.png
    (one row per feature, labelled with its values), a TIFF stack per row and
    traverse.csv.
    """
    from cp2image_tf.drawing.generate import load_model, traverse as run

    start_tensorflow()
    model = call(load_model, model_path, checkpoint)
    summary = call(run, model, out_dir, list(features), start=start, stop=stop, steps=steps,
                   base=base, data=data_dir, interpolate=interpolate, correlated=correlated,
                   overwrite=overwrite)
    _echo_outputs(summary, f" and {len(summary['stacks'])} TIFF stack(s)")


@main.command()
@click.argument("profiles", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--server", required=True,
              help="TensorFlow Serving address: http://host:8501 (REST) or host:8500 with --grpc.")
@click.option("--model-name", required=True, help="The served model's name (MODEL_NAME).")
@click.option("--grpc", "use_grpc", is_flag=True, help="Use the gRPC API instead of REST.")
@click.option("--model-version", type=int, default=None, help="[default: the latest served]")
@click.option("--object", "object_name", default=None,
              help="PROFILES is one object's table: prefix its columns with this.")
@click.option("--missing", type=click.Choice(["error", "median"]), default="error",
              show_default=True, help="Features PROFILES lacks: an error, or the training medians.")
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
    _echo_outputs(summary, f" and {summary['cells']} TIFF(s) in {summary['out_dir']}/cells")
