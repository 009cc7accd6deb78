"""NIfTI reading with errors that name the file.

Arrays come back slices first, ``(Z, Y, X)``, the order SimpleITK (and so the FSMIS
reference code) uses for volumes whose slices lie along the last NIfTI axis.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import DataError


def read_nifti(path: Path, dtype: type = np.float32) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read one volume.

    Returns:
        ``(Z, Y, X)`` array of ``dtype`` and the voxel spacing ``(z, y, x)`` in mm.
    Raises:
        DataError: the file is missing, truncated, not a 3-D NIfTI, or holds NaN/inf.
    """
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"missing file {path}", hint="check the data root and the dataset layout")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    except Exception as exc:  # nibabel raises many types for damaged files
        raise DataError(
            f"cannot read {path}: {type(exc).__name__}: {exc}",
            hint="the file is damaged or not NIfTI; restore it or re-run `fsmis-bench prepare`",
        ) from None
    if np.issubdtype(data.dtype, np.inexact):
        finite = np.isfinite(data)
        if not finite.all():
            raise DataError(
                f"{path} holds {finite.size - np.count_nonzero(finite)} non-finite voxels (NaN or inf)",
                hint="repair or re-prepare this file (`fsmis-bench check-data` lists every damaged file)",
            )
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path} holds a {data.ndim}-D array; a 3-D volume is expected")
    if dtype in (np.int32, np.int64, np.int16):
        data = np.rint(data)
    volume = np.ascontiguousarray(data.transpose(2, 1, 0).astype(dtype))
    return volume, (zooms[2], zooms[1], zooms[0])


def nifti_path(directory: Path, stem: str) -> Path:
    """``<directory>/<stem>.nii.gz``, or ``.nii`` when only that exists."""
    plain = directory / f"{stem}.nii"
    return plain if plain.exists() and not (directory / f"{stem}.nii.gz").exists() else directory / f"{stem}.nii.gz"


def numeric_sort(ids: list[str]) -> list[str]:
    """Sort case ids by their numeric value where they are numbers (1, 2, 10, not 1, 10, 2)."""

    def key(case_id: str) -> tuple:
        parts = re.split(r"(\d+)", case_id)
        return tuple(int(p) if p.isdigit() else p for p in parts)

    return sorted(ids, key=key)
