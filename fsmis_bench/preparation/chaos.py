"""CHAOS MR T2-SPIR (``abd_mri``): DICOM series + PNG masks -> prepared NIfTI.

Raw layout (the ``CHAOS_Train_Sets`` release; its zip unpacks as ``Train_Sets/MR/...``)::

    <MR>/<pid>/T2SPIR/DICOM_anon/*.dcm
    <MR>/<pid>/T2SPIR/Ground/*.png      one mask per slice, named like its DICOM file

``--raw`` may be the ``MR`` folder or a folder up to three levels above it (the one used is
printed). Patient ``<pid>`` becomes ``image_<pid>``, as in the reference
(``dcm_img_to_nii.sh`` names the files after the patient folders).

Recipe (Q-Net ``data/CHAOST2/image_normalize.ipynb``, SSL-ALPNet's same notebook): slices
sorted along the slice normal; array axes reoriented to the prepared data's convention
(x to the patient's left, y to anterior, z to superior: ITK "LAS", which is what the
distributed files carry); mask grey values 63/126/189/252 -> 1/2/3/4 (liver, right
kidney, left kidney, spleen; CHAOS's tolerance bands accepted); intensities above the
99.5th percentile clipped in the scan's own integer type; resampled to 1.25 x 1.25 x 7.7 mm
on the reference's grid (``int(n * old / new + 1)`` voxels per axis, so most scans end with
an all-zero slice), the image linearly in its integer type (truncated, as there), the
labels value by value (:func:`~.common.resample_labels_to_spacing`); centre crop/pad to
256 x 256 (image padded with its minimum); both stored float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .common import (
    RawCase,
    RawDataError,
    RawRelease,
    as_float64,
    clip_top_percent_keep_type,
    crop_pad_like_reference,
    ignored_note,
    is_harmless_entry,
    is_inside,
    resample_labels_to_spacing,
    resample_to_spacing,
)

TARGET_SPACING_XYZ = (1.25, 1.25, 7.7)
ORIENTATION = "LAS"
#: How many folder levels below ``--raw`` are searched for the ``MR`` folder.
MR_SEARCH_DEPTH = 3
#: CHAOS ground-truth grey bands -> label value (the challenge states the bands, centred
#: on 63, 126, 189, 252).
GREY_BANDS: tuple[tuple[int, int, int], ...] = (
    (55, 70, 1),  # liver
    (110, 135, 2),  # right kidney
    (175, 200, 3),  # left kidney
    (240, 255, 4),  # spleen
)


def _holds_patients(folder: Path) -> bool:
    try:
        return any(d.is_dir() and (d / "T2SPIR").is_dir() for d in folder.iterdir())
    except OSError:
        return False


def find_mr_dir(raw: Path, exclude: Sequence[Path] = ()) -> Path:
    """The folder of ``<pid>/T2SPIR`` patients: ``raw`` or an ``MR`` folder below it.

    The release zip unpacks as ``Train_Sets/MR/<pid>`` (and users unpack it into a folder
    of their own), so ``MR`` folders up to :data:`MR_SEARCH_DEPTH` levels down are found;
    the shallowest wins, and two at the same depth are refused.
    """
    raw = Path(raw)
    if _holds_patients(raw):
        return raw
    level = [raw]
    for _ in range(MR_SEARCH_DEPTH):
        found: list[Path] = []
        below: list[Path] = []
        for folder in level:
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            for child in children:
                if not child.is_dir() or is_harmless_entry(child) or is_inside(child, exclude):
                    continue
                (found if child.name == "MR" and _holds_patients(child) else below).append(child)
        if len(found) > 1:
            raise RawDataError(
                f"{raw}: several CHAOS MR folders: {', '.join(str(f) for f in found)}",
                hint="pass the MR folder to prepare with --raw",
            )
        if found:
            return found[0]
        level = below
    raise RawDataError(
        f"{raw}: no MR/<patient>/T2SPIR folders within {MR_SEARCH_DEPTH} levels "
        "(expected the CHAOS_Train_Sets release)",
        hint="point --raw at the unpacked CHAOS_Train_Sets folder (it holds Train_Sets/MR/<patient>/T2SPIR)",
    )


def find_cases(raw: Path, exclude: Sequence[Path] = ()) -> RawRelease:
    """Patients under ``raw``, with discovery problems and notes.

    Args:
        raw: the ``--raw`` folder.
        exclude: folders never read (the output folder when it lies inside ``raw``).
    Raises:
        RawDataError: no MR folder, or two patient folders meaning the same patient.
    """
    raw = Path(raw)
    mr = find_mr_dir(raw, exclude)
    release = RawRelease(notes=[f"reading CHAOS patients from {mr}"])
    ignored: list[str] = []
    folders: dict[str, Path] = {}
    for entry in sorted(mr.iterdir()):
        if is_inside(entry, exclude):
            continue  # our own output folder: never a patient, not worth a note
        if is_harmless_entry(entry) or not entry.is_dir():
            ignored.append(entry.name + ("/" if entry.is_dir() else ""))
            continue
        if not entry.name.isdigit():
            if (entry / "T2SPIR").is_dir():  # looks like a patient: a misnamed one is a failure
                release.problems.append((entry.name, f"{entry}: patient folder name is not a number; skipped"))
            else:
                ignored.append(entry.name + "/")
            continue
        case_id = str(int(entry.name))
        if case_id in folders:
            # "1" and "01" would both be written as image_1: which one is meant is unknowable
            raise RawDataError(
                f"{mr}: patient folders {folders[case_id].name!r} and {entry.name!r} both mean patient {case_id}",
                hint="keep one of them in the MR folder (move the other away) and run again",
            )
        folders[case_id] = entry
    for case_id in sorted(folders, key=int):
        series = folders[case_id] / "T2SPIR"
        release.cases.append(
            RawCase(case_id, str(series), lambda series=series: load_case(series), origin=folders[case_id].name)
        )
    note = ignored_note(ignored)
    if note:
        release.notes.append(f"{note} (in {mr})")
    return release


def _read_slice(path: Path):
    """Pixels as stored (with rescale slope and intercept), orientation, position, spacing."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
        orientation = np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        position = np.array([float(v) for v in ds.ImagePositionPatient], dtype=float)
        spacing = [float(v) for v in ds.PixelSpacing]
    except Exception as error:  # noqa: BLE001 - any failure means this file is unusable
        raise RawDataError(
            f"{path}: not a readable DICOM image slice ({type(error).__name__}: {error})"
        ) from None
    if pixels.ndim != 2 or orientation.size != 6 or position.size != 3 or len(spacing) != 2:
        raise RawDataError(
            f"{path}: unexpected DICOM geometry (pixels {pixels.shape}, orientation {orientation.size} values)"
        )
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return pixels, orientation, position, spacing, (slope, intercept)


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        grey = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError:
        raise RawDataError(f"{path}: not a readable PNG mask") from None
    if grey.ndim == 3:  # an RGB(A) export of a grey mask: the channels are equal
        grey = grey[..., 0]
    if grey.shape != shape:
        raise RawDataError(
            f"{path}: mask is {grey.shape[1]}x{grey.shape[0]}, its DICOM slice {shape[1]}x{shape[0]}"
        )
    label = np.zeros(grey.shape, dtype=np.uint8)
    matched = grey == 0
    for low, high, value in GREY_BANDS:
        band = (grey >= low) & (grey <= high)
        label[band] = value
        matched |= band
    if not matched.all():
        odd = sorted(int(v) for v in np.unique(grey[~matched]))[:8]
        raise RawDataError(f"{path}: unexpected mask grey values {odd} (expected 0, 63, 126, 189, 252)")
    return label


def load_case(series: Path) -> tuple[sitk.Image, sitk.Image]:
    """Read one ``T2SPIR`` folder and return the prepared ``(image, label)``."""
    dicom_dir, ground_dir = series / "DICOM_anon", series / "Ground"
    if not dicom_dir.is_dir():
        raise RawDataError(f"{dicom_dir}: folder missing")
    if not ground_dir.is_dir():
        raise RawDataError(f"{ground_dir}: folder missing")
    dicom_files = sorted(p for p in dicom_dir.iterdir() if p.suffix.lower() == ".dcm" and not p.name.startswith("."))
    if not dicom_files:
        raise RawDataError(f"{dicom_dir}: no .dcm files")
    masks = {p.stem: p for p in ground_dir.iterdir() if p.suffix.lower() == ".png" and not p.name.startswith(".")}
    # a mask without its slice means a slice is missing; at either end of the series the
    # positions stay even, so nothing else would notice and the volume would come out
    # one slice short of the reference
    orphans = sorted(set(masks) - {p.stem for p in dicom_files})
    if orphans:
        names = ", ".join(f"{stem}.png" for stem in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        raise RawDataError(
            f"{ground_dir}: no DICOM slice in {dicom_dir.name}/ for the mask(s) {names}: "
            "the series is incomplete; restore the missing .dcm file(s) from the release"
        )

    slices = [(path, *_read_slice(path)) for path in dicom_files]
    first_orientation = slices[0][2]
    for path, pixels, orientation, _, spacing, _ in slices:
        if not np.allclose(orientation, first_orientation, atol=1e-4):
            raise RawDataError(f"{path}: slice orientation differs from the rest of the series")
        if pixels.shape != slices[0][1].shape or not np.allclose(spacing, slices[0][4], atol=1e-4):
            raise RawDataError(f"{path}: slice size or pixel spacing differs from the rest of the series")
    row_dir, col_dir = first_orientation[:3], first_orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(s[3], normal)))
    positions = np.array([float(np.dot(s[3], normal)) for s in slices])
    steps = np.diff(positions)
    if len(slices) > 1:
        step = float(np.median(steps))
        if step <= 0 or np.any(np.abs(steps - step) > 0.2 * step):
            where = int(np.argmax(np.abs(steps - step)))
            raise RawDataError(
                f"{dicom_dir}: uneven slice positions (step {steps[where]:.2f} mm near "
                f"{slices[where + 1][0].name}, median {step:.2f} mm): duplicate or missing slices"
            )
    else:
        step = 1.0

    missing = [s[0].name for s in slices if s[0].stem not in masks]
    if missing:
        raise RawDataError(
            f"{ground_dir}: no mask for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    volume = np.stack([s[1] for s in slices])  # (Z, rows, cols)
    rescales = {s[5] for s in slices}
    if rescales != {(1.0, 0.0)} or not np.issubdtype(volume.dtype, np.integer):
        # only a real rescale makes the values non-integer; otherwise the stored integer
        # type is kept, as in the reference's NIfTI conversion
        volume = np.stack([s[1].astype(np.float64) * s[5][0] + s[5][1] for s in slices])
    labels = np.stack([_read_mask(masks[s[0].stem], s[1].shape) for s in slices])

    row_spacing, col_spacing = slices[0][4]
    direction = np.column_stack([row_dir, col_dir, normal])  # axes x (columns), y (rows), z
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((col_spacing, row_spacing, step))
    image.SetOrigin(tuple(slices[0][3]))
    image.SetDirection(tuple(direction.ravel()))
    label = sitk.GetImageFromArray(labels)
    label.CopyInformation(image)
    return prepare_volume(image, label)


def prepare_volume(image: sitk.Image, label: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Orient, clip, resample and crop one raw CHAOS volume (SimpleITK images)."""
    image = sitk.DICOMOrient(image, ORIENTATION)
    label = sitk.DICOMOrient(label, ORIENTATION)
    clipped = sitk.GetImageFromArray(clip_top_percent_keep_type(sitk.GetArrayFromImage(image)))
    clipped.CopyInformation(image)
    image = resample_to_spacing(clipped, TARGET_SPACING_XYZ, sitk.sitkLinear)
    label = resample_labels_to_spacing(label, TARGET_SPACING_XYZ)
    image, label = crop_pad_like_reference(image, label)
    return as_float64(image), as_float64(label)
