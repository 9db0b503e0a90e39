"""`python -m cli`: the same as the `cp2image-tf` command."""
from cli.main import main

main(prog_name="cp2image-tf")
