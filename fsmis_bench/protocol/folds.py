"""Fixed cross-validation folds (PROTOCOL.md §2).

A fold is a **set** of indices into the id-sorted scan list; folds overlap by one scan and
the last one wraps around to scan 0. The scans of a fold are taken as the reference code
takes them (ADNet, Q-Net, SD-FSMIS: ``[s for i, s in enumerate(sorted_scans) if i in
FOLD[k]]``), i.e. in id-sorted order, so in fold 4 scan 0 comes *first* and the support at
position 2 of ``abd_mri`` fold 4 is scan 17. Training for fold k uses every scan outside
fold k.
"""

from __future__ import annotations

from ..errors import ConfigError


def _five_folds(n_cases: int, width: int) -> tuple[tuple[int, ...], ...]:
    """Folds of ``width + 1`` consecutive scans sharing their edges; the last also holds scan 0.

    Each fold is written in ascending order, the order :func:`fold_indices` uses.
    """
    folds = [tuple(range(k * width, k * width + width + 1)) for k in range(4)]
    folds.append((0,) + tuple(range(4 * width, n_cases)))
    return tuple(folds)


FOLDS: dict[str, tuple[tuple[int, ...], ...]] = {
    "abd_mri": _five_folds(20, 4),  # {0-4}, {4-8}, {8-12}, {12-16}, {0, 16-19}
    "abd_ct": _five_folds(30, 6),  # {0-6}, ..., {0, 24-29}
    "card_mri": _five_folds(35, 7),  # {0-7}, ..., {0, 28-34}
}


#: Fewer scans than this form a single fold instead of the five-fold pattern.
MIN_SCANS_FOR_FIVE_FOLDS = 10


def folds_for(n_cases: int) -> tuple[tuple[int, ...], ...]:
    """The same five-fold pattern for a dataset of any size (phantom, NIfTI folders).

    Fewer than :data:`MIN_SCANS_FOR_FIVE_FOLDS` scans cannot give five folds of three scans;
    they form one fold holding every scan (EP1 needs a support and one query, so two scans
    at least): a test set for a model trained elsewhere.
    """
    if n_cases < 2:
        raise ConfigError(
            f"EP1 needs a support scan and at least one query scan, found {n_cases} scan(s)",
            hint="add scans to the folder",
        )
    if n_cases < MIN_SCANS_FOR_FIVE_FOLDS:
        return (tuple(range(n_cases)),)
    width = max(1, n_cases // 5)
    return _five_folds(n_cases, width)


def fold_indices(
    folds: tuple[tuple[int, ...], ...], fold: int, n_cases: int, dataset: str = "dataset"
) -> tuple[int, ...]:
    """Indices of fold ``fold`` in the reference order: the id-sorted scan list filtered by
    membership in the fold (a set), so the order a fold is written in never matters."""
    if not isinstance(fold, int) or not 0 <= fold < len(folds):
        raise ConfigError(
            f"fold={fold!r} does not exist for {dataset}",
            hint=f"use fold=0..{len(folds) - 1}" if len(folds) > 1 else f"{dataset} has one fold: use fold=0",
        )
    members = set(folds[fold])
    if min(members) < 0:
        raise ConfigError(f"{dataset} fold {fold} holds a negative scan index {min(members)}")
    if max(members) >= n_cases:
        raise ConfigError(
            f"{dataset} fold {fold} needs scan index {max(members)} but only {n_cases} scans were found",
            hint="check that the data root holds every scan of the dataset",
        )
    return tuple(index for index in range(n_cases) if index in members)
