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


#: columns that, where a frame has them, tell apart rows that must never be pooled into one
#: fold score: the training dataset (a cross-domain run tests on the same dataset as an
#: in-domain one) and the report's variant key (backbone, non-standard options, ...). The
#: training seed (each seed its own trained model) is scored apart too, then averaged.
SEPARATE_BY = ("train_dataset", "variant")


def fold_organ_scores(cases: pd.DataFrame, mode: str = "per_volume") -> pd.DataFrame:
    """Organ score per fold from per-case rows: per seed, then the mean over seeds.

    A fold's organ score belongs to one trained model, so rows of several seeds (or of an
    in-domain and a cross-domain run, or of two report variants) are never pooled into one
    score: pooling TP/FP/FN over seeds is not the mean over seeds of each seed's pooled Dice,
    and a per-volume mean over seeds that evaluated different volumes would weigh them
    unevenly. Each seed's score is computed as for a single run, then averaged over the seeds,
    as the report's fold scores are (``reporting.collect.compute_fold_scores``); for rows of
    one seed the score is exactly the single run's.

    Args:
        cases: columns method, dataset, setting, fold, organ, case_id, dice, tp, fp, fn;
            where present, ``seed`` and :data:`SEPARATE_BY` (``train_dataset``, ``variant``)
            keep their rows apart (cases.csv has ``seed`` and ``train_dataset``).
        mode: ``per_volume`` — mean of the query volumes' 3-D Dice; ``pooled`` — Dice of
            TP/FP/FN summed over the query volumes.
    Returns:
        one row per (method, dataset, setting, fold, organ; and train_dataset, variant where
        the input has them) with columns ``dice`` (0..1, the mean over seeds of each seed's
        score) and ``n_seeds`` (1 where the input has no ``seed`` column).
    """
    if mode not in DICE_MODES:
        raise ConfigError(f"unknown Dice mode {mode!r}", hint=f"use one of {DICE_MODES}")
    keys = ["method", "dataset", "setting", "fold", "organ"]
    keys += [column for column in SEPARATE_BY if column in cases.columns]
    per_seed_keys = keys + (["seed"] if "seed" in cases.columns else [])
    if mode == "per_volume":
        per_seed = cases.groupby(per_seed_keys, sort=False)["dice"].mean().reset_index()
    else:
        sums = cases.groupby(per_seed_keys, sort=False)[["tp", "fp", "fn"]].sum().reset_index()
        sums["dice"] = [dice_from_counts(r.tp, r.fp, r.fn) for r in sums.itertuples()]
        per_seed = sums[per_seed_keys + ["dice"]]
    if "seed" not in per_seed.columns:
        return per_seed.assign(n_seeds=1)
    # the mean of one value is that value: a single seed's score comes out unchanged
    return (per_seed.groupby(keys, sort=False)
            .agg(dice=("dice", "mean"), n_seeds=("seed", "nunique"))
            .reset_index())
