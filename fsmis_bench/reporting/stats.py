"""Statistics the papers do not report: paired tests and bootstrap intervals.

Two methods are compared over the same query volumes *and the same training seeds*: rows
matched on (train dataset, test dataset, setting, fold, seed, organ, case id), then each
volume's Dice averaged over the seeds both sides share (:func:`pair_volumes`). A volume's
mean over three seeds beside another method's single seed would differ by training variance
as well as by method; where the seed sets differ only the shared seeds are paired and the
comparison says so, and where none is shared there is no comparison.

The unit of every test and interval is the query scan. The folds of the protocol overlap
by one scan (PROTOCOL.md §2: abd_mri scan 4 is a query in folds 0 and 1, scan 0 in folds
0 and 4), so a scan can be evaluated twice, by two models with two supports; those two
evaluations share the anatomy and are not independent. So the Wilcoxon signed-rank test
(``scipy.stats.wilcoxon``, zero differences dropped) and the matched-pairs rank-biserial
correlation take one pair per scan (its differences averaged over the folds that evaluated
it), ``n_pairs`` counts scans, and the percentile bootstrap 95 % intervals resample scans
(all evaluations of a scan together, :func:`bootstrap_ci` with ``clusters``) while the means
stay the means over the paired (fold, scan) evaluations.

The ``all`` row pairs query volumes, each with its mean Dice over the organs matched in it:
the organs of one volume share the scan and the support, so counting each organ of a
volume as a pair of its own would treat correlated differences as independent and
overstate the evidence (four organs of four volumes are four pairs, not sixteen).

A p-value here is over volumes: it says how consistently A beats B on these volumes with
these trained models, not whether another training run would agree (training variance
across seeds is not in it).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from ..errors import FsmisError
from .collect import Results, eval_label, organ_sort_key, per_case_scores, row_label, run_flags, seeds_text
from .style import method_label, organ_display

#: one query volume of one evaluation
PAIR_KEYS = ["train_dataset", "dataset", "setting", "fold", "organ", "case_id"]
#: one query volume as one trained model segmented it: what two sides pair on
SEED_PAIR_KEYS = [*PAIR_KEYS, "seed"]
EVALUATION_KEYS = ["train_dataset", "dataset", "setting"]

#: variant parts (non-standard options) that change how a fold's score aggregates its
#: volumes but no volume's Dice: ``protocol.dice=pooled`` re-evaluates the same masks. Two
#: variants that differ only in these have equal per-volume Dice by construction, so
#: :func:`default_pairs` does not compare them.
PER_VOLUME_NEUTRAL_OPTIONS = frozenset({"dice=pooled"})


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
    values: np.ndarray, n_boot: int = 10000, level: float = 0.95, seed: int = 0,
    clusters: Sequence[object] | np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean.

    With ``clusters`` the resampling unit is the cluster (a query scan): whole clusters are
    drawn with replacement and each resample's mean is the mean over all the values of the
    clusters drawn. A scan evaluated in two folds (the folds overlap, PROTOCOL.md §2) then
    counts as one draw, not as two independent volumes, which would make the interval too
    narrow. When every cluster holds one value this is the plain bootstrap, bit for bit.

    Args:
        values: ``(N,)`` one value per query volume (or per pair, for differences).
        n_boot: resamples.
        level: coverage, e.g. 0.95.
        seed: the resampling is reproducible for a given seed.
        clusters: ``(N,)`` the cluster of each value (e.g. its case id); None: every value
            its own.
    Returns:
        (low, high); NaNs for an empty input.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    if clusters is not None:
        labels_of = pd.factorize(pd.Series(list(clusters)))[0]
        if len(labels_of) != x.size:
            raise ValueError(f"{len(labels_of)} cluster labels for {x.size} values")
        n_clusters = int(labels_of.max()) + 1
    if clusters is None or n_clusters == x.size:
        # chunks keep memory bounded for large N
        chunk = max(1, 2_000_000 // x.size)
        for start in range(0, n_boot, chunk):
            stop = min(n_boot, start + chunk)
            idx = rng.integers(0, x.size, size=(stop - start, x.size))
            means[start:stop] = x[idx].mean(axis=1)
    else:
        sums = np.bincount(labels_of, weights=x, minlength=n_clusters)
        counts = np.bincount(labels_of, minlength=n_clusters).astype(float)
        chunk = max(1, 2_000_000 // n_clusters)
        for start in range(0, n_boot, chunk):
            stop = min(n_boot, start + chunk)
            idx = rng.integers(0, n_clusters, size=(stop - start, n_clusters))
            means[start:stop] = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
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


def _seed_sets_text(per_fold: dict[int, tuple[int, ...]]) -> str:
    """``seeds 0,1`` where every fold has the same seeds, else which folds have which
    (:func:`~.collect.seeds_text`); ``none`` for no fold."""
    if not per_fold:
        return "none"
    distinct = set(per_fold.values())
    if len(distinct) == 1:
        (seeds,) = distinct
        return f"seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"
    return seeds_text(per_fold)


def _on_folds(frame: pd.DataFrame, evaluation: tuple, folds: set[int]) -> pd.DataFrame:
    """The rows of ``frame`` in one evaluation (train_dataset, dataset, setting) and ``folds``."""
    train, test, setting = evaluation
    return frame[(frame["train_dataset"] == train) & (frame["dataset"] == test) & (frame["setting"] == setting)
                 & frame["fold"].isin(folds)]


def _seeds_by_fold(frame: pd.DataFrame) -> dict[int, tuple[int, ...]]:
    return {int(fold): tuple(sorted({int(s) for s in group["seed"]})) for fold, group in frame.groupby("fold")}


@dataclass
class Pairing:
    """The query volumes two rows (method variants) share, at the seeds they share.

    Attributes:
        pairs: one row per (evaluation, fold, organ, case id) with ``dice_a``, ``dice_b``
            (0..1, each the mean over the shared seeds) and ``seeds`` (those seeds, ``0,1``).
        seeds: evaluation (train_dataset, dataset, setting) -> ``{"used": ..., "A": ...,
            "B": ...}``: the seeds paired and the seeds each side has on the shared folds, as
            text (``seeds 0,1`` or ``fold 0: seeds 0,1; fold 4: seed 0``).
        notes: per evaluation, where the seed sets differ (which seeds were left out) or
            share no seed (not compared).
    """

    pairs: pd.DataFrame
    seeds: dict[tuple, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def pair_volumes(results: Results, key_a: tuple[str, str], key_b: tuple[str, str]) -> Pairing:
    """Match A's and B's per-case rows on (evaluation, fold, seed, organ, case id).

    A volume is paired only at the seeds both sides ran: seed ``s`` of A against seed ``s``
    of B (the same fold's training set and support, another method), then averaged over
    those seeds. Seeds that only one side ran are left out and said in :attr:`Pairing.notes`;
    an evaluation whose shared volumes share no seed is not compared (no pairs), and the
    notes say that too, rather than pairing one training of A with another of B.

    Args:
        key_a, key_b: (method, variant) of each side (:func:`resolve`).
    """
    cases = results.cases
    columns = [*PAIR_KEYS, "dice_a", "dice_b", "seeds"]
    if cases.empty:
        return Pairing(pd.DataFrame(columns=columns))

    def side(key: tuple[str, str]) -> pd.DataFrame:
        rows = cases[(cases["method"] == key[0]) & (cases["variant"] == key[1])]
        return rows.groupby(SEED_PAIR_KEYS, sort=True)["dice"].mean().reset_index()

    side_a, side_b = side(key_a), side(key_b)
    matched = side_a.merge(side_b, on=SEED_PAIR_KEYS, suffixes=("_a", "_b"))
    shared_volumes = side_a[PAIR_KEYS].drop_duplicates().merge(side_b[PAIR_KEYS].drop_duplicates(), on=PAIR_KEYS)
    seeds: dict[tuple, dict[str, str]] = {}
    notes: list[str] = _unpaired_notes(side_a, side_b, shared_volumes)
    for evaluation, volumes in shared_volumes.groupby(EVALUATION_KEYS, sort=True):
        train, test, setting = evaluation
        where = f"{eval_label(train, test)} setting {int(setting)}"
        folds = set(volumes["fold"])
        seeds_a, seeds_b, used = (_seeds_by_fold(_on_folds(frame, evaluation, folds))
                                  for frame in (side_a, side_b, matched))
        if not used:
            notes.append(f"{where}: not compared: A ({_seed_sets_text(seeds_a)}) and B ({_seed_sets_text(seeds_b)}) "
                         "evaluated the same query volumes but share no training seed, and pairing one training "
                         "of A with another of B would count training variance as a difference between them; "
                         "run a seed that both have")
            continue
        seeds[tuple(evaluation)] = {"used": _seed_sets_text(used), "A": _seed_sets_text(seeds_a),
                                    "B": _seed_sets_text(seeds_b)}
        if seeds_a != used or seeds_b != used:
            unpaired = sorted(folds - set(used))
            left_out = []
            for name, own in (("A", seeds_a), ("B", seeds_b)):
                extra = {fold: tuple(s for s in own[fold] if s not in used.get(fold, ())) for fold in own}
                extra = {fold: seeds for fold, seeds in extra.items() if seeds}
                if extra:
                    left_out.append(f"{name}'s {seeds_text(extra)}")
            notes.append(f"{where}: the seed sets differ (A: {_seed_sets_text(seeds_a)}; B: "
                         f"{_seed_sets_text(seeds_b)}), so only the shared ones are paired ({_seed_sets_text(used)})"
                         + (f"; left out: {', '.join(left_out)}" if left_out else "")
                         + (f" (fold{'s' if len(unpaired) > 1 else ''} {','.join(map(str, unpaired))}: no shared "
                            "seed, its volumes not compared)" if unpaired else ""))
    if matched.empty:
        return Pairing(pd.DataFrame(columns=columns), seeds, notes)
    pairs = (matched.groupby(PAIR_KEYS, sort=True)
             .agg(dice_a=("dice_a", "mean"), dice_b=("dice_b", "mean"),
                  seeds=("seed", lambda s: ",".join(str(v) for v in sorted({int(x) for x in s}))))
             .reset_index())
    return Pairing(pairs[columns], seeds, notes)


def _unpaired_notes(side_a: pd.DataFrame, side_b: pd.DataFrame, shared: pd.DataFrame) -> list[str]:
    """Notes on what only one side evaluated, left out of the pairs: whole evaluations, and
    folds of a shared evaluation (a mean over fewer folds is not the row's table mean)."""
    notes = []
    evaluations = sorted({tuple(k) for frame in (side_a, side_b) for k in frame[EVALUATION_KEYS].itertuples(index=False)})
    for evaluation in evaluations:
        train, test, setting = evaluation
        where = f"{eval_label(train, test)} setting {int(setting)}"
        folds = {name: set(_on_evaluation(frame, evaluation)["fold"]) for name, frame in (("A", side_a), ("B", side_b))}
        paired = set(_on_evaluation(shared, evaluation)["fold"])
        if not paired:
            alone = [name for name, own in folds.items() if own]
            notes.append(f"{where}: only {alone[0]} evaluated it: not compared")
            continue
        left_out = [f"{name}'s fold{'s' if len(own - paired) > 1 else ''} {','.join(map(str, sorted(own - paired)))}"
                    for name, own in folds.items() if own - paired]
        if left_out:
            notes.append(f"{where}: not paired, the other side did not evaluate them: {'; '.join(left_out)}")
    return notes


def _on_evaluation(frame: pd.DataFrame, evaluation: tuple) -> pd.DataFrame:
    train, test, setting = evaluation
    return frame[(frame["train_dataset"] == train) & (frame["dataset"] == test) & (frame["setting"] == setting)]


def _sides(results: Results, a: str, b: str) -> tuple[tuple[str, str], tuple[str, str]]:
    per_case = per_case_scores(results)
    key_a, key_b = resolve(per_case, a), resolve(per_case, b)
    if key_a == key_b:
        raise FsmisError(f"{a!r} and {b!r} name the same runs", hint="compare two different methods or variants")
    return key_a, key_b


#: the columns of :func:`compare`
COMPARE_COLUMNS = [
    "A", "B", "evaluation", "setting", "organ", "n_pairs", "n_evaluations", "seeds", "A seeds", "B seeds",
    "A mean", "A CI low", "A CI high", "B mean", "B CI low", "B CI high", "diff mean", "diff CI low",
    "diff CI high", "W", "p", "rank-biserial r",
]


def compare(
    results: Results, a: str, b: str, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> pd.DataFrame:
    """Per evaluation and organ (and ``all``: per query volume, its mean over organs):
    paired statistics of A vs B over the volumes and seeds both have (:func:`pair_volumes`).

    Dice values in the frame are percent. ``n_pairs``: the query scans paired (the unit of
    the test, module docstring); ``n_evaluations``: the (fold, scan) evaluations behind the
    means; ``seeds``: the seeds paired, the same on both sides; ``A seeds``/``B seeds``: the
    seeds each side has on those folds. Means are over the (fold, scan) evaluations,
    intervals resample scans, W/p/r are over one difference per scan. Returns an empty
    frame when A and B share no query volume at a common seed (:func:`comparison_notes`
    says why).
    """
    key_a, key_b = _sides(results, a, b)
    pairing = pair_volumes(results, key_a, key_b)
    rows = []
    for evaluation_key, evaluation in pairing.pairs.groupby(EVALUATION_KEYS, sort=True):
        train, test, setting = evaluation_key
        seeds = pairing.seeds[tuple(evaluation_key)]
        organs = sorted(evaluation["organ"].unique(), key=organ_sort_key)
        for organ in [*organs, "all"]:
            if organ == "all":  # one pair per query volume (module docstring)
                subset = evaluation.groupby(["fold", "case_id"], sort=True)[["dice_a", "dice_b"]].mean().reset_index()
            else:
                subset = evaluation[evaluation["organ"] == organ]
            scans = subset["case_id"].astype(str).to_numpy()
            dice_a = subset["dice_a"].to_numpy(dtype=float) * 100
            dice_b = subset["dice_b"].to_numpy(dtype=float) * 100
            diff = dice_a - dice_b
            # one difference per scan: a scan evaluated in two folds is one pair, not two
            per_scan = pd.Series(diff).groupby(scans, sort=True).mean().to_numpy()
            statistic, p_value = wilcoxon_test(per_scan)
            ci_a = bootstrap_ci(dice_a, n_boot, level, seed, clusters=scans)
            ci_b = bootstrap_ci(dice_b, n_boot, level, seed, clusters=scans)
            ci_d = bootstrap_ci(diff, n_boot, level, seed, clusters=scans)
            rows.append({
                "A": row_label(*key_a), "B": row_label(*key_b),
                "evaluation": eval_label(train, test), "setting": int(setting), "organ": organ,
                "n_pairs": int(len(per_scan)), "n_evaluations": int(len(diff)),
                "seeds": seeds["used"], "A seeds": seeds["A"], "B seeds": seeds["B"],
                "A mean": float(dice_a.mean()), "A CI low": ci_a[0], "A CI high": ci_a[1],
                "B mean": float(dice_b.mean()), "B CI low": ci_b[0], "B CI high": ci_b[1],
                "diff mean": float(diff.mean()), "diff CI low": ci_d[0], "diff CI high": ci_d[1],
                "W": statistic, "p": p_value, "rank-biserial r": rank_biserial(per_scan),
            })
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)


def _options(variant: str) -> frozenset[str]:
    return frozenset(part for part in variant.split(",") if part)


def differ_only_in_aggregation(key_a: tuple[str, str], key_b: tuple[str, str]) -> bool:
    """Whether two rows are one method's runs that differ only in options that change no
    volume's Dice (:data:`PER_VOLUME_NEUTRAL_OPTIONS`: ``[dice=pooled]`` re-evaluates the
    same trained models' masks), so their per-volume Dice are equal by construction."""
    if key_a == key_b or key_a[0] != key_b[0]:
        return False
    a, b = _options(key_a[1]), _options(key_b[1])
    return bool(a ^ b) and (a ^ b) <= PER_VOLUME_NEUTRAL_OPTIONS


def comparison_notes(results: Results, a: str, b: str, frame: pd.DataFrame | None = None) -> list[str]:
    """What a reader of the comparison of A and B must know besides its table: seeds left
    out or not shared (:func:`pair_volumes`), an evaluation with a scan in two folds, and why
    there is nothing to compare where there is not.

    Args:
        frame: :func:`compare`'s result, where the caller has it (to say where a scan was
            evaluated in two folds).
    """
    key_a, key_b = _sides(results, a, b)
    pairing = pair_volumes(results, key_a, key_b)
    notes = list(pairing.notes)
    if differ_only_in_aggregation(key_a, key_b):
        notes.append("A and B differ only in how a fold's score aggregates its volumes (protocol.dice), not in any "
                     "volume's Dice: their per-volume Dice are equal, so there is nothing to test")
    if frame is not None and not frame.empty:
        twice = frame[(frame["organ"] == "all") & (frame["n_evaluations"] > frame["n_pairs"])]
        for row in twice.itertuples(index=False):
            notes.append(f"{row.evaluation} setting {row.setting}: {row.n_evaluations} (fold, scan) evaluations of "
                         f"{row.n_pairs} scans (the folds overlap by one scan, PROTOCOL.md §2): each scan is one "
                         "pair and one bootstrap draw")
    if pairing.pairs.empty and not pairing.notes:
        notes.append("A and B share no query volume (no evaluation, fold, organ and case in common)")
    return notes


def confidence_intervals(results: Results, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per method variant, evaluation, setting and organ: mean Dice (%) over query volumes
    (each the mean over its seeds) with its percentile bootstrap interval.

    The mean is over the (fold, scan) evaluations; the bootstrap resamples scans, all
    evaluations of one scan together (a scan is a query in two folds where the folds
    overlap, PROTOCOL.md §2), so ``n_volumes`` counts distinct scans and ``n_evaluations``
    the (fold, scan) evaluations."""
    per_case = per_case_scores(results)
    rows = []
    keys = ["method", "variant", "train_dataset", "dataset", "setting", "organ"]
    for (method, variant, train, test, setting, organ), group in per_case.groupby(keys, sort=True):
        dice = group["dice"].to_numpy(dtype=float) * 100
        scans = group["case_id"].astype(str).to_numpy()
        low, high = bootstrap_ci(dice, n_boot, level, seed, clusters=scans)
        rows.append({
            "method": row_label(method, variant), "evaluation": eval_label(train, test), "setting": int(setting),
            "organ": organ, "n_volumes": int(len(set(scans))), "n_evaluations": int(dice.size),
            "mean": float(dice.mean()), "CI low": low, "CI high": high,
        })
    frame = pd.DataFrame(rows, columns=["method", "evaluation", "setting", "organ", "n_volumes", "n_evaluations",
                                        "mean", "CI low", "CI high"])
    if not frame.empty:
        frame["_o"] = frame["organ"].map(organ_sort_key)
        frame = frame.sort_values(["evaluation", "setting", "method", "_o"]).drop(columns="_o").reset_index(drop=True)
    return frame


def default_pairs(results: Results, notes: list[str] | None = None) -> list[tuple[str, str]]:
    """The report's comparisons: a reference variant against every other variant it shares
    query volumes with, at a common training seed.

    The reference is the unmarked variant (no random weights, no non-standard option)
    evaluated on the most (evaluation, setting, organ) combinations, ties broken by the
    higher mean per-volume Dice; so it is the broadest comparison, not a cherry-pick.
    Left out, with a line in ``notes``: a variant that differs from the reference only in
    :data:`PER_VOLUME_NEUTRAL_OPTIONS` (``[dice=pooled]``: the same masks, so equal
    per-volume Dice and a test of nothing), and one whose volumes in common with the
    reference share no seed (:func:`pair_volumes` would pair nothing).
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
    cases = results.cases
    pairs = []
    best_cases = cases[(cases["method"] == best[0]) & (cases["variant"] == best[1])]
    for key in means.index:
        if key == best:
            continue
        other = cases[(cases["method"] == key[0]) & (cases["variant"] == key[1])]
        if best_cases[PAIR_KEYS].drop_duplicates().merge(other[PAIR_KEYS].drop_duplicates(), on=PAIR_KEYS).empty:
            continue
        if differ_only_in_aggregation(best, key):
            if notes is not None:
                notes.append(f"{shown_row_label(row_label(*key))} is not compared with {shown_row_label(row_label(*best))}: "
                             "it re-evaluates the same "
                             "masks with another Dice aggregation (protocol.dice), so their per-volume Dice are equal")
            continue
        if best_cases[SEED_PAIR_KEYS].drop_duplicates().merge(other[SEED_PAIR_KEYS].drop_duplicates(),
                                                               on=SEED_PAIR_KEYS).empty:
            if notes is not None:
                notes.append(f"{shown_row_label(row_label(*key))} is not compared with {shown_row_label(row_label(*best))}: "
                             "they evaluated the same "
                             "query volumes but share no training seed")
            continue
        pairs.append((row_label(*best), row_label(*key)))
    return pairs


#: display headers of a paired comparison. The values are per-volume Dice whatever the
#: variants' ``protocol.dice`` (a ``[dice=pooled]`` variant's table score is pooled, but
#: pairs are single volumes), so the headers say so.
COMPARE_HEADERS = ("A per-volume Dice (95% CI)", "B per-volume Dice (95% CI)", "A − B (95% CI)")
#: display headers of the bootstrap intervals (:func:`format_intervals`)
INTERVAL_HEADERS = {"mean": "mean per-volume Dice", "CI low": "95% CI low", "CI high": "95% CI high",
                    "n_volumes": "n scans", "n_evaluations": "n (fold, scan)"}


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
    """Display form: ``mean [low, high]`` strings (per-volume Dice %), p in scientific notation;
    ``n``: the scans paired (the unit of the test), ``seeds``: the seeds paired, the same on
    both sides (:func:`pair_volumes`)."""
    def interval(mean: float, low: float, high: float) -> str:
        return f"{mean:.2f} [{low:.2f}, {high:.2f}]"

    a_header, b_header, diff_header = COMPARE_HEADERS
    if frame.empty:
        return pd.DataFrame(columns=["evaluation", "setting", "organ", "n", "seeds", a_header, b_header, diff_header,
                                     "W", "p", "r_rb"])
    return pd.DataFrame({
        "evaluation": frame["evaluation"], "setting": frame["setting"].astype(str),
        "organ": [organ if organ == "all" else organ_display(organ) for organ in frame["organ"]],
        "n": frame["n_pairs"].astype(str),
        "seeds": [text.removeprefix("seeds ").removeprefix("seed ") for text in frame["seeds"]],
        a_header: [interval(*v) for v in zip(frame["A mean"], frame["A CI low"], frame["A CI high"])],
        b_header: [interval(*v) for v in zip(frame["B mean"], frame["B CI low"], frame["B CI high"])],
        diff_header: [interval(*v) for v in zip(frame["diff mean"], frame["diff CI low"], frame["diff CI high"])],
        "W": ["–" if math.isnan(w) else f"{w:g}" for w in frame["W"]],
        "p": ["–" if math.isnan(p) else f"{p:.3g}" for p in frame["p"]],
        "r_rb": ["–" if math.isnan(r) else f"{r:+.3f}" for r in frame["rank-biserial r"]],
    })
