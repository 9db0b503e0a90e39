"""Running work in parts, and resuming it: the one module that knows Dask.

convert, featurize and evaluate cut their work into parts: pure, idempotent functions that
write their own, deterministically named output under a temporary name and return a small
summary. This module runs a list of parts

* in this process (`scheduler=None, workers=1`),
* in a pool of spawned processes on this machine (`scheduler=None, workers=N`),
* on a LocalCluster of N worker processes on 127.0.0.1 (`scheduler="local", workers=N`), or
* on a running Dask scheduler (`scheduler="tcp://host:8786"`), e.g. one that dask-jobqueue's
  SLURMCluster or dask-kubernetes started,

with one progress bar over parts showing cells/s. Parts are submitted with pure, stable keys:
when a worker dies mid-part (kill -9, a node lost), the scheduler runs the part again
elsewhere, and since a part only renames its output into place when complete, the result is
the same. `parse_part("I/N")` reads the `--part` option of a Slurm array or Nextflow run.

The resumable-parts protocol convert and featurize share: each part writes its outputs and a
summary (with the plan's hash and each file's sha256) into OUT_DIR/.parts; a run finds the
parts already done with `verify_part`, `--part I/N` records N in .parts/partition.json
(`write_partition`), and finalizing names a part that is not done as `part_label` gives it.
Dask is imported only when a cluster is used.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from tfrecords_tools.atomic import write_json
from tfrecords_tools.errors import UserInputError
from tfrecords_tools.manifest import sha256_file

CONNECT_TIMEOUT = 3  # seconds to wait for a scheduler to answer
_DELAY_ENV = "CP2IMAGE_TF_PART_DELAY"  # test hook: seconds each part sleeps first (kill tests)
PARTS = ".parts"  # beside the outputs: the parts' files and summaries until finalized
PARTITION = "partition.json"


def parse_part(value) -> tuple[int, int] | None:
    """'2/8' -> (2, 8): the 2nd of 8 parts (1-based, as a Slurm array index + 1)."""
    if value is None or value == "":
        return None
    if isinstance(value, tuple):
        index, count = value
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
        if not match:
            raise UserInputError(f"--part {value}: write I/N, e.g. --part 3/10 for the third of "
                                 "ten parts (I counts from 1).")
        index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise UserInputError(f"--part {index}/{count}: N must be at least 1.")
    if not 1 <= index <= count:
        raise UserInputError(f"--part {index}/{count}: I must be between 1 and {count} "
                             "(with a Slurm array 0..N-1, pass $((SLURM_ARRAY_TASK_ID+1))/N).")
    return index, count


def select_part(items: list, part: tuple[int, int] | None) -> list:
    """The items of part I of N: a contiguous slice, the same in every process."""
    if part is None:
        return list(items)
    index, count = part
    lo, hi = (index - 1) * len(items) // count, index * len(items) // count
    return list(items[lo:hi])


def part_of(position: int, total: int, count: int) -> int:
    """The part (1-based) of `count` that select_part gives the item at `position` to."""
    for index in range(1, count + 1):
        if position < index * total // count:
            return index
    return count


def check_options(scheduler: str | None, workers: int, part=None, finalize: bool = False):
    """Clear errors for combinations that cannot work, before any work starts."""
    if workers is None or int(workers) < 1:
        raise UserInputError(f"--workers {workers}: must be at least 1.")
    if scheduler is not None and not str(scheduler).strip():
        raise UserInputError("--scheduler: give an address (tcp://host:8786) or 'local'.")
    if part is not None and finalize:
        raise UserInputError("--part and --finalize: run the parts first, then --finalize "
                             "once, without --part.")
    if scheduler not in (None, "local") and int(workers) != 1:
        raise UserInputError(f"--workers {workers} with --scheduler {scheduler}: the cluster "
                             "has its own workers; --workers counts LocalCluster processes "
                             "(with --scheduler local) or local processes (without --scheduler).")


def write_partition(parts_dir: Path, count: int, items: int) -> None:
    """Record that `items` parts run as `count` groups (--part I/count)."""
    write_json(Path(parts_dir) / PARTITION, {"parts": count, "of": items})


def part_label(position: int, total: int, parts_dir: Path) -> str | None:
    """'I/N', the --part that holds the item at `position` of `total`, when the parts ran as
    N groups (partition.json says so); else None."""
    try:
        count = int(json.loads((Path(parts_dir) / PARTITION).read_text())["parts"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"{part_of(position, total, count)}/{count}"


def verify_part(summary_path: Path, plan_hash: str, hash_key: str,
                checksums: Callable[[dict], list]) -> tuple[dict | None, str | None]:
    """(summary, None) for a part an earlier run completed: its summary is there, made for this
    plan (summary[hash_key] == plan_hash), and every file `checksums(summary)` lists as
    (path, recorded sha256) matches; else (None, what is wrong with it)."""
    summary_path = Path(summary_path)
    if not summary_path.is_file():
        return None, f"not done (no summary in {PARTS})"
    try:
        summary = json.loads(summary_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"its summary {summary_path.name} is not valid JSON (corrupt)"
    if summary.get(hash_key) != plan_hash:
        return None, "done for other inputs or options"
    for path, recorded in checksums(summary):
        if not Path(path).is_file() or recorded != sha256_file(path):
            return None, f"{Path(path).name} is missing or does not match its checksum (corrupt)"
    return summary, None


@contextlib.contextmanager
def client_for(scheduler: str | None, workers: int, client=None, finalize: bool = False,
               quiet: bool = False):
    """The Dask client the parts run on: `client` if given; else, with a scheduler, a new one,
    connected before any work so that a wrong address fails in seconds; None without a
    scheduler or when only finalizing."""
    if scheduler is None or client is not None or finalize:
        yield client
        return
    with dask_client(scheduler, workers, quiet=quiet) as opened:
        yield opened


@contextlib.contextmanager
def dask_client(scheduler: str, workers: int = 1, quiet: bool = False):
    """A distributed.Client: a new LocalCluster of `workers` processes on 127.0.0.1
    (scheduler 'local'), or a connection to a running scheduler at `scheduler`."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UserInputError("--scheduler needs Dask distributed: pip install "
                             "'dask[distributed]'.") from None
    import logging

    # The scheduler's and workers' INFO lines (and a lost worker's warnings) are not for users.
    for name in ("distributed", "distributed.scheduler", "distributed.nanny",
                 "distributed.worker", "distributed.core", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if scheduler == "local":
        import dask

        # Measuring allocates and frees large arrays all the time. Two Dask defaults slow it
        # down in a worker: the statistical profiler (a stack sample every 10 ms, under the
        # GIL), and MALLOC_TRIM_THRESHOLD_, which also stops glibc adapting its mmap threshold
        # (every large array becomes fresh, zeroed pages). A LocalCluster does without both.
        with dask.config.set({"distributed.worker.profile.enabled": False,
                              "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(host="127.0.0.1", n_workers=int(workers),
                                   threads_per_worker=1, processes=True,
                                   dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        with cluster, Client(cluster) as client:
            if not quiet:
                print(f"Dask LocalCluster: {workers} worker process(es); dashboard "
                      f"{client.dashboard_link}", file=sys.stderr)
            yield client
        return
    address = str(scheduler)
    existing = _open_client(address)
    if existing is not None:
        # A notebook's own client of that scheduler: use it. A second client of one scheduler in
        # one process can see its futures bound to the other's event loop (RuntimeError).
        yield existing
        return
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserInputError(f"--scheduler {address}: no Dask scheduler answered within "
                             f"{CONNECT_TIMEOUT} s ({reason[:120]}). Start one (dask scheduler) "
                             "or check the address and port.") from None
    with client:
        if not quiet:
            print(f"Dask scheduler {address}: {len(client.scheduler_info()['workers'])} "
                  f"worker(s); dashboard {client.dashboard_link}", file=sys.stderr)
        yield client


def _open_client(address: str):
    """This process's current Dask client if it is connected to `address`, else None."""
    from distributed import Client

    try:
        client = Client.current()
    except ValueError:  # no client in this process
        return None
    if client.status != "running" or client.scheduler is None:
        return None
    return client if client.scheduler.address == address else None


def _call(fn: Callable, task):
    """One part, as a worker runs it (with the test hook's delay, if set)."""
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    return fn(task)


def run_parts(fn: Callable, tasks: list, keys: list[str], cells: Callable[[object], int],
              scheduler: str | None = None, workers: int = 1, progress: bool = True,
              desc: str = "parts", unit: str = "part", client=None,
              total_cells: int | None = None) -> Iterator[tuple[int, object]]:
    """Run fn(task) for every task; yield (index, result) as parts complete (any order).

    `keys`: a stable name per part (becomes the Dask key, so resubmitting the same part is the
    same task); `cells(result)`: the cells a result holds, for the cells/s on the bar.
    `client`: an open distributed.Client to use instead of `scheduler`.
    """
    if len(set(keys)) != len(keys):
        raise ValueError("part keys must be distinct")
    if not tasks:
        return
    with contextlib.ExitStack() as stack:
        if client is None and scheduler is not None:
            client = stack.enter_context(dask_client(scheduler, workers, not progress))
        bar = _Bar(len(tasks), cells, progress, desc, unit, total_cells)
        stack.callback(bar.close)
        if client is not None:
            yield from _run_dask(client, fn, tasks, keys, bar.advance)
            return
        workers = max(1, min(int(workers), len(tasks)))
        if workers == 1:
            for k, task in enumerate(tasks):
                result = _call(fn, task)
                bar.advance(result)
                yield k, result
            return
        context = multiprocessing.get_context("spawn")  # never fork a TensorFlow process
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(_call, fn, task): k for k, task in enumerate(tasks)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    result = future.result()
                    bar.advance(result)
                    yield futures[future], result
            finally:
                for future in futures:
                    future.cancel()


class _Bar:
    """One tqdm bar over parts, its postfix the cells done and cells/s since the start."""

    def __init__(self, parts: int, cells, progress: bool, desc: str, unit: str, total_cells):
        from tqdm import tqdm

        self.bar = tqdm(total=parts, unit=unit, desc=desc, disable=not progress,
                        file=sys.stderr)
        self.cells, self.total = cells, total_cells
        self.start, self.done = time.perf_counter(), 0

    def advance(self, result):
        self.done += int(self.cells(result))
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        shown = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        self.bar.set_postfix_str(f"{shown} cells, {rate:.0f} cells/s", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


def _run_dask(client, fn, tasks, keys, advance):
    from distributed import as_completed

    # pure keys: the same part is the same task; a lost worker's parts run again elsewhere.
    futures = [client.submit(_call, fn, task, key=key, pure=True, retries=0)
               for task, key in zip(tasks, keys)]
    index = {f.key: k for k, f in enumerate(futures)}
    try:
        for future in as_completed(futures):
            result = future.result()  # re-raises the part's own exception (e.g. UserInputError)
            advance(result)
            yield index[future.key], result
            future.release()
    finally:
        client.cancel([f for f in futures if not f.done()])
