"""Writing under a temporary name and renaming when complete, the one way this project writes
what others read: a reader never sees half a file or half a folder, and an interrupted run
leaves only a hidden *.partial to clean up."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import tempfile
import uuid
from pathlib import Path

from tfrecords_tools.errors import UserInputError


def partial_path(path) -> Path:
    """A hidden temporary name beside `path`, unique to this attempt (process and a random
    tag): when Dask reruns a part whose first attempt still runs (a worker cut off, not dead),
    the two never write into one file; each renames a complete file into place."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


# A temporary folder's name: .<name>.partial-<pid>@<host>.<random>; the form before the pid
# and host were in it, .<name>.partial-<random>, counts as stale after STALE_SECONDS.
_PARTIAL_FOLDER = re.compile(r"^\.(?P<name>.+)\.partial-(?:(?P<pid>\d+)@(?P<host>.+)\.)?[^.@]+$")
STALE_SECONDS = 3600


def partial_folder(parent, name: str) -> Path:
    """A new hidden temporary folder beside `parent`/`name`, named after this process and
    host so that a later run can tell whether its writer still lives."""
    prefix = f".{name}.partial-{os.getpid()}@{socket.gethostname()}."
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(parent, name: str | None = None) -> list[Path]:
    """Remove the temporary folders in `parent` (of `name`, or all) that killed runs left:
    their process is gone from this host (or, of the older unnamed form, an hour has passed).
    Folders of live processes and of other hosts are left alone. Returns what was removed."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    host = socket.gethostname()
    for path in parent.iterdir():
        match = _PARTIAL_FOLDER.match(path.name)
        if not match or not path.is_dir() or (name is not None and match["name"] != name):
            continue
        if match["pid"] is not None:
            stale = match["host"] == host and not pid_alive(int(match["pid"]))
        else:
            try:
                stale = time.time() - path.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def write_json(path, data, sync: bool = True, **options) -> None:
    """Write JSON (indent 1, NaN refused unless `options` say otherwise) under a temporary
    name, then rename; `sync` flushes it to disk first."""
    path = Path(path)
    tmp = partial_path(path)
    with open(tmp, "w") as handle:
        json.dump(data, handle, **{"indent": 1, "allow_nan": False, **options})
        handle.write("\n")
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def replace_folder(new: Path, out_dir: Path) -> Path:
    """Move a finished folder into place, setting an old one aside only at the last moment."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    new.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)
    return out_dir


class OutputFolder:
    """Writes into a temporary sibling folder (`path`); `commit` puts it in OUT_DIR's place.
    Made first, it fails early on an occupied OUT_DIR; `with folder:` then commits when the
    block ends and abandons the folder on any error."""

    def __init__(self, out_dir, overwrite: bool):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserInputError(f"{self.out_dir}: exists and is a file; OUT_DIR must be a "
                                 "folder. Give a new OUT_DIR.")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not overwrite:
            raise UserInputError(f"{self.out_dir}: exists and is not empty; use --overwrite to "
                                 "replace it or give a new OUT_DIR.")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.out_dir.parent, self.out_dir.name)
        self.path = partial_folder(self.out_dir.parent, self.out_dir.name)

    def commit(self) -> Path:
        return replace_folder(self.path, self.out_dir)

    def abandon(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.commit()
        else:
            self.abandon()
