"""Statistics the papers do not report: paired tests and bootstrap intervals.

Two methods are compared over the same query volumes: rows matched on (train dataset,
test dataset, setting, fold, organ, case id), Dice averaged over seeds first. Per organ:
the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, zero differences dropped), the
matched-pairs rank-biserial correlation as effect size, the number of pairs, and percentile
bootstrap 95 % intervals of each method's mean Dice and of the mean difference.

The ``all`` row pairs query volumes, each with its mean Dice over the organs matched in it:
the organs of one volume share the scan and the support, so counting each organ of a
volume as a pair of its own would treat correlated differences as independent and
overstate the evidence (four organs of four volumes are four pairs, not sixteen).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from ..errors import FsmisError
from .collect import Results, eval_label, organ_sort_key, per_case_scores, row_label, run_flags
from .style import method_label, organ_display

PAIR_KEYS = ["train_dataset", "dataset", "setting", "fold", "organ", "case_id"]


def _tie_rounded(differences: np.ndarray) -> np.ndarray:
    """Differences (Dice points) rounded to 1e-9, so that equal ones reached by other float
    paths tie (:func:`wilcoxon_test`)."""
    return np.round(np.asarray(differences, dtype=float), 9)


def rank_biserial(differences: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation ``(T+ - T-) / (T+ + T-)``.

    Zero differences are dropped (as the Wilcoxon test does); ranks of ``|d|`` use average
    ranks for ties, after the rounding of :func:`wilcoxon_test`. +1: A beats B on every
    pair, -1: B beats A on every pair.

    Args:
        differences: ``(N,)`` paired differences A - B.
    """
    d = _tie_rounded(differences)
    d = d[d != 0]
    if d.size == 0:
        return float("nan")
    ranks = scipy_stats.rankdata(np.abs(d))
    positive, negative = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((positive - negative) / (positive + negative))


def bootstrap_ci(
    values: np.ndarray, n_boot: int = 10000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean.

    Args:
        values: ``(N,)`` one value per query volume (or per pair, for differences).
        n_boot: resamples.
        level: coverage, e.g. 0.95.
        seed: the resampling is reproducible for a given seed.
    Returns:
        (low, high); NaNs for an empty input.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    # chunks keep memory bounded for large N
    chunk = max(1, 2_000_000 // x.size)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def wilcoxon_test(differences: np.ndarray) -> tuple[float, float]:
    """(statistic, two-sided p) of the signed-rank test; NaNs when it is undefined.

    The differences are rounded to 1e-9 (Dice points) first: equal differences reached by
    other float paths (a mean over organs, over seeds) then tie, as they do, and scipy
    picks its tie handling from the data rather than from rounding noise.
    """
    d = _tie_rounded(differences)
    if np.count_nonzero(d) == 0:
        return float("nan"), float("nan")
    result = scipy_stats.wilcoxon(d)
    return float(result.statistic), float(result.pvalue)


def labels(per_case: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted({(m, v) for m, v in zip(per_case["method"], per_case["variant"])})


def _squeezed(text: str) -> str:
    return re.sub(r"\s+", "", text)


def resolve(per_case: pd.DataFrame, spec: str) -> tuple[str, str]:
    """``method`` or ``method [variant]`` (spaces optional) -> (method, variant); also the
    name the tables and figures show (``SD-FSMIS (SII+QE) [tiny]``), where it names one.

    Raises:
        FsmisError: unknown, or a name with several variants.
    """
    known = labels(per_case)
    wanted = _squeezed(spec)
    for method, variant in known:
        if _squeezed(row_label(method, variant)) == wanted:
            return method, variant
    shown = [(m, v) for m, v in known if _squeezed(method_label(m, v)) == wanted]
    if len(shown) == 1:
        return shown[0]
    candidates = shown or [(m, v) for m, v in known if m == wanted]
    choices = ", ".join(repr(row_label(m, v)) for m, v in known) or "none"
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FsmisError(f"no finished runs of {spec!r} in the results", hint=f"choose one of {choices}")
    raise FsmisError(
        f"{spec!r} has several variants that must not be mixed",
        hint="name one: " + ", ".join(repr(row_label(m, v)) for m, v in candidates),
    )


def compare(
    results: Results, a: str, b: str, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """Per evaluation and organ (and ``all``: per query volume, its mean over organs):
    paired statistics of A vs B.

    Dice values in the frame are percent. Returns an empty frame when A and B share no
    query volume.
    """
    per_case = per_case_scores(results)
    key_a, key_b = resolve(per_case, a), resolve(per_case, b)
    if key_a == key_b:
        raise FsmisError(f"{a!r} and {b!r} name the same runs", hint="compare two different methods or variants")
    side_a = per_case[(per_case["method"] == key_a[0]) & (per_case["variant"] == key_a[1])]
    side_b = per_case[(per_case["method"] == key_b[0]) & (per_case["variant"] == key_b[1])]
    pairs = side_a[[*PAIR_KEYS, "dice"]].merge(side_b[[*PAIR_KEYS, "dice"]], on=PAIR_KEYS, suffixes=("_a", "_b"))
    rows = []
    for (train, test, setting), evaluation in pairs.groupby(["train_dataset", "dataset", "setting"], sort=True):
        organs = sorted(evaluation["organ"].unique(), key=organ_sort_key)
        for organ in [*organs, "all"]:
            if organ == "all":  # one pair per query volume (module docstring)
                subset = evaluation.groupby(["fold", "case_id"], sort=True)[["dice_a", "dice_b"]].mean()
            else:
                subset = evaluation[evaluation["organ"] == organ]
            dice_a = subset["dice_a"].to_numpy(dtype=float) * 100
            dice_b = subset["dice_b"].to_numpy(dtype=float) * 100
            diff = dice_a - dice_b
            statistic, p_value = wilcoxon_test(diff)
            ci_a = bootstrap_ci(dice_a, n_boot, level, seed)
            ci_b = bootstrap_ci(dice_b, n_boot, level, seed)
            ci_d = bootstrap_ci(diff, n_boot, level, seed)
            rows.append({
                "A": row_label(*key_a), "B": row_label(*key_b),
                "evaluation": eval_label(train, test), "setting": int(setting), "organ": organ,
                "n_pairs": int(len(diff)),
                "A mean": float(dice_a.mean()), "A CI low": ci_a[0], "A CI high": ci_a[1],
                "B mean": float(dice_b.mean()), "B CI low": ci_b[0], "B CI high": ci_b[1],
                "diff mean": float(diff.mean()), "diff CI low": ci_d[0], "diff CI high": ci_d[1],
                "W": statistic, "p": p_value, "rank-biserial r": rank_biserial(diff),
            })
    return pd.DataFrame(rows, columns=[
        "A", "B", "evaluation", "setting", "organ", "n_pairs", "A mean", "A CI low", "A CI high",
        "B mean", "B CI low", "B CI high", "diff mean", "diff CI low", "diff CI high", "W", "p",
        "rank-biserial r",
    ])


def confidence_intervals(results: Results, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per method variant, evaluation, setting and organ: mean Dice (%) over query volumes
    with its percentile bootstrap interval."""
    per_case = per_case_scores(results)
    rows = []
    keys = ["method", "variant", "train_dataset", "dataset", "setting", "organ"]
    for (method, variant, train, test, setting, organ), group in per_case.groupby(keys, sort=True):
        dice = group["dice"].to_numpy(dtype=float) * 100
        low, high = bootstrap_ci(dice, n_boot, level, seed)
        rows.append({
            "method": row_label(method, variant), "evaluation": eval_label(train, test), "setting": int(setting),
            "organ": organ, "n_volumes": int(dice.size), "mean": float(dice.mean()), "CI low": low, "CI high": high,
        })
    frame = pd.DataFrame(rows, columns=["method", "evaluation", "setting", "organ", "n_volumes", "mean", "CI low", "CI high"])
    if not frame.empty:
        frame["_o"] = frame["organ"].map(organ_sort_key)
        frame = frame.sort_values(["evaluation", "setting", "method", "_o"]).drop(columns="_o").reset_index(drop=True)
    return frame


def default_pairs(results: Results) -> list[tuple[str, str]]:
    """The report's comparisons: a reference variant against every other variant it shares
    query volumes with.

    The reference is the unmarked variant (no random weights, no non-standard option)
    evaluated on the most (evaluation, setting, organ) combinations, ties broken by the
    higher mean per-volume Dice; so it is the broadest comparison, not a cherry-pick.
    """
    per_case = per_case_scores(results)
    if per_case.empty:
        return []
    flags = run_flags(results)
    clean = {(m, v) for m, v, r, ns in zip(flags["method"], flags["variant"], flags["random_weights"], flags["non_standard"])
             if not r and not ns}
    grouped = per_case.groupby(["method", "variant"])
    coverage = grouped.apply(lambda g: len(g[["train_dataset", "dataset", "setting", "organ"]].drop_duplicates()))
    means = grouped["dice"].mean()
    candidates = [key for key in means.index if key in clean] or list(means.index)
    best = max(candidates, key=lambda key: (coverage[key], means[key]))
    pairs = []
    best_cases = per_case[(per_case["method"] == best[0]) & (per_case["variant"] == best[1])][PAIR_KEYS]
    for key in means.index:
        if key == best:
            continue
        other = per_case[(per_case["method"] == key[0]) & (per_case["variant"] == key[1])][PAIR_KEYS]
        if not best_cases.merge(other, on=PAIR_KEYS).empty:
            pairs.append((row_label(*best), row_label(*key)))
    return pairs


#: display headers of a paired comparison. The values are per-volume Dice whatever the
#: variants' ``protocol.dice`` (a ``[dice=pooled]`` variant's table score is pooled, but
#: pairs are single volumes), so the headers say so.
COMPARE_HEADERS = ("A per-volume Dice (95% CI)", "B per-volume Dice (95% CI)", "A − B (95% CI)")
#: display headers of the bootstrap intervals (:func:`format_intervals`)
INTERVAL_HEADERS = {"mean": "mean per-volume Dice", "CI low": "95% CI low", "CI high": "95% CI high"}


def shown_row_label(label: str) -> str:
    """``sdfsmis_qe [tiny]`` (a :func:`row_label`) as the figures name it: ``SD-FSMIS (SII+QE) [tiny]``."""
    method, _, variant = label.partition(" [")
    return method_label(method, variant[:-1] if variant.endswith("]") else variant)


def shown_row_labels(keys: Sequence[str]) -> dict[str, str]:
    """:func:`row_label` -> :func:`shown_row_label` for several rows shown together without
    footnote marks: where two rows would show alike (a random-weights variant beside the
    standard run, which tables and figures tell apart by a marker), those keep their
    record labels, so that no two rows read the same."""
    shown = {key: shown_row_label(key) for key in dict.fromkeys(keys)}
    counts = Counter(shown.values())
    return {key: text if counts[text] == 1 else key for key, text in shown.items()}


def format_intervals(frame: pd.DataFrame) -> pd.DataFrame:
    """Display form of :func:`confidence_intervals`: methods and organs named as in the
    figures (:func:`shown_row_labels`), and headers that say the means are of per-volume
    Dice (also for ``[dice=pooled]`` variants). The CSV keeps the registry names."""
    names = shown_row_labels(list(frame["method"]))
    shown = frame.assign(method=frame["method"].map(names), organ=frame["organ"].map(organ_display))
    return shown.rename(columns=INTERVAL_HEADERS)


def format_compare(frame: pd.DataFrame) -> pd.DataFrame:
    """Display form: ``mean [low, high]`` strings (per-volume Dice %), p in scientific notation."""
    def interval(mean: float, low: float, high: float) -> str:
        return f"{mean:.2f} [{low:.2f}, {high:.2f}]"

    a_header, b_header, diff_header = COMPARE_HEADERS
    if frame.empty:
        return pd.DataFrame(columns=["evaluation", "setting", "organ", "n", a_header, b_header, diff_header, "W", "p", "r_rb"])
    return pd.DataFrame({
        "evaluation": frame["evaluation"], "setting": frame["setting"].astype(str),
        "organ": [organ if organ == "all" else organ_display(organ) for organ in frame["organ"]],
        "n": frame["n_pairs"].astype(str),
        a_header: [interval(*v) for v in zip(frame["A mean"], frame["A CI low"], frame["A CI high"])],
        b_header: [interval(*v) for v in zip(frame["B mean"], frame["B CI low"], frame["B CI high"])],
        diff_header: [interval(*v) for v in zip(frame["diff mean"], frame["diff CI low"], frame["diff CI high"])],
        "W": ["–" if math.isnan(w) else f"{w:g}" for w in frame["W"]],
        "p": ["–" if math.isnan(p) else f"{p:.3g}" for p in frame["p"]],
        "r_rb": ["–" if math.isnan(r) else f"{r:+.3f}" for r in frame["rank-biserial r"]],
    })
