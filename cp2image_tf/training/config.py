"""FitConfig: everything that decides a training run; saved as config.json in the run folder.

Settings left at None take the chosen model's default (MODEL_DEFAULTS): the
published model keeps the paper's batch, learning rates and schedule; the film
model has its own.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from tfrecords_tools.errors import UserInputError


from tfrecords_tools.reader import NORMALIZATIONS, SCALINGS

MODELS = ("exemplar", "film", "published")
# The smallest crop any model trains on (the exemplar and film models'; the published one needs 48 px).
MIN_CROP_SIZE = 32
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
STRATIFY = ("auto", "yes", "no")
MODEL_DEFAULTS = {
    "published": {"batch_size": 104, "decoder_lr": 0.01, "discriminator_lr": 0.001, "filters": 32,
                  "jit_compile": True, "judge_rounds": 0},
    # XLA was slower than plain graphs for the film step on a 2-core CPU (bench_train.py).
    "film": {"batch_size": 32, "decoder_lr": 1e-3, "discriminator_lr": 2e-4, "filters": 16,
             "jit_compile": False, "pixel_weight": 100.0, "anchor_weight": 0.0, "log_view": False,
             "reliability_weighted": False, "measurer_views": False, "judge_rounds": 0},
    # The exemplar model edits a real cell: no pixel loss to the paired crop (exemplar.py).
    "exemplar": {"batch_size": 32, "decoder_lr": 1e-3, "discriminator_lr": 2e-4, "filters": 16,
                 "jit_compile": False, "pixel_weight": 0.0, "anchor_weight": 0.1,
                 "log_view": True, "reliability_weighted": True, "measurer_views": True,
                 "judge_rounds": 3},
}


def parse_duration(text) -> float | None:
    """Seconds from "90", "90s", "30m", "1.5h" (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
    if not match:
        raise UserInputError(f"--time-limit {text}: give a duration such as 30m, 90s or 1.5h.")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass
class FitConfig:
    # Which network: exemplar (the default; exemplar.py), film (film.py) or published
    # (model.py, as in the paper).
    model: str = "exemplar"
    # Steps and batches (published: batch 104, one cell per treatment, up to 680,000 steps).
    # With time_limit (seconds), training stops at whichever comes first.
    steps: int = 20000
    time_limit: float | None = None
    batch_size: int | None = None
    stratify: str = "auto"  # auto: treatment-balanced batches when the data has treatments
    scaling: str = "dataset"  # crop scaling, see tfrecords_tools.reader
    normalization: str = "standard"
    # Model.
    filters: int | None = None
    noise_dim: int = 0
    # Published optimisation (decoder_lr and discriminator_lr: the model's default when None).
    decoder_lr: float | None = None
    decoder_beta1: float = 0.9
    decoder_beta2: float = 0.999
    decoder_epsilon: float = 1e-7
    discriminator_lr: float | None = None
    discriminator_momentum: float = 0.9
    weight_decay: float = 1e-4  # kernels multiplied by (1 - weight_decay) after every step
    perceptual_delay: float = 2500.0  # feature term k starts at delay * (k + 1)
    perceptual_slope: float = 2500.0  # and reaches full weight `slope` steps later
    # The film model's losses and schedule (fractions of the decoder's run; see film_trainer.py).
    # The measurer trains first, for measurer_steps (default 4 x steps: a measurer step costs
    # about a sixteenth of a decoder step), or for measurer_share of --time-limit.
    measurer_steps: int | None = None
    measurer_share: float = 0.2
    measurer_lr: float = 1e-3
    # The measurer learns from the eight turns and mirror images of each crop (symmetry.py);
    # None: the model's default.
    measurer_views: bool | None = None
    # Every measurer_check_every steps its validation r is taken; the best weights are kept
    # and the phase ends after measurer_patience checks without a better one (0: never early).
    measurer_check_every: int = 500
    measurer_patience: int = 4
    # Judge rounds (judge.py): one per judge_every decoder steps of the run's plan, at most
    # judge_rounds (None: the model's default; 0: none). In a round training profiles are
    # drawn as training draws them (as many as decoder steps between rounds, at least 64, at
    # most judge_cells), measured with cp-measure, and the measurer trains on what
    # cp-measure saw them change (judge_steps steps for judge_cells cells, fewer in
    # proportion; learning rate judge_lr). Exemplar model only.
    judge_rounds: int | None = None
    judge_every: int = 400
    judge_cells: int = 768
    judge_steps: int = 500
    judge_lr: float = 3e-4
    # After each round the consistency trusts a feature as far as the larger of the measurer's
    # r on real crops and its r on the round's held-out edits' changes (judge.judged_reliability):
    # a feature it reads poorly on real cells but follows on edits is one it can teach.
    judge_reliability: bool = True
    pixel_weight: float | None = None
    # The exemplar model: training cells kept in the model (fewer for large crops, see
    # exemplar.BANK_BYTES), how many nearest ones training picks from, the L1 weight that
    # keeps an edit close to its exemplar, and whether the measurer's reading must move from
    # the exemplar's by the profile's difference (relative) or equal the profile.
    exemplars: int = 8192
    exemplar_top_k: int = 16
    # The bank offers its cells turned and mirrored too, each with its profile as the view
    # has it (texture directions permuted; exemplar.ExemplarBank).
    exemplar_views: bool = True
    # The lookup (training's picks and serving's) counts each shape feature (AreaShape but
    # Zernike: size, elongation, form) this many times in its distance: the exemplar's shape
    # is what an edit changes least, and where an edit must change it, it draws strokes
    # (benchmarks/bench_edits.py). The one-view bank (exemplar_views false) counts every
    # feature once: set 1 with it.
    exemplar_shape_weight: float = 4.0
    # The editor first warps its exemplar about the crop's centre (a symmetric linear map the
    # embedding sets, exemplar.WarpCrop): the cell can grow, shrink and stretch, which the
    # pixel correction alone cannot.
    exemplar_warp: bool = True
    anchor_weight: float | None = None
    relative_consistency: bool = True
    # The identity share: this fraction of each batch edits the cell itself towards its own
    # profile, and identity_weight x mean |logit correction| asks for no edit there (an
    # edit with nothing to change should change nothing; film_trainer.py).
    identity_share: float = 0.25
    identity_weight: float = 3.0
    # The consistency term weights each feature by the measurer's validation r^2 (mean 1):
    # what it cannot read, it cannot teach (film_trainer.FilmTrainer.set_reliability).
    # None: the model's default.
    reliability_weighted: bool | None = None
    # Measurer and critic also see log intensities (film.LogView); None: the model's default.
    log_view: bool | None = None
    # The pixel loss compares pixel_pool x pixel_pool averages: layout, size and brightness,
    # not the detail that the features leave open (see film_trainer.py).
    pixel_pool: int = 1
    # The measurer sees crops shifted by up to measurer_jitter px (a new shift every step), in
    # its own training and when it scores generated crops: a pattern tuned to one pixel grid
    # cannot fool it.
    measurer_jitter: int = 0
    pixel_noise: bool = False  # per-pixel noise inputs at full resolution (film.PixelNoise)
    consistency_weight: float = 1.0
    consistency_ramp: float = 0.1
    adversarial_weight: float = 0.05
    matching_weight: float = 1.0
    adversarial_ramp: tuple = (0.05, 0.25)
    # Running.
    strategy: str = "auto"
    # multiworker: seconds to wait for every worker of TF_CONFIG to start before giving up.
    peer_timeout: float = 300.0
    seed: int = 0
    jit_compile: bool | None = None
    mixed_precision: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500
    val_cells: int = 1024  # validation metrics on at most this many val cells
    log_every: int = 25
    grid_cells: int = 8

    def __post_init__(self):
        self.time_limit = parse_duration(self.time_limit)
        self.adversarial_ramp = tuple(self.adversarial_ramp)
        for name, value in MODEL_DEFAULTS.get(self.model, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.measurer_steps is None and isinstance(self.steps, int):
            self.measurer_steps = 4 * self.steps

    def validate(self) -> None:
        check_types(dataclasses.asdict(self), "FitConfig")
        if self.model not in MODELS:
            raise UserInputError(f"--model {self.model}: choose one of {', '.join(MODELS)}.")
        if self.time_limit is not None and self.time_limit <= 0:
            raise UserInputError(f"--time-limit {self.time_limit}: must be positive.")
        positive = ("steps", "batch_size", "filters", "checkpoint_every", "validate_every",
                    "measurer_check_every",
                    "log_every", "val_cells", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1.")
        choices = {"stratify": STRATIFY, "strategy": STRATEGIES,
                   "scaling": SCALINGS, "normalization": NORMALIZATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose one of "
                                     f"{', '.join(allowed)}.")
        if self.peer_timeout <= 0:
            raise UserInputError(f"--peer-timeout {self.peer_timeout}: must be positive.")
        if not 0.0 <= self.identity_share < 1.0:
            raise UserInputError(f"identity_share {self.identity_share}: must be at least 0 and "
                                 f"below 1 (the share of each batch that edits the cell itself).")
        if (self.judge_rounds < 0 or self.judge_every < 1 or self.judge_cells < 8
                or self.judge_steps < 0):
            raise UserInputError(f"judge_rounds {self.judge_rounds}, judge_every "
                                 f"{self.judge_every}, judge_cells {self.judge_cells}, "
                                 f"judge_steps {self.judge_steps}: rounds and steps must not be "
                                 "negative, judge_every at least 1 and a round needs at least "
                                 "8 cells.")
        if self.judge_rounds and self.model != "exemplar":
            raise UserInputError(f"judge_rounds {self.judge_rounds}: judge rounds measure the "
                                 f"exemplar model's edits; --model {self.model} makes none (set "
                                 "judge_rounds to 0).")
        if self.measurer_patience < 0:
            raise UserInputError(f"measurer_patience {self.measurer_patience}: must not be negative "
                                 "(0: the measurer trains its full steps).")
        if self.noise_dim < 0 or self.grid_cells < 0:
            raise UserInputError("--noise-dim and --grid-cells must not be negative.")
        if self.exemplar_shape_weight <= 0:
            raise UserInputError(f"exemplar_shape_weight {self.exemplar_shape_weight}: must be "
                                 "positive.")
        if self.exemplar_shape_weight != 1.0 and not self.exemplar_views:
            raise UserInputError(f"exemplar_shape_weight {self.exemplar_shape_weight} with "
                                 "exemplar_views false: the one-view bank counts every feature "
                                 "once; set exemplar_shape_weight to 1 as well.")

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def from_file(cls, path, **overrides) -> "FitConfig":
        """A config from a JSON file, with non-None overrides (e.g. from the command line)."""
        data = {}
        if path is not None:
            try:
                data = json.loads(Path(path).read_text())
            except FileNotFoundError:
                raise UserInputError(f"{path}: config file not found.") from None
            except json.JSONDecodeError as err:
                raise UserInputError(f"{path}: not valid JSON ({err}).") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserInputError(f"{path}: unknown setting(s) {', '.join(unknown)}; "
                                 f"known: {', '.join(sorted(known))}.")
        check_types(data, path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**data)
        config.validate()
        return config


_KINDS = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"),
          "str": ((str,), "a string"), "bool": ((bool,), "true or false"),
          "tuple": ((list, tuple), "a list")}


def check_types(data: dict, source) -> None:
    """Each setting of a FitConfig (from `source`, a file or the CLI) has its field's type:
    a UserInputError naming the setting and the type it needs otherwise."""
    hints = typing.get_type_hints(FitConfig)
    for name, value in data.items():
        if name not in hints:
            continue
        kinds = [k.__name__ for k in typing.get_args(hints[name]) if k is not type(None)] \
            or [getattr(hints[name], "__name__", str(hints[name]))]
        optional = type(None) in typing.get_args(hints[name])
        if value is None and optional:
            continue
        if name == "time_limit" and isinstance(value, str):
            continue  # "30m": parsed by parse_duration
        ok = any(isinstance(value, _KINDS[k][0]) and not (isinstance(value, bool) and k != "bool")
                 for k in kinds if k in _KINDS)
        if not ok:
            need = " or ".join(_KINDS[k][1] for k in kinds if k in _KINDS)
            raise UserInputError(f"{source}: \"{name}\" is {json.dumps(value)}; it must be {need}"
                                 + (" or null" if optional else "") + ".")
