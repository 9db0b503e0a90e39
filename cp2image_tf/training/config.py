"""FitConfig: everything that decides a training run; saved as config.json in the run folder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from tfrecords_tools.errors import UserInputError


@dataclass
class FitConfig:
    # Steps and batches (published: batch 104, one cell per treatment, up to 680,000 steps).
    steps: int = 20000
    batch_size: int = 104
    stratify: str = "auto"  # auto: treatment-balanced batches when the data has treatments
    scaling: str = "dataset"  # crop scaling, see tfrecords_tools.reader
    normalization: str = "standard"
    # Model.
    filters: int = 32
    noise_dim: int = 0
    # Published optimisation.
    decoder_lr: float = 0.01
    decoder_beta1: float = 0.9
    decoder_beta2: float = 0.999
    decoder_epsilon: float = 1e-7
    discriminator_lr: float = 0.001
    discriminator_momentum: float = 0.9
    weight_decay: float = 1e-4  # kernels multiplied by (1 - weight_decay) after every step
    perceptual_delay: float = 2500.0  # feature term k starts at delay * (k + 1)
    perceptual_slope: float = 2500.0  # and reaches full weight `slope` steps later
    # Running.
    strategy: str = "auto"
    seed: int = 0
    jit_compile: bool = True
    mixed_precision: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 500
    val_cells: int = 1024  # validation metrics on at most this many val cells
    log_every: int = 25
    grid_cells: int = 8

    def validate(self) -> None:
        positive = ("steps", "batch_size", "filters", "checkpoint_every", "validate_every",
                    "log_every", "val_cells", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserInputError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1.")
        choices = {"stratify": ("auto", "yes", "no"),
                   "strategy": ("auto", "default", "mirrored", "multiworker"),
                   "scaling": ("dataset", "dtype", "crop_max", "none"),
                   "normalization": ("standard", "robust", "none")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"--{name.replace('_', '-')} {getattr(self, name)}: choose one of "
                                     f"{', '.join(allowed)}.")
        if self.noise_dim < 0 or self.grid_cells < 0:
            raise UserInputError("--noise-dim and --grid-cells must not be negative.")

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
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**data)
        config.validate()
        return config
