"""measuring: CellProfiler measurements with cp-measure: per object (measure), on generated
or real crops (remeasure) and on whole images with their masks (featurize)."""
