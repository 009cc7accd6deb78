"""``fsmis-bench``: run, eval, runs, export, report, list, describe, prepare, supervoxels, check-data, weights.

Run-type commands take Hydra overrides::

    fsmis-bench run method=prototype dataset=abd_mri setting=1 fold=0 seed=0
    fsmis-bench run -m method=support_copy,prototype fold=0,1,2,3,4
    fsmis-bench run -m hydra/launcher=joblib hydra.launcher.n_jobs=2 method=support_copy fold=0,1
    fsmis-bench run method=sdfsmis --cfg job

User errors print one message and a hint, and exit with status 2; nothing already
written is removed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import io
import os
import re
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DataWarning, FsmisError

# Subcommands defined elsewhere, by the module that registers them. Only the module of the
# command being run is imported, so `fsmis-bench run` does not pay for seaborn & co.
_SUBCOMMAND_MODULES = {
    "report": "fsmis_bench.reporting.commands",
    "describe": "fsmis_methods._describe",
    "prepare": "fsmis_bench.preparation.commands",
    "supervoxels": "fsmis_bench.preparation.commands",
    "check-data": "fsmis_bench.preparation.commands",
    "weights": "fsmis_methods._weights",
    "export": "fsmis_bench.export",
    "runs": "fsmis_bench.runs_command",
}


def _run(args: argparse.Namespace) -> int:
    from .config import compose, is_sweep
    from .sweep import export_masks, launch, run_one, show_config, split_overrides

    overrides = list(args.overrides)
    _say_repeated_keys(overrides)
    checkpoint = None
    if args.command == "run" and any(o.startswith("checkpoint=") for o in overrides):
        raise FsmisError("checkpoint= is an option of `fsmis-bench eval`: `run` trains its own weights",
                         hint="evaluate a checkpoint with `fsmis-bench eval ... checkpoint=PATH`")
    if args.command == "eval":
        kept = []
        for item in overrides:
            if item.startswith("checkpoint="):
                checkpoint = Path(item.split("=", 1)[1]).expanduser()
                if not checkpoint.exists():
                    raise FsmisError(
                        f"checkpoint {checkpoint} does not exist",
                        hint="pass the path of a final.safetensors, or the directory of a finished run",
                    )
            else:
                kept.append(item)
        overrides = kept
    if args.cfg:
        show_config(overrides, args.cfg, args.multirun)
        return 0
    if args.export_masks:  # refused now, not after the run (a sweep writes into per-run subfolders)
        from .export import check_export_target

        check_export_target(Path(args.export_masks), masks_too=not args.multirun)
    if args.multirun:  # Hydra's multirun: any launcher plugin (hydra/launcher=joblib, submitit_slurm ...)
        return launch(overrides, command=args.command, checkpoint=checkpoint, export_to=args.export_masks)
    if is_sweep(overrides):
        from .config import names_a_path

        paths = [o for o in overrides if "," in o and names_a_path(o)
                 and not o.partition("=")[2].startswith(("'", '"'))]  # a quoted path is one value
        if paths:  # a folder named "scans,v2": a path, not two values
            key, _, value = paths[0].partition("=")
            raise FsmisError(f"{paths[0]}: the comma makes two values of one path",
                             hint=f"quote the path: \"{key}='{value}'\" (quotes inside the shell's own)")
        raise FsmisError("sweep values (a,b, range(), choice(), glob()) describe several runs",
                         hint="add -m to run every combination")
    if split_overrides(overrides)[1]:
        raise FsmisError("hydra.* and hydra/... overrides set how a sweep is launched",
                         hint="add -m (a sweep of one run is fine)")
    cfg = compose(overrides)
    if args.export_masks:
        from .export import check_exportable

        check_exportable(cfg)
    run_dir, _ = run_one(cfg, allow_training=args.command == "run", checkpoint=checkpoint)
    if os.environ.get("RANK", "0") == "0":  # one line per run, also under `accelerate launch`/torchrun
        print(run_dir)
        if args.export_masks:
            try:
                export_masks(run_dir, Path(args.export_masks).expanduser())
            except FsmisError as exc:  # the run itself is finished and kept
                exc.hint = ((exc.hint + "; ") if exc.hint else "") + (
                    f"the run is saved in {run_dir}: `fsmis-bench export {run_dir} --out DIR` writes its masks "
                    "without computing anything again")
                raise
    return 0


def _say_repeated_keys(overrides: list[str]) -> None:
    """``fold=1 fold=2``: Hydra keeps the last, which scripts rely on (defaults in a variable,
    then an override), so it stays; but not without a word."""
    if os.environ.get("RANK", "0") != "0":  # one note per run, also under `accelerate launch`/torchrun
        return
    seen: dict[str, str] = {}
    for item in overrides:
        key = item.partition("=")[0].lstrip("+~")
        if item.startswith("~") or key in seen and seen[key].startswith("~"):
            seen[key] = item  # a deletion, then the key added again: not a repeat
            continue
        if "=" in item and key in seen and seen[key] != item:
            print(f"note: {key} is given twice ({seen[key]}, then {item}): the last is used; to run both, "
                  f"sweep with -m {key}=<a>,<b>", file=sys.stderr)
        seen[key] = item


class _RunHelp(argparse.Action):
    """``run --help``: the usage, then the main config keys with their defaults and choices."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .config_help import main_keys

        parser.print_help()
        print()
        try:
            print(main_keys())
        except FsmisError as exc:  # the keys come from the configs, which may be refused
            print(f"error: {exc}", file=sys.stderr)  # its message, and its hint on a line of its own
            parser.exit(2)
        parser.exit()


def _list(args: argparse.Namespace) -> int:
    from .plugins import registries

    rows = [
        {"kind": kind, "name": entry.name, "plugin": entry.plugin, "distribution": entry.distribution,
         "version": entry.version, "description": entry.description}
        for kind, registry in registries().all().items()
        for entry in registry
    ]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:  # the table names the release too: "builtin_methods (fsmis-bench 0.1.0)"
        if row["distribution"]:
            row["plugin"] = f"{row['plugin'].split(' (')[0]} ({row['distribution']} {row['version']})".replace(" )", ")")
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("kind", "name", "plugin")}
    header = "  ".join(k.ljust(widths[k]) for k in widths) + "  description"
    print(header)
    print("-" * len(header))
    for row in rows:
        print("  ".join(row[k].ljust(widths[k]) for k in widths) + "  " + row["description"])
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command`` given, only that command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="fsmis-bench",
        description="Few-shot medical image segmentation benchmark.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (
        ("run", "train if the method needs it, then evaluate (default: prototype on phantom)"),
        ("eval", "evaluate a trained checkpoint (found by config, or checkpoint=PATH)"),
    ):
        run_parser = sub.add_parser(name, help=help_text, description=help_text, add_help=False)
        run_parser.add_argument("-h", "--help", action=_RunHelp, help="show this help and the main config keys")
        run_parser.add_argument("-m", "--multirun", action="store_true",
                                help="sweep comma-separated values through Hydra's multirun "
                                     "(hydra/launcher=joblib | submitit_local | submitit_slurm)")
        run_parser.add_argument("--cfg", choices=("job", "hydra", "all"), default=None,
                                help="print the resolved config (job), Hydra's (hydra) or both, and run nothing")
        run_parser.add_argument(
            "--export-masks", metavar="DIR",
            help="afterwards write every predicted mask as NIfTI in its scan's own grid (see `export`)",
        )
        run_parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. method=prototype fold=0")
        run_parser.set_defaults(func=_run)
    listing = sub.add_parser("list", help="methods, datasets, settings and backbones with their plugins")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(func=_list)
    wanted = {_SUBCOMMAND_MODULES[command]} if command in _SUBCOMMAND_MODULES else set(_SUBCOMMAND_MODULES.values())
    if command in ("run", "eval", "list"):
        wanted = set()
    for module_name in sorted(wanted):
        importlib.import_module(module_name).register(sub)
    return parser


#: "<subject> scan <id>: <what>", the form of the data warnings about one scan
_PER_SCAN = re.compile(r"(?P<subject>.*\bscan) (?P<case>\S+): (?P<what>.+)", re.DOTALL)
#: "<dataset>: support scan <id> and query scan <id> <what>", the form of the warnings about
#: a support/query pair (shared slices, modality, voxel size, axes): grouped by support
_PER_PAIR = re.compile(r"(?P<subject>.*\bsupport scan \S+ and query scan) (?P<case>\S+) (?P<what>.+)", re.DOTALL)


class _DataWarnings:
    """Data warnings as one ``warning:`` line each; others as Python prints them.

    A warning about one scan that says what an earlier one said about another scan
    (``nifti_folder scan 2: label values [5] are not in the label map ...``) is held back,
    and :meth:`flush` names those scans in one line: a folder of 40 scans with one mistake
    gives two lines, not 40, before the error that names the cause. A warning about a
    support and a query (``... support scan 3 and query scan 2 share 1 identical slices``)
    is held back the same way when it says of another query of that support what it said
    of an earlier one."""

    def __init__(self) -> None:
        self.repeats: dict[tuple[str, str], list[str]] = {}
        self.first: dict[tuple[str, str], str] = {}

    def show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if not issubclass(category, DataWarning):
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            return
        match = _PER_PAIR.fullmatch(str(message)) or _PER_SCAN.fullmatch(str(message))
        if match is not None:
            key = (match["subject"], match["what"])
            if key in self.repeats:
                if match["case"] != self.first[key]:  # the first is named in its own line
                    self.repeats[key].append(match["case"])
                return
            self.repeats[key] = []
            self.first[key] = match["case"]
        print(f"warning: {message}", file=sys.stderr)

    def flush(self) -> None:
        for (subject, what), cases in self.repeats.items():
            cases = list(dict.fromkeys(cases))  # a scan read twice (training, then evaluation) is named once
            if cases:
                # whole, not cut: it is printed after the run's own output, far from the first line
                print(f"warning: the same for {subject}{'s' if len(cases) > 1 else ''} {', '.join(cases)}: {what}",
                      file=sys.stderr)
        self.repeats.clear()
        self.first.clear()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler) ends a command as Ctrl-C does: with the "interrupted"
    message and status 143, instead of a silent death wherever no stop handler is active
    (evaluation, writing records). Training installs its own handler, which stops at a step
    boundary (:mod:`fsmis_bench.training.interrupt`). A handler someone else installed is
    left as it is."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    from .training.interrupt import Interrupted  # a KeyboardInterrupt that carries its exit status

    def interrupt(signum, frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


#: what a Ctrl-C leaves, by command (others: nothing to say beyond "interrupted")
_INTERRUPTED = {
    **dict.fromkeys(("run", "eval", "supervoxels", "prepare"),
                    "interrupted; finished work is kept and the same command resumes"),
    **dict.fromkeys(("report", "export"),
                    "interrupted; nothing was written (what was there is unchanged): run the same command again"),
}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while starting (imports, plugins), before a command ran
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse takes a positional list in one piece: overrides after an option
        # (`run --export-masks DIR train.steps=20`) are still overrides
        if isinstance(getattr(args, "overrides", None), list) and not any(e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.parse_args(argv)  # argparse's own message for what it does not know
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    shown = _DataWarnings()
    try:
        with _sigterm_interrupts(), warnings.catch_warnings():
            warnings.simplefilter("default", DataWarning)
            warnings.showwarning = shown.show
            try:
                code = int(args.func(args) or 0)
            finally:
                shown.flush()
        _leave_together()
        return code
    except FsmisError as exc:
        _end_progress_bars()
        if os.environ.get("FSMIS_TRACEBACK") == "1":  # for whoever debugs the plugin or the harness
            traceback.print_exception(exc)
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        _end_progress_bars()
        said = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(f"error: out of memory ({said})", file=sys.stderr)
        print("  hint: lower train.image_size or train.batch_size, or use memory=low for the diffusion methods "
              "(each is another run); the same command on a machine with more memory resumes this run from its "
              "last checkpoint", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        _end_progress_bars()
        print(_INTERRUPTED.get(args.command, "interrupted"), file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))  # 128 + the signal's number
    except BrokenPipeError:
        # the reader of our output left (`... | head`): not an error of ours. Later writes,
        # and the interpreter's flush at exit, go nowhere instead of raising again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):  # stdout is not a file descriptor
            pass
        return 0


def _out_of_memory(exc: BaseException) -> bool:
    """True for the host's or an accelerator's out-of-memory error (torch raises a
    ``RuntimeError`` for both, ``torch.OutOfMemoryError`` on CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def _end_progress_bars() -> None:
    """Close the progress bars an error left open, so its message starts on a line of its
    own instead of after the bar's last ``\r``-drawn state."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - an error message must not fail
            pass


_finished_commands = 0
_LEAVE_POLL_S = 0.5


def _leave_together() -> None:
    """After a command that worked, the processes of a multi-process run exit together.

    The other processes finish before the main one, which evaluates alone. Left to exit
    then, a process could abort while the interpreter tore gloo down under a busy peer
    (``terminate called without an active exception``, exit -6 after all work was done: a
    finished run that torchrun reports failed; seen in 1 of ~23 two-process CPU runs, 3 of 13
    when each process also destroyed its process group alone). They wait for the main one
    on the launcher's key-value store instead of a collective, so an evaluation of any
    length never meets a collective's timeout, and Ctrl-C still stops them at once.
    """
    global _finished_commands
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    _finished_commands += 1
    key = f"fsmis_bench/finished/{_finished_commands}"
    try:
        store = dist.distributed_c10d._get_default_store()  # private, stable since torch 1.x
    except (AttributeError, RuntimeError):  # not there in some torch: leave as before
        return
    if dist.get_rank() == 0:
        store.set(key, "1")
        return
    try:
        # polled, not store.wait: a sleep lets Ctrl-C through, and a timed-out wait logs a warning
        while not store.check([key]):
            time.sleep(_LEAVE_POLL_S)
    except dist.DistError:  # the store went with the main process (it hosted it): nothing to wait for
        return


if __name__ == "__main__":
    sys.exit(main())
