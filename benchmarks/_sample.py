"""The benchmarks' sample data: a folder given on the command line, or a new one."""
from pathlib import Path


def sample_folder(given, root, cells: int) -> Path:
    """`given` (an existing sample-data folder) or a new sample of `cells` cells in root/sample."""
    if given is not None:
        return Path(given)
    from cp2image_tf.sampledata import make_sample_data

    sample = Path(root) / "sample"
    make_sample_data(sample, cells=cells, seed=0, progress=False)
    return sample
