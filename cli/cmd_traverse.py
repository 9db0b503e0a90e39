"""The traverse command: one feature varied, the cells drawn."""
import click

from cli.common import call, checkpoint_option, echo_outputs, start_tensorflow


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--feature", "features", multiple=True,
              help="Feature to vary (repeat for several; one row each). A unique end of the "
                   "name is enough, e.g. Nuclei_AreaShape_Area or AreaShape_Eccentricity.")
@click.option("--from", "start", type=float, default=-2.0, show_default=True,
              help="First value, in training SDs from the base.")
@click.option("--to", "stop", type=float, default=2.0, show_default=True,
              help="Last value, in training SDs from the base.")
@click.option("--steps", type=int, default=7, show_default=True,
              help="Steps from --from to --to (2 to 1000); traverse.png shows at most 25 of "
                   "them, the TIFF stacks and traverse.csv every one.")
@click.option("--base", default="median", show_default=True,
              help="Profile to start from: median (the training median cell), a treatment "
                   "name (its mean, needs --data) or a cell id like 12-3 (needs --data).")
@click.option("--alone", is_flag=True,
              help="Move the feature alone, every other feature held. By default the features "
                   "correlated with it move with it by their training correlation (needs "
                   "--data): the average cell with that value, as explore's sliders show it.")
@click.option("--correlated", is_flag=True,
              help="The default with --data (kept for older scripts); without --data, an error.")
@click.option("--interpolate", nargs=2, default=None, metavar="TREATMENT_A TREATMENT_B",
              help="Also draw the way from A's mean profile to B's (needs --data).")
@click.option("--data", "data_dir", type=click.Path(), default=None,
              help="The converted dataset the model was trained on.")
@click.option("--extrapolate", is_flag=True,
              help="Let values go beyond the training range (the manifest's min and max), "
                   "where the model never saw a cell; by default they stop at its limits.")
@checkpoint_option()
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is not empty.")
def traverse(model_path, out_dir, features, start, stop, steps, base, alone, correlated,
             interpolate, data_dir, extrapolate, checkpoint, overwrite):
    """Show what changing one feature does to a cell.

    Varies each --feature from --from to --to training SDs around a base profile,
    the features correlated with it moving with it (by their training correlation,
    from --data; with --alone, or without --data, every other feature held), and
    draws each step (an exemplar model: each row as edits of one training cell);
    values stop at the training range's limits (labelled min or max) unless
    --extrapolate. Writes
    OUT_DIR/traverse.png (one row per feature, labelled with its values), a TIFF
    stack per row and traverse.csv.
    """
    from cp2image_tf.drawing.traverse import check_steps, traverse as run
    from cp2image_tf.serving.local import load_model

    call(check_steps, start, stop, steps)  # before the model's seconds of loading
    start_tensorflow()
    model = call(load_model, model_path, checkpoint)
    summary = call(run, model, out_dir, list(features), start=start, stop=stop, steps=steps,
                   base=base, data=data_dir, interpolate=interpolate,
                   correlated=correlated or None, alone=alone,
                   overwrite=overwrite, extrapolate=extrapolate)
    echo_outputs(summary, f" and {len(summary['stacks'])} TIFF stack(s)")
