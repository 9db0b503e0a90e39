"""What every command shares: running a library call with one-line errors and warnings,
splitting comma lists, and starting TensorFlow quietly.

The rule for imports in cli/: TensorFlow, Dask and cp-measure take seconds to import, so a
command imports the library modules that pull them in inside its function body; `--help` and
argument errors then answer at once. Everything else is imported at the top of the module.
"""
import contextlib
import os
import re
import sys
import tempfile
import warnings

import click

from tfrecords_tools.errors import UserInputError

# TensorFlow's C++ start-up chatter (no CUDA here, oneDNN notes) is not for users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# What TensorFlow's native start-up writes straight to file descriptor 2, before any logging
# setting applies, on a machine without an NVIDIA driver: CUDA probing ("Could not find cuda
# drivers", "failed call to cuInit: ... CUDA error") and CPU-instruction notes. Alarming to a
# user of a CPU machine, and nothing to act on. On every machine, the oneDNN banner ("oneDNN
# custom operations are on ..."): held back, not switched off, as TF_ENABLE_ONEDNN_OPTS=0 would
# change the numerics.
_ONEDNN_BANNER = r"port\.cc.*oneDNN custom operations are on"
_STARTUP_NOISE = re.compile(r"All log messages before absl::InitializeLog|cudart_stub\.cc|"
                            r"cuda_platform\.cc.*cuInit|cpu_feature_guard\.cc|"
                            r"To enable the following instructions|" + _ONEDNN_BANNER)


def start_tensorflow() -> None:
    """Import TensorFlow and probe its devices with that start-up noise held back (the CUDA
    lines only on machines without an NVIDIA driver, where they mean nothing); other lines pass
    through."""
    if "tensorflow" in sys.modules:
        return
    gpu = os.path.exists("/proc/driver/nvidia/version")
    with _filtered_stderr(re.compile(_ONEDNN_BANNER) if gpu else _STARTUP_NOISE):
        import tensorflow as tf

        tf.config.list_physical_devices()
        tf.config.list_physical_devices("GPU")


@contextlib.contextmanager
def _filtered_stderr(pattern):
    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests): nothing to filter
        yield
        return
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not pattern.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, UserWarning) and not issubclass(category, DeprecationWarning):
        click.echo(f"Warning: {message}", err=True)


def call(fn, *args, **kwargs):
    """Run a library function, turning a UserInputError into a one-line CLI error and the
    library's warnings into one-line 'Warning: ...' messages on stderr."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = _show_warning
            return fn(*args, **kwargs)
    except UserInputError as err:
        raise click.ClickException(str(err)) from None


def parse_list(value):
    """'A,B, C' -> ['A', 'B', 'C'] (None stays None)."""
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def echo_outputs(summary, extra=""):
    """The line generate, traverse and predict end with: where the montage went."""
    click.echo(f"Wrote {summary['out_dir']}/{summary['montage']}{extra}.")


CHECKPOINTS = ("best", "latest")


def checkpoint_option(help: str = "For a run folder MODEL."):
    """--checkpoint: which checkpoint of a run folder to use."""
    return click.option("--checkpoint", type=click.Choice(CHECKPOINTS), default="best",
                        show_default=True, help=help)


# The options every command that draws from a PROFILES table takes.
missing_option = click.option(
    "--missing", type=click.Choice(["error", "median"]), default="error", show_default=True,
    help="Features PROFILES lacks: an error, or the training medians.")
