"""Read run records into tidy DataFrames.

A run record is a folder ``<results>/<method>/<test_dataset>/setting<k>/fold<f>/seed<s>-<hash>/``
holding ``run.json``, ``cases.csv`` (one row per query volume and organ), optionally
``train_log.csv`` and ``predictions.npz``, and the ``COMPLETE`` marker written last. Only
runs with the marker count; the others are listed as unfinished.

Everything downstream (tables, statistics, figures) works on the frames built here:

- ``runs``: one row per finished run (metadata, variant key, markers, training steps, the
  fingerprint of its configuration).
- ``cases``: one row per (run, organ, query volume).
- ``fold_scores``: one row per (row key, fold, organ): the fold's organ score following the
  run's ``protocol.dice``, averaged over seeds (``n_seeds`` kept).
- ``absent``: one row per (run, organ, query scan) that the run left out of the organ's
  mean because the scan does not show the organ (``run.json`` ``absent``).

What makes a row (variant keys, configuration fingerprints, the splits into rows and the
superseding of repeated runs) lives in :mod:`.rows`, the published numbers and the caveats
of comparing with them in :mod:`.published`; their public names are importable from here
as well.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .. import records
from ..data.base import ORGANS
from ..errors import FsmisError
from ..records import CASE_COLUMNS, data_identity_hash
# the names that moved to .published and .rows are imported here, private ones included, so
# that ``collect.<name>`` keeps working for code written before the split
from .published import (  # noqa: F401 - re-exported
    EXCLUSION_ALL_NOTE,
    EXCLUSION_CAVEAT,
    LEGACY_EXCLUSION_NOTE,
    LEGACY_EXCLUSION_OPTION,
    PRINTED_MEAN_NOTE,
    PUBLISHED_CITATION,
    RANDOM_WEIGHTS_CAVEATS,
    _PRINTED_ROUNDING,
    comparison_caveat,
    exclusion_caveat,
    load_published,
    only_legacy_exclusion,
    printed_mean_note,
    published_backbone,
    checkpoint_steps,
    judged_reference,
    published_deviations,
    published_name,
    published_row_applies,
    reported_backbones,
    shipped_published_config,
)
from .rows import (  # noqa: F401 - re-exported
    DICE_TOLERANCE,
    FINGERPRINT_LEFT_OUT,
    MAX_LABEL_KEYS,
    N_FOLDS,
    RANDOM_WEIGHTS_NOTES,
    _absent_label,
    _dice_differ_text,
    _drop_superseded,
    _flatten,
    _label_value,
    _lookup,
    _resolve_late_options,
    _resolve_null_options,
    _split_by_config,
    _split_by_data,
    _split_by_plugin_release,
    _split_by_weights,
    _split_variants,
    _superseded_note,
    _threads_text,
    config_fingerprint,
    is_random,
    non_standard_options,
    plugin_release,
    random_weights_note,
    random_weights_reason,
    read_config,
    row_label,
    variant_key,
)
from .style import dataset_display, eval_display, method_display, method_label, organ_display

#: organ order in tables and figures: the paper's abdominal order, then cardiac, then the rest
ORGAN_ORDER: tuple[str, ...] = ORGANS

#: dataset order in tables
DATASET_ORDER: tuple[str, ...] = ("abd_mri", "abd_ct", "card_mri", "nifti_folder", "phantom")



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


def dataset_fold_count(meta: dict[str, Any]) -> int:
    """How many folds the test dataset of a record has, as its record says.

    A row of a table is complete when it has every fold of the dataset it evaluated: five
    for the built-in datasets, but one for a ``nifti_folder`` of fewer than ten scans (a test
    set), one per other scan with ``folds=loo``. Read, in this order: ``inputs.test_data``
    ``n_folds`` (a count a dataset may record), its ``folds`` (``nifti_folder`` records the
    scan ids of each fold), the fixed folds of the built-in preprocessed datasets
    (:data:`fsmis_bench.protocol.folds.FOLDS`), the phantom's (from its recorded
    ``n_cases``, as it defines them); else :data:`~.rows.N_FOLDS`, so that a record made before
    the dataset recorded its folds counts as before.
    """
    from ..protocol.folds import FOLDS, folds_for

    inputs = meta.get("inputs")
    test_data = inputs.get("test_data") if isinstance(inputs, dict) else None
    test_data = test_data if isinstance(test_data, dict) else {}
    count = test_data.get("n_folds")
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count
    folds = test_data.get("folds")
    if isinstance(folds, list) and folds:
        return len(folds)
    name = str(test_data.get("name") or meta.get("test_dataset") or meta.get("dataset") or "")
    if name in FOLDS:
        return len(FOLDS[name])
    if name == "phantom":  # its folds follow its size (datasets/phantom.py), 10 scans unless set
        options = test_data.get("options")
        n_cases = options.get("n_cases", 10) if isinstance(options, dict) else 10
        try:
            return len(folds_for(int(n_cases)))
        except (TypeError, ValueError, FsmisError):
            return N_FOLDS
    return N_FOLDS


def cpu_thread_count(meta: dict[str, Any]) -> int | None:
    """The torch thread count a CPU run recorded (``inputs.cpu_threads``), None where it
    recorded none (a GPU run, an older record)."""
    inputs = meta.get("inputs")
    threads = inputs.get("cpu_threads") if isinstance(inputs, dict) else None
    return int(threads) if isinstance(threads, int) and not isinstance(threads, bool) else None


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
        absent: one row per (finished run, organ, query scan) left out of that organ's mean
            because the scan does not show the organ (columns :data:`ABSENT_COLUMNS`); its
            Dice would be 0/0, so ``cases`` has no row for it (:func:`absent_volumes`).
    """

    root: Path
    runs: pd.DataFrame
    cases: pd.DataFrame
    fold_scores: pd.DataFrame
    unfinished: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    train_logs: dict[str, pd.DataFrame] = field(default_factory=dict)
    absent: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ABSENT_COLUMNS))

    @property
    def empty(self) -> bool:
        return self.runs.empty


def select_rows(results: Results, specs: Sequence[str]) -> Results:
    """``results`` with only the rows ``specs`` name (``report --rows``), for figures and tables
    of a chosen few.

    A spec names one row as ``--compare`` does (``prototype`` is its plain row;
    ``method [variant]``, or the name the tables show, ``SD-FSMIS (SII+QE) [tiny]``), else
    every row of the method it names (a method without a plain row); ``*`` stands for any
    text (``prototype*``: every row of prototype). Spaces and case do not matter. The notes
    (:attr:`Results.notes`) stay those of the whole folder.

    Raises:
        FsmisError: a spec that names no row, with the rows there are.
    """
    known = sorted(set(zip(results.runs["method"], results.runs["variant"])))

    def squeezed(text: str) -> str:
        return "".join(text.split()).casefold()

    def named(row: tuple[str, str]) -> tuple[str, str]:
        return squeezed(row_label(*row)), squeezed(method_label(*row))

    names = ", ".join(repr(row_label(*k)) for k in known) or "none"
    chosen: set[tuple[str, str]] = set()
    for spec in specs:
        wanted = squeezed(spec)
        if "*" in wanted:  # `prototype*`: every row whose name fits
            pattern = re.compile(".*".join(re.escape(part) for part in wanted.split("*")))
            rows = [k for k in known if any(pattern.fullmatch(name) for name in named(k))]
        else:  # one row as --compare names it, else every row of the method named
            rows = ([k for k in known if squeezed(row_label(*k)) == wanted]
                    or [k for k in known if squeezed(method_label(*k)) == wanted]
                    or [k for k in known if wanted in (squeezed(k[0]), squeezed(method_display(k[0])))])
        if not rows:
            raise FsmisError(f"--rows {spec!r} names no row of {results.root}", hint=f"the rows are: {names}")
        methods = sorted({method for method, _ in rows})
        if len(methods) > 1:  # one method's record name is another's displayed name
            raise FsmisError(f"--rows {spec!r} names the rows of several methods ({', '.join(methods)})",
                             hint=f"name one row as the list has it: {names}")
        chosen.update(rows)
    keep = [(m, v) in chosen for m, v in zip(results.runs["method"], results.runs["variant"])]
    runs = results.runs[keep].reset_index(drop=True)
    kept = set(runs["run_dir"])
    scores = results.fold_scores
    in_rows = [(m, v) in chosen for m, v in zip(scores["method"], scores["variant"])]
    return replace(
        results, runs=runs,
        cases=results.cases[results.cases["run_dir"].isin(kept)].reset_index(drop=True),
        fold_scores=scores[in_rows].reset_index(drop=True),
        train_logs={path: log for path, log in results.train_logs.items() if path in kept},
        absent=results.absent[results.absent["run_dir"].isin(kept)].reset_index(drop=True),
    )


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
            f"results folder {root} {'is a file, not a folder' if root.exists() else 'does not exist'}",
            hint="pass --results DIR or set FSMIS_RESULTS_DIR to the folder `fsmis-bench run` wrote to",
        )
    run_rows: list[dict] = []
    case_frames: list[pd.DataFrame] = []
    unfinished: list[Path] = []
    notes: list[str] = []
    train_logs: dict[str, pd.DataFrame] = {}
    configs: dict[str, dict[str, Any]] = {}
    absent_rows: list[dict[str, str]] = []

    for marker in sorted(root.rglob("COMPLETE")):
        if not (marker.parent / "run.json").exists():
            notes.append(f"skipped {marker.parent}: finished, but its run.json is missing (rerun its command "
                         "after deleting COMPLETE: the record is written again from its weights and parts)")
    for run_json in sorted(root.rglob("run.json")):
        run_dir = run_json.parent
        if not (run_dir / "COMPLETE").exists():
            unfinished.append(run_dir)
            continue
        try:
            row, cases, settings = _read_run(run_dir)
        except DamagedRun as exc:
            notes.append(f"skipped {run_dir}: {exc}")
            continue
        except Exception as exc:  # noqa: BLE001 - one unreadable record must not stop the report
            notes.append(f"skipped {run_dir}: unreadable record ({type(exc).__name__}: {exc})")
            continue
        run_rows.append(row)
        case_frames.append(cases)
        configs[row["run_dir"]] = settings
        absent_rows += [{"run_dir": row["run_dir"], "organ": organ, "case_id": case}
                        for organ, case in _absent_scans(run_dir)]
        mismatch = folder_hash_note(run_dir, row["config_hash"])
        if mismatch:
            notes.append(mismatch)
        log_path = run_dir / "train_log.csv"
        if log_path.is_file():
            try:
                train_logs[str(run_dir)] = pd.read_csv(log_path)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"unreadable {log_path}: {exc}")

    runs = pd.DataFrame(run_rows, columns=RUN_COLUMNS)
    runs["steps"] = runs["steps"].astype("Int64")  # whole numbers, empty where unknown
    runs["cpu_threads"] = runs["cpu_threads"].astype("Int64")  # empty for GPU runs and older records
    runs["dataset_folds"] = runs["dataset_folds"].astype("int64")
    runs, config_notes = _split_by_config(runs, configs)
    notes.extend(config_notes)
    runs = _split_by_data(runs)
    runs = _split_by_weights(runs)
    runs = _split_by_plugin_release(runs)
    mean_dice = {str(frame["run_dir"].iloc[0]): float(frame["dice"].mean()) for frame in case_frames}
    runs, superseded = _drop_superseded(runs, mean_dice)
    notes.extend(superseded)
    notes.extend(mixed_thread_notes(runs))
    notes.extend(mixed_code_notes(runs))
    kept = set(runs["run_dir"])
    if case_frames:
        cases = pd.concat(case_frames, ignore_index=True)
        cases = cases[cases["run_dir"].isin(kept)].reset_index(drop=True)
        cases["variant"] = cases["run_dir"].map(dict(zip(runs["run_dir"], runs["variant"])))
    else:
        cases = pd.DataFrame(columns=[*CASE_COLUMNS, "variant", "run_dir"])
    train_logs = {k: v for k, v in train_logs.items() if k in kept}
    fold_scores = compute_fold_scores(runs, cases)
    absent = pd.DataFrame(absent_rows, columns=["run_dir", "organ", "case_id"]).merge(
        runs[["run_dir", *EVAL_ROW_KEY, "fold", "seed"]], on="run_dir")[ABSENT_COLUMNS]
    return Results(root, runs, cases, fold_scores, unfinished, notes, train_logs, absent)


#: the columns of ``Results.absent``
ABSENT_COLUMNS = ["run_dir", "method", "variant", "train_dataset", "dataset", "setting", "fold", "seed", "organ",
                  "case_id"]


def _absent_scans(run_dir: Path) -> list[tuple[str, str]]:
    """(organ, case id) for every query scan the run left out of an organ's mean because the
    scan does not show the organ (``run.json`` ``absent``: organ -> case ids; EP1 warns as it
    leaves one out, ``protocol/ep1.py``). Empty for records without the field; a malformed
    one reads as empty, since it only adds a footnote."""
    try:
        absent = _read_run_json(run_dir).get("absent")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(absent, dict):
        return []
    return [(str(organ), str(case)) for organ, cases in absent.items() if isinstance(cases, list) for case in cases]


#: the columns of ``Results.runs`` (and ``tables/runs.csv``)
RUN_COLUMNS = [
    "run_dir", "method", "train_dataset", "dataset", "setting", "fold", "seed", "backbone",
    "pretrained", "random_weights", "random_reason", "fidelity", "dice_mode", "steps", "non_standard",
    "variant", "config_hash", "config_id", "finished_at", "data_id", "weights_id", "code_id",
    "dataset_folds", "cpu_threads", "method_code",
]


class DamagedRun(Exception):
    """A finished run whose record cannot be trusted; the report skips it with a note."""


def _read_run(run_dir: Path) -> tuple[dict, pd.DataFrame, dict[str, Any]]:
    """One finished run's row for ``runs``, its checked ``cases`` frame and its settings
    (the flattened config that its fingerprint covers; :func:`~.rows.config_fingerprint`).

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
    problem = records.run_config_problem(run_dir)
    if problem:  # its settings are unknown: a row beside intact runs would be `config=unknown`
        raise DamagedRun(f"{problem}; running the run's command again writes it again")
    protocol = meta.get("protocol") or {}
    test_dataset = meta.get("test_dataset") or meta.get("dataset")
    config = read_config(run_dir)
    flags = [str(x) for x in (meta.get("non_standard") or [])]
    if config is not None and meta.get("weights_from") == "none":
        # nothing was trained, so training settings cannot have changed a number
        config = {k: v for k, v in config.items() if k != "train"}
        records._drop(config, "protocol.episode_sampler")
    elif (config is not None and isinstance(config.get("method"), dict)  # a resolved run config
          and meta.get("weights_from", "training") == "training"
          and not _lookup(config, "protocol.episode_sampler")[0]):
        # trained before the episode sampler followed the reference code: by the earlier rule
        config = json.loads(json.dumps(config, default=str))
        config.setdefault("protocol", {})["episode_sampler"] = "uniform_pairs"
        flags.append("episode_sampler=uniform_pairs")
    config_id, settings = config_fingerprint(config)
    # a departure from the published setup is non-standard whenever the run was made: records
    # written before the method declared its published_config are judged by the shipped one.
    # The marks of the reference's keys are judged again here, not taken as recorded (an
    # external checkpoint's steps are its weights')
    if config is not None and isinstance(config.get("method"), dict):
        judged = {key for key, _ in judged_reference(str(meta["method"]), config, meta)}
        flags = [f for f in flags if f.partition("=")[0] not in judged]
    flags += [m for m in published_deviations(str(meta["method"]), config, meta) if m not in flags]
    meta = {**meta, "non_standard": flags}
    found, steps = _lookup(config or {}, "train.steps")
    if meta.get("weights_from") == "none":
        steps, found = 0, True  # a method that trains nothing (support_copy) took no steps, whatever the config says
    elif meta.get("weights_from") == "external_checkpoint":
        # the weights' own steps (an eval of a bare file runs with the default config, whose
        # train.steps trained nothing); unknown where its groups were trained for different steps
        steps = checkpoint_steps(meta)
        found = steps is not None
    backbone = str(meta.get("backbone") or "none")
    pretrained = bool(meta.get("pretrained", True))
    row = {
        "run_dir": str(run_dir),
        "method": str(meta["method"]),
        "train_dataset": str(meta.get("dataset") or test_dataset),
        "dataset": str(test_dataset),
        "setting": int(meta["setting"]),
        "fold": int(meta["fold"]),
        "seed": int(meta.get("seed", 0)),
        "backbone": backbone,
        "pretrained": pretrained,
        "random_weights": is_random(meta),
        "random_reason": random_weights_reason(backbone, pretrained, is_random(meta)),
        "fidelity": str(meta.get("fidelity") or "paper"),
        "dice_mode": str(protocol.get("dice") or "per_volume"),
        # nullable integer: records without a config.yaml do not say how long they trained
        "steps": int(steps) if found and isinstance(steps, int) else None,
        "non_standard": ";".join(non_standard_options(meta)),
        "variant": variant_key(meta),
        "config_hash": str(meta.get("config_hash", "")),
        "config_id": config_id,
        "finished_at": str(meta.get("finished_at") or ""),
        "data_id": data_identity_hash(meta),
        "weights_id": records.weights_identity_hash(meta),
        "code_id": plugin_release(meta),
        "dataset_folds": dataset_fold_count(meta),
        "cpu_threads": cpu_thread_count(meta),
        "method_code": method_code_id(meta),
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
    return row, cases, settings


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
            return f"cases.csv row {row + 2}: {column}{_cell_text(cases[column].iloc[row])} is not a number"
        numbers[column] = values.astype(float)
    for column in ("tp", "fp", "fn"):
        values = numbers[column]
        bad = (values < 0) | (values != values.round())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            return f"cases.csv row {row + 2}: {column}{_cell_text(values.iloc[row])} is not a voxel count"
    dice = numbers["dice"]
    outside = ~dice.between(0.0, 1.0)
    if outside.any():
        row = int(outside.to_numpy().nonzero()[0][0])
        return (f"cases.csv row {row + 2}: dice{_cell_text(dice.iloc[row])} is outside [0, 1]"
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


def _cell_text(value: object) -> str:
    """A cases.csv cell as the user wrote it, to follow a column name in a note:
    ``=2.5``, ``='n/a?'``, `` (empty or NaN)``.

    Never the repr of a numpy scalar (``np.float64(nan)``): the note is for people.
    """
    if isinstance(value, str):
        return " (empty)" if not value.strip() else f"={value!r}"
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"={str(value)!r}"
    if math.isnan(number):
        return " (empty or NaN)"
    return f"={number:g}"


def folder_hash_note(run_dir: Path, config_hash: str) -> str | None:
    """A note when the hash in a run folder's name (``seed0-<hash8>``) is not the start of
    its ``run.json`` ``config_hash``: a copied or renamed folder, whose name no longer says
    which configuration it holds (and a rerun would not find it). None when they agree, or
    when either is missing."""
    _, dash, suffix = run_dir.name.partition("-")
    if not dash or not suffix or not config_hash or config_hash.startswith(suffix):
        return None
    return (f"{run_dir}: the folder name's hash {suffix} is not its run.json config_hash {config_hash[:8]} "
            "(a copied or renamed run folder?)")


#: the columns of one table row's evaluation: a (method, variant) in one evaluation and setting
EVAL_ROW_KEY = ["method", "variant", "train_dataset", "dataset", "setting"]


def _folds_text(values: dict[int, str], describe: Callable[[str], str]) -> str:
    """``fold 0: seeds 0,1; folds 1,2: seed 0``: folds grouped by ``describe(value)``."""
    by_text: dict[str, list[int]] = {}
    for fold in sorted(values):
        by_text.setdefault(describe(values[fold]), []).append(fold)
    return "; ".join(f"fold{'s' if len(folds) > 1 else ''} {','.join(map(str, folds))}: {text}"
                     for text, folds in by_text.items())


def mixed_thread_notes(runs: pd.DataFrame) -> list[str]:
    """A note per table row whose folds were computed with different CPU thread counts.

    The thread count does not split rows (it changes only a CPU run's rounding, not what it
    computes), but the README counts it as part of a run's identity, so a row that mixes
    counts says so rather than silently; runs without a recorded count (GPU runs, older
    records) are named too where others have one.
    """
    if runs.empty or "cpu_threads" not in runs:
        return []
    notes = []
    for (method, variant, train, dataset, setting), group in runs.groupby(EVAL_ROW_KEY, sort=True):
        counts = {_threads_text(t) for t in group["cpu_threads"]}
        if len(counts) < 2:
            continue
        per_fold = {int(fold): " and ".join(sorted({_threads_text(t) for t in of_fold["cpu_threads"]}))
                    for fold, of_fold in group.groupby("fold")}
        notes.append(f"{row_label(method, variant)}, {eval_label(train, dataset)} setting {setting}: its runs were "
                     f"computed with different CPU thread counts ({_folds_text(per_fold, str)}); averaged in one row, "
                     "since the thread count changes only a CPU run's last digits, not what it computes")
    return notes


def method_code_id(meta: dict[str, Any]) -> str:
    """The first 8 hex digits of the SHA-256 of the method's code a record ran (``run.json``
    ``code.method_code_sha256``: its file and the modules of its package it imports); ``""``
    for records that do not say."""
    code = meta.get("code")
    digest = code.get("method_code_sha256") if isinstance(code, dict) else None
    return str(digest)[:8] if digest else ""


def mixed_code_notes(runs: pd.DataFrame) -> list[str]:
    """A note per table row whose folds ran different code of their method.

    A run is identified by its configuration and inputs, not by its code (a finished run is
    kept when the code changes), so a row can average folds computed before and after an
    edit of the method. Such a row is not split (most edits change no number), but said, with
    the folds of each version; records that do not name their code are left out.
    """
    if runs.empty or "method_code" not in runs:
        return []
    notes = []
    for (method, variant, train, dataset, setting), group in runs.groupby(EVAL_ROW_KEY, sort=True):
        known = group[group["method_code"] != ""]
        if known["method_code"].nunique() < 2:
            continue
        per_fold = {int(fold): " and ".join(sorted(set(of_fold["method_code"])))
                    for fold, of_fold in known.groupby("fold")}
        notes.append(f"{row_label(method, variant)}, {eval_label(train, dataset)} setting {setting}: its runs ran "
                     f"different code of the method ({_folds_text(per_fold, lambda c: f'method code {c}')}; "
                     "run.json code.method_code_sha256); averaged in one row, since a run is identified by its "
                     "configuration and inputs: rerun the older folds (remove their run folders first) if the "
                     "change could move a number")
    return notes


def seeds_per_fold(runs: pd.DataFrame) -> dict[tuple, dict[int, tuple[int, ...]]]:
    """(method, variant, train_dataset, dataset, setting) -> fold -> its seeds, sorted."""
    if runs.empty:
        return {}
    out: dict[tuple, dict[int, tuple[int, ...]]] = {}
    for key, group in runs.groupby([*EVAL_ROW_KEY, "fold"], sort=True):
        *row, fold = key
        out.setdefault(tuple(row), {})[int(fold)] = tuple(sorted({int(s) for s in group["seed"]}))
    return out


def uneven_seeds(seeds: dict[int, tuple[int, ...]]) -> bool:
    """Whether the folds of one row were averaged over different numbers of seeds."""
    return len({len(s) for s in seeds.values()}) > 1


def seeds_text(seeds: dict[int, tuple[int, ...]]) -> str:
    """``fold 0: seeds 0,1; folds 1,2: seed 0``: which folds have which seeds."""
    return _folds_text({fold: ",".join(map(str, s)) for fold, s in seeds.items()},
                       lambda text: f"seed{'s' if ',' in text else ''} {text}")


def uneven_seed_rows(results: "Results") -> dict[tuple, str]:
    """(method, variant, train_dataset, dataset, setting) -> :func:`seeds_text`, for every
    evaluation of a row whose folds have unequal seed counts: its fold scores, each the mean
    over that fold's seeds, average a several-seed fold with a one-seed fold (the mean
    weighs them alike), so it is neither the one-seed nor the several-seed protocol."""
    return {key: seeds_text(seeds) for key, seeds in seeds_per_fold(results.runs).items() if uneven_seeds(seeds)}


def expected_folds(results: "Results") -> dict[tuple, int]:
    """(method, variant, train_dataset, dataset, setting) -> the folds of its test dataset
    (:func:`dataset_fold_count`; the most its runs record; :data:`~.rows.N_FOLDS` for runs frames
    without the column)."""
    runs = results.runs
    if runs.empty:
        return {}
    if "dataset_folds" not in runs:
        return {tuple(key): N_FOLDS for key in runs[EVAL_ROW_KEY].drop_duplicates().itertuples(index=False)}
    counts = runs.groupby(EVAL_ROW_KEY, sort=True)["dataset_folds"].max()
    return {tuple(key): int(n) for key, n in counts.items()}


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
    """Per (method, variant, evaluation, fold, organ, case_id): Dice averaged over seeds.

    ``seeds`` lists the seeds averaged (``0,1,2``), ``n_seeds`` counts them. Two rows of
    this frame are not a pair unless their seeds agree: a volume's mean over three trainings
    beside another method's single training differs by training variance as well as by
    method. The paired statistics pair the seed-level rows instead
    (:func:`fsmis_bench.reporting.stats.pair_volumes`).
    """
    keys = ["method", "variant", "train_dataset", "dataset", "setting", "fold", "organ", "case_id"]
    if results.cases.empty:
        return pd.DataFrame(columns=[*keys, "dice", "n_seeds", "seeds"])
    return (
        results.cases.groupby(keys, sort=True)
        .agg(dice=("dice", "mean"), n_seeds=("seed", "nunique"),
             seeds=("seed", lambda s: ",".join(str(v) for v in sorted({int(x) for x in s}))))
        .reset_index()
    )


def absent_volumes(results: Results) -> dict[tuple, dict[str, dict[int, tuple[str, ...]]]]:
    """(method, variant, train_dataset, dataset, setting) -> organ -> fold -> the query scans
    left out of that organ's score in that fold for not showing it (``Results.absent``; the
    same for every seed of a fold, as it is a property of the data)."""
    out: dict[tuple, dict[str, dict[int, tuple[str, ...]]]] = {}
    absent = results.absent
    if absent.empty:
        return out
    for key, group in absent.groupby([*EVAL_ROW_KEY, "organ", "fold"], sort=True):
        *row, organ, fold = key
        cases = tuple(sorted(set(group["case_id"].astype(str)), key=_case_sort_key))
        out.setdefault(tuple(row), {}).setdefault(str(organ), {})[int(fold)] = cases
    return out


def _case_sort_key(case: str) -> tuple[int, int | str]:
    """Numeric case ids in numeric order (``2`` before ``10``), then the others."""
    return (0, int(case)) if case.isdigit() else (1, case)


def absent_text(folds: dict[int, tuple[str, ...]]) -> str:
    """``2 query volumes left out (fold 0: scan 5; fold 3: scan 12)`` for one organ of a row."""
    n = sum(len(cases) for cases in folds.values())
    where = "; ".join(f"fold {fold}: scan{'s' if len(cases) > 1 else ''} {', '.join(cases)}"
                      for fold, cases in sorted(folds.items()))
    return f"{n} query volume{'s' if n != 1 else ''} left out ({where})"


def run_backbones(results: Results) -> dict[tuple[str, str], str]:
    """(method, variant) -> the runs' backbone (``none`` for methods without one)."""
    runs = results.runs.drop_duplicates(["method", "variant"])
    return {(m, v): str(b) for m, v, b in zip(runs["method"], runs["variant"], runs["backbone"])}


def run_flags(results: Results) -> pd.DataFrame:
    """Per (method, variant): random weights (and why: :func:`~.rows.random_weights_reason`, the
    reasons ``;``-joined) and non-standard options (union over runs)."""
    rows = []
    for (method, variant), group in results.runs.groupby(["method", "variant"], sort=True):
        options = sorted({o for text in group["non_standard"] for o in text.split(";") if o})
        reasons = sorted({r for r in group["random_reason"] if r})
        rows.append({
            "method": method,
            "variant": variant,
            "random_weights": bool(group["random_weights"].any()),
            "random_reason": ";".join(reasons),
            "non_standard": ";".join(options),
        })
    return pd.DataFrame(rows, columns=["method", "variant", "random_weights", "random_reason", "non_standard"])


#: the ``--format csv`` / ``tables/fold_scores.csv`` columns. One row per (method, variant,
#: train_dataset, dataset, setting, fold, organ), so that key is unique: ``variant`` tells
#: apart runs that must not be averaged (backbone, random weights, non-standard options,
#: another configuration), ``train_dataset`` a cross-domain evaluation from an in-domain one.
FOLD_CSV_COLUMNS = [
    "method", "variant", "train_dataset", "dataset", "setting", "fold", "organ", "dice", "n_seeds", "markers",
]


def long_fold_csv(results: Results) -> pd.DataFrame:
    """The ``--format csv`` output: organ score per fold, long format, Dice in 0..1.

    Columns :data:`FOLD_CSV_COLUMNS`: ``dice`` is the fold's organ score (per the run's
    ``protocol.dice``) averaged over ``n_seeds`` seeds; ``markers`` lists ``incomplete``
    (fewer folds than the test dataset has, :func:`dataset_fold_count`), ``uneven_seeds``
    (the row's folds have different numbers of seeds, :func:`uneven_seed_rows`),
    ``random_weights`` and ``non_standard:<options>``, ``;``-separated.
    """
    scores = results.fold_scores.copy()
    flags = run_flags(results)
    if scores.empty:
        return pd.DataFrame(columns=[
            *FOLD_CSV_COLUMNS,
        ])
    scores = scores.merge(flags, on=["method", "variant"], how="left")
    complete = _fold_counts(scores)
    scores = scores.merge(complete, on=EVAL_ROW_KEY)
    wanted, uneven = expected_folds(results), uneven_seed_rows(results)
    keys = list(zip(*(scores[c] for c in EVAL_ROW_KEY)))
    scores["markers"] = [
        ";".join(m for m, on in (
            ("incomplete", n < wanted.get(key, N_FOLDS)),
            ("uneven_seeds", key in uneven),
            ("random_weights", bool(r)),
            ("non_standard:" + ns if ns else "", bool(ns)),
        ) if on)
        for key, n, r, ns in zip(keys, scores["n_folds"], scores["random_weights"], scores["non_standard"])
    ]
    scores["_organ"] = scores["organ"].map(organ_sort_key)
    scores["_dataset"] = scores["dataset"].map(dataset_sort_key)
    scores = scores.sort_values(["method", "variant", "_dataset", "train_dataset", "setting", "fold", "_organ"])
    return scores[FOLD_CSV_COLUMNS].reset_index(drop=True)


def _fold_counts(scores: pd.DataFrame) -> pd.DataFrame:
    """Folds present per evaluation: the fewest over its organs."""
    keys = ["method", "variant", "train_dataset", "dataset", "setting"]
    per_organ = scores.groupby([*keys, "organ"])["fold"].nunique().reset_index(name="n")
    return per_organ.groupby(keys)["n"].min().reset_index(name="n_folds")


def _joined(values: pd.Series) -> str:
    """``0,1,2`` from the distinct values (``?`` for unknown ones)."""
    known = sorted({int(v) for v in values if not pd.isna(v)})
    text = ",".join(str(v) for v in known)
    return text + (",?" if text and values.isna().any() else "?" if values.isna().any() else "")


def summarise_runs(results: Results) -> pd.DataFrame:
    """One row per (method, variant, evaluation): folds, seeds, training steps and run count,
    for the report's Runs section.

    ``seeds`` lists the seeds (``0,1``) where every fold has the same ones, else which
    folds have which (``fold 0: seeds 0,1; fold 1: seed 0``, :func:`seeds_text`): the row
    averages folds over unequal seed counts, which a plain list would hide.
    """
    columns = ["method", "variant", "train_dataset", "dataset", "setting", "folds", "seeds", "steps", "runs"]
    if results.runs.empty:
        return pd.DataFrame(columns=columns)
    keys = ["method", "variant", "train_dataset", "dataset", "setting"]
    summary = (
        results.runs.groupby(keys)
        .agg(
            folds=("fold", lambda s: ",".join(str(v) for v in sorted(set(s)))),
            seeds=("seed", lambda s: ",".join(str(v) for v in sorted(set(s)))),
            steps=("steps", _joined),
            runs=("run_dir", "count"),
        )
        .reset_index()
    )
    per_fold = seeds_per_fold(results.runs)
    summary["seeds"] = [
        seeds_text(per_fold[key]) if key in per_fold and len({s for s in per_fold[key].values()}) > 1 else text
        for key, text in zip(zip(*(summary[c] for c in keys)), summary["seeds"])
    ]
    return summary[columns]


__all__ = [
    "N_FOLDS", "ORGAN_ORDER", "Results", "load_results", "load_published", "variant_key",
    "row_label", "per_case_scores", "long_fold_csv", "fold_organ_score", "compute_fold_scores",
    "default_results_dir", "summarise_runs", "run_flags", "PUBLISHED_CITATION",
    "organ_sort_key", "dataset_sort_key", "organ_label", "dataset_label", "eval_label",
    "published_backbone", "published_name", "published_row_applies", "exclusion_caveat", "comparison_caveat", "printed_mean_note", "PRINTED_MEAN_NOTE", "run_backbones", "LEGACY_EXCLUSION_NOTE", "config_fingerprint", "published_deviations", "FOLD_CSV_COLUMNS",
    "RUN_COLUMNS", "random_weights_reason", "read_config", "RANDOM_WEIGHTS_NOTES", "random_weights_note",
    "dataset_fold_count", "expected_folds", "uneven_seed_rows", "seeds_per_fold", "seeds_text", "mixed_thread_notes", "mixed_code_notes", "method_code_id", "select_rows",
    "EXCLUSION_ALL_NOTE", "LEGACY_EXCLUSION_OPTION", "only_legacy_exclusion", "EVAL_ROW_KEY",
    "ABSENT_COLUMNS", "absent_volumes", "absent_text",
]