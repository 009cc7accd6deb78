"""Synapse multi-atlas / BTCV CT (``abd_ct``, "SABS"): raw NIfTI -> prepared NIfTI.

Raw layout (``RawData`` of the challenge)::

    <raw>/Training/img/img00XX.nii.gz
    <raw>/Training/label/label00XX.nii.gz     values 0..13 (``.nii`` works for either)

Recipe: HU clipped to [-125, 275] and rescaled to 0..255; 32 px cropped from each in-plane
border (512 -> 448); resampled in-plane to 256 x 256 over the same field of view, slices
unchanged (image linear, labels class by class so no new value appears); float64 storage.
This is the geometry PROTOCOL.md states (256 x 256, slices as scanned). The reference notebook
(``resampling_and_roi.ipynb``) differs: its ``int(n * old / new + 1)`` grid from the cropped
array's first voxel gives 257 x 257 x (Z + 1) volumes (last row, column and slice past the
scan), its labels take the per-value rounded-mask rule of
:func:`~.common.resample_labels_to_spacing`, and its header keeps the uncropped origin.

Output ids follow the reference (SSL-ALPNet ``data/SABS/intensity_normalization.ipynb``):
the scans are numbered ``0, 1, 2, ...`` in the order of their sorted file names
(``sorted(glob("img/*.nii.gz"))`` there, a plain string sort, which for the zero-padded
names is the numeric order), so the 30 training scans img0001..img0010, img0021..img0040
become ``image_0`` .. ``image_29``, not ``image_1``, ``image_2``, ``image_21``. The id-sorted
scan list, and so every fold position, is the same as with the BTCV numbers. The id of a
scan therefore depends on the other scans in the folder: prepare from the whole release.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .common import (
    CT_HU_WINDOW,
    TARGET_IN_PLANE,
    RawCase,
    RawDataError,
    RawRelease,
    as_float64,
    ignored_note,
    is_harmless_entry,
    is_inside,
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
    raise RawDataError(
        f"{raw}: no Training/img folder (expected the BTCV RawData release)",
        hint="point --raw at the unpacked RawData folder (it holds Training/img and Training/label)",
    )


def find_label(label_dir: Path, number: str) -> Path | None:
    """``label<number>.nii.gz`` or ``.nii`` in ``label_dir`` (whichever exists)."""
    for suffix in (".nii.gz", ".nii"):
        candidate = label_dir / f"label{number}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def find_cases(raw: Path, exclude: Sequence[Path] = ()) -> RawRelease:
    """Scans under ``raw``, numbered as the reference does, with problems and notes.

    Args:
        raw: the ``--raw`` folder.
        exclude: folders never read (the output folder when it lies inside ``raw``).
    Raises:
        RawDataError: no ``img`` folder, or two files of the same scan number.
    """
    training = _training_dir(Path(raw))
    release = RawRelease()
    ignored: list[str] = []
    images: dict[int, Path] = {}
    for path in sorted((training / "img").iterdir(), key=lambda p: p.name):
        if is_inside(path, exclude):
            continue
        match = _IMAGE_NAME.match(path.name)
        if not match:
            if is_harmless_entry(path) or not path.is_file():
                ignored.append(path.name + ("/" if path.is_dir() else ""))
            else:
                release.problems.append((path.name, f"{path}: not an img<NNNN>.nii.gz file name; skipped"))
            continue
        number = int(match.group(1))
        if number in images:
            # img0002.nii beside img0002.nii.gz: which one holds the scan is unknowable
            raise RawDataError(
                f"{training / 'img'}: {images[number].name} and {path.name} are both scan {number}",
                hint="keep one of them in the img folder (move the other away) and run again",
            )
        images[number] = path
    # the reference's order: its sorted() of the file paths, i.e. of the names in one folder
    for position, path in enumerate(sorted(images.values(), key=lambda p: p.name)):
        number = _IMAGE_NAME.match(path.name).group(1)  # type: ignore[union-attr]
        label_path = find_label(training / "label", number)
        release.cases.append(
            RawCase(
                str(position),
                str(path),
                lambda i=path, l=label_path, n=number: load_case(i, l, training / "label" / f"label{n}.nii.gz"),
                origin=f"img{number}",
            )
        )
    note = ignored_note(ignored)
    if note:
        release.notes.append(f"{note} (in {training / 'img'})")
    return release


def load_case(
    image_path: Path, label_path: Path | None, expected_label: Path | None = None
) -> tuple[sitk.Image, sitk.Image]:
    """Read one scan and its label map and return the prepared ``(image, label)``.

    Args:
        label_path: the label file, None when :func:`find_label` found none.
        expected_label: the name to report when the label is missing.
    """
    if label_path is None or not label_path.exists():
        missing = label_path or expected_label
        raise RawDataError(f"{missing}: label file missing for {image_path.name} (.nii.gz or .nii)")
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
