"""The run folder: what fit writes, what a rerun checks and resumes from, and the settings of
runs written by earlier versions.

    config.json        the FitConfig in force (sectioned; older runs' are flat: upgrade_config)
    manifest.json      the dataset's manifest (features, normalisation, channels)
    checkpoints/       the latest checkpoints (tf.train.CheckpointManager)
    best/              the best validated checkpoint, best.json
    history.csv        losses, schedule weights, images/s, validation metrics
    measurer.json, judge.json   the measurer's phase and the judge rounds (exemplar model)
    logs/              TensorBoard
    samples/           real vs generated validation cells, step_<N>.png and latest.png
"""
from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
from pathlib import Path

from cp2image_tf.training.config import SECTION_TYPES, SECTIONS, FitConfig, check_types
from tfrecords_tools.errors import UserInputError

# The keys a checkpoint's networks are built with: a run resumes only with the same ones.
MODEL_KEYS = ("model", "noise_dim")
SECTION_MODEL_KEYS = ("filters",)
# The exemplar model's keys its network or bank is built with (exemplar section), and the
# value a config.json written before the key existed meant.
EXEMPLAR_KEYS_BEFORE = {"views": False, "shape_weight": 1.0, "warp": False}
# Flat config.json keys (before the sections) -> (section, key) ...
FLAT_KEYS = {
    "decoder_beta1": ("published", "decoder_beta1"), "decoder_beta2": ("published", "decoder_beta2"),
    "decoder_epsilon": ("published", "decoder_epsilon"),
    "discriminator_momentum": ("published", "discriminator_momentum"),
    "weight_decay": ("published", "weight_decay"),
    "perceptual_delay": ("published", "perceptual_delay"),
    "perceptual_slope": ("published", "perceptual_slope"),
    "exemplars": ("exemplar", "bank"), "exemplar_top_k": ("exemplar", "top_k"),
    "exemplar_views": ("exemplar", "views"), "exemplar_shape_weight": ("exemplar", "shape_weight"),
    "exemplar_warp": ("exemplar", "warp"), "anchor_weight": ("exemplar", "anchor_weight"),
    "relative_consistency": ("exemplar", "relative_consistency"),
    "identity_share": ("exemplar", "identity_share"),
    "identity_weight": ("exemplar", "identity_weight"),
    "measurer_steps": ("measurer", "steps"), "measurer_share": ("measurer", "share"),
    "measurer_lr": ("measurer", "lr"), "measurer_check_every": ("measurer", "check_every"),
    "measurer_patience": ("measurer", "patience"),
    "judge_rounds": ("judge", "rounds"), "judge_every": ("judge", "every"),
    "judge_cells": ("judge", "cells"), "judge_steps": ("judge", "steps"),
    "judge_lr": ("judge", "lr"), "judge_reliability": ("judge", "reliability"),
}
# ... and the flat keys whose section is the chosen model's (the name there, by model; a
# model without the key never read it).
FLAT_MODEL_KEYS = {
    "filters": "filters", "decoder_lr": "decoder_lr", "jit_compile": "jit_compile",
    "discriminator_lr": {"published": "discriminator_lr", None: "critic_lr"},
    "pixel_weight": "pixel_weight", "log_view": "log_view",
    "reliability_weighted": "reliability_weighted", "measurer_views": "measurer_views",
    "consistency_weight": "consistency_weight", "consistency_ramp": "consistency_ramp",
    "adversarial_weight": "adversarial_weight", "matching_weight": "matching_weight",
    "adversarial_ramp": "adversarial_ramp",
}
# Settings that are no more, with the value that left them without effect: a config with that
# value loads; another is refused.
REMOVED = {"pixel_pool": 1, "measurer_jitter": 0, "pixel_noise": False}
# The exemplar model trains without a pixel loss: a flat config's pixel_weight 0 loads.
REMOVED_BY_MODEL = {("exemplar", "pixel_weight"): 0.0}


def upgrade_config(data: dict, source="FitConfig", written_by_fit: bool = False) -> dict:
    """A config's JSON object as FitConfig takes it: flat keys (config.json before the
    sections) moved into their sections, unknown keys and removed experiments refused.

    written_by_fit: the object is a run folder's config.json, so a key it lacks takes the
    value it meant when written: no "model" meant the published model; an exemplar run
    without the exemplar section's views, shape_weight or warp was trained without them."""
    top = {f.name for f in FitConfig.__dataclass_fields__.values()} - set(SECTIONS)
    out = {k: v for k, v in data.items() if k in top}
    if written_by_fit and "model" not in data:
        out["model"] = "published"
    model = out.get("model", "exemplar")
    sections = {}
    for name in SECTIONS:
        if name in data:
            if not isinstance(data[name], dict):
                raise UserInputError(f"{source}: \"{name}\" is {json.dumps(data[name])}; it must "
                                     "be an object of settings.")
            sections[name] = dict(data[name])
    for key, value in data.items():
        if key in top or key in SECTIONS:
            continue
        if key in REMOVED or (model, key) in REMOVED_BY_MODEL:
            check_removed(key, value, REMOVED.get(key, REMOVED_BY_MODEL.get((model, key))), source)
        elif key in FLAT_KEYS:
            if value is None:  # null: the default, as before the sections
                continue
            section, name = FLAT_KEYS[key]
            sections.setdefault(section, {}).setdefault(name, value)
        elif key in FLAT_MODEL_KEYS and model in SECTION_TYPES:
            name = FLAT_MODEL_KEYS[key]
            name = name.get(model, name.get(None)) if isinstance(name, dict) else name
            if value is not None and name in SECTION_TYPES[model].__dataclass_fields__:
                sections.setdefault(model, {}).setdefault(name, value)
        elif key not in FLAT_MODEL_KEYS:
            raise UserInputError(f"{source}: unknown setting {key}; known: "
                                 f"{', '.join(sorted(top | set(SECTIONS)))} (and in the sections: "
                                 + "; ".join(f"{s}: {', '.join(SECTION_TYPES[s].__dataclass_fields__)}"
                                             for s in SECTIONS) + ").")
    if (model != "exemplar" and sections.get("judge", {}).get("rounds")
            and "judge_rounds" in data and not written_by_fit):
        raise UserInputError(f"{source}: judge_rounds {data['judge_rounds']}: judge rounds measure "
                             f"the exemplar model's edits; --model {model} makes none (set "
                             "judge_rounds to 0).")
    if written_by_fit and model == "exemplar":
        for key, before in EXEMPLAR_KEYS_BEFORE.items():
            sections.setdefault("exemplar", {}).setdefault(key, before)
    for name, settings in sections.items():
        known = SECTION_TYPES[name].__dataclass_fields__
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise UserInputError(f"{source}: unknown setting(s) {', '.join(unknown)} in "
                                 f"\"{name}\"; known: {', '.join(known)}.")
    out.update(sections)
    return out


def check_removed(key: str, value, inert, source) -> None:
    """A removed experiment's key: fine at the value that left it without effect."""
    if value == inert or value is None:
        return
    raise UserInputError(f"{source}: {key} {json.dumps(value)}: this experiment is no longer part "
                         f"of cp2image-tf (it was not kept; docs/design/). Remove {key} from the "
                         f"config, or set it to {json.dumps(inert)}.")


def config_from_dict(data, source="FitConfig", written_by_fit: bool = False,
                     **overrides) -> FitConfig:
    """A FitConfig from its JSON object (sectioned, or flat as before the sections), with
    non-None top-level overrides (e.g. from the command line); validated."""
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", type(None): "null", bool: "true or false",
                int: "a number", float: "a number"}.get(type(data), "no settings")
        raise UserInputError(f"{source}: holds {kind}; a config file holds one JSON object of "
                             'settings, e.g. {"model": "exemplar", "steps": 20000}.')
    data = upgrade_config(data, source, written_by_fit)
    check_types({k: v for k, v in data.items() if k not in SECTIONS}, source)
    for name in SECTIONS:
        if name in data:
            check_types(data[name], source, name)
    data.update({k: v for k, v in overrides.items() if v is not None})
    config = FitConfig(**data)
    config.validate()
    return config


def read_config(path, written_by_fit: bool = False, **overrides) -> FitConfig:
    """A FitConfig from a JSON file (None: the defaults), with non-None overrides."""
    data = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserInputError(f"{path}: config file not found.") from None
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}: not valid JSON ({err}).") from None
    return config_from_dict(data, path if path is not None else "FitConfig", written_by_fit,
                            **overrides)


def saved_config(run_dir) -> FitConfig:
    """The FitConfig a run folder was trained with (its config.json, flat or sectioned)."""
    return read_config(Path(run_dir) / "config.json", written_by_fit=True)


def read_json(path: Path, what: str = "the run folder is damaged. Use a new RUN_DIR."):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserInputError(f"{path}: not valid JSON ({err}); {what}") from None


def data_signature(manifest: dict) -> dict:
    """What a trained model is tied to: feature names in order, channels, crop shape."""
    crop = manifest["crop"]
    return {"features": manifest["features"]["names"], "channels": manifest["channels"],
            "crop": [crop["height"], crop["width"], crop["channels"]]}

def shard_checksums(manifest: dict) -> list:
    """The dataset's identity: its shards' names and SHA-256 checksums."""
    return sorted((s["file"], s.get("sha256")) for s in manifest["shards"])


def check_run_dir(run_dir: Path, manifest: dict, config, new_data: bool = False) -> None:
    """An existing run must have been trained on data of the same shape and the same model,
    and (unless new_data) on the same dataset: the same shard checksums."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"{run_dir}: exists and is a file; RUN_DIR is the folder fit writes "
                             "its checkpoints to. Give a new RUN_DIR.")
    saved = run_dir / "manifest.json"
    if saved.is_file():
        check_same_data(run_dir, read_json(saved), manifest, new_data)
    saved_config = run_dir / "config.json"
    if saved_config.is_file():
        old = read_json(saved_config)
        if isinstance(old, dict):
            check_same_model(run_dir, upgrade_config(old, saved_config, written_by_fit=True),
                             config)


# What fit writes into an existing run folder: the folders it adds files to and the files it
# rewrites or appends to in place.
WRITTEN_FOLDERS = (".", "checkpoints", "best", "logs", "samples")
WRITTEN_FILES = ("config.json", "manifest.json", "history.csv", "best/best.json",
                 "measurer.json", "judge.json")


def check_writable(run_dir: Path) -> None:
    """fit can write RUN_DIR: refused before anything is written when it cannot (a read-only
    disk or folder, a file where a folder must be). A new RUN_DIR is made with its missing
    parents, so its nearest existing parent must take a new entry."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{run_dir}: {existing} is a file, so RUN_DIR cannot be made under "
                             "it. Give a RUN_DIR under a folder.")
    folders = ([run_dir / name for name in WRITTEN_FOLDERS if (run_dir / name).is_dir()]
               if existing == run_dir else [existing])
    for folder in folders:
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            raise UserInputError(f"{run_dir}: cannot write in {folder} ({err.strerror}). Make it "
                                 "writable, or give a RUN_DIR on a writable disk.") from None
    for name in WRITTEN_FILES:
        path = run_dir / name
        if path.is_file() and not os.access(path, os.W_OK):
            raise UserInputError(f"{run_dir}: cannot write {path} (read-only). Make it "
                                 "writable, or give a new RUN_DIR.")


def check_same_data(run_dir: Path, saved_manifest: dict, manifest: dict, new_data: bool) -> None:
    old, new = data_signature(saved_manifest), data_signature(manifest)
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


def check_same_model(run_dir: Path, old: dict, config) -> None:
    """The saved config (upgraded) builds the network `config` builds."""
    if config.model == "exemplar" and old.get("model") == "exemplar":
        was = old.get("exemplar", {})
        differ = {key: was[key] for key in EXEMPLAR_KEYS_BEFORE
                  if key in was and was[key] != getattr(config.exemplar, key)}
        if differ:
            raise UserInputError(
                f"{run_dir}: was trained with "
                + ", ".join(f"exemplar.{key}={value}" for key, value in differ.items()) + ", now "
                + ", ".join(f"{getattr(config.exemplar, key)}" for key in differ)
                + f"; resume it with {json.dumps({'exemplar': differ})} in --config (its network "
                "or bank differs otherwise), or use a new RUN_DIR.")
    for key in MODEL_KEYS:
        if key in old and old[key] != getattr(config, key):
            raise UserInputError(
                f"{run_dir}: was trained with {key}={old[key]}, now {getattr(config, key)}; "
                "the checkpoint cannot be resumed with another model. Use a new RUN_DIR.")
    was = old.get(config.model, {})
    for key in SECTION_MODEL_KEYS:
        if key in was and was[key] != getattr(config.section, key):
            raise UserInputError(
                f"{run_dir}: was trained with {config.model}.{key}={was[key]}, now "
                f"{getattr(config.section, key)}; the checkpoint cannot be resumed with another "
                "network. Use a new RUN_DIR.")


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

def check_steps_left(run_dir: Path, resume, config) -> None:
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
