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
#: Stored values below this (HU of air is -1000) mark a CT in Hounsfield units, once the
#: rest of :func:`hounsfield_evidence` holds too (a minimum alone is no evidence: an MRI
#: padded with -1024, or shifted by an offset, has one as well).
CT_MIN_HU = -200.0
#: Air in Hounsfield units (-1000; many scanners clip at -1024; lung tissue starts near -850).
AIR_HU = (-1100.0, -850.0)
#: Fat, water, organs, blood and contrast-enhanced vessels in Hounsfield units.
SOFT_TISSUE_HU = (-200.0, 300.0)
#: Values above this are the body (tissue, bone), not air or lung.
BODY_HU = -500.0
#: A CT shows air in at least this share of its (unpadded) voxels (outside the body, lungs,
#: bowel gas: a scan cropped close to the body keeps some) ...
AIR_SHARE = 0.001
#: ... and soft tissue in at least this share of its body voxels (bone is the rest).
SOFT_TISSUE_SHARE = 0.5


def without_padding(image: np.ndarray) -> np.ndarray:
    """``image`` (a view) without its constant border planes: the fill value of a scan
    resampled onto a larger grid or padded to a size (-1024, -2048, 0 ...), which says
    nothing about its modality.

    Each border plane (of any axis) holding a single value is peeled off, repeatedly, so
    a strip of -1024 beside an all-zero border is removed too. The air of a CT lies around
    the body, inside the planes that touch it, so it stays.
    """
    core = np.asarray(image)
    changed = True
    while changed and core.size:
        changed = False
        for axis in range(core.ndim):
            while core.shape[axis] > 1:
                first = core[(slice(None),) * axis + (0,)]
                if first.min() != first.max():
                    break
                core = core[(slice(None),) * axis + (slice(1, None),)]
                changed = True
            while core.shape[axis] > 1:
                last = core[(slice(None),) * axis + (-1,)]
                if last.min() != last.max():
                    break
                core = core[(slice(None),) * axis + (slice(None, -1),)]
                changed = True
    return core


def hounsfield_evidence(image: np.ndarray) -> tuple[float, float]:
    """``(air share, soft-tissue share)`` of a volume read as Hounsfield units.

    The air share counts the voxels near -1000 HU among the voxels left by
    :func:`without_padding`; the soft-tissue share counts the voxels in
    :data:`SOFT_TISSUE_HU` among those above :data:`BODY_HU` (0 when there are none).
    """
    core = without_padding(image)
    if not core.size:
        return 0.0, 0.0
    air = np.count_nonzero((core >= AIR_HU[0]) & (core <= AIR_HU[1]))
    body = np.count_nonzero(core > BODY_HU)
    soft = np.count_nonzero((core >= SOFT_TISSUE_HU[0]) & (core <= SOFT_TISSUE_HU[1]))
    return air / core.size, (soft / body if body else 0.0)


def guess_modality(image: np.ndarray) -> str:
    """``"ct"`` for a volume in Hounsfield units, else ``"mri"``.

    Hounsfield units have a structure an MRI's arbitrary scale lacks: air near -1000 HU
    around the body (at least :data:`AIR_SHARE` of the voxels) and a body mostly of soft
    tissue in -200..300 HU (at least :data:`SOFT_TISSUE_SHARE`). Values below -200 alone
    are no evidence: an MRI padded with a border strip of -1024 (the planes are peeled
    off first, :func:`without_padding`) or shifted by an offset (all values near -5000)
    has them too, and the CT window would saturate it.

    A heuristic: CT stored without its rescale (raw scanner values, air at 0 instead of
    -1000) reads as ``"mri"``. Naming such files ``ct`` does not help: the CT window
    [-125, 275] HU would then cut the raw values, which are about 1024 higher, and most
    of the body would saturate. Convert them to Hounsfield units first (restore the
    header's ``scl_slope``/``scl_inter``, usually 1 and -1024), then ``ct`` or ``auto``
    windows them as the benchmark's CT data. A CT whose only air is a constant border
    plane reads as ``"mri"`` too (it looks like padding): name it ``ct``.
    """
    if float(np.min(image)) >= CT_MIN_HU:
        return "mri"
    air, soft = hounsfield_evidence(image)
    return "ct" if air >= AIR_SHARE and soft >= SOFT_TISSUE_SHARE else "mri"


def modality_mismatch(named: str, image: np.ndarray, guessed: str | None = None) -> str | None:
    """A sentence when the stored values contradict the modality a user named for a scan.

    ``ct`` on a scan without Hounsfield units (:func:`guess_modality`: no air near -1000
    around a body of soft tissue) windows values that are not HU; ``mri`` on a scan in
    Hounsfield units clips them as MRI intensities. Either quietly lowers the Dice. The
    sentence names no value of the scan, so that it reads the same for every scan it
    holds for (the CLI prints it once, with the other scans' ids). ``guessed``: the
    scan's :func:`guess_modality`, when the caller has it already.
    """
    guessed = guessed or guess_modality(image)
    if named == "ct" and guessed != "ct":
        return (
            "named ct, but its values do not look like Hounsfield units (no air near -1000 around a body of "
            "soft tissue in -200..300, outside constant border padding): the CT window [-125, 275] HU would "
            "saturate or blank it. If it is an MRI, name it mri (or use auto); if it is a CT stored without its "
            "rescale (air at 0), restore the header's scl_slope/scl_inter (usually 1 and -1024) first"
        )
    if named == "mri" and guessed == "ct":
        return (
            "named mri, but its values look like Hounsfield units (air near -1000, soft tissue in -200..300): "
            "the MRI recipe keeps them unwindowed; if it is a CT, name it ct (or use auto)"
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


#: a slice whose voxels other than its lowest and highest value are fewer than this share
#: holds padding or background only (an all-zero slice with a -1024 border strip)
INFORMATIVE_SHARE = 0.01


def informative_slice(plane: np.ndarray) -> bool:
    """Whether a ``(H, W)`` slice shows content, not only padding or background.

    A constant slice, or one of two values (a background with a constant padding strip),
    or one whose voxels besides its lowest and highest value are fewer than
    :data:`INFORMATIVE_SHARE`, is the same in any two scans padded alike: two scans sharing
    it does not make them one patient.
    """
    if not plane.size:
        return False
    low, high = plane.min(), plane.max()
    if low == high:
        return False
    between = np.count_nonzero((plane != low) & (plane != high))
    return between >= max(1.0, INFORMATIVE_SHARE * plane.size)


def slice_digests(image: np.ndarray) -> dict[bytes, int]:
    """Digest of every informative ``(H, W)`` slice of a ``(Z, H, W)`` volume -> its z.

    Slices of padding or background only (:func:`informative_slice`: empty ends, an
    all-zero slice beside a constant strip) are left out: two scans sharing them means nothing.
    """
    digests: dict[bytes, int] = {}
    for z in range(image.shape[0]):
        plane = np.ascontiguousarray(image[z])
        if informative_slice(plane):
            digests.setdefault(hashlib.blake2b(plane.tobytes(), digest_size=16).digest(), z)
    return digests


def shared_slices(first: dict[bytes, int], second: dict[bytes, int]) -> int:
    """Number of identical informative slices of two scans (from :func:`slice_digests`)."""
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
