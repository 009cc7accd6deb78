"""CLI subcommands ``prepare``, ``supervoxels`` and ``check-data``.

``register(subparsers)`` adds them to the ``fsmis-bench`` parser; each sets
``func=<callable(args) -> int>``. User errors raise :class:`~fsmis_bench.errors.FsmisError`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from ..errors import ConfigError, DataError, FsmisError
from ._io import not_a_folder
from .facts import DATASET_FACTS, dataset_facts

PREPARERS = ("abd_mri", "abd_ct", "card_mri")
DATA_ROOT_ENV = "FSMIS_DATA_ROOT"


def _root_from(args: argparse.Namespace) -> Path:
    root = args.root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise DataError("no data root given", hint=f"pass --root DIR or set {DATA_ROOT_ENV}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data root {root} {not_a_folder(root)}", hint="pass the folder holding CHAOST2/, SABS/, CMR/"
        )
    return root


def run_prepare(args: argparse.Namespace) -> int:
    from . import btcv, chaos, cmr
    from ._io import case_id_of
    from .classmaps import missing_classmaps, write_classmaps
    from .common import RawDataError, is_inside, prepare_cases, remove_if_empty

    _known_dataset(args.dataset, list(PREPARERS))
    facts = dataset_facts(args.dataset)
    raw = Path(args.raw).expanduser()
    if not raw.is_dir():
        raise DataError(f"raw folder {raw} {not_a_folder(raw)}",
                        hint="pass the unpacked release with --raw (the folder it unpacked to, not a .zip)")
    module = {"abd_mri": chaos, "abd_ct": btcv, "card_mri": cmr}[args.dataset]
    out_root = Path(args.out).expanduser()
    dataset_dir = out_root / facts.folder
    out_dir = facts.image_dir(out_root)
    # what this command writes is never read as raw data, even when --out lies inside
    # --raw (a second run would otherwise trip over the first one's output)
    exclude = [dataset_dir]
    if out_root.resolve() != raw.resolve() and is_inside(out_root, [raw]):
        exclude.append(out_root)
    try:
        release = module.find_cases(raw, exclude=exclude)
    except RawDataError as error:
        raise DataError(
            str(error), hint=error.hint or "check --raw: it must point at the unpacked release"
        ) from None
    for note in release.notes:
        print(f"note: {note}", file=sys.stderr)
    created = [p for p in (out_dir, dataset_dir, out_root) if not p.exists()]  # deepest first
    summary = prepare_cases(
        release.cases, out_dir, force=args.force, progress=not args.no_progress, failed=release.problems
    )
    print(summary.format())
    if summary.stale_supervoxels:
        folders = sorted({p.parent.name + "/" for p in summary.stale_supervoxels})
        ids = sorted({case_id_of(p) or "?" for p in summary.stale_supervoxels}, key=lambda i: (len(i), i))
        print(
            f"removed the supervoxels of the {len(ids)} rewritten case(s) {', '.join(ids)} from "
            f"{', '.join(folders)} (made from the old images); `fsmis-bench supervoxels {args.dataset} "
            f"--root {out_root}` or the next run makes them again"
        )
    if summary.unrecorded and args.dataset == "abd_ct":
        print(
            f"warning: {len(summary.unrecorded)} existing case(s) in {out_dir} have no record of their raw "
            "scan and were kept; abd_ct ids now follow the reference numbering (image_0..image_29 in file "
            "order, not the BTCV numbers): if an older fsmis-bench prepared this folder, pass --force",
            file=sys.stderr,
        )
    if not summary.written and not summary.skipped:
        remove_if_empty(created)  # nothing came of it: leave no empty folders behind
    elif summary.written or missing_classmaps(args.dataset, out_dir):
        try:
            written = write_classmaps(args.dataset, out_dir)
        except RuntimeError as error:
            print(f"warning: classmap_*.json not written: {error}", file=sys.stderr)
        else:
            if written:
                print(f"slice index files {', '.join(p.name for p in written)} written (SSL-ALPNet / Q-Net loaders)")
    if not summary.ok:
        print(
            f"{len(summary.failed)} raw case(s) could not be prepared (named above); the others are done. "
            "Fix or remove those files and run the same command again: finished cases are skipped.",
            file=sys.stderr,
        )
        return 2
    return 0


def run_supervoxels(args: argparse.Namespace) -> int:
    from .supervoxels import check_spacing, compare_supervoxels, format_comparison, generate_supervoxels

    _known_dataset(args.dataset, sorted(DATASET_FACTS))
    facts = dataset_facts(args.dataset)
    if args.n_sv is not None and args.n_sv < 1:  # 0 would otherwise fall back to the default unsaid
        raise ConfigError(f"--n-sv must be a positive integer (the smallest supervoxel, in voxels), got {args.n_sv}",
                          hint=f"e.g. --n-sv {facts.n_sv}, or leave it out for the dataset's default")
    if args.spacing:
        check_spacing(args.spacing)
    root = _root_from(args)
    n_sv = args.n_sv or (facts.n_sv if args.method == "felzenszwalb3d" else 400)
    image_dir = facts.image_dir(root)
    if not image_dir.is_dir():
        raise DataError(
            f"{image_dir} {not_a_folder(image_dir)}", hint=f"prepare it with `fsmis-bench prepare {args.dataset}`"
        )
    out_dir = Path(args.out).expanduser() if args.out else facts.supervoxel_dir(root, n_sv)
    run = generate_supervoxels(
        image_dir,
        out_dir,
        n_sv,
        method=args.method,
        workers=args.workers,
        force=args.force,
        spacing_zyx=tuple(args.spacing) if args.spacing else None,
        progress=not args.no_progress,
    )
    print(
        f"supervoxels ({args.method}, n_sv={n_sv}) in {out_dir}: {len(run.written)} written in "
        f"{run.seconds:.1f} s, {len(run.skipped)} already there (kept; --force to redo), {len(run.failed)} failed"
    )
    for case_id, message in run.failed:
        print(f"  FAILED case {case_id}: {message}")
    if args.compare_to:
        rows = compare_supervoxels(out_dir, Path(args.compare_to).expanduser())
        print(f"\nours: {out_dir}\nreference: {args.compare_to}\n")
        print(format_comparison(rows))
    return 0 if run.ok else 2


def run_check_data(args: argparse.Namespace) -> int:
    from .check import check_dataset, check_nifti_folder, format_report

    _known_dataset(args.dataset, [*sorted(DATASET_FACTS), "nifti_folder"])
    if args.dataset == "nifti_folder":
        if not args.path or not args.label_map:
            raise DataError(
                "check-data nifti_folder needs --path and --label-map",
                hint="e.g. fsmis-bench check-data nifti_folder --path my_scans --label-map '{liver:1,spleen:2}'",
            )
        root = args.root or os.environ.get(DATA_ROOT_ENV)
        try:
            report = check_nifti_folder(
                Path(args.path), args.label_map, modality=_override_arg(args.modality), orientation=args.orientation,
                supervoxels=args.supervoxels, n_supervoxels=args.n_sv, data_root=Path(root) if root else None,
                folds=_override_arg(args.folds), fold_ids=_override_arg(args.fold_ids, "--fold-ids", list_only=True),
                support=args.support,
                test_organs=_override_arg(args.test_organs), supp_idx=args.supp_idx, n_shot=args.n_shot,
            )
        except FsmisError as exc:  # the plugin names its run options; here they are this command's flags
            exc.message, exc.hint = _as_flags(exc.message), _as_flags(exc.hint or "") or None
            raise
        print(format_report(report))
        return 0 if report.ok else 2
    for option in ("path", "label_map", "modality", "orientation", "supervoxels", "folds", "fold_ids", "support",
                   "test_organs", "supp_idx", "n_shot"):
        if getattr(args, option) is not None:
            raise DataError(
                f"--{option.replace('_', '-')} is an option of check-data nifti_folder",
                hint=f"{args.dataset} reads its layout under --root" if option not in _SUPPORT_FLAGS else
                f"{args.dataset}'s folds and support scans are the protocol's, and every one shows its test organs",
            )
    report = check_dataset(
        args.dataset, _root_from(args), require_supervoxels=not args.no_supervoxels, n_sv=args.n_sv
    )
    print(format_report(report))
    return 0 if report.ok else 2


#: check-data nifti_folder's flags that pick support scans (dests)
_SUPPORT_FLAGS = ("folds", "fold_ids", "support", "test_organs", "supp_idx", "n_shot")

#: a run's option -> check-data's flag, in messages
_FLAGS = {"dataset.label_map": "--label-map", "dataset.path": "--path", "dataset.modality": "--modality",
          "dataset.orientation": "--orientation", "dataset.supervoxels": "--supervoxels",
          "dataset.n_supervoxels": "--n-sv", "dataset.folds": "--folds", "dataset.fold_ids": "--fold-ids",
          "dataset.support": "--support", "dataset.test_organs": "--test-organs", "protocol.supp_idx": "--supp-idx",
          "protocol.n_shot": "--n-shot"}


def _as_flags(text: str) -> str:
    """A message about ``dataset.label_map=...`` as check-data's ``--label-map ...``."""
    text = re.sub(r"'\+?dataset\.label_map=", "--label-map '", text)
    for option, flag in _FLAGS.items():
        text = re.sub(rf"\+?{re.escape(option)}=", f"{flag} ", text)
        text = text.replace(option, flag)
    return text


def _known_dataset(name: str, known: list[str]) -> None:
    """One line with the close name for a dataset these commands do not know (argparse's
    ``choices`` would print its usage text first)."""
    if name not in known:
        from .._registry import closest

        guess = closest(name, known)
        raise DataError(f"unknown dataset {name!r}" + (f"; did you mean {guess!r}?" if guess else ""),
                        hint=f"one of: {', '.join(known)}")


def _override_arg(text: str | None, flag: str = "", list_only: bool = False):
    """A flag given as a run gives the same option: ``null``, a name (``loo``, ``ct``), or a
    list or mapping in override syntax (``[[0,1,2],[3,4,5]]``, ``[liver,spleen]``,
    ``{1:ct,2:mri}``); ``list_only``: a list or nothing (``--fold-ids``)."""
    if text is not None and text.strip() == "null":
        return None
    if list_only and text is not None and not text.strip().startswith("["):
        raise ConfigError(f"{flag} {text}: a list of folds is needed", hint=f"e.g. {flag} '[[p01,p02,p03],[p03,p04,p05]]'")
    if text and text.strip().startswith(("[", "{")):
        from ..data.options import parse_override_value

        return parse_override_value(text)
    return text


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare``, ``supervoxels`` and ``check-data`` to the CLI."""
    names = sorted(DATASET_FACTS)

    prepare = subparsers.add_parser(
        "prepare",
        help="convert a raw public release into the prepared layout",
        description=(
            "Convert a raw release (CHAOS DICOM, BTCV NIfTI, MS-CMRSeg NIfTI) into "
            "<out>/<DATASET>/<images>/image_<id>.nii.gz + label_<id>.nii.gz and the "
            "classmap_<n>.json slice indexes, with the reference notebooks' recipe. Finished "
            "cases are skipped, so an interrupted run resumes; existing files are only replaced "
            "with --force, which also removes the rewritten cases' supervoxels. Files that hold "
            "no scan (__MACOSX, .DS_Store, notes) are passed over with a note; MS-CMRSeg scans "
            "without a label are skipped."
        ),
    )
    prepare.add_argument("dataset", metavar="{" + ",".join(PREPARERS) + "}")
    prepare.add_argument(
        "--raw", required=True, help="unpacked release (CHAOS_Train_Sets, BTCV RawData, MS-CMRSeg folder)"
    )
    prepare.add_argument(
        "--out", required=True, help="data root to write into (gets CHAOST2/, SABS/ or CMR/)"
    )
    prepare.add_argument("--force", action="store_true", help="overwrite cases that are already prepared")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bar")
    prepare.set_defaults(func=run_prepare)

    supervoxels = subparsers.add_parser(
        "supervoxels",
        help="make supervoxel pseudo-labels for a prepared dataset",
        description=(
            "Felzenszwalb supervoxels (ADNet 3-D by default, SSL-ALPNet 2-D as an option) into "
            "<root>/<DATASET>/supervoxels_<n>/superpix-MIDDLE_<id>.nii.gz. Existing files are "
            "kept unless --force."
        ),
    )
    supervoxels.add_argument("dataset", metavar="{" + ",".join(names) + "}")
    supervoxels.add_argument("--root", help=f"data root (default: ${DATA_ROOT_ENV})")
    supervoxels.add_argument(
        "--n-sv", type=int, default=None, help="min_size (default 5000 abdomen, 1000 cardiac; 400 for 2-D)"
    )
    supervoxels.add_argument(
        "--method", choices=("felzenszwalb3d", "felzenszwalb2d"), default="felzenszwalb3d"
    )
    supervoxels.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="volumes in parallel"
    )
    supervoxels.add_argument("--force", action="store_true", help="recompute existing supervoxel files")
    supervoxels.add_argument("--out", help="write here instead of <root>/<DATASET>/supervoxels_<n>")
    supervoxels.add_argument(
        "--spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="override header spacing (mm)"
    )
    supervoxels.add_argument(
        "--compare-to", help="reference supervoxel folder: print a per-scan comparison table"
    )
    supervoxels.add_argument("--no-progress", action="store_true", help="no progress bar")
    supervoxels.set_defaults(func=run_supervoxels)

    check = subparsers.add_parser(
        "check-data",
        help="verify a prepared data root, or a folder of your own scans (nifti_folder)",
        description=(
            "Check images, labels, organs and supervoxels of one dataset; exit 0 if OK, 2 otherwise. "
            "For nifti_folder also each scan's orientation, modality, voxel sizes, and scans sharing "
            "identical slices (warnings, which do not fail the check)."
        ),
    )
    check.add_argument("dataset", metavar="{" + ",".join([*names, "nifti_folder"]) + "}")
    check.add_argument("--root", help=f"data root (default: ${DATA_ROOT_ENV})")
    check.add_argument(
        "--n-sv", type=int, default=None, help="supervoxel folder suffix (default: the dataset's)"
    )
    check.add_argument("--no-supervoxels", action="store_true", help="do not require supervoxels")
    folder = check.add_argument_group("nifti_folder (the same options as dataset.* in a run)")
    folder.add_argument("--path", help="the folder of image_<id>.nii.gz and label_<id>.nii.gz")
    folder.add_argument(
        "--label-map", help="organ -> label value: '{liver:1,spleen:2}', or a YAML/JSON file holding the mapping"
    )
    folder.add_argument("--modality", help="none (default) | ct | mri | auto | '{<id>:ct,<id>:mri}'")
    folder.add_argument("--orientation", help="axis codes the scans are brought to (default LAS), or as_stored")
    folder.add_argument("--supervoxels", help="pseudo-label folder (beside --path when relative), if training uses "
                        "one, or auto: which a run would make (their size: --n-sv)")
    folder.add_argument("--folds", help="null (default) | all | loo | '[[0,1,2],[3,4,5]]' (scan positions)")
    folder.add_argument("--fold-ids", help="folds by scan id, e.g. '[[p01,p02,p03],[p03,p04,p05]]'")
    folder.add_argument("--support", help="a scan id: the support of every fold")
    folder.add_argument("--test-organs", help="the organs evaluated, e.g. '[liver,spleen]' (default: every organ "
                        "of --label-map)")
    protocol = check.add_argument_group(
        "support scans (the same options as protocol.* in a run): each one a run would draw must show every test organ")
    protocol.add_argument("--supp-idx", type=int, default=None,
                          help="the support's position in each fold (default: the config's protocol.supp_idx)")
    protocol.add_argument("--n-shot", type=int, default=None, help="support scans per fold: --supp-idx and the next ones (default 1)")
    check.set_defaults(func=run_check_data)
