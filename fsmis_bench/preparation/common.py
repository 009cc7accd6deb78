"""Pieces shared by the raw-release converters: geometry operations and the case loop.

The case loop (:func:`prepare_cases`) gives every converter the same behaviour: finished
cases are skipped (an interrupted run resumes), existing files are only replaced with
``force``, each file is written atomically, and a raw case that cannot be read is reported
by name and skipped while the others go on. A rewritten image makes the supervoxels of its
case stale, so they are removed; a record of which raw scan each id came from
(:data:`SOURCES_FILE`) keeps a resumed run from keeping a file of another scan.

Geometry follows the reference notebooks (SSL-ALPNet ``data/SABS/resampling_and_roi.ipynb``,
Q-Net ``data/CHAOST2|CMR/image_normalize.ipynb``): :func:`resample_to_spacing` sizes the
grid as ``int(n * old / new + 1)``, keeps origin, direction and the pixel type;
:func:`resample_labels_to_spacing` resamples each label value's mask linearly and keeps a
voxel where the mask rounds to 1.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ._io import PARTIAL_TAG, case_id_of, read_image_checked, remove_stale_partials, write_image_atomic

#: In-plane size of every prepared volume.
TARGET_IN_PLANE = (256, 256)


class RawDataError(Exception):
    """A raw file is missing, unreadable or holds something unexpected (message names it).

    Args:
        message: what is wrong, naming the file or folder.
        hint: what to do about it, when it is not "check --raw".
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


# -- entries of a raw release that are not data ---------------------------------------------

#: Names that archivers, file browsers and editors leave beside the data.
_SYSTEM_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information"})
#: Suffixes of notes, copies and documents a user keeps beside a release; never a scan.
_NOTE_SUFFIXES = (
    ".txt", ".md", ".rst", ".pdf", ".doc", ".docx", ".csv", ".xls", ".xlsx", ".json", ".yaml", ".yml",
    ".html", ".log", ".bak", ".orig", ".old", ".tmp", ".swp",
)


def is_harmless_entry(path: Path) -> bool:
    """True for an entry that is no part of a raw release and holds no scan.

    Hidden files (``.DS_Store``, ``._x`` resource forks), ``__MACOSX`` and other system
    folders, notes and backup copies (``notes.txt``, ``img0001.nii.gz.bak``, ``x~``). A
    damaged scan keeps its data-file name, so it is never harmless and still fails.
    """
    name = Path(path).name
    if name in _SYSTEM_NAMES or name.startswith(".") or name.endswith("~"):
        return True
    return Path(path).is_file() and name.lower().endswith(_NOTE_SUFFIXES)


def is_inside(path: Path, folders: Iterable[Path]) -> bool:
    """True when ``path`` is one of ``folders`` or lies below one (paths resolved)."""
    resolved = Path(path).resolve()
    return any(resolved == f or f in resolved.parents for f in (Path(x).resolve() for x in folders))


def ignored_note(entries: list[str]) -> str | None:
    """The one note about the harmless entries a converter passed over (None if none)."""
    if not entries:
        return None
    shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
    return f"ignored {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} that hold no scan: {shown}"


# -- geometry -------------------------------------------------------------------------------


#: The SABS CT window in HU, mapped to 0..255 (PROTOCOL.md §1).
CT_HU_WINDOW = (-125.0, 275.0)


def clip_top_percent(array: np.ndarray, percent: float = 0.5) -> np.ndarray:
    """Clip intensities above the ``100 - percent`` percentile (off-resonance spikes).

    The MRI intensity recipe of the CHAOS and MS-CMRSeg preparation.
    """
    high = float(np.percentile(array, 100.0 - percent))
    return np.minimum(array, high)


def clip_top_percent_keep_type(array: np.ndarray, percent: float = 0.5) -> np.ndarray:
    """:func:`clip_top_percent` in the array's own pixel type, as the reference notebooks do.

    The reference assigns the percentile into the (integer) array in place, so an integer
    scan is clipped at the percentile truncated to an integer; a float scan stays float.
    """
    high = float(np.percentile(array, 100.0 - percent))
    out = np.array(array, copy=True)
    out[out > high] = high  # numpy casts to the array's type: truncation for integers
    return out


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


def reference_grid_size(
    size_xyz: Iterable[int], old_spacing_xyz: Iterable[float], new_spacing_xyz: Iterable[float]
) -> list[int]:
    """Voxel counts of the reference notebooks' ``resample_by_res``: ``int(n * (old / new) + 1)``.

    The ``+ 1`` makes the grid reach up to a voxel past the input's extent; where the last
    plane lies more than half an input voxel beyond the last voxel centre it reads the
    default 0: the all-zero last slice of 16 of the 20 distributed CHAOS files and 29 of the
    35 CMR files. The ratio is taken first, as there, so the float rounding is the same.
    """
    ratio = np.asarray(list(old_spacing_xyz), dtype=float) * 1.0 / np.asarray(list(new_spacing_xyz), dtype=float)
    extent = np.asarray(list(size_xyz), dtype=float) * ratio
    return [int(n + 1) for n in extent]


def resample_to_spacing(
    image: sitk.Image, spacing_xyz: tuple[float, float, float], interpolator: int
) -> sitk.Image:
    """Resample to ``spacing_xyz`` as the reference does (its ``resample_by_res``).

    Origin and direction are kept, the size is :func:`reference_grid_size`, points outside
    the input read 0, and the output keeps the input's pixel type: an integer image
    resampled linearly is truncated to integers by the cast, as in the reference.
    """
    new_spacing = tuple(float(s) for s in spacing_xyz)
    new_size = reference_grid_size(image.GetSize(), image.GetSpacing(), new_spacing)
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        new_spacing,
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def resample_labels_to_spacing(label: sitk.Image, spacing_xyz: tuple[float, float, float]) -> sitk.Image:
    """Resample a label map to ``spacing_xyz`` with the reference's ``resample_lb_by_res`` rule.

    Each label value's mask (float32 0/1) is resampled linearly on the
    :func:`resample_to_spacing` grid and rounded (``np.rint``: a share of exactly one half
    rounds to 0); the value is kept where the mask rounds to 1, values taken in ascending
    order so a later one overwrites an earlier one. A voxel no value covers by more than
    half stays 0 (background), and thin structures shrink, as in the distributed files.

    Returns:
        float64 label image on the resampled grid.
    """
    array = sitk.GetArrayViewFromImage(label)
    out: np.ndarray | None = None
    reference: sitk.Image | None = None
    for value in np.unique(array):
        mask = sitk.GetImageFromArray((array == value).astype(np.float32))
        mask.CopyInformation(label)
        resampled = resample_to_spacing(mask, spacing_xyz, sitk.sitkLinear)
        share = sitk.GetArrayFromImage(resampled)
        if out is None:
            out = np.zeros(share.shape, dtype=np.float64)
            reference = resampled
        out[np.rint(share) == 1] = float(value)
    assert out is not None and reference is not None  # a label map has at least one value
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(reference)
    return result


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


def center_crop_pad_xy(
    image: sitk.Image, size_xy: tuple[int, int] = TARGET_IN_PLANE, pad_value: float = 0.0
) -> sitk.Image:
    """Centre-crop or pad x and y to ``size_xy``; the origin follows so geometry stays true.

    The window starts at ``size // 2 - target // 2`` on each axis, the reference's
    ``image_crop`` around the centre index. ``pad_value`` fills what lies outside the
    input (the reference pads images with their minimum, labels with 0).
    """
    array = sitk.GetArrayFromImage(image)  # (Z, Y, X)
    starts = []
    out = np.full((array.shape[0], size_xy[1], size_xy[0]), pad_value, dtype=array.dtype)
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


def crop_pad_like_reference(image: sitk.Image, label: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Centre crop/pad an MRI image and its label to 256 x 256, padding as the reference.

    The image is padded with its own minimum (after resampling, so usually the 0 of the
    grid beyond the scan), the label with 0.
    """
    pad = float(sitk.GetArrayViewFromImage(image).min())
    return center_crop_pad_xy(image, pad_value=pad), center_crop_pad_xy(label)


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

#: Hidden file in a prepared image folder: case id -> the raw scan it was made from.
SOURCES_FILE = ".fsmis-prepare-sources.json"


@dataclass
class RawCase:
    """One raw case: its output id and a loader returning ``(image, label)`` ready to write.

    ``origin`` is a short, location-independent name of the raw scan (``img0001``,
    ``patient3_C0``, CHAOS patient ``3``); it is recorded per id so that a later run into
    the same folder can tell whether an existing file is this scan.
    """

    case_id: str
    source: str  # shown in messages
    load: Callable[[], tuple[sitk.Image, sitk.Image]]
    origin: str = ""


@dataclass
class RawRelease:
    """What a converter found under ``--raw``.

    Attributes:
        cases: the scans to prepare.
        problems: ``(id or entry, message)`` of raw entries that are broken; reported as
            failures with the cases that fail.
        notes: one line each about what was passed over on purpose (not failures).
    """

    cases: list[RawCase] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class PrepareSummary:
    """What a ``prepare`` run did."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: supervoxel files removed because the image of their case was (re)written
    stale_supervoxels: list[Path] = field(default_factory=list)
    #: existing cases kept although no record says which raw scan they came from
    unrecorded: list[str] = field(default_factory=list)

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


def read_sources(out_dir: Path) -> dict[str, str]:
    """The id -> raw scan record of a prepared folder ({} when absent or unreadable)."""
    try:
        record = json.loads((Path(out_dir) / SOURCES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def _write_sources(out_dir: Path, sources: dict[str, str]) -> None:
    path = Path(out_dir) / SOURCES_FILE
    tmp = path.with_name(f".{path.name.lstrip('.')}{PARTIAL_TAG}{os.getpid()}")
    ordered = dict(sorted(sources.items(), key=lambda item: (len(item[0]), item[0])))  # numeric order
    tmp.write_text(json.dumps(ordered, indent=1) + "\n")
    os.replace(tmp, path)


def remove_case_supervoxels(dataset_dir: Path, case_id: str) -> list[Path]:
    """Delete the pseudo-labels of ``case_id`` in every ``supervoxels_*`` folder of a dataset.

    They were computed from the image that is being replaced, and ``supervoxels`` keeps
    files that exist, so leaving them would pair the new image with the old image's
    supervoxels.
    """
    removed: list[Path] = []
    for folder in sorted(Path(dataset_dir).glob("supervoxels_*")):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*_{case_id}.nii.gz")):
            if case_id_of(path) == case_id and path.name.startswith("superpix-"):
                path.unlink()
                removed.append(path)
    return removed


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
        out_dir: the prepared image folder (its parent is the dataset folder holding
            ``supervoxels_*``).
        force: replace existing outputs.
        failed: problems found while discovering cases, reported with the others.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    summary = PrepareSummary(out_dir=out_dir, failed=list(failed or []))
    sources = read_sources(out_dir)
    todo: list[RawCase] = []
    for case in cases:
        image_path, label_path = output_paths(out_dir, case.case_id)
        recorded = sources.get(case.case_id)
        existing = image_path.exists() or label_path.exists()
        if not force and existing and recorded and case.origin and recorded != case.origin:
            # resuming would keep (or complete) a file of another scan under this id
            summary.failed.append(
                (
                    case.case_id,
                    f"{image_path.name} in {out_dir} was prepared from {recorded}, but id {case.case_id} "
                    f"is now {case.origin}; pass --force to rewrite it, or prepare into an empty --out",
                )
            )
        elif not force and image_path.exists() and label_path.exists():
            summary.skipped.append(case.case_id)
            if recorded is None:
                summary.unrecorded.append(case.case_id)
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
            summary.stale_supervoxels.extend(remove_case_supervoxels(out_dir.parent, case.case_id))
        if case.origin:
            sources[case.case_id] = case.origin
            _write_sources(out_dir, sources)
        summary.written.append(case.case_id)
    return summary


def remove_if_empty(folders: Iterable[Path]) -> None:
    """Remove each folder that exists and is empty, in the order given (deepest first)."""
    for folder in folders:
        try:
            Path(folder).rmdir()
        except OSError:  # not empty, or already gone: leave it
            pass
