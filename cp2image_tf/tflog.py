"""TensorFlow's C++ log lines that are known to be harmless, kept from the user around the
calls that print them, never globally: every other line those calls print still shows.

- "oneDNN supports DT_HALF only on platforms with AVX-512": printed once per process, at the
  first float16 operation (the exemplar bank keeps its crops in float16); TensorFlow then
  uses its Eigen kernels, with the same results.
- "remapper failed: INVALID_ARGUMENT: Mutation::Apply error": grappler's remapper declining
  to fuse a convolution, bias and leaky ReLU whose gradient another node reads (the measurer's
  and critic's steps); the graph then runs unfused, with the same results.

TensorFlow's own log level cannot be changed once it has started, so these lines are taken
out of the process's standard error (file descriptor 2) while the call runs.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading

HARMLESS = ("oneDNN supports DT_HALF only on platforms with AVX-512",
            "remapper failed: INVALID_ARGUMENT: Mutation::Apply error")


@contextlib.contextmanager
def without_harmless_lines(harmless=HARMLESS):
    """Run the block with the lines naming any of `harmless` dropped from standard error;
    everything else it writes there is written after it, in order."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no standard error to filter
        yield
        return
    read, write = os.pipe()
    chunks = []
    reader = threading.Thread(target=_drain, args=(read, chunks), daemon=True)
    reader.start()
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        reader.join(timeout=10)
        os.close(read)
        text = b"".join(chunks).decode("utf-8", errors="replace")
        kept = "".join(line for line in text.splitlines(keepends=True)
                       if not any(h in line for h in harmless))
        if kept:
            sys.stderr.write(kept)
            sys.stderr.flush()


def _drain(fd: int, chunks: list) -> None:
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        chunks.append(chunk)


def quiet_first_call(fn):
    """`fn` whose first call (where a tf.function is traced and grappler optimises it) runs
    without_harmless_lines."""
    called = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if called:
            return fn(*args, **kwargs)
        called.append(True)
        with without_harmless_lines():
            return fn(*args, **kwargs)

    return wrapper
