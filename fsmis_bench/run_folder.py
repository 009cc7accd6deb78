"""A run folder's lifecycle and record.

The results folder checked writable before any data is read; one process per run folder
(:func:`_exclusive`); ``run.json`` written, or taken up again when the run resumes
(:func:`_prepare_dir`); each evaluation part checked (:func:`_part_damage`) and the parts
put together into ``cases.csv`` and ``COMPLETE`` (:func:`_finish`); and a finished run's
damaged record repaired (:func:`_check_finished`). Used by :mod:`fsmis_bench.runner`.
"""

from __future__ import annotations

import fcntl
import io
import json
import re
import shutil
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .errors import ConfigError, DataWarning, FsmisError
from .protocol.metrics import fold_organ_scores
from .protocol.settings import EvalGroup
from .record_repair import DamagedRecordError, part_cases, rebuild_cases
from .records import (
    CASE_COLUMNS, COMPLETE, RUN_CONFIG_KEYS, atomic_write, can_write_in, code_differences, code_identity,
    config_hash, inference_options, load_predictions, machine_identity, nearest_existing, non_standard_options,
    now, package_versions, read_json, reference_config, registered_by, remove_unfinished_writes, run_config_problem,
    save_predictions, test_dataset_name, training_hash, write_error, write_json,
)
from .training.checkpoint import STATE_FILE, WEIGHTS_FILE, clear_training_state
from .training.engine import STEP_FILE
from .training.precision import precision_of

if TYPE_CHECKING:
    from .runner import RunIdentity, RunPlan


def _check_results_writable(cfg: DictConfig) -> None:
    """A results folder that cannot be written is refused before any data is read."""
    folder = Path(str(cfg.results_dir)).expanduser()
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise ConfigError(f"cannot write to {folder}: {existing} is a file, not a folder",
                          hint="choose another results_dir= (FSMIS_RESULTS_DIR)")
    if not can_write_in(existing):
        raise write_error(PermissionError(13, "Permission denied", str(existing / "x")), existing)


@contextmanager
def _exclusive(run_dir: Path, main_process: bool = True) -> Iterator[None]:
    """One process per run directory; the OS drops the lock if the process dies.

    A run folder created here is removed again when the run fails before computing
    anything, with the folders above it that were created for it and stayed empty
    (``<method>/<dataset>/setting<k>/fold<f>/``), so a failed start leaves no "running"
    record and no empty folders behind. The other processes of a multi-process run
    (``accelerate launch``) work under their main process's lock and write nothing to the
    record.
    """
    if not main_process:
        yield
        return
    created = _missing_folders(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    locked = False
    try:
        with open(run_dir / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"{run_dir} is being computed by another process right now",
                    hint="let that process finish; rerunning afterwards reuses its result",
                ) from None
            locked = True
            for leftover in remove_unfinished_writes(run_dir, recursive=True):
                tqdm.write(f"removed {leftover.relative_to(run_dir)}, a write that an interrupted "
                           f"process left unfinished ({run_dir})", file=sys.stderr)
            yield
    except BaseException:
        # Only the lock's holder may remove the folder: a process refused here may have
        # seen it missing a moment before the holder created it, and the holder's run
        # holds nothing computed yet in its first steps.
        if locked and created and not _holds_work(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
            for folder in created[1:]:
                try:
                    folder.rmdir()  # only when empty: another run may have started beside it
                except OSError:
                    break
        raise


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _holds_work(run_dir: Path) -> bool:
    """Whether a run folder holds anything computed (a checkpoint, a part, a log)."""
    bookkeeping = {".lock", "config.yaml", "run.json"}
    return any(p.is_file() and p.name not in bookkeeping for p in run_dir.rglob("*"))


def _prepare_dir(p: RunPlan, random_weights: bool, method_options: dict | None = None, device: str = "cpu") -> dict:
    cfg, run_dir, ident = p.cfg, p.run_dir, p.identity
    assert ident is not None
    full_hash = config_hash(cfg, ident.inputs, ident.hash_form)
    info_path = run_dir / "run.json"
    info = _record_or_none(info_path)
    kept: dict[str, Any] | None = None
    if info is None and info_path.exists():
        # An unfinished run's record holds nothing its rerun does not write again (its
        # checkpoints and parts are separate files), so it is rewritten rather than refused;
        # its history (start, resumptions) is kept where it can still be read.
        kept = _readable_history(info_path)
        lost = ("its history is kept" if {"resumed", "code", "machine"} <= kept.keys()
                else "what it said of the run's history is kept, the rest recorded as unknown")
        warnings.warn(f"{info_path} was damaged (unreadable JSON): written again ({lost}); the run resumes "
                      "from its checkpoints and parts", DataWarning, 2)
        info_path.unlink()
    if info is not None:
        if info.get("config_hash") != full_hash:
            raise ConfigError(
                f"{run_dir} holds a run with another config (hash prefix collision)",
                hint="move that directory away; fsmis-bench never overwrites a run",
            )
        if ident.supervoxels_generated:
            info.setdefault("supervoxels_generated", []).append({**ident.supervoxels_generated, "at": now()})
        info.setdefault("groups", [g.name for g in p.groups])  # records made before it was recorded
        # a resumed run may go on with other code or on another machine: each resumption says which
        info.setdefault("resumed", []).append({"at": now(), "code": code_identity(type(ident.method)),
                                               "machine": machine_identity(device)})
        write_json(info_path, info)
        return info
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    checkpoint = ident.inputs.get("checkpoint")
    info = {
        "method": str(cfg.method.name),
        "dataset": str(cfg.dataset.name),
        "test_dataset": test_dataset_name(cfg),
        "setting": int(cfg.setting),
        "fold": int(cfg.fold),
        "seed": int(cfg.seed),
        "backbone": str(cfg.backbone.name),
        "pretrained": bool(cfg.pretrained),
        "random_weights": random_weights,
        "fidelity": str(cfg.fidelity),
        "precision": precision_of(cfg).as_record(),
        "method_options": method_options or {},
        "protocol": OmegaConf.to_container(cfg.protocol, resolve=True),
        "non_standard": _marks(cfg, random_weights, checkpoint["sha256"] if checkpoint else None),
        # what the marks judged the run against: reports judge it the same, whatever ships later
        "reference_config": reference_config(cfg),
        "config_hash": full_hash,
        "training_hash": training_hash(cfg, ident.inputs, ident.hash_form),
        # Where the weights come from: trained by this run (or a sibling with the same
        # training hash), or an external checkpoint, which never counts as a `run`.
        "weights_from": "external_checkpoint" if checkpoint else ("training" if ident.method.needs_training else "none"),
        "inputs": ident.inputs,
        "evaluated": {e.organ: [q.case_id for q in e.queries] for g in p.groups for e in p.episodes[g.name]},
        # the support scans and slices each organ read, and fold scans left out for lacking it
        "supports": {e.organ: e.support_record() for g in p.groups for e in p.episodes[g.name]},
        "absent": {e.organ: e.absent for g in p.groups for e in p.episodes[g.name] if e.absent},
        # the evaluation groups, each recorded in parts/cases_<group>.csv (`runs` shows how many are done)
        "groups": [g.name for g in p.groups],
        "supervoxels_generated": [{**ident.supervoxels_generated, "at": now()}] if ident.supervoxels_generated else [],
        "versions": package_versions(),
        "code": code_identity(type(ident.method)),
        "machine": machine_identity(device),
        "registered_by": registered_by(cfg),
        "started_at": now(),
        "finished_at": None,
        "status": "running",
    }
    if kept is not None:  # a damaged record written again: this process resumes the run
        info["started_at"] = kept.get("started_at") or "unknown (run.json was damaged)"
        info["supervoxels_generated"] = kept.get("supervoxels_generated", []) + info["supervoxels_generated"]
        info.update({key: kept[key] for key in ("code", "machine") if key in kept})  # the start's
        lost = [what for key, what in (("resumed", "its earlier resumptions"), ("code", "the code that started it"),
                                       ("machine", "the machine that started it")) if key not in kept]
        earlier = kept.get("resumed", [])
        if lost:  # recorded as lost, not silently begun again (`code`/`machine` above are then this process's)
            earlier = [*earlier, {"at": now(), "lost": f"unknown (run.json was damaged): {', '.join(lost)}"}]
        info["resumed"] = [*earlier, {"at": now(), "code": code_identity(type(ident.method)),
                                      "machine": machine_identity(device)}]
    write_json(info_path, info)
    return info


def _marks(cfg: DictConfig, random_weights: bool, checkpoint_sha256: str | None) -> list[str]:
    """The run's departures from the standard setup (:func:`non_standard_options`), and for an
    external checkpoint its test-time options (:func:`_inference_marks`)."""
    marks = non_standard_options(cfg, random_weights, checkpoint_sha256)
    if checkpoint_sha256:
        marks += [mark for mark in _inference_marks(cfg) if mark not in marks]
    return marks


def _inference_marks(cfg: DictConfig) -> list[str]:
    """``method.<option>=<value>`` for each option read only when predicting that differs
    from the method's defaults: an evaluation of an external checkpoint is a report row of
    its own, and nothing else would tell its reader that, e.g., another threshold made its
    masks (beside another row, the report names such options itself)."""
    from .config import compose  # late: the config module is the CLI's

    try:
        defaults = compose([f"method={cfg.method.name}"]).method
    except FsmisError:  # a plugin method whose config cannot be composed alone
        return []
    return [f"method.{name}={cfg.method.get(name)}" for name in inference_options(cfg)
            if name != "predict_cuda_graph" and cfg.method.get(name) != defaults.get(name)]


def _readable_history(path: Path) -> dict[str, Any]:
    """What a damaged ``run.json`` (cut short, a bad byte) still says of the run's history:
    its top-level ``started_at``, ``code``, ``machine``, ``resumed`` and
    ``supervoxels_generated``, each where its value can be read whole; missing keys are lost."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    decoder, kept = json.JSONDecoder(), {}
    wanted = {"started_at": str, "code": dict, "machine": dict, "resumed": list, "supervoxels_generated": list}
    for key, kind in wanted.items():
        found = re.search(rf'^  "{key}": ', text, re.MULTILINE)  # write_json's top level (indent 2)
        if found is None:
            continue
        try:
            value = decoder.raw_decode(text, found.end())[0]
        except ValueError:
            continue
        if isinstance(value, kind) and (kind is not list or all(isinstance(v, dict) for v in value)):
            kept[key] = value
    return kept


def _record_or_none(path: Path) -> dict | None:
    """``run.json`` as a dict; None when it is missing or damaged (not JSON, not a mapping)."""
    try:
        info = read_json(path)
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _warn_if_other_code(run_dir: Path, ident: RunIdentity) -> None:
    """Say so when a finished run kept as it is was computed by another version of its
    method's code (another plugin release, or an edited method module): the hash covers the
    config and the inputs, not the code, so a rerun does not compute it again."""
    info = _record_or_none(run_dir / "run.json")
    differences = _other_code(info, ident) if info is not None else []
    if differences:
        warnings.warn(
            f"{run_dir} was computed by other code of method {info.get('method')} ({'; '.join(differences)}); "
            "its record is kept and its numbers are the old code's. To compute it with this code, pass another "
            "results_dir= (or move that folder away)", DataWarning, 2,
        )


def _other_code(info: dict, ident: RunIdentity) -> list[str]:
    """How the code that made the record ``info`` differs from the method's code now."""
    then = ((info.get("registered_by") or {}).get("method") or {})
    now_entry = registered_by(ident.cfg).get("method", {})
    differences = []
    if then.get("version") and now_entry.get("version") and then["version"] != now_entry["version"]:
        differences.append(f"{now_entry.get('distribution') or 'its package'} {then['version']} then, "
                           f"{now_entry['version']} installed")
    return differences + code_differences(info.get("code") or {}, type(ident.method))


def _part_damage(p: RunPlan, group: EvalGroup) -> str | None:
    """What is wrong with an unfinished run's evaluation part of ``group`` (its
    ``parts/cases_<group>.csv``, or the ``parts/predictions_<group>.npz`` beside it), worded
    as one line naming the file; None when the part stands. Every process of a run decides
    the same from the same files, so they train and skip the same groups."""
    from .record_repair import part_problem

    parts = p.run_dir / "parts"
    cases = parts / f"cases_{group.name}.csv"
    evaluated = {e.organ: [q.case_id for q in e.queries] for e in p.episodes[group.name]}
    problem = part_problem(cases, evaluated)
    if problem is not None:
        return f"{cases} is damaged ({problem})"
    predictions = parts / f"predictions_{group.name}.npz"
    if predictions.exists():
        try:  # the zip's directory, at its end: a file cut short has none
            with np.load(predictions) as data:
                data.files  # noqa: B018
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            return f"{predictions} is damaged ({type(exc).__name__}: {exc})"
    return None


def _finish(run_dir: Path, p: RunPlan, info: dict) -> None:
    parts = run_dir / "parts"
    cases = _checked_parts(run_dir, p, info)  # never COMPLETE over a damaged part
    atomic_write(run_dir / "cases.csv", cases[CASE_COLUMNS].to_csv(index=False))
    predictions = {}
    for g in p.groups:
        part = parts / f"predictions_{g.name}.npz"
        if part.exists():
            predictions.update(load_predictions(part))
    if predictions:
        save_predictions(run_dir / "predictions.npz", predictions)
    logs = []
    for g in p.groups:
        log_path = run_dir / "checkpoints" / g.name / "train_log.csv"
        if log_path.exists() and (log := _group_log(log_path)) is not None:
            log.insert(0, "group", g.name)
            logs.append(log)
    if logs:
        atomic_write(run_dir / "train_log.csv", pd.concat(logs).to_csv(index=False))
    steps = {g.name: _step_record(f) for g in p.groups
             if (f := run_dir / "checkpoints" / g.name / STEP_FILE).exists()}
    if steps:  # which step trained (train.cuda_graph is not hashed: it does not change the numbers)
        info["training_step"] = steps
    for g in p.groups:
        folder = run_dir / "checkpoints" / g.name
        if (folder / WEIGHTS_FILE).exists() and (folder / STATE_FILE).exists():
            # left when a stop came between writing the final weights and clearing the
            # resume state (10 GB for SD-1.5); the final weights supersede it
            clear_training_state(folder)
    info.update(finished_at=now(), status="complete")
    write_json(run_dir / "run.json", info)
    atomic_write(run_dir / COMPLETE, now() + "\n")
    tqdm.write(f"done: {run_dir} " + _dice_summary(cases, str(p.cfg.protocol.dice)), file=sys.stderr)


def _checked_parts(run_dir: Path, p: RunPlan, info: dict) -> pd.DataFrame:
    """The run's evaluation parts put together, checked as ``report`` checks ``cases.csv``.

    :func:`_execute` evaluates a damaged part again, so this only fails when a part was
    damaged while the run evaluated the others.

    Raises:
        DamagedRecordError: a part cannot be read or fails the checks.
    """
    from .reporting.collect import check_cases

    files = [run_dir / "parts" / f"cases_{g.name}.csv" for g in p.groups]
    redo = (f"rerun the same command: a damaged part's group is evaluated again with its trained weights "
            f"({', '.join(str(f) for f in files)})")
    try:
        cases = pd.concat(part_cases(run_dir, [g.name for g in p.groups]))
    except (OSError, ValueError) as exc:
        raise DamagedRecordError(f"the evaluation parts of {run_dir} cannot be read ({type(exc).__name__}: {exc})",
                                 hint=redo) from None
    problem = check_cases(cases, info)
    if problem is not None:
        raise DamagedRecordError(f"the evaluation parts of {run_dir} are damaged (put together, "
                                 f"{problem}); the run is not marked complete", hint=redo)
    return cases


def _group_log(path: Path) -> pd.DataFrame | None:
    """A group's ``checkpoints/<group>/train_log.csv`` for the run's ``train_log.csv``; a
    damaged one is said so in one line and left out (None), or cut back to its whole rows."""
    try:
        text = path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            tqdm.write(f"{path} was cut short: its last, incomplete row is left out of train_log.csv",
                       file=sys.stderr)
        return pd.read_csv(io.StringIO(text))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        tqdm.write(f"{path} is damaged ({type(exc).__name__}: {exc}): this group's losses are left out of "
                   "train_log.csv (the trained weights do not depend on it)", file=sys.stderr)
        return None


def _step_record(path: Path) -> dict | str:
    """A group's ``train_step.json`` (which step trained) for ``run.json``; a damaged one is
    said so in one line and recorded as unknown (it changes no number)."""
    try:
        step = json.loads(path.read_text())
        if isinstance(step, dict):
            return step
        problem = "not a JSON object"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    tqdm.write(f"{path} is damaged ({problem}): run.json records this group's training step as unknown "
               "(it changes no number)", file=sys.stderr)
    return f"unknown ({STEP_FILE} was damaged)"


def _dice_summary(cases: pd.DataFrame, dice: str) -> str:
    """``(Dice, per_volume)`` and one line per organ: what a finished run prints."""
    summary = fold_organ_scores(cases, dice).set_index("organ")["dice"]
    return f"(Dice, {dice})\n" + summary.to_string(float_format=lambda v: f"{v:.4f}")


def _check_finished(run_dir: Path, ident: RunIdentity) -> bool:
    """Check a finished run's record as ``report`` does; a damaged ``cases.csv`` is rebuilt
    from the run's evaluation parts (announced on stderr). True if it was rebuilt.

    Raises:
        DamagedRecordError: the record is damaged and the parts cannot rebuild it.
    """
    from .runs_command import record_problem  # the report's own check

    _rewrite_damaged_config(run_dir, ident)
    if record_problem(run_dir) is None:
        return False
    with _exclusive(run_dir):  # no other process rebuilds it at the same time
        problem = record_problem(run_dir)
        if problem is not None:  # (unless one did while we waited)
            rebuild_cases(run_dir, problem, default_groups=_evaluated_groups(ident.cfg, ident.groups))
            return True
    return False


def _rewrite_damaged_config(run_dir: Path, ident: RunIdentity) -> None:
    """Write a finished run's damaged ``config.yaml`` again from this command's config
    (announced on stderr). It is the run's config when ``run.json`` records this command's
    hash: the file only serves ``export``, ``eval checkpoint=`` and the report's
    fingerprints, so nothing is recomputed. Left as it is otherwise, for ``report`` and
    ``runs`` to name."""
    problem = run_config_problem(run_dir, RUN_CONFIG_KEYS)  # as `export` and `eval checkpoint=` read it
    if problem is None:
        return
    try:
        recorded = read_json(run_dir / "run.json").get("config_hash")
    except (OSError, ValueError, AttributeError):  # the record's own damage is named by the check after this
        return
    if recorded != config_hash(ident.cfg, ident.inputs, ident.hash_form):
        return
    with _exclusive(run_dir):
        if run_config_problem(run_dir, RUN_CONFIG_KEYS) is not None:
            atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(ident.cfg))
            tqdm.write(f"{run_dir}: {problem}; written again from this command's config", file=sys.stderr)


def _evaluated_groups(cfg: DictConfig, groups: list[EvalGroup]) -> list[str]:
    """The names of the groups a run evaluates: those with an organ ``protocol.organs`` keeps."""
    only = list(cfg.protocol.get("organs") or [])
    return [g.name for g in groups if not only or any(organ in only for organ in g.organs)]
