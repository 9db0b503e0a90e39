"""fit: the training loop of either model, on one device, several or several machines.

The model's trainer (film_trainer.FilmTrainer, the default, or
published.PublishedTrainer) owns its networks, optimisers and a custom training
step run by `strategy.run` inside a tf.function (Keras 3's Model.fit does not run
under MultiWorkerMirroredStrategy). This module runs it: the film measurer's phase
first, then steps until --steps or --time-limit, with logging, validation,
best-checkpoint tracking and resume.

Run folder:
    config.json        the FitConfig in force
    manifest.json      the dataset's manifest (features, normalisation, channels)
    checkpoints/       the latest checkpoints (tf.train.CheckpointManager)
    best/              the checkpoint with the lowest validation pixel MSE, best.json
    history.csv        losses, schedule weights, images/s, validation metrics
    logs/              TensorBoard
    samples/           real vs generated validation cells, step_<N>.png and latest.png
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from cp2image_tf.training.config import FitConfig
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import load_manifest, treatment_cells
from tfrecords_tools.shards import check_shards, named_read_errors

MODEL_KEYS = ("model", "filters", "noise_dim", "pixel_noise")
# The exemplar model's keys its network or bank is built with, and the value a config.json
# written before the key existed meant.
EXEMPLAR_KEYS_BEFORE = {"exemplar_views": False, "exemplar_shape_weight": 1.0,
                        "exemplar_warp": False}


def data_signature(manifest: dict) -> dict:
    """What a trained model is tied to: feature names in order, channels, crop shape."""
    crop = manifest["crop"]
    return {"features": manifest["features"]["names"], "channels": manifest["channels"],
            "crop": [crop["height"], crop["width"], crop["channels"]]}


def shard_checksums(manifest: dict) -> list:
    """The dataset's identity: its shards' names and SHA-256 checksums."""
    return sorted((s["file"], s.get("sha256")) for s in manifest["shards"])


def check_run_dir(run_dir: Path, manifest: dict, config: FitConfig, new_data: bool = False) -> None:
    """An existing run must have been trained on data of the same shape and the same model,
    and (unless new_data) on the same dataset: the same shard checksums."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"{run_dir}: exists and is a file; RUN_DIR is the folder fit writes "
                             "its checkpoints to. Give a new RUN_DIR.")
    saved = run_dir / "manifest.json"
    if saved.is_file():
        try:
            saved_manifest = json.loads(saved.read_text())
        except json.JSONDecodeError as err:
            raise UserInputError(f"{saved}: not valid JSON ({err}); the run folder is damaged. "
                                 "Use a new RUN_DIR.") from None
        old = data_signature(saved_manifest)
        new = data_signature(manifest)
        for key in ("features", "channels", "crop"):
            if old[key] != new[key]:
                what = {"features": f"{len(old['features'])} features vs {len(new['features'])}"
                        if len(old["features"]) != len(new["features"]) else "other feature names",
                        "channels": f"channels {old['channels']} vs {new['channels']}",
                        "crop": f"crop {old['crop']} vs {new['crop']}"}[key]
                raise UserInputError(
                    f"{run_dir}: its checkpoints were trained on other data ({what}). "
                    "Use a new RUN_DIR for this dataset.")
        if not new_data and shard_checksums(saved_manifest) != shard_checksums(manifest):
            raise UserInputError(
                f"{run_dir}: was trained on another dataset of the same shape (its manifest.json "
                "names other shard checksums). Pass --new-data to continue training it on this "
                "one, or use a new RUN_DIR.")
    saved_config = run_dir / "config.json"
    if saved_config.is_file():
        try:
            old = json.loads(saved_config.read_text())
        except json.JSONDecodeError as err:
            raise UserInputError(f"{saved_config}: not valid JSON ({err}); the run folder is "
                                 "damaged. Use a new RUN_DIR.") from None
        exemplar = config.model == "exemplar" and old.get("model") == "exemplar"
        was = {key: old.get(key, before) for key, before in EXEMPLAR_KEYS_BEFORE.items()}
        differ = {key: value for key, value in was.items() if value != getattr(config, key)}
        if exemplar and differ:
            raise UserInputError(
                f"{run_dir}: was trained with "
                + ", ".join(f"{key}={value}" for key, value in differ.items()) + ", now "
                + ", ".join(f"{getattr(config, key)}" for key in differ)
                + f"; resume it with {json.dumps(differ)} in --config (its network or bank "
                "differs otherwise), or use a new RUN_DIR.")
        for key in MODEL_KEYS:
            if key in old and old[key] != getattr(config, key):
                raise UserInputError(
                    f"{run_dir}: was trained with {key}={old[key]}, now {getattr(config, key)}; "
                    "the checkpoint cannot be resumed with another model. Use a new RUN_DIR.")


def load_val_cells(data_dir, manifest, config, limit):
    """The first `limit` validation cells (deterministic order): features, crops, treatments."""
    from tfrecords_tools.reader import make_dataset

    split = "val" if manifest["counts"]["splits"]["val"] else "train"
    ds = make_dataset(data_dir, split, 256, shuffle=False, repeat=False, with_metadata=True,
                      scaling=config.scaling, normalization=config.normalization, manifest=manifest)
    feats, crops, treatments, ids = [], [], [], []
    total = 0
    for f, c, meta in ds:
        feats.append(f.numpy())
        crops.append(c.numpy())
        treatments += [t.decode() for t in meta["treatment"].numpy()]
        ids += [i.decode() for i in meta["cell_id"].numpy()]
        total += len(f)
        if total >= limit:
            break
    return (np.concatenate(feats)[:limit], np.concatenate(crops)[:limit], treatments[:limit],
            ids[:limit], split)


def mean_training_image(data_dir, manifest, config, limit=4096):
    """The mean training crop (the baseline a decoder must beat), over up to `limit` cells."""
    from tfrecords_tools.reader import make_dataset

    ds = make_dataset(data_dir, "train", 256, shuffle=False, repeat=False,
                      scaling=config.scaling, manifest=manifest)
    total, count = None, 0
    for _, crops in ds:
        crops = crops.numpy().astype(np.float64)
        total = crops.sum(0) if total is None else total + crops.sum(0)
        count += len(crops)
        if count >= limit:
            break
    return (total / count).astype(np.float32)


def grid_indices(treatments, n):
    """Up to n validation cells, one per treatment first, in a fixed order."""
    chosen, seen = [], set()
    for i, t in enumerate(treatments):
        if t not in seen and len(chosen) < n:
            chosen.append(i)
            seen.add(t)
    for i in range(len(treatments)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen


def pixel_metrics(generated, real):
    """Mean pixel MSE and SSIM over the cells (images in [0, 1]), as `evaluate` computes them."""
    from cp2image_tf.metrics import pixel_metrics as per_cell

    values = per_cell(generated, real)
    return float(values["mse"].mean()), float(values["ssim"].mean())


class History:
    """history.csv, appended to as training goes; survives restarts."""

    def __init__(self, path: Path, enabled: bool, columns):
        self.path, self.enabled = path, enabled
        self.columns = list(columns)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        if not self.path.is_file():
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(self.columns)
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([_fmt(row.get(c)) for c in self.columns])

    def truncate_after(self, step: int) -> None:
        """Drop rows past the checkpoint a resumed run restarts from."""
        if not (self.enabled and self.path.is_file()):
            return
        with open(self.path) as handle:
            rows = list(csv.reader(handle))
        if not rows:
            return
        header, body = rows[0], [r for r in rows[1:] if r and int(float(r[0])) <= step]
        with open(self.path, "w", newline="") as handle:
            csv.writer(handle).writerows([header] + body)


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def make_trainer(manifest: dict, config: FitConfig, strategy):
    """The trainer of the configured model: FilmTrainer (default) or the published Trainer."""
    if config.model in ("film", "exemplar"):
        from cp2image_tf.training.film_trainer import FilmTrainer

        return FilmTrainer(manifest, config, strategy)
    from cp2image_tf.training.published import PublishedTrainer

    return PublishedTrainer(manifest, config, strategy)


def history_columns(trainer) -> list[str]:
    return (["step", *trainer.loss_names, *trainer.weight_names]
            + ["images_per_s", "val_mse", "val_ssim", "baseline_mse"])


class Clock:
    """Training seconds across runs of one RUN_DIR (kept in the checkpoint), for --time-limit."""

    def __init__(self, trainer, limit: float | None):
        self.variable, self.limit = trainer.elapsed, limit
        self.offset, self.start = float(trainer.elapsed.numpy()), time.perf_counter()

    def seconds(self) -> float:
        return self.offset + time.perf_counter() - self.start

    def sync(self) -> None:
        """Record the training seconds so far in the checkpointed variable."""
        self.variable.assign(self.seconds())

    def left(self) -> float:
        return math.inf if self.limit is None else self.limit - self.seconds()


def resume_point(run_dir: Path, chief: bool = True):
    """The newest checkpoint of RUN_DIR that reads in full (None for a new run); says on stderr
    which newer ones it skipped as unreadable (truncated, half copied)."""
    from cp2image_tf.training.checkpoints import newest_readable

    path, skipped = newest_readable(run_dir / "checkpoints")
    if chief:
        for bad, why in skipped:
            print(f"Skipping checkpoint {bad}: it does not read ({why}).", file=sys.stderr)
    if skipped and path is None:
        raise UserInputError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'} reads "
                             f"({skipped[0][0]}: {skipped[0][1]}). Move the checkpoints folder "
                             "aside to train from the start, or use a new RUN_DIR.")
    return path


def restore_latest(trainer, run_dir: Path, chief: bool, progress: bool, path=None) -> int:
    """Restore the newest readable checkpoint of RUN_DIR (or `path`), if any; the step it
    resumes from. "Resuming from step N" is said even without progress output."""
    path = path or resume_point(run_dir, chief)
    if not path:
        return 0
    from cp2image_tf.training.checkpoints import restore_matching

    restore_matching(trainer.checkpoint, path)
    start_step = int(trainer.step.numpy())
    if chief:
        print(f"Resuming from step {start_step} ({path}).", file=sys.stderr)
    return start_step


def use_stratified(manifest: dict, config: FitConfig) -> bool:
    treatments = treatment_cells(manifest, "train")
    return {"yes": True, "no": False}.get(config.stratify, len(treatments) > 1)


def warn_unbalanced(manifest: dict, config: FitConfig) -> None:
    """Treatment-balanced batches need at least one cell of each treatment per batch."""
    n = len(treatment_cells(manifest, "train"))
    if use_stratified(manifest, config) and config.batch_size < n:
        warnings.warn(f"--batch-size {config.batch_size} is smaller than the {n} treatments of "
                      "the training split: batches cannot hold every treatment (each batch takes "
                      f"the next {config.batch_size} in turn). Use --batch-size {n} or more for "
                      "balanced batches.", UserWarning, stacklevel=2)


class BatchStream:
    """The training batches as a function of the step, so that a resumed run draws exactly the
    batches the uninterrupted run would have drawn.

    The decoder's batches come in segments of `checkpoint_every` steps: segment k is a fresh
    deterministic pipeline seeded by (seed, k, stream). A run resumed from a periodic
    checkpoint starts its segment afresh; one resumed from a checkpoint saved on an
    interrupt or a time limit skips the segment's used batches (reading, not decoding, at
    most checkpoint_every - 1 of them). The film measurer's steps are segmented alike.
    The published discriminator's real batches are a second stream.
    """

    def __init__(self, trainer, data_dir, manifest: dict, config: FitConfig):
        self.trainer, self.data_dir, self.manifest, self.config = trainer, data_dir, manifest, config
        self.stratify = use_stratified(manifest, config)
        self.streams = 2 if trainer.needs_real_batch else 1

    def seed(self, *key) -> int:
        return int(np.random.SeedSequence([self.config.seed, *key]).generate_state(1)[0] >> 1)

    def iterator(self, seed: int, skip: int):
        from tfrecords_tools.reader import make_dataset

        strategy, config = self.trainer.strategy, self.config
        per_replica = config.batch_size // strategy.num_replicas_in_sync

        def make(ctx):
            return make_dataset(self.data_dir, "train", per_replica, stratify=self.stratify,
                                shuffle=True, repeat=True, seed=seed, scaling=config.scaling,
                                normalization=config.normalization, input_context=ctx,
                                manifest=self.manifest, skip_batches=skip)
        return iter(strategy.distribute_datasets_from_function(make))

    def measurer(self, step: int):
        """The measurer's batches from its step `step` to the end of that step's segment."""
        segment, done = divmod(step, self.config.checkpoint_every)
        return self.iterator(self.seed(1, segment, 0), done)

    def segment_starts(self, step: int) -> bool:
        return step % self.config.checkpoint_every == 0

    def decoder(self, step: int) -> list:
        """The iterators that give the batches of decoder steps step+1, step+2, ... to the end
        of the segment holding `step`."""
        segment, done = divmod(step, self.config.checkpoint_every)
        return [self.iterator(self.seed(0, segment, i), done) for i in range(self.streams)]


class Validator:
    """Validation pixel metrics against the mean training image, and the sample pictures."""

    def __init__(self, trainer, data_dir, run_dir: Path, manifest: dict, config: FitConfig,
                 chief: bool):
        import tensorflow as tf

        self.trainer, self.run_dir, self.manifest, self.chief = trainer, run_dir, manifest, chief
        (self.feats, self.crops, self.treatments, self.ids,
         self.split) = load_val_cells(data_dir, manifest, config, config.val_cells)
        mean_image = mean_training_image(data_dir, manifest, config)
        self.baseline_mse, self.baseline_ssim = pixel_metrics(
            np.broadcast_to(mean_image, self.crops.shape).copy(), self.crops)
        self.grid = grid_indices(self.treatments, config.grid_cells)
        self.writer = tf.summary.create_file_writer(str(run_dir / "logs")) if chief else None
        self.infer = tf.function(trainer.generate)
        if chief:
            (run_dir / "samples").mkdir(exist_ok=True)

    def __call__(self, step: int) -> tuple[float, float]:
        import tensorflow as tf

        generated = np.concatenate([self.infer(tf.constant(self.feats[i:i + 256])).numpy()
                                    for i in range(0, len(self.feats), 256)])
        mse, ssim = pixel_metrics(generated, self.crops)
        if self.chief and self.grid:
            self.save_pictures(step, generated, mse, ssim)
        if self.chief:
            with self.writer.as_default(step=step):
                tf.summary.scalar("val/pixel_mse", mse)
                tf.summary.scalar("val/ssim", ssim)
                tf.summary.scalar("val/mean_image_mse", self.baseline_mse)
        return mse, ssim

    def save_pictures(self, step, generated, mse, ssim) -> None:
        import tensorflow as tf

        from cp2image_tf.viz import composite, save_grid

        grid = self.grid
        rows = {"real": self.crops[grid], "generated": generated[grid]}
        labels = [f"{self.treatments[i]}\n{self.ids[i]}" for i in grid]
        title = (f"step {step}: {self.split} cells, val MSE {mse:.4f} "
                 f"(mean image {self.baseline_mse:.4f}), SSIM {ssim:.3f}")
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        save_grid(path, rows, self.manifest["channels"], labels, title)
        shutil.copyfile(path, self.run_dir / "samples" / "latest.png")
        with self.writer.as_default(step=step):
            pair = np.concatenate([rows["real"], rows["generated"]], axis=2)
            tf.summary.image("val/real_vs_generated", composite(pair, self.manifest["channels"]),
                             max_outputs=len(grid))


def train_measurer(trainer, batches: BatchStream, config: FitConfig, clock: Clock,
                   validator: Validator, run_dir: Path, progress: bool) -> dict | None:
    """Phase 1 of the film model: the measurer learns crops -> features, then is frozen.

    `measurer_steps`, or `measurer_share` of the time limit when one is set. Every
    measurer_check_every steps its validation r is taken; the phase keeps the weights that
    read the most features at r >= 0.7 (then the highest median r) and ends early after
    measurer_patience checks without a better one: on 1,339 training cells it over-fits
    within minutes, and the time it does not need goes to the decoder. (A run resumed in
    this phase starts the comparison afresh from its checkpoint.) Writes
    RUN_DIR/measurer.json: the kept measurer's validation r per module, and every check.
    """
    from tqdm import tqdm

    from cp2image_tf.training.film_trainer import measurer_report

    n_steps = config.measurer_steps
    budget = None if config.time_limit is None else config.measurer_share * config.time_limit
    done = int(trainer.measurer_step.numpy())
    if int(trainer.measurer_done.numpy()) or done >= n_steps or (
            budget is not None and clock.seconds() >= budget and done):
        return None
    names = trainer.manifest["features"]["names"]

    checks, best = [], {"score": None, "weights": None, "step": None}

    def check() -> bool:
        """Take the validation r at `done`; keep the weights if they read more. True if so."""
        report = measurer_report(trainer.measurer, validator.crops, validator.feats, names)
        checks.append({"step": done, "fraction_r_0.7": report["fraction_r_0.7"],
                       "median_r": report["median_r"]})
        score = (round(report["fraction_r_0.7"], 4), report["median_r"])
        if best["score"] is not None and score <= best["score"]:
            return False
        best.update(score=score, weights=trainer.measurer.get_weights(), step=done)
        return True

    step_fn, iterator, stale = trainer.measurer_step_fn(), None, 0
    bar = tqdm(total=n_steps, initial=done, unit="step", desc="measurer", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    while done < n_steps and (budget is None or clock.seconds() < budget or not done):
        if done % config.checkpoint_every == 0 or iterator is None:
            iterator = batches.measurer(done)
        loss = float(step_fn(iterator)["measurer"])
        done += 1
        bar.update(1)
        if done % config.log_every == 0:
            bar.set_postfix_str(f"loss {loss:.3f}")
        if done % config.measurer_check_every == 0:
            stale = 0 if check() else stale + 1
            if config.measurer_patience and stale >= config.measurer_patience:
                break
    bar.close()
    if not checks or checks[-1]["step"] != done:
        check()
    trainer.measurer.set_weights(best["weights"])
    trainer.measurer_done.assign(1)
    clock.sync()
    report = measurer_report(trainer.measurer, validator.crops, validator.feats, names)
    report.update(steps=done, kept_step=best["step"], checks=checks, split=validator.split)
    trainer.set_reliability(report["r"])
    if validator.chief:
        (run_dir / "measurer.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def plan_total_steps(trainer, config: FitConfig, clock: Clock, seconds_per_step: float) -> int:
    """Under --time-limit, the decoder steps the budget is expected to allow (capped by --steps):
    the film schedule's ramps are fractions of this, fixed once in the checkpoint."""
    expected = int(trainer.step.numpy()) + max(1, int(clock.left() / max(seconds_per_step, 1e-9)))
    total = min(config.steps, expected)
    trainer.total_steps.assign(total)
    return total


class Interrupted(KeyboardInterrupt):
    """fit stopped by SIGTERM or Ctrl+C after saving a checkpoint: `signal`, `step`, `checkpoint`."""

    def __init__(self, signal_name: str = "SIGINT"):
        super().__init__(signal_name)
        self.signal, self.step, self.checkpoint = signal_name, None, None


@contextlib.contextmanager
def interrupt_on_sigterm():
    """SIGTERM (timeout, Slurm preemption, Kubernetes) raises Interrupted, as Ctrl+C raises
    KeyboardInterrupt: training saves a checkpoint on the way out instead of losing its work."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_steps_left(run_dir: Path, resume, config: FitConfig) -> None:
    """A rerun asking for no more steps than the run has done is refused before anything is
    written (config.json keeps the settings the run was trained with)."""
    from cp2image_tf.training.checkpoints import checkpoint_step

    if resume is None:
        return
    done = checkpoint_step(resume)
    if done >= config.steps:
        raise UserInputError(
            f"{run_dir}: already trained to step {done}, so --steps {config.steps} leaves nothing "
            f"to do. Give --steps above {done} to train further, or export it with "
            f"`cp2image-tf export {run_dir} MODEL_BASE`.")


def fit(data_dir, run_dir, config: FitConfig | None = None, progress: bool = True,
        strategy=None, verify_data: bool = False, new_data: bool = False) -> dict:
    """Train (or resume training) a decoder on a converted dataset; returns a summary.

    Re-running with the same RUN_DIR resumes from its latest checkpoint that reads. With
    config.time_limit the run stops cleanly when its training seconds (summed over
    resumed runs) reach the limit, and checkpoints. Before any work the train and val shards
    are checked against the manifest (size and record count; verify_data: also the SHA-256),
    and a RUN_DIR trained on another dataset is refused unless new_data. SIGTERM and Ctrl+C
    save a checkpoint and raise Interrupted.
    """
    config = config or FitConfig()
    config.validate()
    manifest = load_manifest(data_dir)
    run_dir = Path(run_dir)
    check_run_dir(run_dir, manifest, config, new_data)
    from cp2image_tf.training.networks import check_crop

    check_crop(manifest, config, data_dir)
    check_shards(data_dir, manifest, splits=("train", "val"),
                 level="sha256" if verify_data else "count")
    warn_unbalanced(manifest, config)
    with interrupt_on_sigterm(), named_read_errors(data_dir, manifest):
        return _fit(data_dir, run_dir, manifest, config, progress, strategy)


def _fit(data_dir, run_dir: Path, manifest: dict, config: FitConfig, progress: bool,
         strategy) -> dict:
    import keras
    import tensorflow as tf

    from cp2image_tf.training.strategy import choose_strategy, is_chief

    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    resume = resume_point(run_dir)
    check_steps_left(run_dir, resume, config)
    strategy = strategy or choose_strategy(config.strategy, config.peer_timeout)
    chief = is_chief(strategy)
    keras.utils.set_random_seed(config.seed)

    # Non-chief workers write their (required) checkpoint copies to a scratch folder.
    write_dir = run_dir if chief else run_dir / f".worker-{strategy.cluster_resolver.task_id}"
    write_dir.mkdir(parents=True, exist_ok=True)
    if chief:
        config.to_json(run_dir / "config.json")
        (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    trainer = make_trainer(manifest, config, strategy)
    managers = (tf.train.CheckpointManager(trainer.checkpoint, write_dir / "checkpoints",
                                           max_to_keep=config.keep_checkpoints),
                tf.train.CheckpointManager(trainer.checkpoint, write_dir / "best", max_to_keep=1))
    start_step = restore_latest(trainer, run_dir, chief, progress, resume)
    batches = BatchStream(trainer, data_dir, manifest, config)
    validator = Validator(trainer, data_dir, run_dir, manifest, config, chief)
    clock = Clock(trainer, config.time_limit)
    summary = {"start_step": start_step, "baseline_mse": validator.baseline_mse,
               "baseline_ssim": validator.baseline_ssim}
    try:
        if getattr(trainer, "editor", None) is not None:
            from cp2image_tf.training.exemplar import bank_layer, fill_bank

            bank = bank_layer(trainer.decoder)
            if not float(bank.filled.numpy()):
                summary["exemplars"] = fill_bank(trainer.decoder, data_dir, manifest, config)
            else:
                summary["exemplars"] = bank.size
        if hasattr(trainer, "measurer_step_fn"):
            measured = int(trainer.measurer_step.numpy())
            try:
                report = train_measurer(trainer, batches, config, clock, validator, run_dir,
                                        progress and chief)
            except KeyboardInterrupt:
                if int(trainer.measurer_step.numpy()) > measured:
                    clock.sync()
                    managers[0].save(checkpoint_number=int(trainer.step.numpy()))
                raise
            if report:
                summary["measurer"] = report
                managers[0].save(checkpoint_number=int(trainer.step.numpy()))
            elif config.judge_rounds and config.judge_reliability and int(
                    trainer.measurer_done.numpy()):
                # Resumed after the measurer's phase: the judge rounds still to come weigh the
                # consistency from its r on real crops, read again (every worker alike).
                from cp2image_tf.training.film_trainer import measurer_report

                trainer.reliability_r = measurer_report(
                    trainer.measurer, validator.crops, validator.feats,
                    manifest["features"]["names"])["r"]
        judge = None
        if config.judge_rounds and getattr(trainer, "editor", None) is not None:
            from cp2image_tf.training.judge import JudgeRounds

            judge = JudgeRounds(trainer, batches, data_dir, manifest, config, run_dir, chief,
                                chief and progress)
        step = training_loop(trainer, batches, config, clock, validator, managers, run_dir,
                             start_step, summary, chief and progress, judge)
    except KeyboardInterrupt as err:
        stopped = err if isinstance(err, Interrupted) else Interrupted("SIGINT")
        stopped.step = int(trainer.step.numpy())
        stopped.checkpoint = managers[0].latest_checkpoint
        raise stopped from None
    finally:
        if validator.writer is not None:
            validator.writer.flush()
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    summary.update(steps=step, run_dir=str(run_dir), seconds=clock.seconds(),
                   weights_sha256=weights_digest(*trainer.models))
    return summary


def training_loop(trainer, batches: BatchStream, config: FitConfig, clock: Clock, validator: Validator,
                  managers, run_dir: Path, start_step: int, summary: dict, progress: bool,
                  judge=None) -> int:
    """Steps until --steps or --time-limit; logs, validates and checkpoints on the way; the
    judge rounds (judge.JudgeRounds) when they are due."""
    from tqdm import tqdm

    manager, best_manager = managers
    history = History(run_dir / "history.csv", validator.chief, history_columns(trainer))
    history.truncate_after(start_step)
    best_file = run_dir / "best" / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else {"val_mse": math.inf}
    step_fn = trainer.train_step_fn()
    # Under --time-limit the film schedule's length is planned once, from the first steps' speed.
    planning = (config.time_limit is not None and start_step == 0
                and hasattr(trainer, "total_steps"))
    bar = tqdm(total=config.steps, initial=min(start_step, config.steps), unit="step",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    step, rate, iterators = start_step, None, None
    last_time, last_step = time.perf_counter(), step
    try:
        if step == 0:
            mse, ssim = validator(0)
            history.write({"step": 0, "val_mse": mse, "val_ssim": ssim,
                           "baseline_mse": validator.baseline_mse})
        while step < config.steps and clock.left() > 0:
            if judge is not None and judge.due(step):
                summary.setdefault("judge", []).append(judge.run(step))
                if clock.left() <= 0:
                    break
                if config.time_limit is not None and not planning:
                    judge.replan_after_round(step, clock.left(), config.steps)
            if iterators is None or batches.segment_starts(step):
                iterators = batches.decoder(step)
            losses = step_fn(*iterators)
            step += 1
            bar.update(1)
            if judge is not None and step == start_step + 1:
                judge.start_pace(step)  # the run's first step here included compiling
            if planning and step == PLAN_AFTER + 2:
                seconds_per_step = (time.perf_counter() - plan_start) / PLAN_AFTER
                bar.total = plan_total_steps(trainer, config, clock, seconds_per_step)
                planning = False
            elif planning and step == 2:
                plan_start = time.perf_counter()  # the first steps include compiling
            log_now = step % config.log_every == 0 or step == config.steps
            validate_now = step % config.validate_every == 0 or step == config.steps
            row = None
            if log_now or validate_now:
                values = {k: float(v) for k, v in losses.items()}
                weights = trainer.schedule_weights(step - 1)
                row = {"step": step, **values, **weights}
            if log_now:
                now = time.perf_counter()
                rate = (step - last_step) * config.batch_size / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                row["images_per_s"] = rate
                bar.set_postfix_str(" ".join(f"{k} {values[k]:.3g}" for k in trainer.loss_names[:3])
                                    + f" {rate:.0f} img/s")
                if validator.chief:
                    write_scalars(validator.writer, step, values, weights, rate)
            if validate_now:
                best = validate_and_keep_best(validator, step, row, best, best_manager, best_file)
                summary.update(val_mse=row["val_mse"], val_ssim=row["val_ssim"])
            if row is not None:
                history.write(row)
            if step % config.checkpoint_every == 0:
                clock.sync()
                manager.save(checkpoint_number=step)
        if planning and step > start_step:
            trainer.total_steps.assign(step)  # stopped before the plan: the run was this long
        if step > start_step and not (step % config.validate_every == 0 or step == config.steps):
            # Stopped by the time limit between validations: validate the last step too.
            row = {"step": step}
            best = validate_and_keep_best(validator, step, row, best, best_manager, best_file)
            summary.update(val_mse=row["val_mse"], val_ssim=row["val_ssim"])
            history.write(row)
    finally:
        bar.close()
        clock.sync()
        # An interrupt between a step's update and `step += 1`: the counter is the truth.
        step = int(trainer.step.numpy())
        if step > start_step and manager.latest_checkpoint != str(
                Path(manager.directory) / f"ckpt-{step}"):
            manager.save(checkpoint_number=step)
    planned = getattr(trainer, "total_steps", None)
    summary.update(best=best, images_per_s=rate,
                   total_steps=None if planned is None else int(planned.numpy()),
                   stopped_by=("time limit" if step < config.steps else "steps"))
    return step


def write_scalars(writer, step: int, losses: dict, weights: dict, rate: float) -> None:
    """The loss terms, schedule weights and images/s to TensorBoard."""
    import tensorflow as tf

    with writer.as_default(step=step):
        for k, v in losses.items():
            tf.summary.scalar(f"loss/{k}", v)
        for k, v in weights.items():
            tf.summary.scalar(f"schedule/{k}", v)
        tf.summary.scalar("perf/images_per_s", rate)


def validate_and_keep_best(validator, step: int, row: dict, best: dict, best_manager,
                           best_file: Path) -> dict:
    """Validate at `step` (into `row`); save the best checkpoint when the pixel MSE improves,
    or at every validation for a trainer that is not judged by pixels (best_by_pixel_mse)."""
    mse, ssim = validator(step)
    row.update(val_mse=mse, val_ssim=ssim, baseline_mse=validator.baseline_mse)
    if mse < best["val_mse"] or not validator.trainer.best_by_pixel_mse:
        best_manager.save(checkpoint_number=step)
        best = {"step": step, "val_mse": mse, "val_ssim": ssim}
        if validator.chief:
            best_file.write_text(json.dumps(best, indent=1) + "\n")
    return best


PLAN_AFTER = 5


def weights_digest(*models) -> str:
    """SHA-256 over every weight of the models: equal on every worker of a synchronous run."""
    import hashlib

    digest = hashlib.sha256()
    for model in models:
        for weight in model.weights:
            digest.update(np.ascontiguousarray(np.asarray(weight.numpy())).tobytes())
    return digest.hexdigest()
