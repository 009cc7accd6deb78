"""MS-CMRSeg 2019 bSSFP (``card_mri``): raw NIfTI -> prepared NIfTI.

Raw layout: ``patient<N>_C0.nii.gz`` with ``patient<N>_C0_manual.nii.gz`` beside it,
anywhere below ``<raw>`` (the release nests them in one or two folders). Label values
200 (LV myocardium), 500 (LV blood pool), 600 (RV) are kept as they are.

Recipe (as for CHAOS, without touching the slice axis): intensities above the 99.5th
percentile clipped; resampled in-plane to 1.25 x 1.25 mm, slice spacing unchanged (image
linear, label nearest); centre crop/pad to 256 x 256; image rounded to integers; both
stored float64. The scanner's (oblique) orientation is kept, as in the distributed files.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .common import (
    RawCase,
    RawDataError,
    as_float64,
    center_crop_pad_xy,
    clip_top_percent,
    read_nifti,
    resample_to_spacing,
    same_grid,
)

TARGET_IN_PLANE_SPACING = 1.25
LABEL_VALUES = (0, 200, 500, 600)
_IMAGE_NAME = re.compile(r"^patient(\d+)_C0\.nii(\.gz)?$")


def find_cases(raw: Path) -> tuple[list[RawCase], list[tuple[str, str]]]:
    """bSSFP scans below ``raw``; returns cases and discovery problems ``(id, message)``."""
    raw = Path(raw)
    if not raw.is_dir():
        raise RawDataError(f"{raw}: folder does not exist")
    found: dict[str, Path] = {}
    problems: list[tuple[str, str]] = []
    for path in sorted(raw.rglob("patient*_C0.nii*")):
        match = _IMAGE_NAME.match(path.name)
        if not match:
            continue
        case_id = str(int(match.group(1)))
        if case_id in found:
            problems.append(
                (case_id, f"{path}: second copy of patient {case_id} (first: {found[case_id]}); skipped")
            )
            continue
        found[case_id] = path
    if not found and not problems:
        raise RawDataError(f"{raw}: no patient<N>_C0.nii.gz files (expected the MS-CMRSeg bSSFP release)")
    cases = []
    for case_id in sorted(found, key=int):
        path = found[case_id]
        suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
        label_path = path.with_name(path.name[: -len(suffix)] + "_manual" + suffix)
        cases.append(RawCase(case_id, str(path), lambda i=path, l=label_path: load_case(i, l)))
    return cases, problems


def load_case(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """Read one bSSFP scan and its manual labels and return the prepared ``(image, label)``."""
    if not label_path.exists():
        raise RawDataError(f"{label_path}: manual label file missing for {image_path.name}")
    image = read_nifti(image_path)
    label = read_nifti(label_path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise RawDataError(f"{image_path}: expected a 3-D single-channel volume")
    if not same_grid(image, label):
        raise RawDataError(
            f"{label_path}: grid {label.GetSize()} does not match {image_path.name} {image.GetSize()}"
        )
    values = np.unique(sitk.GetArrayFromImage(label))
    bad = [float(v) for v in values if v not in LABEL_VALUES]
    if bad:
        raise RawDataError(f"{label_path}: unexpected label values {bad[:8]} (expected {LABEL_VALUES})")
    return prepare_volume(image, label)


def prepare_volume(image: sitk.Image, label: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Clip, resample in-plane and crop one bSSFP volume (SimpleITK images)."""
    clipped = sitk.GetImageFromArray(clip_top_percent(sitk.GetArrayFromImage(image).astype(np.float64)))
    clipped.CopyInformation(image)
    spacing = (TARGET_IN_PLANE_SPACING, TARGET_IN_PLANE_SPACING, None)
    image = resample_to_spacing(clipped, spacing, sitk.sitkLinear)
    label = resample_to_spacing(sitk.Cast(label, sitk.sitkInt16), spacing, sitk.sitkNearestNeighbor)
    return as_float64(center_crop_pad_xy(image), round_values=True), as_float64(center_crop_pad_xy(label))
