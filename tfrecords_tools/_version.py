"""The version of the cp2image-tf distribution (both packages and the command); it lives in the
lowest package so that convert can record it in the manifest. setup.py reads it."""
__version__ = "0.1.0"
