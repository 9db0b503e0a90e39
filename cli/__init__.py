"""The `cp2image-tf` command: a thin Click layer over the library (main.py: the group;
common.py: what commands share; cmd_<command>.py: one command or a small family each)."""
