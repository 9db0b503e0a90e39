"""The `cp2image-tf` command: the Click group, with every command added to it.

Each command lives in cli/cmd_<command>.py: it parses options, calls one library function
(through cli.common.call) and reports. See cli/common.py for which imports wait until a
command runs, and why.
"""
import click

from cli import (cmd_convert, cmd_evaluate, cmd_explore, cmd_export, cmd_featurize, cmd_fit,
                 cmd_generate, cmd_inspect, cmd_sample_data, cmd_traverse)
from tfrecords_tools._version import __version__

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


for command in (cmd_sample_data.sample_data, cmd_convert.convert, cmd_inspect.inspect,
                cmd_featurize.featurize_command, cmd_fit.fit, cmd_export.export, cmd_generate.generate,
                cmd_traverse.traverse, cmd_generate.predict, cmd_evaluate.evaluate,
                cmd_explore.explore):
    main.add_command(command)
