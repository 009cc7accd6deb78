"""Sanity checks between scans: modality guess, spacing, and slices shared by two scans.

The harness warns (it does not refuse) when an EP1 support and its query differ in
modality or voxel size by a large factor, and when they share identical slices: the same
patient stored twice (e.g. cropped twice) makes a support/query pair a copy task, not a
few-shot one. ``check-data`` runs the same checks over every pair of a folder.
"""

from __future__ import annotations

import hashlib

import numpy as np

#: Support and query voxel sizes further apart than this factor get a warning.
SPACING_FACTOR = 2.0
#: Stored values below this (HU of air is -1000) mark a CT in Hounsfield units.
CT_MIN_HU = -200.0


def guess_modality(image: np.ndarray) -> str:
    """``"ct"`` for a volume in Hounsfield units (it holds air, far below 0), else ``"mri"``.

    A heuristic: CT stored without its rescale (raw scanner values, air at 0 instead of
    -1000) reads as ``"mri"``. Naming such files ``ct`` does not help: the CT window
    [-125, 275] HU would then cut the raw values, which are about 1024 higher, and most
    of the body would saturate. Convert them to Hounsfield units first (restore the
    header's ``scl_slope``/``scl_inter``, usually 1 and -1024), then ``ct`` or ``auto``
    windows them as the benchmark's CT data.
    """
    return "ct" if float(np.min(image)) < CT_MIN_HU else "mri"


def modality_mismatch(named: str, image: np.ndarray) -> str | None:
    """A sentence when the stored values contradict the modality a user named for a scan.

    ``ct`` on a scan without Hounsfield units (its minimum above :data:`CT_MIN_HU`: no
    air at -1000) windows values that are not HU; ``mri`` on a scan in Hounsfield units
    clips them as MRI intensities. Either quietly lowers the Dice.
    """
    low = float(np.min(image))
    if named == "ct" and low >= CT_MIN_HU:
        return (
            f"named ct, but its values do not look like Hounsfield units (minimum {low:g}; air is -1000 HU): "
            "the CT window [-125, 275] HU would saturate or blank it. If it is an MRI, name it mri (or use auto); "
            "if it is a CT stored without its rescale (air at 0), restore the header's scl_slope/scl_inter "
            "(usually 1 and -1024) first"
        )
    if named == "mri" and low < CT_MIN_HU:
        return (
            f"named mri, but its values look like Hounsfield units (minimum {low:g}): the MRI recipe keeps "
            "them unwindowed; if it is a CT, name it ct (or use auto)"
        )
    return None


def axis_rotation(first: np.ndarray, second: np.ndarray) -> float:
    """Largest angle (degrees) between corresponding voxel axes of two ``(4, 4)`` affines.

    Two scans whose axes point the same ways (up to a few degrees) give near 0; a flip of
    one axis gives 180; voxel arrays that show the patient turned 90 degrees against each
    other give 90.
    """
    a = np.asarray(first, dtype=np.float64)[:3, :3]
    b = np.asarray(second, dtype=np.float64)[:3, :3]
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    if not (np.all(na > 0) and np.all(nb > 0)):
        return 0.0
    cosines = np.sum((a / na) * (b / nb), axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def slice_digests(image: np.ndarray) -> dict[bytes, int]:
    """Digest of every non-constant ``(H, W)`` slice of a ``(Z, H, W)`` volume -> its z.

    Constant slices (padding, empty ends) are left out: two scans sharing them means nothing.
    """
    digests: dict[bytes, int] = {}
    for z in range(image.shape[0]):
        plane = np.ascontiguousarray(image[z])
        if plane.size and plane.min() != plane.max():
            digests.setdefault(hashlib.blake2b(plane.tobytes(), digest_size=16).digest(), z)
    return digests


def shared_slices(first: dict[bytes, int], second: dict[bytes, int]) -> int:
    """Number of identical non-constant slices of two scans (from :func:`slice_digests`)."""
    return len(first.keys() & second.keys())


def spacing_mismatch(support: tuple[float, ...], query: tuple[float, ...], factor: float = SPACING_FACTOR) -> str | None:
    """A sentence when in-plane or slice spacing (``(z, y, x)`` mm) differ by more than ``factor``."""
    in_plane = (float(np.mean(support[1:])), float(np.mean(query[1:])))
    ratio = max(in_plane) / max(min(in_plane), 1e-9)
    if ratio > factor:
        return f"pixels of {in_plane[0]:.2f} mm vs {in_plane[1]:.2f} mm (x{ratio:.1f}): organs appear at different scales"
    ratio = max(support[0], query[0]) / max(min(support[0], query[0]), 1e-9)
    if ratio > factor:
        return f"slices {support[0]:.2f} mm vs {query[0]:.2f} mm apart (x{ratio:.1f})"
    return None
