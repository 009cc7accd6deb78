"""Report statistics: Wilcoxon, rank-biserial effect size, bootstrap intervals, pairing."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from fsmis_bench.errors import FsmisError
from fsmis_bench.reporting import commands
from fsmis_bench.reporting.collect import load_results
from fsmis_bench.reporting.stats import bootstrap_ci, compare, confidence_intervals, default_pairs, rank_biserial
from fsmis_bench.reporting.synthetic import counts_for_dice, write_run


def test_rank_biserial_by_hand() -> None:
    # nonzero d = 1, -2, 3, 4, -5 -> ranks of |d| 1..5; T+ = 1+3+4 = 8, T- = 2+5 = 7
    assert rank_biserial(np.array([1.0, -2.0, 3.0, 4.0, 0.0, -5.0])) == pytest.approx((8 - 7) / 15)
    # ties: |d| = 1, 1, 2 -> ranks 1.5, 1.5, 3; T+ = 1.5 + 3, T- = 1.5
    assert rank_biserial(np.array([1.0, -1.0, 2.0])) == pytest.approx((4.5 - 1.5) / 6)
    assert rank_biserial(np.array([0.3, 0.1, 0.2])) == 1.0
    assert rank_biserial(np.array([-0.3, -0.1])) == -1.0
    assert np.isnan(rank_biserial(np.zeros(4)))


def test_bootstrap_ci_percentile_and_seeded() -> None:
    values = np.random.default_rng(3).normal(70, 8, size=30)
    low, high = bootstrap_ci(values, n_boot=4000, seed=1)
    assert low < values.mean() < high
    assert bootstrap_ci(values, n_boot=4000, seed=1) == (low, high)
    assert bootstrap_ci(values, n_boot=4000, seed=2) != (low, high)
    # the same percentile interval as scipy's implementation, up to resampling noise
    reference = scipy_stats.bootstrap((values,), np.mean, n_resamples=4000, method="percentile",
                                      confidence_level=0.95, random_state=0).confidence_interval
    width = reference.high - reference.low
    assert low == pytest.approx(reference.low, abs=0.1 * width)
    assert high == pytest.approx(reference.high, abs=0.1 * width)
    # by hand: the same resamples through numpy's quantile
    rng = np.random.default_rng(5)
    means = values[rng.integers(0, 30, size=(1000, 30))].mean(axis=1)
    assert bootstrap_ci(values, n_boot=1000, seed=5) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert bootstrap_ci(np.full(10, 0.5), n_boot=200) == (0.5, 0.5)


#: query scans of each fold in the fixture: the folds overlap by one scan (scan 6), as the
#: protocol's do (PROTOCOL.md §2)
FOLD_CASES = {0: ("1", "2", "3", "4", "5", "6"), 1: ("6", "7", "8", "9", "10", "11")}


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two methods on abd_mri folds 0-1 (liver, spleen); scan 6 is a query in both folds; B
    misses scan 6's fold-1 liver; A has 2 seeds on fold 0, B one."""
    root = tmp_path_factory.mktemp("paired")
    rng = np.random.default_rng(0)
    truth: dict[tuple[str, int, str, str], float] = {}
    for fold in range(2):
        for organ in ("liver", "spleen"):
            for case in FOLD_CASES[fold]:
                truth[("a", fold, organ, case)] = round(float(rng.uniform(0.6, 0.9)), 2)
                truth[("b", fold, organ, case)] = round(float(rng.uniform(0.5, 0.85)), 2)
    for fold in range(2):
        for method in ("a", "b"):
            cases = [(organ, case, *counts_for_dice(truth[(method, fold, organ, case)], 10000))
                     for organ in ("liver", "spleen") for case in FOLD_CASES[fold]
                     if not (method == "b" and fold == 1 and organ == "liver" and case == "6")]
            write_run(root, method, "abd_mri", 1, fold, 0, cases)
    # second seed of A on fold 0: liver +0.1 everywhere; B has no seed 1, so it is never paired
    cases = [(organ, case, *counts_for_dice(truth[("a", 0, organ, case)] + (0.1 if organ == "liver" else 0), 10000))
             for organ in ("liver", "spleen") for case in FOLD_CASES[0]]
    write_run(root, "a", "abd_mri", 1, 0, 1, cases)
    write_run(root, "a", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.5))], backbone="sd21")
    for backbone in ("sd15", "sd21"):
        write_run(root, "c", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.4))], backbone=backbone)
    return root, truth


def _raw_cases(root: Path) -> pd.DataFrame:
    """Every cases.csv of the runs without a backbone (methods a and b), as written."""
    return pd.concat([pd.read_csv(p, dtype={"case_id": str}) for p in root.rglob("cases.csv")
                      if '"backbone": "none"' in (p.parent / "run.json").read_text()])


def test_compare_matches_scipy_on_matched_volumes(paired: tuple[Path, dict]) -> None:
    root, truth = paired
    results = load_results(root)
    frame = compare(results, "a", "b", n_boot=500)
    liver = frame[frame["organ"] == "liver"].iloc[0]
    # expected pairs straight from the cases.csv files: only seed 0 is shared (A's seed 1 is
    # left out), matched on (fold, case); then one difference per scan
    raw = _raw_cases(root)
    raw = raw[(raw["organ"] == "liver") & (raw["seed"] == 0)].set_index(["method", "fold", "case_id"])["dice"]
    both = raw["a"].to_frame("a").join(raw["b"].to_frame("b"), how="inner")
    assert len(both) == 11  # 12 (fold, scan) evaluations, one missing in B
    assert liver["n_evaluations"] == 11 and liver["n_pairs"] == 11  # scans 1-11: scan 6 paired in fold 0 only
    assert liver["seeds"] == "seed 0" == liver["B seeds"] and liver["A seeds"] == "fold 0: seeds 0,1; fold 1: seed 0"
    a, b = both["a"].to_numpy(), both["b"].to_numpy()
    # A's values are its seed-0 Dice: the seed-1 run B lacks (liver +0.1) is not averaged in
    assert both.loc[0, "a"].to_numpy() == pytest.approx([truth[("a", 0, "liver", c)] for c in FOLD_CASES[0]], abs=1e-3)
    d = (a - b) * 100
    expected = scipy_stats.wilcoxon(np.round(d, 9))  # wilcoxon_test's rounding: float-noise ties tie
    assert liver["W"] == pytest.approx(expected.statistic)
    assert liver["p"] == pytest.approx(expected.pvalue, rel=1e-6)
    assert liver["rank-biserial r"] == pytest.approx(rank_biserial(d), abs=1e-9)
    assert liver["A mean"] == pytest.approx(np.mean(a) * 100)
    assert liver["A CI low"] < liver["A mean"] < liver["A CI high"]
    assert liver["diff mean"] == pytest.approx(d.mean())
    # all organs: one pair per query scan, its mean over the matched organs and over the
    # folds that evaluated it (scan 6: folds 0 and 1), not 23 organ pairs or 12 volumes
    overall = frame[frame["organ"] == "all"].iloc[0]
    organs = _raw_cases(root)
    organs = organs[organs["seed"] == 0].set_index(["method", "fold", "case_id", "organ"])["dice"]
    organs = organs.unstack("method").dropna()
    volumes = organs.groupby(["fold", "case_id"]).mean()
    assert len(volumes) == 12 and overall["n_evaluations"] == 12
    d_volume = (volumes["a"] - volumes["b"]) * 100
    d_scan = d_volume.groupby("case_id").mean().to_numpy()
    assert len(d_scan) == 11 and overall["n_pairs"] == 11
    expected = scipy_stats.wilcoxon(np.round(d_scan, 9))
    assert overall["W"] == pytest.approx(expected.statistic)
    assert overall["p"] == pytest.approx(expected.pvalue, rel=1e-6)
    assert overall["rank-biserial r"] == pytest.approx(rank_biserial(d_scan), abs=1e-9)
    assert overall["diff mean"] == pytest.approx(d_volume.mean())  # the mean stays over the 12 evaluations


def test_compare_resolves_variants(paired: tuple[Path, dict]) -> None:
    results = load_results(Path(paired[0]))
    with pytest.raises(FsmisError, match="several variants"):
        compare(results, "c", "b", n_boot=10)
    with pytest.raises(FsmisError, match="no finished runs"):
        compare(results, "zeta", "b", n_boot=10)
    frame = compare(results, "a [sd21]", "b", n_boot=10)
    assert frame["n_pairs"].tolist() == [1, 1]


def test_default_pairs_and_intervals(paired: tuple[Path, dict]) -> None:
    results = load_results(Path(paired[0]))
    assert default_pairs(results) == [("a", "a [sd21]"), ("a", "b"), ("a", "c [sd15]"), ("a", "c [sd21]")]
    intervals = confidence_intervals(results, n_boot=200)
    row = intervals[(intervals["method"] == "b") & (intervals["organ"] == "liver")].iloc[0]
    assert row["n_volumes"] == 11 and row["CI low"] <= row["mean"] <= row["CI high"]
    # A's liver: 12 (fold, scan) evaluations of 11 scans (scan 6 is a query in both folds)
    row = intervals[(intervals["method"] == "a") & (intervals["organ"] == "liver")].iloc[0]
    assert (row["n_volumes"], row["n_evaluations"]) == (11, 12)


def test_cli_compare(paired: tuple[Path, dict]) -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["report", "--results", str(paired[0]), "--compare", "a", "b", "--n-boot", "200"])
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert args.func(args) == 0
    text = buffer.getvalue()
    assert "A = a, B = b" in text and "| Abd-MRI | 1 | Liver | 11 | 0 |" in text and "r_rb" in text  # as in the figures
