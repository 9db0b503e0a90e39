"""The fit command."""
import sys

import click

from cli.common import call, start_tensorflow
from cp2image_tf.training.config import MODELS, STRATEGIES, STRATIFY
from tfrecords_tools.reader import SCALINGS


@click.command()
@click.argument("data_dir", type=click.Path())
@click.argument("run_dir", type=click.Path())
@click.option("--model", type=click.Choice(MODELS), default=None,
              help="exemplar: the nearest training cell, edited towards the profile by a "
                   "network conditioned in every block [default]; film: a decoder conditioned "
                   "in every block, drawing from nothing; published: the paper's network, "
                   "losses and schedule.")
@click.option("--steps", type=int, default=None, help="Train until this step [default: 20000].")
@click.option("--time-limit", default=None,
              help="Stop cleanly after this much training time, e.g. 30m, 90s, 1.5h (summed "
                   "over resumed runs); checkpoints and reports steps and images/s.")
@click.option("--batch-size", type=int, default=None,
              help="Global batch, split over replicas [default: exemplar and film 32; published 104].")
@click.option("--strategy", type=click.Choice(STRATEGIES),
              default=None, help="tf.distribute strategy [default: auto: multiworker when "
                                 "TF_CONFIG names a cluster, mirrored with several GPUs].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="JSON file of FitConfig settings: the run's, and a section per model, e.g. "
                   '{"time_limit": "30m", "exemplar": {"bank": 4096}}; options given here '
                   "override it.")
@click.option("--stratify", type=click.Choice(STRATIFY), default=None,
              help="Treatment-balanced batches [default: auto, when the data has treatments].")
@click.option("--scaling", type=click.Choice(SCALINGS), default=None,
              help="Crop intensity scaling [default: dataset; crop_max is the published one].")
@click.option("--noise-dim", type=int, default=None,
              help="Noise inputs for several plausible cells per profile [default: 0].")
@click.option("--checkpoint-every", type=int, default=None, help="[default: 500 steps]")
@click.option("--validate-every", type=int, default=None, help="[default: 500 steps]")
@click.option("--log-every", type=int, default=None, help="[default: 25 steps]")
@click.option("--seed", type=int, default=None, help="[default: 0]")
@click.option("--mixed-precision", is_flag=True, default=None, help="float16 compute (GPUs).")
@click.option("--peer-timeout", type=float, default=None,
              help="multiworker: seconds to wait for every worker of TF_CONFIG [default: 300].")
@click.option("--verify-data", is_flag=True,
              help="Check every shard's SHA-256 against the manifest before training (the "
                   "default check is size and record count).")
@click.option("--new-data", is_flag=True,
              help="Continue a RUN_DIR on another dataset of the same features and crops.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def fit(data_dir, run_dir, model, steps, time_limit, batch_size, strategy, config_file, stratify, scaling, noise_dim,
        checkpoint_every, validate_every, log_every, seed, mixed_precision, peer_timeout,
        verify_data, new_data, quiet):
    """Train the conditional decoder on a converted dataset.

    Writes checkpoints, history.csv, TensorBoard logs (RUN_DIR/logs) and
    real-vs-generated pictures (RUN_DIR/samples/latest.png) to RUN_DIR. Running
    the same command again resumes from the latest checkpoint.
    """
    from cp2image_tf.training.run_folder import read_config
    from cp2image_tf.training.train import Interrupted, fit as run

    config = call(read_config, config_file, model=model, steps=steps,
                  time_limit=time_limit, batch_size=batch_size,
                  strategy=strategy, stratify=stratify, scaling=scaling, noise_dim=noise_dim,
                  checkpoint_every=checkpoint_every, validate_every=validate_every,
                  log_every=log_every, seed=seed, mixed_precision=mixed_precision,
                  peer_timeout=peer_timeout)
    start_tensorflow()
    try:
        summary = call(run, data_dir, run_dir, config, progress=not quiet,
                       verify_data=verify_data, new_data=new_data)
    except Interrupted as stopped:
        saved = (f"at step {stopped.step}; checkpoint {stopped.checkpoint}"
                 if stopped.checkpoint else "before its first checkpoint")
        click.echo(f"Error: stopped by {stopped.signal} {saved}. Run the same command to resume.",
                   err=True)
        sys.exit(143 if stopped.signal == "SIGTERM" else 130)
    calibrated = calibration_line(config, summary, run_dir, data_dir, quiet)
    best = summary["best"]
    rate = summary.get("images_per_s")
    click.echo(f"Stopped by the {summary['stopped_by']} after {summary['seconds'] / 60:.1f} min"
               + (f" at {rate:.0f} images/s." if rate else "."))
    if summary.get("measurer"):
        m = summary["measurer"]
        click.echo(f"Measurer ({m['steps']} steps): {m['split']} median r {m['median_r']:.2f}, "
                   f"{m['fraction_r_0.7']:.0%} of features at r >= 0.7 "
                   f"(per module: {run_dir}/measurer.json).")
    for r in summary.get("judge") or []:
        before, after = (r[k]["median_r"] for k in ("held_out_before", "held_out_after"))
        follows = ("" if before is None or after is None else
                   f"; the measurer's reading of held-out edits' changes follows cp-measure's "
                   f"at median r {before:.2f} -> {after:.2f}")
        click.echo(f"Judge round {r['round']} at step {r['decoder_step']}: {r['cells']} edits "
                   f"measured with cp-measure{follows} ({r['seconds']:.0f} s; {run_dir}/judge.json).")
    click.echo(f"Trained to step {summary['steps']} in {run_dir}. Validation pixel MSE "
               f"{summary.get('val_mse', float('nan')):.4f} (mean training image: "
               f"{summary['baseline_mse']:.4f}), SSIM {summary.get('val_ssim', float('nan')):.3f}; "
               f"best at step {best.get('step')}.")
    click.echo(f"Pictures: {run_dir}/samples/latest.png; history: {run_dir}/history.csv; "
               f"TensorBoard: tensorboard --logdir {run_dir}/logs")
    if calibrated:
        click.echo(calibrated)


def calibration_line(config, summary: dict, run_dir, data_dir, quiet: bool) -> str | None:
    """The exemplar model's edit strength calibrated after the steps (chief only;
    evaluation/calibration.py), as the line fit prints; None when not calibrated."""
    if not (summary.get("chief", True) and config.model == "exemplar"
            and config.exemplar.calibrate):
        return None
    from cp2image_tf.evaluation.calibration import calibrate_after_fit

    found = calibrate_after_fit(run_dir, data_dir, progress=not quiet)
    if "error" in found:
        return None
    groups = sorted(found["groups"].values())
    spread = f"{len(groups)} feature groups at {groups[0]:.2f}-{groups[-1]:.2f}, " if groups else ""
    return (f"Edit strength: {spread}the rest {found['default']:.2f} (pinned edits, as traverse "
            f"and explore draw them, had moved {found['gain'] or 0:.2f} of the asked change over "
            f"the {found['moved_features']} of {found['features']} features they move, on "
            f"{found['cells']} validation cells; {run_dir}/calibration.json).")
