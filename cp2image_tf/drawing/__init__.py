"""drawing: cells drawn from CellProfiler profiles (generate), features varied one at a time
(traverse), and the profiles they start from (profiles)."""
