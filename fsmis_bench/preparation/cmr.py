"""MS-CMRSeg 2019 bSSFP (``card_mri``): raw NIfTI -> prepared NIfTI.

Raw layout: the release unpacks as ``C0LET2_nii45_for_challenge19/c0t2lge/patient<N>_C0.nii.gz``
(45 bSSFP scans, with the T2 and LGE ones) and the labels of 35 of them as
``C0LET2_nii45_for_challenge19/c0gt/patient<N>_C0_manual.nii.gz``. Images are found anywhere
below ``<raw>``; a label is taken from beside its image or from a ``c0gt/`` folder next to
it (``.nii`` or ``.nii.gz``). Images without a label are skipped with one note. Label
values 200 (LV myocardium), 500 (LV blood pool), 600 (RV) are kept as they are; patient
``<N>`` becomes ``image_<N>``.

Recipe (Q-Net ``data/CMR/image_normalize.ipynb``): intensities above the 99.5th percentile
clipped in the scan's own pixel type; resampled to 1.25 x 1.25 x 7.99 mm (``NEW_SPA`` there,
for every scan: all 35 distributed files have 7.99 mm slices) on the reference's grid
(``int(n * old / new + 1)`` voxels per axis, so most scans end with an all-zero slice), the
image linearly in its own pixel type (an integer scan is truncated to integers by the cast,
a float scan stays float, as in the distributed files), the labels value by value
(:func:`~.common.resample_labels_to_spacing`); centre crop/pad to 256 x 256 (image padded
with its minimum); both stored float64. The scanner's (oblique) orientation is kept, as in
the distributed files.
"""

from __future__ import annotations

import re
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
    is_inside,
    read_nifti,
    resample_labels_to_spacing,
    resample_to_spacing,
    same_grid,
)

TARGET_SPACING_XYZ = (1.25, 1.25, 7.99)
LABEL_VALUES = (0, 200, 500, 600)
#: Folder of the bSSFP labels in the release (beside ``c0t2lge/``).
LABEL_FOLDER = "c0gt"
_IMAGE_NAME = re.compile(r"^patient(\d+)_C0\.nii(\.gz)?$")


def _skipped_path(path: Path, raw: Path, exclude: Sequence[Path]) -> bool:
    """Copies the release does not hold: macOS resource forks, hidden folders, our output."""
    parts = path.relative_to(raw).parts
    return any(p == "__MACOSX" or p.startswith(".") for p in parts) or is_inside(path, exclude)


def find_label(image_path: Path, raw: Path) -> Path | None:
    """The manual label of a C0 image: beside it, or in a ``c0gt/`` folder near it.

    Looked for, in order: the image's folder, its ``c0gt/`` subfolder, a ``c0gt/`` beside
    the image's folder (the release layout), and a ``c0gt/`` one level further up, never
    above ``raw``; each as ``.nii.gz`` and ``.nii``.
    """
    stem = image_path.name.split(".nii")[0] + "_manual"
    raw = Path(raw).resolve()
    folders = [image_path.parent, image_path.parent / LABEL_FOLDER]
    for up in (image_path.parent.parent, image_path.parent.parent.parent):
        if up.resolve() == raw or raw in up.resolve().parents:
            folders.append(up / LABEL_FOLDER)
    for folder in folders:
        for suffix in (".nii.gz", ".nii"):
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def find_cases(raw: Path, exclude: Sequence[Path] = ()) -> RawRelease:
    """Labelled bSSFP scans below ``raw``, with discovery problems and notes.

    Args:
        raw: the ``--raw`` folder.
        exclude: folders never read (the output folder when it lies inside ``raw``).
    Raises:
        RawDataError: no C0 image, or none with a label.
    """
    raw = Path(raw)
    if not raw.is_dir():
        raise RawDataError(f"{raw}: folder does not exist")
    found: dict[str, Path] = {}
    release = RawRelease()
    for path in sorted(raw.rglob("patient*_C0.nii*")):
        match = _IMAGE_NAME.match(path.name)
        if not match or _skipped_path(path, raw, exclude):
            continue
        case_id = str(int(match.group(1)))
        if case_id in found:
            release.problems.append(
                (case_id, f"{path}: second copy of patient {case_id} (first: {found[case_id]}); skipped")
            )
            continue
        found[case_id] = path
    if not found and not release.problems:
        raise RawDataError(
            f"{raw}: no patient<N>_C0.nii.gz files (expected the MS-CMRSeg bSSFP release)",
            hint="point --raw at the unpacked C0LET2_nii45_for_challenge19 folder",
        )
    unlabelled: list[int] = []
    for case_id in sorted(found, key=int):
        path = found[case_id]
        label_path = find_label(path, raw)
        if label_path is None:
            unlabelled.append(int(case_id))
            continue
        release.cases.append(
            RawCase(
                case_id,
                str(path),
                lambda i=path, l=label_path: load_case(i, l),
                origin=path.name.split(".nii")[0],
            )
        )
    if unlabelled and not release.cases and not release.problems:
        raise RawDataError(
            f"{raw}: none of the {len(unlabelled)} C0 images has a manual label "
            f"(patient<N>_C0_manual.nii.gz beside it or in a {LABEL_FOLDER}/ folder)",
            hint=f"unpack the release's {LABEL_FOLDER}/ folder too (it sits beside c0t2lge/)",
        )
    if unlabelled:
        # the release labels patients 1-35 of 45: the others are its test scans
        release.notes.append(
            f"skipped {len(unlabelled)} C0 image(s) without a manual label (patient {_ranges(unlabelled)}); "
            "the MS-CMRSeg release labels 35 of its 45 bSSFP scans"
        )
    return release


def load_case(image_path: Path, label_path: Path) -> tuple[sitk.Image, sitk.Image]:
    """Read one bSSFP scan and its manual labels and return the prepared ``(image, label)``."""
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
    """Clip, resample and crop one bSSFP volume (SimpleITK images)."""
    clipped = sitk.GetImageFromArray(clip_top_percent_keep_type(sitk.GetArrayFromImage(image)))
    clipped.CopyInformation(image)
    image = resample_to_spacing(clipped, TARGET_SPACING_XYZ, sitk.sitkLinear)
    label = resample_labels_to_spacing(label, TARGET_SPACING_XYZ)
    image, label = crop_pad_like_reference(image, label)
    return as_float64(image), as_float64(label)
