"""tfrecords_tools: storage only. Reading CellProfiler outputs, writing and reading sharded
TFRecords, the manifest, and running the work in parts; it knows nothing of the model."""
