"""explore: a web page to see what a CellProfiler profile looks like, live (see explorer.py)."""
