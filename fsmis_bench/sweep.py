"""Sweeps (``fsmis-bench run -m``) through Hydra's multirun, so any launcher plugin runs them.

Every job is one self-contained run: it composes its own config exactly as a single
``fsmis-bench run`` with the same overrides would (same record, same hash, same per-run
lock), so a sweep's records are the serial runs' records. Launchers:

* ``basic`` (default): one job after another in this process.
* ``hydra/launcher=joblib`` (``pip install 'fsmis-bench[launchers]'``): parallel jobs on
  this machine; with several GPUs each worker process claims one of them.
* ``hydra/launcher=submitit_slurm`` / ``submitit_local``: SLURM jobs, or local processes
  with the same job folder, logs and pre-emption protocol.

Pre-emption (submitit's checkpointing protocol): SIGUSR1 or submitit's pre-emption signal
(``SUBMITIT_PREEMPT_SIGNAL``, USR2 by default) stops training at the next step boundary
with a checkpoint; the job then hands the signal to submitit, which requeues the same job,
and the requeued job resumes the run from that checkpoint. SIGTERM (``scancel``, or a
pre-emption that SLURM requeues itself) also checkpoints, then exits without requeueing.

Every config of a sweep is composed and checked before any job starts; at the end a table
says which runs completed, resumed, were skipped as already complete, or failed (and why).
Hydra's sweep folder (``multirun.yaml``, one folder per job, ``.submitit/`` for the
submitit launchers) goes to ``<results_dir>/_sweeps/<date>_<time>/``; records stay where
``results_dir`` says, whatever the launcher's working directory.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shlex
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, FsmisError

#: outcomes in the sweep summary, in table order
OUTCOMES = ("completed", "resumed", "skipped", "repaired", "failed", "interrupted")

# Device claims of this (worker) process, kept for its lifetime: {lock_dir: (device, handle)}.
_CLAIMED: dict[str, tuple[str, Any]] = {}


# -- one run -------------------------------------------------------------------------------
def submitit_signal() -> int | None:
    """The pre-emption signal of the submitit job this process runs in (None outside one)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        from submitit import JobEnvironment
    except ImportError:
        return None
    return getattr(signal, "SIG" + JobEnvironment.USR_SIG, None)


def preemption_signals() -> tuple[int, ...]:
    """Signals that mean "checkpoint now, you will be requeued": SIGUSR1 (+ submitit's)."""
    signals = [signal.SIGUSR1]
    own = submitit_signal()
    if own is not None and own not in signals:
        signals.append(own)
    return tuple(signals)


def run_one(cfg: DictConfig, *, allow_training: bool = True, checkpoint: Path | None = None) -> tuple[Path, str]:
    """Run (or resume, or skip) one config; training stops cleanly on the pre-emption signals.

    Returns:
        The record directory and the outcome (``completed``, ``resumed``, ``skipped`` or
        ``repaired``).

    Raises:
        Interrupted: a stop signal arrived; the state at the last step boundary is saved.
    """
    from .runner import execute
    from .training.interrupt import also_stop_on

    status: dict[str, str] = {}
    with also_stop_on(*preemption_signals()):
        run_dir = execute(cfg, allow_training=allow_training, checkpoint=checkpoint, status=status)
    return run_dir, status.get("outcome", "completed")


def export_masks(run_dir: Path, out_dir: Path) -> None:
    """``--export-masks``: a run's predicted masks as NIfTI in its scans' grids (summary on stderr)."""
    from .export import export_masks as export

    print(export(run_dir, out_dir).format(), file=sys.stderr)


def _requeue_through_submitit(signum: int) -> None:
    """Hand a pre-emption signal that training has answered (checkpoint saved) to submitit.

    submitit's handler checkpoints the job's submission, requeues it (``scontrol requeue``,
    or a restart for ``submitit_local``) and exits; the requeued job resumes the run.
    """
    own = submitit_signal()
    if own is None or signum not in preemption_signals():
        return
    handler = signal.getsignal(own)
    if callable(handler):
        handler(own, None)


# -- devices for local parallel jobs ---------------------------------------------------------
def claim_device(devices: list[str], lock_dir: Path, fallback_index: int = 0) -> str:
    """One of ``devices`` for this process, not held by another live process if possible.

    A free device is claimed with a lock file under ``lock_dir`` that this process keeps
    until it exits (joblib's worker processes run job after job on the same device). With
    more concurrent jobs than devices, ``devices[fallback_index % len(devices)]`` is shared.
    """
    key = str(lock_dir)
    if key in _CLAIMED:
        return _CLAIMED[key][0]
    lock_dir.mkdir(parents=True, exist_ok=True)
    for device in devices:
        handle = open(lock_dir / f"device{device}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _CLAIMED[key] = (device, handle)
        return device
    return devices[fallback_index % len(devices)]


def visible_gpus() -> list[str]:
    """The GPU ids jobs may use (``CUDA_VISIBLE_DEVICES`` if set), empty without CUDA."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


# -- the job Hydra's launchers run -----------------------------------------------------------
class SweepJob:
    """Hydra's task function: one run per job; returns a small, picklable outcome record.

    Args:
        command: ``run`` (train if needed) or ``eval``.
        checkpoint: ``eval``'s ``checkpoint=`` (one checkpoint for every job), or None.
        launch_dir: the directory the sweep was started in; relative paths in the config
            (``results_dir``, ``data_root``) mean the same in every job.
        devices: GPUs to spread local parallel jobs over (joblib); empty otherwise.
        export_to: ``--export-masks`` folder (each run below it at its path under ``results_dir``).
        marked: keys given to Hydra with a '++' they did not have (:func:`_for_hydra`).
    """

    def __init__(self, command: str, checkpoint: str | None, launch_dir: str, devices: list[str],
                 export_to: str | None = None, marked: list[str] | None = None) -> None:
        self.command = command
        self.checkpoint = checkpoint
        self.launch_dir = launch_dir
        self.devices = devices
        self.export_to = export_to
        self.marked = list(marked or [])
        #: the outcomes of the jobs run so far, as seen where the job object lives: complete
        #: for the basic launcher, which calls it in the sweep's own process (its summary
        #: after an interruption); other launchers call pickled copies of it
        self.finished: list[dict[str, Any]] = []

    def __call__(self, hydra_cfg: DictConfig) -> dict[str, Any]:
        from hydra.core.hydra_config import HydraConfig

        from .config import compose
        from .export import check_exportable
        from .training.interrupt import Interrupted

        if multiprocessing.get_start_method(allow_none=True) == "loky":
            # A joblib worker: its default start method is loky's, which the DataLoader's
            # episode workers (train.num_workers) cannot use; give them the platform's own.
            multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
        hydra = HydraConfig.get()
        overrides = [o.lstrip("+") if o.startswith("+") and o.lstrip("+").split("=", 1)[0] in self.marked else o
                     for o in hydra.overrides.task]  # as the user wrote them
        if self.devices:  # before anything in this process touches CUDA
            device = claim_device(self.devices, Path(hydra.sweep.dir) / ".devices", int(hydra.job.num))
            os.environ["CUDA_VISIBLE_DEVICES"] = device
        result: dict[str, Any] = {"overrides": overrides, "run_dir": None, "outcome": "failed", "reason": ""}
        cwd = os.getcwd()
        os.chdir(self.launch_dir)
        try:
            cfg = compose(overrides)  # exactly what `fsmis-bench run <overrides>` runs
            if self.export_to:
                check_exportable(cfg)
            run_dir, outcome = run_one(
                cfg, allow_training=self.command == "run",
                checkpoint=Path(self.checkpoint) if self.checkpoint else None,
            )
            result.update(run_dir=str(run_dir), outcome=outcome)
            if self.export_to:
                relative = run_dir.relative_to(Path(str(cfg.results_dir)).expanduser())
                export_masks(run_dir, Path(self.export_to).expanduser() / relative)
        except FsmisError as exc:
            result["reason"] = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
            print(f"error: {exc.message}", file=sys.stderr)
            if exc.hint:
                print(f"  hint: {exc.hint}", file=sys.stderr)
        except KeyboardInterrupt as exc:  # Interrupted: saved at a step boundary; else the last checkpoint
            how = f"stopped by {signal.Signals(exc.signum).name}" if isinstance(exc, Interrupted) else "stopped"
            self.finished.append({**result, "outcome": "interrupted", "reason": f"{how}; the same command resumes it"})
            if isinstance(exc, Interrupted):
                _requeue_through_submitit(exc.signum)  # exits the process if submitit requeues
            raise
        except Exception as exc:  # a bug must not take the other jobs' results with it
            traceback.print_exc()
            result["reason"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        finally:
            os.chdir(cwd)
        self.finished.append(result)
        return result


# -- the sweep -------------------------------------------------------------------------------
def _for_hydra(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``overrides`` as Hydra's sweeper can compose them, and the keys that got a '++' for it.

    Hydra composes a multirun once without its sweep values, so a key that exists only under
    a swept choice (``method=sdfsmis,diffews method.vae_dtype=bfloat16``: not in the default
    method) or only after compose()'s second pass (``test_dataset.*``) would be refused there.
    Dotted value keys therefore go to Hydra as force-adds ("++key=..."), which set the key
    where it exists and add it where it does not; every run was composed and checked by
    :func:`check_sweep` first, so a mistyped key never gets this far. Config groups are never
    dotted here (their choices are ``group=name`` or ``a/b=name``).
    """
    hydra_form, marked = [], []
    for item in overrides:
        key = item.split("=", 1)[0]
        if "." in key and not key.startswith(("+", "~", "hydra.")):
            hydra_form.append("++" + item)
            marked.append(key)
        else:
            hydra_form.append(item)
    return hydra_form, marked


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(run overrides, Hydra's own ``hydra.*`` / ``hydra/...`` overrides)."""
    hydra, run = [], []
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        (hydra if key == "hydra" or key.startswith(("hydra.", "hydra/")) else run).append(item)
    return run, hydra


def check_sweep(overrides: list[str]) -> list[tuple[list[str], DictConfig]]:
    """Compose and check every run of a sweep (and the launcher settings) before any starts."""
    from .config import compose, expand_sweep

    run_overrides, hydra_overrides = split_overrides(overrides)
    runs = expand_sweep(run_overrides)
    composed = [(r, compose(r)) for r in runs]
    if hydra_overrides:
        _hydra_node(runs[0] + hydra_overrides)
    from .runner import _check_results_writable  # the sweep's own folder lies there too

    for results_dir in {str(cfg.results_dir): cfg for _, cfg in composed}.values():
        _check_results_writable(results_dir)
    _check_folds(composed)
    return composed


def _check_folds(composed: list[tuple[list[str], DictConfig]]) -> None:
    """A fold the test dataset does not have, or a setting it does not define (setting 2 on
    a dataset without setting-2 organ groups), stops the sweep before any job, as it stops a
    single run. A dataset that cannot be built here (its data missing) is left to its jobs,
    which fail one by one and keep the others' results."""
    import json

    from .errors import DataError
    from .protocol.settings import eval_groups
    from .runner import build_dataset, build_test_dataset

    datasets: dict[str, Any] = {}
    for _, cfg in composed:
        key = json.dumps([OmegaConf.to_container(cfg.get("dataset"), resolve=True),
                          OmegaConf.to_container(cfg.get("test_dataset"), resolve=True) if cfg.get("test_dataset") else None,
                          cfg.get("data_root")], default=str, sort_keys=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each job shows its data's warnings itself
            if key not in datasets:
                try:
                    train = build_dataset(cfg.dataset, cfg.data_root)
                    datasets[key] = (train, build_test_dataset(cfg, train))
                except DataError:
                    datasets[key] = None
            if datasets[key] is not None:
                train, test = datasets[key]
                eval_groups(train, test, int(cfg.setting), str(cfg.protocol.exclusion),  # the run's own ConfigError
                            str(cfg.protocol.train_labels), str(cfg.protocol.get("gt_exclusion", "per_group")))
                try:
                    test.fold_cases(int(cfg.fold))  # a fold it lacks: the run's own ConfigError
                except DataError:
                    pass


def launch(overrides: list[str], *, command: str = "run", checkpoint: Path | None = None,
           export_to: str | None = None) -> int:
    """Run a sweep through Hydra's multirun; print the summary; 0 if every run finished, else 2."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import config_dir, searchpath_override

    composed = check_sweep(overrides)
    hydra_overrides = split_overrides(overrides)[1]
    devices: list[str] = []  # local parallel jobs on a multi-GPU machine: one GPU per worker process
    local_parallel = any(o == "hydra/launcher=joblib" for o in hydra_overrides)
    if local_parallel and any(str(cfg.get("device", "auto")) != "cpu" for _, cfg in composed):
        gpus = visible_gpus()
        devices = gpus if len(gpus) > 1 else []
    hydra_form, marked = _for_hydra(overrides)
    job = SweepJob(command, str(checkpoint) if checkpoint else None, os.getcwd(), devices, export_to, marked)
    print(f"sweep of {len(composed)} runs; every config checked", file=sys.stderr)
    began = time.time()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), job_name="fsmis-bench", version_base=None):
            hydra = GlobalHydra.instance().hydra
            returns = hydra.multirun(
                config_name="config", task_function=job, overrides=hydra_form + searchpath_override(),
            )
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            if job.finished:  # what was done before the stop (the basic launcher runs jobs here)
                print_summary(job.finished, None, not_started=len(composed) - len(job.finished))
            elif any(o.startswith("hydra/launcher=") for o in hydra_overrides):
                # the jobs ran in other processes, whose outcomes this one never saw: their records say
                results_dir = Path(str(composed[0][1].results_dir)).expanduser()
                print(f"the sweep was interrupted; the launcher ran its jobs in other processes. "
                      f"{_written_since(results_dir, began)}", file=sys.stderr)
                if any(o.startswith("hydra/launcher=submitit") for o in hydra_overrides):
                    print("submitit's jobs may still be running (a stop signal sent to this process alone does "
                          f"not reach them): rerun the same command once `{_runs_command(results_dir)}` shows none "
                          "running", file=sys.stderr)
            print(f"to resume, run the same command: {_same_command(command, overrides, checkpoint, export_to)}",
                  file=sys.stderr)
        raise
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"the sweep could not be launched: {_first_line(exc)}") from None
    except Exception as exc:  # the launcher itself (no sbatch here, a job killed outright ...)
        results_dir = Path(str(composed[0][1].results_dir)).expanduser()
        raise FsmisError(
            f"the launcher stopped: {type(exc).__name__}: {_first_line(exc)}. {_written_since(results_dir, began)}",
            hint=f"finished runs are kept and the same command resumes the others: "
                 f"{_same_command(command, overrides, checkpoint, export_to)} (`{_runs_command(results_dir)}` lists "
                 f"every run's state; job folders and logs are under {results_dir / '_sweeps'})",
        ) from None
    results = [_job_result(r) for batch in returns for r in batch]
    failed = [r for r in results if r["outcome"] == "failed"]
    # one summary, the main process's, under torchrun: only it evaluates, so only it sees every failure
    if os.environ.get("RANK", "0") == "0":
        print_summary(results, _sweep_dir(returns))
        for r in results:
            if r["run_dir"] and r["outcome"] != "failed":
                print(r["run_dir"])
        if failed:
            print(f"{len(failed)} of {len(results)} run{'' if len(results) == 1 else 's'} failed; "
                  "finished runs are kept", file=sys.stderr)
    return 2 if failed else 0


def _same_command(command: str, overrides: list[str], checkpoint: Path | None, export_to: str | None) -> str:
    """The sweep's command line, as the user can paste it to resume the sweep."""
    words = ["fsmis-bench", command, "-m", *overrides]
    if checkpoint is not None:
        words.append(f"checkpoint={checkpoint}")
    if export_to:
        words += ["--export-masks", export_to]
    return shlex.join(words)


def _runs_command(results_dir: Path) -> str:
    """``fsmis-bench runs`` for the sweep's results folder (``--results`` unless it is the default)."""
    from .reporting.collect import default_results_dir

    try:
        default = Path(default_results_dir()).expanduser().resolve() == results_dir.resolve()
    except (OSError, RuntimeError):
        default = False
    return "fsmis-bench runs" if default else shlex.join(["fsmis-bench", "runs", "--results", str(results_dir)])


def _written_since(results_dir: Path, began: float) -> str:
    """What the sweep's jobs left under ``results_dir`` since it ``began``: the runs they
    finished and those they stopped (which resume), as the records say; one sentence."""
    from .records import COMPLETE
    from .runs_command import _newest_mtime

    finished, stopped = [], []
    try:
        for record in sorted(results_dir.glob("**/run.json")):
            run_dir = record.parent
            if "_sweeps" in run_dir.relative_to(results_dir).parts:
                continue
            done = run_dir / COMPLETE
            if done.exists():
                if done.stat().st_mtime >= began:
                    finished.append(run_dir)
            elif _newest_mtime(run_dir) >= began:
                stopped.append(run_dir)
    except OSError:
        pass

    def listed(runs: list[Path]) -> str:
        names = [str(r.relative_to(results_dir)) for r in runs[:6]]
        return ": " + ", ".join(names) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "") if runs else ""

    return (f"Under {results_dir} since the sweep started, {len(finished)} run{'' if len(finished) == 1 else 's'} "
            f"finished{listed(finished)}; {len(stopped)} stopped before the end{listed(stopped)} (kept; each "
            f"resumes from its last checkpoint). `{_runs_command(results_dir)}` lists every run's state.")


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))


def _job_result(job_return: Any) -> dict[str, Any]:
    from hydra.core.utils import JobStatus

    if job_return.status == JobStatus.COMPLETED and isinstance(job_return._return_value, dict):
        return job_return._return_value
    error = job_return._return_value
    return {
        "overrides": list(job_return.overrides or []), "run_dir": None, "outcome": "failed",
        "reason": f"{type(error).__name__}: {error}".splitlines()[0],
    }


def _sweep_dir(returns: Any) -> str | None:
    """Hydra's sweep folder, from a job's (absolute) output dir minus its subdir."""
    for batch in returns:
        for r in batch:
            if r.hydra_cfg is None:
                continue
            hydra = r.hydra_cfg.hydra
            output_dir, subdir = str(hydra.runtime.output_dir), str(hydra.sweep.subdir)
            if output_dir.endswith(subdir):
                return output_dir[: -len(subdir)].rstrip("/")
            return str(Path(output_dir).parent)
    return None


def print_summary(results: list[dict[str, Any]], sweep_dir: str | None = None, file=None,
                  not_started: int = 0) -> None:
    """The end-of-sweep table: one line per run (swept values only), outcome, record or reason.

    ``not_started``: after an interruption, the runs the sweep did not reach (not listed)."""
    file = file or sys.stderr
    counts = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
    total = len(results) + not_started
    print(
        f"\nsweep summary: {total} run{'' if total == 1 else 's'}: {counts['completed']} completed, {counts['resumed']} resumed, "
        f"{counts['skipped']} skipped (already complete), "
        + (f"{counts['repaired']} repaired (complete, cases.csv rebuilt from its parts), " if counts["repaired"] else "")
        + f"{counts['failed']} failed"
        + (f", {counts['interrupted']} interrupted (saved; the same command resumes)" if counts["interrupted"] else "")
        + (f", {not_started} not started" if not_started else ""),
        file=file,
    )
    if sweep_dir:
        print(f"Hydra sweep folder: {sweep_dir}", file=file)
    varying = _varying_keys([r["overrides"] for r in results])
    rows = [("job", "outcome", "run", "record / reason")]
    for index, r in enumerate(results):
        shown = [o for o in r["overrides"] if o.split("=", 1)[0] in varying] or r["overrides"]
        rows.append((str(index), r["outcome"], " ".join(shown),
                     r["reason"] if r["outcome"] in ("failed", "interrupted") else r["run_dir"] or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3], file=file)


def _varying_keys(override_lists: list[list[str]]) -> set[str]:
    """Keys whose value is not the same in every job (the swept ones)."""
    seen: dict[str, set[str | None]] = {}
    for overrides in override_lists:
        given = dict(o.split("=", 1) if "=" in o else (o, "") for o in overrides)
        for key in set(seen) | set(given):
            seen.setdefault(key, set()).add(given.get(key))
    return {key for key, values in seen.items() if len(values) > 1}


# -- --cfg ---------------------------------------------------------------------------------
def show_config(overrides: list[str], which: str, multirun: bool) -> None:
    """Print the resolved run config(s) (``job``), Hydra's own config (``hydra``) or both (``all``).

    Nothing runs. With ``-m`` every run of the sweep is shown (and checked).
    """
    from .config import compose, expand_sweep, is_sweep

    run_overrides, hydra_overrides = split_overrides(overrides)
    if which in ("job", "all"):
        if not multirun and is_sweep(run_overrides):
            raise ConfigError("sweep values (a,b, range(), choice(), glob()) describe several runs",
                              hint="add -m to run every combination")
        runs = check_sweep(overrides) if multirun else [(run_overrides, compose(run_overrides))]
        for run, cfg in runs:
            if len(runs) > 1:
                print(f"# {' '.join(run)}")
            print(OmegaConf.to_yaml(cfg), end="")
    if which in ("hydra", "all"):
        first = expand_sweep(run_overrides)[0] if multirun else run_overrides
        compose(first)  # the usual checks and messages for the run's own options
        print(OmegaConf.to_yaml(_hydra_node(first + hydra_overrides)), end="")


def _hydra_node(overrides: list[str]) -> DictConfig:
    """Hydra's own config (launcher, sweeper, folders) for these overrides, unresolved.

    Raises:
        ConfigError: an unknown launcher or launcher option (with the known ones, and where
            the joblib and submitit launchers come from).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import _beside_running_hydra, config_dir, searchpath_override

    try:
        with _beside_running_hydra(), initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=_for_hydra(overrides)[0] + searchpath_override(),
                                return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        options = next((i for i, line in enumerate(lines) if line.startswith("Available options")), None)
        if options is not None:
            known = [line for line in lines[options + 1:] if not line.startswith(("Config search path", "provider="))]
            hint = f"{lines[options].rstrip(':')}: {', '.join(known)}"
        elif "hydra.launcher." in str(exc):
            hint = ("a launcher option needs its launcher (hydra/launcher=joblib, submitit_local, "
                    "submitit_slurm); `fsmis-bench run -m hydra/launcher=<name> --cfg hydra` lists its options")
        else:
            hint = "Hydra's own options are listed by `fsmis-bench run -m ... --cfg hydra`"
        if "hydra/launcher" in str(exc) or "hydra.launcher" in str(exc):
            hint += "; the joblib and submitit launchers come with `pip install 'fsmis-bench[launchers]'`"
        raise ConfigError(f"invalid launcher setting: {lines[0] if lines else exc}", hint=hint) from None
    return OmegaConf.create({"hydra": OmegaConf.to_container(cfg.hydra, resolve=False)})
