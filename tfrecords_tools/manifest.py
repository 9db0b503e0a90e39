"""manifest.json: the one contract between a converted dataset and everything downstream.

It says what the records hold (feature names in order, crop shape, dtype and
channels), how to normalise them (training-split feature statistics and
per-channel intensity ranges), how they are split and sharded (with checksums),
and what was left out and why. It is written last: a folder without it is not a
complete dataset.
"""
from __future__ import annotations

import json
from pathlib import Path

from tfrecords_tools.errors import UserInputError
from tfrecords_tools.shards import check_shards, sha256_file  # noqa: F401 (sha256_file: re-exported)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def load_manifest(data_dir) -> dict:
    """The manifest of a converted dataset, checked for a schema this version reads."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).exists():
        raise UserInputError(f"{data_dir}: does not exist. Give the OUT_DIR of `cp2image-tf convert`.")
    if not Path(data_dir).is_dir():
        raise UserInputError(f"{data_dir}: is a file, not a dataset folder. Give the OUT_DIR of "
                             "`cp2image-tf convert`.")
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
    """Paths of the shards of one split (optionally one treatment), in manifest order; a
    missing shard or one of another size than the manifest's is a UserInputError naming it."""
    shards = [s for s in manifest["shards"]
              if s["split"] == split and (treatment is None or s["treatment"] == treatment)]
    check_shards(data_dir, {**manifest, "shards": shards})
    return [str(Path(data_dir) / s["file"]) for s in shards]


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
    check_shards(data_dir, manifest)
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
