"""The `cp2image-tf` command: a thin Click layer over the library.

Each command parses options, calls one library function and reports. Heavy
imports (TensorFlow, cp-measure) happen inside the commands so that `--help`
and argument errors stay fast.
"""
import contextlib
import os
import re
import sys
import tempfile
import warnings

import click

from tfrecords_tools._version import __version__
from tfrecords_tools.errors import UserInputError

# TensorFlow's C++ start-up chatter (no CUDA here, oneDNN notes) is not for users.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# What TensorFlow's native start-up writes straight to file descriptor 2, before any logging
# setting applies, on a machine without an NVIDIA driver: CUDA probing ("Could not find cuda
# drivers", "failed call to cuInit: ... CUDA error") and CPU-instruction notes. Alarming to a
# user of a CPU machine, and nothing to act on.
_STARTUP_NOISE = re.compile(r"All log messages before absl::InitializeLog|cudart_stub\.cc|"
                            r"cuda_platform\.cc.*cuInit|cpu_feature_guard\.cc|"
                            r"To enable the following instructions")


def start_tensorflow() -> None:
    """Import TensorFlow and probe its devices with that start-up noise held back (only on
    machines without an NVIDIA driver, where it means nothing); other lines pass through."""
    if "tensorflow" in sys.modules or os.path.exists("/proc/driver/nvidia/version"):
        return
    with _filtered_stderr(_STARTUP_NOISE):
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cp2image-tf")
def main():
    """Generate single-cell images from CellProfiler features.

    \b
    Typical flow:
      cp2image-tf sample-data OUT          # or bring your own CellProfiler run
      cp2image-tf convert OUT/cellprofiler DATA --objects Nuclei,Cells --channels DNA,Tubulin,Actin
      cp2image-tf inspect DATA --verify
      cp2image-tf fit DATA RUN             # re-run to resume
      cp2image-tf export RUN MODELS/cp2image
      cp2image-tf generate MODELS/cp2image OUT --treatment-mean all --data DATA
      cp2image-tf traverse MODELS/cp2image OUT --feature Nuclei_AreaShape_Area --correlated --data DATA
      cp2image-tf evaluate MODELS/cp2image DATA EVAL
      cp2image-tf explore MODELS/cp2image --data DATA   # sliders in a browser
    """


def _register():
    from cli import cmd_convert  # noqa: F401  (registers its commands on `main`)
    from cli import cmd_sample_data  # noqa: F401
    from cli import cmd_featurize  # noqa: F401
    from cli import cmd_fit  # noqa: F401
    from cli import cmd_generate  # noqa: F401
    from cli import cmd_evaluate  # noqa: F401
    from cli import cmd_explore  # noqa: F401


_register()

