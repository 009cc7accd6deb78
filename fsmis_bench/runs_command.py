"""``fsmis-bench runs``: the run records under a results root, their state and age.

States:

* ``complete``: the ``COMPLETE`` marker is there and the record passes the check that
  ``report`` makes (``cases.csv`` against ``run.json``); never removed by this command.
* ``damaged``: the ``COMPLETE`` marker is there but the record fails that check (e.g. a
  truncated ``cases.csv``): ``report`` skips it, and running the same command again
  rebuilds ``cases.csv`` from the run's evaluation parts, or says what to do. Never removed
  by this command.
* ``running``: unfinished, and a live process holds the run's lock (``runner._exclusive``).
* ``stale``: unfinished and nobody holds the lock — the process was killed, pre-empted
  or stopped. Running the same command again resumes it from its last checkpoint;
  ``--remove-stale --yes`` deletes it instead (checkpoints included).

The progress of an unfinished run is where it resumes: per evaluation group in training
the step of its last checkpoint (``checkpoints/<group>/last.json``), or ``trained`` once
its weights are final, and how many evaluation groups are done (``parts/``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from .errors import FsmisError

STATES = ("complete", "running", "stale", "damaged")


@dataclass
class RunState:
    """One run directory as this command sees it."""

    path: Path
    state: str
    started_at: str | None
    age_s: float | None  # since the run started
    idle_s: float  # since anything in the directory was last written
    method: str
    dataset: str
    setting: str
    fold: str
    seed: str
    progress: str  # where an unfinished run resumes, e.g. "step 250, eval 0/1"; a damaged run's problem
    #: what tells this run from others listed with the same method, dataset, setting, fold and
    #: seed: the config values that differ (``train.lr=0.001``), or its config hash prefix
    differs: str = ""


def lock_is_held(run_dir: Path) -> bool:
    """True if a live process holds ``run_dir/.lock`` (probed without blocking anyone for long)."""
    path = run_dir / ".lock"
    if not path.exists():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _newest_mtime(run_dir: Path) -> float:
    newest = run_dir.stat().st_mtime
    for path in run_dir.rglob("*"):
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:  # written and replaced while we looked
            pass
    return newest


def record_problem(run_dir: Path) -> str | None:
    """Why the finished run in ``run_dir`` cannot be trusted, judged as ``report`` judges it
    (:func:`fsmis_bench.reporting.collect._read_run`: ``cases.csv`` against ``run.json``);
    None when its record is sound."""
    from .reporting.collect import DamagedRun, _read_run

    try:
        _read_run(run_dir)
    except DamagedRun as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - as the report: an unreadable record is a damaged one
        return f"unreadable record ({type(exc).__name__}: {exc})"
    return None


def _checkpoint_step(group_dir: Path) -> str:
    """Where the training in ``group_dir`` resumes: the step of its ``last.json`` (0 without one)."""
    state = group_dir / "last.json"
    if not state.exists():
        return "step 0"
    try:
        return f"step {int(json.loads(state.read_text())['state']['step'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "last.json unreadable"


def _progress(run_dir: Path, info: dict) -> str:
    """Where an unfinished run resumes: ``step 40, eval 0/1``, ``trained, eval 0/1``,
    ``eval 1/4`` (the group names are shown when the run has several groups)."""
    done = {p.name[len("cases_"):-len(".csv")] for p in (run_dir / "parts").glob("cases_*.csv")}
    groups = info.get("groups") if isinstance(info.get("groups"), list) else None
    training = sorted(d for d in (run_dir / "checkpoints").glob("*") if d.is_dir() and d.name not in done)
    several = len(groups) > 1 if groups is not None else len(training) + len(done) > 1
    shown = []
    for group_dir in training:
        where = "trained" if (group_dir / "final.safetensors").exists() else _checkpoint_step(group_dir)
        shown.append(f"{group_dir.name}: {where}" if several else where)
    if groups is not None:
        shown.append(f"eval {len(done & set(groups))}/{len(groups)}")
    elif done:
        shown.append(f"eval {len(done)} done")
    return ", ".join(shown)


def scan(results_dir: Path) -> list[RunState]:
    """Every run directory under ``results_dir`` (a ``run.json`` or a lock), oldest first."""
    from .records import COMPLETE

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        what = "is a file, not a folder" if results_dir.exists() else "does not exist"
        raise FsmisError(f"results folder {results_dir} {what}",
                         hint="pass --results, or set FSMIS_RESULTS_DIR")
    dirs = {p.parent for p in results_dir.glob("**/run.json")} | {p.parent for p in results_dir.glob("**/.lock")}
    now = time.time()
    found = []
    for run_dir in sorted(dirs):
        info = _read_info(run_dir)
        complete = (run_dir / COMPLETE).exists()
        problem = record_problem(run_dir) if complete else None
        state = ("damaged" if problem else "complete") if complete else "running" if lock_is_held(run_dir) else "stale"
        started, age = _started(info, now)
        rel = run_dir.relative_to(results_dir).parts
        found.append(RunState(
            path=run_dir, state=state, started_at=started, age_s=age, idle_s=now - _newest_mtime(run_dir),
            method=str(info.get("method", rel[0] if rel else "?")),
            dataset=str(info.get("test_dataset", info.get("dataset", rel[1] if len(rel) > 1 else "?"))),
            setting=str(info.get("setting", _from_path(rel, "setting"))), fold=str(info.get("fold", _from_path(rel, "fold"))),
            seed=str(info.get("seed", _from_path(rel, "seed"))),
            progress=(problem or "") if complete else _progress(run_dir, info),
        ))
    _tell_apart(found)
    return sorted(found, key=lambda r: r.started_at or "")


def _tell_apart(runs: list[RunState]) -> None:
    """Fill ``differs`` for runs that would otherwise read the same in the listing: those
    of one folder (same method, dataset, setting, fold and seed; only the config hash in
    their names differs). It holds the values of their ``config.yaml`` that differ among them
    and change a run's numbers (``method.lr=0.001``, at most three), else (an unreadable
    config, or other data with the same config) the config hash prefix."""
    from . import records

    ignored = set(getattr(records, "_UNHASHED", ())) | set(getattr(records, "_CADENCE", ()))
    groups: dict[tuple[str, ...], list[RunState]] = {}
    for r in runs:
        groups.setdefault((str(r.path.parent), r.method, r.dataset, r.setting, r.fold, r.seed), []).append(r)
    for same in groups.values():
        if len(same) < 2:
            continue
        configs = [_flat_config(r.path) for r in same]
        readable = [c for c in configs if c is not None]
        keys = sorted({k for c in readable for k in c} - ignored)
        differing = [k for k in keys if len({repr(c.get(k, "<absent>")) for c in readable}) > 1]
        for r, config in zip(same, configs):
            if config is not None and differing:
                shown = [f"{k}={_value_text(config.get(k, '<absent>'))}" for k in differing[:3]]
                r.differs = " ".join(shown) + (f" (+{len(differing) - 3} more)" if len(differing) > 3 else "")
            else:
                r.differs = "config " + r.path.name.rsplit("-", 1)[-1]


def _flat_config(run_dir: Path) -> dict[str, object] | None:
    """A run's ``config.yaml`` as ``{dotted.key: value}``; None when it cannot be read."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    flat: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(config, "")
    return flat


def _value_text(value: object) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read_info(run_dir: Path) -> dict:
    """``run_dir/run.json`` as a dict; empty where it is missing, unreadable (damaged JSON,
    bytes that are not UTF-8) or holds no record (a JSON list): such a run is still listed,
    named from its folder, and a finished one is ``damaged`` (:func:`record_problem`)."""
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return {}
    return info if isinstance(info, dict) else {}


def _started(info: dict, now: float) -> tuple[str | None, float | None]:
    """(``started_at`` as recorded, the run's age in seconds); (None, None) where the
    record has no start time it can be read as (an edited or damaged record)."""
    started = info.get("started_at")
    if not isinstance(started, str):
        return None, None
    try:
        return started, now - datetime.fromisoformat(started).timestamp()
    except ValueError:
        return started, None


def _from_path(parts: tuple[str, ...], name: str) -> str:
    """``setting``/``fold``/``seed`` as a run's folder names them
    (``<method>/<dataset>/setting1/fold0/seed0-<hash>``), for a record whose run.json is
    unreadable; ``?`` where the path does not say."""
    for part in parts:
        if part.startswith(name) and part[len(name):].split("-", 1)[0].isdigit():
            return part[len(name):].split("-", 1)[0]
    return "?"


def remove_stale(runs: list[RunState], failed: list[tuple[Path, OSError]] | None = None) -> list[Path]:
    """Delete stale run directories; a run that completed or was picked up meanwhile is kept.

    Args:
        failed: filled with the runs that could not be deleted (a read-only folder, a file
            another user owns) and why; the others are still deleted.
    """
    from .records import COMPLETE

    removed = []
    for run in runs:
        if run.state != "stale":
            continue
        try:
            with open(run.path / ".lock", "a") as handle:  # held while deleting: nobody can start it now
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if (run.path / COMPLETE).exists():
                    continue
                shutil.rmtree(run.path)
        except OSError as exc:
            if failed is None:
                raise
            failed.append((run.path, exc))
            continue
        removed.append(run.path)
    return removed


def _prune_empty_parents(path: Path, root: Path) -> None:
    for parent in path.parents:
        if parent == root or root not in parent.parents:
            return
        try:
            parent.rmdir()
        except OSError:
            return


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _table(runs: list[RunState], root: Path) -> str:
    header = ("state", "age", "idle", "method", "dataset", "setting", "fold", "seed", "progress", "record")
    rows = [header] + [
        (r.state, format_age(r.age_s), format_age(r.idle_s), r.method, r.dataset, r.setting, r.fold, r.seed,
         r.progress, str(r.path.relative_to(root)))
        for r in runs
    ]
    if any(r.differs for r in runs):  # runs that would read the same: what tells them apart
        rows = [(*row[:8], cell, *row[8:]) for row, cell in zip(rows, ["differs", *(r.differs for r in runs)])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _run(args: argparse.Namespace) -> int:
    from .reporting.collect import default_results_dir

    root = Path(args.results) if args.results else default_results_dir()
    runs = scan(root)
    shown = [r for r in runs if r.state == "stale"] if (args.stale or args.remove_stale) else runs
    if args.format == "json":
        print(json.dumps([{**asdict(r), "path": str(r.path)} for r in shown], indent=2))
    elif shown:
        print(_table(shown, root))
    counts = {s: sum(r.state == s for r in runs) for s in STATES}
    print(f"{_runs(len(runs))} under {root}: " + ", ".join(f"{n} {s}" for s, n in counts.items()), file=sys.stderr)
    if counts["damaged"]:
        print("damaged runs are skipped by `report`; running their command again repairs the record (cases.csv "
              "from the run's evaluation parts, config.yaml from the command), or says what to do", file=sys.stderr)
    if not args.remove_stale:
        if counts["stale"]:
            print("stale runs resume when their command is run again; `fsmis-bench runs --remove-stale --yes` "
                  "deletes them", file=sys.stderr)
        return 0
    if not shown:
        return 0
    if not args.yes:
        print(f"would remove {_runs(len(shown), 'stale')} (their checkpoints too); add --yes to remove them",
              file=sys.stderr)
        return 0
    failed: list[tuple[Path, OSError]] = []
    removed = remove_stale(shown, failed)
    for path in removed:
        _prune_empty_parents(path, root)
        print(f"removed {path}", file=sys.stderr)
    if failed:
        first_path, first_error = failed[0]
        raise FsmisError(
            f"{_runs(len(failed), 'stale')} could not be removed, e.g. {first_path} "
            f"({first_error.strerror or first_error})",
            hint="check that the results folder is writable by you (a read-only mount, another user's "
                 "files), then run the same command again; " + (f"{_runs(len(removed))} removed before that"
                                                                 if removed else "nothing was removed"),
        )
    kept = len(shown) - len(removed)
    if kept:
        print(f"{_runs(kept)} {'was' if kept == 1 else 'were'} picked up or finished meanwhile and "
              f"{'is' if kept == 1 else 'are'} kept", file=sys.stderr)
    return 0


def _runs(count: int, kind: str = "") -> str:
    """``1 run``, ``2 stale runs``."""
    return f"{count} {kind + ' ' if kind else ''}run{'' if count == 1 else 's'}"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``runs`` to the CLI."""
    parser = subparsers.add_parser(
        "runs",
        help="list run records with their state (complete, running, stale, damaged) and age; remove stale ones",
        description="List the runs under a results root: complete, running (a live process holds the run's "
                    "lock), stale (unfinished, nobody holds the lock: rerun its command to resume it) or "
                    "damaged (finished, but its cases.csv fails the report's check: rerun its command to "
                    "rebuild it).",
    )
    parser.add_argument("--results", default=None, help="results folder (default: $FSMIS_RESULTS_DIR or ./results)")
    parser.add_argument("--stale", action="store_true", help="list only stale runs")
    parser.add_argument("--remove-stale", action="store_true",
                        help="delete stale runs (with --yes; complete and running runs are never touched)")
    parser.add_argument("--yes", action="store_true", help="confirm --remove-stale")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(func=_run)
