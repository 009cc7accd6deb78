"""CHAOS MR T2-SPIR (``abd_mri``): DICOM series + PNG masks -> prepared NIfTI.

Raw layout (the ``CHAOS_Train_Sets`` release)::

    <raw>/MR/<pid>/T2SPIR/DICOM_anon/*.dcm
    <raw>/MR/<pid>/T2SPIR/Ground/*.png      one mask per slice, named like its DICOM file

Recipe: slices sorted along the slice normal; array axes reoriented to the prepared data's
convention (x to the patient's left, y to anterior, z to superior: ITK "LAS", which is
what the distributed files carry); mask grey values 63/126/189/252 -> 1/2/3/4 (liver,
right kidney, left kidney, spleen; CHAOS's tolerance bands accepted); intensities above
the 99.5th percentile clipped; resampled to 1.25 x 1.25 x 7.7 mm (image linear, label
nearest); centre crop/pad to 256 x 256; image rounded to integers; both stored float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .common import (
    RawCase,
    RawDataError,
    as_float64,
    center_crop_pad_xy,
    clip_top_percent,
    resample_to_spacing,
)

TARGET_SPACING_XYZ = (1.25, 1.25, 7.7)
ORIENTATION = "LAS"
#: CHAOS ground-truth grey bands -> label value (the challenge states the bands, centred
#: on 63, 126, 189, 252).
GREY_BANDS: tuple[tuple[int, int, int], ...] = (
    (55, 70, 1),  # liver
    (110, 135, 2),  # right kidney
    (175, 200, 3),  # left kidney
    (240, 255, 4),  # spleen
)


def _mr_dir(raw: Path) -> Path:
    if (raw / "MR").is_dir():
        return raw / "MR"
    if any((d / "T2SPIR").is_dir() for d in raw.iterdir() if d.is_dir()):
        return raw
    raise RawDataError(f"{raw}: no MR/<patient>/T2SPIR folders (expected the CHAOS_Train_Sets release)")


def find_cases(raw: Path) -> tuple[list[RawCase], list[tuple[str, str]]]:
    """Patients under ``raw``; returns cases and discovery problems ``(id, message)``."""
    raw = Path(raw)
    mr = _mr_dir(raw)
    cases: list[RawCase] = []
    problems: list[tuple[str, str]] = []
    for patient in sorted(
        (d for d in mr.iterdir() if d.is_dir()), key=lambda d: (not d.name.isdigit(), d.name)
    ):
        if not patient.name.isdigit():
            problems.append((patient.name, f"{patient}: patient folder name is not a number; skipped"))
            continue
        case_id = str(int(patient.name))
        series = patient / "T2SPIR"
        cases.append(RawCase(case_id, str(series), lambda series=series: load_case(series)))
    return cases, problems


def _read_slice(path: Path):
    import pydicom

    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array.astype(np.float64)
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
    return pixels * slope + intercept, orientation, position, spacing


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
    dicom_files = sorted(p for p in dicom_dir.iterdir() if p.suffix.lower() == ".dcm")
    if not dicom_files:
        raise RawDataError(f"{dicom_dir}: no .dcm files")
    masks = {p.stem: p for p in ground_dir.iterdir() if p.suffix.lower() == ".png"}

    slices = [(path, *_read_slice(path)) for path in dicom_files]
    first_orientation = slices[0][2]
    for path, pixels, orientation, _, spacing in slices:
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
    clipped = sitk.GetImageFromArray(clip_top_percent(sitk.GetArrayFromImage(image).astype(np.float64)))
    clipped.CopyInformation(image)
    image = resample_to_spacing(clipped, TARGET_SPACING_XYZ, sitk.sitkLinear)
    label = resample_to_spacing(label, TARGET_SPACING_XYZ, sitk.sitkNearestNeighbor)
    image = center_crop_pad_xy(image)
    label = center_crop_pad_xy(label)
    return as_float64(image, round_values=True), as_float64(label)
