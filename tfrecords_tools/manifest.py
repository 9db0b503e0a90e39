"""manifest.json: the one contract between a converted dataset and everything downstream.

It says what the records hold (feature names in order, crop shape, dtype and
channels), how to normalise them (training-split feature statistics and
per-channel intensity ranges), how they are split and sharded (with checksums),
and what was left out and why. It is written last: a folder without it is not a
complete dataset.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tfrecords_tools.errors import UserInputError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(data_dir) -> dict:
    """The manifest of a converted dataset, checked for a schema this version reads."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        hint = (" It holds unfinished conversion work: re-run the same convert command to finish it."
                if (Path(data_dir) / ".parts").is_dir() else
                " Create one with `cp2image-tf convert`.")
        raise UserInputError(f"{data_dir}: no {MANIFEST}, so not a complete dataset.{hint}")
    with open(path) as handle:
        try:
            manifest = json.load(handle)
        except json.JSONDecodeError as err:
            raise UserInputError(f"{path}: not valid JSON ({err}).") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserInputError(
            f"{path}: schema version {manifest.get('schema_version')!r}; this cp2image-tf reads "
            f"version {SCHEMA_VERSION}. Convert the data again with this version.")
    return manifest


def shard_files(manifest: dict, data_dir, split: str, treatment: str | None = None) -> list[str]:
    """Paths of the shards of one split (optionally one treatment), in manifest order."""
    return [str(Path(data_dir) / s["file"]) for s in manifest["shards"]
            if s["split"] == split and (treatment is None or s["treatment"] == treatment)]


def treatment_cells(manifest: dict, split: str) -> dict[str, int]:
    """{treatment: cells} of the treatments present in `split`, in the manifest's order."""
    return {t: n for t, n in manifest["counts"]["treatments"][split].items() if n}


def matching_manifest(data_dir, feature_names) -> dict:
    """The manifest of DATA_DIR, which must hold `feature_names` in that order (the model's)."""
    manifest = load_manifest(data_dir)
    if manifest["features"]["names"] != list(feature_names):
        raise UserInputError(
            f"{data_dir}: its {manifest['features']['count']} features are not the model's "
            f"{len(feature_names)} (in order): use the dataset the model was trained on.")
    return manifest


def measured_names(manifest: dict) -> list[str]:
    """The image each channel's features are named after (`measured_as`; the channel itself
    when the dataset does not say), in channel order."""
    pairs = manifest.get("measured_as") or {}
    return [pairs.get(ch, ch) for ch in manifest["channels"]]


def channel_label(manifest: dict, channel: str) -> str:
    """'rawGFP (measured as CorrGreen)' for a channel measured under another name, else the name."""
    measured = (manifest.get("measured_as") or {}).get(channel, channel)
    return channel if measured == channel else f"{channel} (measured as {measured})"
