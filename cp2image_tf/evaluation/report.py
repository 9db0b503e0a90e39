"""evaluate's written outputs: report.json (JSON-safe), report.md (the headline table first)
and remeasured.parquet."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cp2image_tf.drawing.generate import file_label
from cp2image_tf.evaluation.compare import METHODS, THRESHOLD
from cp2image_tf.evaluation.retrieval import retrieval_lines, retrieval_note
from cp2image_tf.metrics import summarize



def json_safe(value):
    """JSON-safe: NaN and inf become None, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path, data) -> None:
    Path(path).write_text(json.dumps(json_safe(data), indent=1, allow_nan=False) + "\n")


def pixel_report(pixels: dict, treatments) -> dict:
    treatments = np.asarray(treatments)
    out = {}
    for name, values in pixels.items():
        entry = {"all": {k: summarize(v) for k, v in values.items()}}
        for t in sorted(set(treatments)):
            entry[t] = {k: summarize(v[treatments == t]) for k, v in values.items()}
        out[name] = entry
    return out


def module_report(modules: pd.DataFrame) -> dict:
    """metrics.module_summary's long table as {module: {"n_features": n, method: {...}}}."""
    out = {}
    for module, group in modules.groupby("module", sort=False):
        entry = {"n_features": int(group["n_features"].max())}
        for row in group.itertuples():
            entry[row.method] = {"median_r": row.median_r, "fraction": row.fraction,
                                 "nan_r": int(row.n_nan)}
        out[module] = entry
    return out


def report_markdown(report: dict) -> str:
    """The report's tables, readable."""
    lines = [f"# Evaluation of {report['model']}", "",
             f"{report['cells']} {report['split']} cells of {report['data']} "
             f"({', '.join(f'{t} {k}' for t, k in report['cells_per_treatment'].items())}); "
             f"nearest neighbours and the mean image from {report['reference_cells']} training "
             "cells.", ""]
    lines += feature_lines(report)
    check = report.get("ceiling_check") or {"passed": True}
    if check["passed"]:
        lines += headline_lines(report)
    else:
        lines += ["## No headline", "", f"No headline: {check['why']} The tables below are "
                  "kept for diagnosis.", ""]
    lines += ["## Pixels", "", "| method | MSE | PSNR (dB) | SSIM |", "|---|---|---|---|"]
    for name, entry in report["pixels"].items():
        a = entry["all"]
        lines.append(f"| {name} | {fmt(a['mse']['mean'], 5)} | {fmt(a['psnr']['mean'], 2)} | "
                     f"{fmt(a['ssim']['mean'], 3)} |")
    lines += ["", "## Feature preservation per module", "",
              f"Pearson r between input and re-measured features: median, and the share of "
              f"features with r >= {THRESHOLD}. The ceiling re-measures the real crops.", ""]
    lines += module_lines(report["modules"])
    lines += ["", "## Treatments", "",
              "Correlation of each treatment's mean re-measured profile with the real cells' "
              "(standardised features), and top-1 retrieval of the own treatment.", "",
              "| method | median r | retrieval | chance |", "|---|---|---|---|"]
    for name, entry in report["treatments"].items():
        lines.append(f"| {name} | {fmt(entry['median_r'], 3)} | {fmt(entry['retrieval_top1'], 2)} | "
                     f"{fmt(entry['chance'], 2)} |")
    if report.get("retrieval"):
        lines += [""] + retrieval_lines(report["retrieval"])
    if report.get("controllability"):
        lines += [""] + control_lines(report["controllability"])
    timing = report["timing"]
    lines += ["", "## Time", "",
              f"{timing['seconds']:.0f} s in all ({timing['measure_seconds']:.0f} s measuring "
              f"{timing['measured_crops']} crops on {timing['workers']} worker(s)): "
              f"{timing['seconds_per_1000_cells'] / 60:.1f} min per 1,000 cells, scaled from "
              f"{report['cells']} cells with the fixed costs (the controllability section, the "
              "charts, fitting the segmentation), which a small run's figure overstates.", ""]
    if timing.get("stages"):
        lines += ["| stage | seconds | share |", "|---|---|---|"] + [
            f"| {stage} | {seconds:.1f} | {seconds / timing['seconds']:.0%} |"
            for stage, seconds in timing["stages"].items()] + [""]
    failures = {k: v for k, v in report["segmentation_failures"].items() if v}
    if failures:
        lines += [f"Segmentation found no object in: "
                  f"{', '.join(f'{k} {v} cells' for k, v in failures.items())}.", ""]
    return "\n".join(lines)


CONTROL_WAYS = ("correlated", "alone", "lookup")


def control_lines(section: dict) -> list[str]:
    """The controllability section: what was traversed, then a table over all features, one
    per module and one per feature with its strip."""
    lines = ["## Controllability", ""]
    if not section.get("cells"):
        return lines + [f"Not measured: {section['why']}.", ""]
    lines += [
        f"{section['cells']} test cells, each moved from -{section['span']:g} to "
        f"+{section['span']:g} training SDs in {section['steps']} steps along "
        f"{len(section['features'])} features chosen from the data (per object and channel, "
        "the best re-measured of each kind), "
        + ("pinned: every step edits the training cell nearest the cell's profile. "
           if section["pinned"] else "each step drawn from its profile. ")
        + "Correlated: the other features move by their training regression on the asked one "
        "(as traverse --correlated); alone: only the asked one; lookup: the nearest training "
        "cell to each correlated step, its real crop. Every picture re-measured as above.", "",
        "Gain: the slope of the re-measured value on the asked value along the traversals, over "
        "the slope of the re-measured value on CellProfiler's over the real test crops (1: the "
        "picture changes as a real cell with that change re-measures; 0: it does not change). "
        "Spearman: along a traversal, median over cells. Specificity: how far the features "
        "with |training r| < 0.2 with the asked one move, in SD per SD asked (0: not at all).",
        "", "| | median gain | lowest module's gain | Spearman | specificity |",
        "|---|---|---|---|---|"]
    for way in CONTROL_WAYS:
        row = section["summary"][way]
        lines.append(f"| {way} | {fmt(row['gain'], 2)} | {fmt(row['lowest_module_gain'], 2)} | "
                     f"{fmt(row['spearman'], 2)} | {fmt(row['specificity'], 3)} |")
    trio = " / ".join(CONTROL_WAYS)
    lines += ["", f"Per module ({trio}):", "",
              "| module | features | gain | Spearman | specificity |", "|---|---|---|---|---|"]
    for module, row in section["modules"].items():
        lines.append(f"| {module} | {row['features']} | " + " | ".join(
            " / ".join(fmt(row[way][key], 3 if key == "specificity" else 2)
                       for way in CONTROL_WAYS)
            for key in ("gain", "spearman", "specificity")) + " |")
    lines += ["", f"Per feature ({trio}; ceiling: real crops' r):", "",
              "| feature | kind | ceiling r | gain | Spearman | specificity |",
              "|---|---|---|---|---|---|"]
    for entry in section["features"]:
        lines.append(f"| [{entry['feature']}](controllability/{file_label(entry['feature'])}.png)"
                     f" | {entry['kind']} | {fmt(entry['ceiling_r'], 2)} | " + " | ".join(
                         " / ".join(fmt(entry[way][key], 3 if key == "specificity" else 2)
                                    for way in CONTROL_WAYS)
                         for key in ("gain", "spearman", "specificity")) + " |")
    if section.get("skipped"):
        lines += ["", "Not traversed: " + "; ".join(f"{k}: {v}"
                                                    for k, v in section["skipped"].items()) + "."]
    timing = section["timing"]
    lines += ["", f"{timing['seconds']:.0f} s ({timing['measure_seconds']:.0f} s re-measuring "
                  f"{timing['measured_crops']} pictures).", "",
              f"Strips: cell {section['cell_ids'][0]} at each step, with the asked and the "
              "re-measured value under each picture.", ""]
    for entry in section["features"]:
        name = entry["feature"]
        lines += [f"![{name}](controllability/{file_label(name)}.png)", ""]
    return lines


def feature_lines(report: dict) -> list[str]:
    """How many features were re-measured, on which images, and why the others were not."""
    features = report["features"]
    lines = [f"{features['remeasured']} of {features['input']} features re-measured with "
             "cp-measure" + (f", on images named {', '.join(report['measured_as'])}"
                             if report.get("measured_as") and report["measured_as"]
                             != report["channels"] else "") + "."]
    reasons = features.get("not_remeasured_by_reason") or {}
    if reasons:
        lines += ["Not re-measured:", ""]
        lines += [f"- {count}: {reason}" for reason, count in reasons.items()]
    segmentation = report.get("segmentation")
    if segmentation:
        origin = segmentation.get("from", {})
        lines += ["", "Segmentation of every picture: nucleus threshold "
                  f"{fmt(segmentation['nucleus_threshold'], 4)} "
                  f"({origin.get('nucleus_threshold', '')}); touching nuclei: "
                  f"{origin.get('declumping', 'not split')}"
                  + (f" (typical diameter {fmt(segmentation['nucleus_diameter'], 1)} px)"
                     if segmentation["nucleus_diameter"] else "")
                  + f"; cell threshold {fmt(segmentation['cell_threshold'], 4)} "
                  f"({origin.get('cell_threshold', '')})."]
    return lines + [""]


HEADLINE_NAMES = {"model": "model", "nearest neighbour": "nearest neighbour",
                  "mean image": "mean image", "ceiling": "real cells (ceiling)"}


def headline_table(headline: dict) -> list[str]:
    methods = headline["methods"]
    kinds = [k for k in ("treatment", "moa") if f"{k}_accuracy" in methods["model"]]
    titles = {"treatment": "treatment accuracy", "moa": "MoA accuracy"}
    retrieval = "map" in methods["model"]  # treatment mAP and self-retrieval (retrieval.py)
    lines = [f"| | pixel SSIM | features r >= {THRESHOLD} | Fréchet distance | KID | "
             + "".join(f"{titles[k]} | " for k in kinds) + "mean-profile r |"
             + (" treatment mAP | self-retrieval top-1 | top 10% |" if retrieval else ""),
             "|---|---|---|---|---|" + "---|" * len(kinds) + "---|" + "---|" * 3 * retrieval]
    for method, label in HEADLINE_NAMES.items():
        row = methods[method]
        ssim = "1 (itself)" if method == "ceiling" else fmt(row["ssim"], 3)
        lines.append(f"| {label} | {ssim} | {fmt(row['fraction_r'], 2)} | {fmt(row['frechet'], 1)} "
                     f"| {fmt(row['kid'], 3)} | "
                     + "".join(f"{fmt(row[f'{k}_accuracy'], 2)} | " for k in kinds)
                     + f"{fmt(row['profile_r'], 2)} |"
                     + (f" {fmt(row['map'], 2)} | {fmt(row['self_top1'], 3)} | "
                        f"{fmt(row['self_top10pct'], 2)} |" if retrieval else ""))
    return lines


def headline_lines(report: dict) -> list[str]:
    """One table: each method against the real cells, the ceiling last; then the same for
    seen and unseen treatments when the split holds treatments training never saw."""
    cls = report["classification"]
    head = report["headline"]
    model, ceiling = head["all"]["methods"]["model"], head["all"]["methods"]["ceiling"]
    lines = headline_table(head["all"])
    lines += ["", f"Distances on the {ceiling['features']} re-measured features standardised with "
              f"{report['training_cells_measured']} re-measured training cells; N = "
              f"{model['n'][0]} generated vs {model['n'][1]} real cells (the ceiling: two halves "
              f"of the real cells, N = {ceiling['n'][0]} and {ceiling['n'][1]})."
              + (" N is below the number of features: the Fréchet distance is unreliable at "
                 "this size; KID is not." if model["n_below_features"] else "")]
    if cls:
        lines.append(f"Treatment accuracy: logistic regression trained on the re-measured "
                     f"training cells ({len(cls['classes'])} treatments, chance "
                     f"{fmt(cls['chance'], 2)})"
                     + ("; unseen treatments are scored as described under Unseen treatments."
                        if cls.get("unseen_protocol") else "."))
        if "moa" in cls:
            moa = cls["moa"]
            lines.append(f"MoA accuracy: the same, by {moa['column']} ({len(moa['classes'])} "
                         f"classes, chance {fmt(moa['chance'], 2)})"
                         + (f"; {', '.join(moa['unseen'])} not among the training cells, not "
                            "scored." if moa["unseen"] else "."))
    else:
        why = report.get("classifier_left_out") or "--no-classifier"
        lines.append(f"No treatment classifier: {why}." if why != "--no-classifier"
                     else "No treatment classifier (--no-classifier).")
    lines += ["Mean-profile r: median over treatments of the correlation between generated and "
              "real mean profiles; the ceiling from random split-halves of the real cells."]
    lines += retrieval_note(report.get("retrieval")) + [""]
    unseen = report.get("unseen_treatments") or []
    if unseen:
        lines += ["## Unseen treatments", "",
                  f"{', '.join(unseen)}: in the {report['split']} split but not among the "
                  "training cells (data converted with --split-by on the treatment). The model "
                  "draws them from their features alone.", ""]
        if cls.get("unseen_protocol"):
            protocol = cls["unseen_protocol"]
            lines += [f"Treatment accuracy for unseen treatments: a second classifier learns the "
                      f"training cells plus {protocol['learned_cells']} real cells (a random "
                      f"half of each unseen treatment) and is scored on the other "
                      f"{protocol['scored_cells']} (chance {fmt(protocol['chance'], 2)}).", ""]
        if "seen" not in head:
            lines += ["Every test treatment is unseen: the headline table above is theirs.", ""]
        for group, title in (("seen", "Seen treatments"), ("unseen", "Unseen treatments")):
            if group in head and "seen" in head:
                lines += [f"### {title}: {', '.join(head[group]['treatments'])} "
                          f"({head[group]['cells']} cells)", ""]
                lines += headline_table(head[group]) + [""]
    return lines


def fmt(value, digits) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) \
        else f"{value:.{digits}f}"


def module_lines(modules: dict) -> list[str]:
    header = "| module | features | " + " | ".join(f"{m} r / >= {THRESHOLD}" for m in METHODS) + " |"
    lines = [header, "|" + "---|" * (2 + len(METHODS))]
    for module, row in modules.items():
        cells = [f"{fmt(row[m]['median_r'], 2)} / {fmt(row[m]['fraction'], 2)}" for m in METHODS]
        lines.append(f"| {module} | {row['n_features']} | " + " | ".join(cells) + " |")
    return lines


def write_remeasured(path: Path, remeasured: dict, train: pd.DataFrame, cells, train_ids,
                      train_treatments) -> None:
    """Every re-measured feature behind the report, one row per picture: the real test cells
    (method "ceiling"), their generated and baseline pictures, and the training cells."""
    parts = []
    for name, frame in list(remeasured.items()) + [("training", train)]:
        ids, treatments = ((train_ids, train_treatments) if name == "training"
                           else (cells["cell_ids"], cells["treatments"]))
        part = frame.reset_index(drop=True).astype(np.float64)
        part.insert(0, "treatment", list(treatments))
        part.insert(0, "cell_id", list(ids))
        part.insert(0, "method", name)
        parts.append(part)
    pd.concat(parts, ignore_index=True).to_parquet(path, index=False)
