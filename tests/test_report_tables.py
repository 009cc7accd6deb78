"""Report tables: aggregation from run records, markers, highlighting, published numbers, CLI."""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from fsmis_bench.errors import FsmisError
from fsmis_bench.reporting import commands
from fsmis_bench.reporting.collect import load_published, load_results, long_fold_csv
from fsmis_bench.reporting.synthetic import write_run
from fsmis_bench.reporting.tables import ablation_table, backbone_table, cross_domain_table, main_table


# -- a record writer that follows docs/HELPERS_CONTEXT.md literally -----------------------------

def write_record(root: Path, method: str, dataset: str, setting: int, fold: int, seed: int,
                 cases: list[tuple[str, str, int, int, int]], *, train_dataset: str | None = None,
                 backbone: str = "none", random_weights: bool = False, non_standard: tuple[str, ...] = (),
                 dice: str = "per_volume", complete: bool = True) -> Path:
    """``cases``: (organ, case_id, tp, fp, fn) per query volume."""
    train_dataset = train_dataset or dataset
    flags = list(non_standard) + (["random_weights"] if random_weights else [])
    run_dir = root / method / dataset / f"setting{setting}" / f"fold{fold}" / f"seed{seed}-{abs(hash((method, backbone, tuple(flags), train_dataset))) % 10**8:08d}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"method: {method}\n")
    (run_dir / "run.json").write_text(json.dumps({
        "method": method, "dataset": train_dataset, "test_dataset": dataset, "setting": setting, "fold": fold,
        "seed": seed, "backbone": backbone, "pretrained": not random_weights, "random_weights": random_weights,
        "fidelity": "paper",
        "protocol": {"supp_idx": 2, "n_part": 3, "n_shot": 1, "dice": dice, "exclusion": "any", "train_labels": "supervoxels"},
        "non_standard": flags, "config_hash": "0123abcd", "versions": {}, "started_at": "2026-01-01T00:00:00",
        "finished_at": "2026-01-01T01:00:00", "status": "complete",
    }))
    lines = ["method,dataset,train_dataset,setting,fold,seed,organ,case_id,dice,tp,fp,fn"]
    for organ, case_id, tp, fp, fn in cases:
        lines.append(f"{method},{dataset},{train_dataset},{setting},{fold},{seed},{organ},{case_id},"
                     f"{2 * tp / (2 * tp + fp + fn)},{tp},{fp},{fn}")
    (run_dir / "cases.csv").write_text("\n".join(lines) + "\n")
    if complete:
        (run_dir / "COMPLETE").write_text("")
    return run_dir


def vol(organ: str, case_id: str, dice: float) -> tuple[str, str, int, int, int]:
    """A query volume of 100 voxels' worth of counts with exactly this Dice (multiples of 0.02)."""
    tp = round(50 * dice)
    return (organ, case_id, tp, 50 - tp, 50 - tp)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    for fold in range(5):
        # alpha: liver folds 0.70, 0.72, ..., 0.78 (cases 0.6+0.02f and 0.8+0.02f); spleen 0.6
        alpha = [vol("liver", "1", 0.6 + 0.02 * fold), vol("liver", "2", 0.8 + 0.02 * fold),
                 vol("spleen", "1", 0.5), vol("spleen", "2", 0.7)]
        write_record(root, "alpha", "abd_mri", 1, fold, 0, alpha)
        # beta: liver 0.6 per fold (fold 0 from two seeds, 0.5 and 0.7); spleen 0.9
        if fold == 0:
            write_record(root, "beta", "abd_mri", 1, 0, 0, [vol("liver", "1", 0.5), vol("liver", "2", 0.5),
                                                            vol("spleen", "1", 0.9), vol("spleen", "2", 0.9)])
            write_record(root, "beta", "abd_mri", 1, 0, 1, [vol("liver", "1", 0.7), vol("liver", "2", 0.7),
                                                            vol("spleen", "1", 0.9), vol("spleen", "2", 0.9)])
        else:  # two seeds on every fold: a row averaging unequal seed counts is marked (test_report_audit.py)
            for seed in (0, 1):
                write_record(root, "beta", "abd_mri", 1, fold, seed, [vol("liver", "1", 0.6), vol("liver", "2", 0.6),
                                                                      vol("spleen", "1", 0.9), vol("spleen", "2", 0.9)])
        # pooled Dice, non-standard: liver pooled = 200/220; per-volume mean would be 0.807
        write_record(root, "alpha", "abd_mri", 1, fold, 0,
                     [("liver", "1", 10, 0, 10), ("liver", "2", 90, 10, 0), vol("spleen", "1", 0.5), vol("spleen", "2", 0.5)],
                     dice="pooled", non_standard=("dice=pooled",))
        # random weights: high liver score but must not win
        write_record(root, "alpha", "abd_mri", 1, fold, 0, [vol("liver", "1", 0.96), vol("spleen", "1", 0.2)],
                     random_weights=True)
        write_record(root, "alpha", "abd_mri", 1, fold, 0, [vol("liver", "1", 0.4), vol("spleen", "1", 0.4)],
                     train_dataset="abd_ct")
        write_record(root, "sdfsmis", "abd_mri", 1, fold, 0, [vol("liver", "1", 0.8), vol("spleen", "1", 0.8)], backbone="sd15")
        write_record(root, "sdfsmis", "abd_mri", 1, fold, 0, [vol("liver", "1", 0.7), vol("spleen", "1", 0.7)], backbone="sd21")
        write_record(root, "sdfsmis_qe", "abd_mri", 1, fold, 0, [vol("liver", "1", 0.76), vol("spleen", "1", 0.7)], backbone="sd15")
    for fold in range(3):  # incomplete: 3 of 5 folds, but the best liver score
        write_record(root, "gamma", "abd_mri", 1, fold, 0, [vol("liver", "1", 0.98), vol("spleen", "1", 0.98)])
    write_record(root, "delta", "abd_mri", 1, 0, 0, [vol("liver", "1", 0.9)], complete=False)
    return root


def md_row(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")


def md_header(markdown: str) -> list[str]:
    line = next(l for l in markdown.splitlines() if l.startswith("| Method"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_fold_scores_per_volume_pooled_and_seed_average(records: Path) -> None:
    results = load_results(records)
    scores = results.fold_scores.set_index(["method", "variant", "train_dataset", "dataset", "setting", "fold", "organ"])
    assert scores.loc[("alpha", "", "abd_mri", "abd_mri", 1, 3, "liver"), "dice"] == pytest.approx(0.76)
    assert scores.loc[("alpha", "dice=pooled", "abd_mri", "abd_mri", 1, 0, "liver"), "dice"] == pytest.approx(200 / 220)
    beta = scores.loc[("beta", "", "abd_mri", "abd_mri", 1, 0, "liver")]
    assert beta["dice"] == pytest.approx(0.6) and beta["n_seeds"] == 2
    assert [p.parts[-5] for p in results.unfinished] == ["delta"]
    assert "delta" not in set(results.runs["method"])


def test_main_table_values_std_and_markers(records: Path) -> None:
    table = main_table(load_results(records), include_published=False, show_std=True)
    markdown = table.to_markdown()
    assert md_header(markdown) == ["Method", "Setting", "Abd-MRI Spleen", "Abd-MRI Liver", "Abd-MRI Mean"]
    # hand-computed: liver folds 70..78 -> 74.00 ± 3.16; spleen 60 ± 0; mean 67.00, per-fold means 65..69 -> ± 1.58
    # competing rows: alpha, beta, sdfsmis [sd15] (80/80/80) and [sd21] (70/70/70)
    assert md_row(markdown, "alpha") == ["alpha", "1", "60.00 ± 0.00", "<u>74.00 ± 3.16</u>", "67.00 ± 1.58"]
    assert md_row(markdown, "beta") == ["beta", "1", "**90.00 ± 0.00**", "60.00 ± 0.00", "<u>75.00 ± 0.00</u>"]
    # measured rows are named as in the figures (display names, backbones as shown there)
    assert md_row(markdown, "SD-FSMIS [SD-1.5]") == ["SD-FSMIS [SD-1.5]", "1", "<u>80.00 ± 0.00</u>", "**80.00 ± 0.00**",
                                                     "**80.00 ± 0.00**"]
    # marked rows are shown but never highlighted, even when their numbers are higher
    assert md_row(markdown, "alpha [dice=pooled]‡")[3] == "90.91 ± 0.00"
    assert md_row(markdown, "alpha§")[3] == "96.00 ± 0.00"  # random weights: the marker, as the figures' footnote
    assert md_row(markdown, "gamma*")[3] == "98.00 ± 0.00"
    assert "* incomplete" in markdown and "gamma, Abd-MRI setting 1: 3/5 folds" in markdown
    assert "§ random weights" in markdown and "‡ non-standard" in markdown
    # cross-domain runs and ablation-only variants stay out of the main table
    assert not any(line.startswith("| SD-FSMIS (SII+QE)") for line in markdown.splitlines())
    assert sum(line.startswith("| alpha |") for line in markdown.splitlines()) == 1
    frame = table.to_frame().set_index("key")  # the record names, as in fold_scores.csv and --compare
    assert frame.loc["alpha", "Abd-MRI|liver"] == pytest.approx(74.0)
    assert frame.loc["alpha", "Abd-MRI|liver|std"] == pytest.approx(math.sqrt(10), abs=1e-4)
    assert frame.loc["gamma", "markers"] == "incomplete"
    assert frame.loc["alpha [random_weights]", "markers"] == "random_weights"
    assert frame.loc["alpha [random_weights]", "Method"] == "alpha"
    assert frame.loc["alpha [dice=pooled]", "markers"] == "non_standard"
    assert frame.loc["sdfsmis [sd15]", "Method"] == "SD-FSMIS [SD-1.5]"


def test_latex_booktabs_highlighting(records: Path) -> None:
    latex = main_table(load_results(records), include_published=False).to_latex()
    for command in ("\\toprule", "\\midrule", "\\bottomrule", "\\cmidrule"):
        assert command in latex
    alpha = next(l for l in latex.splitlines() if l.startswith("alpha &"))
    assert alpha == "alpha & 1 & 60.00 & \\underline{74.00} & 67.00 \\\\"
    sd15 = next(l for l in latex.splitlines() if l.startswith("SD-FSMIS [SD-1.5] &"))
    assert sd15 == "SD-FSMIS [SD-1.5] & 1 & \\underline{80.00} & \\textbf{80.00} & \\textbf{80.00} \\\\"
    assert "alpha [dice=pooled]\\textsuperscript{\\ddag}" in latex
    assert "gamma\\textsuperscript{*}" in latex
    assert "alpha\\textsuperscript{\\S}" in latex


def test_published_rows_are_marked_and_compete(records: Path) -> None:
    table = main_table(load_results(records))
    markdown = table.to_markdown()
    published = load_published()
    sd = published[(published["table"] == 1) & (published["method"] == "SD-FSMIS") & (published["setting"] == 1)
                   & (published["test_on"] == "abd_mri")].set_index("organ")["dice"]
    row = md_row(markdown, "SD-FSMIS†")
    header = md_header(markdown)
    assert row[header.index("Abd-MRI Mean")].strip("*<u>/") == f"{sd['mean']:.2f}"
    assert "SD-FSMIS" in markdown and "arXiv 2604.03134" in markdown
    # published best liver on Abd-MRI setting 1 (PGRNet 83.27) beats every measured row
    assert md_row(markdown, "PGRNet†")[header.index("Abd-MRI Liver")] == "**83.27**"
    # beside the published four organs, liver + spleen only is incomplete and gets no mean
    alpha = md_row(markdown, "alpha*")
    assert alpha[header.index("Abd-MRI Liver")] == "74.00" and alpha[header.index("Abd-MRI Mean")] == "–"
    assert "alpha: no LK, RK on Abd-MRI, so no mean" in markdown
    assert set(table.to_frame()["source"]) == {"published", "measured"}


def test_cross_domain_ablation_backbone_tables(records: Path) -> None:
    results = load_results(records)
    cross = cross_domain_table(results).to_markdown()
    header = md_header(cross)
    assert "Abd-CT → Abd-MRI Liver" in header
    assert md_row(cross, "alpha*")[header.index("Abd-CT → Abd-MRI Liver")] == "40.00"
    assert md_row(cross, "SD-FSMIS†")[header.index("Abd-CT → Abd-MRI Mean")] == "**81.42**"

    ablation = ablation_table(results).to_markdown()
    assert md_header(ablation)[:5] == ["Method", "Setting", "SII", "QE", "VTCT"]
    assert md_row(ablation, "SD-FSMIS (SII+QE) [SD-1.5]")[2:5] == ["✓", "✓", ""]
    assert md_row(ablation, "SD-FSMIS [SD-1.5]")[2:5] == ["✓", "✓", "✓"]
    assert md_row(ablation, "SD-FSMIS (SII+VTCT)†")[2:5] == ["✓", "", "✓"]
    assert md_row(ablation, "SD-FSMIS (SII)†")[2:5] == ["✓", "", ""]
    assert "\\checkmark" in ablation_table(results).to_latex()

    backbone = backbone_table(results).to_markdown()
    header = md_header(backbone)
    assert md_row(backbone, "SD-FSMIS [SD-1.5]")[2] == "SD-1.5"
    assert md_row(backbone, "SD-FSMIS [SD-2.1]")[header.index("Abd-MRI Liver")] == "<u>70.00</u>"
    published_rows = [l for l in backbone.splitlines() if l.startswith("| SD-FSMIS† |")]
    assert [r.split("|")[3].strip() for r in published_rows] == ["SD-1.5", "SD-2.1"]
    assert "SII+QE" not in backbone  # one backbone only: nothing to compare


def test_long_csv(records: Path) -> None:
    frame = long_fold_csv(load_results(records))
    key = ["method", "variant", "train_dataset", "dataset", "setting", "fold", "organ"]
    assert list(frame.columns) == [*key, "dice", "n_seeds", "markers"]
    assert not frame.duplicated(key).any()  # one row per key, a cross-domain run included
    row = frame[(frame["method"] == "alpha") & (frame["variant"] == "") & (frame["train_dataset"] == "abd_mri")
                & (frame["fold"] == 2) & (frame["organ"] == "liver")]
    assert row["dice"].item() == pytest.approx(0.74)
    assert frame["dice"].between(0, 1).all()
    assert set(frame.loc[frame["method"] == "gamma", "markers"]) == {"incomplete"}


def test_synthetic_writer_matches_record_format(tmp_path: Path) -> None:
    ours = write_record(tmp_path / "a", "m", "abd_mri", 2, 1, 3, [vol("liver", "7", 0.5)])
    theirs = write_run(tmp_path / "b", "m", "abd_mri", 2, 1, 3, [("liver", "7", 25, 25, 25)])
    assert ours.relative_to(tmp_path / "a").parts[:4] == theirs.relative_to(tmp_path / "b").parts[:4]
    assert set(json.loads((ours / "run.json").read_text())) == set(json.loads((theirs / "run.json").read_text()))
    assert (ours / "cases.csv").read_text().splitlines()[0] == (theirs / "cases.csv").read_text().splitlines()[0]
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())


def _cli(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    import contextlib

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = args.func(args)
    return code, buffer.getvalue()


def test_cli_formats(records: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSMIS_RESULTS_DIR", str(records))
    code, text = _cli(["report", "--format", "csv"])
    assert code == 0
    frame = pd.read_csv(io.StringIO(text), keep_default_na=False)
    assert list(frame.columns[:8]) == ["method", "variant", "train_dataset", "dataset", "setting", "fold", "organ", "dice"]
    assert len(frame) == len(long_fold_csv(load_results(records)))
    code, text = _cli(["report", "--results", str(records), "--no-published"])
    assert text.startswith("**Main comparison") and "| alpha | 1 |" in text
    code, text = _cli(["report", "--results", str(records), "--format", "latex"])
    assert "\\begin{tabular}" in text


def test_missing_results_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(FsmisError, match="does not exist"):
        load_results(tmp_path / "nope")


def test_same_identity_twice_keeps_the_latest_and_says_so(tmp_path: Path) -> None:
    first = write_record(tmp_path, "alpha", "abd_mri", 1, 0, 0, [vol("liver", "1", 0.5)])
    second = first.with_name("seed0-ffffffff")  # same method/variant/fold/seed, other config
    shutil.copytree(first, second)
    info = json.loads((second / "run.json").read_text())
    info["finished_at"] = "2026-02-01T00:00:00"
    (second / "run.json").write_text(json.dumps(info))
    (second / "cases.csv").write_text((second / "cases.csv").read_text().replace(",0.5,25,25,25", ",0.7,35,15,15"))
    results = load_results(tmp_path)
    assert results.runs["run_dir"].tolist() == [str(second)]
    assert results.fold_scores["dice"].tolist() == [pytest.approx(0.7)]
    assert any("superseded" in note and str(first) in note for note in results.notes)
