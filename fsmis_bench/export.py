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
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data.base import ORGANS
from .errors import DataError, DataWarning
from .records import atomic_write, load_predictions


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
                 force: bool = False) -> ExportSummary:
    """Write every predicted mask of the run in ``run_dir`` as NIfTI into ``out_dir``.

    Args:
        run_dir: a run record directory (holds ``config.yaml`` and ``predictions.npz``).
        out_dir: created if needed; existing files are only replaced with ``force``.
        data_root: where the run's built-in dataset lives now, if not where it was.
    Raises:
        DataError: not a run directory, no saved predictions, or files would be overwritten.
    """
    from omegaconf import OmegaConf

    from .runner import build_test_dataset

    run_dir, out_dir = Path(run_dir).expanduser(), Path(out_dir).expanduser()
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir} is not a run directory (no config.yaml)",
                        hint="pass a directory printed by `fsmis-bench run` (results/<method>/...)")
    predictions, complete = _predictions(run_dir)
    if not predictions:
        raise DataError(
            f"{run_dir} holds no predicted masks",
            hint="evaluate again with protocol.save_predictions=true (the default), e.g. `fsmis-bench eval` "
            "with the run's overrides",
        )
    cfg = OmegaConf.load(run_dir / "config.yaml")
    if data_root:
        cfg.data_root = str(data_root)
    dataset = build_test_dataset(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the run showed them when it read the scans
        return _export(run_dir, out_dir, dataset, predictions, complete, force)


def _export(run_dir: Path, out_dir: Path, dataset, predictions: dict, complete: bool, force: bool) -> ExportSummary:
    recorded = {}
    if (run_dir / "cases.csv").is_file():
        cases = pd.read_csv(run_dir / "cases.csv", dtype={"case_id": str})
        recorded = {(r.organ, r.case_id): float(r.dice) for r in cases.itertuples()}

    by_case: dict[str, list[str]] = {}
    for organ, case_id in predictions:
        by_case.setdefault(case_id, []).append(organ)
    targets = [out_dir / f"pred_{c}.nii.gz" for c in by_case]
    targets += [out_dir / f"pred_{c}_{o}.nii.gz" for c, organs in by_case.items() for o in organs]
    existing = [p for p in targets + [out_dir / "masks.csv"] if p.exists()]
    if existing and not force:
        raise DataError(
            f"{out_dir} already holds exported masks ({existing[0].name}, ...); nothing was overwritten",
            hint="choose another --out folder, or pass --force to replace them",
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    summary = ExportSummary(run_dir, out_dir, complete=complete)
    for case_id in sorted(by_case, key=lambda c: dataset.case_ids().index(c) if c in dataset.case_ids() else -1):
        shape = dataset.load(case_id).image.shape
        combined = np.zeros(shape, dtype=np.uint16)
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
        dtype = np.uint8 if combined.max() < 256 else np.uint16
        _save(dataset.source_nifti(case_id, combined.astype(dtype)), out_dir / f"pred_{case_id}.nii.gz")
    atomic_write(out_dir / "masks.csv", pd.DataFrame(summary.rows).to_csv(index=False))
    return summary


def run_export(args: argparse.Namespace) -> int:
    summary = export_masks(args.run_dir, args.out, data_root=args.data_root, force=args.force)
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
    parser.add_argument("--force", action="store_true", help="replace masks already exported there")
    parser.set_defaults(func=run_export)
