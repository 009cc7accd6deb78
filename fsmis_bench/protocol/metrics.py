"""Dice metrics: 3-D Dice per query volume (default) and pooled Dice (released SD-FSMIS code)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import ConfigError

DICE_MODES = ("per_volume", "pooled")


def confusion_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` of two boolean arrays of the same shape, e.g. ``(K, H, W)``.

    Exact integers, written here rather than taken from MONAI's ``get_confusion_matrix``,
    which rounds its counts to float32 and derives FP from the true negatives: past 2**24
    voxels FP can be off by a few (seen on a 512 x 512 x 300 volume). ``tests/test_protocol.py``
    checks the Dice against MONAI's ``compute_dice``."""
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return tp, fp, fn


def dice_from_counts(tp: float, fp: float, fn: float) -> float:
    """``2TP / (2TP + FP + FN)``; 1.0 when both masks are empty."""
    denominator = 2 * tp + fp + fn
    return 1.0 if denominator == 0 else float(2 * tp / denominator)


def fold_organ_scores(cases: pd.DataFrame, mode: str = "per_volume") -> pd.DataFrame:
    """Organ score per fold from per-case rows.

    Args:
        cases: columns method, dataset, setting, fold, organ, case_id, dice, tp, fp, fn.
        mode: ``per_volume`` — mean of the query volumes' 3-D Dice; ``pooled`` — Dice of
            TP/FP/FN summed over the query volumes.
    Returns:
        one row per (method, dataset, setting, fold, organ) with column ``dice`` (0..1).
    """
    if mode not in DICE_MODES:
        raise ConfigError(f"unknown Dice mode {mode!r}", hint=f"use one of {DICE_MODES}")
    keys = ["method", "dataset", "setting", "fold", "organ"]
    if mode == "per_volume":
        out = cases.groupby(keys, sort=False)["dice"].mean().reset_index()
    else:
        sums = cases.groupby(keys, sort=False)[["tp", "fp", "fn"]].sum().reset_index()
        sums["dice"] = [dice_from_counts(r.tp, r.fp, r.fn) for r in sums.itertuples()]
        out = sums[keys + ["dice"]]
    return out
