"""Figures (seaborn, PNG + PDF, 7 in wide, fonts >= 8 pt).

Every function takes :class:`~fsmis_bench.reporting.collect.Results` and returns a
matplotlib Figure, or None when the results hold nothing to draw (e.g. no setting-2 runs).
:func:`save_figure` writes it as ``<stem>.png`` and ``<stem>.pdf``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written headless; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .collect import (  # noqa: E402
    N_FOLDS,
    Results,
    dataset_label,
    dataset_sort_key,
    eval_label,
    organ_label,
    organ_sort_key,
    per_case_scores,
    row_label,
    run_flags,
)
from .tables import MARKERS  # noqa: E402

#: figure width of a two-column paper page
WIDTH_IN = 7.0
FONT_PT = 8

_RC = {
    "font.size": FONT_PT,
    "axes.titlesize": FONT_PT + 1,
    "axes.labelsize": FONT_PT,
    "xtick.labelsize": FONT_PT,
    "ytick.labelsize": FONT_PT,
    "legend.fontsize": FONT_PT,
    "legend.title_fontsize": FONT_PT,
    "pdf.fonttype": 42,  # editable text in the PDF
    "savefig.bbox": "tight",
}


@contextmanager
def paper_style() -> Iterator[None]:
    """Seaborn's paper look with fixed point sizes, without touching global state."""
    with sns.axes_style("whitegrid"), plt.rc_context(_RC):
        yield


def save_figure(fig: plt.Figure, out_dir: str | Path, stem: str, dpi: int = 200) -> Path:
    """Write ``<stem>.png`` and ``<stem>.pdf``; closes the figure. Returns the PNG path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=dpi)
    fig.savefig(out / f"{stem}.pdf")
    plt.close(fig)
    return png


def display_labels(results: Results) -> dict[tuple[str, str], str]:
    """(method, variant) -> legend label with the table markers (*, §, ‡)."""
    flags = run_flags(results).set_index(["method", "variant"])
    scores = results.fold_scores
    folds = scores.groupby(["method", "variant", "train_dataset", "dataset", "setting", "organ"])["fold"].nunique()
    incomplete = {(m, v) for (m, v, *_), n in folds.items() if n < N_FOLDS}
    labels = {}
    for (method, variant), flag in flags.iterrows():
        suffix = ""
        if (method, variant) in incomplete:
            suffix += MARKERS["incomplete"].text
        if flag["random_weights"]:
            suffix += MARKERS["random_weights"].text
        if flag["non_standard"]:
            suffix += MARKERS["non_standard"].text
        labels[(method, variant)] = row_label(method, variant) + suffix
    return labels


def _palette(labels: list[str]) -> dict[str, tuple]:
    colours = sns.color_palette("tab10" if len(labels) <= 10 else "tab20", len(labels))
    return dict(zip(labels, colours))


def _with_labels(frame: pd.DataFrame, results: Results) -> pd.DataFrame:
    labels = display_labels(results)
    frame = frame.copy()
    frame["label"] = [labels.get((m, v), row_label(m, v)) for m, v in zip(frame["method"], frame["variant"])]
    frame["panel"] = [
        f"{eval_label(tr, te)} · setting {s}" for tr, te, s in zip(frame["train_dataset"], frame["dataset"], frame["setting"])
    ]
    frame["_panel_order"] = [
        (tr != te, dataset_sort_key(te), dataset_sort_key(tr), s)
        for tr, te, s in zip(frame["train_dataset"], frame["dataset"], frame["setting"])
    ]
    frame["organ_name"] = frame["organ"].map(organ_label)
    return frame


def _panels(frame: pd.DataFrame) -> list[str]:
    order = frame.drop_duplicates("panel").sort_values("_panel_order", key=lambda s: s.map(lambda v: v))
    return list(order["panel"])


def _grid(n_panels: int, row_height: float) -> tuple[plt.Figure, list[plt.Axes]]:
    ncols = 1 if n_panels == 1 else 2
    nrows = math.ceil(n_panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(WIDTH_IN, row_height * nrows + 0.9), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def _shared_legend(fig: plt.Figure, palette: dict[str, tuple], title: str = "Method", lines: bool = False) -> None:
    """One legend for all panels, below them; the panels are laid out above it."""
    if lines:
        handles = [plt.Line2D([0], [0], color=colour, linewidth=1.5) for colour in palette.values()]
    else:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in palette.values()]
    longest = max(len(label) for label in palette)
    ncol = max(1, min(len(palette), int(WIDTH_IN * 72 / (FONT_PT * 0.6 * longest + 30))))
    fig.legend(handles, list(palette), title=title, loc="lower center", ncol=ncol, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    legend_height_in = 0.3 + math.ceil(len(palette) / ncol) * FONT_PT * 1.5 / 72
    fig.tight_layout(rect=(0, legend_height_in / fig.get_size_inches()[1], 1, 1))


def organ_dice_figure(results: Results) -> plt.Figure | None:
    """Per-organ Dice (%) bars, mean over folds, error bars = std across folds."""
    scores = results.fold_scores
    if scores.empty:
        return None
    frame = _with_labels(scores, results)
    frame["dice_pct"] = frame["dice"] * 100
    palette = _palette(sorted(frame["label"].unique()))
    panels = _panels(frame)
    with paper_style():
        fig, axes = _grid(len(panels), 2.1)
        for ax, panel in zip(axes, panels):
            data = frame[frame["panel"] == panel]
            organs = sorted(data["organ"].unique(), key=organ_sort_key)
            hue_order = [label for label in palette if label in set(data["label"])]
            sns.barplot(data=data, x="organ_name", y="dice_pct", hue="label", order=[organ_label(o) for o in organs],
                        hue_order=hue_order, palette=palette, errorbar="sd", err_kws={"linewidth": 0.8},
                        capsize=0.1, ax=ax, legend=False)
            ax.set_title(panel)
            ax.set_xlabel("")
            ax.set_ylabel("Dice (%)")
            ax.set_ylim(0, 100)
        _shared_legend(fig, palette)
    return fig


def volume_distribution_figure(results: Results) -> plt.Figure | None:
    """Per-volume Dice (%) distributions: box plots with the volumes as points."""
    per_case = per_case_scores(results)
    if per_case.empty:
        return None
    frame = _with_labels(per_case, results)
    frame["dice_pct"] = frame["dice"] * 100
    palette = _palette(sorted(frame["label"].unique()))
    panels = _panels(frame)
    with paper_style():
        fig, axes = _grid(len(panels), 2.1)
        for ax, panel in zip(axes, panels):
            data = frame[frame["panel"] == panel]
            order = [organ_label(o) for o in sorted(data["organ"].unique(), key=organ_sort_key)]
            hue_order = [label for label in palette if label in set(data["label"])]
            common = dict(data=data, x="organ_name", y="dice_pct", hue="label", order=order, hue_order=hue_order, ax=ax)
            with warnings.catch_warnings():
                # seaborn 0.13 still passes boxplot(vert=...), deprecated in matplotlib 3.11
                warnings.filterwarnings("ignore", message=".*vert.*", category=matplotlib.MatplotlibDeprecationWarning)
                sns.boxplot(**common, palette=palette, showfliers=False, linewidth=0.6, fill=False, legend=False)
            sns.stripplot(**common, palette=palette, dodge=True, size=1.6, alpha=0.55, jitter=0.15, legend=False)
            ax.set_title(panel)
            ax.set_xlabel("")
            ax.set_ylabel("Dice per volume (%)")
            ax.set_ylim(0, 100)
        _shared_legend(fig, palette)
    return fig


def setting_drop_figure(results: Results) -> plt.Figure | None:
    """Mean Dice lost from setting 1 to setting 2 (percentage points), per method and dataset."""
    scores = results.fold_scores
    scores = scores[scores["train_dataset"] == scores["dataset"]]
    if scores.empty:
        return None
    organ_means = scores.groupby(["method", "variant", "dataset", "setting", "organ"])["dice"].mean()
    means = organ_means.groupby(["method", "variant", "dataset", "setting"]).mean().unstack("setting")
    if 1 not in means.columns or 2 not in means.columns:
        return None
    means = means[[1, 2]].dropna()
    if means.empty:
        return None
    labels = display_labels(results)
    frame = pd.DataFrame({
        "label": [labels.get((m, v), row_label(m, v)) for m, v, _ in means.index],
        "dataset": [dataset_label(d) for *_, d in means.index],
        "drop": (means[1] - means[2]).to_numpy() * 100,
    })
    order = list(frame.groupby("label")["drop"].mean().sort_values().index)
    datasets = [dataset_label(d) for d in sorted({d for *_, d in means.index}, key=dataset_sort_key)]
    with paper_style():
        fig, ax = plt.subplots(figsize=(WIDTH_IN, 1.0 + 0.28 * len(order) * max(1, len(datasets)) ** 0.5))
        sns.barplot(data=frame, y="label", x="drop", hue="dataset", order=order, hue_order=datasets,
                    palette="Set2", orient="h", ax=ax)
        ax.axvline(0, color="black", linewidth=0.8)
        for container in ax.containers:  # the numbers, so a zero drop is visible too
            ax.bar_label(container, fmt="%+.1f", padding=2, fontsize=FONT_PT)
        low, high = min(0.0, frame["drop"].min()), max(0.0, frame["drop"].max())
        pad = max(high - low, 2.0) * 0.15  # room for the labels; at least a ±0.3 pp axis
        ax.set_xlim(low - pad, high + pad)
        ax.set_xlabel("Setting 1 − setting 2 mean Dice (percentage points; > 0: lower in setting 2)")
        ax.set_ylabel("")
        ax.legend(title="Dataset", frameon=False, loc="best")
        fig.tight_layout()
    return fig


def smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard-style).

    Args:
        values: ``(T,)`` raw losses.
        weight: 0 = no smoothing, closer to 1 = smoother.
    """
    out = np.empty(len(values), dtype=float)
    average = 0.0
    for i, value in enumerate(np.asarray(values, dtype=float)):
        average = weight * average + (1 - weight) * value
        out[i] = average / (1 - weight ** (i + 1))
    return out


def train_loss_figure(results: Results, weight: float = 0.9) -> plt.Figure | None:
    """Smoothed training loss per method: mean over folds, seeds and setting-2 organ groups,
    band = std."""
    if not results.train_logs:
        return None
    runs = results.runs.set_index("run_dir")
    labels = display_labels(results)
    frames = []
    for run_dir, log in results.train_logs.items():
        if log.empty or not {"step", "loss"} <= set(log.columns):
            continue
        run = runs.loc[run_dir]
        # setting 2 trains one model per organ group; each group is its own curve
        groups = log.groupby("group", sort=False) if "group" in log.columns else [("", log)]
        for group_name, group_log in groups:
            group_log = group_log.sort_values("step")
            frames.append(pd.DataFrame({
                "step": group_log["step"].to_numpy(),
                "loss": smooth(group_log["loss"].to_numpy(), weight),
                "label": labels.get((run["method"], run["variant"]), row_label(run["method"], run["variant"])),
                "panel": f"trained on {dataset_label(run['train_dataset'])} · setting {run['setting']}",
                "_order": [(dataset_sort_key(run["train_dataset"]), int(run["setting"]))] * len(group_log),
                "run": f"{run_dir}:{group_name}",
            }))
    if not frames:
        return None
    frame = pd.concat(frames, ignore_index=True)
    palette = _palette(sorted(frame["label"].unique()))
    panels = list(dict.fromkeys(frame.sort_values("_order", key=lambda s: s.map(lambda v: v))["panel"]))
    with paper_style():
        fig, axes = _grid(len(panels), 2.0)
        for ax, panel in zip(axes, panels):
            data = frame[frame["panel"] == panel]
            hue_order = [label for label in palette if label in set(data["label"])]
            sns.lineplot(data=data, x="step", y="loss", hue="label", hue_order=hue_order, palette=palette,
                         errorbar="sd", linewidth=1.0, ax=ax, legend=False)
            if (data["loss"] > 0).all() and data["loss"].max() / data["loss"].min() > 20:
                ax.set_yscale("log")
            ax.set_title(panel)
            ax.set_xlabel("training step")
            ax.set_ylabel(f"loss (EMA {weight:g})")
        _shared_legend(fig, palette, lines=True)
    return fig


FIGURES = {
    "organ_dice": organ_dice_figure,
    "volume_distribution": volume_distribution_figure,
    "setting_drop": setting_drop_figure,
    "train_loss": train_loss_figure,
}

CAPTIONS = {
    "organ_dice": "Dice per organ: mean over folds, error bars = standard deviation across folds.",
    "volume_distribution": "Dice per query volume (box: quartiles; points: volumes; seeds averaged).",
    "setting_drop": "Drop of the mean Dice from setting 1 to setting 2 (in-domain).",
    "train_loss": "Training loss, exponentially smoothed; line = mean over folds and seeds, band = std.",
}


def write_figures(results: Results, out_dir: str | Path) -> dict[str, Path]:
    """Every figure that has data, as PNG + PDF under ``out_dir``; name -> PNG path."""
    written = {}
    for name, build in FIGURES.items():
        fig = build(results)
        if fig is not None:
            written[name] = save_figure(fig, out_dir, name)
    return written
