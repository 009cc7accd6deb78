"""Read run records into tidy DataFrames.

A run record is a folder ``<results>/<method>/<test_dataset>/setting<k>/fold<f>/seed<s>-<hash>/``
holding ``run.json``, ``cases.csv`` (one row per query volume and organ), optionally
``train_log.csv`` and ``predictions.npz``, and the ``COMPLETE`` marker written last. Only
runs with the marker count; the others are listed as unfinished.

Everything downstream (tables, statistics, figures) works on the frames built here:

- ``runs``: one row per finished run (metadata, variant key, markers).
- ``cases``: one row per (run, organ, query volume).
- ``fold_scores``: one row per (row key, fold, organ): the fold's organ score following the
  run's ``protocol.dice``, averaged over seeds (``n_seeds`` kept).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from ..data.base import ORGANS
from ..errors import FsmisError
from ..records import data_identity_hash
from .style import dataset_display, eval_display, organ_display

#: folds of every dataset in the EP1 protocol (PROTOCOL.md §2)
N_FOLDS = 5

#: organ order in tables and figures: the paper's abdominal order, then cardiac, then the rest
ORGAN_ORDER: tuple[str, ...] = ORGANS

#: dataset order in tables
DATASET_ORDER: tuple[str, ...] = ("abd_mri", "abd_ct", "card_mri", "nifti_folder", "phantom")

#: the columns that identify one table row of measured results (besides setting/datasets)
ROW_KEY = ("method", "variant")
#: the columns that identify one evaluation (a column group of a table)
EVAL_KEY = ("train_dataset", "dataset", "setting")

CASE_COLUMNS = (
    "method", "dataset", "train_dataset", "setting", "fold", "seed",
    "organ", "case_id", "dice", "tp", "fp", "fn",
)


def organ_sort_key(organ: str) -> tuple[int, str]:
    return (ORGAN_ORDER.index(organ), organ) if organ in ORGAN_ORDER else (len(ORGAN_ORDER), organ)


def dataset_sort_key(name: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(name), name) if name in DATASET_ORDER else (len(DATASET_ORDER), name)


def organ_label(organ: str) -> str:
    """Display name of an organ (registry / built-in names; :mod:`.style`)."""
    return organ_display(organ)


def dataset_label(name: str) -> str:
    """Display name of a dataset (registry / built-in names; :mod:`.style`)."""
    return dataset_display(name)


def eval_label(train_dataset: str, dataset: str) -> str:
    """``Abd-MRI`` in-domain, ``Abd-CT → Abd-MRI`` cross-domain."""
    return eval_display(train_dataset, dataset)


def variant_key(meta: dict) -> str:
    """What distinguishes runs of one method that must never be averaged together.

    Backbone (when the method has one), random weights, fidelity other than the paper text,
    and every non-standard protocol option, joined with ``,`` (empty for a standard run of a
    method without a backbone).
    """
    parts: list[str] = []
    backbone = str(meta.get("backbone") or "none")
    if backbone != "none":
        parts.append(backbone)
    fidelity = meta.get("fidelity")
    if fidelity not in (None, "", "paper"):
        parts.append(f"fidelity={fidelity}")
    flags = set(str(x) for x in (meta.get("non_standard") or []))
    if is_random(meta):
        flags.add("random_weights")
    parts.extend(sorted(flags))
    return ",".join(parts)


def is_random(meta: dict) -> bool:
    return bool(meta.get("random_weights")) or meta.get("pretrained") is False


def non_standard_options(meta: dict) -> list[str]:
    """Protocol options other than the default, without the random-weights flag."""
    return sorted(str(x) for x in (meta.get("non_standard") or []) if str(x) != "random_weights")


def row_label(method: str, variant: str) -> str:
    return method if not variant else f"{method} [{variant}]"


@dataclass
class Results:
    """Everything read from one results root.

    Attributes:
        root: the results root.
        runs: one row per finished run.
        cases: one row per (finished run, organ, query volume).
        fold_scores: one row per (method, variant, train_dataset, dataset, setting, fold,
            organ): ``dice`` in 0..1 averaged over ``n_seeds`` seeds.
        unfinished: run folders without the COMPLETE marker.
        notes: problems found while reading (skipped or superseded runs).
        train_logs: run folder -> its ``train_log.csv`` frame.
    """

    root: Path
    runs: pd.DataFrame
    cases: pd.DataFrame
    fold_scores: pd.DataFrame
    unfinished: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    train_logs: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.runs.empty


def default_results_dir() -> Path:
    return Path(os.environ.get("FSMIS_RESULTS_DIR") or "results")


def _read_run_json(run_dir: Path) -> dict:
    with open(run_dir / "run.json", encoding="utf-8") as handle:
        return json.load(handle)


def fold_organ_score(cases: pd.DataFrame, dice_mode: str) -> float:
    """One fold's organ score from its query volumes.

    ``per_volume``: mean of the volumes' Dice. ``pooled``: Dice of the summed TP/FP/FN
    (the released SD-FSMIS code); an organ absent everywhere scores 1 by convention there,
    which cannot happen with kept slices, so 0 denominators give NaN here.
    """
    if dice_mode == "pooled":
        tp, fp, fn = (float(cases[c].sum()) for c in ("tp", "fp", "fn"))
        denominator = 2 * tp + fp + fn
        return 2 * tp / denominator if denominator > 0 else float("nan")
    return float(cases["dice"].mean())


def load_results(results_dir: str | Path) -> Results:
    """Read every run record under ``results_dir``.

    Raises:
        FsmisError: the folder does not exist.
    """
    root = Path(results_dir).expanduser()
    if not root.is_dir():
        raise FsmisError(
            f"results folder {root} does not exist",
            hint="pass --results DIR or set FSMIS_RESULTS_DIR to the folder `fsmis-bench run` wrote to",
        )
    run_rows: list[dict] = []
    case_frames: list[pd.DataFrame] = []
    unfinished: list[Path] = []
    notes: list[str] = []
    train_logs: dict[str, pd.DataFrame] = {}

    for run_json in sorted(root.rglob("run.json")):
        run_dir = run_json.parent
        if not (run_dir / "COMPLETE").exists():
            unfinished.append(run_dir)
            continue
        try:
            row, cases = _read_run(run_dir)
        except DamagedRun as exc:
            notes.append(f"skipped {run_dir}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one unreadable record must not stop the report
            notes.append(f"skipped {run_dir}: unreadable record ({type(exc).__name__}: {exc})")
            continue
        run_rows.append(row)
        case_frames.append(cases)
        log_path = run_dir / "train_log.csv"
        if log_path.is_file():
            try:
                train_logs[str(run_dir)] = pd.read_csv(log_path)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"unreadable {log_path}: {exc}")

    runs = pd.DataFrame(run_rows, columns=[
        "run_dir", "method", "train_dataset", "dataset", "setting", "fold", "seed", "backbone",
        "pretrained", "random_weights", "fidelity", "dice_mode", "non_standard", "variant",
        "config_hash", "finished_at", "data_id",
    ])
    runs = _split_by_data(runs)
    runs, superseded = _drop_superseded(runs)
    notes.extend(superseded)
    kept = set(runs["run_dir"])
    if case_frames:
        cases = pd.concat(case_frames, ignore_index=True)
        cases = cases[cases["run_dir"].isin(kept)].reset_index(drop=True)
        cases["variant"] = cases["run_dir"].map(dict(zip(runs["run_dir"], runs["variant"])))
    else:
        cases = pd.DataFrame(columns=[*CASE_COLUMNS, "variant", "run_dir"])
    train_logs = {k: v for k, v in train_logs.items() if k in kept}
    fold_scores = compute_fold_scores(runs, cases)
    return Results(root, runs, cases, fold_scores, unfinished, notes, train_logs)


class DamagedRun(Exception):
    """A finished run whose record cannot be trusted; the report skips it with a note."""


#: Dice in cases.csv must equal 2tp / (2tp + fp + fn) to this tolerance
DICE_TOLERANCE = 1e-6


def _read_run(run_dir: Path) -> tuple[dict, pd.DataFrame]:
    """One finished run's row for ``runs`` and its checked ``cases`` frame.

    Raises:
        DamagedRun: ``run.json`` or ``cases.csv`` is unreadable, or the table does not
            match the record (see :func:`check_cases`).
    """
    try:
        meta = _read_run_json(run_dir)
    except (OSError, ValueError) as exc:
        raise DamagedRun(f"run.json is unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise DamagedRun("run.json does not hold a record")
    missing_meta = [k for k in ("method", "setting", "fold") if k not in meta]
    if missing_meta:
        raise DamagedRun(f"run.json lacks {missing_meta}")
    try:
        cases = pd.read_csv(run_dir / "cases.csv", dtype={"case_id": str, "organ": str}, keep_default_na=False,
                            na_values=[""])
    except (OSError, ValueError) as exc:
        raise DamagedRun(f"cases.csv is unreadable ({type(exc).__name__}: {exc})") from None
    problem = check_cases(cases, meta)
    if problem:
        raise DamagedRun(problem)
    protocol = meta.get("protocol") or {}
    test_dataset = meta.get("test_dataset") or meta.get("dataset")
    row = {
        "run_dir": str(run_dir),
        "method": str(meta["method"]),
        "train_dataset": str(meta.get("dataset") or test_dataset),
        "dataset": str(test_dataset),
        "setting": int(meta["setting"]),
        "fold": int(meta["fold"]),
        "seed": int(meta.get("seed", 0)),
        "backbone": str(meta.get("backbone") or "none"),
        "pretrained": bool(meta.get("pretrained", True)),
        "random_weights": is_random(meta),
        "fidelity": str(meta.get("fidelity") or "paper"),
        "dice_mode": str(protocol.get("dice") or "per_volume"),
        "non_standard": ";".join(non_standard_options(meta)),
        "variant": variant_key(meta),
        "config_hash": str(meta.get("config_hash", "")),
        "finished_at": str(meta.get("finished_at") or ""),
        "data_id": data_identity_hash(meta),
    }
    cases = cases.copy()
    for column in ("tp", "fp", "fn"):
        cases[column] = cases[column].astype("int64")
    cases["dice"] = cases["dice"].astype(float)
    # run.json is the authority on identity; cases.csv repeats it for standalone use
    for key in ("method", "dataset", "train_dataset", "setting", "fold", "seed"):
        cases[key] = row[key]
    cases["variant"] = row["variant"]
    cases["run_dir"] = row["run_dir"]
    return row, cases


def check_cases(cases: pd.DataFrame, meta: dict) -> str | None:
    """Why a run's ``cases.csv`` does not match its ``run.json``, or None when it does.

    Checks: every column is there; Dice, TP, FP, FN are numbers (counts whole and
    non-negative); Dice lies in [0, 1] and equals 2TP / (2TP + FP + FN); no (organ,
    query volume) appears twice; the identity columns agree with ``run.json``; and, for
    records that list them (``evaluated``), exactly the expected query volumes x organs
    are there.
    """
    missing = [c for c in CASE_COLUMNS if c not in cases.columns]
    if missing:
        return f"cases.csv lacks columns {missing}"
    if cases.empty:
        return "cases.csv has no rows"
    numbers = {}
    for column in ("dice", "tp", "fp", "fn"):
        values = pd.to_numeric(cases[column], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            return f"cases.csv row {row + 2}: {column}={cases[column].iloc[row]!r} is not a number"
        numbers[column] = values.astype(float)
    for column in ("tp", "fp", "fn"):
        values = numbers[column]
        bad = (values < 0) | (values != values.round())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            return f"cases.csv row {row + 2}: {column}={values.iloc[row]!r} is not a voxel count"
    dice = numbers["dice"]
    outside = ~dice.between(0.0, 1.0)
    if outside.any():
        row = int(outside.to_numpy().nonzero()[0][0])
        return (f"cases.csv row {row + 2}: dice={dice.iloc[row]!r} is outside [0, 1]"
                + (" (a percentage?)" if 1 < dice.iloc[row] <= 100 else ""))
    denominator = 2 * numbers["tp"] + numbers["fp"] + numbers["fn"]
    expected = (2 * numbers["tp"] / denominator.where(denominator > 0)).fillna(1.0)
    off = (dice - expected).abs() > DICE_TOLERANCE
    if off.any():
        row = int(off.to_numpy().nonzero()[0][0])
        return (f"cases.csv row {row + 2}: dice={dice.iloc[row]:.6g} but 2tp/(2tp+fp+fn)={expected.iloc[row]:.6g} "
                "from its own counts")
    pairs = list(zip(cases["organ"].astype(str), cases["case_id"].astype(str)))
    if len(set(pairs)) != len(pairs):
        twice = next(p for p in pairs if pairs.count(p) > 1)
        return f"cases.csv holds (organ, case) {twice} more than once"
    authority = {
        "method": meta.get("method"),
        "dataset": meta.get("test_dataset") or meta.get("dataset"),
        "setting": meta.get("setting"),
        "fold": meta.get("fold"),
    }
    for column, value in authority.items():
        if value is None:
            continue
        found = set(cases[column].astype(str))
        if found != {str(value)}:
            return f"cases.csv names {column} {sorted(found)} but run.json says {value!r}"
    evaluated = meta.get("evaluated")
    if isinstance(evaluated, dict):
        wanted = {(str(organ), str(case)) for organ, ids in evaluated.items() for case in ids}
        lacking, extra = wanted - set(pairs), set(pairs) - wanted
        if lacking:
            return (f"cases.csv lacks {len(lacking)} of the {len(wanted)} (organ, query volume) rows the run "
                    f"evaluated, e.g. {sorted(lacking)[0]} (truncated?)")
        if extra:
            return f"cases.csv has rows the run did not evaluate, e.g. {sorted(extra)[0]}"
    return None


def _split_by_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method/variant/evaluation on different data get different variants.

    The data identity (``run.json`` ``inputs``: the training and test data's identity) is
    normally the same for every run of a dataset; where it is not (two ``nifti_folder``
    runs on different folders, supervoxels regenerated between folds), averaging or
    superseding across them would mix data silently, so each gets ``data=<hash8>``
    (``data=unknown`` for records from before identities were recorded).
    """
    if runs.empty:
        return runs
    runs = runs.copy()
    keys = ["method", "variant", "train_dataset", "dataset", "setting"]
    for _, group in runs.groupby(keys, sort=False):
        if group["data_id"].nunique() < 2:
            continue
        for index in group.index:
            tag = f"data={runs.at[index, 'data_id'] or 'unknown'}"
            variant = runs.at[index, "variant"]
            runs.at[index, "variant"] = f"{variant},{tag}" if variant else tag
    return runs


def _drop_superseded(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep one run per (method, variant, evaluation, fold, seed): the latest finished.

    Two finished runs with the same identity differ only in settings the variant key does not
    cover (e.g. training steps); averaging them would mix configurations silently.
    """
    if runs.empty:
        return runs, []
    identity = ["method", "variant", "train_dataset", "dataset", "setting", "fold", "seed", "data_id"]
    ordered = runs.sort_values(["finished_at", "run_dir"])
    duplicated = ordered.duplicated(identity, keep="last")
    notes = [
        f"superseded by a later run with the same method/variant/fold/seed: {path}"
        for path in ordered.loc[duplicated, "run_dir"]
    ]
    return ordered[~duplicated].sort_index().reset_index(drop=True), notes


def compute_fold_scores(runs: pd.DataFrame, cases: pd.DataFrame) -> pd.DataFrame:
    """Per (method, variant, evaluation, fold, organ): the organ score, mean over seeds."""
    columns = [
        "method", "variant", "train_dataset", "dataset", "setting", "fold", "organ",
        "dice", "n_seeds",
    ]
    if runs.empty or cases.empty:
        return pd.DataFrame(columns=columns)
    dice_mode = dict(zip(runs["run_dir"], runs["dice_mode"]))
    per_run = [
        {
            "run_dir": run_dir,
            "organ": organ,
            "score": fold_organ_score(group, dice_mode[run_dir]),
        }
        for (run_dir, organ), group in cases.groupby(["run_dir", "organ"], sort=False)
    ]
    per_run_frame = pd.DataFrame(per_run).merge(
        runs[["run_dir", "method", "variant", "train_dataset", "dataset", "setting", "fold", "seed"]],
        on="run_dir",
    )
    keys = ["method", "variant", "train_dataset", "dataset", "setting", "fold", "organ"]
    scores = (
        per_run_frame.groupby(keys, sort=True)
        .agg(dice=("score", "mean"), n_seeds=("seed", "nunique"))
        .reset_index()
    )
    return scores[columns]


def per_case_scores(results: Results) -> pd.DataFrame:
    """Per (method, variant, evaluation, fold, organ, case_id): Dice averaged over seeds."""
    keys = ["method", "variant", "train_dataset", "dataset", "setting", "fold", "organ", "case_id"]
    if results.cases.empty:
        return pd.DataFrame(columns=[*keys, "dice", "n_seeds"])
    return (
        results.cases.groupby(keys, sort=True)
        .agg(dice=("dice", "mean"), n_seeds=("seed", "nunique"))
        .reset_index()
    )


def run_flags(results: Results) -> pd.DataFrame:
    """Per (method, variant): random weights and non-standard options (union over runs)."""
    rows = []
    for (method, variant), group in results.runs.groupby(["method", "variant"], sort=True):
        options = sorted({o for text in group["non_standard"] for o in text.split(";") if o})
        rows.append({
            "method": method,
            "variant": variant,
            "random_weights": bool(group["random_weights"].any()),
            "non_standard": ";".join(options),
        })
    return pd.DataFrame(rows, columns=["method", "variant", "random_weights", "non_standard"])


def long_fold_csv(results: Results) -> pd.DataFrame:
    """The ``--format csv`` output: organ score per fold, long format, Dice in 0..1."""
    scores = results.fold_scores.copy()
    flags = run_flags(results)
    if scores.empty:
        return pd.DataFrame(columns=[
            "method", "dataset", "setting", "fold", "organ", "dice",
            "variant", "train_dataset", "n_seeds", "markers",
        ])
    scores = scores.merge(flags, on=["method", "variant"], how="left")
    complete = _fold_counts(scores)
    scores = scores.merge(complete, on=["method", "variant", "train_dataset", "dataset", "setting"])
    scores["markers"] = [
        ";".join(m for m, on in (
            ("incomplete", n < N_FOLDS),
            ("random_weights", bool(r)),
            ("non_standard:" + ns if ns else "", bool(ns)),
        ) if on)
        for n, r, ns in zip(scores["n_folds"], scores["random_weights"], scores["non_standard"])
    ]
    scores["_organ"] = scores["organ"].map(organ_sort_key)
    scores["_dataset"] = scores["dataset"].map(dataset_sort_key)
    scores = scores.sort_values(["method", "variant", "_dataset", "train_dataset", "setting", "fold", "_organ"])
    return scores[[
        "method", "dataset", "setting", "fold", "organ", "dice",
        "variant", "train_dataset", "n_seeds", "markers",
    ]].reset_index(drop=True)


def _fold_counts(scores: pd.DataFrame) -> pd.DataFrame:
    """Folds present per evaluation: the fewest over its organs."""
    keys = ["method", "variant", "train_dataset", "dataset", "setting"]
    per_organ = scores.groupby([*keys, "organ"])["fold"].nunique().reset_index(name="n")
    return per_organ.groupby(keys)["n"].min().reset_index(name="n_folds")


# -- published numbers -------------------------------------------------------------------

PUBLISHED_CITATION = 'Li et al., "SD-FSMIS: Adapting Stable Diffusion for Few-Shot Medical Image Segmentation", arXiv 2604.03134'


def load_published() -> pd.DataFrame:
    """The SD-FSMIS paper's Tables 1-4 as shipped with the package.

    Columns: table (int), method, venue, setting (int), train_on, test_on, backbone
    (``""`` or e.g. ``SD-1.5``), organ (incl. ``mean``), dice (percent).
    """
    source = resources.files("fsmis_bench") / "published" / "published_results.csv"
    with source.open("r", encoding="utf-8") as handle:
        frame = pd.read_csv(handle, dtype={"backbone": str, "venue": str})
    frame["backbone"] = frame["backbone"].fillna("").astype(str)
    frame["venue"] = frame["venue"].fillna("").astype(str)
    frame["table"] = frame["table"].astype(int)
    frame["setting"] = frame["setting"].astype(int)
    frame["dice"] = frame["dice"].astype(float)
    return frame


def published_name(method: str) -> str | None:
    """The published-table name of a measured method (None if it has no published row),
    from the ``published_names`` its plugin registered (:class:`~fsmis_bench.plugins.Display`)."""
    from .style import method_style

    names = method_style(method).published_names
    return names[0] if names else None


def published_backbone(name: str) -> str:
    """``SD-1.5`` -> ``sd15`` (the run records' backbone names)."""
    return name.lower().replace("-", "").replace(".", "") if name else "none"


def summarise_runs(results: Results) -> pd.DataFrame:
    """One row per (method, variant, evaluation): folds, seeds and markers, for the report."""
    if results.runs.empty:
        return pd.DataFrame(columns=[
            "method", "variant", "train_dataset", "dataset", "setting", "folds", "seeds", "runs",
        ])
    keys = ["method", "variant", "train_dataset", "dataset", "setting"]
    summary = (
        results.runs.groupby(keys)
        .agg(
            folds=("fold", lambda s: ",".join(str(v) for v in sorted(set(s)))),
            seeds=("seed", lambda s: ",".join(str(v) for v in sorted(set(s)))),
            runs=("run_dir", "count"),
        )
        .reset_index()
    )
    return summary


__all__ = [
    "N_FOLDS", "ORGAN_ORDER", "Results", "load_results", "load_published", "variant_key",
    "row_label", "per_case_scores", "long_fold_csv", "fold_organ_score", "compute_fold_scores",
    "default_results_dir", "summarise_runs", "run_flags", "PUBLISHED_CITATION",
    "organ_sort_key", "dataset_sort_key", "organ_label", "dataset_label", "eval_label",
    "published_backbone", "published_name",
]
