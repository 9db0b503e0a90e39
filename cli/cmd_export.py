"""The export command: a run folder to a SavedModel for TensorFlow Serving."""
import click

from cli.common import call, checkpoint_option, start_tensorflow


@click.command()
@click.argument("run_dir", type=click.Path())
@click.argument("model_base", type=click.Path())
@click.option("--version", type=int, default=None,
              help="Version folder to write [default: one more than the highest present].")
@checkpoint_option("best: lowest validation pixel MSE; latest: last step.")
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
