"""Pieces shared by the raw-release converters: geometry operations and the case loop.

The case loop (:func:`prepare_cases`) gives every converter the same behaviour: finished
cases are skipped (an interrupted run resumes), existing files are only replaced with
``force``, each file is written atomically, and a raw case that cannot be read is reported
by name and skipped while the others go on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ._io import read_image_checked, remove_stale_partials, write_image_atomic

#: In-plane size of every prepared volume.
TARGET_IN_PLANE = (256, 256)


class RawDataError(Exception):
    """A raw file is missing, unreadable or holds something unexpected (message names it)."""


# -- geometry -------------------------------------------------------------------------------


#: The SABS CT window in HU, mapped to 0..255 (PROTOCOL.md §1).
CT_HU_WINDOW = (-125.0, 275.0)


def clip_top_percent(array: np.ndarray, percent: float = 0.5) -> np.ndarray:
    """Clip intensities above the ``100 - percent`` percentile (off-resonance spikes).

    The MRI intensity recipe of the CHAOS and MS-CMRSeg preparation.
    """
    high = float(np.percentile(array, 100.0 - percent))
    return np.minimum(array, high)


def window_ct(array: np.ndarray, window: tuple[float, float] = CT_HU_WINDOW) -> np.ndarray:
    """Clip HU to ``window`` and rescale it linearly to 0..255 (the SABS CT recipe), float64."""
    low, high = window
    clipped = np.clip(np.asarray(array, dtype=np.float64), low, high)
    return (clipped - low) / (high - low) * 255.0


#: modality -> the benchmark's intensity recipe for it (``nifti_folder``'s ``modality``)
INTENSITY_RECIPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ct": window_ct,
    "mri": clip_top_percent,
}


def resample_to_spacing(
    image: sitk.Image, spacing_xyz: tuple[float | None, float | None, float | None], interpolator: int
) -> sitk.Image:
    """Resample to ``spacing_xyz`` keeping origin and direction; size = round(extent / spacing).

    An entry of ``spacing_xyz`` that is None or <= 0 keeps that axis unchanged.
    """
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    new_spacing = np.array(
        [o if (s is None or s <= 0) else s for s, o in zip(spacing_xyz, old_spacing, strict=True)],
        dtype=float,
    )
    old_size = np.array(image.GetSize(), dtype=float)
    new_size = [max(1, int(round(n))) for n in old_size * old_spacing / new_spacing]
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        tuple(new_spacing),
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def resample_to_size(image: sitk.Image, size_xyz: tuple[int, int, int], interpolator: int) -> sitk.Image:
    """Resample onto a grid of ``size_xyz`` voxels covering the same physical extent."""
    old_size = np.array(image.GetSize(), dtype=float)
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    new_size = np.array(size_xyz, dtype=float)
    new_spacing = old_spacing * old_size / new_size
    # the first voxel centre moves by half the change of voxel size, so the field of view
    # (outer voxel edges) stays where it was
    direction = np.array(image.GetDirection()).reshape(3, 3)
    shift = direction @ ((new_spacing - old_spacing) / 2.0)
    origin = tuple(np.array(image.GetOrigin()) + shift)
    return sitk.Resample(
        image,
        [int(s) for s in size_xyz],
        sitk.Transform(),
        interpolator,
        origin,
        tuple(new_spacing),
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def resample_labels_per_class(
    label: sitk.Image, resample: Callable[[sitk.Image, int], sitk.Image]
) -> sitk.Image:
    """Resample a label map class by class: each class's mask linearly, then the arg-max.

    Smoother than nearest neighbour when shrinking, and no value outside the input's
    classes can appear.
    """
    values = np.unique(sitk.GetArrayViewFromImage(label)).astype(np.int64)
    best_score: np.ndarray | None = None
    best_class: np.ndarray | None = None
    reference: sitk.Image | None = None
    for value in values:
        mask = sitk.Cast(sitk.Equal(label, int(value)), sitk.sitkFloat32)
        resampled = resample(mask, sitk.sitkLinear)
        score = sitk.GetArrayFromImage(resampled)
        if best_score is None:
            best_score = score
            best_class = np.full(score.shape, value, dtype=np.int64)
            reference = resampled
            continue
        better = score > best_score
        best_score[better] = score[better]
        best_class[better] = value
    out = sitk.GetImageFromArray(best_class.astype(np.float64))
    out.CopyInformation(reference)
    return out


def center_crop_pad_xy(image: sitk.Image, size_xy: tuple[int, int] = TARGET_IN_PLANE) -> sitk.Image:
    """Centre-crop or zero-pad x and y to ``size_xy``; the origin follows so geometry stays true."""
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X)
    starts = []
    out = np.zeros((array.shape[0], size_xy[1], size_xy[0]), dtype=array.dtype)
    src_slices, dst_slices = [], []
    for axis_size, target in ((array.shape[2], size_xy[0]), (array.shape[1], size_xy[1])):
        start = (axis_size - target) // 2  # negative: padding before
        starts.append(start)
        src_lo, dst_lo = max(start, 0), max(-start, 0)
        length = min(axis_size - src_lo, target - dst_lo)
        src_slices.append(slice(src_lo, src_lo + length))
        dst_slices.append(slice(dst_lo, dst_lo + length))
    out[:, dst_slices[1], dst_slices[0]] = array[:, src_slices[1], src_slices[0]]
    result = sitk.GetImageFromArray(out)
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(image.GetDirection())
    result.SetOrigin(image.TransformContinuousIndexToPhysicalPoint((float(starts[0]), float(starts[1]), 0.0)))
    return result


def as_float64(image: sitk.Image, round_values: bool = False) -> sitk.Image:
    """The storage convention of the prepared data: float64 voxels (labels too)."""
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    if round_values:
        array = np.rint(array)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-3) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tolerance, 1e-2))
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def read_nifti(path: Path) -> sitk.Image:
    """Read a NIfTI file, turning reader failures into a :class:`RawDataError` naming it."""
    try:
        return read_image_checked(path)
    except RuntimeError as error:
        last = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise RawDataError(f"{path}: cannot be read ({last})") from None


# -- the case loop --------------------------------------------------------------------------


@dataclass
class RawCase:
    """One raw case: its output id and a loader returning ``(image, label)`` ready to write."""

    case_id: str
    source: str  # shown in messages
    load: Callable[[], tuple[sitk.Image, sitk.Image]]


@dataclass
class PrepareSummary:
    """What a ``prepare`` run did."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        lines = [
            f"prepared into {self.out_dir}: {len(self.written)} written, {len(self.skipped)} skipped, {len(self.failed)} failed"
        ]
        if self.skipped:
            lines.append(
                f"  skipped (already prepared, not overwritten; pass --force to redo): {', '.join(self.skipped)}"
            )
        for case_id, message in self.failed:
            lines.append(f"  FAILED case {case_id}: {message}")
        return "\n".join(lines)


def output_paths(out_dir: Path, case_id: str) -> tuple[Path, Path]:
    return out_dir / f"image_{case_id}.nii.gz", out_dir / f"label_{case_id}.nii.gz"


def prepare_cases(
    cases: list[RawCase],
    out_dir: Path,
    force: bool = False,
    progress: bool = True,
    failed: list[tuple[str, str]] | None = None,
) -> PrepareSummary:
    """Convert every case; see the module docstring for the resume/overwrite rules.

    Args:
        cases: the raw cases found by a converter.
        out_dir: the prepared image folder.
        force: replace existing outputs.
        failed: problems found while discovering cases, reported with the others.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    summary = PrepareSummary(out_dir=out_dir, failed=list(failed or []))
    todo: list[RawCase] = []
    for case in cases:
        image_path, label_path = output_paths(out_dir, case.case_id)
        if not force and image_path.exists() and label_path.exists():
            summary.skipped.append(case.case_id)
        else:
            todo.append(case)
    if summary.skipped:
        print(
            f"{len(summary.skipped)} case(s) already prepared in {out_dir}: kept as they are "
            "(pass --force to overwrite them)",
            file=sys.stderr,
        )
    for case in tqdm(todo, desc="prepare", unit="case", file=sys.stderr, disable=not progress or not todo
                     or os.environ.get("FSMIS_NO_PROGRESS") == "1"):
        image_path, label_path = output_paths(out_dir, case.case_id)
        try:
            image, label = case.load()
        except RawDataError as error:
            summary.failed.append((case.case_id, str(error)))
            continue
        except Exception as error:  # noqa: BLE001 - name the case, keep going
            summary.failed.append((case.case_id, f"{case.source}: {type(error).__name__}: {error}"))
            continue
        # without --force only missing halves of a pair are written (an interrupted run
        # may have left one of them); nothing existing is replaced
        if force or not label_path.exists():
            write_image_atomic(label, label_path)
        if force or not image_path.exists():
            write_image_atomic(image, image_path)
        summary.written.append(case.case_id)
    return summary
