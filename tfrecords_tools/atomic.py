"""Writing under a temporary name and renaming when complete: a reader never sees half a file
or half a folder, and an interrupted run leaves only a hidden .partial to clean up."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tfrecords_tools.errors import UserInputError


class OutputFolder:
    """Writes into a temporary sibling folder; `commit` renames it to OUT_DIR."""

    def __init__(self, out_dir, overwrite: bool):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserInputError(f"{self.out_dir}: exists and is not a folder.")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not overwrite:
            raise UserInputError(f"{self.out_dir}: exists and is not empty; use --overwrite to "
                                 "replace it or give a new OUT_DIR.")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-",
                                          dir=self.out_dir.parent))

    def commit(self) -> Path:
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.path.rename(self.out_dir)
        return self.out_dir

    def abandon(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
