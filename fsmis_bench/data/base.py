"""The dataset interface.

A dataset plugin subclasses :class:`VolumeDataset`: it lists case ids in their canonical
(numeric) order, loads one :class:`Volume` at a time, and declares its organ label map,
its test organs and its folds. Everything episodic (folds, support choice, chunks,
training episodes) is built on top of this by :mod:`fsmis_bench.protocol` and
:mod:`fsmis_bench.training`, so every dataset is evaluated identically.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import DataError

#: The one organ vocabulary. Datasets map these names to their own label values,
#: cross-domain runs match organs by these names, and reports order organs by it.
ORGANS: tuple[str, ...] = (
    # the test organs, in the column order of the papers' tables
    "spleen",
    "liver",
    "left_kidney",
    "right_kidney",
    "lv_bp",
    "lv_myo",
    "rv",
    # the other SABS organs
    "gallbladder",
    "esophagus",
    "stomach",
    "aorta",
    "ivc",
    "portal_splenic_vein",
    "pancreas",
    "right_adrenal",
    "left_adrenal",
)


@dataclass
class Volume:
    """One scan, slices first.

    Attributes:
        case_id: the scan's id as in its file names (e.g. ``"13"``).
        image: ``(Z, H, W)`` float32 intensities as stored (not normalised).
        label: ``(Z, H, W)`` int32 label values of the dataset's label map.
        supervoxels: ``(Z, H, W)`` int32 pseudo-label ids (0 = background), or None.
        spacing: voxel size in mm as ``(z, y, x)``.
        affine: ``(4, 4)`` voxel-to-world matrix (RAS+, mm) for the index order of
            ``image``: ``world = affine @ (z, y, x, 1)``; None when unknown (phantom).
            Display code reads it to show slices in radiological orientation.
        modality: ``"ct"`` or ``"mri"`` where the dataset knows it per scan, else None.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    supervoxels: np.ndarray | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray | None = None
    modality: str | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape != self.label.shape:
            raise DataError(
                f"case {self.case_id}: image {self.image.shape} and label {self.label.shape} "
                "must be 3-D arrays of the same shape",
                hint="check that the image and label files belong together",
            )
        bad = _non_finite(self.image)
        if bad:
            raise DataError(
                f"case {self.case_id}: the image has {bad} non-finite voxels (NaN or inf)",
                hint="repair or re-prepare this scan (`fsmis-bench check-data` lists every damaged file)",
            )
        if self.supervoxels is not None and self.supervoxels.shape != self.image.shape:
            raise DataError(
                f"case {self.case_id}: supervoxels {self.supervoxels.shape} do not match "
                f"the image {self.image.shape}",
                hint="regenerate them with `fsmis-bench supervoxels`",
            )

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])

    def organ_mask(self, label_value: int) -> np.ndarray:
        """``(Z, H, W)`` bool mask of one label value."""
        return self.label == label_value


def _non_finite(array: np.ndarray) -> int:
    """How many entries of ``array`` are NaN or infinite (0 for integer arrays)."""
    if not np.issubdtype(array.dtype, np.inexact):
        return 0
    finite = np.isfinite(array)
    return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))


#: the modes of :func:`normalise_volume`, a method's ``input_norm``
INPUT_NORMS = ("zscore", "minmax", "none")


def normalise_volume(image: np.ndarray, mode: str) -> np.ndarray:
    """Per-volume intensity normalisation applied before slicing.

    Args:
        image: ``(Z, H, W)`` intensities.
        mode: ``"zscore"`` (ADNet family) or ``"minmax"`` (SD-FSMIS, to [-1, 1]).
    Returns:
        ``(Z, H, W)`` float32.
    """
    return Normalisation.of(image, mode)(image)


@dataclass(frozen=True)
class Normalisation:
    """A volume's normalisation (:func:`normalise_volume`) kept as its statistics, to apply to
    any part of the volume.

    ``Normalisation.of(image, mode)(image[z])`` is exactly ``normalise_volume(image, mode)[z]``:
    the statistics are the whole volume's, and the rest is elementwise float32 arithmetic in
    the same order. So the episode sampler normalises only the slices it draws, instead of
    holding a normalised copy of every training scan beside the dataset's own (twice the
    memory of a large CT folder), and EP1 only the slices it evaluates.

    Attributes:
        mode: one of :data:`INPUT_NORMS`.
        offset: subtracted first (zscore: the mean, a float32 scalar; minmax: the minimum).
        scale: divided by next (zscore: the standard deviation; minmax: the range; >= 1e-6).
    """

    mode: str
    offset: float | np.floating = 0.0
    scale: float = 1.0

    @classmethod
    def of(cls, image: np.ndarray, mode: str) -> Normalisation:
        """The normalisation of the ``(Z, H, W)`` volume ``image``."""
        if mode not in INPUT_NORMS:
            raise ValueError(f"unknown normalisation {mode!r}; use one of {', '.join(INPUT_NORMS)}")
        image = image.astype(np.float32, copy=False)
        if mode == "zscore":
            return cls(mode, image.mean(), max(float(image.std()), 1e-6))
        if mode == "minmax":
            lo, hi = float(image.min()), float(image.max())
            return cls(mode, lo, max(hi - lo, 1e-6))
        return cls(mode)

    def __call__(self, part: np.ndarray) -> np.ndarray:
        """``part`` (any shape, e.g. one ``(H, W)`` slice) normalised, float32."""
        part = part.astype(np.float32, copy=False)
        if self.mode == "zscore":
            return (part - self.offset) / self.scale
        if self.mode == "minmax":
            return (part - self.offset) / self.scale * 2.0 - 1.0
        return part


class VolumeDataset(ABC):
    """Base class of dataset plugins.

    Args:
        root: the data root (``data_root=`` / ``FSMIS_DATA_ROOT``); datasets without
            files (``phantom``) ignore it.
        **options: the dataset's config group entries.

    Subclasses set the class attributes and implement :meth:`_case_ids` and :meth:`_load`.
    """

    #: organ name (from :data:`ORGANS`) -> label value
    label_map: ClassVar[dict[str, int]] = {}
    #: organs evaluated, in table order
    test_organs: ClassVar[tuple[str, ...]] = ()
    #: fold k -> indices into :meth:`case_ids`
    folds: ClassVar[tuple[tuple[int, ...], ...]] = ()
    #: setting-2 organ groups: training for a group drops slices showing its organs
    setting2_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()
    modality: ClassVar[str] = "mri"
    #: False for datasets made in memory (the phantom): no scan file gives a grid that
    #: predicted masks could be written back in, so ``--export-masks`` is refused up front
    has_file_geometry: ClassVar[bool] = True

    def __init__(self, root: str | Path | None = None, **options) -> None:
        self.root = Path(root).expanduser() if root not in (None, "", "null") else None
        #: the config node the options came from (``dataset`` or ``test_dataset``), for messages
        self.config_key = str(options.pop("config_key", None) or "dataset")
        self.options = options
        self._cache: dict[tuple[str, bool], Volume] = {}

    # -- to implement -------------------------------------------------------------------
    @abstractmethod
    def _case_ids(self) -> list[str]:
        """Case ids in canonical order (numeric where ids are numbers)."""

    @abstractmethod
    def _load(self, case_id: str, with_supervoxels: bool) -> Volume:
        """Read one volume."""

    # -- optional hooks -----------------------------------------------------------------
    @classmethod
    def resolve_options(cls, options: dict, data_root: str | None) -> dict:
        """Options as they should be recorded in the run's config, resolved at compose time.

        E.g. a label map given as a file becomes the mapping itself, so the record does not
        depend on a file that may change. The default returns ``options`` unchanged.
        """
        return options

    def fold_support(self, fold: int) -> str | None:
        """The support scan this dataset fixes for ``fold``; None: EP1's ``protocol.supp_idx``."""
        return None

    def source_nifti(self, case_id: str, array: np.ndarray):
        """A ``(Z, H, W)`` array on the grid of :meth:`load` as a NIfTI image in the grid
        and orientation of the scan's own file (e.g. to write a predicted mask back).

        The default assumes the volume was read as stored and uses :attr:`Volume.affine`.
        """
        from .nifti import zyx_to_nifti

        volume = self.load(case_id)
        if volume.affine is None:
            raise DataError(
                f"{self.name}: case {case_id} has no file geometry, so masks cannot be written as NIfTI",
            )
        if tuple(array.shape) != volume.image.shape:
            raise DataError(f"{self.name}: case {case_id} is {volume.image.shape}, got a mask of {array.shape}")
        return zyx_to_nifti(array, volume.affine)

    # -- provided -----------------------------------------------------------------------
    @functools.cached_property
    def _ids(self) -> list[str]:
        return list(self._case_ids())

    def case_ids(self) -> list[str]:
        return list(self._ids)

    def load(self, case_id: str, with_supervoxels: bool = False) -> Volume:
        """The volume ``case_id``, cached for the lifetime of this dataset object.

        Raises:
            DataError: the files are missing or damaged, or the image holds non-finite
                values (every plugin's volumes are checked, see :class:`Volume`).
        """
        key = (case_id, with_supervoxels)
        if key not in self._cache:
            if case_id not in self._ids:
                raise DataError(f"{self.name}: no case {case_id!r}; cases are {self._ids}")
            if (case_id, True) in self._cache:
                return self._cache[(case_id, True)]
            try:
                self._cache[key] = self._load(case_id, with_supervoxels)
            except DataError as exc:
                if exc.message.startswith(f"{self.name}:"):
                    raise
                raise DataError(f"{self.name}: {exc.message}", hint=exc.hint) from None
        return self._cache[key]

    def release(self, case_id: str) -> None:
        """Let go of the cached volume ``case_id`` (read again by the next :meth:`load`): for
        a pass over every scan that needs each one once (``check-data``, ``export``), whose
        memory would otherwise grow with the folder."""
        for key in ((case_id, False), (case_id, True)):
            self._cache.pop(key, None)

    @property
    def name(self) -> str:
        return getattr(self, "registered_name", type(self).__name__)

    def organ_value(self, organ: str) -> int:
        try:
            return self.label_map[organ]
        except KeyError:
            raise DataError(
                f"dataset {self.name} has no organ {organ!r}; it has {sorted(self.label_map)}"
            ) from None

    def fold_cases(self, fold: int) -> list[str]:
        """Case ids of fold ``fold``, in order."""
        from ..protocol.folds import fold_indices

        return [self._ids[i] for i in fold_indices(self.folds, fold, len(self._ids), self.name)]

    def identity(self, *, with_supervoxels: bool) -> dict:
        """What decides this dataset's numbers, for the run's identity and record.

        The default names the dataset and its options; plugins whose data live in files add
        what pins them (paths, label source, digests of the pseudo-labels, preprocessing).
        Only JSON-serialisable values.
        """
        return {"name": self.name, "options": dict(self.options), "with_supervoxels": bool(with_supervoxels)}

    def train_cases(self, fold: int) -> list[str]:
        """Every case not in fold ``fold`` (all cases when ``fold`` is None: cross-domain)."""
        if fold is None:
            return self.case_ids()
        held_out = set(self.fold_cases(fold))
        return [c for c in self._ids if c not in held_out]
