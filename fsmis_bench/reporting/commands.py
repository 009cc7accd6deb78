"""The ``fsmis-bench report`` command and :func:`write_report` for scripts.

Examples::

    fsmis-bench report                          # every result table as Markdown
    fsmis-bench report --format csv > folds.csv # organ score per fold, long format (FOLD_CSV_COLUMNS)
    fsmis-bench report --compare sdfsmis adnet  # paired statistics per organ
    fsmis-bench report --out report/            # everything, incl. report/report.html
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ..errors import FsmisError
from . import figures as figures_module
from . import stats
from .collect import (
    FOLD_CSV_COLUMNS,
    EVAL_ROW_KEY,
    Results,
    absent_text,
    absent_volumes,
    default_results_dir,
    eval_label,
    load_results,
    long_fold_csv,
    per_case_scores,
    row_label,
    select_rows,
    summarise_runs,
)
from .comparison import comparison_frame
from .html import render_html
from .qualitative import (
    DatasetLoader,
    Orientation,
    check_slices,
    default_loader,
    parse_slices,
    qualitative_caption,
    write_qualitative,
)
from .style import DOUBLE_COLUMN_IN, SINGLE_COLUMN_IN, organ_display, renamed
from .tables import all_tables, frame_to_latex, frame_to_markdown, published_gap

#: ``--width`` values
WIDTHS = {"double": DOUBLE_COLUMN_IN, "single": SINGLE_COLUMN_IN}

REPORT_HTML = "report.html"

#: what a report writes, and so what ``--force`` replaces: ``report.html``; in ``tables/``
#: these stems (and ``compare_*``) as .md/.tex/.csv; in ``figures/`` these stems (and
#: ``qualitative_*``) as .png/.pdf. Every other file in the folder is left alone.
TABLE_STEMS = frozenset({
    "main", "cross_domain", "ablation", "backbone", "fold_scores", "per_volume", "runs",
    "published_comparison", "published_gap", "bootstrap_ci",
})
TABLE_PREFIXES = ("compare_",)
TABLE_SUFFIXES = (".md", ".tex", ".csv")
FIGURE_STEMS = frozenset(figures_module.FIGURES)
FIGURE_PREFIXES = ("qualitative_",)
FIGURE_SUFFIXES = (".png", ".pdf")


def _log(text: str) -> None:
    print(text, file=sys.stderr)


#: a label's longest part of a file name: a variant named by many settings stays readable
_SLUG_CHARS = 48


def _slug(text: str) -> str:
    """``text`` as part of a file name; a long label is cut and ends in a digest of the
    whole, so two labels that differ only at the end still get two names."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")
    if len(slug) <= _SLUG_CHARS:
        return slug
    return f"{slug[:_SLUG_CHARS - 9].rstrip('-.')}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def _check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder without ``force``, before anything is computed."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FsmisError(f"{out_dir} exists and is not a folder", hint="choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FsmisError(
            f"report folder {out_dir} is not empty",
            hint="choose a new --out folder, or pass --force to replace the report files in it",
        )


def report_files(out_dir: Path) -> list[Path]:
    """The files of an earlier report in ``out_dir`` (names in :data:`TABLE_STEMS` etc.)."""
    found = [out_dir / REPORT_HTML] if (out_dir / REPORT_HTML).is_file() else []
    for folder, stems, prefixes, suffixes in (
        ("tables", TABLE_STEMS, TABLE_PREFIXES, TABLE_SUFFIXES),
        ("figures", FIGURE_STEMS, FIGURE_PREFIXES, FIGURE_SUFFIXES),
    ):
        if not (out_dir / folder).is_dir():
            continue
        for path in sorted((out_dir / folder).iterdir()):
            if path.is_file() and path.suffix in suffixes and (path.stem in stems or path.stem.startswith(prefixes)):
                found.append(path)
    return found


def _install(staging: Path, out_dir: Path) -> None:
    """Replace the earlier report in ``out_dir`` by the one written in ``staging``.

    The earlier report's own files go first (:func:`report_files`: a figure or comparison
    this report no longer has must not stay behind), then every new file is moved in;
    other files in ``out_dir`` are kept.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in report_files(out_dir):
        path.unlink()
    for folder in ("tables", "figures"):  # emptied by the removal, and not written again
        if (out_dir / folder).is_dir() and not any((out_dir / folder).iterdir()):
            (out_dir / folder).rmdir()
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = out_dir / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)


def write_report(
    results_dir: str | Path,
    out_dir: str | Path,
    data_root: str | Path | None = None,
    force: bool = False,
    *,
    compare: Sequence[tuple[str, str]] | None = None,
    slices: str | None = None,
    show_std: bool = False,
    include_published: bool = True,
    dataset_loader: DatasetLoader | None = None,
    n_boot: int = 10000,
    log: Callable[[str], None] = _log,
    width: str | float = "double",
    zoom: bool = False,
    names: dict[str, str] | None = None,
    rows: Sequence[str] | None = None,
) -> Path:
    """Write the full report of ``results_dir`` into ``out_dir``.

    Layout: ``report.html`` (self-contained), ``tables/`` (every table as ``.md``, ``.tex``
    and ``.csv``, plus ``fold_scores.csv``, ``per_volume.csv``, ``runs.csv``,
    ``published_comparison.csv``, the paired comparisons and bootstrap intervals) and
    ``figures/`` (``.png`` + ``.pdf``).

    The report is written into a temporary folder beside ``out_dir`` and moved in when it
    is complete, so a failure leaves ``out_dir`` as it was; with ``force`` the files of an
    earlier report there (:func:`report_files`) are removed first, other files are kept.

    Args:
        data_root: images for the qualitative figure (default: each run's own, else
            ``FSMIS_DATA_ROOT``); without data the figure is skipped with a note.
        force: write into a non-empty ``out_dir``, replacing the earlier report's files.
        compare: (A, B) method labels; default: the best unmarked method against each other.
        slices: ``[dataset:]organ:case_id:z,...`` for the qualitative figure; a slice
            without a dataset applies to every dataset whose runs evaluated that organ and case.
        dataset_loader: name -> dataset object; overrides ``data_root`` (tests, scripts).
        n_boot: bootstrap resamples, at least 1.
        width: figure width, ``"double"`` (7 in), ``"single"`` (3.5 in) or inches.
        zoom: crop the qualitative panels to a square around each organ.
        names: display-name overrides (``{"nifti_folder": "Hospital CT"}``) for methods,
            datasets, organs and backbones, wherever the report shows them: figures, table
            rows and headers, comparisons, intervals (the CSV files keep the record names; the
            tables' CSV in a ``key`` column).
        rows: report only these rows (:func:`~.collect.select_rows`: a method, or one row as
            ``compare`` names it); default every row.
    Returns:
        ``out_dir``.
    Raises:
        FsmisError: before anything is written: a missing results folder, a non-empty
            ``out_dir`` without ``force``, an unknown method in ``compare``, slices that name
            an organ or case no run evaluated, or ``n_boot`` < 1; once the images are
            loaded, a slice outside its volume (``out_dir`` is left as it was).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise FsmisError(f"n_boot must be a whole number >= 1, not {n_boot!r}",
                         hint="pass --n-boot 10000 (the default) or another positive number of resamples")
    if isinstance(width, str) and width not in WIDTHS:
        raise FsmisError(f"unknown width {width!r}", hint=f"choose one of {', '.join(WIDTHS)} or a number of inches")
    with renamed(names):  # display-name overrides for every figure drawn below
        out = Path(out_dir).expanduser()
        figure_width = WIDTHS[width] if isinstance(width, str) else float(width)
        results = _selected(load_results(results_dir), rows, compare)
        _say_unmatched_renames(names, results)
        named_slices = parse_slices(slices)
        check_slices(results, named_slices)
        pair_notes: list[str] = []
        pairs = list(compare) if compare else stats.default_pairs(results, pair_notes)
        # resolve the comparison names before writing anything, so a typo leaves no half report
        per_case = per_case_scores(results)
        for a, b in pairs:
            stats.resolve(per_case, a), stats.resolve(per_case, b)
        _check_out_dir(out, force)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.report-", dir=out.parent))
        except OSError as exc:
            raise _write_failure(exc, out) from None
        try:
            _write_into(staging, results, per_case, pairs, pair_notes, named_slices, data_root=data_root,
                        show_std=show_std, include_published=include_published, dataset_loader=dataset_loader,
                        n_boot=n_boot, log=log, width=figure_width, zoom=zoom)
            _install(staging, out)
        except OSError as exc:  # a full disk, a read-only folder: one message, not a traceback
            raise _write_failure(exc, out) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return out


def _write_failure(exc: OSError, out: Path) -> FsmisError:
    cause = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return FsmisError(f"cannot write the report to {out}: {cause}{where}",
                      hint="make the folder (and the one above it) writable, free some space, or choose another --out")


def _write_into(
    out: Path,
    results: Results,
    per_case: pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    pair_notes: Sequence[str],
    named_slices: Sequence[tuple[str | None, str, str, int]],
    *,
    data_root: str | Path | None,
    show_std: bool,
    include_published: bool,
    dataset_loader: DatasetLoader | None,
    n_boot: int,
    log: Callable[[str], None],
    width: float,
    zoom: bool,
) -> None:
    """Every table, figure and the HTML page of ``results`` into the (empty) folder ``out``."""
    tables_dir, figures_dir = out / "tables", out / "figures"
    tables_dir.mkdir(exist_ok=True)
    notes: list[str] = []
    if results.empty:  # the first thing to say: every other note follows from it
        notes.append(f"No finished runs under {results.root}; only published numbers are shown.")
        log(f"note: no finished runs under {results.root}; only published numbers are shown")
    for text in results.notes:
        log(f"note: {text}")
    if results.unfinished:
        notes.append(f"{len(results.unfinished)} unfinished run(s) (no COMPLETE marker) are not counted; see Runs.")
    for text in pair_notes:  # why an automatic comparison is not there
        notes.append(text)
        log(f"note: {text}")
    if not results.absent.empty:
        left_out = len(results.absent[[*EVAL_ROW_KEY, "fold", "organ", "case_id"]].drop_duplicates())
        text = (f"{left_out} query volume{'s' if left_out != 1 else ''} left out of an organ's score because the "
                "scan does not show that organ (its Dice would be 0/0; the reference codes would average a NaN); "
                "the ° notes under the tables and the notes under the bootstrap intervals say which")
        notes.append(text)
        log(f"note: {text}")

    # on a terminal the bar goes when done; in a log it stays, ended by a newline, so that
    # what is printed next starts a line of its own
    steps = tqdm(total=5, desc="report", unit="step", file=sys.stderr, leave=not sys.stderr.isatty(),
                 disable=os.environ.get("FSMIS_NO_PROGRESS") == "1")
    tables = all_tables(results, include_published, show_std)
    for table in tables:
        if table.is_empty():
            continue
        (tables_dir / f"{table.name}.md").write_text(table.to_markdown(), encoding="utf-8")
        (tables_dir / f"{table.name}.tex").write_text(table.to_latex(), encoding="utf-8")
        (tables_dir / f"{table.name}.csv").write_text(table.to_csv(), encoding="utf-8")
    gaps = published_gap(next(t for t in tables if t.name == "main"))
    if not gaps.empty:
        gaps.to_csv(tables_dir / "published_gap.csv", index=False)
        (tables_dir / "published_gap.md").write_text(frame_to_markdown(gaps, "{:.2f}"), encoding="utf-8")
    long_fold_csv(results).to_csv(tables_dir / "fold_scores.csv", index=False)
    per_case.to_csv(tables_dir / "per_volume.csv", index=False)
    run_summary = summarise_runs(results)
    results.runs.to_csv(tables_dir / "runs.csv", index=False)
    steps.update()

    comparisons = []
    for a, b in pairs:
        frame = stats.compare(results, a, b, n_boot=n_boot)
        shown = stats.format_compare(frame)
        pairing_notes = stats.comparison_notes(results, a, b, frame)
        keys = [row_label(*stats.resolve(per_case, spec)) for spec in (a, b)]
        # the file is named by the records' names, however the rows were typed (a displayed
        # name, a record name): one comparison, one file
        stem = f"compare_{_slug(keys[0])}_vs_{_slug(keys[1])}"
        frame.to_csv(tables_dir / f"{stem}.csv", index=False)
        # the headers name A and B as the tables and figures do
        name_a, name_b = (stats.shown_row_labels(keys)[key] for key in keys)
        (tables_dir / f"{stem}.md").write_text(f"**A = {name_a} vs B = {name_b}** ({COMPARE_NOTE})\n\n"
                                               + frame_to_markdown(shown) + _notes_markdown(pairing_notes),
                                               encoding="utf-8")
        (tables_dir / f"{stem}.tex").write_text(
            frame_to_latex(shown, f"{name_a} vs {name_b}: paired comparison of per-volume Dice (%). {COMPARE_NOTE}"
                           + "".join(f" {text}." for text in pairing_notes), stem),
            encoding="utf-8")
        comparisons.append((name_a, name_b, shown, pairing_notes))
    intervals = stats.confidence_intervals(results, n_boot=n_boot)
    if not intervals.empty:
        shown_intervals = stats.format_intervals(intervals)
        intervals.to_csv(tables_dir / "bootstrap_ci.csv", index=False)
        interval_notes = [INTERVALS_NOTE, *_absent_interval_notes(results)]
        (tables_dir / "bootstrap_ci.md").write_text(
            f"**{INTERVALS_TITLE}**\n\n" + frame_to_markdown(shown_intervals, "{:.2f}") + _notes_markdown(interval_notes),
            encoding="utf-8")
        (tables_dir / "bootstrap_ci.tex").write_text(
            frame_to_latex(shown_intervals, f"{INTERVALS_TITLE}. " + " ".join(f"{t}." for t in interval_notes),
                           "bootstrap_ci", "{:.2f}"), encoding="utf-8")
    else:
        shown_intervals = intervals
    steps.update()

    def note(text: str) -> None:
        notes.append(text.removeprefix("note: "))
        log(text)

    problems: list[str] = []
    figures = figures_module.write_figures(results, figures_dir, width=width, problems=problems)
    comparison = comparison_frame(results)
    if comparison["published"].notna().any():
        comparison.to_csv(tables_dir / "published_comparison.csv", index=False)
    elif not results.empty:  # a figure the reader looks for: say why it is not there
        note("note: published_comparison figure and table not written: no measured method has a published number "
             "for the evaluations run (methods, datasets and settings of the SD-FSMIS paper's Tables 1-4)")
    steps.update()
    # without a data root the loader is still tried: file-free datasets (phantom) need none,
    # the others fail to load and the figure is skipped with a note
    loader = dataset_loader or default_loader(data_root)
    orientations: dict[str, list[Orientation]] = {}
    qualitative = {} if results.empty else write_qualitative(
        results, figures_dir, loader, named_slices, log=note, zoom=zoom, width=width, problems=problems,
        orientations=orientations)
    for problem in problems:  # the layout is meant to make this impossible; say so if not
        note(f"note: figure text overlaps or is cut off ({problem})")
    steps.update()

    captions = {name: figures_module.caption(name, results) for name in figures}
    for name in qualitative:
        captions[name] = qualitative_caption(results, name, zoom, orientations.get(name))
    page = render_html(results, tables, {**figures, **qualitative}, captions, comparisons, shown_intervals,
                       run_summary, notes)
    (out / REPORT_HTML).write_text(page, encoding="utf-8")
    steps.update()
    steps.close()


#: what the paired comparisons and intervals show (their headers say it too)
COMPARE_NOTE = ("per-volume Dice %, also for a [dice=pooled] variant, mean over the paired (fold, scan) evaluations; "
                "paired on the same volumes and the same training seeds (seeds: those paired, on both sides); "
                "n: query scans, each one pair (a scan that is a query in two folds counts once); 95% percentile "
                "bootstrap intervals resampling scans; W, p: Wilcoxon signed-rank over the n scans, so p is over "
                "volumes and does not include training variance across seeds; r_rb: rank-biserial; organ 'all': "
                "one pair per query volume, its mean over organs")
INTERVALS_TITLE = "Mean per-volume Dice (%) with 95% bootstrap CI"
#: what the intervals' n columns mean and what the bootstrap resamples
INTERVALS_NOTE = ("mean over the (fold, scan) evaluations, each the mean over its seeds; n scans: distinct query "
                  "scans; n (fold, scan): evaluations (the folds overlap by one scan, PROTOCOL.md §2, so a scan can "
                  "be a query in two folds); the bootstrap resamples scans, all evaluations of a scan together")


def _notes_markdown(notes: Sequence[str]) -> str:
    """Notes below a Markdown table, one paragraph each."""
    return "".join(f"\nNote: {text}\n" for text in notes)


def _absent_interval_notes(results: Results) -> list[str]:
    """Per interval row that lacks volumes a scan did not show the organ in: how many, which."""
    notes = []
    for (method, variant, train, test, setting), organs in absent_volumes(results).items():
        for organ, folds in organs.items():
            notes.append(f"{stats.shown_row_label(row_label(method, variant))}, {eval_label(train, test)} setting "
                         f"{setting}, {organ_display(organ)}: {absent_text(folds)}: the scan shows no "
                         f"{organ_display(organ)} (Dice 0/0)")
    return notes


def _parse_names(items: Sequence[str] | None) -> dict[str, str]:
    names = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise FsmisError(f"cannot read --rename {item!r}", hint='write --rename NAME="Display name", e.g. '
                             '--rename nifti_folder="Hospital CT"')
        names[key.strip()] = value.strip()
    return names


def _run(args: argparse.Namespace) -> int:
    results_dir = Path(args.results) if args.results else default_results_dir()
    compare = [tuple(args.compare)] if args.compare else None
    if args.out:
        out = write_report(
            results_dir, args.out, data_root=args.data_root, force=args.force, compare=compare,
            slices=args.slices, show_std=args.std, include_published=not args.no_published, n_boot=args.n_boot,
            width=args.width, zoom=args.zoom, names=_parse_names(args.rename), rows=args.rows,
        )
        print(out / REPORT_HTML)
        return 0
    with renamed(_parse_names(args.rename)):  # the tables on stdout name methods as a report would
        return _print_tables(args, results_dir, compare)


def _selected(results: Results, rows: Sequence[str] | None,
              compare: Sequence[tuple[str, str]] | None = None) -> Results:
    """``results`` reduced to ``rows`` (``--rows``); all of them without.

    Raises:
        FsmisError: a ``compare`` row that ``rows`` left out (said as such, not as a row
            that has no runs).
    """
    if not rows:
        return results
    chosen = select_rows(results, rows)
    kept = per_case_scores(chosen)
    for spec in [name for pair in compare or () for name in pair]:
        try:
            stats.resolve(kept, spec)
        except FsmisError:
            stats.resolve(per_case_scores(results), spec)  # a row that does not exist at all: that error
            raise FsmisError(f"--compare names {spec!r}, which is not among the rows chosen with --rows",
                             hint="add it to --rows, or leave --rows out") from None
    _log(f"note: --rows: {len(set(zip(chosen.runs['method'], chosen.runs['variant'])))} of "
         f"{len(set(zip(results.runs['method'], results.runs['variant'])))} rows reported")
    return chosen


def _say_unmatched_renames(names: dict[str, str] | None, results) -> None:
    """A ``--rename`` whose name no method, dataset, organ or backbone of the report has (a
    typo) would change nothing without a word: said in a note, with the close names."""
    if not names or results.empty:
        return
    from .._registry import closest

    runs, scores = results.runs, results.fold_scores
    known = sorted({*runs["method"], *runs["dataset"], *runs["train_dataset"], *runs["backbone"], *scores["organ"]}
                   - {"", "none"})
    for name in names:
        if name not in known:
            guess = closest(name, known)
            _log(f"note: --rename {name}=... matches no method, dataset, organ or backbone of this report"
                 + (f"; did you mean {guess!r}?" if guess else f" (they are: {', '.join(known)})"))


def _print_tables(args: argparse.Namespace, results_dir: Path, compare: list[tuple[str, str]] | None) -> int:
    """``report`` without ``--out``: the tables (or one comparison, or the long CSV) on stdout."""
    results = _selected(load_results(results_dir), args.rows, compare)
    _say_unmatched_renames(_parse_names(args.rename), results)
    if results.empty:
        _log(f"note: no finished runs under {results_dir}")
    if results.unfinished:
        _log(f"note: {len(results.unfinished)} unfinished run(s) without COMPLETE are not counted")
    for text in results.notes:
        _log(f"note: {text}")
    if compare:
        frame = stats.compare(results, *compare[0], n_boot=args.n_boot)
        pairing_notes = stats.comparison_notes(results, *compare[0], frame)
        for text in pairing_notes:
            _log(f"note: {text}")
        if args.format == "csv":
            sys.stdout.write(frame.to_csv(index=False))
        elif args.format == "latex":
            sys.stdout.write(frame_to_latex(stats.format_compare(frame),
                                            f"{args.compare[0]} vs {args.compare[1]}: paired comparison of per-volume Dice (%)",
                                            "compare"))
        else:
            sys.stdout.write(f"A = {args.compare[0]}, B = {args.compare[1]} ({COMPARE_NOTE})\n\n")
            sys.stdout.write(frame_to_markdown(stats.format_compare(frame)) + _notes_markdown(pairing_notes))
        return 0
    if args.format == "csv":
        sys.stdout.write(long_fold_csv(results).to_csv(index=False))
        return 0
    # every table that has rows (the main table always: it holds the published numbers)
    tables = [t for t in all_tables(results, include_published=not args.no_published, show_std=args.std)
              if t.name == "main" or not t.is_empty()]
    render = (lambda t: t.to_latex()) if args.format == "latex" else (lambda t: t.to_markdown())
    sys.stdout.write("\n".join(render(t) for t in tables))
    _log("note: paired statistics (--compare A B), bootstrap intervals and figures are not shown here; "
         "`fsmis-bench report --out DIR` writes all of them")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a bootstrap needs at least one resample)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; a bootstrap needs at least one resample")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``report`` to the CLI."""
    parser = subparsers.add_parser(
        "report",
        help="tables, statistics, figures and an HTML page from run records",
        description="Aggregate finished run records into the paper's tables (beside the published numbers), "
                    "paired statistics, figures and a self-contained HTML report.",
    )
    parser.add_argument("--results", default=None,
                        help="results folder (default: $FSMIS_RESULTS_DIR or ./results)")
    parser.add_argument("--format", choices=("md", "csv", "latex"), default="md",
                        help="stdout format: md/latex = every result table (main, cross-domain, ablation, "
                             "backbone: those with rows); csv = organ score per fold, long format, columns "
                             f"{', '.join(FOLD_CSV_COLUMNS)}; one row per {', '.join(FOLD_CSV_COLUMNS[:7])} "
                             "(dice 0-1, averaged over n_seeds seeds; variant and train_dataset tell apart "
                             "settings and cross-domain runs)")
    parser.add_argument("--out", default=None, help="write the full report (tables, figures, report.html) here")
    parser.add_argument("--force", action="store_true",
                        help="allow --out to be a non-empty folder: the files of an earlier report there are "
                             "replaced (stale ones removed), other files are kept")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="paired per-organ statistics of two methods (name or 'method [variant]', or the name "
                             "the tables show)")
    parser.add_argument("--slices", default=None,
                        help="qualitative slices as [dataset:]organ:case_id:z,... (default: per organ the largest "
                             "ground-truth slice of fold 0's first query case); without a dataset a slice applies "
                             "to every dataset whose runs evaluated that organ and case")
    parser.add_argument("--data-root", default=None,
                        help="data for the qualitative figure (default: $FSMIS_DATA_ROOT; skipped without data)")
    parser.add_argument("--width", choices=tuple(WIDTHS), default="double",
                        help="figure width: double (7 in, a full page width) or single (3.5 in, one column)")
    parser.add_argument("--zoom", action="store_true",
                        help="qualitative figure: crop every panel to a square around its organ")
    parser.add_argument("--rename", action="append", metavar="NAME=TEXT",
                        help='display name wherever the report shows the name (figures, tables, comparisons), e.g. '
                             '--rename nifti_folder="Hospital CT" (repeatable; methods, datasets, organs, backbones; '
                             "the CSV files keep the record names)")
    parser.add_argument("--rows", nargs="+", metavar="ROW",
                        help="report only these rows, e.g. --rows prototype 'SD-FSMIS*': one row as --compare "
                             "names it (a method alone: its plain row), or with * every row that fits; the measured rows of the tables, statistics "
                             "and figures are only these (the published rows stay: --no-published leaves them out; "
                             "the notes are the whole folder's) (default: every row)")
    parser.add_argument("--std", action="store_true", help="show ± std across folds in the tables")
    parser.add_argument("--no-published", action="store_true", help="leave the published numbers out of the tables")
    parser.add_argument("--n-boot", type=_positive_int, default=10000, metavar="N",
                        help="bootstrap resamples, >= 1 (default 10000)")
    parser.set_defaults(func=_run)
