"""Packaging for cp2image-tf: see README.md."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "tfrecords_tools" / "_version.py").read_text(), VERSION)

setup(
    name="cp2image-tf",
    version=VERSION["__version__"],
    description=(
        "Generate single-cell images from CellProfiler features "
        "(CP2Image on TensorFlow/Keras)"
    ),
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["cp2image_tf", "cp2image_tf.*", "tfrecords_tools", "cli"]),
    # explore's page: plain HTML, JS and CSS served from the package.
    package_data={"cp2image_tf.explore": ["static/*"]},
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.3,<4",
        "numpy>=1.26",
        "pandas>=2.0",
        "tifffile>=2023.1",
        "click>=8.1",
        "cp-measure>=0.3,<0.4",
        # cp-measure runs its texture, intensity and Feret kernels compiled when numba is
        # present: measurement takes about half the time (benchmarks/bench_measure.py).
        "numba>=0.60",
        "scikit-image>=0.22",
        "scipy>=1.11",
        "pyarrow>=14",
        # evaluate and re-measuring run numpy's BLAS in one thread (measuring.remeasure).
        "threadpoolctl>=3",
        "tqdm>=4.66",
        "google-crc32c>=1.5",
        "matplotlib>=3.8",
        # tf.summary.image and `tensorboard --logdir RUN_DIR/logs` need it.
        "tensorboard>=2.16",
        # Warmup requests written by `export` and the gRPC client of `predict`; its
        # protos follow TensorFlow's release, hence the same minor version.
        "tensorflow-serving-api>=2.21,<2.22",
        # The REST client of `predict`.
        "requests>=2.31",
        # evaluate: nearest-neighbour baseline.
        "scikit-learn>=1.4",
        # evaluate: treatment mAP with permutation p-values, as image-based profiling reports it.
        "copairs>=0.5.5,<0.6",
        # convert/featurize/evaluate --scheduler: parts on a Dask cluster (LocalCluster, Slurm, k8s).
        "dask[distributed]>=2024.1",
        # explore: the web page's server (its API and static files) and the ASGI server
        # that runs it.
        "fastapi>=0.110",
        "uvicorn>=0.29",
        # explore: encodes the channel PNGs the page composites (matplotlib needs it too).
        "pillow>=10",
    ],
    extras_require={
        # CUDA wheels of TensorFlow for GPU hosts (Linux).
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        "test": [
            "pytest>=8",
            # fastapi.testclient (Starlette's TestClient) runs on httpx2.
            "httpx2>=2",
            # tests/test_explore_browser.py drives Debian's chromium through chromedriver.
            "selenium>=4.20",
        ],
        # The documentation site (mkdocs.yml, docs/); tests/test_docs.py builds it strictly.
        "docs": ["mkdocs-material>=9"],
    },
    entry_points={"console_scripts": ["cp2image-tf=cli.main:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Bio-Informatics",
        "Topic :: Scientific/Engineering :: Image Processing",
    ],
)
