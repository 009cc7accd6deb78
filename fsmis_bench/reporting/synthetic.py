"""Synthetic run records and a tiny synthetic dataset, for tests and the report demo.

:func:`write_run` writes one run folder in exactly the engine's record format
(``run.json``, ``cases.csv``, ``train_log.csv``, ``predictions.npz`` through
:func:`fsmis_bench.records.save_predictions`, ``COMPLETE``), so the
reporting code can be exercised without training anything. :class:`SyntheticDataset` has the
dataset API the qualitative figure needs (``label_map``, ``load``, ``fold_cases``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.base import Volume
from ..records import CASE_COLUMNS, save_predictions  # cases.csv's columns, as the engine writes them


def write_run(
    results_dir: str | Path,
    method: str,
    dataset: str,
    setting: int,
    fold: int,
    seed: int,
    cases: Iterable[tuple[str, str, int, int, int]],
    *,
    train_dataset: str | None = None,
    backbone: str = "none",
    random_weights: bool = False,
    fidelity: str = "paper",
    non_standard: Sequence[str] = (),
    dice: str = "per_volume",
    complete: bool = True,
    train_log: pd.DataFrame | None = None,
    predictions: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] | None = None,
    config: Mapping[str, object] | None = None,
    finished_at: str = "2026-01-01T01:00:00+00:00",
    inputs: Mapping[str, object] | None = None,
    absent: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write one run record.

    Args:
        cases: ``(organ, case_id, tp, fp, fn)`` per query volume; Dice is derived from them.
        dataset: the test dataset (``train_dataset`` defaults to it).
        predictions: ``(organ, case_id) -> (slice_indices (K,), pred (K, H, W) bool)``.
        config: sections of a resolved run config written into ``config.yaml`` over the
            identity keys (e.g. ``{"train": {"steps": 40}}``; ``{"method": {"name": ...}}``
            replaces the method's name by a config node), and hashed into the folder name.
        finished_at: the record's finishing time (which of two identical runs is the later).
        inputs: the record's ``inputs`` (e.g. ``{"cpu_threads": 2}``, or a ``test_data``
            identity with its ``folds``); none by default, as records before identities.
        absent: the record's ``absent``: organ -> query case ids left out of that organ's
            mean because the scan does not show it (give them no row in ``cases``).
    Returns:
        the run folder.
    """
    train_dataset = train_dataset or dataset
    flags = list(non_standard) + (["random_weights"] if random_weights else [])
    protocol = {"supp_idx": 2, "n_part": 3, "n_shot": 1, "dice": dice, "exclusion": "any", "train_labels": "supervoxels"}
    config = {"method": method, "dataset": train_dataset, "test_dataset": dataset, "setting": setting, "fold": fold,
              "seed": seed, "backbone": backbone, "fidelity": fidelity, "flags": flags, "dice": dice,
              "protocol": {"episode_sampler": "reference"}, **dict(config or {})}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    folder = dataset if train_dataset == dataset else f"{train_dataset}_to_{dataset}"
    run_dir = Path(results_dir) / method / folder / f"setting{setting}" / f"fold{fold}" / f"seed{seed}-{config_hash}"
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "method": method, "dataset": train_dataset, "test_dataset": dataset, "setting": setting, "fold": fold,
        "seed": seed, "backbone": backbone, "pretrained": not random_weights, "random_weights": random_weights,
        "fidelity": fidelity, "protocol": protocol, "non_standard": flags, "config_hash": config_hash,
        "versions": {"fsmis_bench": "0.1.0"}, "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": finished_at if complete else None,
        "status": "complete" if complete else "running",
    }
    if inputs is not None:
        meta["inputs"] = dict(inputs)
    if absent is not None:
        meta["absent"] = {organ: [str(case) for case in cases] for organ, cases in absent.items()}
    (run_dir / "config.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    rows = []
    for organ, case_id, tp, fp, fn in cases:
        denominator = 2 * tp + fp + fn
        rows.append([method, dataset, train_dataset, setting, fold, seed, organ, str(case_id),
                     2 * tp / denominator if denominator else 1.0, tp, fp, fn])
    pd.DataFrame(rows, columns=CASE_COLUMNS).to_csv(run_dir / "cases.csv", index=False)
    if train_log is not None:
        train_log.to_csv(run_dir / "train_log.csv", index=False)
    if predictions is not None:
        save_predictions(run_dir / "predictions.npz", predictions)
    if complete:
        (run_dir / "COMPLETE").write_text("")
    return run_dir


def counts_for_dice(dice: float, size: int = 1000) -> tuple[int, int, int]:
    """TP/FP/FN with Dice ``dice`` for an organ of ``size`` voxels (FP = FN)."""
    dice = float(np.clip(dice, 1e-3, 1.0))
    tp = int(round(size * dice))
    # 2tp / (2tp + 2e) = dice  ->  e = tp (1 - dice) / dice
    error = int(round(tp * (1 - dice) / dice))
    return tp, error, size - tp if size > tp else error


class SyntheticDataset:
    """Ellipsoid organs in noise: the dataset API of the qualitative figure.

    Args:
        name: dataset name reported by :attr:`name`.
        organs: organ names; label values 1..n in this order.
        n_cases: case ids ``"1"`` .. ``str(n_cases)``.
        shape: ``(Z, H, W)`` of every volume.
    """

    folds = ((0, 1, 2, 3, 4), (4, 5, 6, 7, 8), (8, 9, 10, 11, 12), (12, 13, 14, 15, 16), (0, 16, 17, 18, 19))

    def __init__(self, name: str, organs: Sequence[str], n_cases: int = 20, shape: tuple[int, int, int] = (12, 64, 64)) -> None:
        self.name = name
        self.label_map = {organ: i + 1 for i, organ in enumerate(organs)}
        self.n_cases = n_cases
        self.shape = shape

    def case_ids(self) -> list[str]:
        return [str(i + 1) for i in range(self.n_cases)]

    def fold_cases(self, fold: int) -> list[str]:
        ids = self.case_ids()
        return [ids[i % len(ids)] for i in self.folds[fold]]

    def load(self, case_id: str) -> Volume:
        rng = np.random.default_rng(int(case_id))
        z, h, w = self.shape
        zz, yy, xx = np.meshgrid(np.arange(z), np.arange(h), np.arange(w), indexing="ij")
        label = np.zeros(self.shape, dtype=np.int32)
        image = rng.normal(0.2, 0.05, self.shape).astype(np.float32)
        n = len(self.label_map)
        for i, (organ, value) in enumerate(self.label_map.items()):
            angle = 2 * np.pi * i / max(n, 1)
            cy, cx = h / 2 + h * 0.25 * np.sin(angle), w / 2 + w * 0.25 * np.cos(angle)
            cz = z / 2 + rng.uniform(-1, 1)
            ry, rx, rz = h * rng.uniform(0.1, 0.16), w * rng.uniform(0.1, 0.16), z * 0.35
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + ((zz - cz) / rz) ** 2 <= 1
            label[inside] = value
            image[inside] += 0.3 + 0.15 * i
        return Volume(str(case_id), image, label)

    def loader(self, name: str) -> "SyntheticDataset":
        return self


def predict_like(truth: np.ndarray, quality: float, rng: np.random.Generator) -> np.ndarray:
    """A plausible prediction: the truth shifted and dilated/eroded by ``1 - quality``.

    Args:
        truth: ``(K, H, W)`` bool.
    Returns:
        ``(K, H, W)`` bool.
    """
    from scipy import ndimage

    shift = int(round((1 - quality) * 8))
    pred = np.roll(truth, (rng.integers(-shift, shift + 1), rng.integers(-shift, shift + 1)), axis=(1, 2))
    iterations = max(1, int(round((1 - quality) * 4)))
    structure = np.ones((1, 3, 3), dtype=bool)
    if rng.random() < 0.5:
        return ndimage.binary_dilation(pred, structure, iterations=iterations)
    return ndimage.binary_erosion(pred, structure, iterations=iterations)


def make_demo_results(results_dir: str | Path, seed: int = 0) -> dict[str, SyntheticDataset]:
    """A small results root with every kind of run the report handles.

    Three in-domain methods on two datasets and two settings, a cross-domain run, the SD-FSMIS
    ablation, two backbones, an incomplete run, a random-weights run, a pooled-Dice run, an
    unfinished run, training logs and predictions.

    Returns:
        dataset name -> the synthetic dataset the predictions were drawn from.
    """
    rng = np.random.default_rng(seed)
    datasets = {
        "abd_mri": SyntheticDataset("abd_mri", ("liver", "right_kidney", "left_kidney", "spleen")),
        "card_mri": SyntheticDataset("card_mri", ("lv_myo", "lv_bp", "rv")),
    }
    quality = {"adnet": 0.72, "ssl_alpnet": 0.68, "diffews": 0.76, "sdfsmis": 0.80,
               "sdfsmis_sii": 0.74, "sdfsmis_qe": 0.77, "sdfsmis_vtct": 0.76}

    def one(method, dataset_name, setting, fold, run_seed, *, train_dataset=None, q_shift=0.0, backbone="none",
            with_predictions=True, **kwargs):
        ds = datasets[dataset_name]
        fold_ids = ds.fold_cases(fold)
        queries = [c for i, c in enumerate(fold_ids) if i != 2]
        cases, preds = [], {}
        for organ in ds.label_map:
            base = quality[method] + q_shift - 0.05 * (setting - 1) + rng.normal(0, 0.02)
            for case_id in queries:
                d = float(np.clip(base + rng.normal(0, 0.05), 0.05, 0.98))
                cases.append((organ, case_id, *counts_for_dice(d)))
                if with_predictions and fold == 0:
                    volume = ds.load(case_id)
                    truth = volume.label == ds.label_map[organ]
                    slices = np.flatnonzero(truth.any(axis=(1, 2)))
                    preds[(organ, case_id)] = (slices, predict_like(truth[slices], d, rng))
        steps = np.arange(0, 500, 10)
        log = pd.DataFrame({
            "step": steps,
            "loss": 0.5 * np.exp(-steps / (150 + 50 * quality[method])) + 0.05 + rng.normal(0, 0.02, len(steps)).clip(-0.04),
            "lr": 1e-5, "elapsed_s": steps * 0.5,
        })
        write_run(results_dir, method, dataset_name, setting, fold, run_seed, cases, train_dataset=train_dataset,
                  backbone=backbone, train_log=log, predictions=preds or None, **kwargs)

    for method in ("adnet", "ssl_alpnet", "diffews", "sdfsmis"):
        backbone = "sd15" if method in ("diffews", "sdfsmis") else "none"
        for dataset_name in datasets:
            for setting in (1, 2):
                for fold in range(5):
                    one(method, dataset_name, setting, fold, 0, backbone=backbone)
    for fold in range(5):  # a second seed for SD-FSMIS on Abd-MRI, setting 1
        one("sdfsmis", "abd_mri", 1, fold, 1, backbone="sd15", with_predictions=False)
    for method in ("sdfsmis_sii", "sdfsmis_qe", "sdfsmis_vtct"):
        for fold in range(5):
            one(method, "abd_mri", 1, fold, 0, backbone="sd15", with_predictions=False)
    for fold in range(5):
        one("sdfsmis", "abd_mri", 1, fold, 0, backbone="sd21", q_shift=-0.02, with_predictions=False)
        one("sdfsmis", "abd_mri", 1, fold, 0, train_dataset="card_mri", backbone="sd15", q_shift=-0.25,
            with_predictions=False)
        one("diffews", "abd_mri", 1, fold, 0, backbone="sd15", q_shift=-0.5, random_weights=True,
            with_predictions=False)
        one("sdfsmis", "abd_mri", 1, fold, 0, backbone="sd15", dice="pooled", non_standard=["dice=pooled"],
            with_predictions=False)
    quality["panet"] = 0.55
    for fold in range(3):  # incomplete: 3 of 5 folds finished, the fourth still running
        one("panet", "abd_mri", 1, fold, 0, with_predictions=False)
    one("panet", "abd_mri", 1, 3, 0, with_predictions=False, complete=False)
    return datasets


#: a third-party method with a long name and no registered display (stress test of layouts)
LONG_PLUGIN_METHOD = "my_extremely_long_third_party_plugin_method_name"
#: a custom dataset with a long name, as a user's own folder would be registered
LONG_DATASET = "hospital_b_contrast_enhanced_abdominal_ct_scans_2024"
LONG_ORGANS = ("portal_splenic_vein", "left_adrenal", "right_kidney", "liver")


def make_long_name_results(results_dir: str | Path, seed: int = 0) -> dict[str, SyntheticDataset]:
    """Records whose names and markers stress every figure's layout.

    Long method, variant, dataset and organ names; a method at exactly zero Dice; one-fold
    and two-fold methods; random weights, code fidelity and non-standard options; a
    cross-domain evaluation; both settings; training logs and predictions (fold 0).

    Returns:
        dataset name -> the synthetic dataset the predictions were drawn from.
    """
    rng = np.random.default_rng(seed)
    datasets = {
        "abd_mri": SyntheticDataset("abd_mri", ("liver", "right_kidney", "left_kidney", "spleen"), shape=(8, 40, 40)),
        LONG_DATASET: SyntheticDataset(LONG_DATASET, LONG_ORGANS, shape=(8, 40, 40)),
    }

    def one(method, dataset_name, setting, fold, quality, *, train_dataset=None, **kwargs):
        ds = datasets[dataset_name]
        queries = [c for i, c in enumerate(ds.fold_cases(fold)) if i != 2]
        cases, preds = [], {}
        for organ in ds.label_map:
            for case_id in queries:
                volume = ds.load(case_id)
                truth = volume.label == ds.label_map[organ]
                size = int(truth.sum())
                if quality == 0:  # an empty prediction: Dice exactly 0
                    cases.append((organ, case_id, 0, 0, size))
                    predicted = np.zeros_like(truth)
                else:
                    d = float(np.clip(quality + rng.normal(0, 0.05), 0.05, 0.98))
                    cases.append((organ, case_id, *counts_for_dice(d, max(size, 1))))
                    predicted = predict_like(truth, d, rng)
                if fold == 0:
                    slices = np.flatnonzero(truth.any(axis=(1, 2)))
                    preds[(organ, case_id)] = (slices, predicted[slices])
        steps = np.arange(0, 200, 10)
        log = pd.DataFrame({"step": steps, "loss": 0.6 * np.exp(-steps / 80) + 0.05 + rng.normal(0, 0.01, len(steps)).clip(-0.04),
                            "lr": 1e-4, "elapsed_s": steps * 0.1})
        write_run(results_dir, method, dataset_name, setting, fold, 0, cases, train_dataset=train_dataset,
                  train_log=log, predictions=preds or None, **kwargs)

    for dataset_name in datasets:
        for setting in (1, 2):
            for fold in range(5):
                one("sdfsmis", dataset_name, setting, fold, 0.78, backbone="sd15")
                one("ssl_alpnet", dataset_name, setting, fold, 0.70)
                one(LONG_PLUGIN_METHOD, dataset_name, setting, fold, 0.5 - 0.1 * (setting - 1))
    for fold in range(2):  # two folds, every marker at once
        one("sdfsmis_qe", "abd_mri", 1, fold, 0.6, backbone="sd21", fidelity="code", random_weights=True,
            non_standard=["dice=pooled", "exclusion=all", "protocol.max_queries=1"], dice="pooled")
    one("support_copy", "abd_mri", 1, 0, 0.0)  # one fold, Dice exactly 0
    for fold in range(5):
        one("sdfsmis", "abd_mri", 1, fold, 0.6, train_dataset=LONG_DATASET, backbone="sd15")
    return datasets
