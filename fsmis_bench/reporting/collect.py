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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from .. import records
from ..data.base import ORGANS
from ..errors import FsmisError
from ..records import data_identity_hash
from .style import dataset_display, eval_display, organ_display

#: folds of the built-in datasets in the EP1 protocol (PROTOCOL.md §2), and of any dataset
#: whose record does not say how many it has (:func:`dataset_fold_count`)
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
    method without a backbone). Runs that differ in any other setting (training steps, lr,
    ...) are told apart afterwards by their configuration fingerprint
    (:func:`_split_by_config`), and runs on other data by their data identity.
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
    """Whether a run's weights were random: its record's ``random_weights`` (what the method's
    ``uses_random_weights()`` said) where the record has it, so that ``pretrained=false`` on a
    method without pretrained weights (``prototype``, a plugin) is not random weights; a
    record written before that field by ``pretrained: false``."""
    if meta.get("random_weights") is not None:
        return bool(meta["random_weights"])
    return meta.get("pretrained") is False


def non_standard_options(meta: dict) -> list[str]:
    """Protocol options other than the default, without the random-weights flag."""
    return sorted(str(x) for x in (meta.get("non_standard") or []) if str(x) != "random_weights")


def random_weights_reason(backbone: str, pretrained: bool, random_weights: bool) -> str:
    """Why a run has random weights, in the words of the report's notes ('' if it has none).

    ``tiny``: the CPU backbone, a small U-Net that is always trained from scratch (no
    pretrained weights exist for it); ``pretrained=false``: the pretrained architectures built
    with random weights on request; ``missing``: pretrained weights were expected but not
    found, so the method fell back to random ones.
    """
    if not random_weights:
        return ""
    if backbone == "tiny":
        return "tiny"
    if not pretrained:
        return "pretrained=false"
    return "missing"


#: what a random-weights footnote or legend says, per :func:`random_weights_reason`
RANDOM_WEIGHTS_NOTES: dict[str, str] = {
    "tiny": "trained from scratch: the tiny CPU backbone (a small U-Net with random initial weights, "
            "not the pretrained SD architecture; no pretrained weights exist for it)",
    "pretrained=false": "random weights (pretrained=false): the pretrained architecture, randomly initialised",
    "missing": "random weights: the pretrained weights were not found, so the architecture was randomly initialised",
}


def random_weights_note(reason: str) -> str:
    """The footnote text for one reason (:data:`RANDOM_WEIGHTS_NOTES`; a generic one otherwise)."""
    return RANDOM_WEIGHTS_NOTES.get(reason, "random weights: not initialised from pretrained weights")


# -- a run's configuration ---------------------------------------------------------------

#: config keys left out of a run's configuration fingerprint: what identifies the
#: evaluation (its own columns: fold, seed, setting, the datasets; data on disk is compared
#: through the data identity instead), options that never change a number (paths, device,
#: logging and checkpoint cadence, saving predictions, ``records._UNHASHED``) and the
#: published-config annotation (it marks runs, it is not a setting)
FINGERPRINT_LEFT_OUT: tuple[str, ...] = (
    "fold", "seed", "setting", "dataset", "test_dataset", "protocol.test_dataset",
    "protocol.save_predictions", "train.log_every", "train.checkpoint_every", "method.published_config",
    *records._UNHASHED,
)
#: at most this many differing keys name a split row (``train.steps=60,method.lr=0.01``);
#: configurations that differ in more are named by their fingerprint (``config=1a2b3c4d``)
MAX_LABEL_KEYS = 3


def read_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.yaml`` as plain nested dicts (None if missing or unreadable)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a damaged config only loses the fingerprint
        return None
    return data if isinstance(data, dict) else None


def _lookup(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in nested dicts."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 60}}`` -> ``{"train.steps": 60}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_fingerprint(config: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The identity of a run's training and method settings, beyond its variant key.

    Args:
        config: the run's resolved ``config.yaml`` (:func:`read_config`); None if unknown.
    Returns:
        (8 hex digits, or '' when the config is unknown; the flattened settings it covers:
        dotted key -> value, null values left out). Two runs with the same fingerprint were
        configured alike in everything that can change their numbers, apart from fold, seed
        and data; an option set to null and one a record lacks (made before the option
        existed) count as the same, unset.
    """
    if config is None:
        return "", {}
    data = json.loads(json.dumps(config, default=str))  # a deep copy with plain values
    for key in FINGERPRINT_LEFT_OUT:
        records._drop(data, key)
    # switches added after records existed count only where they differ from the default
    for key, default in records._HASHED_UNLESS_DEFAULT.items():
        found, value = _lookup(data, key)
        if found and value == default:
            records._drop(data, key)
    _resolve_late_options(config, data)
    _resolve_null_options(config, data)
    # a null option the method does not resolve means "the method's default", which is also
    # what a record made before the option existed ran with: both count as unset
    flat = {key: value for key, value in _flatten(data).items() if value is not None}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:8]
    return digest, flat


def _resolve_late_options(config: dict[str, Any], data: dict[str, Any]) -> None:
    """Put a method's late options (:attr:`fsmis_bench.method.Method.late_options`) into
    ``data`` as they acted: a record made before an option existed ran with its earlier
    value, a null one with what it resolves to (e.g. from ``fidelity``). Else a record of
    the earlier form and a run of today's default would count as one configuration, and be
    averaged into one row."""
    from omegaconf import OmegaConf

    method = config.get("method")
    if not isinstance(method, dict) or not isinstance(data.get("method"), dict):
        return
    run_config = OmegaConf.create(config)
    method_cls = records.method_class(run_config)
    if method_cls is None or not method_cls.late_options:
        return
    try:
        resolved = method_cls.late_option_values(run_config)
    except Exception:  # noqa: BLE001 - a config of an older layout: left as it is
        return
    for name, earlier in method_cls.late_options.items():
        data["method"][name] = resolved[name] if name in method else earlier


def _resolve_null_options(config: dict[str, Any], data: dict[str, Any]) -> None:
    """Put the method options that are ``null`` (or that a record made before them lacks) into
    ``data`` as the method resolves them (:meth:`fsmis_bench.method.Method.option_values`,
    e.g. SD-FSMIS's threshold from ``fidelity``): a run of ``method.threshold=null`` and one of
    the value it stands for are one configuration, and a row is named by the value
    (``method.threshold=absolute``), not by ``default``. Options left out of the fingerprint
    and the late ones (:func:`_resolve_late_options`) are not touched."""
    from omegaconf import OmegaConf

    method = data.get("method")
    if not isinstance(config.get("method"), dict) or not isinstance(method, dict):
        return
    run_config = OmegaConf.create(config)
    method_cls = records.method_class(run_config)
    if method_cls is None:
        return
    try:
        resolved = method_cls.option_values(run_config)
    except Exception:  # noqa: BLE001 - a config of an older layout: left as it is
        return
    kept_out = {key.split(".", 1)[1] for key in (*FINGERPRINT_LEFT_OUT, *records._HASHED_UNLESS_DEFAULT)
                if key.startswith("method.")}
    for name, value in resolved.items():
        if name not in kept_out and name not in method_cls.late_options and method.get(name) is None:
            method[name] = value


@lru_cache(maxsize=None)
def shipped_published_config(method: str) -> tuple[tuple[str, Any], ...]:
    """The ``published_config`` of ``method`` as this installation ships it (empty if none).

    Used for records written before the method had one, so that a reduced-budget run is
    marked in reports whenever it ran.
    """
    try:
        from omegaconf import OmegaConf

        from ..config import compose

        cfg = compose([f"method={method}"], resolve_datasets=False)
    except Exception:  # noqa: BLE001 - an uninstalled plugin or a broken config: nothing to compare
        return ()
    published = cfg.method.get("published_config")
    return tuple(OmegaConf.to_container(published).items()) if published else ()  # type: ignore[union-attr]


def published_deviations(method: str, config: dict[str, Any] | None) -> list[str]:
    """``key=value`` for every key of the method's ``published_config`` that the run changed.

    The same marks as :func:`fsmis_bench.records.published_config_deviations` writes into
    new records, recomputed from the run's ``config.yaml`` against the ``published_config``
    it recorded, else the one shipped now; keys the config lacks are not judged.
    """
    if not config or not isinstance(config.get("method"), dict):
        return []  # not a resolved run config (a hand-written or synthetic record)
    recorded = config["method"].get("published_config")
    published = list(recorded.items()) if isinstance(recorded, dict) and recorded else list(shipped_published_config(method))
    return records.published_marks(published, lambda key: _lookup(config, key))


def _label_value(value: Any) -> str:
    """A config value as shown in a row label (no ``,``: it separates the variant's parts)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(_label_value(v) for v in value)
    return str(value).replace(",", "+")


def row_label(method: str, variant: str) -> str:
    return method if not variant else f"{method} [{variant}]"


def dataset_fold_count(meta: dict[str, Any]) -> int:
    """How many folds the test dataset of a record has, as its record says.

    A row of a table is complete when it has every fold of the dataset it evaluated: five
    for the built-in datasets, but one for a ``nifti_folder`` of fewer than ten scans (a test
    set), one per other scan with ``folds=loo``. Read, in this order: ``inputs.test_data``
    ``n_folds`` (a count a dataset may record), its ``folds`` (``nifti_folder`` records the
    scan ids of each fold), the fixed folds of the built-in preprocessed datasets
    (:data:`fsmis_bench.protocol.folds.FOLDS`), the phantom's (from its recorded
    ``n_cases``, as it defines them); else :data:`N_FOLDS`, so that a record made before
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
    "dataset_folds", "cpu_threads",
]


class DamagedRun(Exception):
    """A finished run whose record cannot be trusted; the report skips it with a note."""


#: Dice in cases.csv must equal 2tp / (2tp + fp + fn) to this tolerance
DICE_TOLERANCE = 1e-6


def _read_run(run_dir: Path) -> tuple[dict, pd.DataFrame, dict[str, Any]]:
    """One finished run's row for ``runs``, its checked ``cases`` frame and its settings
    (the flattened config that its fingerprint covers; :func:`config_fingerprint`).

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
    # written before the method declared its published_config are judged by the shipped one
    flags += [m for m in published_deviations(str(meta["method"]), config) if m not in flags]
    meta = {**meta, "non_standard": flags}
    found, steps = _lookup(config or {}, "train.steps")
    if meta.get("weights_from") == "none":
        steps, found = 0, True  # a method that trains nothing (support_copy) took no steps, whatever the config says
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


def _split_variants(runs: pd.DataFrame, column: str, tags_of) -> pd.DataFrame:
    """Within each row of a table (method, variant, evaluation, setting) whose runs take
    several values of ``column``, append ``tags_of(group)[index]`` to each run's variant."""
    if runs.empty:
        return runs
    runs = runs.copy()
    for _, group in runs.groupby(["method", "variant", "train_dataset", "dataset", "setting"], sort=False):
        if group[column].nunique() < 2:
            continue
        for index, tag in tags_of(group).items():
            variant = runs.at[index, "variant"]
            runs.at[index, "variant"] = f"{variant},{tag}" if variant else tag
    return runs


def _absent_label(name: str) -> str:
    """The label of a setting a run's fingerprint lacks: a switch added after records existed
    is left out at its default (:func:`config_fingerprint`), which is what the run had; any
    other option was null (the method's own default, where the method does not resolve it:
    :meth:`~fsmis_bench.method.Method.option_values`) or unknown to the record (made before
    the option existed: the default of that time)."""
    if name in records._HASHED_UNLESS_DEFAULT:
        return _label_value(records._HASHED_UNLESS_DEFAULT[name])
    return "default"


def _split_by_config(runs: pd.DataFrame, settings: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """Runs of one method/variant configured differently get different variants.

    Where one (method, variant) has runs of several configuration fingerprints
    (:func:`config_fingerprint`: e.g. 40 training steps on folds 0-1 and 60 on fold 2) in one
    evaluation, they would otherwise be averaged into one row, or one would silently
    supersede the other. Then every run of that method/variant, in every evaluation, gets the
    settings that differ between its configurations as its variant tag (``train.steps=60``),
    so that one configuration has one name and one style across the whole report, also in an
    evaluation where it ran alone. With more than :data:`MAX_LABEL_KEYS` differing keys the
    tag is ``config=<fingerprint>``, and a note lists what each such fingerprint sets;
    ``config=unknown`` for records without a ``config.yaml``.

    Args:
        settings: run folder -> its flattened settings (the second value of
            :func:`config_fingerprint`).
    Returns:
        (the runs with split variants, the notes naming the settings behind fingerprints).
    """
    if runs.empty:
        return runs, []
    runs = runs.copy()
    notes: list[str] = []
    evaluation = ["train_dataset", "dataset", "setting"]
    for (method, variant), group in runs.groupby(["method", "variant"], sort=False):
        if not (group.groupby(evaluation, sort=False)["config_id"].nunique() > 1).any():
            continue
        known = {cid: settings.get(path, {}) for cid, path in zip(group["config_id"], group["run_dir"]) if cid}
        missing = object()  # a key one config has and another lacks differs too
        names = sorted({name for flat in known.values() for name in flat})
        differing = [name for name in names
                     if len({json.dumps(flat.get(name, missing), default=repr, sort_keys=True) for flat in known.values()}) > 1]

        def setting_text(flat: dict[str, Any], name: str) -> str:
            return f"{name}={_label_value(flat[name]) if name in flat else _absent_label(name)}"

        named_by_settings = bool(differing) and len(differing) <= MAX_LABEL_KEYS
        for index, cid in group["config_id"].items():
            if not cid:
                tag = "config=unknown"
            elif named_by_settings:
                tag = ",".join(setting_text(known[cid], name) for name in differing)
            else:
                tag = f"config={cid}"
            runs.at[index, "variant"] = f"{variant},{tag}" if variant else tag
        if not named_by_settings:
            for cid in sorted(known):
                # without `differing`, the other configuration is that of records with no config.yaml
                notes.append(f"{row_label(method, variant)} [config={cid}]: "
                             + (", ".join(setting_text(known[cid], name) for name in differing) if differing
                                else "differs from the config=unknown runs, which have no config.yaml to say how"))
    return runs, notes


def _split_by_data(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method/variant/evaluation on different data get different variants.

    The data identity (``run.json`` ``inputs``: the training and test data's identity) is
    normally the same for every run of a dataset; where it is not (two ``nifti_folder``
    runs on different folders, supervoxels regenerated between folds), averaging or
    superseding across them would mix data silently, so each gets ``data=<hash8>``
    (``data=unknown`` for records from before identities were recorded).
    """
    return _split_variants(runs, "data_id",
                           lambda group: {i: f"data={d or 'unknown'}" for i, d in group["data_id"].items()})


def _split_by_weights(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method/variant/evaluation that loaded different pretrained weights get
    different variants, ``weights=<hash8>`` (``weights=unknown`` for records from before
    weights were recorded): the same hub id or path can hold other files on another machine
    or after an update, and averaging across them would mix two models silently."""
    return _split_variants(runs, "weights_id",
                           lambda group: {i: f"weights={w or 'unknown'}" for i, w in group["weights_id"].items()})


def plugin_release(meta: dict[str, Any]) -> str:
    """``<distribution>-<version>`` of the third-party package whose plugin registered a
    record's method (``run.json`` ``registered_by``), ``""`` for fsmis-bench's own methods
    and records that do not say; ``"<distribution>-0.2.0 (weights 0.1.0)"`` where the run
    evaluated weights that another release trained (``weights_trained_by``). A plugin's release is not part of a run's hash, so two
    releases' runs of one configuration would otherwise be averaged into one row."""
    entry = (meta.get("registered_by") or {}).get("method") or {}
    distribution = entry.get("distribution") if isinstance(entry, dict) else None
    if not distribution or distribution == "fsmis-bench":
        return ""
    release = f"{distribution}-{entry.get('version') or 'unknown'}"
    # weights reused from a sibling training made by another release: both releases count
    trainers = {str((t.get("registered_by") or {}).get("version") or "unknown")
                for t in (meta.get("weights_trained_by") or {}).values() if isinstance(t, dict)}
    trained = sorted(trainers - {str(entry.get("version") or "unknown")})
    return release + (f" (weights {', '.join(trained)})" if trained else "")


def _split_by_plugin_release(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method/variant/evaluation computed by different releases of the plugin
    that registered the method get different variants, ``code=<distribution>-<version>``:
    a new release may compute other numbers for the same configuration."""
    return _split_variants(runs, "code_id",
                           lambda group: {i: f"code={c or 'unknown'}" for i, c in group["code_id"].items()})


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


def _dice_differ_text(mean_dice: dict[str, float], dropped: str, kept: str, threads_differ: bool = False) -> str:
    """``; their Dice differ (...)`` when two runs that should be identical are not, else ``""``.

    Args:
        threads_differ: the two recorded different CPU thread counts, which explains
            differing last digits (a CPU's float sums depend on how many threads share them).
    """
    a, b = mean_dice.get(dropped), mean_dice.get(kept)
    if a is None or b is None or abs(a - b) <= DICE_TOLERANCE:
        return ""
    why = ("as expected from their CPU thread counts (a CPU's float sums depend on how many threads share them)"
           if threads_differ else "the same configuration gave other numbers (nondeterminism, or a record edited by hand)")
    return f"; their Dice differ (mean over cases.csv {a:.4f} superseded, {b:.4f} kept): {why}"


def _threads_text(threads: object) -> str:
    """``2 CPU threads``, ``1 CPU thread``; ``no CPU thread count`` where none was recorded."""
    if threads is None or pd.isna(threads):
        return "no CPU thread count"
    return f"{int(threads)} CPU thread{'s' if int(threads) != 1 else ''}"


def _superseded_note(path: str, kept: str, threads: tuple[object, object], mean_dice: dict[str, float]) -> str:
    """The note on one superseded record; says so where the two differ in CPU thread count
    (which the identity of a superseding run leaves out on purpose, see :func:`_drop_superseded`)."""
    dropped_threads, kept_threads = threads
    if _threads_text(dropped_threads) != _threads_text(kept_threads):
        return (f"superseded by a later run with the same method, variant, configuration, data, weights, plugin release, "
                f"fold and seed that differs only in its CPU thread count: {path} ({_threads_text(dropped_threads)}, "
                f"not counted; kept {kept}, {_threads_text(kept_threads)})"
                + _dice_differ_text(mean_dice, path, kept, threads_differ=True))
    return (f"superseded by a later run with the same method, variant, configuration, data, weights, plugin release, "
            f"fold and seed: {path} (kept {kept})" + _dice_differ_text(mean_dice, path, kept))


def _drop_superseded(runs: pd.DataFrame, mean_dice: dict[str, float] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Keep one run per (method, variant, evaluation, fold, seed, configuration, data,
    weights): the latest finished.

    Only runs configured identically (same :func:`config_fingerprint`) on identical data
    and weights (same data and weights identities) supersede each other: they differ in
    nothing that changes a number (e.g. ``train.log_every``, the folder the weights were
    read from) and counting both would weigh that fold twice. Runs configured differently
    are never dropped; :func:`_split_by_config` has made them separate rows.

    The CPU thread count (``inputs.cpu_threads``) is part of a run's record identity but not
    of this one: it changes only a CPU run's rounding (last digits), not what was computed,
    so two runs of one fold and seed that differ in it are the same measurement twice, and
    counting both would weigh that fold twice. The later is kept and the note says that the
    thread count is the difference (:func:`mixed_thread_notes` says where a row's folds
    used different counts).

    Args:
        mean_dice: run folder -> its mean Dice over ``cases.csv``; the note says when a
            superseded run's differs from the kept one's (they should be equal).
    """
    if runs.empty:
        return runs, []
    mean_dice = mean_dice or {}
    identity = ["method", "variant", "train_dataset", "dataset", "setting", "fold", "seed", "config_id", "data_id",
                "weights_id", "code_id"]
    ordered = runs.sort_values(["finished_at", "run_dir"])
    duplicated = ordered.duplicated(identity, keep="last")
    kept = ordered[~ordered.duplicated(identity, keep="last")].set_index(identity)["run_dir"]
    threads = dict(zip(ordered["run_dir"], ordered["cpu_threads"])) if "cpu_threads" in ordered else {}
    notes = []
    for path, row in zip(ordered.loc[duplicated, "run_dir"], ordered.loc[duplicated, identity].itertuples(index=False)):
        keeper = kept.loc[tuple(row)]
        notes.append(_superseded_note(path, keeper, (threads.get(path), threads.get(keeper)), mean_dice))
    return ordered[~duplicated].sort_index().reset_index(drop=True), notes


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
    (:func:`dataset_fold_count`; the most its runs record; :data:`N_FOLDS` for runs frames
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
    """Per (method, variant): random weights (and why: :func:`random_weights_reason`, the
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


@lru_cache(maxsize=1)
def reported_backbones() -> frozenset[str]:
    """The backbones the shipped published tables name (``sd15``, ``sd21``), read once."""
    return frozenset(published_backbone(b) for b in load_published()["backbone"] if b)


def published_row_applies(method: str, run_backbone: str, row_backbone: str) -> bool:
    """Whether a published row of ``method`` on ``row_backbone`` (the CSV's text, empty for
    the paper's default configuration) is the counterpart of a run on ``run_backbone``.

    A row naming a backbone is the counterpart of runs on that backbone only. A default row
    is the counterpart of runs on the method's default backbone (``Display.published_backbone``;
    any backbone where the plugin names none) and of stand-ins the paper never ran (the
    ``tiny`` CPU backbone), but not of runs on another backbone the paper reports: an SD-2.1
    run is not compared with the paper's SD-1.5 numbers.
    """
    from .style import method_style

    if row_backbone:
        return published_backbone(row_backbone) == run_backbone
    default = method_style(method).published_backbone
    if not default or run_backbone == default:
        return True
    return run_backbone not in reported_backbones()


#: why a setting-2 run is not like-for-like with the published setting-2 numbers
#: (PROTOCOL.md §4): they were made with the legacy exclusion, runs default to ``any``
LEGACY_EXCLUSION_NOTE = ("the published setting-2 numbers were made with the legacy exclusion (training drops only "
                         "slices that show all four test organs at once), which leaves most test-organ slices in "
                         "training; runs use the stricter exclusion=any unless marked [exclusion=all]")


EXCLUSION_CAVEAT = "published: legacy exclusion (all four organs); this run: exclusion=any (stricter)"

#: the non-standard option that is the published setting-2 numbers' own rule
LEGACY_EXCLUSION_OPTION = "exclusion=all"

#: what a footnote says of a run whose only non-standard option is :data:`LEGACY_EXCLUSION_OPTION`:
#: not the benchmark's standard protocol, but the rule of the published setting-2 numbers, so
#: the generic "not comparable with published numbers" would say the opposite of the truth
EXCLUSION_ALL_NOTE = ("[exclusion=all]: the legacy setting-2 exclusion (training drops only slices that show all "
                      "four test organs at once), not the benchmark's standard, stricter exclusion=any, but the "
                      "rule the published setting-2 numbers used, so comparable with them")


def only_legacy_exclusion(options: str) -> bool:
    """Whether ``options`` (``;``-joined non-standard options) are exclusion=all alone."""
    return [o for o in options.split(";") if o] == [LEGACY_EXCLUSION_OPTION]


def exclusion_caveat(setting: int, options: str) -> str:
    """``LEGACY_EXCLUSION_NOTE``'s short form for a run of ``setting`` whose non-standard
    options are ``options`` (``;``-joined), or ``""`` where the exclusions agree."""
    if int(setting) != 2 or "exclusion=all" in options.split(";"):
        return ""
    return EXCLUSION_CAVEAT


#: short forms of :data:`RANDOM_WEIGHTS_NOTES` for a caveat cell (``; ``-joined, so none
#: holds a ``;``)
RANDOM_WEIGHTS_CAVEATS: dict[str, str] = {
    "tiny": "random weights: the tiny CPU backbone trained from scratch, not the pretrained SD architecture",
    "pretrained=false": "random weights (pretrained=false)",
    "missing": "random weights: the pretrained weights were not found",
}


#: how far (Dice %) a printed mean may lie from the average of the printed organ values,
#: which are rounded to two decimals themselves
_PRINTED_ROUNDING = 0.011
#: the words of :func:`printed_mean_note` that a caption looks for
PRINTED_MEAN_NOTE = "is not the average of the published organ values"


def printed_mean_note(mean: float, organs: Sequence[float]) -> str:
    """A caveat where a paper's printed mean is not the average of its printed organ values
    ('' otherwise, or with fewer than two organs). A measured mean is the organ average, so
    its difference from such a printed mean is partly the paper's own arithmetic (e.g. PANet
    on Abd-CT in SD-FSMIS Table 1: 32.86 printed, 31.86 the average of its four organs)."""
    if len(organs) < 2:
        return ""
    average = sum(organs) / len(organs)
    if abs(average - mean) <= _PRINTED_ROUNDING:
        return ""
    return f"the published mean {mean:.2f} {PRINTED_MEAN_NOTE} ({average:.2f}), as printed in the paper"


def comparison_caveat(method: str, setting: int, options: str, random_reasons: str = "",
                      n_folds: int | None = None, of_folds: int = N_FOLDS) -> str:
    """Why a run of ``method`` is not like-for-like with its published number, ``; ``-joined,
    ``""`` where it is: what the figures' footnotes mark, so that the CSV a caption points to
    says it too.

    Args:
        options: the run's non-standard options (``;``-joined): a reduced budget
            (``train.steps=30``) or a protocol option; ``exclusion=all`` is left out (it is
            the published setting-2 exclusion, see :func:`exclusion_caveat`).
        random_reasons: why it has random weights (:func:`random_weights_reason`, ``;``-joined).
        n_folds: folds behind the value; fewer than ``of_folds`` are said.
        of_folds: the folds of the evaluated dataset (:func:`dataset_fold_count`).
    Returns:
        the method's own caveat (``Display.published_caveat``), random weights, the
        non-standard options, missing folds and :func:`exclusion_caveat`.
    """
    from .style import method_style

    reasons = [r for r in random_reasons.split(";") if r]
    departures = [o for o in options.split(";") if o and o != "exclusion=all"]
    parts = [
        method_style(method).published_caveat,
        *(RANDOM_WEIGHTS_CAVEATS.get(r, "random weights") for r in reasons),
        "non-standard: " + ", ".join(departures) if departures else "",
        f"{n_folds} of {of_folds} folds" if n_folds is not None and n_folds < of_folds else "",
        exclusion_caveat(setting, options),
    ]
    return "; ".join(dict.fromkeys(p for p in parts if p))


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
    "dataset_fold_count", "expected_folds", "uneven_seed_rows", "seeds_per_fold", "seeds_text", "mixed_thread_notes",
    "EXCLUSION_ALL_NOTE", "LEGACY_EXCLUSION_OPTION", "only_legacy_exclusion", "EVAL_ROW_KEY",
    "ABSENT_COLUMNS", "absent_volumes", "absent_text",
]
