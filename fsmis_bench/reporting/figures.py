"""Figures (PNG + PDF at the width of a paper column, 8 pt text, fixed method colours).

Every builder takes :class:`~fsmis_bench.reporting.collect.Results` and a width
(:data:`~.style.DOUBLE_COLUMN_IN` or :data:`~.style.SINGLE_COLUMN_IN`) and returns a
matplotlib Figure, or None when the results hold nothing to draw (e.g. no setting-2 runs).
:func:`save_figure` writes it as ``<stem>.png`` and ``<stem>.pdf``; :func:`caption` says in
words what a figure shows, error bars included.

Statistics are drawn only where they exist: error bars and bands need at least two folds
(or runs), a box needs at least :data:`MIN_BOX_POINTS` volumes (fewer are drawn as points),
and a value of zero is drawn as a marker on the axis, never as an invisible bar.

A method has one colour (:func:`~.style.method_colour`), whatever its variant. What the
colour does not say is drawn with patterns that survive greyscale print
(:func:`make_series`): a series that is not like-for-like with the paper (random weights, a
non-standard option) and a method's second, third... variant are hatched (bars), drawn with
another marker shape (points; hollow for the not-like-for-like ones) and dashed (curves).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written headless; never open a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .collect import (  # noqa: E402
    Results,
    dataset_sort_key,
    expected_folds,
    uneven_seed_rows,
    organ_sort_key,
    per_case_scores,
    run_flags,
)
from .published import EXCLUSION_ALL_NOTE, only_legacy_exclusion  # noqa: E402
from .rows import N_FOLDS, random_weights_note  # noqa: E402
from .style import (  # noqa: E402
    DOUBLE_COLUMN_IN,
    FONT_PT,
    MAX_HEIGHT_IN,
    METHOD_COLOURS,
    Footnotes,
    dataset_display,
    edge_colour,
    eval_display,
    legend_columns,
    line_colour,
    method_colour,
    method_display,
    method_label,
    method_style,
    organ_display,
    paper_style,
    text_height_in,
    text_problems,
    text_width_in,
    variant_display,
    wrap,
)

#: the default figure width: a double-column page
WIDTH_IN = DOUBLE_COLUMN_IN
#: fewer points than this are shown as points only, never summarised as a box
MIN_BOX_POINTS = 5
#: bars lower than this (percent of the axis) also get a marker on the axis
_ZERO_PCT = 1.0
_MIN_PANEL_HEIGHT_IN = 1.6
#: the flattest panel drawn, where even two columns of :data:`_MIN_PANEL_HEIGHT_IN` would
#: not fit a page
_MIN_PANEL_HEIGHT_IN_CROWDED = 1.2

NOTE_NON_STANDARD = ("non-standard option (named in brackets, or in a \u201cruns with\u201d note: a protocol option, or a "
                     "departure from the setup of the published numbers, or from a method's own default budget); not comparable "
                     "with published numbers")
#: the footnote of a series whose only non-standard option is exclusion=all, the rule of the
#: published setting-2 numbers: :data:`NOTE_NON_STANDARD` would say the opposite for it
NOTE_LEGACY_EXCLUSION = EXCLUSION_ALL_NOTE + " (but not with standard runs)"

#: per pattern index (:func:`pattern_indices`): 0 is drawn plain (no hatch, a circle, a solid
#: line), the others hatched / with another marker / dashed, so they differ in greyscale too
VARIANT_HATCHES = ("", "////", "\\\\\\\\", "xxxx", "....", "++++", "oooo")
VARIANT_MARKERS = ("o", "s", "D", "v", "P", "X", "h")
VARIANT_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 2)), (0, (8, 2)))
#: the line families a hatch character draws: ``x`` is ``/`` and ``\`` overlaid, so a pair
#: holding both, or ``x`` with either, would draw like ``xxxx``
_HATCH_LINES = {"/": {"/"}, "\\": {"\\"}, "x": {"/", "\\"}, "+": {"|", "-"}, ".": {"."}, "o": {"o"}}


def hatch_lines(hatch: str) -> frozenset[str]:
    """What ``hatch`` draws, as the set of its line families (equal sets look alike)."""
    return frozenset(line for char in hatch for line in _HATCH_LINES.get(char, {char}))


def _distinct_hatches() -> tuple[str, ...]:
    """The hatches of pattern 1, 2, ...: each single one, then each two of them overlaid that
    draw something no earlier one draws."""
    singles = VARIANT_HATCHES[1:]
    kept: list[str] = []
    for hatch in singles + tuple(first + second for i, first in enumerate(singles) for second in singles[i + 1:]):
        if hatch_lines(hatch) not in {hatch_lines(h) for h in kept}:
            kept.append(hatch)
    return tuple(kept)


_PATTERN_HATCHES = _distinct_hatches()


def variant_pattern(index: int) -> tuple[str, str, str | tuple]:
    """(hatch, marker, line style) of pattern ``index`` (:func:`pattern_indices`).

    0 is plain; no other index is. Patterns 1-18 have hatches of their own (the 6 single
    ones, then the 12 overlaid pairs that draw something else) and 1-36 (marker, line
    style) pairs of their own, so
    a method with many variants (a sweep over ``protocol.supp_idx``) never draws two of them
    alike, nor a marked one like the plain, standard one.
    """
    if index == 0:
        return VARIANT_HATCHES[0], VARIANT_MARKERS[0], VARIANT_LINESTYLES[0]
    step = index - 1
    others = len(VARIANT_MARKERS) - 1
    return (_PATTERN_HATCHES[step % len(_PATTERN_HATCHES)], VARIANT_MARKERS[1 + step % others],
            VARIANT_LINESTYLES[1 + (step // others + step) % others])


def note_incomplete(details: Sequence[str]) -> str:
    """The footnote of incomplete series; ``details``: how many folds each has, where."""
    text = "incomplete: fewer folds than the test dataset has"
    return f"{text} ({'; '.join(details)})" if details else text


def note_uneven_seeds(details: Sequence[str]) -> str:
    """The footnote of series whose folds ran with unequal numbers of seeds (``details``:
    which folds have which seeds, where)."""
    text = ("unequal seeds across folds: each fold is the mean over its own seeds, and the folds are weighed alike")
    return f"{text} ({'; '.join(details)})" if details else text


# -- series: one (method, variant) as drawn -------------------------------------------

@dataclass(frozen=True)
class Series:
    """One (method, variant) as drawn.

    Attributes:
        label: display name with footnote marks.
        colour: :func:`~.style.method_colour` (a function of the method's name only).
        hatch, marker, linestyle: the pattern of index ``pattern`` (:func:`variant_pattern`).
        pattern: :func:`pattern_indices` (0: drawn plain).
        hollow: not like-for-like with the paper (random weights or a non-standard option):
            its points are drawn hollow.
    """

    method: str
    variant: str
    label: str
    colour: tuple[float, float, float]
    hatch: str = ""
    marker: str = "o"
    linestyle: object = "-"
    pattern: int = 0
    hollow: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.variant)

    @property
    def marker_face(self) -> object:
        """The points' fill: white for a hollow series, else its colour."""
        return "white" if self.hollow else self.colour

    @property
    def marker_edge(self) -> tuple[float, float, float]:
        """The points' outline: the colour itself on a hollow marker (its only colour), else
        the darker outline of :func:`~.style.edge_colour`."""
        return self.colour if self.hollow else edge_colour(self.colour)


def series_sort_key(method: str, variant: str) -> tuple:
    """Built-in families in the palette's order, then plugins by name; ablations after."""
    style = method_style(method)
    order = list(METHOD_COLOURS)
    family_rank = (order.index(style.family), "") if style.family in order else (len(order), style.family)
    return (*family_rank, style.shade, variant != "", variant)


#: a variant text longer than this, shared by several series, moves to a footnote
SHARED_VARIANT_CHARS = 24


def pattern_indices(keys: Iterable[tuple[str, str]], marked: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """(method, variant) -> the index of its hatch, marker and line style.

    0 (plain) only for the first unmarked variant of each method, in :func:`series_sort_key`
    order; every other series (a ``marked`` one: random weights or a non-standard option;
    a method's second, third... variant) gets the next index of its family, so that the
    patterned series of one family (the SD-FSMIS ablations on a reduced budget, whose
    shades are close) differ from each other in greyscale too.
    """
    plain: set[str] = set()
    counts: dict[str, int] = {}
    indices = {}
    for method, variant in sorted(set(keys), key=lambda k: series_sort_key(*k)):
        if (method, variant) not in marked and method not in plain:
            plain.add(method)
            indices[(method, variant)] = 0
            continue
        family = method_style(method).family
        counts[family] = counts.get(family, 0) + 1
        indices[(method, variant)] = counts[family]
    return indices


def make_series(results: Results, keys: Iterable[tuple[str, str]], notes: Footnotes,
                folds: pd.DataFrame | None = None) -> list[Series]:
    """The series of ``keys`` in legend order, with their footnotes registered in ``notes``.

    Args:
        folds: the fold scores the figure draws (default: all); a series with fewer folds
            than its test dataset has (:func:`~.collect.expected_folds`) in any evaluation
            there is marked incomplete, one whose folds there ran with unequal seed counts
            (:func:`~.collect.uneven_seed_rows`) is marked too.
    """
    flags = run_flags(results).set_index(["method", "variant"])
    scores = results.fold_scores if folds is None else folds
    counts = scores.groupby(["method", "variant", "train_dataset", "dataset", "setting", "organ"])["fold"].nunique()
    per_eval = counts.groupby(["method", "variant", "train_dataset", "dataset", "setting"]).min()
    ordered = sorted(set(keys), key=lambda k: series_sort_key(*k))
    wanted, uneven_rows = expected_folds(results), uneven_seed_rows(results)
    # "1 fold on Abd-MRI setting 1" -> the series that have that few there
    short: dict[str, list[tuple[str, str]]] = {}
    # "Abd-MRI setting 1: fold 0: seeds 0,1; fold 1: seed 0" -> the series seeded so there
    uneven: dict[str, list[tuple[str, str]]] = {}
    for (method, variant, train, dataset, setting), n in sorted(per_eval.items(), key=lambda kv: kv[1]):
        if (method, variant) not in ordered:
            continue
        of_folds = wanted.get((method, variant, train, dataset, setting), N_FOLDS)
        if n < of_folds:
            text = f"{n} of {of_folds} fold{'s' if of_folds != 1 else ''} on {eval_display(train, dataset)} setting {setting}"
            short.setdefault(text, []).append((method, variant))
        seeds = uneven_rows.get((method, variant, train, dataset, setting))
        if seeds:
            uneven.setdefault(f"{eval_display(train, dataset)} setting {setting}, {seeds}", []).append((method, variant))
    incomplete = {k for keys_ in short.values() for k in keys_}
    unevenly_seeded = {k for keys_ in uneven.values() for k in keys_}
    # a long variant shared by several series (one reduced CPU recipe for every diffusion
    # method) is said once, in a footnote, instead of in every label
    texts = {key: variant_display(key[1]) for key in ordered}
    shared = {text for text in texts.values()
              if len(text) > SHARED_VARIANT_CHARS and sum(t == text for t in texts.values()) > 1}

    def label_of(key: tuple[str, str]) -> str:
        return method_display(key[0]) if texts[key] in shared else method_label(*key)

    details = [f"{text}: {', '.join(label_of(k) for k in sorted(ks, key=lambda k: ordered.index(k)))}"
               for text, ks in short.items()]
    seed_details = [f"{', '.join(label_of(k) for k in sorted(ks, key=lambda k: ordered.index(k)))} on {text}"
                    for text, ks in uneven.items()]
    # patterns over every series of the report, not only the figure's: the same in every
    # figure of the report
    marked = {key for key, random, options in zip(flags.index, flags["random_weights"], flags["non_standard"])
              if random or options}
    patterns = pattern_indices(set(zip(results.runs["method"], results.runs["variant"])) | set(ordered), marked)
    series = []
    for method, variant in ordered:
        own = [f"runs with {texts[(method, variant)]}"] if texts[(method, variant)] in shared else []
        if (method, variant) in incomplete:
            own.append(note_incomplete(details))
        if (method, variant) in unevenly_seeded:
            own.append(note_uneven_seeds(seed_details))
        if (method, variant) in flags.index:
            flag = flags.loc[(method, variant)]
            if bool(flag["random_weights"]):
                # the tiny CPU backbone is not "the pretrained architecture": say which case it is
                reasons = [r for r in str(flag["random_reason"]).split(";") if r] or [""]
                own.extend(random_weights_note(reason) for reason in reasons)
            if flag["non_standard"]:
                # exclusion=all alone is the published setting-2 rule: say that, not "not comparable"
                own.append(NOTE_LEGACY_EXCLUSION if only_legacy_exclusion(str(flag["non_standard"]))
                           else NOTE_NON_STANDARD)
        label = notes.mark(label_of((method, variant)), own)
        index = patterns[(method, variant)]
        series.append(Series(method, variant, label, method_colour(method), *variant_pattern(index), index,
                             (method, variant) in marked))
    return series


# -- layout ---------------------------------------------------------------------------

LEGEND_STYLE = {"frameon": False, "borderaxespad": 0.2, "columnspacing": 1.2, "handlelength": 1.6}


def _legend_height_in(handles: Sequence, labels: Sequence[str], ncol: int, title: str | None, width: float) -> float:
    """The legend's drawn height, measured on a scratch canvas with the same settings."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scratch = Figure(figsize=(width, 20))
    canvas = FigureCanvasAgg(scratch)
    legend = scratch.legend(list(handles), list(labels), title=title, ncol=ncol, loc="upper center", **LEGEND_STYLE)
    return legend.get_window_extent(canvas.get_renderer()).height / scratch.dpi + 0.04


def drawn_height_in(text: str) -> float:
    """The height of ``text`` as drawn at the figures' font size, measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scratch = Figure(figsize=(8, 20))
    canvas = FigureCanvasAgg(scratch)
    artist = scratch.text(0, 0.5, text, fontsize=FONT_PT)
    return artist.get_window_extent(canvas.get_renderer()).height / scratch.dpi


@dataclass
class Footer:
    """The legend and footnotes under the panels, measured before the figure is made."""

    handles: list
    labels: list[str]  # wrapped legend labels
    ncol: int
    footnotes: list[str]  # wrapped footnote paragraphs
    title: str | None
    legend_height: float

    @classmethod
    def plan(cls, handles: Sequence, labels: Sequence[str], notes: Footnotes, width: float,
             title: str | None = None) -> "Footer":
        em = FONT_PT / 72
        wrapped = [wrap(label, width - 0.2 - 2.6 * em) for label in labels]
        ncol = legend_columns(wrapped, width - 0.2)
        height = _legend_height_in(handles, wrapped, ncol, title, width) if wrapped else 0.0
        return cls(list(handles), wrapped, ncol, [wrap(line, width - 0.2) for line in notes.lines()], title, height)

    @property
    def notes_text(self) -> str:
        return "\n".join(self.footnotes)

    @property
    def notes_height(self) -> float:
        return drawn_height_in(self.notes_text) + 0.06 if self.footnotes else 0.0

    @property
    def height(self) -> float:
        return self.legend_height + self.notes_height

    def draw(self, sub) -> None:
        """Legend at the top of the subfigure ``sub``, footnotes below it."""
        if self.labels:
            sub.legend(self.handles, self.labels, title=self.title, loc="upper center", ncol=self.ncol,
                       bbox_to_anchor=(0.5, 1.0), **LEGEND_STYLE)
        if self.footnotes:  # one text block: its lines cannot overlap each other
            sub.text(0.01, 1.0 - self.legend_height / self.height, self.notes_text, ha="left", va="top",
                     fontsize=FONT_PT)


@dataclass
class Layout:
    """A figure: a grid of panels above a footer with the legend and the footnotes."""

    fig: plt.Figure
    axes: list[plt.Axes]
    footer: Footer
    footer_fig: object  # the SubFigure holding the footer, or None
    width: float
    ncols: int
    panel_height: float

    def y_label(self, ax: plt.Axes, text: str) -> None:
        """An axis label wrapped to the panel's height (it runs along it)."""
        ax.set_ylabel(wrap(text, self.panel_height * 0.7))

    @property
    def panel_width(self) -> float:
        """Room for one panel's plot and titles, in inches (without the y axis labels)."""
        return self.width / self.ncols - 0.55

    def finish(self) -> None:
        if self.footer_fig is not None:
            self.footer.draw(self.footer_fig)


def layout(n_panels: int, panel_height: float, width: float, handles: Sequence, labels: Sequence[str],
           notes: Footnotes, legend_title: str | None = None, ncols: int | None = None) -> Layout:
    """Panels in one column (single-column width) or two, legend and footnotes below them.

    At single-column width the panels go into two columns where one column of readable
    panels (:data:`_MIN_PANEL_HEIGHT_IN`) would make the figure taller than a page
    (:data:`~.style.MAX_HEIGHT_IN`): six training-loss panels in one column were 13.8 in
    tall. Only where two columns are still too tall do the panels get flatter than that
    minimum, down to :data:`_MIN_PANEL_HEIGHT_IN_CROWDED`.
    """
    footer = Footer.plan(handles, labels, notes, width, legend_title)
    if ncols is None:
        ncols = 1 if n_panels == 1 or width < 5 else 2
        if ncols == 1 and n_panels > 1 and n_panels * _MIN_PANEL_HEIGHT_IN + footer.height > MAX_HEIGHT_IN:
            ncols = 2
    nrows = math.ceil(n_panels / ncols)
    # flatter panels rather than a figure taller than a page (down to a readable minimum, and
    # below it to a crowded one only where the figure would not fit a page otherwise)
    room = (MAX_HEIGHT_IN - footer.height) / nrows
    floor = _MIN_PANEL_HEIGHT_IN if room >= _MIN_PANEL_HEIGHT_IN else _MIN_PANEL_HEIGHT_IN_CROWDED
    panel_height = min(panel_height, max(floor, room))
    panels_height = panel_height * nrows
    fig = plt.figure(figsize=(width, panels_height + footer.height), layout="constrained")
    if footer.height > 0:
        top, footer_fig = fig.subfigures(2, 1, height_ratios=[panels_height, footer.height], hspace=0.0)
    else:
        top, footer_fig = fig, None
    grid = top.subplots(nrows, ncols, squeeze=False)
    flat = list(grid.ravel())
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return Layout(fig, flat[:n_panels], footer, footer_fig, width, ncols, panel_height)


def bar_handles(series: Sequence[Series]) -> list:
    """Legend patches: colour and hatch as the bars."""
    return [plt.Rectangle((0, 0), 1, 1, facecolor=s.colour, edgecolor=edge_colour(s.colour), linewidth=0.5,
                          hatch=s.hatch or None)
            for s in series]


def point_handles(series: Sequence[Series]) -> list:
    """Legend markers: colour, shape and fill as the points."""
    return [plt.Line2D([0], [0], color=s.colour, marker=s.marker, markersize=5, markerfacecolor=s.marker_face,
                       markeredgecolor=s.marker_edge, markeredgewidth=0.9 if s.hollow else 0.5, linestyle="none")
            for s in series]


def line_handles(series: Sequence[Series]) -> list:
    """Legend lines: colour and line style as the curves."""
    return [plt.Line2D([0], [0], color=s.colour, linewidth=1.5, linestyle=s.linestyle) for s in series]


def category_labels(ax: plt.Axes, labels: Sequence[str], panel_width_in: float) -> None:
    """x tick labels wrapped to the room each category has."""
    room = max(panel_width_in * 0.85 / max(len(labels), 1), text_width_in("MMM"))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([wrap(label, room) for label in labels])


def panel_title(ax: plt.Axes, text: str, panel_width_in: float) -> None:
    ax.set_title(wrap(text, panel_width_in * 0.95), fontsize=FONT_PT)


# -- shared drawing -------------------------------------------------------------------

@dataclass
class Stat:
    """A value in percent, its spread (None below two folds) and the number of folds."""

    mean: float
    sd: float | None
    n: int


def fold_stats(scores: pd.DataFrame, with_mean: bool = False) -> dict[tuple[str, str, str], Stat]:
    """(method, variant, organ) -> Stat over folds; ``organ="mean"``: the organ mean per fold."""
    out: dict[tuple[str, str, str], Stat] = {}
    for (method, variant), group in scores.groupby(["method", "variant"]):
        for organ, per_organ in group.groupby("organ"):
            values = per_organ["dice"].to_numpy(dtype=float) * 100
            out[(method, variant, str(organ))] = _stat(values)
        if with_mean:
            wide = group.pivot_table(index="fold", columns="organ", values="dice").dropna() * 100
            if len(wide):
                # the mean over organs of the fold means, as in the tables; spread over folds
                organ_means = [out[(method, variant, str(o))].mean for o in wide.columns]
                stat = _stat(wide.mean(axis=1).to_numpy())
                out[(method, variant, "mean")] = Stat(float(np.mean(organ_means)), stat.sd, stat.n)
    return out


def _stat(values: np.ndarray) -> Stat:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return Stat(float("nan"), None, 0)
    return Stat(float(values.mean()), float(values.std(ddof=1)) if len(values) >= 2 else None, len(values))


def draw_bars(ax: plt.Axes, categories: Sequence[str], series: Sequence[Series],
              stats: dict[tuple[str, str, str], Stat], group_width: float = 0.8) -> dict[tuple[str, str, str], float]:
    """Grouped bars (mean), ±SD error bars where n >= 2, a marker on the axis for ~0.

    Returns:
        (method, variant, category) -> the bar's x position.
    """
    width = group_width / max(len(series), 1)
    positions = {}
    for i, s in enumerate(series):
        for j, category in enumerate(categories):
            stat = stats.get((s.method, s.variant, category))
            if stat is None or math.isnan(stat.mean):
                continue
            x = j - group_width / 2 + width * (i + 0.5)
            positions[(s.method, s.variant, category)] = x
            ax.bar(x, stat.mean, width * 0.9, color=s.colour, edgecolor=edge_colour(s.colour), linewidth=0.4, zorder=2,
                   hatch=s.hatch or None)
            if stat.sd is not None:
                ax.errorbar(x, stat.mean, yerr=stat.sd, fmt="none", ecolor="#222222", elinewidth=0.6, capsize=1.4,
                            capthick=0.6, zorder=3)
            if stat.mean < _ZERO_PCT:
                zero_marker(ax, x, s.colour)
    ax.set_xlim(-0.5, len(categories) - 0.5)
    return positions


#: the legend entry of :func:`zero_marker`, in every figure that draws one
ZERO_LABEL = f"about 0 (under {_ZERO_PCT:g} %)"


def zero_handle():
    """A grey :func:`zero_marker` for the legend: the figure explains its own triangles."""
    return plt.Line2D([0], [0], marker="^", markersize=4, color="#777777", markeredgecolor=edge_colour("#777777"),
                      markeredgewidth=0.5, linestyle="none")


def zero_marker(ax: plt.Axes, x: float, colour) -> None:
    """A value of (about) zero: a marker sitting on the axis, drawn over the spine."""
    ax.plot([x], [0], marker="^", markersize=4, color=colour, markeredgecolor=edge_colour(colour),
            markeredgewidth=0.5, clip_on=False, zorder=5, linestyle="none")


def _eval_panels(scores: pd.DataFrame) -> list[tuple[str, str, int]]:
    keys = scores[["train_dataset", "dataset", "setting"]].drop_duplicates().itertuples(index=False)
    return sorted(((str(t), str(d), int(s)) for t, d, s in keys),
                  key=lambda k: (k[0] != k[1], dataset_sort_key(k[1]), dataset_sort_key(k[0]), k[2]))


def _panel_name(train: str, dataset: str, setting: int) -> str:
    return f"{eval_display(train, dataset)} · setting {setting}"


def _select(frame: pd.DataFrame, train: str, dataset: str, setting: int) -> pd.DataFrame:
    return frame[(frame["train_dataset"] == train) & (frame["dataset"] == dataset) & (frame["setting"] == setting)]


def dice_panel(ax, lay, categories: list[str], panel: tuple[str, str, int], y_label: str = "Dice (%)",
               title: str | None = None) -> None:
    """Label one Dice panel of an evaluation: organ names under the categories, the panel's
    dataset and setting as its title (``title``: that name with footnote marks), a 0-100 %
    axis, no vertical grid."""
    category_labels(ax, [organ_display(c) for c in categories], lay.panel_width)
    panel_title(ax, title or _panel_name(*panel), lay.panel_width)
    lay.y_label(ax, y_label)
    ax.set_ylim(0, 100)
    ax.grid(axis="x", visible=False)


# -- figures --------------------------------------------------------------------------

def organ_dice_figure(results: Results, width: float = WIDTH_IN) -> plt.Figure | None:
    """Per-organ Dice (%): mean over folds; error bars ±1 SD across folds where >= 2 folds."""
    scores = results.fold_scores
    if scores.empty:
        return None
    notes = Footnotes()
    series = make_series(results, zip(scores["method"], scores["variant"]), notes)
    panels = _eval_panels(scores)
    stats = {panel: fold_stats(_select(scores, *panel)) for panel in panels}
    handles, labels = bar_handles(series), [s.label for s in series]
    if any(stat.mean < _ZERO_PCT for panel in stats.values() for stat in panel.values()):
        handles, labels = handles + [zero_handle()], labels + [ZERO_LABEL]
    with paper_style():
        lay = layout(len(panels), 2.0, width, handles, labels, notes)
        for ax, (train, dataset, setting) in zip(lay.axes, panels):
            data = _select(scores, train, dataset, setting)
            organs = sorted(data["organ"].unique(), key=organ_sort_key)
            shown = [s for s in series if ((data["method"] == s.method) & (data["variant"] == s.variant)).any()]
            draw_bars(ax, organs, shown, stats[(train, dataset, setting)])
            dice_panel(ax, lay, organs, (train, dataset, setting))
        lay.finish()
    return lay.fig


def _jitter(n: int, seed: int, spread: float) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-spread, spread, n)


def volume_distribution_figure(results: Results, width: float = WIDTH_IN) -> plt.Figure | None:
    """Per-volume Dice (%): every volume as a point; a box where there are >= 5 volumes."""
    per_case = per_case_scores(results)
    if per_case.empty:
        return None
    notes = Footnotes()
    series = make_series(results, zip(per_case["method"], per_case["variant"]), notes)
    panels = _eval_panels(per_case)
    with paper_style():
        lay = layout(len(panels), 2.0, width, point_handles(series), [s.label for s in series], notes)
        for ax, (train, dataset, setting) in zip(lay.axes, panels):
            data = _select(per_case, train, dataset, setting)
            organs = sorted(data["organ"].unique(), key=organ_sort_key)
            shown = [s for s in series if ((data["method"] == s.method) & (data["variant"] == s.variant)).any()]
            group = 0.8
            step = group / max(len(shown), 1)
            for i, s in enumerate(shown):
                for j, organ in enumerate(organs):
                    values = data.loc[(data["method"] == s.method) & (data["variant"] == s.variant)
                                      & (data["organ"] == organ), "dice"].to_numpy(dtype=float) * 100
                    if len(values) == 0:
                        continue
                    x = j - group / 2 + step * (i + 0.5)
                    if len(values) >= MIN_BOX_POINTS:
                        # the series' own colour, as in the legend: the darker outline of bars
                        # (edge_colour) turned Prototype's sky blue into DiffewS's blue
                        line = line_colour(s.colour)
                        ax.boxplot(values, positions=[x], widths=step * 0.75, showfliers=False, whis=1.5,
                                   patch_artist=True, manage_ticks=False, zorder=2,
                                   boxprops={"facecolor": "none", "edgecolor": line, "linewidth": 0.8},
                                   medianprops={"color": line, "linewidth": 1.3},
                                   whiskerprops={"color": line, "linewidth": 0.7},
                                   capprops={"color": line, "linewidth": 0.7})
                        size, alpha = 2.0, 0.6
                    else:
                        size, alpha = 3.2, 0.95
                    xs = x + _jitter(len(values), i * 1000 + j, step * 0.28)
                    ax.plot(xs, values, linestyle="none", marker=s.marker, markersize=size, alpha=alpha,
                            color=s.colour, markerfacecolor=s.marker_face, markeredgecolor=s.marker_edge,
                            markeredgewidth=0.7 if s.hollow else 0.3, clip_on=False, zorder=4)
            ax.set_xlim(-0.5, len(organs) - 0.5)
            dice_panel(ax, lay, organs, (train, dataset, setting), "Dice per volume (%)")
        lay.finish()
    return lay.fig


def setting_drops(results: Results) -> pd.DataFrame:
    """Per (method, variant, dataset): mean Dice lost from setting 1 to 2, in points.

    Paired by fold: only folds finished in both settings with every organ count; per fold,
    the organ mean of setting 1 minus that of setting 2. Columns: method, variant, dataset,
    drop, sd (None below two folds), n.
    """
    scores = results.fold_scores
    scores = scores[scores["train_dataset"] == scores["dataset"]]
    rows = []
    for (method, variant, dataset), group in scores.groupby(["method", "variant", "dataset"]):
        wide = group.pivot_table(index=["setting", "fold"], columns="organ", values="dice")
        if 1 not in wide.index.get_level_values(0) or 2 not in wide.index.get_level_values(0):
            continue
        first, second = wide.loc[1], wide.loc[2]
        organs = [o for o in first.columns if first[o].notna().any() and second[o].notna().any()]
        folds = sorted(set(first.dropna(subset=organs).index) & set(second.dropna(subset=organs).index))
        if not folds or not organs:
            continue
        drops = (first.loc[folds, organs].mean(axis=1) - second.loc[folds, organs].mean(axis=1)).to_numpy() * 100
        stat = _stat(drops)
        rows.append({"method": method, "variant": variant, "dataset": dataset, "drop": stat.mean, "sd": stat.sd, "n": stat.n})
    return pd.DataFrame(rows, columns=["method", "variant", "dataset", "drop", "sd", "n"])


def setting_drop_figure(results: Results, width: float = WIDTH_IN) -> plt.Figure | None:
    """Mean Dice lost from setting 1 to setting 2 (percentage points), per method and dataset."""
    drops = setting_drops(results)
    if drops.empty:
        return None
    notes = Footnotes()
    scores = results.fold_scores
    shown = scores[(scores["train_dataset"] == scores["dataset"]) & scores["dataset"].isin(set(drops["dataset"]))
                   & scores["setting"].isin([1, 2])]
    series = make_series(results, zip(drops["method"], drops["variant"]), notes, shown)
    datasets = sorted(drops["dataset"].unique(), key=dataset_sort_key)
    label_room = min(2.0, width * 0.36)
    labels = {s.key: wrap(s.label, label_room) for s in series}
    xlabel = wrap("Setting 1 − setting 2 mean Dice (points; > 0: lower in setting 2)", width - label_room - 0.3)
    with paper_style():
        shown_per_dataset, heights = [], []
        for dataset in datasets:
            data = drops[drops["dataset"] == dataset]
            shown = [s for s in series if ((data["method"] == s.method) & (data["variant"] == s.variant)).any()]
            shown_per_dataset.append(shown)
            title = wrap(dataset_display(dataset), width - 0.3)
            rows = sum(max(0.24, text_height_in(labels[s.key]) + 0.08) for s in shown)
            heights.append(rows + text_height_in(title) + 0.35)
        heights[-1] += text_height_in(xlabel) + 0.05
        footer = Footer.plan([], [], notes, width)  # footnotes only: the y axis names the methods
        fig = plt.figure(figsize=(width, sum(heights) + footer.height), layout="constrained")
        if footer.height > 0:
            top, footer_fig = fig.subfigures(2, 1, height_ratios=[sum(heights), footer.height], hspace=0.0)
        else:
            top, footer_fig = fig, None
        axes = top.subplots(len(datasets), 1, squeeze=False, height_ratios=heights)[:, 0]
        low = min(0.0, float((drops["drop"] - drops["sd"].fillna(0)).min()))
        high = max(0.0, float((drops["drop"] + drops["sd"].fillna(0)).max()))
        pad = max(high - low, 2.0) * 0.18  # room for the value labels; at least a ±0.4 pp axis
        for ax, dataset, shown in zip(axes, datasets, shown_per_dataset):
            data = drops[drops["dataset"] == dataset]
            for y, s in enumerate(shown):
                row = data[(data["method"] == s.method) & (data["variant"] == s.variant)].iloc[0]
                spread = 0.0 if row["sd"] is None or pd.isna(row["sd"]) else float(row["sd"])
                ax.barh(y, row["drop"], 0.7, color=s.colour, edgecolor=edge_colour(s.colour), linewidth=0.4, zorder=2,
                        hatch=s.hatch or None)
                if spread > 0 or (row["sd"] is not None and not pd.isna(row["sd"])):
                    ax.errorbar(row["drop"], y, xerr=spread, fmt="none", ecolor="#222222", elinewidth=0.6,
                                capsize=1.4, zorder=3)
                if abs(row["drop"]) < 0.05 * pad:  # a zero-length bar: show the value as a marker
                    ax.plot([0], [y], marker="D", markersize=4, color=s.colour, markeredgecolor=edge_colour(s.colour),
                            markeredgewidth=0.5, linestyle="none", zorder=5)
                end = row["drop"] + spread if row["drop"] >= 0 else row["drop"] - spread
                ax.text(end + (pad * 0.08 if row["drop"] >= 0 else -pad * 0.08), y, f"{row['drop']:+.1f}",
                        ha="left" if row["drop"] >= 0 else "right", va="center", fontsize=FONT_PT, zorder=4)
            ax.set_yticks(range(len(shown)))
            ax.set_yticklabels([labels[s.key] for s in shown])
            ax.set_ylim(len(shown) - 0.5, -0.5)
            ax.axvline(0, color="black", linewidth=0.7, zorder=3)
            ax.set_xlim(low - pad, high + pad)
            ax.set_title(wrap(dataset_display(dataset), width - label_room - 0.3), fontsize=FONT_PT, loc="left")
            ax.grid(axis="y", visible=False)
        axes[-1].set_xlabel(xlabel)
        if footer_fig is not None:
            footer.draw(footer_fig)
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


def train_curves(results: Results, weight: float = 0.9) -> pd.DataFrame:
    """Smoothed loss per (run, organ group): columns method, variant, train_dataset, setting, curve, step, loss."""
    runs = results.runs.set_index("run_dir")
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
                "method": run["method"], "variant": run["variant"], "train_dataset": run["train_dataset"],
                "setting": int(run["setting"]), "curve": f"{run_dir}:{group_name}",
                "step": group_log["step"].to_numpy(), "loss": smooth(group_log["loss"].to_numpy(), weight),
            }))
    columns = ["method", "variant", "train_dataset", "setting", "curve", "step", "loss"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


#: in train_loss, a marker per training (training dataset and setting) when there are several
TRAINING_MARKERS = ("o", "s", "D", "v", "P", "X", "h")


def train_loss_figure(results: Results, weight: float = 0.9, width: float = WIDTH_IN) -> plt.Figure | None:
    """Smoothed training loss, one panel per method: methods optimise different objectives
    (their losses share no scale), so no two methods share a y axis.

    In a panel, one line per variant (colour and line style as in the legend) and training
    (training dataset and setting; with several in the figure each has a marker, named in
    the legend): mean over folds, seeds and setting-2 organ groups; band = ±1 SD where at
    least two curves reach the step.
    """
    curves = train_curves(results, weight)
    if curves.empty:
        return None
    notes = Footnotes()
    series = make_series(results, zip(curves["method"], curves["variant"]), notes)
    methods = list(dict.fromkeys(s.method for s in series))  # legend order
    trainings = sorted({(str(t), int(k)) for t, k in zip(curves["train_dataset"], curves["setting"])},
                       key=lambda key: (dataset_sort_key(key[0]), key[1]))
    several = len(trainings) > 1
    markers = {key: TRAINING_MARKERS[i % len(TRAINING_MARKERS)] for i, key in enumerate(trainings)}
    handles, labels = line_handles(series), [s.label for s in series]
    if several:  # which marker is which training: under the methods in the same legend
        handles += [plt.Line2D([0], [0], color="#444444", linewidth=0, marker=markers[key], markersize=4)
                    for key in trainings]
        labels += [_training_name(*key) for key in trainings]
    with paper_style():
        lay = layout(len(methods), 1.9, width, handles, labels, notes)
        for ax, method in zip(lay.axes, methods):
            data = curves[curves["method"] == method]
            for s in (s for s in series if s.method == method):
                for key in trainings:
                    mine = data[(data["variant"] == s.variant) & (data["train_dataset"] == key[0])
                                & (data["setting"] == key[1])]
                    if mine.empty:
                        continue
                    wide = mine.pivot_table(index="step", columns="curve", values="loss")
                    mean = wide.mean(axis=1)
                    count = wide.notna().sum(axis=1)
                    sd = wide.std(axis=1, ddof=1).where(count >= 2)
                    # a run that logged once is a point, not an invisible one-point line
                    marker = markers[key] if several or len(mean) < 3 else None
                    # about six markers per line, staggered per training so that lines on top
                    # of each other still show every marker
                    every = max(1, len(mean) // 6)
                    start = trainings.index(key) * every // len(trainings)
                    ax.plot(mean.index, mean.to_numpy(), color=s.colour, linewidth=1.0, linestyle=s.linestyle, zorder=3,
                            marker=marker, markersize=3, markevery=(start, every), markerfacecolor=s.marker_face,
                            markeredgecolor=s.marker_edge, markeredgewidth=0.6 if s.hollow else 0.4)
                    if sd.notna().any():
                        ax.fill_between(mean.index, (mean - sd).to_numpy(), (mean + sd).to_numpy(), color=s.colour,
                                        alpha=0.2, linewidth=0, zorder=2)
            if (data["loss"] > 0).all() and data["loss"].max() / data["loss"].min() > 20:
                ax.set_yscale("log")
            title = method_display(method)
            panel_title(ax, title if several else f"{title} · {_training_name(*trainings[0])}", lay.panel_width)
            ax.set_xlabel("training step")
            lay.y_label(ax, f"loss (EMA {weight:g})")
        lay.finish()
    return lay.fig


def _training_name(train: str, setting: int) -> str:
    return f"trained on {dataset_display(train)} · setting {setting}"


def _comparison(results: Results, width: float = WIDTH_IN) -> plt.Figure | None:
    from .comparison import published_comparison_figure

    return published_comparison_figure(results, width)


FIGURES: dict[str, Callable[..., plt.Figure | None]] = {
    "published_comparison": _comparison,
    "organ_dice": organ_dice_figure,
    "volume_distribution": volume_distribution_figure,
    "setting_drop": setting_drop_figure,
    "train_loss": train_loss_figure,
}


def _spread_sentence(n_folds: Sequence[int]) -> str:
    counts = sorted(set(n_folds))
    if not counts:
        return ""
    if counts[-1] < 2:
        return "One fold per method, so no error bars."
    text = "Error bars: ±1 standard deviation across folds"
    if counts[0] < 2:
        text += " (only where a method has at least 2 folds; bars without them come from one fold)"
    return text + "."


def _scan_in_two_folds(results: Results) -> bool:
    """Whether a row's query scan was evaluated in more than one fold (overlapping folds)."""
    cases = results.cases
    if cases.empty:
        return False
    keys = ["method", "variant", "train_dataset", "dataset", "setting", "organ", "case_id"]
    return bool((cases.groupby(keys)["fold"].nunique() > 1).any())


def caption(name: str, results: Results) -> str:
    """What figure ``name`` shows, in words, for these results (the HTML caption)."""
    scores = results.fold_scores
    n_folds = list(scores.groupby(["method", "variant", "train_dataset", "dataset", "setting", "organ"])["fold"].nunique())
    if name == "organ_dice":
        return (f"Dice per organ (%), mean over folds. {_spread_sentence(n_folds)} "
                "A triangle on the axis marks a value of (about) zero.").strip()
    if name == "published_comparison":
        from .comparison import comparison_caption

        return comparison_caption(results)
    if name == "volume_distribution":
        twice = ("; a scan that is a query in two folds (the folds overlap by one scan) is a point per fold"
                 if _scan_in_two_folds(results) else "")
        absent = ("; scans that do not show an organ are left out of it (see the tables' ° notes)"
                  if not results.absent.empty else "")
        return (f"Dice per query volume (%), seeds averaged: every volume is a point{twice}{absent}; a box (median, "
                f"quartiles, whiskers to 1.5 IQR) only where a method has at least {MIN_BOX_POINTS} volumes.")
    if name == "setting_drop":
        drops = setting_drops(results)
        spread = _spread_sentence(list(drops["n"])) if not drops.empty else ""
        return ("Mean Dice lost from setting 1 to setting 2 (in-domain), in percentage points, paired by fold "
                f"(folds finished in both settings). {spread}").strip()
    if name == "train_loss":
        return ("Training loss, exponentially smoothed, one panel per method (each optimises its own objective, so "
                "their losses share no scale); line = mean over folds, seeds and organ groups; band = ±1 "
                "standard deviation where at least two runs reach the step.")
    return name


def save_figure(fig: plt.Figure, out_dir: str | Path, stem: str, dpi: int = 200,
                problems: list[str] | None = None) -> Path:
    """Write ``<stem>.png`` and ``<stem>.pdf`` at the figure's exact size; closes the figure.

    Args:
        problems: when given, collects overlapping or cut-off texts found while drawing.
    Returns:
        the PNG path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    with paper_style():  # drawing creates tick labels, and the PDF backend reads the font type
        if problems is not None:
            # checked as the PNG draws it: at the screen's 100 dpi, hinting makes small text
            # taller than at the saved resolution (and in the PDF), which would flag text the
            # saved figures show whole
            fig.set_dpi(dpi)
            problems.extend(f"{stem}: {p}" for p in text_problems(fig))
        fig.savefig(png, dpi=dpi)
        fig.savefig(out / f"{stem}.pdf")
    plt.close(fig)
    return png


def write_figures(results: Results, out_dir: str | Path, width: float = WIDTH_IN,
                  problems: list[str] | None = None) -> dict[str, Path]:
    """Every figure that has data, as PNG + PDF under ``out_dir``; name -> PNG path."""
    written = {}
    for name, build in FIGURES.items():
        fig = build(results, width=width)
        if fig is not None:
            written[name] = save_figure(fig, out_dir, name, problems=problems)
    return written

