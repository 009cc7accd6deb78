"""Synapse multi-atlas / BTCV CT (``abd_ct``, "SABS"): raw NIfTI -> prepared NIfTI.

Raw layout (``RawData`` of the challenge)::

    <raw>/Training/img/img00XX.nii.gz
    <raw>/Training/label/label00XX.nii.gz     values 0..13

Recipe: HU clipped to [-125, 275] and rescaled to 0..255; 32 px cropped from each in-plane
border (512 -> 448); resampled in-plane to 256 x 256 over the same field of view, slices
unchanged (image linear, labels class by class so no new value appears); float64 storage.
Output ids are the numbers of the raw file names (``img0007`` -> ``image_7``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .common import (
    CT_HU_WINDOW,
    TARGET_IN_PLANE,
    RawCase,
    RawDataError,
    as_float64,
    read_nifti,
    resample_labels_per_class,
    resample_to_size,
    same_grid,
    window_ct,
)

HU_WINDOW = CT_HU_WINDOW
BORDER_CROP = 32
MAX_LABEL = 13
_IMAGE_NAME = re.compile(r"^img(\d+)\.nii(\.gz)?$")


def _training_dir(raw: Path) -> Path:
    for candidate in (raw / "Training", raw / "RawData" / "Training", raw):
        if (candidate / "img").is_dir():
            return candidate
    raise RawDataError(f"{raw}: no Training/img folder (expected the BTCV RawData release)")


def find_cases(raw: Path) -> tuple[list[RawCase], list[tuple[str, str]]]:
    """Scans under ``raw``; returns cases and discovery problems ``(id, message)``."""
    training = _training_dir(Path(raw))
    cases: list[RawCase] = []
    problems: list[tuple[str, str]] = []
    for path in sorted((training / "img").iterdir()):
        match = _IMAGE_NAME.match(path.name)
        if not match:
            if path.is_file() and not path.name.startswith("."):
                problems.append((path.name, f"{path}: not an img<NNNN>.nii.gz file name; skipped"))
            continue
        number = match.group(1)
        label_path = training / "label" / path.name.replace("img", "label", 1)
        case_id = str(int(number))
        cases.append(RawCase(case_id, str(path), lambda i=path, l=label_path: load_case(i, l)))
    return cases, problems


def load_case(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """Read one scan and its label map and return the prepared ``(image, label)``."""
    if not label_path.exists():
        raise RawDataError(f"{label_path}: label file missing for {image_path.name}")
    image = read_nifti(image_path)
    label = read_nifti(label_path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RawDataError(f"{image_path}: expected a 3-D single-channel CT volume")
    if not same_grid(image, label):
        raise RawDataError(
            f"{label_path}: grid {label.GetSize()} does not match {image_path.name} {image.GetSize()}"
        )
    label_array = sitk.GetArrayFromImage(label)
    values = np.unique(label_array)
    bad = [v for v in values if v != int(v) or not 0 <= v <= MAX_LABEL]
    if bad:
        raise RawDataError(
            f"{label_path}: unexpected label values {[float(v) for v in bad[:8]]} (expected 0..{MAX_LABEL})"
        )
    return prepare_volume(image, label)


def prepare_volume(image: sitk.Image, label: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Window, crop and resample one BTCV volume (SimpleITK images)."""
    size_x, size_y, size_z = image.GetSize()
    if min(size_x, size_y) <= 2 * BORDER_CROP:
        raise RawDataError(
            f"in-plane size {size_x}x{size_y} is too small to crop {BORDER_CROP} px per border"
        )
    array = window_ct(sitk.GetArrayFromImage(image), HU_WINDOW)
    windowed = sitk.GetImageFromArray(array)
    windowed.CopyInformation(image)
    label = sitk.Cast(label, sitk.sitkInt16)
    crop_lower = [BORDER_CROP, BORDER_CROP, 0]
    windowed = sitk.Crop(windowed, crop_lower, crop_lower)
    label = sitk.Crop(label, crop_lower, crop_lower)
    target = (TARGET_IN_PLANE[0], TARGET_IN_PLANE[1], size_z)
    image_out = resample_to_size(windowed, target, sitk.sitkLinear)
    label_out = resample_labels_per_class(label, lambda img, interp: resample_to_size(img, target, interp))
    return as_float64(image_out), as_float64(label_out)
