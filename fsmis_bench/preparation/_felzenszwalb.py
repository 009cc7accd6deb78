"""Felzenszwalb-Huttenlocher graph segmentation of a 3-D volume (ADNet's supervoxels).

The graph is the 26-neighbourhood of the voxel grid (13 edge directions, each voxel pair
once). An edge costs ``|I_a - I_b|`` times a direction weight that grows with the physical
length of the edge: with ``s = spacing_z / spacing_inplane`` the weights (squared) are 1
in-plane (axis-aligned and diagonal), ``s**2`` along z, ``(1 + s**2) / 2`` for the
z-in-plane diagonals and ``(2 + s**2) / 3`` for the body diagonals (the weighting of
ADNet's 3-D variant of scikit-image's segmentation). Edges are visited in ascending cost
order with a union-find forest; two segments merge when the edge is cheaper than both
internal differences ``Int(C) + k / |C|``; a second pass over the same order merges every
segment smaller than ``min_size`` into its cheapest neighbour.

The kernels are compiled with numba when it is installed; without it the same Python
code runs (fine for the tiny volumes of the unit tests, far too slow for real scans).
"""

from __future__ import annotations

import numpy as np

try:  # numba turns the union-find loops into machine code; optional at import time
    from numba import njit as _njit

    HAVE_NUMBA = True

    def _jit(fn):
        return _njit(cache=True, nogil=True)(fn)

except ImportError:  # pragma: no cover - exercised only where numba is absent
    HAVE_NUMBA = False

    def _jit(fn):
        return fn


#: The 13 forward directions of the 26-neighbourhood as (dz, dy, dx) and the class of
#: each: 0 in-plane, 1 pure z, 2 z + one in-plane axis, 3 z + both in-plane axes.
DIRECTIONS: tuple[tuple[int, int, int, int], ...] = (
    (0, 0, 1, 0),
    (0, 1, 0, 0),
    (0, 1, 1, 0),
    (0, 1, -1, 0),
    (1, 0, 0, 1),
    (1, 0, 1, 2),
    (1, 0, -1, 2),
    (1, 1, 0, 2),
    (1, -1, 0, 2),
    (1, 1, 1, 3),
    (1, 1, -1, 3),
    (1, -1, 1, 3),
    (1, -1, -1, 3),
)


def direction_weights(spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Multiplicative cost weight of each direction class (see the module docstring).

    Args:
        spacing_zyx: voxel size ``(z, y, x)`` in mm; the in-plane size is taken from y.
    Returns:
        ``(4,)`` float64 ``sqrt`` of the squared weights of classes 0..3.
    """
    ratio = float(spacing_zyx[0]) / float(spacing_zyx[1])
    squared = np.array([1.0, ratio**2, (1.0 + ratio**2) / 2.0, (2.0 + ratio**2) / 3.0])
    return np.sqrt(squared)


def edge_costs(image: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Cost of every edge, one row per direction, ``inf`` where the neighbour is outside.

    Args:
        image: ``(Z, Y, X)`` intensities (0..255 in the ADNet recipe).
        spacing_zyx: voxel size ``(z, y, x)`` in mm.
    Returns:
        ``(13, Z*Y*X)`` float32; entry ``[d, v]`` is the edge from flat voxel ``v`` to its
        neighbour in direction ``DIRECTIONS[d]``.
    """
    image = np.asarray(image, dtype=np.float64)
    depth, height, width = image.shape
    weights = direction_weights(spacing_zyx)
    costs = np.full((len(DIRECTIONS), depth, height, width), np.inf, dtype=np.float32)
    for d, (dz, dy, dx, kind) in enumerate(DIRECTIONS):
        # source voxels whose neighbour (z+dz, y+dy, x+dx) lies inside the grid
        zs = slice(0, depth - dz)
        ys = slice(0, height - dy) if dy >= 0 else slice(-dy, height)
        xs = slice(0, width - dx) if dx >= 0 else slice(-dx, width)
        zt = slice(dz, depth)
        yt = slice(dy, height) if dy >= 0 else slice(0, height + dy)
        xt = slice(dx, width) if dx >= 0 else slice(0, width + dx)
        costs[d, zs, ys, xs] = weights[kind] * np.abs(image[zt, yt, xt] - image[zs, ys, xs])
    return costs.reshape(len(DIRECTIONS), -1)


@_jit
def _find_root(forest, node):
    root = node
    while forest[root] != root:
        root = forest[root]
    # path compression keeps later look-ups near O(1)
    while forest[node] != root:
        parent = forest[node]
        forest[node] = root
        node = parent
    return root


@_jit
def _segment(order, costs_sorted, offsets, num_voxels, num_valid, scale, min_size):
    forest = np.arange(num_voxels, dtype=np.int64)
    size = np.ones(num_voxels, dtype=np.int64)
    internal = np.zeros(num_voxels, dtype=np.float64)
    for i in range(num_valid):
        edge = order[i]
        direction = edge // num_voxels
        a = edge - direction * num_voxels
        b = a + offsets[direction]
        root_a = _find_root(forest, a)
        root_b = _find_root(forest, b)
        if root_a == root_b:
            continue
        cost = costs_sorted[i]
        threshold_a = internal[root_a] + scale / size[root_a]
        threshold_b = internal[root_b] + scale / size[root_b]
        if cost < min(threshold_a, threshold_b):
            # the smaller index becomes the root, so the result does not depend on order
            # of the two endpoints
            if root_a < root_b:
                forest[root_b] = root_a
                new_root = root_a
            else:
                forest[root_a] = root_b
                new_root = root_b
            size[new_root] = size[root_a] + size[root_b]
            internal[new_root] = cost
    # second pass: absorb segments below min_size along the cheapest edges first
    for i in range(num_valid):
        edge = order[i]
        direction = edge // num_voxels
        a = edge - direction * num_voxels
        b = a + offsets[direction]
        root_a = _find_root(forest, a)
        root_b = _find_root(forest, b)
        if root_a == root_b:
            continue
        if size[root_a] < min_size or size[root_b] < min_size:
            if root_a < root_b:
                forest[root_b] = root_a
                new_root = root_a
            else:
                forest[root_a] = root_b
                new_root = root_b
            size[new_root] = size[root_a] + size[root_b]
    labels = np.empty(num_voxels, dtype=np.int64)
    for v in range(num_voxels):
        labels[v] = _find_root(forest, v)
    return labels


def felzenszwalb_3d(
    image: np.ndarray,
    min_size: int,
    spacing_zyx: tuple[float, float, float] = (1.0, 1.0, 1.0),
    scale: float = 1.0,
) -> np.ndarray:
    """3-D Felzenszwalb segmentation without smoothing (``sigma = 0``).

    Args:
        image: ``(Z, Y, X)`` intensities, 0..255 in the ADNet recipe.
        min_size: smallest segment in voxels (ADNet passes ``n_sv`` here).
        spacing_zyx: voxel size ``(z, y, x)`` for the anisotropic edge weights.
        scale: observation level ``k``; divided by 255 as in scikit-image, so ``k = 1``
            on a 0..255 image makes the first pass merge almost only equal voxels and
            ``min_size`` decides the segment sizes.
    Returns:
        ``(Z, Y, X)`` int32 segment ids ``0..n-1`` (ordered by first voxel).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"felzenszwalb_3d needs a (Z, Y, X) volume, got shape {image.shape}")
    depth, height, width = image.shape
    num_voxels = depth * height * width
    costs = edge_costs(image, spacing_zyx).ravel()
    order = np.argsort(costs, kind="stable")
    costs_sorted = costs[order]
    del costs
    num_valid = int(np.searchsorted(costs_sorted, np.inf))
    offsets = np.array(
        [dz * height * width + dy * width + dx for dz, dy, dx, _ in DIRECTIONS], dtype=np.int64
    )
    roots = _segment(
        order.astype(np.int64, copy=False),
        costs_sorted,
        offsets,
        num_voxels,
        num_valid,
        float(scale) / 255.0,
        int(min_size),
    )
    _, labels = np.unique(roots, return_inverse=True)
    return labels.reshape(depth, height, width).astype(np.int32)
