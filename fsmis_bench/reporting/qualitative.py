"""Qualitative figure (cf. SD-FSMIS Fig. 5): query slices with ground truth and predictions.

One row per chosen query slice: the image with the ground-truth contour, then one panel per
method with its predicted contour (ground truth dashed for reference). Predictions come from
the run records (``predictions.npz``), images and labels from the dataset.

Slices are chosen reproducibly: per organ, the kept query slice with the largest
ground-truth area in the first query case (in fold order) of fold 0, or named by the user as
``[dataset:]organ:case_id:z``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import records
from ..errors import FsmisError
from .collect import Results, dataset_label, dataset_sort_key, organ_label, organ_sort_key, row_label
from .figures import WIDTH_IN, paper_style, save_figure

#: predictions of one run: (organ, case_id) -> (slice indices (K,), masks (K, H, W) bool)
Predictions = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
DatasetLoader = Callable[[str], object]


@dataclass(frozen=True)
class SliceChoice:
    dataset: str
    organ: str
    case_id: str
    z: int


def load_predictions(run_dir: str | Path) -> Predictions:
    """Predicted masks of one run (empty without ``predictions.npz``).

    Thin wrapper of :func:`fsmis_bench.records.load_predictions`, the engine's format.
    """
    return dict(records.load_predictions(Path(run_dir)))


def parse_slices(text: str | None) -> list[tuple[str | None, str, str, int]]:
    """``"liver:1:17,abd_mri:spleen:3:20"`` -> [(None, liver, 1, 17), (abd_mri, spleen, 3, 20)]."""
    if not text:
        return []
    parsed = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (3, 4) or not parts[-1].lstrip("-").isdigit():
            raise FsmisError(
                f"cannot read slice {item!r}",
                hint="write slices as organ:case_id:z or dataset:organ:case_id:z, separated by commas",
            )
        dataset = parts[0] if len(parts) == 4 else None
        organ, case_id, z = parts[-3], parts[-2], int(parts[-1])
        parsed.append((dataset, organ, case_id, z))
    return parsed


def default_loader(data_root: str | Path | None) -> DatasetLoader:
    """Datasets through the project API, with ``data_root`` or ``FSMIS_DATA_ROOT``."""
    root = data_root if data_root not in (None, "") else os.environ.get("FSMIS_DATA_ROOT")

    def load(name: str):
        from ..api import load_dataset  # type: ignore[import-not-found]

        return load_dataset(name, root)

    return load


def _prediction_runs(results: Results, dataset: str, setting: int) -> pd.DataFrame:
    runs = results.runs
    runs = runs[(runs["dataset"] == dataset) & (runs["train_dataset"] == dataset) & (runs["setting"] == setting)]
    has = [(Path(d) / "predictions.npz").is_file() for d in runs["run_dir"]]
    return runs[pd.Series(has, index=runs.index, dtype=bool)].sort_values(["method", "variant", "fold", "seed"])


def _fold_order(dataset_obj: object, fold: int, cases: Sequence[str]) -> list[str]:
    """Query case ids of ``fold`` in the dataset's fold order (cases.csv order if unknown)."""
    order = list(dict.fromkeys(cases))
    fold_cases = getattr(dataset_obj, "fold_cases", None)
    if callable(fold_cases):
        try:
            known = [c for c in fold_cases(fold) if c in set(order)]
            return known + [c for c in order if c not in known]
        except Exception:  # noqa: BLE001 - a dataset without folds still has a cases.csv order
            pass
    return order


def choose_slices(
    results: Results, dataset: str, setting: int, dataset_obj: object, named: Sequence[tuple[str | None, str, str, int]] = ()
) -> list[SliceChoice]:
    """The slices to show for one (dataset, setting)."""
    if named:
        return [SliceChoice(dataset, organ, case_id, z) for ds, organ, case_id, z in named if ds in (None, dataset)]
    cases = results.cases
    cases = cases[(cases["dataset"] == dataset) & (cases["train_dataset"] == dataset) & (cases["setting"] == setting)]
    if cases.empty:
        return []
    first_fold = int(cases["fold"].min())
    cases = cases[cases["fold"] == first_fold]
    label_map = getattr(dataset_obj, "label_map", {})
    choices = []
    for organ in sorted(cases["organ"].unique(), key=organ_sort_key):
        if organ not in label_map:
            continue
        order = _fold_order(dataset_obj, first_fold, list(cases.loc[cases["organ"] == organ, "case_id"]))
        if not order:
            continue
        volume = dataset_obj.load(order[0])
        area = (np.asarray(volume.label) == label_map[organ]).sum(axis=(1, 2))
        if area.max() == 0:
            continue
        choices.append(SliceChoice(dataset, organ, order[0], int(np.argmax(area))))
    return choices


def _contour(ax, mask: np.ndarray, colour: str, style: str = "solid", width: float = 1.0) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=width, linestyles=style)


def _display(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [1, 99])
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def qualitative_figure(
    results: Results, dataset: str, setting: int, dataset_obj: object,
    named: Sequence[tuple[str | None, str, str, int]] = (),
):
    """The figure for one (dataset, setting), or None when there is nothing to show."""
    import matplotlib.pyplot as plt

    runs = _prediction_runs(results, dataset, setting)
    choices = choose_slices(results, dataset, setting, dataset_obj, named)
    if runs.empty or not choices:
        return None
    cache: dict[str, Predictions] = {}

    def predictions(run_dir: str) -> Predictions:
        if run_dir not in cache:
            cache[run_dir] = load_predictions(run_dir)
        return cache[run_dir]

    methods = list(dict.fromkeys(zip(runs["method"], runs["variant"])))
    panel_in = min(1.6, WIDTH_IN / (len(methods) + 1))
    with paper_style():
        fig, axes = plt.subplots(len(choices), len(methods) + 1, figsize=(panel_in * (len(methods) + 1), panel_in * len(choices) + 0.3),
                                 squeeze=False)
        label_map = getattr(dataset_obj, "label_map", {})
        for row, choice in enumerate(choices):
            volume = dataset_obj.load(choice.case_id)
            if not 0 <= choice.z < volume.image.shape[0]:
                raise FsmisError(f"slice {choice.z} is outside case {choice.case_id} ({volume.image.shape[0]} slices)",
                                 hint="pick z within the volume's slices")
            image = _display(np.asarray(volume.image[choice.z], dtype=float))
            truth = np.asarray(volume.label[choice.z]) == label_map.get(choice.organ, -1)
            axes[row, 0].imshow(image, cmap="gray", interpolation="nearest")
            _contour(axes[row, 0], truth, "lime", width=1.2)
            axes[row, 0].set_ylabel(f"{organ_label(choice.organ)}\ncase {choice.case_id}, z={choice.z}")
            for col, (method, variant) in enumerate(methods, start=1):
                ax = axes[row, col]
                ax.imshow(image, cmap="gray", interpolation="nearest")
                _contour(ax, truth, "lime", style="dashed", width=0.7)
                mask = None
                for run_dir in runs.loc[(runs["method"] == method) & (runs["variant"] == variant), "run_dir"]:
                    found = predictions(run_dir).get((choice.organ, choice.case_id))
                    if found is not None and choice.z in set(found[0].tolist()):
                        mask = found[1][list(found[0]).index(choice.z)]
                        break
                if mask is None:
                    ax.text(0.5, 0.5, "no prediction", ha="center", va="center", color="white", transform=ax.transAxes)
                else:
                    _contour(ax, mask, "red", width=1.2)
            for ax in axes[row]:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
        axes[0, 0].set_title("image + ground truth")
        for col, (method, variant) in enumerate(methods, start=1):
            axes[0, col].set_title(row_label(method, variant).replace(" [", "\n["))
        fig.suptitle(f"{dataset_label(dataset)}, setting {setting}: ground truth (green), prediction (red)", y=1.0)
        fig.tight_layout()
    return fig


def write_qualitative(
    results: Results,
    out_dir: str | Path,
    loader: DatasetLoader | None,
    named: Sequence[tuple[str | None, str, str, int]] = (),
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> dict[str, Path]:
    """One figure per in-domain test dataset with predictions (lowest setting); name -> PNG.

    Datasets that cannot be loaded are skipped with a printed note.
    """
    written: dict[str, Path] = {}
    if loader is None:
        log("note: qualitative figure skipped: no data root (pass --data-root or set FSMIS_DATA_ROOT)")
        return written
    runs = results.runs
    in_domain = runs[runs["dataset"] == runs["train_dataset"]]
    with_predictions = in_domain[[(Path(d) / "predictions.npz").is_file() for d in in_domain["run_dir"]]]
    if with_predictions.empty:
        log("note: qualitative figure skipped: no run saved predictions (protocol.save_predictions)")
        return written
    for dataset in sorted(with_predictions["dataset"].unique(), key=dataset_sort_key):
        setting = int(with_predictions.loc[with_predictions["dataset"] == dataset, "setting"].min())
        try:
            dataset_obj = loader(dataset)
        except Exception as exc:  # noqa: BLE001 - missing data must never abort the report
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"note: qualitative figure for {dataset} skipped: data not available ({reason})")
            continue
        try:
            fig = qualitative_figure(results, dataset, setting, dataset_obj, named)
        except (FsmisError, OSError) as exc:  # files that fail to load lazily
            log(f"note: qualitative figure for {dataset} skipped: data not available ({str(exc).splitlines()[0]})")
            continue
        if fig is None:
            log(f"note: qualitative figure for {dataset} skipped: no matching slices with predictions")
            continue
        written[f"qualitative_{dataset}"] = save_figure(fig, out_dir, f"qualitative_{dataset}")
    return written
