"""Every .tex file a report writes is pdflatex input: ASCII only (non-ASCII text is mapped to
LaTeX), and, where pdflatex is installed, it compiles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from fsmis_bench.reporting import stats, write_report
from fsmis_bench.reporting.synthetic import make_demo_results
from fsmis_bench.reporting.tables import _TEX_SPECIAL, _tex_escape, frame_to_latex


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("results")
    datasets = make_demo_results(results)
    out = tmp_path_factory.mktemp("report") / "out"
    # --std puts ± into the values; the comparisons' header has A − B; the demo's
    # cross-domain evaluation an arrow, the ablation table check marks
    write_report(results, out, dataset_loader=datasets.__getitem__, n_boot=50, show_std=True,
                 compare=[("sdfsmis [sd15]", "adnet")])
    return out


def _non_ascii(text: str) -> list[str]:
    return sorted({ch for ch in text if ord(ch) > 127})


def test_every_mapped_character_becomes_ascii() -> None:
    for char, latex in _TEX_SPECIAL.items():
        assert not _non_ascii(latex), char
    assert _tex_escape("A − B (95% CI)") == "A $-$ B (95\\% CI)"
    assert not _non_ascii(frame_to_latex(stats.format_compare(pd.DataFrame()), "A vs B", "compare"))


def test_every_tex_file_of_a_report_is_ascii(report: Path) -> None:
    texs = sorted((report / "tables").glob("*.tex"))
    names = {p.stem for p in texs}
    assert {"main", "cross_domain", "ablation", "backbone", "bootstrap_ci"} <= names
    assert any(n.startswith("compare_") for n in names)
    for path in texs:
        text = path.read_text(encoding="utf-8")
        assert not _non_ascii(text), (path.name, _non_ascii(text))
    compare = next(p for p in texs if p.stem.startswith("compare_")).read_text(encoding="utf-8")
    assert "A $-$ B (95\\% CI)" in compare and "per-volume Dice" in compare


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_the_tex_files_compile_with_pdflatex(report: Path, tmp_path: Path) -> None:
    inputs = "\n\\clearpage\n".join(f"\\input{{{p.resolve()}}}" for p in sorted((report / "tables").glob("*.tex")))
    document = tmp_path / "all.tex"
    # the preamble the tables ask for (booktabs, graphicx, amssymb), nothing else
    document.write_text("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n"
                        "\\usepackage{booktabs,graphicx,amssymb}\n\\begin{document}\n" + inputs + "\n\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "all.pdf").is_file()
