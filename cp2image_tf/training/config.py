"""FitConfig: everything that decides a training run; saved as config.json in the run folder.

The run's settings (model, steps or time limit, batch, seed, strategy, checkpoints,
validation) are top-level; each model has a section of its own settings with their defaults
(ExemplarSettings, FilmSettings, PublishedSettings), and so do the exemplar model's measurer
and judge rounds (MeasurerSettings, JudgeSettings). As JSON:

    {"model": "exemplar", "time_limit": "30m", "exemplar": {"bank": 8192}, "judge": {"rounds": 3}}

A config file, sectioned or flat as written before the sections (one key per setting, e.g.
"exemplars", "judge_rounds"), is read by run_folder.read_config (upgrade_config moves flat keys
into their sections).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tfrecords_tools.errors import UserInputError
from tfrecords_tools.reader import NORMALIZATIONS, SCALINGS

MODELS = ("exemplar", "film", "published")
# The smallest crop any model trains on (the exemplar and film models'; the published one needs 48 px).
MIN_CROP_SIZE = 32
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
STRATIFY = ("auto", "yes", "no")
SECTIONS = ("exemplar", "film", "published", "measurer", "judge")


def parse_duration(text) -> float | None:
    """Seconds from "90", "90s", "30m", "1.5h" (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not match:
        raise UserInputError(f"--time-limit {text}: give a duration such as 30m, 90s or 1.5h.")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass
class ExemplarSettings:
    """The exemplar model (exemplar/): the nearest training cell, edited towards the profile.
    Why each default: docs/design/exemplar.md."""

    BATCH_SIZE: ClassVar[int] = 32
    filters: int = 16
    decoder_lr: float = 1e-3
    critic_lr: float = 2e-4
    jit_compile: bool = False  # plain graphs ran the step faster than XLA on a CPU
    # Training cells kept in the model (fewer for large crops, exemplar.bank.BANK_BYTES), and
    # how many nearest ones training picks from.
    bank: int = 8192
    top_k: int = 16
    # The bank offers its cells turned and mirrored too, each with its profile as the view
    # has it (exemplar.bank.ExemplarBank).
    views: bool = True
    # The lookup counts each shape feature (AreaShape but Zernike) this many times in its
    # distance. The one-view bank counts every feature once: set 1 with views false.
    shape_weight: float = 4.0
    # The editor first warps its exemplar about the crop's centre (exemplar.networks.WarpCrop).
    warp: bool = True
    # The L1 weight that keeps an edit close to its exemplar.
    anchor_weight: float = 0.1
    # The measurer's reading must move from the exemplar's by the profile's difference
    # (true) or equal the profile.
    relative_consistency: bool = True
    # This share of each batch edits the cell itself towards its own profile, where
    # identity_weight x mean |logit correction| asks for no edit.
    identity_share: float = 0.25
    identity_weight: float = 3.0
    # The size-and-shape reading (exemplar.geometry: soft masks at the dataset's segmentation
    # thresholds) of each edit must move from its exemplar's as the profile asks.
    geometry_weight: float = 1.0
    # The reading also takes each object's mean intensity in every channel (off: see
    # docs/design/exemplar.md).
    intensity_readings: bool = False
    # After the steps, the edit strength is calibrated on re-measured traversals of validation
    # cells (evaluation/calibration.py; `cp2image-tf fit` runs it).
    calibrate: bool = True
    # The consistency term weights each feature by the measurer's validation r^2.
    reliability_weighted: bool = True
    # Measurer and critic also see log intensities (shared.layers.LogView); the measurer
    # learns from the eight turns and mirror images of each crop (shared.symmetry).
    log_view: bool = True
    measurer_views: bool = True
    # The loss weights, ramped in over fractions of the decoder's run (shared.critic_trainer).
    consistency_weight: float = 1.0
    consistency_ramp: float = 0.1
    adversarial_weight: float = 0.05
    matching_weight: float = 1.0
    adversarial_ramp: tuple = (0.05, 0.25)


@dataclass
class FilmSettings:
    """The film decoder (film/), a documented baseline: docs/design/film.md."""

    BATCH_SIZE: ClassVar[int] = 32
    filters: int = 16
    decoder_lr: float = 1e-3
    critic_lr: float = 2e-4
    jit_compile: bool = False
    pixel_weight: float = 100.0  # the mean squared error to the paired crop
    reliability_weighted: bool = False
    log_view: bool = False
    measurer_views: bool = False
    consistency_weight: float = 1.0
    consistency_ramp: float = 0.1
    adversarial_weight: float = 0.05
    matching_weight: float = 1.0
    adversarial_ramp: tuple = (0.05, 0.25)


@dataclass
class PublishedSettings:
    """The published CP2Image model (published/), as in the paper: docs/design/published.md."""

    BATCH_SIZE: ClassVar[int] = 104  # one cell per treatment of the paper's data
    filters: int = 32
    decoder_lr: float = 0.01
    decoder_beta1: float = 0.9
    decoder_beta2: float = 0.999
    decoder_epsilon: float = 1e-7
    discriminator_lr: float = 0.001
    discriminator_momentum: float = 0.9
    weight_decay: float = 1e-4  # kernels multiplied by (1 - weight_decay) after every step
    perceptual_delay: float = 2500.0  # feature term k starts at delay * (k + 1)
    perceptual_slope: float = 2500.0  # and reaches full weight `slope` steps later
    jit_compile: bool = True


@dataclass
class MeasurerSettings:
    """The exemplar and film models' measurer, trained first (shared.measurer.train_measurer):
    docs/design/measurer-and-judge.md."""

    # None: 4 x the run's steps (a measurer step costs a fraction of a decoder step); under
    # --time-limit, `share` of the limit.
    steps: int | None = None
    share: float = 0.2
    lr: float = 1e-3
    # Every check_every steps its validation r is taken; the best weights are kept and the
    # phase ends after `patience` checks without a better one (0: never early).
    check_every: int = 500
    patience: int = 4


@dataclass
class JudgeSettings:
    """The exemplar model's judge rounds (shared.judge): one per `every` decoder steps of the
    run's plan, at most `rounds` (0: none); a round of `cells` cells trains the measurer
    `steps` steps at `lr` (fewer in proportion for a smaller round). With `reliability` the
    consistency then trusts a feature as far as the measurer follows the judge on it."""

    rounds: int = 3
    every: int = 400
    cells: int = 768
    steps: int = 500
    lr: float = 3e-4
    reliability: bool = True


SECTION_TYPES = {"exemplar": ExemplarSettings, "film": FilmSettings,
                 "published": PublishedSettings, "measurer": MeasurerSettings,
                 "judge": JudgeSettings}


@dataclass
class FitConfig:
    # Which network: exemplar (the default; exemplar/), film (film/) or published (published/).
    model: str = "exemplar"
    # Training stops at `steps` decoder steps or after time_limit seconds, whichever first.
    steps: int = 20000
    time_limit: float | None = None
    # The global batch; None: the model's (its section's BATCH_SIZE: exemplar and film 32,
    # published 104).
    batch_size: int | None = None
    seed: int = 0
    stratify: str = "auto"  # auto: treatment-balanced batches when the data has treatments
    scaling: str = "dataset"  # crop scaling, see tfrecords_tools.reader
    normalization: str = "standard"
    noise_dim: int = 0
    mixed_precision: bool = False
    strategy: str = "auto"
    # multiworker: seconds to wait for every worker of TF_CONFIG to start before giving up.
    peer_timeout: float = 300.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500
    val_cells: int = 1024  # validation metrics on at most this many val cells
    log_every: int = 25
    grid_cells: int = 8
    exemplar: ExemplarSettings = field(default_factory=ExemplarSettings)
    film: FilmSettings = field(default_factory=FilmSettings)
    published: PublishedSettings = field(default_factory=PublishedSettings)
    measurer: MeasurerSettings = field(default_factory=MeasurerSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)

    def __post_init__(self):
        self.time_limit = parse_duration(self.time_limit)
        for name, kind in SECTION_TYPES.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind(**value))
        for section in (self.exemplar, self.film):
            section.adversarial_ramp = tuple(section.adversarial_ramp)
        if self.batch_size is None and self.model in MODELS:
            self.batch_size = self.section.BATCH_SIZE

    @property
    def section(self):
        """The chosen model's settings: self.exemplar, self.film or self.published."""
        return getattr(self, self.model)

    @property
    def measurer_steps(self) -> int:
        """The measurer's steps: its own setting, or 4 x the run's steps."""
        return 4 * self.steps if self.measurer.steps is None else self.measurer.steps

    @property
    def judge_rounds(self) -> int:
        """The judge rounds of this run at most: the exemplar model's only."""
        return self.judge.rounds if self.model == "exemplar" else 0

    def sections_used(self) -> tuple[str, ...]:
        """The sections the chosen model reads (the others are left out of config.json)."""
        return {"exemplar": ("exemplar", "measurer", "judge"), "film": ("film", "measurer"),
                "published": ("published",)}[self.model]

    def validate(self) -> None:
        for name in SECTIONS:
            check_types(dataclasses.asdict(getattr(self, name)), "FitConfig", name)
        check_types({k: v for k, v in dataclasses.asdict(self).items() if k not in SECTIONS},
                    "FitConfig")
        if self.model not in MODELS:
            raise UserInputError(f"--model {self.model}: choose one of {', '.join(MODELS)}.")
        choices = {"stratify": STRATIFY, "strategy": STRATEGIES,
                   "scaling": SCALINGS, "normalization": NORMALIZATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose "
                                     f"one of {', '.join(allowed)}.")
        check_ranges(self)
        if self.judge_rounds and self.judge.cells < 8:
            raise UserInputError(f"judge.cells {self.judge.cells}: a judge round needs at least 8 "
                                 "cells.")
        if self.model == "exemplar" and self.exemplar.top_k > self.exemplar.bank:
            raise UserInputError(f"exemplar.top_k {self.exemplar.top_k}: larger than the bank "
                                 f"(exemplar.bank {self.exemplar.bank}); training picks one of "
                                 "the top_k nearest bank cells. Give a top_k of at most the bank.")
        ex = self.exemplar
        if self.model == "exemplar" and ex.shape_weight != 1.0 and not ex.views:
            raise UserInputError(f"exemplar.shape_weight {ex.shape_weight} with exemplar.views "
                                 "false: the one-view bank counts every feature once; set "
                                 "exemplar.shape_weight to 1 as well.")

    def to_dict(self) -> dict:
        """The run's settings and the sections its model reads, as config.json holds them."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in SECTIONS}
        data.update({name: dataclasses.asdict(getattr(self, name))
                     for name in self.sections_used()})
        return data

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


_KINDS = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"),
          "str": ((str,), "a string"), "bool": ((bool,), "true or false"),
          "tuple": ((list, tuple), "a list")}


def check_types(data: dict, source, section: str | None = None) -> None:
    """Each setting (of FitConfig, or of its `section`) from `source`, a file or the CLI, has
    its field's type: a UserInputError naming the setting and the type it needs otherwise.
    Names not of the class are left to the caller."""
    kind = FitConfig if section is None else SECTION_TYPES[section]
    if not isinstance(data, dict):
        raise UserInputError(f"{source}: \"{section}\" is {json.dumps(data)}; it must be an "
                             "object of settings.")
    hints = typing.get_type_hints(kind)
    for name, value in data.items():
        if name not in hints or name in SECTIONS and section is None:
            continue
        label = name if section is None else f"{section}.{name}"
        kinds = [k.__name__ for k in typing.get_args(hints[name]) if k is not type(None)] \
            or [getattr(hints[name], "__name__", str(hints[name]))]
        optional = type(None) in typing.get_args(hints[name])
        if value is None and optional:
            continue
        if name == "time_limit" and isinstance(value, str):
            continue  # "30m": parsed by parse_duration
        ok = any(isinstance(value, _KINDS[k][0]) and not (isinstance(value, bool) and k != "bool")
                 and not (isinstance(value, float) and not math.isfinite(value))
                 for k in kinds if k in _KINDS)
        if not ok:
            need = " or ".join(_KINDS[k][1] for k in kinds if k in _KINDS)
            raise UserInputError(f"{source}: \"{label}\" is {json.dumps(value)}; it must be "
                                 f"{need}" + (" or null" if optional else "") + ".")


# Each setting's allowed range: (lowest, highest, whether lowest is allowed, what it is).
POSITIVE, AT_LEAST_1, NOT_NEGATIVE, FRACTION, SHARE = ((0, None, False), (1, None, True),
                                                       (0, None, True), (0, 1, True),
                                                       (0, 1, "below"))
RANGES = {
    None: {"steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "checkpoint_every": AT_LEAST_1,
           "validate_every": AT_LEAST_1, "log_every": AT_LEAST_1, "val_cells": AT_LEAST_1,
           "keep_checkpoints": AT_LEAST_1, "noise_dim": NOT_NEGATIVE,
           "grid_cells": NOT_NEGATIVE, "peer_timeout": POSITIVE, "time_limit": POSITIVE},
    "exemplar": {"filters": AT_LEAST_1, "decoder_lr": POSITIVE, "critic_lr": POSITIVE,
                 "bank": AT_LEAST_1, "top_k": AT_LEAST_1, "shape_weight": POSITIVE,
                 "anchor_weight": NOT_NEGATIVE, "identity_share": SHARE,
                 "identity_weight": NOT_NEGATIVE, "geometry_weight": NOT_NEGATIVE,
                 "consistency_weight": NOT_NEGATIVE,
                 "consistency_ramp": FRACTION, "adversarial_weight": NOT_NEGATIVE,
                 "matching_weight": NOT_NEGATIVE},
    "film": {"filters": AT_LEAST_1, "decoder_lr": POSITIVE, "critic_lr": POSITIVE,
             "pixel_weight": NOT_NEGATIVE, "consistency_weight": NOT_NEGATIVE,
             "consistency_ramp": FRACTION, "adversarial_weight": NOT_NEGATIVE,
             "matching_weight": NOT_NEGATIVE},
    "published": {"filters": AT_LEAST_1, "decoder_lr": POSITIVE, "discriminator_lr": POSITIVE,
                  "decoder_beta1": SHARE, "decoder_beta2": SHARE, "decoder_epsilon": POSITIVE,
                  "discriminator_momentum": SHARE, "weight_decay": SHARE,
                  "perceptual_delay": NOT_NEGATIVE, "perceptual_slope": POSITIVE},
    "measurer": {"steps": AT_LEAST_1, "share": SHARE, "lr": POSITIVE, "check_every": AT_LEAST_1,
                 "patience": NOT_NEGATIVE},
    "judge": {"rounds": NOT_NEGATIVE, "every": AT_LEAST_1, "cells": AT_LEAST_1,
              "steps": NOT_NEGATIVE, "lr": POSITIVE},
}


def range_error(label: str, value, bounds) -> str | None:
    """Why `value` is outside `bounds` (RANGES), or None."""
    low, high, closed = bounds
    if value is None:
        return None
    if high is not None:
        below = closed == "below"
        if not (low <= value and (value < high if below else value <= high)):
            return (f"{label} {value}: must be at least {low} and "
                    + (f"below {high}." if below else f"at most {high}."))
        return None
    if value < low or (value == low and not closed):
        return f"{label} {value}: must be " + (f"at least {low}." if closed else "positive.")
    return None


def check_ranges(config: FitConfig) -> None:
    """Every setting the run uses within its range: a UserInputError naming the first that is
    not (top-level ones as their --option)."""
    for section, ranges in RANGES.items():
        if section is not None and section not in config.sections_used():
            continue
        holder = config if section is None else getattr(config, section)
        for name, bounds in ranges.items():
            label = f"--{name.replace('_', '-')}" if section is None else f"{section}.{name}"
            problem = range_error(label, getattr(holder, name), bounds)
            if problem:
                raise UserInputError(problem)
    for section in ("exemplar", "film"):
        ramp = getattr(config, section).adversarial_ramp
        if section in config.sections_used() and not (
                len(ramp) == 2 and 0 <= ramp[0] <= ramp[1] <= 1):
            raise UserInputError(f"{section}.adversarial_ramp {list(ramp)}: give [start, end] "
                                 "with 0 <= start <= end <= 1 (fractions of the run).")
