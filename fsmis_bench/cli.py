"""``fsmis-bench``: run, eval, export, report, list, describe, prepare, supervoxels, check-data, weights.

Run-type commands take Hydra overrides::

    fsmis-bench run method=prototype dataset=abd_mri setting=1 fold=0 seed=0
    fsmis-bench run -m method=support_copy,prototype fold=0,1,2,3,4

User errors print one message and a hint, and exit with status 2; nothing already
written is removed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
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
}


def _run(args: argparse.Namespace) -> int:
    from .config import compose, expand_sweep, is_sweep
    from .runner import execute

    overrides = list(args.overrides)
    checkpoint = None
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
    if not args.multirun and is_sweep(overrides):
        raise FsmisError("comma-separated values describe a sweep", hint="add -m to run every combination")
    runs = expand_sweep(overrides) if args.multirun else [overrides]
    configs = [compose(r) for r in runs]  # every config is checked before anything runs
    failures = []
    for index, (run_overrides, cfg) in enumerate(zip(runs, configs)):
        if len(configs) > 1:
            print(f"[{index + 1}/{len(configs)}] {' '.join(run_overrides)}", file=sys.stderr)
        try:
            run_dir = execute(cfg, allow_training=args.command == "run", checkpoint=checkpoint)
            print(run_dir)
            if args.export_masks:
                from .export import export_masks

                out = Path(args.export_masks).expanduser()
                if len(configs) > 1:
                    out = out / run_dir.relative_to(Path(str(cfg.results_dir)).expanduser())
                print(export_masks(run_dir, out).format(), file=sys.stderr)
        except FsmisError as exc:
            if len(configs) == 1:
                raise
            failures.append((run_overrides, exc))
            print(f"error: {exc}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(configs)} runs failed; finished runs are kept:", file=sys.stderr)
        for run_overrides, exc in failures:
            print(f"  {' '.join(run_overrides)}: {exc.message}", file=sys.stderr)
        return 2
    return 0


def _list(args: argparse.Namespace) -> int:
    from .plugins import registries

    rows = [
        {"kind": kind, "name": entry.name, "plugin": entry.plugin, "description": entry.description}
        for kind, registry in registries().all().items()
        for entry in registry
    ]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
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
        run_parser = sub.add_parser(name, help=help_text, description=help_text)
        run_parser.add_argument("-m", "--multirun", action="store_true", help="sweep comma-separated values")
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Data warnings as one ``warning:`` line; others as Python prints them."""
    if issubclass(category, DataWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default", DataWarning)
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except FsmisError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("interrupted; finished work is kept and the same command resumes", file=sys.stderr)
        return int(getattr(exc, "exit_code", 130))


if __name__ == "__main__":
    sys.exit(main())
