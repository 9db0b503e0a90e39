"""Shared test data: a small CellProfiler ExportToSpreadsheet folder made in the test."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
import pytest
import tifffile

CHANNELS = ("DNA", "Tubulin", "Actin")


def make_cellprofiler_folder(root, n_fields=8, cells_per_field=6, size=96, seed=0,
                             treatments=("DMSO", "Taxol"), edge_cell=True, absolute_paths=False):
    """Random 16-bit fields plus Image.csv / Nuclei.csv / Cells.csv as CellProfiler lays them out.

    Images go to root/images (PathName relative to the CSV folder unless absolute_paths);
    CSVs to root/cp. Column order is shuffled, as merged batches have it. Nuclei.csv has a
    constant column, an all-NaN column and one NaN value; with edge_cell the first field's
    first cell sits 5 px from the border.
    """
    rng = np.random.default_rng(seed)
    cp_dir = root / "cp"
    img_dir = root / "images" / "plate1"
    cp_dir.mkdir(parents=True)
    img_dir.mkdir(parents=True)
    images, nuclei, cells = [], [], []
    for f in range(n_fields):
        number = f + 1
        well = f"B{f // 2 + 2:02d}"
        row = {"ImageNumber": number, "Metadata_Plate": "plate1", "Metadata_Well": well,
               "Metadata_Site": f % 2 + 1,
               "Metadata_Treatment": treatments[(f // 2) % len(treatments)],
               "Count_Nuclei": cells_per_field, "Threshold_FinalThreshold_Nuclei": 0.01}
        for ch in CHANNELS:
            name = f"plate1_{well}_s{f % 2 + 1}_{ch}.tif"
            tifffile.imwrite(img_dir / name, rng.integers(0, 60000, (size, size), dtype=np.uint16))
            row[f"FileName_{ch}"] = name
            row[f"PathName_{ch}"] = str(img_dir) if absolute_paths else os.path.join("..", "images", "plate1")
        row["FileName_IllumDNA"] = "illum.npy"  # not a channel: never asked for
        row["PathName_IllumDNA"] = "/nowhere"
        images.append(row)
        for o in range(cells_per_field):
            x, y = rng.uniform(20, size - 20, 2)
            if edge_cell and f == 0 and o == 0:
                x = 5.0
            nuclei.append({
                "ImageNumber": number, "ObjectNumber": o + 1,
                "Location_Center_X": x, "Location_Center_Y": y,
                "AreaShape_Area": rng.uniform(100, 400),
                "AreaShape_Center_X": x, "AreaShape_BoundingBoxMinimum_X": x - 5,
                "Intensity_MeanIntensity_DNA": rng.uniform(0.05, 0.5),
                "Texture_Contrast_DNA_3_00_256": rng.uniform(0, 5),
                "Parent_Cells": o + 1, "Children_Cytoplasm_Count": 1,
                "Number_Object_Number": o + 1,
                "AreaShape_EulerNumber": 1.0,
                "Correlation_Costes_DNA_Actin": np.nan,
            })
            cells.append({"ImageNumber": number, "ObjectNumber": o + 1,
                          "Location_Center_X": x + 1, "Location_Center_Y": y + 1,
                          "AreaShape_Area": rng.uniform(500, 2000),
                          "Intensity_MeanIntensity_Actin": rng.uniform(0.05, 0.5)})
    nuclei[3]["Intensity_MeanIntensity_DNA"] = np.nan
    image_df = pd.DataFrame(images)
    nuclei_df = pd.DataFrame(nuclei)
    cells_df = pd.DataFrame(cells)
    order = rng.permutation(nuclei_df.columns)
    image_df.sample(frac=1, axis=1, random_state=seed).to_csv(cp_dir / "Image.csv", index=False)
    nuclei_df[order].to_csv(cp_dir / "Nuclei.csv", index=False)
    cells_df.to_csv(cp_dir / "Cells.csv", index=False)
    return cp_dir


@pytest.fixture
def cp_folder(tmp_path):
    return make_cellprofiler_folder(tmp_path)


def make_disc_folder(root, n_fields=12, cells_per_field=8, size=192, seed=0, treatments=("small", "large")):
    """Fields of bright discs whose radius and brightness are the cells' features: a dataset a
    decoder can learn from in a few dozen steps. Treatment 'large' draws larger, brighter discs."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    cp_dir = root / "cp"
    img_dir = root / "images"
    cp_dir.mkdir(parents=True)
    img_dir.mkdir(parents=True)
    images, nuclei = [], []
    for f in range(n_fields):
        treatment = treatments[f % len(treatments)]
        planes = np.full((2, size, size), 500, dtype=np.uint16)
        row = {"ImageNumber": f + 1, "Metadata_Well": f"W{f // 2}", "Metadata_Treatment": treatment,
               "Metadata_MoA": "grow" if treatment == treatments[-1] else "shrink"}
        grid = np.linspace(32, size - 32, int(np.ceil(np.sqrt(cells_per_field))))
        spots = [(x, y) for y in grid for x in grid][:cells_per_field]
        for o, (x, y) in enumerate(spots):
            big = treatment == treatments[-1]
            radius = rng.uniform(8, 13) if big else rng.uniform(4, 9)
            level = rng.uniform(20000, 40000) if big else rng.uniform(6000, 24000)
            rr, cc = disk((y, x), radius, shape=(size, size))
            planes[0, rr, cc] = level
            planes[1, rr, cc] = level // 2
            nuclei.append({"ImageNumber": f + 1, "ObjectNumber": o + 1, "Location_Center_X": x,
                           "Location_Center_Y": y, "AreaShape_Area": float(len(rr)),
                           "Intensity_MeanIntensity_DNA": level / 65535.0})
        for c, ch in enumerate(("DNA", "Actin")):
            tifffile.imwrite(img_dir / f"f{f}_{ch}.tif", planes[c])
            row[f"FileName_{ch}"] = f"f{f}_{ch}.tif"
            row[f"PathName_{ch}"] = str(img_dir)
        images.append(row)
    pd.DataFrame(images).to_csv(cp_dir / "Image.csv", index=False)
    pd.DataFrame(nuclei).to_csv(cp_dir / "Nuclei.csv", index=False)
    return cp_dir


@pytest.fixture(scope="session")
def disc_dataset(tmp_path_factory):
    """The disc fields converted to 48 px crops (DNA, Actin), split by well."""
    from tfrecords_tools.convert import ConvertConfig, convert

    root = tmp_path_factory.mktemp("discs")
    cp_dir = make_disc_folder(root)
    out = root / "data"
    convert(ConvertConfig(input=str(cp_dir), out_dir=str(out), channels=["DNA", "Actin"],
                          objects=["Nuclei"], crop_size=48, split_by=["Metadata_Well"]),
            progress=False)
    return out


@pytest.fixture(scope="session")
def disc_run(disc_dataset, tmp_path_factory):
    """A run folder of a short fit on the disc dataset (best checkpoint at step 18 or 36): long
    enough that every generated disc holds a nucleus above the dataset's threshold (12 steps
    draw 3 in 16)."""
    from cp2image_tf.training.config import FitConfig
    from cp2image_tf.training.train import fit

    run = tmp_path_factory.mktemp("disc_run") / "run"
    fit(disc_dataset, run, FitConfig(steps=36, batch_size=8, validate_every=18, checkpoint_every=18,
                                     val_cells=32, grid_cells=0), progress=False)
    return run


@pytest.fixture(scope="session")
def disc_model(disc_run):
    """The disc run's best checkpoint exported as a SavedModel (version 1)."""
    from pathlib import Path

    from cp2image_tf.serving.export import export

    return Path(export(disc_run, disc_run.parent / "models" / "discs")["path"])


def free_ports(n):
    """n free TCP ports on 127.0.0.1 (for multiworker tests)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
