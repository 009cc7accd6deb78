"""Reports from run records: tables (with the published numbers), statistics, figures, HTML.

Entry points: ``fsmis-bench report`` (:mod:`.commands`) and :func:`write_report`.
"""

from __future__ import annotations

from .collect import Results, load_published, load_results, long_fold_csv
from .commands import register, write_report

__all__ = ["Results", "load_published", "load_results", "long_fold_csv", "register", "write_report"]
