"""Checking a dataset's shards against its manifest before (and while) reading them.

Three levels, cheapest first:
  "size"    every shard exists and has the manifest's byte count (a stat per shard);
  "count"   also walks each uncompressed shard's record headers (a seek per record, no
            data read): the records tile the file and number the manifest's count;
  "sha256"  also the full checksum of every shard (reads everything).
A damaged shard is a UserInputError naming it and pointing to `inspect --verify`.

A shard damaged in place (same size, bytes changed) passes the first two and is found only
when TensorFlow reads the bad record: `named_read_errors` turns that DataLossError into the
same one line, naming the shard(s) whose checksum differs.
"""
from __future__ import annotations

import contextlib
import hashlib
import struct
from pathlib import Path

from tfrecords_tools.errors import UserInputError

LEVELS = ("size", "count", "sha256")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_hint(data_dir) -> str:
    return (f"Run `cp2image-tf inspect {data_dir} --verify` to check every shard, and convert "
            "the data again if it finds damage.")


def count_records(path) -> int:
    """Records in an uncompressed TFRecord file from its length headers; ValueError when the
    headers do not tile the file (truncated or overwritten)."""
    path = Path(path)
    size = path.stat().st_size
    count, offset = 0, 0
    with open(path, "rb") as handle:
        while offset < size:
            header = handle.read(8)
            if len(header) < 8:
                raise ValueError(f"a record header is cut off at byte {offset}")
            (length,) = struct.unpack("<Q", header)
            offset += 8 + 4 + length + 4
            if offset > size:
                raise ValueError(f"record {count} runs past the end of the file: cut short or overwritten")
            handle.seek(offset)
            count += 1
    return count


def shard_problem(data_dir, shard: dict, compression: str = "", level: str = "size") -> str | None:
    """What is wrong with one shard at `level` (None when nothing is)."""
    path = Path(data_dir) / shard["file"]
    if not path.is_file():
        return f"{path}: shard missing"
    size = path.stat().st_size
    if "bytes" in shard and size != shard["bytes"]:
        return (f"{path}: {size} bytes, manifest.json says {shard['bytes']} (truncated or "
                "replaced)")
    if level in ("count", "sha256") and not compression and "records" in shard:
        try:
            count = count_records(path)
        except ValueError as err:
            return f"{path}: not a readable TFRecord file ({err})"
        if count != shard["records"]:
            return f"{path}: {count} records, manifest.json says {shard['records']} (replaced)"
    if level == "sha256" and "sha256" in shard and sha256_file(path) != shard["sha256"]:
        return f"{path}: checksum differs from manifest.json (changed or corrupt)"
    return None


def shard_problems(data_dir, manifest: dict, splits=None, level: str = "size") -> list[str]:
    """Problems of the shards of `splits` (all when None) at `level`."""
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: one of {LEVELS}")
    compression = manifest.get("compression", "")
    problems = []
    for shard in manifest["shards"]:
        if splits is None or shard["split"] in splits:
            problem = shard_problem(data_dir, shard, compression, level)
            if problem:
                problems.append(problem)
    return problems


def check_shards(data_dir, manifest: dict, splits=None, level: str = "size") -> None:
    """Raise one UserInputError naming the first damaged shard (and how many more)."""
    problems = shard_problems(data_dir, manifest, splits, level)
    if problems:
        more = f" ({len(problems) - 1} more damaged shard(s))" if len(problems) > 1 else ""
        raise UserInputError(f"{problems[0]}{more}. {verify_hint(data_dir)}")


def is_read_error(err: BaseException) -> bool:
    """A TensorFlow error from reading damaged or missing shards."""
    return type(err).__name__ in ("DataLossError", "NotFoundError") and \
        type(err).__module__.startswith("tensorflow")


def read_error(data_dir, manifest: dict, err: BaseException) -> UserInputError:
    """The one-line error for a TensorFlow read error: names the shard(s) that differ from the
    manifest (found by checksum), else TensorFlow's own first line."""
    problems = shard_problems(data_dir, manifest, level="sha256")
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    detail = detail.split("}} ")[-1].split(" [Op:")[0]
    if problems:
        more = f" ({len(problems) - 1} more damaged shard(s))" if len(problems) > 1 else ""
        return UserInputError(f"{problems[0]}{more}; reading it failed ({detail}). "
                              f"{verify_hint(data_dir)}")
    return UserInputError(f"{data_dir}: reading a shard failed ({detail}). {verify_hint(data_dir)}")


@contextlib.contextmanager
def named_read_errors(data_dir, manifest: dict):
    """Turn TensorFlow's DataLossError / NotFoundError while reading DATA_DIR into a
    UserInputError naming the damaged shard."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only TensorFlow's read errors are translated
        if not is_read_error(err):
            raise
        raise read_error(data_dir, manifest, err) from None
