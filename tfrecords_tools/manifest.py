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
import os
import uuid
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


def partial_path(path) -> Path:
    """A hidden temporary name beside `path`, unique to this attempt (process and a random
    tag): when Dask reruns a part whose first attempt still runs (a worker cut off, not dead),
    the two never write into one file; each renames a complete file into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def write_json_atomic(path, data) -> None:
    """Write JSON under a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    tmp = partial_path(path)
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, allow_nan=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
