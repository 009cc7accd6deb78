"""Measured Dice beside the published number, per method and organ.

The benchmark's point is to show where it reproduces the literature and where it does not.
:func:`comparison_frame` pairs every measured (method, variant, evaluation, organ) with the
published value of the same method (``published_results.csv``; the method's
``Display.published_names`` say which rows are its own), and
:func:`published_comparison_figure` draws it: a bar per measured method (mean over folds,
±1 SD across folds where there are at least two) and a white diamond at the published value.

Which published row belongs to a run: same method name, training and test dataset and
setting; the row for the run's backbone where the paper reports several (Table 4), else
the paper's default configuration (Tables 1-3) where that is the run's backbone
(:func:`~.published.published_row_applies`); the lowest table number wins. Setting-2 rows
carry a ``caveat``: the published numbers used the legacy exclusion (PROTOCOL.md §4); so do
rows with random weights, non-standard options (a reduced budget) or missing folds, the
things the figure's footnotes mark (:func:`~.published.comparison_caveat`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd

from .collect import (
    Results,
    expected_folds,
    organ_sort_key,
    run_backbones,
    run_flags,
)
from .figures import (
    WIDTH_IN,
    _eval_panels,
    _panel_name,
    _select,
    _spread_sentence,
    bar_handles,
    dice_panel,
    ZERO_LABEL,
    _ZERO_PCT,
    draw_bars,
    zero_handle,
    fold_stats,
    layout,
    make_series,
)
from .published import (
    EXCLUSION_CAVEAT,
    LEGACY_EXCLUSION_NOTE,
    PRINTED_MEAN_NOTE,
    PUBLISHED_CITATION,
    comparison_caveat,
    load_published,
    printed_mean_note,
    published_row_applies,
)
from .rows import N_FOLDS
from .style import Footnotes, method_display, method_style, paper_style

#: the footnote of a setting-2 panel: its diamonds were made with the legacy exclusion
SETTING2_NOTE = "setting 2: " + LEGACY_EXCLUSION_NOTE

PUBLISHED_MARKER = {"marker": "D", "markersize": 4.2, "markerfacecolor": "white", "markeredgecolor": "black",
                    "markeredgewidth": 0.8, "linestyle": "none"}


@dataclass(frozen=True)
class PublishedValue:
    dice: float  # percent
    table: int
    name: str  # as in the published table


def published_values(method: str, backbone: str, train: str, test: str, setting: int,
                     published: pd.DataFrame | None = None) -> dict[str, PublishedValue]:
    """organ (incl. ``"mean"``) -> the published value of this method in this evaluation."""
    names = list(method_style(method).published_names)
    if not names:
        return {}
    published = load_published() if published is None else published
    _say_unknown_names(method, names, sorted(set(published["method"])))
    rows = published[published["method"].isin(names) & (published["train_on"] == train)
                     & (published["test_on"] == test) & (published["setting"] == setting)]
    if rows.empty:
        return {}
    applies = rows["backbone"].map(lambda row_backbone: published_row_applies(method, backbone, row_backbone))
    rows = rows[applies.astype(bool)]
    # the row for the run's own backbone (Table 4) before the default configuration's
    explicit = rows[rows["backbone"] != ""]
    rows = explicit if not explicit.empty else rows
    rows = rows.assign(_name=rows["method"].map(names.index)).sort_values(["table", "_name"])
    values: dict[str, PublishedValue] = {}
    for row in rows.itertuples(index=False):
        values.setdefault(str(row.organ), PublishedValue(float(row.dice), int(row.table), str(row.method)))
    return values


def _say_unknown_names(method: str, names: list[str], known: list[str]) -> None:
    """A published name that no published row has (a typo in a plugin's ``Display``) would
    leave the method without its published numbers silently: said once per report."""
    from .._registry import closest
    from .style import _warn_once

    for name in names:
        if name not in known:
            guess = closest(name, known)
            _warn_once(f"method {method!r} names {name!r} in its Display(published_names=...), but the published "
                       "tables hold no method of that name, so none of its published numbers is compared"
                       + (f" (did you mean {guess!r}?)" if guess else f"; they hold: {', '.join(known)}"))


COLUMNS = ["method", "variant", "train_dataset", "dataset", "setting", "organ", "measured", "sd", "n_folds",
           "published", "published_as", "table", "difference", "caveat"]


def comparison_frame(results: Results) -> pd.DataFrame:
    """Every measured (method, variant, evaluation, organ incl. mean) with its published value.

    Columns: :data:`COLUMNS`; ``measured``/``published``/``difference`` in percent
    (``difference`` = measured - published), published columns empty where the paper has
    no number for the method; ``caveat`` says why a comparison is not like-for-like.
    """
    scores = results.fold_scores
    if scores.empty:
        return pd.DataFrame(columns=COLUMNS)
    published = load_published()
    backbones = run_backbones(results)
    flags = run_flags(results).set_index(["method", "variant"])
    wanted = expected_folds(results)
    rows = []
    for train, dataset, setting in _eval_panels(scores):
        data = _select(scores, train, dataset, setting)
        stats = fold_stats(data, with_mean=True)
        for (method, variant), _ in data.groupby(["method", "variant"]):
            reference = published_values(method, backbones.get((method, variant), "none"), train, dataset, setting,
                                         published)
            organs = sorted({o for (m, v, o) in stats if (m, v) == (method, variant)},
                            key=lambda o: (o == "mean", organ_sort_key(o)))
            printed_mean = (printed_mean_note(reference["mean"].dice,
                                              [v.dice for organ, v in reference.items() if organ != "mean"])
                            if "mean" in reference else "")
            for organ in organs:
                stat = stats[(method, variant, organ)]
                value = reference.get(organ)
                caveat = (_caveat(flags, method, variant, setting, stat.n,
                                  wanted.get((method, variant, train, dataset, setting), N_FOLDS)) if value else "")
                if organ == "mean" and value and printed_mean:
                    caveat = "; ".join(part for part in (caveat, printed_mean) if part)
                rows.append({
                    "method": method, "variant": variant, "train_dataset": train, "dataset": dataset,
                    "setting": setting, "organ": organ, "measured": stat.mean, "sd": stat.sd, "n_folds": stat.n,
                    "published": value.dice if value else math.nan,
                    "published_as": value.name if value else "",
                    "table": value.table if value else None,
                    "difference": stat.mean - value.dice if value else math.nan,
                    "caveat": caveat,
                })
    frame = pd.DataFrame(rows, columns=COLUMNS)
    # a table number, never "1.0": whole numbers, empty where the paper has no value
    frame["table"] = frame["table"].astype("Int64")
    return frame


def _caveat(flags: pd.DataFrame, method: str, variant: str, setting: int, n_folds: int, of_folds: int = N_FOLDS) -> str:
    """:func:`~.published.comparison_caveat` of one measured value, from its runs' flags
    (:func:`~.collect.run_flags`, indexed by method and variant); ``of_folds``: the folds of
    the dataset evaluated."""
    if (method, variant) not in flags.index:
        return comparison_caveat(method, setting, "", n_folds=n_folds, of_folds=of_folds)
    flag = flags.loc[(method, variant)]
    return comparison_caveat(method, setting, str(flag["non_standard"]), str(flag["random_reason"]), n_folds,
                             of_folds)


def published_comparison_figure(results: Results, width: float = WIDTH_IN) -> plt.Figure | None:
    """Bars: measured Dice per organ and the organ mean; diamonds: the published values.

    One panel per evaluation in which at least one measured method has a published number;
    None when there is no such evaluation.
    """
    frame = comparison_frame(results)
    if frame.empty or frame["published"].isna().all():
        return None
    panels = [key for key, group in frame.groupby(["train_dataset", "dataset", "setting"]) if group["published"].notna().any()]
    panels = [p for p in _eval_panels(frame) if p in set(panels)]
    shown_scores = results.fold_scores.merge(pd.DataFrame(panels, columns=["train_dataset", "dataset", "setting"]))
    notes = Footnotes()
    series = make_series(results, zip(shown_scores["method"], shown_scores["variant"]), notes, shown_scores)
    # a setting-2 panel compares with numbers made under the legacy exclusion: said under the
    # figure (a pasted PNG has no HTML caption), marked on the panels it concerns
    titles = {panel: _panel_name(*panel) for panel in panels}
    for panel in panels:
        if panel[2] == 2:
            titles[panel] = notes.mark(titles[panel], [SETTING2_NOTE])
    labels = [s.label for s in series] + ["published value (same method)"]
    stats_of = {panel: fold_stats(_select(shown_scores, *panel), with_mean=True) for panel in panels}
    zero = any(stat.mean < _ZERO_PCT for stats in stats_of.values() for stat in stats.values())
    with paper_style():
        handles = bar_handles(series) + [plt.Line2D([0], [0], **PUBLISHED_MARKER)]
        if zero:  # the triangles say what they are in the figure itself
            handles, labels = handles + [zero_handle()], labels + [ZERO_LABEL]
        lay = layout(len(panels), 2.1, width, handles, labels, notes)
        for ax, (train, dataset, setting) in zip(lay.axes, panels):
            data = _select(frame, train, dataset, setting)
            organs = sorted(set(data["organ"]) - {"mean"}, key=organ_sort_key)
            categories = organs + (["mean"] if (data["organ"] == "mean").any() else [])
            shown = [s for s in series if ((data["method"] == s.method) & (data["variant"] == s.variant)).any()]
            positions = draw_bars(ax, categories, shown, stats_of[(train, dataset, setting)])
            for row in data.itertuples(index=False):
                x = positions.get((row.method, row.variant, row.organ))
                if x is not None and not math.isnan(row.published):
                    ax.plot([x], [row.published], zorder=6, clip_on=False, **PUBLISHED_MARKER)
            if "mean" in categories:
                ax.axvline(len(organs) - 0.5, color="#999999", linewidth=0.6, linestyle=":", zorder=1)
            dice_panel(ax, lay, categories, (train, dataset, setting), title=titles[(train, dataset, setting)])
        lay.finish()
    return lay.fig


def _caveat_sentences(with_published: pd.DataFrame) -> str:
    """The caption's sentences on comparisons that are not like-for-like (``caveat``)."""
    sentences = []
    if with_published["caveat"].str.contains(EXCLUSION_CAVEAT, regex=False).any():
        sentences.append(f"Setting 2 is not like-for-like: {LEGACY_EXCLUSION_NOTE}.")
    if with_published["caveat"].str.contains(PRINTED_MEAN_NOTE, regex=False).any():
        sentences.append("Where a published mean is not the average of its published organ values (a slip in the "
                         "paper's table), the measured mean is still the organ average; published_gap notes it.")
    for method in sorted(set(with_published["method"])):
        caveat = method_style(method).published_caveat
        if caveat:
            sentences.append(f"{method_display(method)}: {caveat}.")
    return "".join(s + " " for s in sentences)


def comparison_caption(results: Results) -> str:
    """What the comparison figure shows, with the name mapping and the tables it used."""
    frame = comparison_frame(results)
    with_published = frame[frame["published"].notna()]
    if with_published.empty:
        return "No measured method has a published number for the evaluations run."
    pairs = sorted({(m, n) for m, n in zip(with_published["method"], with_published["published_as"])})
    # only names the table spells otherwise than the figure need saying
    mapping = "".join(f"; {method_display(m)} = “{n}”" for m, n in pairs if method_display(m) != n)
    tables = ", ".join(str(int(t)) for t in sorted(set(with_published["table"].dropna())))
    panels = with_published.set_index(["train_dataset", "dataset", "setting"]).index
    shown = frame[frame.set_index(["train_dataset", "dataset", "setting"]).index.isin(panels)]
    spread = _spread_sentence(list(shown["n_folds"]))
    return (f"Measured Dice (%) per organ and the mean over organs: bars = mean over folds. {spread} "
            f"White diamonds: the published value of the same method ({PUBLISHED_CITATION}, "
            f"Table{'s' if ',' in tables else ''} {tables}{mapping}). Methods without a published counterpart "
            "are drawn as bars only; a triangle on the axis marks a measured value of (about) zero. "
            + _caveat_sentences(with_published)
            + "Numbers: tables/published_comparison.csv.")
