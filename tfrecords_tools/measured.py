"""Which image CellProfiler measured for each cropped channel, and how CellProfiler saw it.

A pipeline usually loads raw images and measures corrected ones: JUMP's Cell Painting
pipelines load `OrigDNA` and measure `CorrDNA`; BBBC013's loads `rawGFP` and measures
`CorrGreen`. The features are named after the measured image
(`Cells_Intensity_MeanIntensity_CorrGreen`), the files after the loaded one
(`FileName_rawGFP`). `measured_images` finds the measured names in the feature columns and
`pair_channels` says which belongs to which channel: a channel measured under its own name,
else an explicit `--measured-as rawGFP=CorrGreen`, else a unique match of the names less the
usual prefixes (Orig, Raw, Corr, Illum).

`--illum rawGFP=IllumGFP` crops the corrected image instead, as CellProfiler's
CorrectIlluminationApply (Divide) made it: the raw image scaled as CellProfiler scales it
(`Scaling_<channel>` in Image.csv, else the bit depth) divided by the illumination function
named in Image.csv's `FileName_IllumGFP` (a CellProfiler .mat, a .npy as JUMP writes, or a TIFF).
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from tfrecords_tools.errors import UserInputError

PREFIXES = ("orig", "raw", "corr", "illum")
# CellProfiler measurement categories whose columns end in (or hold) an image name.
_PER_IMAGE = re.compile(r"^(?:[A-Za-z0-9]+_)?(Intensity_[A-Za-z]+|Granularity_\d+)_(?P<image>.+)$")


def parse_map(text, option: str) -> dict[str, str]:
    """'rawGFP=CorrGreen,rawDNA=CorrBlue' (or a dict) -> {"rawGFP": "CorrGreen", ...}."""
    if not text:
        return {}
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    out = {}
    for item in str(text).split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise UserInputError(f"{option} {text}: give CHANNEL=NAME pairs separated by commas, "
                                 "e.g. rawGFP=CorrGreen,rawDNA=CorrBlue.")
        if key in out:
            raise UserInputError(f"{option} {text}: channel {key} is named twice.")
        out[key] = value
    return out


def measured_images(columns) -> list[str]:
    """Image names the per-image features of `columns` are measured on (Intensity_<x>_<image>,
    Granularity_<n>_<image>), in order of first appearance."""
    found = {}
    for column in columns:
        match = _PER_IMAGE.match(str(column))
        if match and not match.group("image").startswith(("X_", "Y_", "Z_")):
            found.setdefault(match.group("image"), None)
    return list(found)


def _stem(name: str) -> str:
    lower = name.lower()
    for prefix in PREFIXES:
        if lower.startswith(prefix) and len(lower) > len(prefix):
            return lower[len(prefix):].lstrip("_")
    return lower


def pair_channels(channels, measured, explicit: dict | None, source) -> dict[str, str]:
    """{channel: measured image name} for every channel whose features are in the table.

    A channel named in `explicit` takes that name; one that is itself a measured name keeps
    it; else the measured name with the same stem (less Orig/Raw/Corr/Illum) when exactly one
    has it. Measured images left without a channel are an error naming --measured-as.
    """
    explicit = dict(explicit or {})
    # CHANNEL=none: no feature is measured on this channel (e.g. a brightfield image).
    unmeasured = {k for k, v in explicit.items() if v.lower() == "none"}
    explicit = {k: v for k, v in explicit.items() if k not in unmeasured}
    unknown = [k for k in list(explicit) + sorted(unmeasured) if k not in channels]
    if unknown:
        raise UserInputError(f"--measured-as: {', '.join(unknown)} is not one of --channels "
                             f"({', '.join(channels)}).")
    missing = [v for v in explicit.values() if v not in measured]
    if missing:
        raise UserInputError(
            f"--measured-as: no feature of {source} is measured on {', '.join(missing)}; the "
            f"features name these images: {', '.join(measured) or 'none'}.")
    pairs = dict(explicit)
    for ch in channels:
        if ch in pairs or ch in unmeasured:
            continue
        if ch in measured:
            pairs[ch] = ch
            continue
        taken = set(pairs.values())
        same = [m for m in measured if m not in taken and _stem(m) == _stem(ch)]
        if len(same) == 1:
            pairs[ch] = same[0]
    _check_pairs(channels, pairs, unmeasured, measured, source)
    left = [m for m in measured if m not in pairs.values()]
    unpaired = [ch for ch in channels if ch not in pairs and ch not in unmeasured]
    if left and unpaired:
        example = ",".join(f"{c}=NAME" for c in unpaired)
        raise UserInputError(
            f"{source}: the features are measured on {', '.join(left)}, which do not pair "
            f"with channel(s) {', '.join(unpaired)} by name. Say which image each channel's "
            f"features were measured on: --measured-as {example}, NAME one of "
            f"{', '.join(left)}, or none for a channel without features.")
    return {ch: pairs[ch] for ch in channels if ch in pairs}


def _check_pairs(channels, pairs: dict, unmeasured: set, measured, source) -> None:
    """Pairings that cannot be right: one measured image for two channels, a channel said to
    have no features while features are named after it, no channel measured at all."""
    by_image = {}
    for ch, image in pairs.items():
        by_image.setdefault(image, []).append(ch)
    shared = {image: chs for image, chs in by_image.items() if len(chs) > 1}
    if shared:
        image, chs = next(iter(shared.items()))
        raise UserInputError(
            f"--measured-as: channels {' and '.join(chs)} are both paired with the measured "
            f"image {image} (a channel of that name is measured under its own name); each "
            "measured image belongs to one channel. Name the image each channel was measured "
            f"on (one of {', '.join(measured)}), or none for a channel without features.")
    own = [ch for ch in channels if ch in unmeasured and ch in measured]
    if own:
        raise UserInputError(
            f"--measured-as {own[0]}=none: features of {source} are measured on {own[0]} (e.g. "
            f"Intensity_..._{own[0]}); leave {own[0]}=none out, or pair it with the image its "
            "features were measured on.")
    if measured and not pairs and set(channels) <= unmeasured:
        raise UserInputError(
            f"--measured-as: no channel is paired with a measured image, but the features of "
            f"{source} are measured on {', '.join(measured)}. Pair at least one channel "
            "(CHANNEL=IMAGE), or leave out the features measured on images not cropped "
            "(--exclude).")


def scaling_of(image_df: pd.DataFrame, channel: str) -> float | None:
    """What CellProfiler divided a channel's pixels by: Image.csv's Scaling_<channel> (the
    median over image sets), or None when the table does not say (then: the bit depth)."""
    column = f"Scaling_{channel}"
    if column not in image_df.columns:
        return None
    values = pd.to_numeric(image_df[column], errors="coerce").dropna()
    return float(values.median()) if len(values) and values.median() > 0 else None


def dtype_max(dtype) -> float:
    """The bit depth's maximum (65535 for uint16), 1 for float images."""
    dtype = np.dtype(dtype)
    return float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


def full_scale(dtype, scaling: float | None) -> float:
    """`scaling` when known, else the bit depth's maximum (`dtype_max`)."""
    return float(scaling) if scaling else dtype_max(dtype)


def load_illumination(path: str) -> np.ndarray:
    """An illumination function as float64 (H, W): CellProfiler's .mat (variable `Image`), .npy
    or a TIFF."""
    try:
        if path.endswith(".mat"):
            import scipy.io

            content = scipy.io.loadmat(path)
            arrays = [v for k, v in content.items() if not k.startswith("__")
                      and isinstance(v, np.ndarray) and v.ndim == 2]
            array = content.get("Image", arrays[0] if len(arrays) == 1 else None)
            if array is None:
                raise ValueError("no variable 'Image' and not exactly one 2-D array")
        elif path.endswith(".npy"):
            array = np.load(path)
        else:
            import tifffile

            array = tifffile.imread(path)
    except FileNotFoundError:
        raise UserInputError(f"{path}: illumination function not found (--illum).") from None
    except Exception as err:  # noqa: BLE001 - scipy/tifffile raise many types
        raise UserInputError(f"{path}: cannot be read as an illumination function ({err}); "
                             "--illum takes CellProfiler .mat, .npy or TIFF files.") from None
    array = np.squeeze(np.asarray(array, dtype=np.float64))
    if array.ndim != 2:
        raise UserInputError(f"{path}: an illumination function must be 2-D, found shape "
                             f"{array.shape}.")
    if not np.all(np.isfinite(array)) or array.min() <= 0:
        raise UserInputError(f"{path}: the illumination function has values <= 0 or not finite; "
                             "CellProfiler divides by it, so every value must be positive.")
    return array


def correct(plane: np.ndarray, scale: float, illumination: np.ndarray | None,
            path: str) -> np.ndarray:
    """CorrectIlluminationApply's Divide: plane / scale / illumination (or plane / scale
    without one), float32."""
    if illumination is None:
        return (plane.astype(np.float64) / scale).astype(np.float32)
    if illumination.shape != plane.shape:
        raise UserInputError(f"{path}: the illumination function is {illumination.shape[1]}x"
                             f"{illumination.shape[0]} px but the image is {plane.shape[1]}x"
                             f"{plane.shape[0]}; --illum must name the function made for it.")
    return (plane.astype(np.float64) / scale / illumination).astype(np.float32)


def object_thresholds(image_df: pd.DataFrame, objects, image_numbers) -> dict:
    """CellProfiler's final threshold per object set, from Image.csv's
    Threshold_FinalThreshold_<object> over the image sets `image_numbers` (the training split's):
    {object: {"median", "min", "max", "images"}}, in CellProfiler's units (fractions of the
    scale in `scaling_of` / `full_scale`)."""
    rows = image_df[image_df["ImageNumber"].isin(list(image_numbers))]
    out = {}
    for obj in objects:
        column = f"Threshold_FinalThreshold_{obj}"
        if column not in rows.columns:
            continue
        values = pd.to_numeric(rows[column], errors="coerce").dropna()
        if len(values):
            out[obj] = {"median": float(values.median()), "min": float(values.min()),
                        "max": float(values.max()), "images": int(len(values)),
                        "column": column}
    return out
