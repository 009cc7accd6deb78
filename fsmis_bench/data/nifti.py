"""NIfTI reading (and writing back) with errors that name the file.

Arrays come back slices first, ``(Z, Y, X)``, the order SimpleITK (and so the FSMIS
reference code) uses for volumes whose slices lie along the last NIfTI axis.

:func:`load_nifti` can bring a volume to one canonical orientation first (nibabel's
orientation algebra: axis permutations and flips only, so no voxel is interpolated and the
step is exactly invertible). The benchmark's prepared abdominal data are stored ``LAS``
(x to the patient's left, y to anterior, z to superior: ``nib.aff2axcodes``), so a scan
reoriented to ``LAS`` is laid out like the data a CHAOS-trained model has seen.
:func:`to_source_nifti` undoes the reorientation, so a predicted mask can be written in
the grid and orientation of the file it came from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

#: The orientation of the benchmark's prepared CHAOS/SABS files (``nib.aff2axcodes``).
CANONICAL_ORIENTATION = "LAS"
#: Keep a file's voxel axes as they are (slices along its last axis).
AS_STORED = "as_stored"


@dataclass
class NiftiVolume:
    """One volume as read by :func:`load_nifti`.

    Attributes:
        array: ``(Z, Y, X)`` voxels, in the requested orientation.
        spacing: voxel size in mm, ``(z, y, x)``.
        affine: ``(4, 4)`` voxel-to-world (RAS+ mm) for the ``(z, y, x)`` index order.
        source_affine: the file's own ``(4, 4)`` affine for its ``(i, j, k)`` axes.
        source_shape: the file's array shape ``(i, j, k)``.
        transform: nibabel orientation transform ``(3, 2)`` from the file's axes to the
            returned ``(x, y, z)`` axes (identity when read as stored).
        source_axcodes: the file's orientation, e.g. ``("R", "A", "S")``.
        has_orientation: False when the header holds no qform/sform (orientation unknown).
        obliquity: the largest angle (degrees) between one of the file's voxel axes and the
            world axis it is taken for (:func:`obliquity_of`); 0 for a scan stored along
            the patient's axes, up to about 55 for one rotated 45 degrees about two axes.
        file_shape: the file's full array shape (``(i, j, k, 1)`` for a 4-D file whose
            fourth axis is a singleton; ``(i, j, k, 1, 1)`` for a 5-D one), to write masks
            back in the same form.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    transform: np.ndarray
    source_axcodes: tuple[str, str, str]
    has_orientation: bool
    obliquity: float = 0.0
    file_shape: tuple[int, ...] = ()


def check_orientation(orientation: str) -> str:
    """``"LAS"``-style axis codes (upper case) or ``"as_stored"``; raises otherwise."""
    from ..errors import ConfigError

    text = str(orientation)
    if text == AS_STORED:
        return text
    code = text.upper()
    pairs = ({"L", "R"}, {"A", "P"}, {"S", "I"})
    if len(code) != 3 or any(sum(c in pair for c in code) != 1 for pair in pairs):
        raise ConfigError(
            f"orientation {orientation!r} is not an axis code",
            hint=f"use three letters, one of L/R, A/P, S/I each (e.g. {CANONICAL_ORIENTATION}, RAS, LPS), "
            f"or {AS_STORED} to keep the files' voxel axes",
        )
    return code


def obliquity_of(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis of ``affine`` and the world axis
    nibabel's :func:`~nibabel.orientations.io_orientation` assigns it to.

    Reorientation (and ``aff2axcodes``) takes the nearest world axis; near 45 degrees two
    axes are almost equally near, so a small change of the scan's angle swaps them.
    """
    from nibabel import orientations as ornt

    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(matrix, axis=0)
    if not np.all(norms > 0):
        return 0.0
    directions = matrix / norms
    assigned = ornt.io_orientation(affine)
    if np.isnan(assigned).any():
        return 0.0
    cosines = [abs(directions[int(assigned[i, 0]), i]) for i in range(3)]
    return float(np.degrees(np.arccos(np.clip(min(cosines), 0.0, 1.0))))


class _NibabelMessages:
    """Collects what nibabel logs while it reads a header (e.g. "pixdim[1,2,3] should be
    non-zero; setting 0 dims to 1"), instead of letting it print a stray line."""

    def __enter__(self) -> list[str]:
        import logging

        from nibabel import imageglobals

        self.logger = imageglobals.logger
        self.handlers = list(self.logger.handlers)
        self.messages: list[str] = []
        messages = self.messages

        class _Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                messages.append(record.getMessage())

        for handler in self.handlers:
            self.logger.removeHandler(handler)
        self.collector = _Collect()
        self.logger.addHandler(self.collector)
        # and none reaches the root logger's handlers (Hydra's, a notebook's)
        self.propagate, self.logger.propagate = self.logger.propagate, False
        return self.messages

    def __exit__(self, *exc) -> bool:
        self.logger.removeHandler(self.collector)
        self.logger.propagate = self.propagate
        for handler in self.handlers:
            self.logger.addHandler(handler)
        return False


def load_nifti(path: Path, dtype: type = np.float32, orientation: str = AS_STORED) -> NiftiVolume:
    """Read one volume, optionally reoriented to ``orientation`` (e.g. ``"LAS"``).

    An integer ``dtype`` reads a label map: its values must be whole numbers (a label
    resampled with linear interpolation is refused, not rounded).

    Raises:
        DataError: the file is missing, truncated, not a 3-D NIfTI (axes after the third
            of length 1 are dropped), holds NaN/inf voxels,
            has voxel sizes of 0 in its header, a degenerate affine, or (labels)
            non-integer values.
    """
    import warnings

    import nibabel as nib
    from nibabel import orientations as ornt

    from ..errors import DataWarning

    if not path.is_file():
        if path.is_dir():
            raise DataError(f"{path} is a folder, not a NIfTI file",
                            hint="move it out of the way, or put the volume there as one .nii / .nii.gz file")
        if path.is_symlink():
            raise DataError(f"{path} is a link to a file that does not exist ({os.readlink(path)})",
                            hint="restore the file it points to, or replace the link with the file")
        raise DataError(f"missing file {path}", hint="check the data root and the dataset layout")
    try:
        with _NibabelMessages() as messages:
            image = nib.load(str(path))
            data = np.asarray(image.dataobj)
            zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
            affine = np.asarray(image.affine, dtype=np.float64)
        has_orientation = bool(int(image.header["qform_code"]) or int(image.header["sform_code"]))
    except Exception as exc:  # nibabel raises many types for damaged files
        misnamed = _misnamed_compression(path)
        if misnamed:
            raise DataError(f"cannot read {path}: it is {misnamed[0]} (the reader goes by the name)",
                            hint=misnamed[1]) from None
        raise DataError(
            f"cannot read {path}: {type(exc).__name__}: {exc}",
            hint="the file is damaged or not NIfTI: restore it or write it again from its source "
                 "(for a public dataset's folder, delete it and re-run `fsmis-bench prepare`, which keeps "
                 "the files that are there; or `prepare --force`)",
        ) from None
    for message in messages:
        if "pixdim" in message and "non-zero" in message:
            raise DataError(
                f"{path}: the header gives a voxel size of 0 (pixdim[1..3] = "
                f"{', '.join(f'{v:g}' for v in _raw_pixdim(path))}), so the scan's size in mm is unknown",
                hint="fix the header's pixdim (voxel sizes in mm), e.g. by saving the file again with its spacing",
            )
        warnings.warn(f"{path}: nibabel: {message}", DataWarning, stacklevel=2)
    file_shape = tuple(int(s) for s in data.shape)
    if data.dtype.names is not None:  # NIfTI's RGB(A) types are structured arrays of channels
        raise DataError(f"{path} holds colour voxels ({', '.join(data.dtype.names)}); "
                        "a single-channel (greyscale) volume is expected",
                        hint="save the scan (or label) as one intensity per voxel, e.g. the channel it was acquired in")
    if np.issubdtype(data.dtype, np.complexfloating):
        raise DataError(f"{path} holds complex voxels; a real-valued volume is expected",
                        hint="save the magnitude image (e.g. numpy.abs of the data) as the scan")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise DataError(f"{path} holds voxels of type {data.dtype}; a numeric volume is expected",
                        hint="save the volume with an integer or floating-point data type")
    if np.issubdtype(data.dtype, np.inexact):
        finite = np.isfinite(data)
        if not finite.all():
            raise DataError(
                f"{path} holds {finite.size - np.count_nonzero(finite)} non-finite voxels (NaN or inf)",
                hint="repair or re-prepare this file (`fsmis-bench check-data` lists every damaged file)",
            )
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])  # (x, y, z, 1) or (x, y, z, 1, 1): one volume
    if data.ndim != 3:
        raise DataError(
            f"{path} holds a {data.ndim}-D array of shape {data.shape}; a 3-D volume is expected"
            + (" (a single slice is read when stored as (x, y, 1))" if data.ndim == 2 else ""),
            hint="store the slice with a third axis of length 1 (e.g. numpy's data[..., None])"
            if data.ndim < 3 else "store one volume per file (axes after the third may only have length 1)",
        )
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{path}: voxel sizes {zooms} are not positive", hint="fix the header's pixdim")
    source_ornt = ornt.io_orientation(affine)
    if np.isnan(source_ornt).any():
        raise DataError(f"{path}: the affine is degenerate (an axis has no direction)", hint="fix the header")
    if np.issubdtype(np.dtype(dtype), np.integer) and np.issubdtype(data.dtype, np.inexact):
        fractional, count = set(), 0
        for k in range(data.shape[2]):  # slice by slice: a float label of a large CT is big
            plane = data[:, :, k]
            off = np.abs(plane - np.rint(plane)) > 1e-3
            if off.any():
                count += int(np.count_nonzero(off))
                fractional.update(np.unique(plane[off])[:6].tolist())
        if count:
            values = sorted(fractional)
            raise DataError(
                f"{path} holds non-integer label values ({', '.join(f'{v:g}' for v in values[:5])}"
                f"{', ...' if len(values) > 5 else ''}) in {count} voxels",
                hint="a label map holds whole numbers (one per organ); was it resampled with linear "
                "interpolation? resample labels with nearest-neighbour interpolation",
            )
    if orientation == AS_STORED:
        transform = np.column_stack([np.arange(3), np.ones(3)])
    else:
        transform = ornt.ornt_transform(source_ornt, ornt.axcodes2ornt(check_orientation(orientation)))
        data = ornt.apply_orientation(data, transform)
        zooms = tuple(zooms[int(np.flatnonzero(transform[:, 0] == axis)[0])] for axis in range(3))
    new_affine = affine @ ornt.inv_ornt_aff(transform, image.shape[:3])
    if np.issubdtype(np.dtype(dtype), np.integer):
        data = np.rint(data)
    volume = np.ascontiguousarray(data.transpose(2, 1, 0).astype(dtype))
    return NiftiVolume(
        array=volume,
        spacing=(zooms[2], zooms[1], zooms[0]),
        affine=new_affine[:, [2, 1, 0, 3]],
        source_affine=affine,
        source_shape=tuple(int(s) for s in image.shape[:3]),
        transform=transform,
        source_axcodes=tuple(ornt.ornt2axcodes(source_ornt)),
        has_orientation=has_orientation,
        obliquity=obliquity_of(affine),
        file_shape=file_shape,
    )


def _misnamed_compression(path: Path) -> tuple[str, str] | None:
    """``(what, hint)`` when a ``.nii.gz`` file is not gzip-compressed, or a ``.nii`` file
    is: nibabel picks its reader by the name, so the file is refused as damaged."""
    import gzip

    try:
        with open(path, "rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as handle:
            size = handle.read(4)
    except (OSError, EOFError):
        return None
    # a NIfTI-1 or -2 header starts with its size, 348 or 540, in either byte order
    if len(size) < 4 or {int.from_bytes(size, "little"), int.from_bytes(size, "big")}.isdisjoint({348, 540}):
        return None
    if path.name.endswith(".nii.gz") and not gzipped:
        return ("not gzip-compressed although its name ends in .gz",
                f"rename it to {path.name[:-3]} (or compress it with gzip)")
    if path.name.endswith(".nii") and gzipped:
        return "gzip-compressed although its name ends in .nii", f"rename it to {path.name}.gz"
    return None


def _raw_pixdim(path: Path) -> list[float]:
    """``pixdim[1..3]`` as stored in the file's header (nibabel replaces zeros when it loads)."""
    import gzip

    import nibabel as nib

    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as handle:
            header = nib.Nifti1Header.from_fileobj(handle, check=False)
        return [float(v) for v in header["pixdim"][1:4]]
    except Exception:  # noqa: BLE001 - only for the message
        return []


def read_nifti(path: Path, dtype: type = np.float32) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read one volume as stored.

    Returns:
        ``(Z, Y, X)`` array of ``dtype`` and the voxel spacing ``(z, y, x)`` in mm.
    Raises:
        DataError: the file is missing, truncated or not a 3-D NIfTI.
    """
    volume = load_nifti(path, dtype)
    return volume.array, volume.spacing


def to_source_array(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """``(Z, Y, X)`` array of a reoriented volume -> the file's ``(i, j, k)`` layout.

    The exact inverse of the reorientation in :func:`load_nifti` (flips and permutations).
    """
    from nibabel import orientations as ornt

    stored = np.asarray(array).transpose(2, 1, 0)
    identity = np.column_stack([np.arange(3), np.ones(3)])
    inverse = ornt.ornt_transform(identity, transform)  # maps the new axes back to the file's
    return np.ascontiguousarray(ornt.apply_orientation(stored, inverse))


def zyx_to_nifti(array: np.ndarray, affine_zyx: np.ndarray):
    """A NIfTI image of a ``(Z, Y, X)`` array whose ``(z, y, x)`` voxel-to-world is ``affine_zyx``."""
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)), affine_zyx[:, [2, 1, 0, 3]])
    image.set_qform(affine_zyx[:, [2, 1, 0, 3]], code=1)
    return image


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
