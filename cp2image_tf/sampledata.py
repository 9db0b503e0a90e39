"""The embedded sample dataset: a synthetic fluorescence screen, drawn procedurally.

`make_sample_data(out_dir)` writes what a small imaging experiment leaves on disk:
16-bit TIFFs (one per channel per field: DNA, Tubulin, Actin), label images of
nuclei and cells, a CellProfiler LoadData CSV, the CellProfiler-style
measurements of every cell (`cellprofiler/Image.csv`, `Nuclei.csv`, `Cells.csv`,
computed by `cp2image_tf.measuring.featurize`), and the generator's own per-cell parameters
(`ground_truth.csv`), so that a measurement can be checked against what was drawn.

What is drawn, per 512 x 512 field of ~24 cells: a nucleus per cell (a lobed
ellipse of domed, mottled chromatin with bright foci and dark nucleoli), a cell
body around it (a lobed ellipse; touching cells split like a weighted Voronoi
diagram), microtubules radiating from a centrosome beside the nucleus over
diffuse tubulin, and cortical actin at the cell edge with stress fibres along the
cell's long axis. Cells vary in cell-cycle stage (DNA content), size and shape.
The microscope adds a background, vignetting, a Gaussian PSF, Poisson shot noise
and Gaussian read noise; bright signal is compressed so that nothing saturates.

Each treatment shifts the generator's per-cell parameters by documented factors
(`TREATMENTS`); cell-to-cell variation is large enough that treatments overlap,
as they do in real screens. Everything is deterministic for a given seed and cell
count: each field is drawn from its own child of one `numpy.random.SeedSequence`,
so the bytes written do not depend on the number of worker processes.
"""
from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import find_boundaries

from tfrecords_tools.atomic import replace_folder
from tfrecords_tools.errors import UserInputError

CHANNELS = ("DNA", "Tubulin", "Actin")
OBJECTS = ("Nuclei", "Cells")
FIELD_SHAPE = (512, 512)
PLATES = ("Plate1", "Plate2")
REPLICATE_WELLS = 3          # wells per treatment per plate
CELLS_PER_FIELD = 24         # mean; fields vary by +-25%
EDGE_MARGIN = 36             # nucleus centres keep this far from the border: every cell has a
                             # whole 68 x 68 crop (the published crop size) around its centroid
ROWS = "BCDEFGH"
FIRST_COLUMN = 2


@dataclass(frozen=True)
class Treatment:
    """A treatment: multiplicative factors on the control's per-cell parameters."""

    name: str
    effect: str
    moa: str                          # mechanism of action: written as Metadata_MoA
    nucleus_size: float = 1.0         # nucleus equivalent radius
    nucleus_elongation: float = 1.0   # (major / minor - 1) of the nucleus
    dna_intensity: float = 1.0        # mean DNA signal in the nucleus
    dna_texture: float = 1.0          # chromatin texture contrast
    chromocentres: float = 1.0        # number of bright heterochromatin foci
    cell_size: float = 1.0            # cell equivalent radius
    cell_elongation: float = 1.0      # (major / minor - 1) of the cell
    filaments: float = 1.0            # number of microtubules
    tubulin_diffuse: float = 1.0      # soluble (unpolymerised) tubulin
    fibres: float = 1.0               # number of actin stress fibres
    fibre_intensity: float = 1.0      # brightness of a stress fibre
    actin_cortex: float = 1.0         # brightness of the cortical actin band


TREATMENTS = (
    Treatment("DMSO", "vehicle control: the reference morphology", moa="control"),
    Treatment("NucEnlarge", "nuclei 1.35x wider (~1.8x area), cells 1.15x wider, DNA mean "
              "intensity 0.85x (DNA spread over a larger nucleus); like a DNA-synthesis block",
              moa="nuclear", nucleus_size=1.35, cell_size=1.15, dna_intensity=0.85),
    Treatment("NucElongate", "nuclei elongated (major/minor ~2.3 instead of ~1.25, same area), "
              "cells elongated along them",
              moa="nuclear", nucleus_elongation=5.5, cell_elongation=3.0),
    Treatment("DNACondense", "chromatin condensed: DNA 1.7x brighter (with the foci, ~2.2x mean "
              "intensity), 2.2x texture contrast, 4x more bright foci, nuclei 0.8x wider "
              "(~0.65x area)", moa="nuclear",
              nucleus_size=0.8, dna_intensity=1.7, dna_texture=2.2, chromocentres=4.0),
    Treatment("CellSpread", "cells spread: 1.45x wider (~2x area) at the same nucleus size; "
              "microtubules and stress fibres scale with the larger cell",
              moa="cell shape", cell_size=1.45),
    Treatment("MTDepoly", "microtubules depolymerised (nocodazole-like): 0.12x filaments, 3x "
              "diffuse tubulin, cells 0.85x wider (rounding)", moa="cytoskeletal",
              filaments=0.12, tubulin_diffuse=3.0, cell_size=0.85),
    Treatment("ActinStab", "actin stabilised (jasplakinolide-like): 3.5x stress fibres, 1.4x "
              "brighter fibres, 1.6x brighter cortex", moa="cytoskeletal",
              fibres=3.5, fibre_intensity=1.4, actin_cortex=1.6),
)
TREATMENT_BY_NAME = {t.name: t for t in TREATMENTS}

# Control (DMSO) values; intensities in ADU above background, lengths in pixels.
NUCLEUS_RADIUS = 10.5
NUCLEUS_ELONGATION = 0.25
DNA_INTENSITY = 7000.0
DNA_TEXTURE = 0.16
CHROMOCENTRES = 2.0
CELL_RADIUS = 26.0
CELL_ELONGATION = 0.3
FILAMENTS = 40.0
FILAMENT_DENSITY = 700.0          # ADU x px per px of filament length
TUBULIN_DIFFUSE = 1100.0
FIBRES = 3.0
FIBRE_DENSITY = 2600.0
ACTIN_DIFFUSE = 900.0
ACTIN_CORTEX = 4500.0

# The microscope.
PSF_SIGMA = 1.0
CAMERA_OFFSET = 400.0
BACKGROUND = {"DNA": 300.0, "Tubulin": 700.0, "Actin": 550.0}
VIGNETTING = 0.3                  # relative intensity loss in the field's corners
GAIN = 2.0                        # ADU per photo-electron
READ_NOISE = 4.0                  # ADU
KNEE, CEILING = 26000.0, 44000.0  # bright signal is compressed below CEILING: nothing saturates


GROUND_TRUTH_COLUMNS = {
    "ImageNumber, ObjectNumber": "the field (a load_data.csv row) and the label in both masks",
    "Metadata_*": "plate, well, site, treatment, mechanism of action (MoA)",
    "Nucleus_Center_X/_Y": "nucleus centre (x = column, y = row)",
    "Nucleus_Major/MinorRadius": "semi-axes of the nucleus ellipse",
    "Nucleus_Elongation": "major / minor radius",
    "Nucleus_Orientation": "major axis angle from +x towards +y (clockwise on screen), 0-180",
    "Nucleus_Irregularity": "amplitude of the outline's lobes (relative)",
    "Nucleus_Area": "pixels in the drawn nucleus mask",
    "DNA_Content": "1 = G1, 2 = G2, in between = S phase",
    "DNA_Intensity": "mean chromatin signal before texture",
    "DNA_Texture": "chromatin texture contrast (relative)",
    "DNA_Chromocentres": "number of bright foci",
    "Cell_Center_X/_Y": "centre of the cell body's shape",
    "Cell_Radius": "equivalent radius of the cell shape before neighbours clip it",
    "Cell_Elongation": "major / minor axis of the cell shape",
    "Cell_Orientation": "the same for the cell shape",
    "Cell_Area": "pixels in the drawn cell mask (nucleus included)",
    "Tubulin_Filaments": "microtubules drawn from the centrosome",
    "Tubulin_Diffuse": "soluble tubulin level",
    "Actin_Fibres": "stress fibres drawn",
    "Actin_Cortex": "cortical actin brightness",
}


@dataclass(frozen=True)
class FieldPlan:
    """One field of view: where it is, what it was treated with, how to draw it."""

    image_number: int
    plate: str
    well: str
    site: int
    treatment: str
    n_cells: int
    seed: np.random.SeedSequence

    @property
    def stem(self) -> str:
        return f"{self.plate}_{self.well}_s{self.site}"


def make_sample_data(out_dir, cells: int = 2000, seed: int = 0, overwrite: bool = False,
                     workers: int | None = None, progress: bool = True) -> dict:
    """Draw the sample experiment into `out_dir` and measure it; return a summary.

    Writes images/, masks/, load_data.csv, cellprofiler/{Image,Nuclei,Cells}.csv,
    ground_truth.csv and README.txt. The folder is built under a temporary name
    next to `out_dir` and renamed into place when complete. With workers > 1 the
    fields are drawn in spawned processes (safe beside TensorFlow's threads), so a
    script calling this needs the usual `if __name__ == "__main__":` guard.
    """
    out_dir = Path(os.path.abspath(out_dir))
    if cells < len(TREATMENTS):
        raise UserInputError(f"--cells {cells}: at least {len(TREATMENTS)} cells are needed "
                             "(one field per treatment).")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir} is a file; choose a folder for the sample data.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserInputError(f"{out_dir} already exists and is not empty; "
                             "pass --overwrite to replace it.")
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plans = plan_fields(cells, seed)
        t0 = time.perf_counter()
        truth = _draw_all(plans, tmp, workers, progress)
        draw_seconds = time.perf_counter() - t0
        load_data = _write_load_data(plans, tmp)
        truth.to_csv(tmp / "ground_truth.csv", index=False)
        _write_readme(tmp, cells, seed, plans)
        t0 = time.perf_counter()
        _measure(load_data, tmp / "cellprofiler", workers, progress)
        measure_seconds = time.perf_counter() - t0
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = truth.groupby("Metadata_Treatment").size()
    return {
        "out_dir": str(out_dir),
        "cells": int(len(truth)),
        "fields": len(plans),
        "cells_per_treatment": {t.name: int(counts.get(t.name, 0)) for t in TREATMENTS},
        "load_data": str(out_dir / "load_data.csv"),
        "cellprofiler": str(out_dir / "cellprofiler"),
        "ground_truth": str(out_dir / "ground_truth.csv"),
        "seconds": {"draw": round(draw_seconds, 1), "measure": round(measure_seconds, 1)},
    }


def plan_fields(cells: int, seed: int) -> list[FieldPlan]:
    """The plate layout and how many cells each field gets (exactly `cells` in all).

    Wells: each treatment in REPLICATE_WELLS wells on each plate (one row per
    treatment, rotated between plates). Fields are taken treatment by treatment,
    then replicate well, then plate, then site, so a small count still reaches
    every treatment and a large one adds sites; ImageNumber follows plate, well,
    site order, as a LoadData CSV would.
    """
    n_fields = max(len(TREATMENTS), -(-cells // CELLS_PER_FIELD))
    root = np.random.SeedSequence(seed)
    layout_seed, *field_seeds = root.spawn(n_fields + 1)
    slots = []
    site = 1
    while len(slots) < n_fields:
        for replicate in range(REPLICATE_WELLS):
            for p, plate in enumerate(PLATES):
                for t, treatment in enumerate(TREATMENTS):
                    row = ROWS[(t + 2 * p) % len(ROWS)]
                    well = f"{row}{FIRST_COLUMN + replicate:02d}"
                    slots.append((plate, well, site, treatment.name))
        site += 1
    slots = sorted(slots[:n_fields])

    rng = np.random.default_rng(layout_seed)
    weights = rng.uniform(0.75, 1.25, n_fields)
    spare = cells - n_fields  # every field gets one cell, the rest by weight
    counts = 1 + np.floor(spare * weights / weights.sum()).astype(int)
    for i in rng.permutation(n_fields)[: cells - counts.sum()]:
        counts[i] += 1
    return [FieldPlan(i + 1, plate, well, site, treatment, int(n), field_seeds[i])
            for i, ((plate, well, site, treatment), n) in enumerate(zip(slots, counts))]


def draw_field(n_cells: int, treatment: str, seed, shape=FIELD_SHAPE):
    """Draw one field: ({channel: uint16 image}, nuclei labels, cell labels, per-cell table).

    Labels are ObjectNumbers, numbered in raster order of the nuclei as
    CellProfiler does; a cell's nucleus and body share the number.
    """
    rng = np.random.default_rng(seed)
    p = _sample_cells(n_cells, TREATMENT_BY_NAME[treatment], rng)
    _place_nuclei(p, shape, rng)
    nuclei, cells, rho = _draw_masks(p, shape)
    order = _raster_order(nuclei, n_cells)
    relabel = np.zeros(n_cells + 1, np.uint16)
    relabel[order + 1] = np.arange(1, n_cells + 1)
    nuclei, cells = relabel[nuclei], relabel[cells]
    p = {k: v[order] for k, v in p.items()}

    fine = _smooth_noise(shape, 1.0, rng)
    coarse = _smooth_noise(shape, 3.0, rng)
    signal = {
        "DNA": _draw_dna(p, nuclei, rho, fine, coarse, rng),
        "Tubulin": _draw_tubulin(p, nuclei, cells, fine, rng),
        "Actin": _draw_actin(p, nuclei, cells, coarse, rng),
    }
    images = {ch: _acquire(signal[ch], BACKGROUND[ch], rng) for ch in CHANNELS}

    ids = np.arange(1, n_cells + 1)
    nucleus_area = np.bincount(nuclei.ravel(), minlength=n_cells + 1)[1:]
    cell_area = np.bincount(cells.ravel(), minlength=n_cells + 1)[1:]
    truth = pd.DataFrame({
        "ObjectNumber": ids,
        "Nucleus_Center_X": p["ncx"], "Nucleus_Center_Y": p["ncy"],
        "Nucleus_MajorRadius": p["na"], "Nucleus_MinorRadius": p["nb"],
        "Nucleus_Elongation": p["na"] / p["nb"],
        "Nucleus_Orientation": np.degrees(p["ntheta"]) % 180.0,
        "Nucleus_Irregularity": p["nirr"],
        "Nucleus_Area": nucleus_area,
        "DNA_Content": p["dna_content"],
        "DNA_Intensity": p["dna"], "DNA_Texture": p["texture"],
        "DNA_Chromocentres": p["n_chromo"],
        "Cell_Center_X": p["ccx"], "Cell_Center_Y": p["ccy"],
        "Cell_Radius": p["cr"], "Cell_Elongation": 1.0 + p["celong"],
        "Cell_Orientation": np.degrees(p["ctheta"]) % 180.0,
        "Cell_Area": cell_area,
        "Tubulin_Filaments": p["n_fil"], "Tubulin_Diffuse": p["tub_diffuse"],
        "Actin_Fibres": p["n_fib"], "Actin_Cortex": p["cortex"],
    })
    return images, nuclei, cells, truth


# ---------------------------------------------------------------- per-cell parameters

def _lognormal(rng, sigma, n):
    return np.exp(rng.normal(0.0, sigma, n))


def _sample_cells(n, t: Treatment, rng) -> dict:
    """Per-cell generator parameters: control values x treatment factors x variation."""
    # DNA content: G1 = 1, S in between, G2 = 2; nucleus area grows as content^0.7.
    phase = rng.random(n)
    content = np.where(phase < 0.55, 1.0, np.where(phase < 0.75, rng.uniform(1, 2, n), 2.0))
    size = _lognormal(rng, 0.08, n)  # shared by nucleus and cell: big cells, big nuclei
    nr = NUCLEUS_RADIUS * t.nucleus_size * size * content ** 0.35 * _lognormal(rng, 0.07, n)
    nelong = 1.0 + NUCLEUS_ELONGATION * t.nucleus_elongation * _lognormal(rng, 0.35, n)
    ntheta = rng.uniform(0, np.pi, n)
    cr = CELL_RADIUS * t.cell_size * size * content ** 0.2 * _lognormal(rng, 0.13, n)
    cr = np.maximum(cr, 1.5 * nr * np.sqrt(nelong))
    area_scale = (cr / CELL_RADIUS) ** 2
    return {
        "dna_content": content,
        "na": nr * np.sqrt(nelong), "nb": nr / np.sqrt(nelong), "ntheta": ntheta,
        "nirr": 0.035 * _lognormal(rng, 0.4, n),
        "nharm": rng.normal(0, 1, (n, 4)), "nphase": rng.uniform(0, 2 * np.pi, (n, 4)),
        "dna": DNA_INTENSITY * t.dna_intensity * content ** 0.3 * _lognormal(rng, 0.12, n),
        "texture": DNA_TEXTURE * t.dna_texture * _lognormal(rng, 0.2, n),
        "n_chromo": rng.poisson(CHROMOCENTRES * t.chromocentres * content, n),
        "n_nucleoli": rng.integers(1, 4, n),
        "cr": cr,
        "celong": CELL_ELONGATION * t.cell_elongation * _lognormal(rng, 0.5, n),
        "ctheta": ntheta + rng.normal(0, 0.35, n),
        "charm": rng.uniform(0, 1, (n, 6)) * 0.14 / np.sqrt(np.arange(2, 8)),
        "cphase": rng.uniform(0, 2 * np.pi, (n, 6)),
        "offset": rng.uniform(0, 0.18, n) * cr, "offset_angle": rng.uniform(0, 2 * np.pi, n),
        "n_fil": rng.poisson(FILAMENTS * t.filaments * area_scale ** 0.5),
        "tub_diffuse": TUBULIN_DIFFUSE * t.tubulin_diffuse * _lognormal(rng, 0.2, n),
        "fil_intensity": FILAMENT_DENSITY * _lognormal(rng, 0.15, n),
        "n_fib": rng.poisson(FIBRES * t.fibres * area_scale ** 0.7),
        "fib_intensity": FIBRE_DENSITY * t.fibre_intensity * _lognormal(rng, 0.2, n),
        "actin_diffuse": ACTIN_DIFFUSE * _lognormal(rng, 0.2, n),
        "cortex": ACTIN_CORTEX * t.actin_cortex * _lognormal(rng, 0.2, n),
    }


def _place_nuclei(p: dict, shape, rng, clustering: float = 0.5):
    """Nucleus and cell centres: non-overlapping nuclei, cells partly in clumps.

    A candidate either falls anywhere or beside an already placed cell (cells in
    culture grow in clumps); it is accepted when it keeps its distance from every
    placed cell. Spacing relaxes slowly if a field gets crowded.
    """
    n = len(p["cr"])
    h, w = shape
    reach = p["cr"] * np.sqrt(1 + p["celong"])
    nreach = 1.15 * p["na"] + 3.0
    centres = np.zeros((n, 2))
    slack = 0.8
    for i in range(n):
        margin = max(nreach[i] + p["offset"][i] + 2, EDGE_MARGIN)
        for attempt in range(10_000):
            if i and rng.random() < clustering:
                j = rng.integers(i)
                angle = rng.uniform(0, 2 * np.pi)
                c = centres[j] + slack * (reach[i] + reach[j]) * rng.uniform(0.75, 0.95) \
                    * np.array([np.sin(angle), np.cos(angle)])
            else:
                c = rng.uniform(0, 1, 2) * (h, w)
            inside = margin <= c[0] <= h - margin and margin <= c[1] <= w - margin
            d = np.hypot(*(centres[:i] - c).T)
            if inside and np.all(d >= slack * 0.75 * (reach[:i] + reach[i])) \
                    and np.all(d >= nreach[:i] + nreach[i]):
                centres[i] = c
                break
            if attempt % 200 == 199:
                slack *= 0.95
        else:
            raise RuntimeError("could not place the cells of a field")
    p["ncy"], p["ncx"] = centres[:, 0], centres[:, 1]
    p["ccy"] = p["ncy"] + p["offset"] * np.sin(p["offset_angle"])
    p["ccx"] = p["ncx"] + p["offset"] * np.cos(p["offset_angle"])


# ---------------------------------------------------------------- masks

def _star(yy, xx, cy, cx, theta, ry, rx, amplitudes, phases, first_k=2):
    """Relative radius in a lobed ellipse (< 1 inside).

    The ellipse has semi-axes rx (along `theta`) and ry; its outline is
    modulated by harmonics first_k, first_k + 1, ... of the given amplitudes and
    phases, evaluated as a complex polynomial (cheaper than a cosine per harmonic).
    """
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    r = np.hypot(u, v)
    z = (u + 1j * v) / np.maximum(r, 1e-9)
    coefficients = amplitudes * np.exp(1j * phases)
    outline = coefficients[-1]
    for coefficient in coefficients[-2::-1]:
        outline = outline * z + coefficient
    outline = 1 + (outline * z ** first_k).real
    return r / np.maximum(outline, 0.4)


def _window(cy, cx, half, shape):
    y0, x0 = max(int(cy) - half, 0), max(int(cx) - half, 0)
    y1, x1 = min(int(cy) + half + 1, shape[0]), min(int(cx) + half + 1, shape[1])
    return np.s_[y0:y1, x0:x1], np.ogrid[y0:y1, x0:x1]


def _draw_masks(p: dict, shape):
    """Nuclei and cell label images, and each nucleus pixel's relative radius (0 centre, 1 edge).

    A cell is a lobed ellipse around its centre; where cells meet, a pixel goes to
    the cell in whose shape it lies deepest (a weighted Voronoi split), and a
    nucleus always belongs to its own cell.
    """
    nuclei = np.zeros(shape, np.uint16)
    cells = np.zeros(shape, np.uint16)
    depth = np.full(shape, np.inf, np.float32)
    rho = np.zeros(shape, np.float32)
    for i in range(len(p["cr"])):
        half = int(np.ceil(1.3 * p["na"][i])) + 2
        win, (yy, xx) = _window(p["ncy"][i], p["ncx"][i], half, shape)
        d_nuc = _star(yy, xx, p["ncy"][i], p["ncx"][i], p["ntheta"][i], p["nb"][i], p["na"][i],
                      p["nirr"][i] * p["nharm"][i] / np.arange(2, 6), p["nphase"][i])
        in_nucleus = d_nuc < 1
        nuclei[win][in_nucleus] = i + 1
        rho[win][in_nucleus] = d_nuc[in_nucleus]
        depth[win][in_nucleus] = -1.0  # a nucleus always belongs to its own cell
        cells[win][in_nucleus] = i + 1

    for i in range(len(p["cr"])):
        e = np.sqrt(1 + p["celong"][i])
        half = int(np.ceil(p["cr"][i] * e * (1 + p["charm"][i].sum()) + p["offset"][i])) + 2
        win, (yy, xx) = _window(p["ncy"][i], p["ncx"][i], half, shape)
        d_cell = _star(yy, xx, p["ccy"][i], p["ccx"][i], p["ctheta"][i], p["cr"][i] / e,
                       p["cr"][i] * e, p["charm"][i], p["cphase"][i])
        take = (d_cell < 1) & (d_cell < depth[win])
        depth[win][take] = d_cell[take]
        cells[win][take] = i + 1

    # Keep only the piece of each cell that holds its nucleus (Voronoi splits can cut off lobes).
    pieces = connected_components(cells, background=0, connectivity=1)
    keep = np.zeros(pieces.max() + 1, bool)
    keep[pieces[nuclei > 0]] = True
    cells[~keep[pieces]] = 0
    return nuclei, cells, rho


def _raster_order(nuclei, n):
    """Cell indices sorted by the first pixel of their nucleus in raster order."""
    flat = nuclei.ravel()
    where = np.flatnonzero(flat)
    first = np.full(n, flat.size)
    np.minimum.at(first, flat[where].astype(int) - 1, where)
    return np.argsort(first, kind="stable")


# ---------------------------------------------------------------- channels

def _smooth_noise(shape, sigma, rng):
    """Gaussian noise smoothed to `sigma` pixels, rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), sigma)
    return noise / noise.std()


def _splat(shape, y, x, weights):
    """Deposit weighted points at sub-pixel positions (bilinear), as an image."""
    h, w = shape
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = y - y0, x - x0
    out = np.zeros(h * w)
    for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                       (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yy, xx = y0 + dy, x0 + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        out += np.bincount(yy[ok] * w + xx[ok], (weights * wt)[ok], minlength=h * w)
    return out.reshape(shape).astype(np.float32)


def _points_in_ellipse(rng, n, cy, cx, a, b, theta, scale):
    """`n` uniform random points per cell in its nucleus ellipse shrunk by `scale`."""
    idx = np.repeat(np.arange(len(n)), n)
    r = scale * np.sqrt(rng.random(len(idx)))
    ang = rng.uniform(0, 2 * np.pi, len(idx))
    u, v = r * a[idx] * np.cos(ang), r * b[idx] * np.sin(ang)
    t = theta[idx]
    return cy[idx] + u * np.sin(t) + v * np.cos(t), cx[idx] + u * np.cos(t) - v * np.sin(t)


def _draw_dna(p, nuclei, rho, fine, coarse, rng):
    """Chromatin: domed nucleus, mottled texture, bright foci and dark nucleoli."""
    shape = nuclei.shape
    cy, cx, a, b, th = p["ncy"], p["ncx"], p["na"], p["nb"], p["ntheta"]
    fy, fx = _points_in_ellipse(rng, p["n_chromo"], cy, cx, a, b, th, 0.8)
    oy, ox = _points_in_ellipse(rng, p["n_nucleoli"], cy, cx, a, b, th, 0.5)
    cell_of_focus = np.repeat(np.arange(len(cy)), p["n_chromo"])
    foci = _splat(shape, np.r_[fy, oy], np.r_[fx, ox],
                  np.r_[4.0 + 20.0 * p["texture"][cell_of_focus], np.full(len(oy), -10.0)])
    foci = ndimage.gaussian_filter(foci, 1.4)

    inside = nuclei > 0
    k = nuclei[inside].astype(int) - 1
    dome = (1 - rho[inside] ** 2) ** 0.3
    texture = 0.55 * fine[inside] + 0.85 * coarse[inside]
    modulation = np.maximum(1 + p["texture"][k] * texture + foci[inside], 0.08)
    out = np.zeros(shape, np.float32)
    out[inside] = p["dna"][k] * dome * modulation
    return out


def _trace(paths_y, paths_x, owner, cells):
    """Which points of each path lie in its own cell, up to where the path first leaves it."""
    h, w = cells.shape
    iy = np.clip(np.rint(paths_y).astype(int), 0, h - 1)
    ix = np.clip(np.rint(paths_x).astype(int), 0, w - 1)
    in_field = (paths_y >= 0) & (paths_y <= h - 1) & (paths_x >= 0) & (paths_x <= w - 1)
    own = in_field & (cells[iy, ix] == (owner + 1)[:, None])
    return np.logical_and.accumulate(own, axis=1)


def _draw_tubulin(p, nuclei, cells, fine, rng, step=1.0):
    """Microtubules radiating from a centrosome beside the nucleus, over diffuse tubulin."""
    shape = cells.shape
    n = len(p["cr"])
    # The centrosome sits at the nucleus edge, on the side with the most cytoplasm.
    side = np.arctan2(p["ccy"] - p["ncy"], p["ccx"] - p["ncx"]) + rng.normal(0, 0.6, n)
    psi = side - p["ntheta"]
    edge = p["na"] * p["nb"] / np.hypot(p["nb"] * np.cos(psi), p["na"] * np.sin(psi))
    gap = np.full(n, 2.5)
    for _ in range(2):  # where a neighbour's body hugs the nucleus, tuck the centrosome inside it
        my = p["ncy"] + (edge + gap) * np.sin(side)
        mx = p["ncx"] + (edge + gap) * np.cos(side)
        at = cells[np.clip(np.rint(my).astype(int), 0, shape[0] - 1),
                   np.clip(np.rint(mx).astype(int), 0, shape[1] - 1)]
        gap = np.where(at == np.arange(1, n + 1), gap, -1.5)

    owner = np.repeat(np.arange(n), p["n_fil"])
    m = len(owner)
    reach = p["cr"] * np.sqrt(1 + p["celong"])
    length = reach[owner] * rng.uniform(0.6, 2.0, m)
    steps = int(np.ceil(2.0 * reach.max(initial=1.0) / step))
    heading = rng.uniform(0, 2 * np.pi, m).astype(np.float32)[:, None] \
        + np.cumsum(rng.normal(0, 0.06 * np.sqrt(step), (m, steps)).astype(np.float32), axis=1)
    py = my[owner, None] + step * np.cumsum(np.sin(heading), axis=1)
    px = mx[owner, None] + step * np.cumsum(np.cos(heading), axis=1)
    keep = _trace(py, px, owner, cells) & (step * np.arange(1, steps + 1) <= length[:, None])
    weight = step * p["fil_intensity"][owner] * _lognormal(rng, 0.3, m)
    filaments = _splat(shape, py[keep], px[keep], np.broadcast_to(weight[:, None], py.shape)[keep])
    centrosome = _splat(shape, my, mx, 6.0 * p["fil_intensity"] * (1 + 0.2 * p["n_fil"] ** 0.5))

    inside = cells > 0
    k = cells[inside].astype(int) - 1
    out = np.zeros(shape, np.float32)
    out[inside] = p["tub_diffuse"][k] * (1 + 0.15 * fine[inside])
    out += filaments + ndimage.gaussian_filter(centrosome, 1.2)
    out[nuclei > 0] *= 0.55  # the nucleus is thick: microtubules lie above and below it
    return out


def _draw_actin(p, nuclei, cells, coarse, rng, step=1.0):
    """Cortical actin at the cell edge, stress fibres along the cell's long axis, diffuse actin."""
    shape = cells.shape
    inside = cells > 0
    k = cells[inside].astype(int) - 1
    edge = ndimage.gaussian_filter(find_boundaries(cells, mode="inner").astype(np.float32), 1.2)

    owner = np.repeat(np.arange(len(p["cr"])), p["n_fib"])
    m = len(owner)
    e = np.sqrt(1 + p["celong"][owner])
    reach = p["cr"][owner] * e
    # A fibre runs roughly along the cell's long axis, off-centre, and ends short of the edge
    # or at it; it tapers towards its ends.
    angle = p["ctheta"][owner] + rng.normal(0, 0.3, m)
    across = rng.uniform(-0.6, 0.6, m) * p["cr"][owner] / e
    oy = p["ccy"][owner] + across * np.cos(angle)
    ox = p["ccx"][owner] - across * np.sin(angle)
    steps = int(np.ceil(1.2 * reach.max(initial=1.0) / step))
    t = step * np.arange(steps)
    weight = step * p["fib_intensity"][owner] * _lognormal(rng, 0.35, m)
    fy, fx, fw = [], [], []
    for sign in (1, -1):  # trace both ways out from the fibre's middle
        half = reach * rng.uniform(0.4, 1.2, m)
        py = oy[:, None] + sign * t * np.sin(angle)[:, None]
        px = ox[:, None] + sign * t * np.cos(angle)[:, None]
        taper = np.sqrt(np.clip(1 - (t / half[:, None]) ** 2, 0, None))
        keep = _trace(py, px, owner, cells) & (taper > 0)
        keep[:, 0] &= sign == 1  # the middle point once
        fy.append(py[keep]), fx.append(px[keep])
        fw.append((weight[:, None] * taper)[keep])
    fibres = _splat(shape, np.concatenate(fy), np.concatenate(fx), np.concatenate(fw))

    out = np.zeros(shape, np.float32)
    out[inside] = p["actin_diffuse"][k] * (1 + 0.2 * coarse[inside]) \
        + 2.2 * p["cortex"][k] * edge[inside] * np.clip(1 + 0.35 * coarse[inside], 0.2, None)
    out += fibres
    out[nuclei > 0] *= 0.8
    return out


@functools.lru_cache(maxsize=4)
def _illumination(shape):
    """Relative illumination of the field: 1 at the centre, 1 - VIGNETTING in the corners."""
    h, w = shape
    yy, xx = np.ogrid[:h, :w]
    r2 = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / ((h / 2) ** 2 + (w / 2) ** 2)
    return (1 - VIGNETTING * r2).astype(np.float32)


def _acquire(signal, background, rng):
    """The camera's view: PSF blur, vignetting, background, shot and read noise, 16 bits."""
    signal = ndimage.gaussian_filter(signal, PSF_SIGMA)
    over = np.maximum(signal - KNEE, 0)
    signal -= over - over / (1 + over / (CEILING - KNEE))
    expected = (background * np.exp(rng.normal(0, 0.05)) + signal) * _illumination(signal.shape)
    electrons = rng.poisson(expected / GAIN)
    read_noise = READ_NOISE * rng.standard_normal(signal.shape, np.float32)
    adu = CAMERA_OFFSET + GAIN * electrons + read_noise
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


# ---------------------------------------------------------------- files

def _draw_and_write(plan: FieldPlan, root: Path) -> pd.DataFrame:
    images, nuclei, cells, truth = draw_field(plan.n_cells, plan.treatment, plan.seed)
    image_dir, mask_dir = root / "images" / plan.plate, root / "masks" / plan.plate
    for ch in CHANNELS:
        tifffile.imwrite(image_dir / f"{plan.stem}_{ch}.tif", images[ch], photometric="minisblack",
                         metadata=None)
    for name, labels in (("Nuclei", nuclei), ("Cells", cells)):
        tifffile.imwrite(mask_dir / f"{plan.stem}_{name}.tif", labels, photometric="minisblack",
                         metadata=None, compression="zlib")
    truth.insert(0, "ImageNumber", plan.image_number)
    truth.insert(2, "Metadata_Plate", plan.plate)
    truth.insert(3, "Metadata_Well", plan.well)
    truth.insert(4, "Metadata_Site", plan.site)
    truth.insert(5, "Metadata_Treatment", plan.treatment)
    truth.insert(6, "Metadata_MoA", TREATMENT_BY_NAME[plan.treatment].moa)
    return truth


def _draw_all(plans, root: Path, workers: int, progress: bool) -> pd.DataFrame:
    for plate in sorted({plan.plate for plan in plans}):
        (root / "images" / plate).mkdir(parents=True)
        (root / "masks" / plate).mkdir(parents=True)
    bar = _progress_bar(len(plans), "drawing fields", progress)
    if workers > 1:
        # spawn, not fork: the caller may have TensorFlow's threads running.
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_draw_and_write, plan, root) for plan in plans]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update()
            tables = [future.result() for future in futures]
    else:
        tables = []
        for plan in plans:
            tables.append(_draw_and_write(plan, root))
            bar.update()
    bar.close()
    return pd.concat(tables, ignore_index=True)


def _progress_bar(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="field", disable=not enabled, leave=False)


def _write_load_data(plans, root: Path) -> Path:
    """A CellProfiler LoadData CSV; PathName values are relative to the CSV's folder."""
    rows = []
    for plan in plans:
        row = {"ImageNumber": plan.image_number}
        for ch in CHANNELS:
            row[f"FileName_{ch}"] = f"{plan.stem}_{ch}.tif"
            row[f"PathName_{ch}"] = f"images/{plan.plate}"
        for obj in OBJECTS:
            row[f"ObjectsFileName_{obj}"] = f"{plan.stem}_{obj}.tif"
            row[f"ObjectsPathName_{obj}"] = f"masks/{plan.plate}"
        row.update(Metadata_Plate=plan.plate, Metadata_Well=plan.well, Metadata_Site=plan.site,
                   Metadata_Treatment=plan.treatment,
                   Metadata_MoA=TREATMENT_BY_NAME[plan.treatment].moa)
        rows.append(row)
    path = root / "load_data.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _measure(load_data: Path, out: Path, workers: int, progress: bool):
    """CellProfiler-style measurements of every nucleus and cell, via cp2image_tf.measuring.featurize."""
    # cp-measure takes a second to import: only when measuring, so argument errors stay fast.
    from cp2image_tf.measuring.featurize import featurize
    from cp2image_tf.measuring.measure import DEFAULT_MODULES

    featurize(load_data, out_dir=out, channels=list(CHANNELS), objects=list(OBJECTS),
              modules=DEFAULT_MODULES, workers=workers, overwrite=True, progress=progress)


def _write_readme(root: Path, cells: int, seed: int, plans):
    wells = sorted({(plan.plate, plan.well) for plan in plans})
    lines = [
        "cp2image-tf sample data: a synthetic fluorescence screen drawn by "
        "cp2image_tf.sampledata (not real cells).",
        f"{cells} cells in {len(plans)} fields of {FIELD_SHAPE[1]}x{FIELD_SHAPE[0]} px, "
        f"{len(wells)} wells on {len({p for p, _ in wells})} plates, seed {seed}.",
        "Channels: " + ", ".join(CHANNELS) + " (16-bit TIFF, one file per channel per field).",
        "",
        "images/<Plate>/<Plate>_<Well>_s<Site>_<Channel>.tif   the fields",
        "masks/<Plate>/<Plate>_<Well>_s<Site>_{Nuclei,Cells}.tif   labels (= ObjectNumber)",
        "load_data.csv      CellProfiler LoadData CSV (paths relative to this folder)",
        "cellprofiler/      Image.csv, Nuclei.csv, Cells.csv: measurements (cp-measure)",
        "ground_truth.csv   the generator's parameters for every cell",
        "",
        "Treatments (factors relative to DMSO; every parameter also varies from cell to cell)",
        "and their mechanism of action (Metadata_MoA; three share 'nuclear', two 'cytoskeletal'):",
    ]
    lines += [f"  {t.name:<12} {t.effect} (MoA: {t.moa})" for t in TREATMENTS]
    lines += ["", "ground_truth.csv columns (pixels; intensities in ADU above background, "
              "before vignetting and noise):"]
    lines += [f"  {name:<26} {meaning}" for name, meaning in GROUND_TRUTH_COLUMNS.items()]
    (root / "README.txt").write_text("\n".join(lines) + "\n")

