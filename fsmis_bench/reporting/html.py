"""One self-contained HTML page: tables as HTML, figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .. import __version__
from .collect import Results
from .published import PUBLISHED_CITATION
from .tables import Table, frame_to_html

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1240px; color: #222; font-size: 14px; line-height: 1.4; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px;
     border-bottom: 1px solid #ccc; padding-bottom: 4px; } h3 { font-size: 15px; }
.meta { color: #666; }
.scroll { overflow-x: auto; margin: 8px 0; }
table { border-collapse: collapse; font-size: 12px; }
table.results caption, table.plain caption { caption-side: top; text-align: left; font-weight: bold; padding: 4px 0; }
th, td { padding: 3px 7px; text-align: right; white-space: nowrap; }
th { border-bottom: 1px solid #444; background: #f6f6f6; }
th.group { text-align: center; border-left: 1px solid #ddd; }
td.label, th.label { text-align: left; vertical-align: bottom; }
table.results { border-top: 2px solid #222; border-bottom: 2px solid #222; }
tr.published td { color: #555; background: #fbfbf4; }
tr.newgroup td { border-top: 1px solid #444; }
table.plain td:first-child, table.plain th:first-child { text-align: left; }
.legend { font-size: 12px; color: #444; margin: 4px 0 16px 0; }
figure { margin: 12px 0 24px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #444; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 6px 10px; }
nav a { margin-right: 12px; }
"""


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).stem)}" src="data:image/png;base64,{data}">'


def render_html(
    results: Results,
    tables: Sequence[Table],
    figures: dict[str, Path],
    captions: dict[str, str],
    comparisons: Sequence[tuple[str, str, pd.DataFrame, Sequence[str]]] = (),
    intervals: pd.DataFrame | None = None,
    run_summary: pd.DataFrame | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The report page.

    Args:
        tables: built tables (empty ones are left out).
        figures: name -> PNG path; embedded in the page.
        comparisons: (A, B, display frame of :func:`stats.format_compare`, its notes:
            :func:`stats.comparison_notes`).
        intervals: bootstrap intervals per method and organ.
        run_summary: folds, seeds and training steps per method variant and evaluation.
        notes: things the reader must know (skipped figures, unfinished runs).
    """
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_runs = len(results.runs)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>fsmis-bench report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>fsmis-bench report</h1>",
        f'<p class="meta">Results: <code>{html.escape(str(results.root))}</code> · {n_runs} finished runs · '
        f"{len(results.unfinished)} unfinished · generated {now} by fsmis-bench {__version__}</p>",
        '<nav><a href="#tables">Tables</a><a href="#statistics">Statistics</a><a href="#figures">Figures</a>'
        '<a href="#runs">Runs</a></nav>',
    ]
    for note in notes:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    parts.append('<h2 id="tables">Tables</h2>')
    parts.append(f'<p>Rows marked † are published numbers ({html.escape(PUBLISHED_CITATION)}); all others were '
                 "aggregated from the run records in this results folder.</p>")
    for table in tables:
        if table.is_empty():
            continue
        parts.append(f'<div class="scroll">{table.to_html()}</div>')
    parts.append('<h2 id="statistics">Statistics</h2>')
    if comparisons:
        parts.append("<p>Paired comparisons over the same query volumes and the same training seeds (matched on "
                     "dataset, setting, fold, seed, organ and case; <code>seeds</code>: the seeds paired, the same on "
                     "both sides; seeds only one side ran are left out, as the notes say). Per-volume Dice in %, "
                     "also for a <code>[dice=pooled]</code> variant (whose table score pools the volumes), mean over "
                     "the paired (fold, scan) evaluations; n: query scans, each one pair (the folds overlap by one "
                     "scan, so a scan can be a query in two folds; it counts once); 95 % percentile bootstrap "
                     "intervals resampling scans; W and p: Wilcoxon signed-rank test over the n scans (zero "
                     "differences dropped): p is over volumes and does not include training variance across seeds; "
                     "r_rb: matched-pairs rank-biserial correlation (+1: A better on every scan). The "
                     "<code>all</code> rows pair query volumes, each with its mean over organs: a volume's organs "
                     "share its scan and support, so they are not independent pairs.</p>")
        for a, b, frame, pair_notes in comparisons:
            parts.append(f"<h3>A = {html.escape(a)} vs B = {html.escape(b)}</h3>")
            if not frame.empty:
                parts.append(f'<div class="scroll">{frame_to_html(frame)}</div>')
            for note in pair_notes:
                parts.append(f'<p class="note">{html.escape(note)}</p>')
    else:
        parts.append("<p>No two methods share query volumes; nothing to compare.</p>")
    if intervals is not None and not intervals.empty:
        parts.append("<h3>Mean per-volume Dice (%) with 95 % bootstrap intervals</h3>")
        parts.append("<p>Means over the (fold, scan) evaluations, each the mean over its seeds; n scans: distinct "
                     "query scans; n (fold, scan): evaluations (the folds overlap by one scan, so a scan can be a "
                     "query in two folds); the bootstrap resamples scans, all evaluations of a scan together.</p>")
        parts.append(f'<div class="scroll">{frame_to_html(intervals, "{:.2f}")}</div>')
    parts.append('<h2 id="figures">Figures</h2>')
    for name, path in figures.items():
        parts.append(f"<figure>{_image(path)}<figcaption>{html.escape(captions.get(name, name))}</figcaption></figure>")
    parts.append('<h2 id="runs">Runs</h2>')
    if run_summary is not None and not run_summary.empty:
        parts.append(f'<div class="scroll">{frame_to_html(run_summary)}</div>')
    if results.unfinished:
        parts.append("<h3>Unfinished runs (no COMPLETE marker; not counted)</h3><ul>")
        parts += [f"<li><code>{html.escape(str(p))}</code></li>" for p in results.unfinished]
        parts.append("</ul>")
    if results.notes:
        parts.append("<h3>Notes while reading</h3><ul>")
        parts += [f"<li>{html.escape(n)}</li>" for n in results.notes]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
