"""The trainer interface: what the training loop (train.py) asks of a model's trainer, and
the trainer of each model (make_trainer).

A trainer owns its networks, optimisers, step counters and checkpoint, and a custom training
step run by `strategy.run` inside a tf.function (Keras 3's Model.fit does not run under
MultiWorkerMirroredStrategy). The loop needs nothing else of it than the Trainer protocol
says; the work a model does before its steps (the exemplar bank's fill, the measurer's phase)
and its judge rounds are the trainer's own hooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol


@dataclass
class Run:
    """One fit's shared state, handed to the trainer's hooks."""

    data_dir: Any
    run_dir: Path
    manifest: dict
    config: Any  # FitConfig
    batches: Any  # train.BatchStream
    clock: Any  # train.Clock
    validator: Any  # validation.Validator
    managers: tuple  # (latest, best) tf.train.CheckpointManager
    chief: bool
    progress: bool  # progress bars (the chief's only)
    summary: dict = field(default_factory=dict)


class Trainer(Protocol):
    """A model's trainer, as the training loop uses it."""

    strategy: Any
    checkpoint: Any  # tf.train.Checkpoint of everything a resumed run needs
    step: Any  # the decoder step counter (a tf.Variable in the checkpoint)
    elapsed: Any  # training seconds over the runs of one RUN_DIR (for --time-limit)
    # The decoder steps the loss schedule is a fraction of, fixed once under --time-limit
    # from the first steps' speed; None: the schedule counts steps (nothing to plan).
    total_steps: Any | None
    models: tuple  # every network whose weights weights_digest covers
    loss_names: tuple  # the loss terms train_step_fn returns, history.csv's columns
    weight_names: tuple  # the schedule's weights (schedule_weights), history.csv's columns
    needs_real_batch: bool  # its step takes a second, independent batch of real cells
    best_by_pixel_mse: bool  # best/ holds the lowest validation pixel MSE (else the latest)

    def generate(self, features) -> Any:
        """Images in [0, 1] from normalised features, inference mode."""

    def train_step_fn(self) -> Callable:
        """A tf.function: (iterator, ...) -> the global loss terms; advances `step`."""

    def schedule_weights(self, step: int) -> dict:
        """The schedule's loss weights at a decoder step, for logs."""

    def before_steps(self, run: Run) -> None:
        """The model's work before the decoder's steps, recorded in run.summary."""

    def judge_rounds(self, run: Run) -> Any | None:
        """The judge rounds of this run (shared.judge.JudgeRounds), or None."""


def make_trainer(manifest: dict, config, strategy) -> Trainer:
    """The trainer of the configured model."""
    if config.model == "exemplar":
        from cp2image_tf.training.exemplar.trainer import ExemplarTrainer

        return ExemplarTrainer(manifest, config, strategy)
    if config.model == "film":
        from cp2image_tf.training.film.trainer import FilmTrainer

        return FilmTrainer(manifest, config, strategy)
    from cp2image_tf.training.published.trainer import PublishedTrainer

    return PublishedTrainer(manifest, config, strategy)
