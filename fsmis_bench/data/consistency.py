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

    A heuristic: CT stored without its rescale (air at 0) reads as ``"mri"``; name the
    modality explicitly for such files.
    """
    return "ct" if float(np.min(image)) < CT_MIN_HU else "mri"


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
