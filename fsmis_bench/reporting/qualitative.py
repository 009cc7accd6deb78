"""Qualitative figure (cf. SD-FSMIS Fig. 5): query slices with ground truth and predictions.

A grid of panels: one column per chosen query slice (one per organ) and one row per method,
under a first row with the ground truth alone; or the transpose, whichever gives the larger
panels at the page width. Every panel is placed at a computed position, and labels are
wrapped to the room they have, so no two texts overlap whatever the names.

- Predictions come from the run records (``predictions.npz``); images and labels from the
  test dataset, rebuilt from the run's own ``config.yaml`` (options included), so custom
  folders (``nifti_folder``) and cross-domain test sets load as they were evaluated.
- Slices are shown in radiological orientation (patient's right on the viewer's left,
  anterior or superior at the top) from the scan's affine (``Volume.affine``), with the
  pixel aspect from its spacing; without an affine, as stored. An oblique slice (a cardiac
  short-axis one) is shown as the nearest standard plane, which for a sagittal one puts
  anterior on the viewer's left; the caption says which planes a figure shows
  (:func:`qualitative_caption`).
- The whole figure, legend and footnotes included, is at most :data:`~.style.MAX_HEIGHT_IN`
  tall: the panels shrink to make room.
- ``zoom=True`` crops every column to a square around its organ.
- Ground truth: sky-blue contour; prediction: orange (a colourblind-safe pair).

Slices are chosen reproducibly: per organ, the kept query slice with the largest
ground-truth area in the first query case (in fold order) of the first fold that every
row evaluated (rows with another support scan lack their support), or named by the user as ``[dataset:]organ:case_id:z``; a named slice outside its volume is refused
(:class:`SliceOutsideVolume`), as a named case that no run evaluated is.
"""

from __future__ import annotations

import difflib
import itertools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import records
from .._registry import PluginError
from ..errors import ConfigError, DataError, FsmisError, UnknownNameError
from .collect import Results, dataset_sort_key, organ_sort_key
from .figures import Series, drawn_height_in, make_series, save_figure
from .style import (
    DOUBLE_COLUMN_IN,
    FONT_PT,
    MAX_HEIGHT_IN,
    Footnotes,
    dataset_display,
    eval_display,
    organ_display,
    paper_style,
    text_height_in,
    text_width_in,
    widest_line_in,
    wrap,
)

#: predictions of one run: (organ, case_id) -> (slice indices (K,), masks (K, H, W) bool)
Predictions = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]
DatasetLoader = Callable[..., object]

TRUTH_COLOUR = "#56B4E9"  # Okabe-Ito sky blue
PREDICTION_COLOUR = "#E69F00"  # Okabe-Ito orange
_GAP_IN = 0.04
_LEGEND_IN = 0.3
_MAX_TITLE_LINES = 4
#: the largest panel
_MAX_PANEL_IN = 1.8
#: the transpose (organs as rows) is used when its panels are larger by more than this
#: fraction: equal sizes keep the usual methods-as-rows layout
_TRANSPOSE_GAIN = 0.02


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


def check_slices(results: Results, named: Sequence[tuple[str | None, str, str, int]]) -> None:
    """Refuse ``--slices`` that cannot be shown, all problems in one error, before anything
    is written.

    A slice must name a dataset some run was tested on (when it names one), an organ those
    runs evaluated and a query case they evaluated for that organ, and a slice index >= 0
    (whether it lies inside the volume is known only once the image is loaded: then
    :class:`SliceOutsideVolume` refuses it the same way).

    Raises:
        FsmisError: the slices that cannot be shown, each with why.
    """
    if not named:
        return
    cases = results.cases
    datasets = sorted(set(cases["dataset"]), key=dataset_sort_key)
    problems: list[str] = []
    hints: list[str] = []
    for dataset, organ, case_id, z in named:
        where = f"{dataset}:" if dataset else ""
        text = f"{where}{organ}:{case_id}:{z}"
        if dataset is not None and dataset not in datasets:
            problems.append(f"{text}: no run was tested on {dataset!r}")
            hints.append(f"datasets: {', '.join(datasets) or 'none'}")
            continue
        mine = cases if dataset is None else cases[cases["dataset"] == dataset]
        organs = sorted(set(mine["organ"]), key=organ_sort_key)
        if organ not in organs:
            close = difflib.get_close_matches(organ, organs, n=1)
            problems.append(f"{text}: no run evaluated organ {organ!r}" + (f" (did you mean {close[0]}?)" if close else ""))
            hints.append(f"organs{' of ' + dataset if dataset else ''}: {', '.join(organs) or 'none'}")
            continue
        evaluated = sorted(set(mine.loc[mine["organ"] == organ, "case_id"]), key=lambda c: (len(c), c))
        if case_id not in evaluated:
            problems.append(f"{text}: no run evaluated case {case_id!r} for {organ}")
            hints.append(f"{organ} query cases{' of ' + dataset if dataset else ''}: {', '.join(evaluated)}")
            continue
        if z < 0:
            problems.append(f"{text}: the slice index must be 0 or more")
    if problems:
        raise FsmisError("cannot show the qualitative slices: " + "; ".join(problems),
                         hint="; ".join(dict.fromkeys(hints)) or "write slices as [dataset:]organ:case_id:z")


# -- loading the test dataset ---------------------------------------------------------

class RecordedDatasetLoader:
    """Test datasets as the runs evaluated them: rebuilt from the run's ``config.yaml``.

    The data root is the one passed here, else the run's own when that folder exists, else
    ``FSMIS_DATA_ROOT``. Records without a full config (older or synthetic ones) fall back to
    the dataset's name with its default options.
    """

    def __init__(self, data_root: str | Path | None = None) -> None:
        self.data_root = None if data_root in (None, "") else str(data_root)

    def _root(self, recorded: object) -> str | None:
        if self.data_root:
            return self.data_root
        if recorded not in (None, "", "null") and Path(str(recorded)).expanduser().is_dir():
            return str(recorded)
        return os.environ.get("FSMIS_DATA_ROOT") or None

    def __call__(self, name: str, run_dir: str | Path | None = None):
        config = Path(run_dir) / "config.yaml" if run_dir is not None else None
        if config is not None and config.is_file():
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(config)
            if isinstance(cfg.get("dataset"), dict) or OmegaConf.is_dict(cfg.get("dataset")):
                from ..runner import build_test_dataset

                OmegaConf.set_struct(cfg, False)
                cfg.data_root = self._root(cfg.get("data_root"))
                return build_test_dataset(cfg)
        from ..api import load_dataset

        return load_dataset(name, self._root(None))


def default_loader(data_root: str | Path | None) -> RecordedDatasetLoader:
    """The loader of :func:`write_report`: test datasets rebuilt from the run records."""
    return RecordedDatasetLoader(data_root)


def _load_dataset(loader: DatasetLoader, name: str, run_dir: str) -> object:
    if isinstance(loader, RecordedDatasetLoader):
        return loader(name, run_dir)
    return loader(name)  # a plain name -> dataset callable (tests, scripts)


# -- display geometry -----------------------------------------------------------------

@dataclass(frozen=True)
class Orientation:
    """How to turn a stored ``(H, W)`` slice into the displayed one.

    Attributes:
        transpose: swap rows and columns first.
        flip_rows, flip_cols: then reverse the row / column order.
        aspect: displayed pixel height / width (from the spacing).
        plane: ``axial``, ``coronal``, ``sagittal`` (nearest standard plane) or ``stored``.
        oblique: the slice normal is more than :data:`OBLIQUE_DEGREES` off the plane's axis
            (cardiac short axis): the directions on screen are only roughly those of ``plane``.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    aspect: float = 1.0
    plane: str = "stored"
    oblique: bool = False

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = array.T if self.transpose else array
        if self.flip_rows:
            out = out[::-1, :]
        if self.flip_cols:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


#: nearest standard plane (world axis of the slice normal, RAS+) -> (screen-right world
#: axis, its sign, screen-down world axis, its sign), radiological convention
_SCREEN = {
    2: ("axial", 0, -1, 1, -1),  # right on screen = patient left (-x); down = posterior (-y)
    1: ("coronal", 0, -1, 2, -1),  # right = patient left; down = inferior (-z)
    0: ("sagittal", 1, -1, 2, -1),  # right = posterior (anterior on the left); down = inferior
}


#: a slice whose normal is further than this from its nearest standard plane's axis is oblique
OBLIQUE_DEGREES = 20.0


def display_orientation(affine: np.ndarray | None, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Orientation:
    """Radiological display of slices ``image[z]`` from the voxel-to-world affine.

    Args:
        affine: ``(4, 4)`` RAS+ for the index order ``(z, y, x)``: ``world = affine @ (z, y, x, 1)``;
            None: as stored, aspect from ``spacing``.
        spacing: ``(z, y, x)`` in mm, used when there is no affine.
    """
    if affine is None:
        return Orientation(aspect=float(spacing[1]) / float(spacing[2]) if spacing[2] else 1.0)
    matrix = np.asarray(affine, dtype=float)[:3, :3]
    if not np.isfinite(matrix).all():
        return Orientation()
    rows, cols = matrix[:, 1], matrix[:, 2]
    row_mm, col_mm = float(np.linalg.norm(rows)), float(np.linalg.norm(cols))
    normal = np.cross(rows, cols)
    if min(row_mm, col_mm) == 0 or not normal.any():
        return Orientation()
    # nearest standard plane: the assignment of world axes to (rows, columns, normal) with
    # the largest direction cosines, chosen jointly so that oblique slices (cardiac short
    # axis) still get three different axes
    cosines = np.abs(np.stack([rows / row_mm, cols / col_mm, normal / np.linalg.norm(normal)]))
    row_axis, col_axis, normal_axis = max(itertools.permutations(range(3)),
                                          key=lambda axes: sum(cosines[i, a] for i, a in enumerate(axes)))
    plane, right_axis, right_sign, down_axis, down_sign = _SCREEN[normal_axis]
    row_sign, col_sign = np.sign(rows[row_axis]), np.sign(cols[col_axis])
    oblique = bool(cosines[2, normal_axis] < np.cos(np.radians(OBLIQUE_DEGREES)))
    if col_axis == right_axis:
        return Orientation(False, row_sign != down_sign, col_sign != right_sign, row_mm / col_mm, plane, oblique)
    # the stored rows run left-right on screen: transpose, then the old rows are columns
    return Orientation(True, col_sign != down_sign, row_sign != right_sign, col_mm / row_mm, plane, oblique)


def crop_box(mask: np.ndarray, aspect: float = 1.0, margin: float = 0.6, minimum: int = 24) -> tuple[slice, slice]:
    """A square (in mm) window around ``mask``: its extent plus ``margin`` of it on each side.

    Args:
        mask: ``(H, W)`` bool, displayed orientation.
        aspect: pixel height / width.
    """
    height, width = mask.shape
    if not mask.any():
        return slice(0, height), slice(0, width)
    ys, xs = np.nonzero(mask)
    centre_y, centre_x = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half_mm = max((ys.max() - ys.min() + 1) * aspect, xs.max() - xs.min() + 1, minimum) * (0.5 + margin)
    half_y, half_x = half_mm / aspect, half_mm

    def span(centre: float, half: float, size: int) -> slice:
        half = min(half, size / 2)
        start = int(round(min(max(centre - half, 0), size - 2 * half)))
        return slice(start, start + int(round(2 * half)))

    return span(centre_y, half_y, height), span(centre_x, half_x, width)


def _display(image: np.ndarray) -> np.ndarray:
    low, high = np.percentile(image, [1, 99])
    return np.clip((image - low) / max(high - low, 1e-6), 0, 1)


def _contour(ax, mask: np.ndarray, colour: str, style: str = "solid", width: float = 1.0) -> None:
    """The mask's outline. Padded by a pixel of background, so a mask that touches the frame
    (or fills it) is outlined along the frame too, not left open or drawn as nothing."""
    if mask.any():
        padded = np.pad(mask.astype(float), 1)
        rows, cols = np.arange(-1, mask.shape[0] + 1), np.arange(-1, mask.shape[1] + 1)
        limits = ax.get_xlim(), ax.get_ylim()
        ax.contour(cols, rows, padded, levels=[0.5], colors=[colour], linewidths=width, linestyles=[style])
        ax.set_xlim(*limits[0])  # the padding must not widen the image's frame
        ax.set_ylim(*limits[1])


# -- choosing slices ------------------------------------------------------------------

def _prediction_runs(results: Results, dataset: str, setting: int, train_dataset: str | None = None) -> pd.DataFrame:
    runs = results.runs
    train_dataset = train_dataset or dataset
    runs = runs[(runs["dataset"] == dataset) & (runs["train_dataset"] == train_dataset) & (runs["setting"] == setting)]
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
    results: Results, dataset: str, setting: int, dataset_obj: object,
    named: Sequence[tuple[str | None, str, str, int]] = (), train_dataset: str | None = None,
) -> list[SliceChoice]:
    """The slices to show for one evaluation (in-domain unless ``train_dataset`` differs).

    Named slices apply where this evaluation's runs evaluated their organ and case (and, for
    a slice that names a dataset, only to that test dataset): a slice without a dataset
    never puts a liver column on a cardiac figure. Without a named slice that applies, the
    default: per organ the largest ground-truth slice of the first fold's first query case
    that every row evaluated (else its first query case).
    """
    cases = results.cases
    cases = cases[(cases["dataset"] == dataset) & (cases["train_dataset"] == (train_dataset or dataset))
                  & (cases["setting"] == setting)]
    label_map = getattr(dataset_obj, "label_map", {})
    evaluated = set(zip(cases["organ"], cases["case_id"]))
    applying = [SliceChoice(dataset, organ, case_id, z) for ds, organ, case_id, z in named
                if ds in (None, dataset) and organ in label_map and (organ, case_id) in evaluated]
    if applying:
        return applying
    if cases.empty:
        return []
    first_fold = int(cases["fold"].min())
    cases = cases[cases["fold"] == first_fold]
    choices = []
    for organ in sorted(cases["organ"].unique(), key=organ_sort_key):
        if organ not in label_map:
            continue
        of_organ = cases[cases["organ"] == organ]
        order = _fold_order(dataset_obj, first_fold, list(of_organ["case_id"]))
        if not order:
            continue
        # a case every row evaluated, where there is one: a row with another support scan
        # (protocol.supp_idx) has no prediction for its own support
        rows = of_organ.groupby(["method", "variant"], sort=False)["case_id"].agg(set)
        everyones = [case for case in order if all(case in evaluated_by for evaluated_by in rows)]
        order = everyones or order
        volume = dataset_obj.load(order[0])
        area = (np.asarray(volume.label) == label_map[organ]).sum(axis=(1, 2))
        if area.max() == 0:
            continue
        choices.append(SliceChoice(dataset, organ, order[0], int(np.argmax(area))))
    return choices


# -- the figure -----------------------------------------------------------------------

@dataclass
class _Panel:
    image: np.ndarray  # displayed orientation, cropped
    truth: np.ndarray
    prediction: np.ndarray | None  # None: no prediction for this slice
    aspect: float


@dataclass
class _Plan:
    methods_as_rows: bool
    size: float  # panel side, inches
    label_w: float  # row label column, inches
    header: float  # legend + column titles, inches
    row_labels: list[str]
    col_titles: list[str]
    fits: bool  # every row label fits its row


def _words_fit(text: str, width_in: float) -> bool:
    return all(text_width_in(word) <= width_in for word in text.replace("\n", " ").split(" "))


def _key(index: int) -> str:
    """A, B, ..., Z, AA, AB, ... for methods whose names do not fit the grid."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return letters


def _grid_size(n_rows: int, n_cols: int, width: float, label_w: float, header: float, footer: float) -> float:
    """The panel side that fits the width and, with ``header`` above and ``footer`` below
    the grid, :data:`~.style.MAX_HEIGHT_IN`."""
    by_width = (width - label_w - 0.05 - _GAP_IN * n_cols) / n_cols
    by_height = (MAX_HEIGHT_IN - header - footer - 0.05 - _GAP_IN * n_rows) / n_rows
    return max(0.2, min(by_width, by_height, _MAX_PANEL_IN))


def _footer_height(text: str) -> float:
    """The room the footnotes (and letter keys) take under the grid, in inches: the larger of
    the nominal line height and the height as drawn at screen resolution, where hinting
    makes each line a little taller (a block of twenty lines outgrew the nominal one)."""
    return (max(text_height_in(text), drawn_height_in(text)) + 0.12) if text else 0.0


class SliceOutsideVolume(FsmisError):
    """A slice named with ``--slices`` lies outside its volume: refused like a case that no run
    evaluated (:func:`check_slices`), not drawn around."""


def _check_inside(choices: Sequence[SliceChoice], depths: dict[str, int], dataset_name: str) -> None:
    """Every named slice within its volume's ``depths[case_id]`` slices, all problems in one error.

    Raises:
        SliceOutsideVolume: the slices outside, each with the valid range.
    """
    problems = [f"{c.organ}:{c.case_id}:{c.z}: case {c.case_id} of {dataset_name} has slices 0-{depths[c.case_id] - 1}"
                for c in choices if not 0 <= c.z < depths[c.case_id]]
    if problems:
        raise SliceOutsideVolume("cannot show the qualitative slices: " + "; ".join(problems),
                                 hint="pick z within the range named (slices count from 0 along the scan's slice axis)")


def qualitative_figure(
    results: Results, dataset: str, setting: int, dataset_obj: object,
    named: Sequence[tuple[str | None, str, str, int]] = (), *,
    train_dataset: str | None = None, zoom: bool = False, width: float = DOUBLE_COLUMN_IN,
    log: Callable[[str], None] | None = None, orientations: list[Orientation] | None = None,
):
    """The figure for one evaluation, or None when there is nothing to show.

    Args:
        log: told about a chosen slice that no run predicted (not a kept query slice of
            the case, or predictions not saved), which shows as "no prediction" panels.
        orientations: when given, collects how each column's slice is displayed (for the
            caption: :func:`qualitative_caption`).
    Raises:
        SliceOutsideVolume: a named slice lies outside its volume.
    """
    import matplotlib.pyplot as plt

    train_dataset = train_dataset or dataset
    runs = _prediction_runs(results, dataset, setting, train_dataset)
    choices = choose_slices(results, dataset, setting, dataset_obj, named, train_dataset)
    if runs.empty or not choices:
        return None
    cache: dict[str, Predictions] = {}

    def predictions(run_dir: str) -> Predictions:
        if run_dir not in cache:
            try:
                cache[run_dir] = load_predictions(run_dir)
            except records.DamagedPredictionsError as exc:  # its panels show "no prediction"
                cache[run_dir] = {}
                (log or print)(f"note: qualitative figure: a run's predictions are left out: {exc.message} "
                               f"(hint: {exc.hint})")
        return cache[run_dir]

    notes = Footnotes()
    scores = results.fold_scores
    scores = scores[(scores["dataset"] == dataset) & (scores["train_dataset"] == train_dataset)
                    & (scores["setting"] == setting)]
    series: list[Series] = make_series(results, zip(runs["method"], runs["variant"]), notes, scores)
    label_map = getattr(dataset_obj, "label_map", {})

    volumes = {c.case_id: dataset_obj.load(c.case_id) for c in choices}
    _check_inside(choices, {case: v.image.shape[0] for case, v in volumes.items()}, dataset_display(dataset))
    # panels[choice index][0 = ground truth, 1.. = series]
    panels: list[list[_Panel]] = []
    for choice in choices:
        volume = volumes[choice.case_id]
        orientation = display_orientation(getattr(volume, "affine", None), getattr(volume, "spacing", (1, 1, 1)))
        if orientations is not None:
            orientations.append(orientation)
        image = orientation.apply(_display(np.asarray(volume.image[choice.z], dtype=float)))
        truth = orientation.apply(np.asarray(volume.label[choice.z]) == label_map.get(choice.organ, -1))
        window = crop_box(truth, orientation.aspect) if zoom else (slice(None), slice(None))
        column = [_Panel(image[window], truth[window], None, orientation.aspect)]
        for s in series:
            mask = None
            for run_dir in runs.loc[(runs["method"] == s.method) & (runs["variant"] == s.variant), "run_dir"]:
                found = predictions(run_dir).get((choice.organ, choice.case_id))
                if found is not None and choice.z in set(found[0].tolist()):
                    mask = orientation.apply(np.asarray(found[1][list(found[0]).index(choice.z)], dtype=bool))[window]
                    break
            column.append(_Panel(column[0].image, column[0].truth, mask, orientation.aspect))
        if log is not None and series and all(panel.prediction is None for panel in column[1:]):
            log(f"note: qualitative figure for {eval_display(train_dataset, dataset)}: no run saved a prediction "
                f"of slice {choice.z} of case {choice.case_id} ({choice.organ}); it is not a query slice the "
                "runs evaluated, or they did not save predictions")
        panels.append(column)

    method_names = ["Ground truth"] + [s.label for s in series]
    slice_names = [f"{organ_display(c.organ)}\ncase {c.case_id}, slice {c.z}" for c in choices]
    n_methods, n_slices = len(method_names), len(choices)

    def plan(methods_as_rows: bool, names: list[str], footer: float) -> _Plan:
        rows, cols = (names, slice_names) if methods_as_rows else (slice_names, names)
        cap = min(1.5, width * 0.28)
        row_labels = [wrap(t, cap - 0.08) for t in rows]
        label_w = min(cap, max(widest_line_in(t) for t in row_labels) + 0.1)  # no wider than needed
        # column titles are wrapped to the panel width, which depends on their height: iterate
        size = _grid_size(len(rows), len(cols), width, label_w, 0.0, footer)
        for _ in range(3):
            col_titles = [wrap(t, size) for t in cols]
            header = _LEGEND_IN + max(text_height_in(t) for t in col_titles) + 0.08
            size = _grid_size(len(rows), len(cols), width, label_w, header, footer)
        col_titles = [wrap(t, size) for t in cols]
        header = _LEGEND_IN + max(text_height_in(t) for t in col_titles) + 0.08
        # readable: a row label stays within its row (or it runs into the next one), no word
        # is broken, and column titles stay short
        fits = (all(text_height_in(t) <= size + _GAP_IN for t in row_labels)
                and all(_words_fit(t, cap - 0.08) for t in rows) and all(_words_fit(t, size) for t in cols)
                and max(t.count("\n") + 1 for t in col_titles) <= _MAX_TITLE_LINES)
        return _Plan(methods_as_rows, size, label_w, header, row_labels, col_titles, fits)

    def choose(names: list[str], footer: float) -> _Plan:
        # methods as rows and organs as columns, or the transpose when that gives larger
        # panels; a layout whose labels fit beats one whose labels do not
        as_rows, transposed = plan(True, names, footer), plan(False, names, footer)
        larger = transposed.size > as_rows.size * (1 + _TRANSPOSE_GAIN)
        if as_rows.fits and (not transposed.fits or not larger):
            return as_rows
        if transposed.fits:
            return transposed
        return max((as_rows, transposed), key=lambda p: p.size)

    # the footnotes are laid out first: the panels get the height that is left
    footnotes = "\n".join(wrap(line, width - 0.2) for line in notes.lines())
    grid_names = method_names
    key_lines: list[str] = []
    chosen = choose(grid_names, _footer_height(footnotes))
    if not chosen.fits:  # names too long for any layout: letters in the grid, the names below it
        keys = [_key(i) for i in range(len(series))]
        key_lines = [f"{key}: {s.label}" for key, s in zip(keys, series)]
        grid_names = ["Ground truth", *keys]
        footnotes = "\n".join(wrap(line, width - 0.2) for line in key_lines + notes.lines())
        chosen = choose(grid_names, _footer_height(footnotes))
    # small panels show symbols instead of words ("∅" for "empty"): a pasted figure must
    # explain them itself, so they get a line under the grid, and the grid is laid out again
    symbol_lines = _symbol_lines(panels, chosen.size)
    if symbol_lines:
        footnotes = "\n".join(wrap(line, width - 0.2) for line in key_lines + notes.lines() + symbol_lines)
        chosen = choose(grid_names, _footer_height(footnotes))
    methods_as_rows, size, label_w, header = chosen.methods_as_rows, chosen.size, chosen.label_w, chosen.header
    row_labels, col_titles = chosen.row_labels, chosen.col_titles
    n_rows, n_cols = (n_methods, n_slices) if methods_as_rows else (n_slices, n_methods)
    footer = _footer_height(footnotes)
    grid_w = label_w + n_cols * (size + _GAP_IN)
    height = header + n_rows * (size + _GAP_IN) + footer + 0.05
    with paper_style():
        fig = plt.figure(figsize=(width, height))
        left0 = (width - grid_w) / 2 + label_w
        top0 = height - header
        for r in range(n_rows):
            for c in range(n_cols):
                slice_index, method_index = (c, r) if methods_as_rows else (r, c)
                panel = panels[slice_index][method_index]
                x = left0 + c * (size + _GAP_IN)
                y = top0 - (r + 1) * (size + _GAP_IN) + _GAP_IN
                ax = fig.add_axes((x / width, y / height, size / width, size / height))
                ax.imshow(panel.image, cmap="gray", interpolation="nearest", aspect=panel.aspect, vmin=0, vmax=1)
                if method_index == 0:
                    _contour(ax, panel.truth, TRUTH_COLOUR, width=1.1)
                else:
                    _contour(ax, panel.truth, TRUTH_COLOUR, style=(0, (2.5, 1.5)), width=0.7)
                    if panel.prediction is None:
                        ax.text(0.5, 0.5, "no\nprediction" if size >= _WORDS_MIN_IN else "n/a", ha="center", va="center",
                                color="white", transform=ax.transAxes, fontsize=FONT_PT)
                    elif not panel.prediction.any():
                        ax.text(0.04, 0.04, "empty" if size >= _WORDS_MIN_IN else "∅", ha="left", va="bottom", color="white",
                                transform=ax.transAxes, fontsize=FONT_PT)
                    else:
                        _contour(ax, panel.prediction, PREDICTION_COLOUR, width=1.1)
                        if panel.prediction.all():  # its outline is the frame: say it
                            ax.text(0.04, 0.04, "whole slice" if size >= _WORDS_MIN_IN else "all", ha="left", va="bottom",
                                    color=PREDICTION_COLOUR, transform=ax.transAxes, fontsize=FONT_PT)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c == 0:
                    fig.text((left0 - 0.06) / width, (y + size / 2) / height, row_labels[r], ha="right", va="center",
                             fontsize=FONT_PT)
                if r == 0:
                    fig.text((x + size / 2) / width, (top0 + 0.03) / height, col_titles[c], ha="center", va="bottom",
                             fontsize=FONT_PT)
        handles = [plt.Line2D([0], [0], color=TRUTH_COLOUR, linewidth=1.2),
                   plt.Line2D([0], [0], color=PREDICTION_COLOUR, linewidth=1.2)]
        fig.legend(handles, ["ground truth", "prediction"], loc="upper center", ncol=2, frameon=False,
                   bbox_to_anchor=(0.5, 1.0), borderaxespad=0.1, handlelength=1.6)
        if footnotes:  # one text block: its lines cannot overlap each other
            fig.text(0.01, (footer - 0.04) / height, footnotes, ha="left", va="top", fontsize=FONT_PT)
    return fig


#: below this panel size (inches) the panel notes are symbols, not words
_WORDS_MIN_IN = 0.9
#: symbol -> what it means, for the footnotes of small panels (:func:`_symbol_lines`)
PANEL_SYMBOLS = {
    "∅": "∅: empty prediction (the method predicted no voxel of the organ in this slice)",
    "n/a": "n/a: no prediction saved for this slice",
    "all": "all: the whole slice was predicted as the organ",
}


def _symbol_lines(panels: Sequence[Sequence[_Panel]], size: float) -> list[str]:
    """The footnote lines for the symbols that panels of ``size`` inches will show."""
    if size >= _WORDS_MIN_IN:
        return []
    shown = set()
    for column in panels:
        for panel in column[1:]:
            if panel.prediction is None:
                shown.add("n/a")
            elif not panel.prediction.any():
                shown.add("∅")
            elif panel.prediction.all():
                shown.add("all")
    return [text for symbol, text in PANEL_SYMBOLS.items() if symbol in shown]


def figure_name(train_dataset: str, dataset: str) -> str:
    """``qualitative_abd_mri``; cross-domain ``qualitative_abd_ct_to_abd_mri``."""
    return f"qualitative_{dataset}" if train_dataset == dataset else f"qualitative_{train_dataset}_to_{dataset}"


def _with_predictions(results: Results) -> pd.DataFrame:
    runs = results.runs
    return runs[[(Path(d) / "predictions.npz").is_file() for d in runs["run_dir"]]]


def _evaluations(with_predictions: pd.DataFrame) -> dict[str, tuple[str, str, int]]:
    """figure name -> (training dataset, test dataset, lowest setting with predictions)."""
    keys = sorted({(str(t), str(d)) for t, d in zip(with_predictions["train_dataset"], with_predictions["dataset"])},
                  key=lambda k: (k[0] != k[1], dataset_sort_key(k[1]), dataset_sort_key(k[0])))
    out = {}
    for train, dataset in keys:
        mine = with_predictions[(with_predictions["train_dataset"] == train) & (with_predictions["dataset"] == dataset)]
        out[figure_name(train, dataset)] = (train, dataset, int(mine["setting"].min()))
    return out


#: what is where on screen, per displayed plane (:data:`_SCREEN`, radiological convention)
PLANE_DIRECTIONS = {
    "axial": "patient's right on the viewer's left, anterior at the top",
    "coronal": "patient's right on the viewer's left, superior at the top",
    "sagittal": "anterior on the viewer's left, superior at the top",
}


def orientation_sentence(orientations: Sequence[Orientation] | None) -> str:
    """How the figure's slices are displayed, in words, from the orientations it used; the
    generic sentence when they are not known."""
    if orientations is None:
        return ("Slices in radiological orientation where the scan's affine is known (patient's right on the "
                "viewer's left), else as stored.")
    planes = sorted({o.plane for o in orientations if o.plane in PLANE_DIRECTIONS},
                    key=list(PLANE_DIRECTIONS).index)
    shown = "; ".join(f"{plane}: {PLANE_DIRECTIONS[plane]}" for plane in planes)
    parts = []
    if any(o.oblique for o in orientations):
        parts.append(f"The slices are oblique (e.g. cardiac short axis); each is shown as its nearest standard plane "
                     f"({shown}), so these directions are only approximate.")
    elif planes:
        parts.append(f"Radiological orientation ({shown}).")
    if any(o.plane == "stored" for o in orientations):
        parts.append("Slices without a known affine are shown as stored.")
    return " ".join(parts)


def qualitative_caption(results: Results, name: str, zoom: bool = False,
                        orientations: Sequence[Orientation] | None = None) -> str:
    """The caption of qualitative figure ``name`` (as written by :func:`write_qualitative`).

    Args:
        orientations: how its slices were displayed (:func:`write_qualitative` collects
            them); None: the generic sentence.
    """
    train, dataset, setting = _evaluations(_with_predictions(results))[name]
    return (f"Qualitative results, {eval_display(train, dataset)}, setting {setting}: per organ, the query slice "
            "with the largest ground-truth area in the first query case of the first fold that every row evaluated. "
            + orientation_sentence(orientations)
            + " Ground truth: sky-blue contour (dashed under the predictions); prediction: orange contour"
            + ("; every column cropped around its organ." if zoom else ".")
            + " A panel marked \u201cempty\u201d (\u2205 in small panels) holds an empty prediction: no voxel of "
              "the organ was predicted in that slice.")


def _data_errors() -> tuple[type[BaseException], ...]:
    """What loading a test dataset raises when its data or the run's config cannot be used:
    no data root, missing or damaged files (``DataError``, ``OSError``), options the dataset
    refuses (``ConfigError``), a dataset plugin that is not installed (``UnknownNameError``)
    and a ``config.yaml`` that cannot be parsed (YAML, OmegaConf). Nothing else: a
    ``NameError`` taken for missing data once hid a bug behind "data not available"."""
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    return (DataError, ConfigError, UnknownNameError, OSError, OmegaConfBaseException, YAMLError)


def write_qualitative(
    results: Results,
    out_dir: str | Path,
    loader: DatasetLoader | None,
    named: Sequence[tuple[str | None, str, str, int]] = (),
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
    *,
    zoom: bool = False,
    width: float = DOUBLE_COLUMN_IN,
    problems: list[str] | None = None,
    orientations: dict[str, list[Orientation]] | None = None,
) -> dict[str, Path]:
    """One figure per evaluation (training -> test dataset) with predictions, at its lowest
    setting; name -> PNG. Datasets whose data cannot be loaded are skipped with a printed note.

    Args:
        orientations: when given, collects figure name -> how its slices were displayed.
    Raises:
        SliceOutsideVolume: a slice named in ``named`` lies outside its volume.
        PluginError, and any other exception: a bug (in this code or a plugin), never
            taken for missing data.
    """
    written: dict[str, Path] = {}
    if loader is None:
        log("note: qualitative figure skipped: no data root (pass --data-root or set FSMIS_DATA_ROOT)")
        return written
    with_predictions = _with_predictions(results)
    if with_predictions.empty:
        log("note: qualitative figure skipped: no run saved predictions (protocol.save_predictions)")
        return written
    for name, (train, dataset, setting) in _evaluations(with_predictions).items():
        mine = with_predictions[(with_predictions["train_dataset"] == train) & (with_predictions["dataset"] == dataset)
                                & (with_predictions["setting"] == setting)]
        first_run = str(mine.sort_values(["fold", "method", "seed"])["run_dir"].iloc[0])
        try:
            dataset_obj = _load_dataset(loader, dataset, first_run)
        except _data_errors() as exc:  # missing data must never abort the report
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log(f"note: qualitative figure for {eval_display(train, dataset)} skipped: data not available ({reason})")
            continue
        used: list[Orientation] = []
        try:
            fig = qualitative_figure(results, dataset, setting, dataset_obj, named, train_dataset=train, zoom=zoom,
                                     width=width, log=log, orientations=used)
        except (SliceOutsideVolume, PluginError):  # the user's typo, a bug: not a figure to skip quietly
            raise
        except FsmisError as exc:  # a damaged file
            log(f"note: qualitative figure for {eval_display(train, dataset)} skipped: {str(exc).splitlines()[0]}")
            continue
        except OSError as exc:  # files that fail to load lazily
            log(f"note: qualitative figure for {eval_display(train, dataset)} skipped: data not available "
                f"({str(exc).splitlines()[0]})")
            continue
        if fig is None:
            log(f"note: qualitative figure for {eval_display(train, dataset)} skipped: no matching slices with predictions")
            continue
        written[name] = save_figure(fig, out_dir, name, problems=problems)
        if orientations is not None:
            orientations[name] = used
    return written
