"""Paired comparisons pair the same seeds; intervals resample scans; absent volumes are footnoted;
``fold_organ_scores`` never pools seeds.

Every expectation is computed here from the Dice values the test writes, not read back from
the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from fsmis_bench.protocol import dice_from_counts, fold_organ_scores
from fsmis_bench.reporting.collect import load_results
from fsmis_bench.reporting.commands import write_report
from fsmis_bench.reporting.stats import (
    bootstrap_ci,
    compare,
    comparison_notes,
    confidence_intervals,
    default_pairs,
)
from fsmis_bench.reporting.synthetic import write_run
from fsmis_bench.reporting.tables import main_table

CASES = ("1", "2", "3", "4", "5")


def _dice_counts(dice: float) -> tuple[int, int, int]:
    """TP/FP/FN whose Dice is ``dice`` to the voxel: 2tp / (2tp + 2e), tp = 1000 dice."""
    tp = int(round(1000 * dice))
    return tp, 1000 - tp, 1000 - tp


def _dice(dice: float) -> float:
    """The Dice that ``_dice_counts(dice)`` writes into cases.csv."""
    tp, fp, fn = _dice_counts(dice)
    return 2 * tp / (2 * tp + fp + fn)


def _write(root: Path, method: str, fold: int, seed: int, values: dict[str, float], **kwargs) -> None:
    write_run(root, method, "abd_mri", 1, fold, seed,
              [("liver", case, *_dice_counts(value)) for case, value in values.items()], **kwargs)


# -- finding 1: seeds --------------------------------------------------------------------

def _a_values(seed: int) -> dict[str, float]:
    """A's liver Dice per case: seed 0 near 0.5, every further seed 0.15 higher (a training
    effect much larger than the difference between the methods)."""
    return {case: 0.50 + 0.02 * i + 0.15 * seed for i, case in enumerate(CASES)}


def _b_values() -> dict[str, float]:
    return {case: 0.52 + 0.03 * i for i, case in enumerate(CASES)}


def test_a_three_seed_row_is_paired_with_a_one_seed_row_on_the_shared_seed(tmp_path: Path) -> None:
    for seed in (0, 1, 2):
        _write(tmp_path, "a", 0, seed, _a_values(seed))
    _write(tmp_path, "b", 0, 0, _b_values())
    results = load_results(tmp_path)
    row = compare(results, "a", "b", n_boot=200).set_index("organ").loc["liver"]

    # by hand: seed 0 of A against seed 0 of B; A's seeds 1 and 2 (B has none) stay out
    a = np.array([_dice(v) for v in _a_values(0).values()]) * 100
    b = np.array([_dice(v) for v in _b_values().values()]) * 100
    assert row["A mean"] == pytest.approx(a.mean())
    assert row["B mean"] == pytest.approx(b.mean())
    assert row["diff mean"] == pytest.approx((a - b).mean())
    assert row["p"] == pytest.approx(scipy_stats.wilcoxon(np.round(a - b, 9)).pvalue)
    # the seed mean of A (what was paired before) would have put A ahead by ~11 points, not behind
    seed_mean = np.mean([[_dice(v) for v in _a_values(s).values()] for s in (0, 1, 2)], axis=0) * 100
    assert (seed_mean - b).mean() > 10 and row["diff mean"] < 0
    assert (row["n_pairs"], row["seeds"], row["A seeds"], row["B seeds"]) == (5, "seed 0", "seeds 0,1,2", "seed 0")

    notes = comparison_notes(results, "a", "b")
    assert len(notes) == 1
    assert "seed sets differ (A: seeds 0,1,2; B: seed 0)" in notes[0] and "(seed 0)" in notes[0]
    assert "left out: A's fold 0: seeds 1,2" in notes[0]


def test_folds_and_evaluations_only_one_side_ran_are_said_to_be_left_out(tmp_path: Path) -> None:
    for fold in (0, 1):
        _write(tmp_path, "a", fold, 0, _a_values(0))
    _write(tmp_path, "b", 0, 0, _b_values())
    write_run(tmp_path, "a", "card_mri", 1, 0, 0, [("lv_bp", "1", *_dice_counts(0.5))])
    results = load_results(tmp_path)
    row = compare(results, "a", "b", n_boot=50).set_index("organ").loc["liver"]
    assert row["n_evaluations"] == len(CASES)  # fold 0's volumes only
    notes = comparison_notes(results, "a", "b")
    assert "Abd-MRI setting 1: not paired, the other side did not evaluate them: A's fold 1" in notes
    assert "Card-MRI setting 1: only A evaluated it: not compared" in notes


def test_rows_that_share_no_seed_are_not_compared(tmp_path: Path) -> None:
    _write(tmp_path, "a", 0, 1, _a_values(1))
    _write(tmp_path, "b", 0, 0, _b_values())
    results = load_results(tmp_path)
    assert compare(results, "a", "b", n_boot=50).empty
    (note,) = comparison_notes(results, "a", "b")
    assert "not compared" in note and "A (seed 1) and B (seed 0)" in note and "share no training seed" in note
    pair_notes: list[str] = []
    assert default_pairs(results, pair_notes) == []
    assert pair_notes == ["b is not compared with a: they evaluated the same query volumes but share no training seed"]

    # an explicit --compare writes the note, and no p-value, under an empty table
    out = write_report(tmp_path, tmp_path / "report", compare=[("a", "b")], n_boot=50, log=lambda _: None)
    text = (out / "tables" / "compare_a_vs_b.md").read_text(encoding="utf-8")
    assert "share no training seed" in text and "| Abd-MRI |" not in text
    assert "p is over volumes and does not include training variance across seeds" in text


def test_default_pairs_skip_a_pooled_dice_reevaluation_of_the_same_runs(tmp_path: Path) -> None:
    for seed in (0, 1):
        _write(tmp_path, "a", 0, seed, _a_values(seed))
    # `eval protocol.dice=pooled` of seed 0: the same masks, so the same per-volume Dice
    _write(tmp_path, "a", 0, 0, _a_values(0), dice="pooled", non_standard=["dice=pooled"])
    _write(tmp_path, "b", 0, 0, _b_values())
    results = load_results(tmp_path)
    pair_notes: list[str] = []
    assert default_pairs(results, pair_notes) == [("a", "b")]
    assert len(pair_notes) == 1 and pair_notes[0].startswith("a [dice=pooled] is not compared with a:")
    # asked for explicitly, the pair has equal Dice on every volume: no test, and a note why
    row = compare(results, "a", "a [dice=pooled]", n_boot=50).set_index("organ").loc["liver"]
    assert row["diff mean"] == 0 and np.isnan(row["p"]) and row["seeds"] == "seed 0"
    assert any("differ only in how a fold's score aggregates" in n for n in comparison_notes(results, "a", "a [dice=pooled]"))


# -- finding 2: scans evaluated in two folds ------------------------------------------------

def test_cluster_bootstrap_draws_whole_scans() -> None:
    # scan x evaluated twice (0 and 1), scan y once (10). Whole scans drawn: the resample
    # means are 0.5 (x, x), 11/3 (x, y) and 10 (y, y), a quarter of the draws each at the ends
    values, scans = np.array([0.0, 1.0, 10.0]), ["x", "x", "y"]
    assert bootstrap_ci(values, n_boot=4000, seed=3, clusters=scans) == pytest.approx((0.5, 10.0))
    # drawn as three independent volumes, all three can be 0: (0 + 0 + 0) / 3 with p = 1/27
    assert bootstrap_ci(values, n_boot=4000, seed=3)[0] == 0.0
    # one value per cluster: the plain bootstrap, to the bit
    singles = np.random.default_rng(1).uniform(0, 1, 9)
    assert bootstrap_ci(singles, 500, seed=4, clusters=list("abcdefghi")) == bootstrap_ci(singles, 500, seed=4)


def test_intervals_count_and_resample_scans(tmp_path: Path) -> None:
    fold_cases = {0: ("1", "2", "3"), 1: ("3", "4", "5")}  # scan 3 is a query in both folds
    values = {0: {"1": 0.5, "2": 0.6, "3": 0.7}, 1: {"3": 0.8, "4": 0.55, "5": 0.65}}
    for fold, cases in fold_cases.items():
        _write(tmp_path, "a", fold, 0, {case: values[fold][case] for case in cases})
    row = confidence_intervals(load_results(tmp_path), n_boot=300).iloc[0]
    assert (row["n_volumes"], row["n_evaluations"]) == (5, 6)
    dice = [_dice(values[fold][case]) * 100 for fold in (0, 1) for case in fold_cases[fold]]
    assert row["mean"] == pytest.approx(np.mean(dice))
    scans = [case for fold in (0, 1) for case in fold_cases[fold]]
    # rows in the frame's order (fold, case id as text): 1, 2, 3 | 3, 4, 5
    assert (row["CI low"], row["CI high"]) == pytest.approx(bootstrap_ci(np.array(dice), 300, clusters=scans))


# -- finding 3: absent volumes ------------------------------------------------------------

def test_a_cell_without_absent_volumes_says_how_many_and_why(tmp_path: Path) -> None:
    present = {"1": 0.7, "2": 0.8, "4": 0.75}  # scan 3 shows no liver: no row, listed as absent
    for method, shift in (("a", 0.0), ("b", 0.05)):
        for fold in range(5):  # every fold: complete rows, which compete for best
            _write(tmp_path, method, fold, 0, {c: v - shift for c, v in present.items()},
                   absent={"liver": ["3"]} if fold == 0 else None)
    results = load_results(tmp_path)
    assert sorted(results.absent["method"]) == ["a", "b"]
    table = main_table(results, include_published=False)
    measured = [row for row in table.rows if row.source == "measured"]
    assert all("absent" in row.markers for row in measured)
    legend = dict(table.legend())["absent"]
    assert "does not show the organ" in legend
    assert "a, Abd-MRI setting 1, Liver: 1 query volume left out (fold 0: scan 3)" in legend
    # the same data leaves the scan out of every method alike: the rows still compete
    assert table.ranks()  # a (higher) is best, b second
    out = write_report(tmp_path, tmp_path / "report", n_boot=50, include_published=False, log=lambda _: None)
    markdown = (out / "tables" / "main.md").read_text(encoding="utf-8")
    assert "° query volumes left out" in markdown and "(fold 0: scan 3)" in markdown
    assert "Liver: 1 query volume left out (fold 0: scan 3): the scan shows no Liver" in (
        out / "tables" / "bootstrap_ci.md").read_text(encoding="utf-8")


# -- finding 4: fold_organ_scores and seeds -------------------------------------------------

def _rows(seed: int, counts: list[tuple[int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame([
        {"method": "m", "dataset": "d", "train_dataset": "d", "setting": 1, "fold": 0, "seed": seed, "organ": "liver",
         "case_id": str(i), "dice": dice_from_counts(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn}
        for i, (tp, fp, fn) in enumerate(counts)
    ])


def test_fold_organ_scores_scores_each_seed_then_averages() -> None:
    seed0 = [(90, 10, 0), (1, 0, 9)]
    seed1 = [(10, 80, 80), (50, 0, 0)]
    rows = pd.concat([_rows(0, seed0), _rows(1, seed1)], ignore_index=True)
    pooled = fold_organ_scores(rows, "pooled").iloc[0]

    def pooled_dice(counts: list[tuple[int, int, int]]) -> float:
        tp, fp, fn = (sum(c[i] for c in counts) for i in range(3))
        return 2 * tp / (2 * tp + fp + fn)

    assert pooled["dice"] == pytest.approx((pooled_dice(seed0) + pooled_dice(seed1)) / 2)
    assert pooled["dice"] != pytest.approx(pooled_dice(seed0 + seed1))  # what pooling the seeds gave
    assert pooled["n_seeds"] == 2
    per_volume = fold_organ_scores(rows, "per_volume").iloc[0]
    assert per_volume["dice"] == pytest.approx(rows["dice"].mean()) and per_volume["n_seeds"] == 2
    # an in-domain and a cross-domain run on the same test dataset stay two rows
    cross = _rows(0, seed1).assign(train_dataset="other")
    assert len(fold_organ_scores(pd.concat([_rows(0, seed0), cross]), "pooled")) == 2


def test_fold_organ_scores_of_one_seed_are_unchanged() -> None:
    rows = _rows(0, [(90, 10, 0), (1, 0, 9), (33, 7, 12)])
    assert fold_organ_scores(rows, "per_volume")["dice"].item() == rows["dice"].mean()
    tp, fp, fn = rows["tp"].sum(), rows["fp"].sum(), rows["fn"].sum()
    assert fold_organ_scores(rows, "pooled")["dice"].item() == dice_from_counts(tp, fp, fn)
    # rows without a seed column (the documented minimum) score as one run
    assert fold_organ_scores(rows.drop(columns=["seed", "train_dataset"]), "pooled")["dice"].item() == \
        dice_from_counts(tp, fp, fn)
