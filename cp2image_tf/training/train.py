"""fit: the training loop of any model, on one device, several or several machines.

The model's trainer (trainer.make_trainer: the exemplar model's by default) owns its
networks, optimisers and a custom training step run by `strategy.run` inside a tf.function;
the loop knows it only through the trainer.Trainer protocol. fit checks the run folder
(run_folder.py), lets the trainer do its work before the steps (the exemplar bank, the
measurer's phase), then steps until --steps or --time-limit, with logging, validation
(validation.py), the judge rounds when due, best-checkpoint tracking and resume. The run
folder's files: run_folder.py.
"""
from __future__ import annotations

import contextlib
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
from cp2image_tf.training.run_folder import (History, check_run_dir, check_steps_left,
                                             check_writable, read_json, restore_latest,
                                             resume_point)
from cp2image_tf.training.trainer import Run, make_trainer
from cp2image_tf.training.validation import Validator, validate_and_keep_best
from tfrecords_tools.manifest import load_manifest, treatment_cells
from tfrecords_tools.shards import check_shards, named_read_errors


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

def history_columns(trainer) -> list[str]:
    return (["step", *trainer.loss_names, *trainer.weight_names]
            + ["images_per_s", "val_mse", "val_ssim", "baseline_mse"])

def write_scalars(writer, step: int, losses: dict, weights: dict, rate: float) -> None:
    """The loss terms, schedule weights and images/s to TensorBoard."""
    import tensorflow as tf

    with writer.as_default(step=step):
        for k, v in losses.items():
            tf.summary.scalar(f"loss/{k}", v)
        for k, v in weights.items():
            tf.summary.scalar(f"schedule/{k}", v)
        tf.summary.scalar("perf/images_per_s", rate)

PLAN_AFTER = 5

def weights_digest(*models) -> str:
    """SHA-256 over every weight of the models: equal on every worker of a synchronous run."""
    import hashlib

    digest = hashlib.sha256()
    for model in models:
        for weight in model.weights:
            digest.update(np.ascontiguousarray(np.asarray(weight.numpy())).tobytes())
    return digest.hexdigest()


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
    check_writable(run_dir)
    from cp2image_tf.training.networks import check_crop

    check_crop(manifest, config, data_dir)
    check_shards(data_dir, manifest, splits=("train", "val"),
                 level="sha256" if verify_data else "count")
    warn_unbalanced(manifest, config)
    with interrupt_on_sigterm(), named_read_errors(data_dir, manifest):
        return _fit(data_dir, run_dir, manifest, config, progress, strategy)


def start_run(data_dir, run_dir: Path, manifest: dict, config: FitConfig, progress: bool,
              strategy):
    """(trainer, Run, the step it resumes from, the folder this worker writes to): the
    run folder written, the trainer built and restored."""
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
    validator = Validator(trainer, data_dir, run_dir, manifest, config, chief)
    run = Run(data_dir, run_dir, manifest, config, BatchStream(trainer, data_dir, manifest, config),
              Clock(trainer, config.time_limit), validator, managers, chief, progress and chief,
              {"start_step": start_step, "baseline_mse": validator.baseline_mse,
               "baseline_ssim": validator.baseline_ssim})
    return trainer, run, start_step, write_dir


def _fit(data_dir, run_dir: Path, manifest: dict, config: FitConfig, progress: bool,
         strategy) -> dict:
    trainer, run, start_step, write_dir = start_run(data_dir, run_dir, manifest, config,
                                                    progress, strategy)
    try:
        trainer.before_steps(run)
        step = training_loop(trainer, run, start_step, trainer.judge_rounds(run))
    except KeyboardInterrupt as err:
        stopped = err if isinstance(err, Interrupted) else Interrupted("SIGINT")
        stopped.step = int(trainer.step.numpy())
        stopped.checkpoint = run.managers[0].latest_checkpoint
        raise stopped from None
    finally:
        if run.validator.writer is not None:
            run.validator.writer.flush()
        if not run.chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    run.summary.update(steps=step, run_dir=str(run_dir), seconds=run.clock.seconds(),
                       weights_sha256=weights_digest(*trainer.models))
    run.summary["chief"] = run.chief
    return run.summary


class StepLog:
    """The loop's logging and validation: history.csv, TensorBoard, the progress bar's
    figures, the best checkpoint."""

    def __init__(self, trainer, run: Run, start_step: int):
        self.trainer, self.run, self.config = trainer, run, run.config
        self.history = History(run.run_dir / "history.csv", run.validator.chief,
                               history_columns(trainer))
        self.history.truncate_after(start_step)
        self.best_file = run.run_dir / "best" / "best.json"
        self.best = (read_json(self.best_file) if self.best_file.is_file()
                     else {"val_mse": math.inf})
        self.rate, self.last_time, self.last_step = None, time.perf_counter(), start_step

    def validate(self, step: int, row: dict) -> None:
        """Validate at `step` into `row`; keep the best checkpoint."""
        self.best = validate_and_keep_best(self.run.validator, step, row, self.best,
                                           self.run.managers[1], self.best_file)
        self.run.summary.update(val_mse=row["val_mse"], val_ssim=row["val_ssim"])

    def validation_due(self, step: int) -> bool:
        return step % self.config.validate_every == 0 or step == self.config.steps

    def start(self) -> None:
        """Step 0 of a new run: the untrained decoder's validation."""
        validator = self.run.validator
        mse, ssim = validator(0)
        self.history.write({"step": 0, "val_mse": mse, "val_ssim": ssim,
                            "baseline_mse": validator.baseline_mse})

    def after_step(self, step: int, losses: dict, bar) -> None:
        """Log every log_every steps, validate every validate_every (and at the last step)."""
        log_now = step % self.config.log_every == 0 or step == self.config.steps
        validate_now = self.validation_due(step)
        if not (log_now or validate_now):
            return
        values = {k: float(v) for k, v in losses.items()}
        weights = self.trainer.schedule_weights(step - 1)
        row = {"step": step, **values, **weights}
        if log_now:
            now = time.perf_counter()
            self.rate = ((step - self.last_step) * self.config.batch_size
                         / max(now - self.last_time, 1e-9))
            self.last_time, self.last_step = now, step
            row["images_per_s"] = self.rate
            bar.set_postfix_str(" ".join(f"{k} {values[k]:.3g}"
                                         for k in self.trainer.loss_names[:3])
                                + f" {self.rate:.0f} img/s")
            if self.run.validator.chief:
                write_scalars(self.run.validator.writer, step, values, weights, self.rate)
        if validate_now:
            self.validate(step, row)
        self.history.write(row)

    def finish(self, step: int, start_step: int) -> None:
        """Stopped by the time limit between validations: validate the last step too."""
        if step > start_step and not self.validation_due(step):
            row = {"step": step}
            self.validate(step, row)
            self.history.write(row)


class SchedulePlanner:
    """Under --time-limit the loss schedule's length is planned once, from the first steps'
    speed (a new run of a trainer with a schedule to plan)."""

    def __init__(self, trainer, run: Run, start_step: int):
        self.trainer, self.run = trainer, run
        self.active = (run.config.time_limit is not None and start_step == 0
                       and trainer.total_steps is not None)
        self.start = None

    def after_step(self, step: int, bar) -> None:
        if not self.active:
            return
        if step == PLAN_AFTER + 2:
            seconds_per_step = (time.perf_counter() - self.start) / PLAN_AFTER
            bar.total = plan_total_steps(self.trainer, self.run.config, self.run.clock,
                                         seconds_per_step)
            self.active = False
        elif step == 2:
            self.start = time.perf_counter()  # the first steps include compiling

    def finish(self, step: int, start_step: int) -> None:
        if self.active and step > start_step:
            self.trainer.total_steps.assign(step)  # stopped before the plan: the run was this long


def training_loop(trainer, run: Run, start_step: int, judge=None) -> int:
    """Steps until --steps or --time-limit; logs, validates and checkpoints on the way; the
    judge rounds (shared.judge.JudgeRounds) when they are due."""
    from tqdm import tqdm

    config, clock = run.config, run.clock
    log, planner = StepLog(trainer, run, start_step), SchedulePlanner(trainer, run, start_step)
    step_fn = trainer.train_step_fn()
    bar = tqdm(total=config.steps, initial=min(start_step, config.steps), unit="step",
               disable=not run.progress, file=sys.stderr, dynamic_ncols=True)
    step, iterators = start_step, None
    try:
        if step == 0:
            log.start()
        while step < config.steps and clock.left() > 0:
            if judge is not None and judge.due(step) and not judge_round(judge, run, step,
                                                                         planner.active):
                break
            if iterators is None or run.batches.segment_starts(step):
                iterators = run.batches.decoder(step)
            losses = step_fn(*iterators)
            step += 1
            bar.update(1)
            if judge is not None and step == start_step + 1:
                judge.start_pace(step)  # the run's first step here included compiling
            planner.after_step(step, bar)
            log.after_step(step, losses, bar)
            if step % config.checkpoint_every == 0:
                clock.sync()
                run.managers[0].save(checkpoint_number=step)
        planner.finish(step, start_step)
        log.finish(step, start_step)
    finally:
        bar.close()
        step = save_last_step(trainer, run, start_step)
    run.summary.update(best=log.best, images_per_s=log.rate,
                       total_steps=(None if trainer.total_steps is None
                                    else int(trainer.total_steps.numpy())),
                       stopped_by=("time limit" if step < config.steps else "steps"))
    return step


def judge_round(judge, run: Run, step: int, planning: bool) -> bool:
    """A judge round before decoder step step + 1; False if the time limit ran out in it."""
    run.summary.setdefault("judge", []).append(judge.run(step))
    if run.clock.left() <= 0:
        return False
    if run.config.time_limit is not None and not planning:
        judge.replan_after_round(step, run.clock.left(), run.config.steps)
    return True


def save_last_step(trainer, run: Run, start_step: int) -> int:
    """Checkpoint the step the loop stopped at, unless saved already; that step. An interrupt
    between a step's update and the loop's count: the trainer's counter is the truth."""
    run.clock.sync()
    manager = run.managers[0]
    step = int(trainer.step.numpy())
    if step > start_step and manager.latest_checkpoint != str(
            Path(manager.directory) / f"ckpt-{step}"):
        manager.save(checkpoint_number=step)
    return step
