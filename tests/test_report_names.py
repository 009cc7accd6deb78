"""One report names a method one way everywhere: tables, paired comparisons, bootstrap
intervals and figures show the display name (``--rename`` applied), LaTeX-escaped in the
.tex files; the CSV files keep the record names (the tables' CSV in a ``key`` column)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from fsmis_bench.reporting import stats, style, write_report
from fsmis_bench.reporting.collect import load_results, per_case_scores
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run

DATASET = SyntheticDataset("abd_mri", ("liver", "spleen"), n_cases=20, shape=(6, 24, 24))
RENAMES = {"prototype": "ProtoNet", "sdfsmis": "Ours_v2 & co"}


def _first_cells(markdown: str) -> list[str]:
    """The first cell of every body row of the Markdown tables in ``markdown``."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| Method")
            and not line.startswith("| method")]
    return [row.strip("|").split("|")[0].strip() for row in rows]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("names") / "results"
    for fold in (0, 1):
        queries = [c for i, c in enumerate(DATASET.fold_cases(fold)) if i != 2]
        for method, score, options in (("prototype", 0.5, {}), ("support_copy", 0.4, {}),
                                       ("sdfsmis", 0.3, {"backbone": "tiny", "random_weights": True})):
            cases = [(organ, case, *counts_for_dice(score)) for organ in DATASET.label_map for case in queries]
            write_run(root, method, "abd_mri", 1, fold, 0, cases, **options)
    out = root.parent / "out"
    write_report(root, out, dataset_loader=lambda name: DATASET, n_boot=20, names=RENAMES, log=lambda _: None)
    return out


def test_rename_reaches_the_table_rows(report: Path) -> None:
    """--rename prototype=ProtoNet renamed the figures and bootstrap_ci.md, not the Method
    column of the main table (the audit)."""
    main = _first_cells((report / "tables" / "main.md").read_text(encoding="utf-8"))
    assert "ProtoNet*" in main and "Ours_v2 & co [tiny]*§" in main  # two folds: incomplete
    assert not any(cell.startswith(("prototype", "sdfsmis")) for cell in main)
    latex = (report / "tables" / "main.tex").read_text(encoding="utf-8")
    assert "Ours\\_v2 \\& co [tiny]\\textsuperscript{*}\\textsuperscript{\\S} &" in latex
    assert "ProtoNet\\textsuperscript{*} &" in latex


def test_tables_and_intervals_name_the_rows_alike(report: Path) -> None:
    main = {re.sub(r"[*§‡†]+$", "", cell) for cell in _first_cells((report / "tables" / "main.md").read_text())}
    intervals = set(_first_cells((report / "tables" / "bootstrap_ci.md").read_text()))
    assert intervals == {"ProtoNet", "Support copy", "Ours_v2 & co [tiny]"} and intervals <= main


def test_paired_comparisons_name_a_and_b_as_the_tables_do(report: Path) -> None:
    headers = [path.read_text(encoding="utf-8").splitlines()[0] for path in (report / "tables").glob("compare_*.md")]
    assert headers and all("prototype" not in h and "sdfsmis" not in h for h in headers)
    assert any("ProtoNet" in h for h in headers)
    page = (report / "report.html").read_text(encoding="utf-8")
    sections = re.findall(r"<h3>A = [^<]*</h3>", page)
    assert sections and all("prototype" not in h for h in sections) and any("ProtoNet" in h for h in sections)


def test_csv_files_keep_the_record_names(report: Path) -> None:
    main = pd.read_csv(report / "tables" / "main.csv", keep_default_na=False)
    measured = main[main["source"] == "measured"].set_index("key")
    assert measured.loc["prototype", "Method"] == "ProtoNet"
    assert measured.loc["sdfsmis [tiny,random_weights]", "Method"] == "Ours_v2 & co [tiny]"
    assert set(pd.read_csv(report / "tables" / "bootstrap_ci.csv")["method"]) == {
        "prototype", "support_copy", "sdfsmis [tiny,random_weights]"}


def test_compare_accepts_the_name_the_tables_show(report: Path) -> None:
    results = load_results(report.parent / "results")
    per_case = per_case_scores(results)
    with style.renamed(RENAMES):
        assert stats.resolve(per_case, "ProtoNet") == ("prototype", "")
        assert stats.resolve(per_case, "Ours_v2 & co [tiny]") == ("sdfsmis", "tiny,random_weights")
    assert stats.resolve(per_case, "Support copy") == ("support_copy", "")
    assert stats.resolve(per_case, "sdfsmis [tiny,random_weights]") == ("sdfsmis", "tiny,random_weights")


def test_rows_that_would_read_alike_keep_their_record_names() -> None:
    """A random-weights variant shows as its method's name plus a marker in tables and figures;
    the intervals have no markers, so there the two keep the names the records give them."""
    frame = pd.DataFrame({"method": ["prototype", "prototype [random_weights]", "sdfsmis [sd15]"], "evaluation": "x",
                          "setting": 1, "organ": "liver", "n_volumes": 4, "mean": 50.0, "CI low": 40.0,
                          "CI high": 60.0})
    shown = stats.format_intervals(frame)["method"].tolist()
    assert shown == ["prototype", "prototype [random_weights]", "SD-FSMIS [SD-1.5]"]
