"""Train/val/test splits by group, so that no field, well or plate leaks across splits."""
from __future__ import annotations

import numpy as np
import pandas as pd

from tfrecords_tools.errors import UserInputError

SPLITS = ("train", "val", "test")


def parse_fractions(text) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); they must be non-negative and sum to 1."""
    if isinstance(text, str):
        try:
            parts = tuple(float(p) for p in text.split(","))
        except ValueError:
            parts = ()
    else:
        parts = tuple(float(p) for p in text)
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1) > 1e-6 or parts[0] == 0:
        raise UserInputError(
            f"--split {text!r}: give three fractions train,val,test that sum to 1, "
            "e.g. 0.8,0.1,0.1 (train must not be 0).")
    return parts


def assign_splits(groups: pd.Series, fractions=(0.8, 0.1, 0.1), seed: int = 0,
                  strata: pd.Series | None = None) -> np.ndarray:
    """Split name per cell, whole groups at a time (see assign_group_splits)."""
    keys = groups.astype(str).to_numpy()
    counts = dict(zip(*np.unique(keys, return_counts=True)))
    group_strata = None
    if strata is not None:
        group_strata = {}
        for g, s in zip(keys, strata.astype(str).to_numpy()):
            group_strata.setdefault(g, set()).add(s)
    split_of = assign_group_splits(counts, fractions, seed, group_strata)
    return np.asarray([split_of[k] for k in keys], dtype=str) if len(keys) else \
        np.asarray([], dtype=str)


def assign_group_splits(counts: dict, fractions=(0.8, 0.1, 0.1), seed: int = 0,
                        strata: dict | None = None) -> dict:
    """Split name per group, from the cells per group (`counts`, {group: cells}) and, with
    `strata`, the strata (e.g. treatments) of each group's cells ({group: set}).

    With strata and every group inside one stratum, each stratum's groups are split on their
    own, so that every treatment with enough groups is in every split (unless that would leave
    a split empty): a split gets a group when its share is at least half a group, and, so that a
    dose series with a few wells per dose is evaluated at every dose, test gets one of every
    stratum with 3 or more groups and val one of every stratum with 4 or more. Groups are
    visited in a seeded random order; each goes to the split furthest below its target number
    of cells. Only these per-group figures are used, so a planner streaming the cells gives
    the splits a whole-table one does.
    """
    counts = {str(g): int(n) for g, n in counts.items()}
    if strata is not None and all(len(s) == 1 for s in strata.values()):
        stratum_of = {str(g): str(next(iter(s))) for g, s in strata.items()}
        out = {}
        for k, stratum in enumerate(sorted(set(stratum_of.values()))):
            members = {g: counts[g] for g in counts if stratum_of[g] == stratum}
            extra = [i for i, least in ((2, 3), (1, 4)) if len(members) >= least and fractions[i] > 0]
            out.update(_assign(members, fractions, seed + 7919 * k, extra))
        n_groups = len(counts)
        wanted = {SPLITS[i] for i in range(3) if fractions[i] * n_groups >= 0.5}
        for missing in sorted(wanted - set(out.values()), key=SPLITS.index, reverse=True):
            _lend_a_group(out, stratum_of, missing, seed)
        # Too few groups per treatment to give every split some: split them all together.
        if wanted <= set(out.values()):
            return out
    return _assign(counts, fractions, seed)


def _lend_a_group(out: dict, stratum_of: dict, split: str, seed: int) -> None:
    """Give `split` one training group of the stratum with the most training groups (if it
    has two or more), in place: e.g. a val well when every dose has exactly 3 wells."""
    per_stratum = {}
    for g, s in out.items():
        if s == "train":
            per_stratum.setdefault(stratum_of[g], []).append(g)
    if not per_stratum or max(map(len, per_stratum.values())) < 2:
        return
    most = max(len(v) for v in per_stratum.values())
    biggest = min(s for s, v in per_stratum.items() if len(v) == most)
    groups = sorted(per_stratum[biggest])
    chosen = groups[np.random.default_rng(seed).integers(len(groups))]
    out[chosen] = split


def _assign(counts: dict, fractions, seed: int, extra=()) -> dict:
    unique = np.asarray(sorted(counts), dtype=str)
    sizes = np.asarray([counts[g] for g in unique], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(unique))
    targets = np.asarray(fractions, dtype=np.float64) * sizes.sum()
    filled = np.zeros(3)
    group_split = {}
    # A split is guaranteed a group when its share is at least half a group, or when `extra`
    # names it (train always comes first: a split of a stratum's groups keeps one to learn).
    wanted = sorted({i for i in range(3) if fractions[i] * len(unique) >= 0.5} | set(extra))
    for rank, g in enumerate(order):
        remaining = len(order) - rank
        empty = [i for i in wanted if filled[i] == 0]
        if empty and remaining <= len(empty):
            choice = empty[0]
        else:
            deficit = np.where(np.asarray(fractions) > 0, targets - filled, -np.inf)
            choice = int(np.argmax(deficit))
        group_split[str(unique[g])] = SPLITS[choice]
        filled[choice] += sizes[g]
    return group_split


def group_keys(table: pd.DataFrame, columns, source: str) -> pd.Series:
    """One key per cell from one or more columns ('Metadata_Plate,Metadata_Well')."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        known = [c for c in table.columns if c.startswith("Metadata_") or c == "ImageNumber"]
        raise UserInputError(
            f"--split-by {','.join(columns)}: no column {', '.join(missing)} in {source}. "
            f"Available: {', '.join(known[:12]) or 'none'}.")
    key = table[columns[0]].astype(str)
    for column in columns[1:]:
        key = key + "/" + table[column].astype(str)
    return key
