"""`fsmis-bench report` options: --n-boot and --slices are checked before anything is written,
--force leaves no stale file of an earlier report, plain stdout shows every table, the csv
rows are unique on the documented key, damaged-run notes read as text."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fsmis_bench.cli import main
from fsmis_bench.errors import FsmisError
from fsmis_bench.reporting import commands, figures, write_report
from fsmis_bench.reporting.collect import FOLD_CSV_COLUMNS, load_results, select_rows
from fsmis_bench.reporting.qualitative import choose_slices, parse_slices
from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run

ABD = SyntheticDataset("abd_mri", ("liver", "spleen"), n_cases=20, shape=(6, 24, 24))
CARD = SyntheticDataset("card_mri", ("lv_bp", "rv"), n_cases=20, shape=(6, 24, 24))
DATASETS = {"abd_mri": ABD, "card_mri": CARD}


def _records(root: Path, methods: tuple[str, ...] = ("adnet", "ssl_alpnet"), settings: tuple[int, ...] = (1, 2)) -> Path:
    """``methods`` on two folds of Abd-MRI (both settings) and Card-MRI, predictions on fold 0,
    plus one cross-domain run."""
    for i, method in enumerate(methods):
        for name, dataset in DATASETS.items():
            for setting in settings if name == "abd_mri" else (1,):
                for fold in (0, 1):
                    queries = [c for k, c in enumerate(dataset.fold_cases(fold)) if k != 2]
                    cases, predictions = [], {}
                    for organ in dataset.label_map:
                        for case in queries:
                            cases.append((organ, case, *counts_for_dice(0.5 + 0.1 * i)))
                            truth = dataset.load(case).label == dataset.label_map[organ]
                            slices = np.flatnonzero(truth.any(axis=(1, 2)))
                            predictions[(organ, case)] = (slices, truth[slices])
                    log = pd.DataFrame({"step": [0, 10, 20], "loss": [1.0, 0.7, 0.5], "lr": 1e-4, "elapsed_s": [0, 1, 2]})
                    write_run(root, method, name, setting, fold, 0, cases, train_log=log,
                              predictions=predictions if fold == 0 else None)
    write_run(root, methods[0], "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.3))], train_dataset="card_mri")
    return root


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _records(tmp_path_factory.mktemp("results"))


def _report(results: Path, out: Path, **options) -> Path:
    return write_report(results, out, dataset_loader=DATASETS.__getitem__, n_boot=options.pop("n_boot", 20),
                        include_published=False, **options)


# -- --n-boot ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_n_boot_below_one_is_refused_by_the_parser(value: str, results_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["report", "--results", str(results_dir), "--out", str(out), "--n-boot", value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--n-boot" in err and "Traceback" not in err and not out.exists()


def test_n_boot_below_one_is_refused_by_write_report(results_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FsmisError, match="n_boot"):
        _report(results_dir, tmp_path / "out", n_boot=0)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


# -- --slices ---------------------------------------------------------------------------------

@pytest.mark.parametrize("slices, message", [
    ("lver:1:3", r"no run evaluated organ 'lver' \(did you mean liver\?\)"),
    ("liver:999:3", r"no run evaluated case '999' for liver"),
    ("card_mri:liver:1:3", r"no run evaluated organ 'liver'"),
    ("abd_ct:liver:1:3", r"no run was tested on 'abd_ct'"),
    ("liver:1:-2", r"slice index must be 0 or more"),
])
def test_slices_that_cannot_be_shown_are_refused_before_writing(slices: str, message: str, results_dir: Path,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(FsmisError, match=message) as info:
        _report(results_dir, tmp_path / "out", slices=slices)
    assert info.value.hint  # what exists instead
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_every_bad_slice_is_named_in_one_error(results_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FsmisError) as info:
        _report(results_dir, tmp_path / "out", slices="lver:1:3,liver:999:3")
    assert "lver:1:3" in info.value.message and "liver:999:3" in info.value.message


def test_a_slice_without_dataset_goes_only_where_its_organ_was_evaluated(results_dir: Path) -> None:
    results = load_results(results_dir)
    named = parse_slices("liver:1:3")
    assert [(c.dataset, c.organ) for c in choose_slices(results, "abd_mri", 1, ABD, named)] == [("abd_mri", "liver")]
    # no liver column on the cardiac figure: it keeps its own default slices
    assert [c.organ for c in choose_slices(results, "card_mri", 1, CARD, named)] == ["lv_bp", "rv"]


# -- --force ----------------------------------------------------------------------------------

def test_force_replaces_the_earlier_report_without_stale_files(results_dir: Path, tmp_path: Path) -> None:
    out = _report(results_dir, tmp_path / "out")  # two methods, two settings: comparisons, setting drop
    before = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"figures/setting_drop.png", "figures/train_loss.pdf", "figures/qualitative_card_mri.png"} <= before
    assert any(name.startswith("tables/compare_") for name in before)
    (out / "keep.txt").write_text("mine")
    (out / "tables" / "my_table.md").write_text("mine")
    (out / "figures" / "my_sketch.svg").write_text("mine")
    smaller = _records(tmp_path / "smaller", methods=("adnet",), settings=(1,))  # one method, setting 1 only
    with pytest.raises(FsmisError, match="not empty"):
        _report(smaller, out)
    _report(smaller, out, force=True)
    after = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "figures/setting_drop.png" not in after and not any(n.startswith("tables/compare_") for n in after)
    assert {"keep.txt", "tables/my_table.md", "figures/my_sketch.svg"} <= after  # the user's files stay
    assert "figures/organ_dice.png" in after and "report.html" in after
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_report_that_fails_leaves_the_earlier_one_intact(results_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = _report(results_dir, tmp_path / "out")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(figures, "write_figures", broken)
    with pytest.raises(RuntimeError):
        _report(results_dir, out, force=True)
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- plain stdout ----------------------------------------------------------------------------

def _cli(argv: list[str]) -> tuple[str, str]:
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert args.func(args) == 0
    return out.getvalue(), err.getvalue()


def test_plain_report_prints_every_table_and_says_what_it_leaves_out(tmp_path: Path) -> None:
    root = _records(tmp_path / "results", methods=("sdfsmis", "sdfsmis_qe"), settings=(1,))
    for backbone in ("sd15", "sd21"):  # two backbones: the backbone table
        write_run(root, "sdfsmis", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.4))], backbone=backbone)
    text, err = _cli(["report", "--results", str(root), "--no-published"])
    titles = [line for line in text.splitlines() if line.startswith("**")]
    assert [t.split(" (")[0] for t in titles] == ["**Main comparison", "**Cross-domain", "**Ablation of SD-FSMIS components",
                                                  "**Diffusion backbone version"]
    assert "--compare" in err and "--out" in err
    latex, _ = _cli(["report", "--results", str(root), "--no-published", "--format", "latex"])
    assert latex.count("\\begin{tabular}") == 4


# -- csv --------------------------------------------------------------------------------------

def test_csv_rows_are_unique_on_the_documented_key(results_dir: Path) -> None:
    text, _ = _cli(["report", "--results", str(results_dir), "--format", "csv"])
    frame = pd.read_csv(io.StringIO(text), keep_default_na=False)
    assert list(frame.columns) == FOLD_CSV_COLUMNS
    key = ["method", "variant", "train_dataset", "dataset", "setting", "fold", "organ"]
    assert not frame.duplicated(key).any()
    # the cross-domain run shares method, dataset, setting, fold and organ with an in-domain one
    assert frame.duplicated(["method", "dataset", "setting", "fold", "organ"]).any()
    assert set(frame["train_dataset"]) == {"abd_mri", "card_mri"}
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    commands.register(parser.add_subparsers())
    help_text = " ".join(parser._subparsers._group_actions[0].choices["report"].format_help().split())
    assert ", ".join(FOLD_CSV_COLUMNS) in help_text


# -- notes and headers ------------------------------------------------------------------------

def test_a_damaged_run_note_shows_the_cell_not_a_repr(tmp_path: Path) -> None:
    run = write_run(tmp_path, "adnet", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.5)),
                                                             ("liver", "2", *counts_for_dice(0.6))])
    cases = pd.read_csv(run / "cases.csv", dtype={"case_id": str})
    cases["dice"] = cases["dice"].astype(object)
    cases.loc[1, "dice"] = ""
    cases.to_csv(run / "cases.csv", index=False)
    (note,) = load_results(tmp_path).notes
    assert "row 3: dice (empty or NaN) is not a number" in note and "np." not in note
    cases.loc[1, "dice"] = 1.5
    cases.to_csv(run / "cases.csv", index=False)
    (note,) = load_results(tmp_path).notes
    assert "dice=1.5 is outside [0, 1]" in note and "np." not in note


def test_comparisons_say_they_are_per_volume_dice(results_dir: Path, tmp_path: Path) -> None:
    # rows typed by their displayed names: the file is named by the records' names all the same
    out = _report(results_dir, tmp_path / "out", compare=[("ADNet", "SSL-ALPNet")])
    assert sorted(p.name for p in (out / "tables").glob("compare_*.md")) == ["compare_adnet_vs_ssl_alpnet.md"]
    compare = (out / "tables" / "compare_adnet_vs_ssl_alpnet.md").read_text(encoding="utf-8")
    assert "A per-volume Dice (95% CI)" in compare and "per-volume Dice %" in compare
    intervals = (out / "tables" / "bootstrap_ci.md").read_text(encoding="utf-8")
    assert "mean per-volume Dice" in intervals
    # the display tables name methods and organs as the figures do; the CSVs keep the keys
    assert "| ADNet |" in intervals and "| Liver |" in intervals and "| adnet |" not in intervals
    assert "| Liver |" in compare
    csv = pd.read_csv(out / "tables" / "bootstrap_ci.csv")
    assert "adnet" in set(csv["method"]) and "liver" in set(csv["organ"])
    assert "Mean per-volume Dice" in (out / "report.html").read_text(encoding="utf-8")


def test_long_variant_labels_give_short_distinct_file_names():
    """A paired comparison's file is named after both labels; a variant labelled by six
    settings used to give a 130-character name."""
    from fsmis_bench.reporting.commands import _slug

    long = "sdfsmis [tiny,method.lr=0.001,random_weights,train.batch_size=4,train.image_size=64,train.steps={}]"
    assert _slug("support_copy") == "support_copy" and _slug("prototype [train.steps=60]") == "prototype-train.steps-60"
    first, second = _slug(long.format(1500)), _slug(long.format(1501))
    assert len(first) == len(second) == 48 and first != second  # differing only at the end
    assert first.startswith("sdfsmis-tiny-method.lr-0.001")


def test_a_rename_that_matches_nothing_is_said_with_the_close_name(results_dir: Path, capsys) -> None:
    assert main(["report", "--results", str(results_dir), "--rename", "adnte=ADNet (ours)",
                 "--rename", "liver=Liver"]) == 0
    err = capsys.readouterr().err
    assert "note: --rename adnte=... matches no method, dataset, organ or backbone of this report; did you mean " \
           "'adnet'?" in err
    assert "--rename liver" not in err  # an organ of the report: renamed, nothing to say


def test_rows_selects_what_the_report_holds(tmp_path: Path, capsys) -> None:
    for method, score in (("prototype", 0.5), ("support_copy", 0.4), ("adnet", 0.6)):
        write_run(tmp_path, method, "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(score))])
    write_run(tmp_path, "prototype", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.55))],
              non_standard=["dice=pooled"], dice="pooled")
    results = load_results(tmp_path)
    # one row as --compare names it (a method alone: its plain row); with *, every row that fits
    chosen = select_rows(results, ["Prototype", "adnet"])
    assert set(zip(chosen.runs["method"], chosen.runs["variant"])) == {("prototype", ""), ("adnet", "")}
    assert set(chosen.cases["method"]) == {"prototype", "adnet"} and set(chosen.fold_scores["method"]) == {"prototype", "adnet"}
    only = select_rows(results, ["prototype [dice=pooled]"])
    assert list(only.runs["variant"]) == ["dice=pooled"]
    every = select_rows(results, ["prototype*"])
    assert set(every.runs["variant"]) == {"", "dice=pooled"} and set(every.runs["method"]) == {"prototype"}
    with pytest.raises(FsmisError, match="--rows 'protoype' names no row") as raised:
        select_rows(results, ["protoype"])
    assert "'prototype'" in raised.value.hint and "'support_copy'" in raised.value.hint
    assert set(select_rows(results, ["SUPPORT  COPY"]).runs["method"]) == {"support_copy"}  # case, spaces
    # a plugin's method named like another's displayed name: refused, not both taken
    write_run(tmp_path, "ADNET", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.3))])
    with pytest.raises(FsmisError, match="names the rows of several methods"):
        select_rows(load_results(tmp_path), ["adnet"])
    from fsmis_bench.cli import main

    assert main(["report", "--results", str(tmp_path), "--rows", "support_copy", "--no-published"]) == 0
    out = capsys.readouterr().out
    assert "Support copy" in out and "Prototype" not in out and "ADNet" not in out
    # a compared row that --rows left out is said as such
    assert main(["report", "--results", str(tmp_path), "--rows", "support_copy", "--compare", "support_copy",
                 "prototype"]) == 2
    assert "--compare names 'prototype', which is not among the rows chosen with --rows" in capsys.readouterr().err
