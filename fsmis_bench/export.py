"""``export``: a run's predicted masks as NIfTI files, in each query scan's own grid.

A run keeps its predictions bit-packed in ``predictions.npz`` on the grid the harness
slices (for ``nifti_folder``, each scan reoriented to one canonical orientation). Export
rebuilds the run's test dataset from its ``config.yaml``, places every prediction into a
volume of its scan's size (slices that were not predicted stay 0: EP1 evaluates only the
slices whose ground truth shows the organ), and undoes the reorientation, so each file has
the voxel grid, affine and orientation of the scan it came from and overlays it in any
viewer.

Files, per query scan ``<id>`` of the run::

    pred_<id>_<organ>.nii.gz   one binary mask per evaluated organ (uint8 0/1)
    pred_<id>.nii.gz           all organs in one label map, with the dataset's label values
                               (where two organs' masks overlap, the one first in the
                               organ vocabulary keeps the voxel)
    masks.csv                  what was written, with the recorded Dice of each mask

Export refuses a test dataset whose files changed since the run (their digests are in
``run.json``: ``inputs.test_data``), since it would pair the run's predictions with other
scans. The files are written into a temporary folder (in ``--out``, or beside it while it
does not exist) and moved into place only when all are complete; ``--force`` first
removes the masks exported there before (``pred_*.nii.gz``, ``masks.csv``), so no mask of
another run stays mixed in.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from .data.base import ORGANS
from .errors import DataError, DataWarning
from .records import (
    atomic_write, can_write_in, load_predictions, nearest_existing, new_file_mode, read_json, read_run_config,
)

#: the files an export writes (and ``--force`` replaces)
EXPORTED = ("pred_*.nii.gz", "masks.csv")


@dataclass
class ExportSummary:
    """What :func:`export_masks` wrote."""

    run_dir: Path
    out_dir: Path
    rows: list[dict] = field(default_factory=list)
    complete: bool = True

    def format(self) -> str:
        cases = sorted({r["case_id"] for r in self.rows})
        note = "" if self.complete else " (the run is not finished: masks of its finished groups only)"
        return (f"exported {len(self.rows)} masks of {len(cases)} query scans from {self.run_dir} "
                f"to {self.out_dir}{note}")


def _predictions(run_dir: Path) -> tuple[dict, bool]:
    merged = load_predictions(run_dir)
    if merged:
        return merged, True
    for part in sorted((run_dir / "parts").glob("predictions_*.npz")):
        merged.update(load_predictions(part))
    return merged, False


def _organ_key(organ: str) -> tuple[int, str]:
    return (ORGANS.index(organ), organ) if organ in ORGANS else (len(ORGANS), organ)


def _save(image, path: Path) -> None:
    """Write through a temporary file and a rename (a crash never leaves half a file)."""
    import nibabel as nib

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    nib.save(image, str(tmp))
    os.replace(tmp, path)


def export_masks(run_dir: str | Path, out_dir: str | Path, *, data_root: str | None = None,
                 scans: str | None = None, force: bool = False) -> ExportSummary:
    """Write every predicted mask of the run in ``run_dir`` as NIfTI into ``out_dir``.

    Args:
        run_dir: a run record directory (holds ``config.yaml`` and ``predictions.npz``).
        out_dir: created if needed; existing files are only replaced with ``force``.
        data_root: where the run's built-in dataset lives now, if not where it was.
        scans: where a ``nifti_folder`` run's scan folder is now, if it was moved (the
            files must be those the run read: their digests are checked).
    Raises:
        DataError: not a run directory, no saved predictions, masks exported there already
            (without ``force``), a folder that cannot be written, or test files that changed
            since the run.
    """
    from .runner import build_test_dataset

    run_dir, out_dir = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    cfg = read_run_config(run_dir)  # refused before anything is written
    check_export_target(out_dir, force=force, run_dir=run_dir)
    predictions, complete = _predictions(run_dir)
    if not predictions:
        raise DataError(
            f"{run_dir} holds no predicted masks",
            hint="evaluate again with protocol.save_predictions=true (the default), e.g. `fsmis-bench eval` "
            "with the run's overrides",
        )
    if data_root:
        cfg.data_root = str(data_root)
    _point_at_scans(cfg, scans, run_dir, out_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the run showed them when it read the scans
        dataset = build_test_dataset(cfg)
        _check_same_data(run_dir, dataset)
        staging = None
        try:
            staging = _staging_folder(out_dir)
            summary = _export(run_dir, staging, dataset, predictions, complete)
            _move_into_place(staging, out_dir, force)
        except OSError as exc:
            raise DataError(f"cannot write masks to {out_dir}: {exc.strerror or exc}"
                            + (f" ({exc.filename})" if exc.filename else ""),
                            hint="free some space or make the folder writable, then export again "
                            f"(`fsmis-bench export {run_dir} --out {out_dir}`); nothing was written there") from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    summary.out_dir = out_dir
    return summary


def _point_at_scans(cfg, scans: str | None, run_dir: Path, out_dir: Path) -> None:
    """Set the run's ``nifti_folder`` test folder to ``scans``; without it, a recorded folder
    that is gone is refused with the way to name where it is now."""
    node = cfg.get("test_dataset") or (cfg.dataset if cfg.get("protocol", {}).get("test_dataset") in (None, "")
                                        else None)
    own_folder = node is not None and node.get("name") == "nifti_folder"
    if scans is not None:
        if not own_folder:
            raise DataError(f"--scans applies to runs tested on nifti_folder; {run_dir.name} was tested on "
                            f"{node.get('name') if node is not None else cfg.protocol.test_dataset}",
                            hint="for a built-in dataset moved elsewhere, use --data-root")
        folder = Path(scans).expanduser()
        if not folder.is_dir():  # named here: the dataset would name test_dataset.path, which the user did not set
            raise DataError(f"--scans {scans}: {'is a file, not a folder' if folder.exists() else 'does not exist'}",
                            hint="name the folder that holds the scans the run read (image_*.nii.gz, label_*.nii.gz)")
        node.path = str(folder.resolve())
        return
    if own_folder and node.get("path") and Path(str(node.path)).is_absolute() and not Path(str(node.path)).is_dir():
        raise DataError(f"the scan folder this run read, {node.path}, is not there any more",
                        hint=f"name where it is now: `fsmis-bench export {run_dir} --out {out_dir} --scans <folder>` "
                        "(the files must be those the run read)")


def check_exportable(cfg: DictConfig) -> None:
    """Refuse ``--export-masks`` before a run whose test dataset has no scan files to write
    masks in the grid of (:attr:`~fsmis_bench.data.base.VolumeDataset.has_file_geometry`).

    Raises:
        DataError: the phantom, or a plugin dataset made in memory.
    """
    from .plugins import registries

    node = cfg.get("test_dataset") or cfg.dataset
    name = str(node.name)
    if not getattr(registries().datasets.get(name), "has_file_geometry", True):
        raise DataError(
            f"--export-masks: {name} is made in memory, so it has no scan files to write masks in the grid of",
            hint="drop --export-masks, or run on scans read from files (e.g. dataset=nifti_folder "
                 "dataset.path=DIR, or protocol.test_dataset=nifti_folder test_dataset.path=DIR)",
        )


def check_export_target(out_dir: Path, *, force: bool = False, run_dir: Path | None = None,
                        masks_too: bool = True) -> None:
    """Refuse a folder that masks cannot be written to, before anything is computed or written.

    Args:
        out_dir: where the masks go (created if needed).
        force: masks exported there before may be replaced.
        run_dir: the run whose masks these are (for the hint), if known.
        masks_too: also refuse a folder that holds exported masks already (unless ``force``).
    Raises:
        DataError: ``out_dir`` (or a folder above it) is a file, cannot be written, or holds
            exported masks.
    """
    out_dir = Path(out_dir).expanduser()
    existing = nearest_existing(out_dir)
    if not existing.is_dir():
        raise DataError(f"cannot write masks to {out_dir}: {existing} is a file, not a folder",
                        hint="choose another folder for the masks")
    if not can_write_in(existing):
        raise DataError(f"cannot write masks to {out_dir}: {existing} is not writable",
                        hint="make it writable, or choose another folder for the masks")
    if masks_too and not force and existing == out_dir:
        found = sorted(p.name for pattern in EXPORTED for p in out_dir.glob(pattern))
        if found:
            run = str(run_dir) if run_dir is not None else "<the run's folder>"
            raise DataError(
                f"{out_dir} already holds exported masks ({found[0]}, ...); nothing was overwritten",
                hint=f"choose another folder, or replace them with `fsmis-bench export {run} --out {out_dir} --force`",
            )


def _check_same_data(run_dir: Path, dataset) -> None:
    """Refuse a test dataset whose files differ from those the run read (``run.json``)."""
    try:
        recorded = (read_json(run_dir / "run.json").get("inputs") or {}).get("test_data") or {}
    except (OSError, ValueError, AttributeError) as exc:
        # said, not refused: the masks are the run's, only the check of the scans is lost
        with warnings.catch_warnings():  # the caller silences the data warnings of reading the scans, not this
            warnings.simplefilter("always", DataWarning)
            warnings.warn(f"{run_dir / 'run.json'} is unreadable ({type(exc).__name__}), so the scans cannot be "
                          "checked against those the run read: the masks are written for the files as they are now",
                          DataWarning, 2)
        return
    digests = {k: v for k, v in recorded.items() if k.endswith("sha256")}
    if not digests:
        return
    current = dataset.identity(with_supervoxels=bool(recorded.get("with_supervoxels", False)))
    changed = [k for k, v in digests.items() if current.get(k) != v]
    if changed:
        where = getattr(dataset, "folder", None) or recorded.get("path") or dataset.name
        raise DataError(
            f"the files of the test dataset ({where}) changed since the run {run_dir.name} read them "
            f"({changed[0]} differs from run.json), so its predictions would be paired with other scans",
            hint="restore the files as they were when the run read them, or run again on the changed files "
            "(a new run: the files are part of its identity)",
        )


def _staging_folder(out_dir: Path) -> Path:
    """An empty hidden folder inside ``out_dir`` when it exists, else beside it (on the same
    file system either way, so moving the files into place is a rename).

    Its name carries this host and process (``.export-<host>-<pid>-...``), so that the
    staging folders of exports that were killed (``kill -9``, a node lost) are removed by
    the next export there: those of this host whose process is gone, never another host's,
    which may still be writing."""
    if out_dir.is_dir():
        parent, prefix = out_dir, ".export-"
    else:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        parent, prefix = out_dir.parent, f".{out_dir.name}.export-"
    host = host_tag()
    for stale in parent.glob(f"{glob.escape(prefix)}{glob.escape(host)}-*-*"):
        pid = stale.name[len(prefix) + len(host) + 1:].split("-", 1)[0]
        if stale.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{prefix}{host}-{os.getpid()}-", dir=parent))
    mode = new_file_mode()
    os.chmod(staging, mode | (mode & 0o444) >> 2)  # mkdtemp makes it 0700; an ordinary folder: x where r
    return staging


def host_tag() -> str:
    """This host's name as it goes into a staging folder's name (``-`` would split it)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, owned by someone else
        return True
    return True


def _move_into_place(staging: Path, out_dir: Path, force: bool) -> None:
    """The complete export in ``staging`` becomes ``out_dir``'s masks; with ``force`` the
    masks exported there before go first (another run's may name other scans)."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    if force:
        for pattern in EXPORTED:
            for old in out_dir.glob(pattern):
                old.unlink()
    for path in sorted(staging.iterdir()):
        os.replace(path, out_dir / path.name)
    staging.rmdir()


def _label_dtype(values: list[int]):
    """The smallest integer type holding ``values`` and 0 (NIfTI viewers read all of them)."""
    low, high = min([0, *values]), max([0, *values])
    for dtype in (np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return np.int64


def _export(run_dir: Path, out_dir: Path, dataset, predictions: dict, complete: bool) -> ExportSummary:
    recorded = {}
    if (run_dir / "cases.csv").is_file():
        cases = pd.read_csv(run_dir / "cases.csv", dtype={"case_id": str})
        recorded = {(r.organ, r.case_id): float(r.dice) for r in cases.itertuples()}

    by_case: dict[str, list[str]] = {}
    for organ, case_id in predictions:
        by_case.setdefault(case_id, []).append(organ)
    unknown = sorted(c for c in by_case if c not in dataset.case_ids())
    if unknown:
        raise DataError(f"the run predicted scans that the test dataset no longer holds: {unknown[:5]}",
                        hint="restore the files the run read")
    dtype = _label_dtype([int(dataset.label_map.get(o, 0)) for organs in by_case.values() for o in organs])

    names: dict[str, str] = {}  # file name -> what it holds
    for case_id, organs in by_case.items():
        for name, holds in [(f"pred_{case_id}.nii.gz", f"scan {case_id}'s organs")] + [
                (f"pred_{case_id}_{organ}.nii.gz", f"scan {case_id}'s {organ}") for organ in organs]:
            if name in names:  # scan ids "1" and "1_liver"
                raise DataError(f"{names[name]} and {holds} would both be written as {name}",
                                hint="rename one scan's files (image_<id>, label_<id>) so that no id is another "
                                     "id followed by _<organ>, and run again")
            names[name] = holds

    summary = ExportSummary(run_dir, out_dir, complete=complete)
    for case_id in sorted(by_case, key=dataset.case_ids().index):
        shape = dataset.load(case_id).image.shape
        combined = np.zeros(shape, dtype=np.int64)
        for organ in sorted(by_case[case_id], key=_organ_key):
            slices, pred = predictions[(organ, case_id)]
            mask = np.zeros(shape, dtype=np.uint8)
            mask[np.asarray(slices, dtype=int)] = pred
            path = out_dir / f"pred_{case_id}_{organ}.nii.gz"
            _save(dataset.source_nifti(case_id, mask), path)
            value = int(dataset.label_map.get(organ, 0))
            combined[(mask > 0) & (combined == 0)] = value
            summary.rows.append({
                "case_id": case_id, "organ": organ, "file": path.name, "label_value": value,
                "predicted_slices": int(len(slices)), "predicted_voxels": int(mask.sum()),
                "recorded_dice": recorded.get((organ, case_id), float("nan")),
            })
        _save(dataset.source_nifti(case_id, combined.astype(dtype)), out_dir / f"pred_{case_id}.nii.gz")
        dataset.release(case_id)  # one scan at a time, whatever the folder's size
    atomic_write(out_dir / "masks.csv", pd.DataFrame(summary.rows).to_csv(index=False))
    return summary


def run_export(args: argparse.Namespace) -> int:
    summary = export_masks(args.run_dir, args.out, data_root=args.data_root, scans=args.scans, force=args.force)
    print(summary.format())
    print(f"list of files: {summary.out_dir / 'masks.csv'}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` to the CLI."""
    parser = subparsers.add_parser(
        "export",
        help="write a run's predicted masks as NIfTI in each scan's own grid and orientation",
        description=(
            "Write every predicted mask of a run as NIfTI (pred_<id>_<organ>.nii.gz, and all organs in "
            "pred_<id>.nii.gz), in the voxel grid, affine and orientation of the query scan's own file, "
            "so it overlays the scan in any viewer. Slices the run did not predict are 0."
        ),
    )
    parser.add_argument("run_dir", help="a run directory (printed by `fsmis-bench run`)")
    parser.add_argument("--out", required=True, help="folder to write into")
    parser.add_argument("--data-root", help="where the run's built-in dataset lives now (default: as recorded)")
    parser.add_argument("--scans", metavar="DIR",
                        help="where a nifti_folder run's scan folder is now, if it was moved (default: as recorded)")
    parser.add_argument("--force", action="store_true",
                        help="replace masks already exported there (every pred_*.nii.gz and masks.csv in it)")
    parser.set_defaults(func=run_export)
