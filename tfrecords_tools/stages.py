"""Seconds spent in each stage of convert (benchmarks/bench_convert.py's stage table) and of
evaluate (report.json's timing).

A part (one shard) times its own stages and returns them in its summary; `convert(...,
timings={})` adds up the parts' figures with its own (planning, statistics, finishing). Stages
are timed per field or per batch of records, never per record, so timing costs nothing that
shows. See docs/results/2026-12-06-convert-speed.md for what the stages cost.
"""
from __future__ import annotations

import contextlib
import time

# In the order a cell meets them; "rows" is a part reading its cells' rows of the plan.
STAGES = ("plan", "rows", "read", "checksum", "scale", "crop", "histogram", "serialize", "compress",
          "write", "statistics", "finish")
# Stages a thread runs beside the others (convert's _ReadAhead: the next field's files read and
# hashed): their seconds are not part of the wall-clock total the STAGES add up to.
OVERLAPPED = ("read-ahead",)


class StageTimer:
    """Seconds per stage name, added up over the `with timer.stage(name):` blocks: a stage's own
    time, a stage timed inside it taken out, so that no second counts twice (evaluate nests its
    stages; convert's do not nest). One thread's: another thread keeps a timer of its own."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._inside: list[float] = []  # per open stage, the seconds of the stages inside it

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self._inside.append(0.0)
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.add({name: took - self._inside.pop()})
            if self._inside:
                self._inside[-1] += took

    def add(self, seconds: dict) -> None:
        for name, value in (seconds or {}).items():
            self.seconds[name] = self.seconds.get(name, 0.0) + float(value)

    def ordered(self) -> dict:
        """The stages in STAGES order (others after them), rounded to microseconds."""
        names = [s for s in STAGES if s in self.seconds] + \
            [s for s in self.seconds if s not in STAGES]
        return {name: round(self.seconds[name], 6) for name in names}

