"""Result tables (the paper's Tables 1-4) from run records, beside the published numbers.

A :class:`Table` is built once from :class:`~fsmis_bench.reporting.collect.Results` and
rendered to Markdown, LaTeX (booktabs), CSV and HTML. Values are Dice in percent: the mean
over folds of the fold's organ score (optionally ± the standard deviation across folds);
the ``Mean`` column is the mean over the organs. Per column and setting, the best value is
bold and the second underlined; only published numbers and measured rows without markers
compete (the ° note on volumes left out for not showing the organ aside: every method's
score leaves them out alike), so an incomplete, unevenly seeded or non-standard run can
never look like the winner, and a column with fewer than two competing values has no best at all.

Measured rows are named as the figures and the bootstrap intervals name them
(:func:`~.style.method_label`: ``SD-FSMIS (SII+QE) [tiny]``, ``--rename`` applied), so one
report calls a method one thing everywhere; the CSV adds the ``key`` that the
machine-readable files and ``--compare`` use (:func:`~.rows.row_label`:
``sdfsmis_qe [tiny,random_weights]``).
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import pandas as pd

from .collect import (
    Results,
    absent_text,
    absent_volumes,
    expected_folds,
    uneven_seed_rows,
    dataset_sort_key,
    eval_label,
    organ_label,
    organ_sort_key,
    run_backbones,
    run_flags,
)
from .published import (
    EXCLUSION_ALL_NOTE,
    LEGACY_EXCLUSION_NOTE,
    PUBLISHED_CITATION,
    comparison_caveat,
    exclusion_caveat,
    load_published,
    only_legacy_exclusion,
    printed_mean_note,
    published_backbone,
    published_name,
    published_row_applies,
)
from .rows import N_FOLDS, random_weights_note, row_label
from .style import method_display, method_label, method_style

#: SD-FSMIS ablation methods -> which of (SII, QE, VTCT) they contain (paper Table 3)
ABLATION_METHODS: dict[str, tuple[bool, bool, bool]] = {
    "sdfsmis_sii": (True, False, False),
    "sdfsmis_vtct": (True, False, True),
    "sdfsmis_qe": (True, True, False),
    "sdfsmis": (True, True, True),
}
ABLATION_COMPONENTS = ("SII", "QE", "VTCT")

#: backbone names as shown in tables
BACKBONE_LABELS = {"sd15": "SD-1.5", "sd21": "SD-2.1", "none": "—"}


@dataclass(frozen=True)
class Marker:
    """A row marker: its symbol per output format and the legend text."""

    text: str
    latex: str
    legend: str


MARKERS: dict[str, Marker] = {
    "published": Marker("†", r"\textsuperscript{\dag}", f"published numbers from {PUBLISHED_CITATION}; not measured here"),
    "incomplete": Marker("*", r"\textsuperscript{*}", "incomplete: not every fold of the test dataset "
                         f"({N_FOLDS} for the built-in datasets) or not every organ finished"),
    "uneven_seeds": Marker("¶", r"\textsuperscript{\P}", "unequal seeds: the row's folds ran with different numbers of "
                           "seeds, each fold's score is the mean over its own seeds and the row weighs the folds alike"),
    "random_weights": Marker("§", r"\textsuperscript{\S}", "random weights: not initialised from pretrained weights"),
    "non_standard": Marker("‡", r"\textsuperscript{\ddag}", "non-standard option: a protocol option, or a departure from the "
                           "setup of the published numbers (e.g. fewer training steps; for a method without "
                           "published numbers, from its own default budget), named in brackets after the method"),
    "absent": Marker("°", r"\textsuperscript{$\circ$}", "query volumes left out of an organ's score because the scan "
                     "does not show the organ (own data): its Dice would be 0/0, which the reference codes average "
                     "into the mean as NaN; the organ's score is over the other volumes"),
}
MARKER_ORDER = ("published", "incomplete", "uneven_seeds", "random_weights", "non_standard", "absent")
#: markers that inform without keeping a row from competing for best and second: a volume
#: that does not show the organ is left out of every method's score alike (it is the data)
INFORMATIONAL_MARKERS = frozenset({"absent"})

#: the ranking rule, said where a marked row could look like a fair competitor (exclusion=all)
NOT_RANKED = "still marked, so not ranked for best and second, as no marked measured row is"


@dataclass
class Cell:
    """One value: Dice in percent, with its std across folds (None if one fold)."""

    mean: float
    std: float | None = None


@dataclass
class Row:
    """One table row.

    Attributes:
        labels: label column -> text (e.g. ``{"Method": "adnet", "Setting": "1"}``).
        values: (group key, organ) -> cell; organ ``"mean"`` for the mean column.
        source: ``measured`` or ``published``.
        markers: keys of :data:`MARKERS`.
        rank_group: rows compete for best/second only within the same group (the setting).
        notes: legend details (e.g. which folds are missing).
        method: the method's name (run records' name for measured rows, the published name
            for published rows).
        random_reasons: why a random-weights row has random weights
            (:func:`~.rows.random_weights_reason`), for the legend.
        backbone: measured rows: the runs' backbone (``sd15``); published rows: the CSV's
            backbone text, empty for the paper's default configuration.
        options: measured rows: their non-standard options, ``;``-joined.
        variant: measured rows: the run records' variant key (the label shows its display form).
        seed_notes: measured rows with unequal seeds across folds: which folds have which.
        fold_counts: measured rows: group key -> (folds behind the organ mean, folds of the
            test dataset), for :func:`published_gap`'s caveat.
        absent_notes: measured rows: per cell that leaves out volumes whose scan does not
            show the organ, how many and which (:func:`~.collect.absent_volumes`).
    """

    labels: dict[str, str]
    values: dict[tuple[Hashable, str], Cell]
    source: str = "measured"
    markers: list[str] = field(default_factory=list)
    rank_group: Hashable = None
    notes: list[str] = field(default_factory=list)
    method: str = ""
    random_reasons: list[str] = field(default_factory=list)
    backbone: str = ""
    options: str = ""
    variant: str = ""
    seed_notes: list[str] = field(default_factory=list)
    fold_counts: dict[Hashable, tuple[int, int]] = field(default_factory=dict)
    absent_notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Measured rows: ``method [variant]`` as the CSV files and ``--compare`` name them;
        published rows: empty."""
        return row_label(self.method, self.variant) if self.source == "measured" else ""

    @property
    def competes(self) -> bool:
        return self.source == "published" or not set(self.markers) - INFORMATIONAL_MARKERS


@dataclass
class Table:
    """A rendered-independent table.

    Attributes:
        name: file stem (``main``, ``cross_domain``, ``ablation``, ``backbone``).
        title: caption.
        label_columns: the leading text columns.
        groups: (group key, header text, organs incl. ``"mean"``) per column group.
        rows: in display order.
        show_std: render ``mean ± std``.
    """

    name: str
    title: str
    label_columns: list[str]
    groups: list[tuple[Hashable, str, list[str]]]
    rows: list[Row]
    show_std: bool = False

    # -- derived ---------------------------------------------------------------------------
    def columns(self) -> list[tuple[Hashable, str]]:
        return [(key, organ) for key, _, organs in self.groups for organ in organs]

    def ranks(self) -> dict[tuple[int, Hashable, str], int]:
        """(row index, group key, organ) -> 1 for best, 2 for second, among competing rows.

        Values are compared as displayed (2 decimals), so ties share the rank. A column with
        fewer than two competing values ranks nothing: a lone row is not "the best".
        """
        ranks: dict[tuple[int, Hashable, str], int] = {}
        rank_groups = {row.rank_group for row in self.rows}
        for rank_group in rank_groups:
            members = [i for i, row in enumerate(self.rows) if row.rank_group == rank_group and row.competes]
            for column in self.columns():
                shown = {
                    i: round(self.rows[i].values[column].mean, 2)
                    for i in members
                    if column in self.rows[i].values and not math.isnan(self.rows[i].values[column].mean)
                }
                if len(shown) < 2:
                    continue
                distinct = sorted(set(shown.values()), reverse=True)
                for i, value in shown.items():
                    if value == distinct[0]:
                        ranks[(i, *column)] = 1
                    elif len(distinct) > 1 and value == distinct[1]:
                        ranks[(i, *column)] = 2
        return ranks

    def published_caveats(self) -> list[str]:
        """Why measured rows shown beside published ones are not like-for-like with them:
        the legacy setting-2 exclusion, and each such method's own caveat."""
        published = [row for row in self.rows if row.source == "published"]
        measured = [row for row in self.rows if row.source == "measured"]
        caveats = []
        if any(int(row.rank_group) == 2 for row in published) and any(
                exclusion_caveat(int(row.rank_group), row.options) for row in measured):
            caveats.append(LEGACY_EXCLUSION_NOTE)
        shown = {row.method for row in published}
        for method in sorted({row.method for row in measured if published_name(row.method) in shown}):
            caveat = method_style(method).published_caveat
            if caveat:
                caveats.append(f"{method_display(method)}: {caveat}")
        return caveats

    def legend(self) -> list[tuple[str, str]]:
        """(marker key, legend text) for each marker used, in a fixed order, with details."""
        lines = []
        for key in MARKER_ORDER:
            rows = [row for row in self.rows if key in row.markers]
            if not rows:
                continue
            text = MARKERS[key].legend
            if key == "incomplete":
                details = "; ".join(note for row in rows for note in row.notes)
                text = f"{text} ({details})" if details else text
            if key == "uneven_seeds":
                text = f"{text} ({'; '.join(note for row in rows for note in row.seed_notes)})"
            if key == "absent":
                text = f"{text} ({'; '.join(note for row in rows for note in row.absent_notes)})"
            if key == "non_standard":
                legacy = [row for row in rows if only_legacy_exclusion(row.options)]
                # exclusion=all is the published setting-2 rule: "a departure from the setup of
                # the published numbers" would say the opposite for rows marked by it alone
                parts = [text] if len(legacy) < len(rows) else []
                if legacy:
                    parts += [EXCLUSION_ALL_NOTE, NOT_RANKED]
                text = "; ".join(parts)
            if key == "published":
                text = "; ".join([text, *self.published_caveats()])
            if key == "random_weights":
                # say what kind: the tiny CPU backbone is not the pretrained architecture at all
                reasons = sorted({reason for row in rows for reason in row.random_reasons})
                text = "; ".join(random_weights_note(reason) for reason in reasons) if reasons else text
            lines.append((key, text))
        return lines

    def is_empty(self) -> bool:
        return not self.rows

    # -- renderers -------------------------------------------------------------------------
    def _value_text(self, row: Row, column: tuple[Hashable, str]) -> str:
        cell = row.values.get(column)
        if cell is None or math.isnan(cell.mean):
            return "–"
        text = f"{cell.mean:.2f}"
        if self.show_std and cell.std is not None and not math.isnan(cell.std):
            text += f" ± {cell.std:.2f}"
        return text

    def _label_texts(self, row: Row, fmt: str) -> list[str]:
        """Label cells; the first carries the row's marker symbols (``text`` or ``latex``)."""
        texts = [row.labels.get(col, "") for col in self.label_columns]
        if fmt == "latex":
            texts = [_tex_escape(t) for t in texts]
        texts[0] += "".join(getattr(MARKERS[m], fmt) for m in MARKER_ORDER if m in row.markers)
        return texts

    def to_markdown(self) -> str:
        ranks = self.ranks()
        header = list(self.label_columns) + [
            f"{title} {organ_label(organ)}" for _, title, organs in self.groups for organ in organs
        ]
        lines = [f"**{self.title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join([":---"] * len(self.label_columns) + ["---:"] * (len(header) - len(self.label_columns))) + "|"]
        for i, row in enumerate(self.rows):
            cells = [_md_escape(t) for t in self._label_texts(row, "text")]
            for column in self.columns():
                text = self._value_text(row, column)
                rank = ranks.get((i, *column))
                cells.append(f"**{text}**" if rank == 1 else f"<u>{text}</u>" if rank == 2 else text)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Values: Dice (%), mean over folds" + (" ± std across folds" if self.show_std else "")
                     + "; **best** and <u>second</u> per column and setting among published and unmarked measured rows.")
        for key, text in self.legend():
            lines.append("")
            lines.append(f"{MARKERS[key].text} {_md_escape(text)}")
        return "\n".join(lines) + "\n"

    def to_latex(self) -> str:
        ranks = self.ranks()
        n_labels = len(self.label_columns)
        n_values = len(self.columns())
        spec = "l" * n_labels + "r" * n_values
        lines = [
            "% requires \\usepackage{booktabs,graphicx} (and amssymb for \\checkmark)",
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{{_tex_escape(self.title)}}}",
            f"\\label{{tab:{self.name}}}",
            "\\resizebox{\\linewidth}{!}{%",
            f"\\begin{{tabular}}{{{spec}}}",
            "\\toprule",
        ]
        group_cells = [""] * n_labels
        rules = []
        position = n_labels + 1
        for _, title, organs in self.groups:
            group_cells.append(f"\\multicolumn{{{len(organs)}}}{{c}}{{{_tex_escape(title)}}}")
            rules.append(f"\\cmidrule(lr){{{position}-{position + len(organs) - 1}}}")
            position += len(organs)
        lines.append(" & ".join(group_cells) + " \\\\")
        lines.append(" ".join(rules))
        header = [_tex_escape(c) for c in self.label_columns] + [
            _tex_escape(organ_label(organ)) for _, _, organs in self.groups for organ in organs
        ]
        lines.append(" & ".join(header) + " \\\\")
        lines.append("\\midrule")
        previous_group = object()
        for i, row in enumerate(self.rows):
            if i > 0 and row.rank_group != previous_group:
                lines.append("\\midrule")
            previous_group = row.rank_group
            cells = self._label_texts(row, "latex")
            for column in self.columns():
                text = self._value_text(row, column).replace("±", "$\\pm$").replace("–", "--")
                rank = ranks.get((i, *column))
                cells.append(f"\\textbf{{{text}}}" if rank == 1 else f"\\underline{{{text}}}" if rank == 2 else text)
            lines.append(" & ".join(cells) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}}"]
        notes = ["Dice (\\%), mean over folds" + (" $\\pm$ std across folds" if self.show_std else "")
                 + "; best in \\textbf{bold}, second \\underline{underlined} per column and setting."]
        notes += [f"{MARKERS[key].latex} {_tex_escape(text)}" for key, text in self.legend()]
        lines.append("\\par\\vspace{2pt}{\\footnotesize " + " \\\\ ".join(notes) + "}")
        lines.append("\\end{table}")
        return "\n".join(lines).replace("✓", "\\checkmark") + "\n"

    def to_frame(self) -> pd.DataFrame:
        """Wide frame: label columns, source, markers, key (:attr:`Row.key`), then
        ``<group>|<organ>`` (and ``|std``)."""
        records = []
        for row in self.rows:
            record: dict[str, object] = {col: row.labels.get(col, "") for col in self.label_columns}
            record["source"] = row.source
            record["markers"] = ";".join(row.markers)
            record["key"] = row.key
            for key, title, organs in self.groups:
                for organ in organs:
                    cell = row.values.get((key, organ))
                    record[f"{title}|{organ}"] = None if cell is None else round(cell.mean, 4)
                    record[f"{title}|{organ}|std"] = None if cell is None or cell.std is None else round(cell.std, 4)
            records.append(record)
        return pd.DataFrame(records)

    def to_csv(self) -> str:
        return self.to_frame().to_csv(index=False)

    def to_html(self) -> str:
        ranks = self.ranks()
        parts = [f'<table class="results" id="table-{self.name}">', f"<caption>{html.escape(self.title)}</caption>", "<thead><tr>"]
        for col in self.label_columns:
            parts.append(f'<th rowspan="2" class="label">{html.escape(col)}</th>')
        for _, title, organs in self.groups:
            parts.append(f'<th colspan="{len(organs)}" class="group">{html.escape(title)}</th>')
        parts.append("</tr><tr>")
        for _, _, organs in self.groups:
            for organ in organs:
                parts.append(f"<th>{html.escape(organ_label(organ))}</th>")
        parts.append("</tr></thead><tbody>")
        previous_group = object()
        for i, row in enumerate(self.rows):
            css = ["published"] if row.source == "published" else []
            if i > 0 and row.rank_group != previous_group:
                css.append("newgroup")
            previous_group = row.rank_group
            parts.append(f'<tr class="{" ".join(css)}">')
            for text in self._label_texts(row, "text"):
                parts.append(f'<td class="label">{html.escape(text)}</td>')
            for column in self.columns():
                text = html.escape(self._value_text(row, column))
                rank = ranks.get((i, *column))
                text = f"<b>{text}</b>" if rank == 1 else f"<u>{text}</u>" if rank == 2 else text
                parts.append(f"<td>{text}</td>")
            parts.append("</tr>")
        parts.append("</tbody></table>")
        notes = ["Dice (%), mean over folds" + (" ± std across folds" if self.show_std else "")
                 + "; <b>best</b> and <u>second</u> per column and setting."]
        notes += [f"{html.escape(MARKERS[k].text)} {html.escape(t)}" for k, t in self.legend()]
        parts.append('<p class="legend">' + "<br>".join(notes) + "</p>")
        return "".join(parts)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


#: characters LaTeX treats specially, and every non-ASCII character the report itself writes,
#: as pdflatex input (tests/test_report_latex.py checks that a report's .tex files are ASCII)
_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                "→": r"$\rightarrow$", "’": "'", "‘": "`", "“": "``", "”": "''", "–": "--", "—": "---",
                "−": "$-$", "±": r"$\pm$", "·": r"$\cdot$", "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$",
                "…": r"\dots{}", "†": r"\dag{}", "‡": r"\ddag{}", "§": r"\S{}", "¶": r"\P{}", "✓": r"\checkmark{}",
                "\u00a0": "~", "\u202f": r"\,", "°": r"$^\circ$", "µ": r"$\mu$"}


def _tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in text)


# -- building ------------------------------------------------------------------------------

def _cells_for(scores: pd.DataFrame) -> tuple[dict[str, Cell], int, int]:
    """Cells of one (row, evaluation) from its fold scores (Dice 0..1).

    Returns:
        organ -> cell (incl. ``"mean"``), the fewest folds over organs, the fold count of
        the mean (folds where every organ is present).
    """
    cells: dict[str, Cell] = {}
    fold_counts = []
    for organ, group in scores.groupby("organ"):
        values = group["dice"].to_numpy(dtype=float) * 100.0
        cells[str(organ)] = Cell(float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None)
        fold_counts.append(group["fold"].nunique())
    organ_means = [cell.mean for cell in cells.values()]
    wide = scores.pivot_table(index="fold", columns="organ", values="dice").dropna() * 100.0
    per_fold_mean = wide.mean(axis=1).to_numpy()
    cells["mean"] = Cell(
        float(sum(organ_means) / len(organ_means)),
        float(per_fold_mean.std(ddof=1)) if len(per_fold_mean) > 1 else None,
    )
    return cells, min(fold_counts), len(per_fold_mean)


def _measured_rows(
    results: Results,
    scores: pd.DataFrame,
    groups: dict[Hashable, set[str]],
    extra_labels: Callable[[str, str], dict[str, str]],
    group_key: Callable[[str, str], Hashable],
    sort_key: Callable[[str, str, int], tuple] = lambda method, variant, setting: (setting, method, variant),
) -> list[Row]:
    """One row per (method, variant, setting) of ``scores``; fills ``groups`` with organs."""
    flags = run_flags(results).set_index(["method", "variant"])
    backbones = run_backbones(results)
    wanted, uneven = expected_folds(results), uneven_seed_rows(results)
    absent = absent_volumes(results)
    rows = []
    keys = sorted(scores.groupby(["method", "variant", "setting"]).groups, key=lambda k: sort_key(*k))
    for method, variant, setting in keys:
        subset = scores[(scores["method"] == method) & (scores["variant"] == variant) & (scores["setting"] == setting)]
        values: dict[tuple[Hashable, str], Cell] = {}
        notes: list[str] = []
        seed_notes: list[str] = []
        absent_notes: list[str] = []
        fold_counts: dict[Hashable, tuple[int, int]] = {}
        incomplete = False
        for (train, test), evaluation in subset.groupby(["train_dataset", "dataset"]):
            key = group_key(train, test)
            cells, n_folds, n_mean_folds = _cells_for(evaluation)
            groups.setdefault(key, set()).update(o for o in cells if o != "mean")
            for organ, cell in cells.items():
                values[(key, organ)] = cell
            # the folds of the dataset evaluated, as its runs recorded them (one for a small
            # nifti_folder test set), not the five of the built-in datasets
            of_folds = wanted.get((method, variant, train, test, setting), N_FOLDS)
            fold_counts[key] = (n_mean_folds, of_folds)
            where = f"{method_label(method, variant)}, {eval_label(train, test)} setting {setting}"
            if n_folds < of_folds:
                incomplete = True
                notes.append(f"{where}: {n_folds}/{of_folds} folds")
            seeds = uneven.get((method, variant, train, test, setting))
            if seeds:
                seed_notes.append(f"{where}: {seeds}")
            for organ, folds in absent.get((method, variant, train, test, setting), {}).items():
                if (key, organ) in values:  # an organ left out of every volume has no cell to annotate
                    absent_notes.append(f"{where}, {organ_label(organ)}: {absent_text(folds)}")
        markers = []
        if incomplete:
            markers.append("incomplete")
        if seed_notes:
            markers.append("uneven_seeds")
        flag = flags.loc[(method, variant)]
        if bool(flag["random_weights"]):
            markers.append("random_weights")
        if flag["non_standard"]:
            markers.append("non_standard")
        if absent_notes:
            markers.append("absent")
        labels = {"Method": method_label(method, variant), "Setting": str(setting)}
        labels.update(extra_labels(method, variant))
        reasons = [r for r in str(flag["random_reason"]).split(";") if r]
        rows.append(Row(labels, values, "measured", markers, int(setting), notes, method, reasons,
                        backbone=backbones.get((method, variant), "none"), options=str(flag["non_standard"]),
                        variant=variant, seed_notes=seed_notes, fold_counts=fold_counts, absent_notes=absent_notes))
    return rows


def _published_rows(
    published: pd.DataFrame,
    groups: dict[Hashable, set[str]],
    extra_labels: Callable[[str, str], dict[str, str]],
    group_key: Callable[[str, str], Hashable],
) -> list[Row]:
    rows = []
    order = published[["method", "setting", "backbone"]].drop_duplicates()
    for method, setting, backbone in order.itertuples(index=False):
        subset = published[(published["method"] == method) & (published["setting"] == setting) & (published["backbone"] == backbone)]
        values = {}
        for record in subset.itertuples(index=False):
            key = group_key(record.train_on, record.test_on)
            values[(key, record.organ)] = Cell(float(record.dice))
            if record.organ != "mean":
                groups.setdefault(key, set()).add(record.organ)
        labels = {"Method": method, "Setting": str(setting)}
        labels.update(extra_labels(method, backbone))
        rows.append(Row(labels, values, "published", ["published"], int(setting), method=method, backbone=backbone))
    return rows


def _ordered_groups(groups: dict[Hashable, set[str]]) -> list[tuple[Hashable, str, list[str]]]:
    def key(item):
        (train, test) = item
        return (train != test, dataset_sort_key(test), dataset_sort_key(train))

    return [
        (group, eval_label(*group), sorted(groups[group], key=organ_sort_key) + ["mean"])
        for group in sorted(groups, key=key)
    ]


def _by_setting(rows: list[Row]) -> list[Row]:
    """Per setting: published rows first (paper order), each directly followed by the
    measured rows of the same method (:func:`~.published.published_name`) and configuration
    (:func:`~.published.published_row_applies`), then the other measured rows."""
    ordered = sorted(rows, key=lambda r: (r.rank_group, r.source != "published"))
    out: list[Row] = []
    placed: set[int] = set()
    for row in ordered:
        if id(row) in placed:
            continue
        out.append(row)
        placed.add(id(row))
        if row.source == "published":
            for other in ordered:
                if (other.source == "measured" and id(other) not in placed and other.rank_group == row.rank_group
                        and published_name(other.method) == row.method
                        and published_row_applies(other.method, other.backbone, row.backbone)):
                    out.append(other)
                    placed.add(id(other))
    return out


def published_gap(table: Table) -> pd.DataFrame:
    """Measured vs published mean Dice for every measured row with a published counterpart.

    One row per (measured row, column group) where both rows have the organ mean: the
    measured method and variant, its published name, the evaluation, the two means (Dice %),
    ``gap`` = measured - published, the measured row's markers (a marked row is not a
    like-for-like comparison: random weights, reduced budget, missing folds...) and a
    ``caveat`` saying why in words (:func:`~.published.comparison_caveat`: the method's own
    caveat, random weights, non-standard options, setting 2's
    :data:`~.published.LEGACY_EXCLUSION_NOTE`).
    A run on another backbone than the published row's has no counterpart here
    (:func:`~.published.published_row_applies`).
    """
    columns = ["method", "published_as", "evaluation", "setting", "measured_mean", "published_mean", "gap", "markers",
               "caveat"]
    published = [r for r in table.rows if r.source == "published"]
    records = []
    for row in table.rows:
        name = published_name(row.method) if row.source == "measured" else None
        reference = next((r for r in published if name and r.method == name and r.rank_group == row.rank_group
                          and published_row_applies(row.method, row.backbone, r.backbone)), None)
        if reference is None:
            continue
        for key, title, _ in table.groups:
            mine, theirs = row.values.get((key, "mean")), reference.values.get((key, "mean"))
            if mine is None or theirs is None or math.isnan(mine.mean):
                continue
            caveat = comparison_caveat(row.method, int(row.rank_group), row.options, ";".join(row.random_reasons),
                                       *row.fold_counts.get(key, (None, N_FOLDS)))
            printed = printed_mean_note(theirs.mean, [cell.mean for (group, organ), cell in reference.values.items()
                                                      if group == key and organ != "mean"])
            records.append({
                "method": row.labels["Method"], "published_as": name, "evaluation": title,
                "setting": int(row.rank_group), "measured_mean": round(mine.mean, 2),
                "published_mean": round(theirs.mean, 2), "gap": round(mine.mean - theirs.mean, 2),
                "markers": ";".join(row.markers),
                # the folds behind the mean, as published_comparison.csv says them
                "caveat": "; ".join(part for part in (caveat, printed) if part),
            })
    return pd.DataFrame(records, columns=columns)


def _ensure_means(rows: list[Row], groups: list[tuple[Hashable, str, list[str]]]) -> None:
    """Published rows carry their own mean; measured rows without an organ get no mean."""
    for row in rows:
        if row.source != "measured":
            continue
        for key, title, organs in groups:
            present = [o for o in organs if o != "mean" and (key, o) in row.values]
            if present and len(present) < len(organs) - 1:
                if "incomplete" not in row.markers:
                    row.markers.insert(0, "incomplete")
                # a mean over fewer organs is not comparable with the other rows' means
                row.values[(key, "mean")] = Cell(float("nan"))
                missing = ", ".join(organ_label(o) for o in organs[:-1] if o not in present)
                row.notes.append(f"{row.labels['Method']}: no {missing} on {title}, so no mean")


def _include_published(include: bool, table: int) -> pd.DataFrame:
    published = load_published()
    return published[published["table"] == table] if include else published.iloc[0:0]


def main_table(results: Results, include_published: bool = True, show_std: bool = False) -> Table:
    """Paper Table 1: in-domain results per dataset, settings 1 and 2 (ablation variants excluded)."""
    scores = results.fold_scores
    scores = scores[(scores["train_dataset"] == scores["dataset"]) & ~scores["method"].isin(_ablation_only())]
    groups: dict[Hashable, set[str]] = {}
    same = lambda train, test: (test, test)  # noqa: E731
    rows = _published_rows(_include_published(include_published, 1), groups, lambda *_: {}, lambda tr, te: (tr, te))
    rows += _measured_rows(results, scores, groups, lambda *_: {}, same)
    ordered = _ordered_groups(groups)
    _ensure_means(rows, ordered)
    return Table("main", "Main comparison (in-domain, cf. SD-FSMIS Table 1)", ["Method", "Setting"], ordered, _by_setting(rows), show_std)


def cross_domain_table(results: Results, include_published: bool = True, show_std: bool = False) -> Table:
    """Paper Table 2: trained on one dataset, tested on another."""
    scores = results.fold_scores
    scores = scores[scores["train_dataset"] != scores["dataset"]]
    groups: dict[Hashable, set[str]] = {}
    pair = lambda train, test: (train, test)  # noqa: E731
    rows = _published_rows(_include_published(include_published, 2), groups, lambda *_: {}, pair)
    rows += _measured_rows(results, scores, groups, lambda *_: {}, pair)
    ordered = _ordered_groups(groups)
    _ensure_means(rows, ordered)
    return Table("cross_domain", "Cross-domain (train → test, cf. SD-FSMIS Table 2)", ["Method", "Setting"], ordered, _by_setting(rows), show_std)


def _ablation_only() -> set[str]:
    return {m for m in ABLATION_METHODS if m != "sdfsmis"}


def _check_labels(components: tuple[bool, bool, bool]) -> dict[str, str]:
    return {name: "✓" if on else "" for name, on in zip(ABLATION_COMPONENTS, components)}


def _published_components(method: str) -> tuple[bool, bool, bool]:
    found = re.search(r"\(([^)]*)\)", method)
    parts = set(found.group(1).split("+")) if found else set(ABLATION_COMPONENTS)
    return tuple(name in parts for name in ABLATION_COMPONENTS)  # type: ignore[return-value]


def ablation_table(results: Results, include_published: bool = True, show_std: bool = False) -> Table:
    """Paper Table 3: SD-FSMIS with SII / QE / VTCT switched on and off."""
    scores = results.fold_scores
    scores = scores[scores["method"].isin(ABLATION_METHODS) & (scores["train_dataset"] == scores["dataset"])]
    groups: dict[Hashable, set[str]] = {}
    pair = lambda train, test: (train, test)  # noqa: E731
    rows = _published_rows(
        _include_published(include_published, 3), groups,
        lambda method, _backbone: _check_labels(_published_components(method)), pair,
    )
    order = list(ABLATION_METHODS)
    rows += _measured_rows(
        results, scores, groups,
        lambda method, _variant: _check_labels(ABLATION_METHODS[method]), pair,
        sort_key=lambda method, variant, setting: (setting, order.index(method), variant),
    )
    ordered = _ordered_groups(groups)
    _ensure_means(rows, ordered)
    return Table("ablation", "Ablation of SD-FSMIS components (cf. SD-FSMIS Table 3)",
                 ["Method", "Setting", *ABLATION_COMPONENTS], ordered, _by_setting(rows), show_std)


def backbone_table(results: Results, include_published: bool = True, show_std: bool = False) -> Table:
    """Paper Table 4: one method on different diffusion backbones (run.json ``backbone``).

    In-domain runs of methods measured on at least two backbones.
    """
    scores = results.fold_scores
    backbones = results.runs.drop_duplicates(["method", "variant"]).set_index(["method", "variant"])["backbone"]
    with_backbone = [backbones.get((m, v), "none") != "none" for m, v in zip(scores["method"], scores["variant"])]
    scores = scores[pd.Series(with_backbone, index=scores.index, dtype=bool) & (scores["train_dataset"] == scores["dataset"])]
    # only methods measured on more than one backbone say anything about the backbone
    n_backbones = {
        method: len({backbones.get((method, v), "none") for v in group["variant"]})
        for method, group in scores.groupby("method")
    }
    scores = scores[scores["method"].map(n_backbones) > 1]
    groups: dict[Hashable, set[str]] = {}
    pair = lambda train, test: (train, test)  # noqa: E731

    def measured_labels(method: str, variant: str) -> dict[str, str]:
        backbone = backbones.get((method, variant), "none")
        return {"Backbone": BACKBONE_LABELS.get(backbone, backbone)}

    rows = _published_rows(
        _include_published(include_published, 4), groups,
        lambda _method, backbone: {"Backbone": BACKBONE_LABELS.get(published_backbone(backbone), backbone)}, pair,
    )
    rows += _measured_rows(
        results, scores, groups, measured_labels, pair,
        sort_key=lambda method, variant, setting: (setting, method, backbones.get((method, variant), ""), variant),
    )
    ordered = _ordered_groups(groups)
    _ensure_means(rows, ordered)
    return Table("backbone", "Diffusion backbone version (cf. SD-FSMIS Table 4)",
                 ["Method", "Setting", "Backbone"], ordered, _by_setting(rows), show_std)


def all_tables(results: Results, include_published: bool = True, show_std: bool = False) -> list[Table]:
    return [
        builder(results, include_published, show_std)
        for builder in (main_table, cross_domain_table, ablation_table, backbone_table)
    ]


def frame_to_markdown(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    """A plain Markdown table of a DataFrame (no tabulate dependency)."""
    def text(value: object) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else float_format.format(value)
        return _md_escape(str(value))

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(frame[c]) else ":---" for c in frame.columns) + "|"
    body = ["| " + " | ".join(text(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def frame_to_latex(frame: pd.DataFrame, caption: str, label: str, float_format: str = "{:.4g}") -> str:
    def text(value: object) -> str:
        if isinstance(value, float):
            return "--" if math.isnan(value) else float_format.format(value)
        return _tex_escape(str(value))

    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex_escape(caption)}}}", f"\\label{{tab:{label}}}",
             "\\resizebox{\\linewidth}{!}{%",
             "\\begin{tabular}{" + "".join("r" if pd.api.types.is_numeric_dtype(frame[c]) else "l" for c in frame.columns) + "}",
             "\\toprule", " & ".join(_tex_escape(str(c)) for c in frame.columns) + " \\\\", "\\midrule"]
    lines += [" & ".join(text(v) for v in row) + " \\\\" for row in frame.itertuples(index=False)]
    lines += ["\\bottomrule", "\\end{tabular}}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def frame_to_html(frame: pd.DataFrame, float_format: str = "{:.4g}") -> str:
    def text(value: object) -> str:
        if isinstance(value, float):
            return "–" if math.isnan(value) else float_format.format(value)
        return html.escape(str(value))

    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    align = ['' if n else ' class="label"' for n in numeric]
    parts = ['<table class="plain"><thead><tr>']
    parts += [f"<th{a}>{html.escape(str(c))}</th>" for c, a in zip(frame.columns, align)]
    parts.append("</tr></thead><tbody>")
    for row in frame.itertuples(index=False):
        parts.append("<tr>" + "".join(f"<td{a}>{text(v)}</td>" for v, a in zip(row, align)) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)
