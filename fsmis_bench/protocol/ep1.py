"""EP1, the de-facto standard test protocol (PROTOCOL.md §3).

For one fold and one organ: the support is the fold scan at position ``supp_idx``, the
queries are the other fold scans. Only query slices that contain the organ are kept.
The support contributes ``n_part`` of its labelled slices, and the query's kept slices
are split into ``n_part`` chunks; chunk ``i`` is segmented with support slice ``i``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..data.base import Normalisation, VolumeDataset
from ..errors import ConfigError, DataError, DataWarning


def support_positions(n_labelled: int, n_part: int) -> list[int]:
    """Indices (into the support's labelled slices) of the ``n_part`` support slices.

    ``int(p * C)`` with ``p_i = 1/(2n) + i (1 - 1/n) / (n - 1)``, and ``p = 0.5`` for n = 1.
    For n = 3: p = 1/6, 1/2, 5/6.
    """
    if n_part < 1:
        raise ConfigError(f"protocol.n_part must be >= 1, got {n_part}")
    if n_part == 1:
        fractions = [0.5]
    else:
        # The reference's order of operations (Q-Net `get_support_index`): the interval is
        # computed first, then multiplied. Reassociated, the float rounding picks another
        # slice for some n_part >= 11 (n_part = 11, 12 labelled slices: 6 vs 5).
        half = 1 / (n_part * 2)
        interval = (1.0 - 1.0 / n_part) / (n_part - 1)
        fractions = [half + interval * i for i in range(n_part)]
    return (np.array(fractions) * n_labelled).astype(int).tolist()


def chunk_edges(n_query_slices: int, n_part: int) -> list[int]:
    """Chunk boundaries ``int(linspace(0, C_q, n_part + 1))``; chunk i = [e_i, e_{i+1})."""
    return [int(e) for e in np.linspace(0, n_query_slices, n_part + 1)]


@dataclass
class SupportSlices:
    """The support of one (fold, organ) episode set.

    Attributes:
        case_ids: the support scan of each shot.
        slice_indices: ``(n_part, S)`` z index of each selected slice.
        images: ``(n_part, S, H, W)`` float32, normalised per volume.
        masks: ``(n_part, S, H, W)`` bool.
    """

    case_ids: list[str]
    slice_indices: np.ndarray
    images: np.ndarray
    masks: np.ndarray


@dataclass
class QueryCase:
    """One query volume, reduced to its slices that contain the organ.

    Attributes:
        case_id: the query scan.
        slice_indices: ``(K,)`` z index of each kept slice, ascending.
        images: ``(K, H, W)`` float32, normalised per volume.
        masks: ``(K, H, W)`` bool ground truth.
        edges: chunk boundaries into the K slices (length ``n_part + 1``).
    """

    case_id: str
    slice_indices: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    edges: list[int]


def _labelled_slices(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))


def support_case_positions(fold_size: int, supp_idx: int, n_shot: int) -> list[int]:
    """Positions (within the fold) of the support scans: ``supp_idx`` and the next ones."""
    if not -fold_size <= supp_idx < fold_size:
        raise ConfigError(
            f"protocol.supp_idx={supp_idx} is outside a fold of {fold_size} scans",
            hint=f"use supp_idx in 0..{fold_size - 1} (or -1 for the last scan)",
        )
    if not 1 <= n_shot < fold_size:
        raise ConfigError(f"protocol.n_shot={n_shot} must be between 1 and {fold_size - 1}")
    first = supp_idx % fold_size
    return [(first + k) % fold_size for k in range(n_shot)]


def build_test_episodes(
    dataset: VolumeDataset,
    fold_cases: list[str],
    organ: str,
    *,
    supp_idx: int = 2,
    n_part: int = 3,
    n_shot: int = 1,
    norm: str = "zscore",
) -> tuple[SupportSlices, list[QueryCase]]:
    """The support and the query cases of EP1 for one fold and organ.

    Raises:
        DataError: the support scan does not contain the organ. With fewer than ``n_part``
            labelled slices a :class:`DataWarning` says that chunks share a support slice
            (``int(p * C)`` repeats, as in the reference code).
    """
    value = dataset.organ_value(organ)
    shot_positions = support_case_positions(len(fold_cases), supp_idx, n_shot)
    support_ids = [fold_cases[p] for p in shot_positions]

    images, masks, indices = [], [], []
    for case_id in support_ids:
        volume = dataset.load(case_id)
        organ_mask = volume.organ_mask(value)
        labelled = _labelled_slices(organ_mask)
        if len(labelled) == 0:
            raise DataError(
                f"{dataset.name}: support scan {case_id} shows {organ} in 0 slices, "
                f"so it cannot be the support of {organ}",
                hint="pick another support with protocol.supp_idx=<0..fold size-1>, "
                "or check this scan's label file",
            )
        if len(labelled) < n_part:
            # The reference takes int(p * C) all the same, so some chunks share a slice.
            warnings.warn(
                f"{dataset.name}: support scan {case_id} shows {organ} in {len(labelled)} slices, fewer "
                f"than n_part={n_part}: chunks share support slices, as the reference code does",
                DataWarning, 2,
            )
        chosen = labelled[support_positions(len(labelled), n_part)]
        # the whole volume's statistics, applied to the chosen slices only
        images.append(Normalisation.of(volume.image, norm)(volume.image[chosen]))
        masks.append(organ_mask[chosen])
        indices.append(chosen)
    support = SupportSlices(
        case_ids=support_ids,
        slice_indices=np.stack(indices, axis=1),
        images=np.stack(images, axis=1),
        masks=np.stack(masks, axis=1),
    )

    queries = []
    for case_id in fold_cases:
        if case_id in support_ids:
            continue
        volume = dataset.load(case_id)
        organ_mask = volume.organ_mask(value)
        kept = _labelled_slices(organ_mask)
        if len(kept) == 0:
            # Its Dice is 0/0. The reference codes average that NaN into the organ's mean
            # (Q-Net, ADNet, SSL-ALPNet), which then reads NaN; the pooled Dice ignores it.
            # A number is more useful than NaN, so the scan is left out, said and recorded.
            warnings.warn(
                f"{dataset.name}: query scan {case_id} shows no {organ}, so it is left out of {organ}'s "
                f"mean (the reference codes would report NaN for {organ}); run.json lists it under "
                "'absent'. Check this scan's label file if it should show the organ",
                DataWarning, 2,
            )
            continue
        queries.append(
            QueryCase(
                case_id=case_id,
                slice_indices=kept,
                images=Normalisation.of(volume.image, norm)(volume.image[kept]),
                masks=organ_mask[kept],
                edges=chunk_edges(len(kept), n_part),
            )
        )
    return support, queries
