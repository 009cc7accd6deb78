"""A user's own image/label NIfTI pairs with a label map given in config.

Config (``dataset=nifti_folder``; as a cross-domain test set, ``protocol.test_dataset=nifti_folder``
with the same keys under ``test_dataset.``)::

    dataset:
      name: nifti_folder
      path: /data/my_scans            # image_<id>.nii[.gz] and label_<id>.nii[.gz]
      label_map: {liver: 1, spleen: 2} # or the path of a YAML/JSON file holding the mapping
      test_organs: null                # default: every organ of label_map
      modality: none                   # none | ct | mri | auto | {<id>: ct|mri|none, ...}
      orientation: LAS                 # axis codes every scan is brought to, or as_stored
      folds: null                      # null | [[positions], ...] | loo | all
      fold_ids: null                   # [[scan ids], ...]: folds by id instead of position
      support: null                    # a scan id: the support of every fold
      supervoxels: null                # null | auto | a folder of superpix-MIDDLE_<id>.nii.gz
      n_supervoxels: 5000              # auto: the 3-D Felzenszwalb minimum size, in voxels
      supervoxels_out: null            # auto: where they go (default <path>/supervoxels_<n>; relative: beside path)

**Orientation.** Every scan (and its label, each by its own affine) is brought to
``orientation`` before slicing, by axis permutations and flips only. The default ``LAS`` is
the orientation of the benchmark's prepared CHAOS and SABS files, so a model trained on them
sees a user's scans laid out as it was trained: slices along superior, image columns from
the patient's right to left, rows from posterior to anterior. ``as_stored`` keeps each
file's voxel axes (slices along the last one), e.g. for oblique cardiac short-axis stacks.

**Intensity.** ``modality`` applies the benchmark's own preparation recipe
(:data:`fsmis_bench.preparation.common.INTENSITY_RECIPES`): ``ct`` clips HU to
[-125, 275] and rescales to 0..255 (SABS), ``mri`` clips the top 0.5 % of the histogram
(CHAOS, MS-CMRSeg); ``auto`` picks per scan (Hounsfield units hold air far below 0);
``none`` keeps the stored values; a mapping names each scan's modality.

**Folds.** Without ``folds``, ten or more scans get the standard five overlapping folds;
fewer scans form a single fold (a test set for a model trained elsewhere). A run on one
fold of several says so on stderr ("fold 0 of 5: 3 of 12 scans evaluated");
``folds: all`` makes one fold of every scan. ``folds`` lists
positions into the id-sorted scans, ``fold_ids`` lists scan ids; either way a fold is a set,
taken in id order like the built-in folds (PROTOCOL.md §2), so ``protocol.supp_idx`` counts
in that order. ``folds: loo`` makes one fold per query scan: ``{support, query}``, with
``support`` (default: the first scan) the support of every fold whatever its position, and
training (in-domain) on all other scans.

The path may be absolute, relative to the working directory, or relative to ``data_root``.

**Supervoxels.** Self-supervised training (``protocol.train_labels=supervoxels``, the
default of ADNet, Q-Net and SSL-ALPNet) needs pseudo-labels. ``supervoxels: auto`` makes the
missing ones with the recipe the built-in datasets use (ADNet's 3-D Felzenszwalb,
``n_supervoxels`` voxels at least, :func:`fsmis_bench.preparation.supervoxels_3d`), on each
scan as the methods see it (reoriented, after its intensity recipe), and writes them on the
scan's own grid and header, so that they overlay it in any viewer and are read back like
supervoxels made elsewhere. Generation is announced and listed in ``run.json``; the files'
digest is part of the run's identity. Each file's header names what it was made from, so one
made from another scan file or with other settings is made again, and a file ``auto`` did not
make is never overwritten. A folder given instead is read, never written.

**Checks.** Each scan is refused when it cannot be used as it is (unreadable, not 3-D,
NaN, a constant image, labels that are not whole numbers, a label on another grid, two
files for one id) and warned about when it can be used but may not mean what the user
expects: label values outside the label map, test organs it does not show, Hounsfield
units against the named modality, a field of view far from square (slices are resized to
a square grid), axes far from the patient's (oblique: the nearest axes are taken), and, for
a support and a query, axes that end up far apart (one seen turned or mirrored against the
other). ``check-data nifti_folder`` reports the same through the same reader.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fsmis_bench.data.base import ORGANS, Volume, VolumeDataset
from fsmis_bench.data.consistency import axis_rotation, guess_modality, modality_mismatch, slice_digests
from fsmis_bench.data.digest import file_sha256
from fsmis_bench.data.nifti import (
    AS_STORED, CANONICAL_ORIENTATION, NiftiVolume, check_orientation, load_nifti, nifti_path, numeric_sort,
    to_source_array,
)
from fsmis_bench.data.options import organ_suggestions, read_label_map
from fsmis_bench.errors import ConfigError, DataError, DataWarning
from fsmis_bench.protocol.folds import folds_for
from fsmis_bench.records import can_write_in, durable_replace

MODALITIES = ("none", "ct", "mri", "auto")
_IMAGE_NAME = re.compile(r"image_(.+?)\.nii(\.gz)?")
_LABEL_NAME = re.compile(r"label_(.+?)\.nii(\.gz)?")
#: in-plane pixels more anisotropic than this are distorted by the square resize of slices
_ANISOTROPY = 1.5
#: a field of view (mm) whose sides differ by more than this factor is visibly squashed
#: by the square resize of slices (320 x 256 pixels of one size: 1.25)
FIELD_ASPECT = 1.2
#: a scan whose voxel axes lie further than this (degrees) from the patient's axes is
#: oblique: reorientation takes the nearest axes, so near 45 degrees a small change of
#: angle swaps two of them
OBLIQUE_DEGREES = 25.0
#: a support and a query whose axes (as read) lie further apart than this (degrees) show
#: the patient turned or mirrored against each other
PAIR_DEGREES = 45.0
#: a label (or supervoxel) grid whose voxel centres lie further than this from the image's,
#: in image voxels along the image's axes, anywhere in the volume, is another grid: a
#: tolerance in voxels, not in mm, so it holds whatever the origin's distance (a table
#: position of -1500 mm), and it bounds a rotation by the shift it causes at the far corner
GRID_VOXELS = 0.1
#: ``supervoxels: auto``'s minimum supervoxel size in voxels: ADNet's for the abdomen (1000 for CMR)
DEFAULT_SUPERVOXEL_SIZE = 5000
#: fewer pseudo-labels than this in a scan are warned about (ADNet's CHAOS scans get 21-29)
FEW_SUPERVOXELS = 5
#: after its intensity recipe, a scan with more than this share of its voxels at the top
#: of the CT window (above 275 HU) is an MRI or a raw CT windowed as Hounsfield units
SATURATED_SHARE = 0.5
#: ... or with less than this share inside the window: nothing left to segment
INSIDE_WINDOW_SHARE = 0.01


@dataclass
class CaseGeometry:
    """How one scan's file maps to the volume the harness sees."""

    image_path: Path
    source_axcodes: tuple[str, str, str]
    has_orientation: bool
    transform: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    file_shape: tuple[int, ...] = ()
    obliquity: float = 0.0


def _missing(value) -> bool:
    return value in (None, "", "???")


class NiftiFolder(VolumeDataset):
    """``image_<id>.nii[.gz]`` / ``label_<id>.nii[.gz]`` pairs in one folder."""

    #: fewer pseudo-labels per scan than this are warned about, by the run and by check-data
    few_supervoxels = FEW_SUPERVOXELS

    @classmethod
    def resolve_options(cls, options: dict, data_root: str | None) -> dict:
        """Label-map files become the mapping; a folder found under the working directory
        becomes an absolute path; ids in a modality mapping become strings."""
        options = dict(options)
        if not _missing(options.get("label_map")):
            options["label_map"] = read_label_map(options["label_map"])
        path = options.get("path")
        if not _missing(path) and not Path(str(path)).expanduser().is_absolute():
            here = Path(str(path)).expanduser().resolve()
            if here.is_dir():
                options["path"] = str(here)
        if options.get("orientation") not in (None, ""):
            options["orientation"] = check_orientation(options["orientation"])
        modality = options.get("modality")
        if isinstance(modality, dict):
            options["modality"] = {str(k): str(v) for k, v in modality.items()}
        return options

    def __init__(self, root=None, **options) -> None:
        super().__init__(root, **options)
        key = self.config_key
        path = options.get("path")
        if _missing(path):
            raise ConfigError(
                f"{key}=nifti_folder needs {key}.path" if key == "dataset"
                else f"protocol.test_dataset=nifti_folder needs {key}.path",
                hint=f"add {key}.path=<folder with image_<id>.nii.gz and label_<id>.nii.gz>",
            )
        given = Path(str(path)).expanduser()
        #: where the folder was looked for: as given, or under the working directory and data_root
        self.tried = [given] if given.is_absolute() else [given.resolve()] + (
            [self.root / given] if self.root is not None else [])
        folder = given
        if not given.is_absolute():
            folder = self.root / given if self.root is not None and not given.resolve().is_dir() else given.resolve()
        self.folder = folder
        label_map = read_label_map(options.get("label_map"))
        if not label_map:
            raise ConfigError(
                f"nifti_folder needs {key}.label_map",
                hint=f"e.g. '{key}.label_map={{liver:1,spleen:2}}', or {key}.label_map=<a YAML/JSON file>",
            )
        unknown = [o for o in label_map if o not in ORGANS]
        if unknown:
            suggestions = ", ".join(f"{a} -> {b}" for a, b in organ_suggestions(unknown, ORGANS).items())
            raise ConfigError(
                f"{key}.label_map names organs outside the vocabulary: {unknown}"
                + (f"; did you mean {suggestions}?" if suggestions else ""),
                hint=f"organ names are lower case with underscores, from: {', '.join(ORGANS)}",
            )
        self.label_map = label_map
        test_organs = options.get("test_organs")
        if isinstance(test_organs, str):  # +test_organs=liver: one organ, not its letters
            test_organs = [test_organs]
        self.test_organs = tuple(test_organs or self.label_map)
        missing_organs = [o for o in self.test_organs if o not in self.label_map]
        if missing_organs:
            raise ConfigError(f"{key}.test_organs {missing_organs} are not in the label map {self.label_map}")
        self.setting2_groups = tuple(tuple(g) for g in (options.get("setting2_groups") or ()))
        self.orientation = check_orientation(options.get("orientation") or CANONICAL_ORIENTATION)
        self.modality_option = self._check_modality(options.get("modality"))
        self._folds = _check_folds(options.get("folds"), key, by_id=False)
        self._fold_ids = _check_folds(options.get("fold_ids"), key, by_id=True)
        if self._folds and self._fold_ids:
            raise ConfigError(f"give {key}.folds (positions) or {key}.fold_ids (scan ids), not both")
        self.support = None if _missing(options.get("support")) else str(options["support"])
        self.supervoxel_dir = options.get("supervoxels")
        size = options.get("n_supervoxels", DEFAULT_SUPERVOXEL_SIZE)
        size = DEFAULT_SUPERVOXEL_SIZE if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{key}.n_supervoxels must be a whole, positive voxel count, got {size!r}",
                              hint=f"e.g. {key}.n_supervoxels={DEFAULT_SUPERVOXEL_SIZE} (ADNet's abdominal size)")
        self.n_supervoxels = size
        self.supervoxels_out = options.get("supervoxels_out")
        self.geometry: dict[str, CaseGeometry] = {}
        self._digests: dict[str, dict[bytes, int]] = {}
        self._label_values: dict[str, set[int]] = {}
        #: the fold a run plans (set by :meth:`fold_support`), for the label-map check of :meth:`organ_value`
        self._planned_fold: int | None = None

    def _check_modality(self, value) -> str | dict[str, str]:
        key = self.config_key
        if value is None:
            return "none"
        if isinstance(value, dict) or hasattr(value, "items"):
            mapping = {str(k): str(v) for k, v in dict(value).items()}
            bad = {k: v for k, v in mapping.items() if v not in ("ct", "mri", "none")}
            if bad:
                raise ConfigError(f"{key}.modality gives unknown modalities {bad}", hint="per scan use ct, mri or none")
            return mapping
        if str(value) not in MODALITIES:
            raise ConfigError(
                f"{key}.modality={value!r} is unknown",
                hint="use none, ct, mri, auto, or a mapping {<scan id>: ct|mri, ...}",
            )
        return str(value)

    # -- folds ----------------------------------------------------------------------------
    @property
    def folds(self):  # type: ignore[override]
        ids = self.case_ids()
        key = self.config_key
        if self._fold_ids:
            folds = []
            for fold in self._fold_ids:
                unknown = [str(i) for i in fold if str(i) not in ids]
                if unknown:
                    raise ConfigError(
                        f"{key}.fold_ids names scans that are not in {self.folder}: {unknown}",
                        hint=f"the scan ids there are {ids}",
                    )
                folds.append(tuple(ids.index(str(i)) for i in fold))
            return tuple(folds)
        if self._folds == "loo":
            support = self._support_id(ids)
            return tuple((ids.index(support), i) for i, case in enumerate(ids) if case != support)
        if self._folds == "all":
            folds_for(len(ids))  # refuses fewer than two scans
            return (tuple(range(len(ids))),)
        if self._folds:
            folds = tuple(tuple(int(i) for i in f) for f in self._folds)
            bad = sorted({i for f in folds for i in f if not 0 <= i < len(ids)})
            if bad:
                raise ConfigError(
                    f"{key}.folds holds positions {bad}, but {self.folder} has {len(ids)} scans "
                    f"(positions 0..{len(ids) - 1} of the id-sorted list)",
                    hint=f"to name scans by id, use {key}.fold_ids=[[{','.join(ids[:3])}], ...] instead",
                )
            return folds
        return folds_for(len(ids))

    def _support_id(self, ids: list[str]) -> str:
        if self.support is None:
            return ids[0]
        if self.support not in ids:
            raise ConfigError(
                f"{self.config_key}.support={self.support!r} is not a scan in {self.folder}",
                hint=f"the scan ids there are {ids}",
            )
        return self.support

    def fold_support(self, fold: int) -> str | None:
        """The fixed support of ``fold`` (None: ``protocol.supp_idx``).

        A run asks this once, for the fold it evaluates, before it builds the episodes: the
        fold is kept for :meth:`organ_value`, and a run on one fold of several says on
        stderr how many scans it evaluates.
        """
        self._planned_fold = fold
        self._announce_fold(fold)
        if self.support is None and self._folds != "loo":
            return None
        support = self._support_id(self.case_ids())
        cases = self.fold_cases(fold)
        if support not in cases:
            raise ConfigError(
                f"{self.config_key}.support={support} is not in fold {fold} ({cases})",
                hint="put the support scan into every fold, or leave support unset to use protocol.supp_idx",
            )
        return support

    def _announce_fold(self, fold: int) -> None:
        """A test set split into folds by default evaluates one of them: say so."""
        if self.config_key == "dataset" or self._folds or self._fold_ids:
            return
        folds = self.folds
        if len(folds) < 2 or not isinstance(fold, int) or not 0 <= fold < len(folds):
            return
        total, evaluated = len(self.case_ids()), len(set(folds[fold]))
        print(
            f"note: {self.name}: fold {fold} of {len(folds)}: {evaluated} of {total} scans evaluated "
            f"({self.config_key}.folds=all evaluates all {total} in one fold; fold=0..{len(folds) - 1} picks another)",
            file=sys.stderr,
        )

    def organ_value(self, organ: str) -> int:
        """The label value of ``organ``; refused when no scan of the planned fold holds it.

        EP1 asks this before it reads the support, so a label map with the wrong value
        (liver stored as 6, mapped to 1) is named as such, not as a support without liver.
        """
        value = super().organ_value(organ)
        fold = self._planned_fold
        if fold is None or organ not in self.label_map:
            return value
        try:
            cases = self.fold_cases(fold)
        except ConfigError:
            return value
        held = {case: self.label_values(case) for case in cases}
        if not any(value in values for values in held.values()):
            present = sorted(set().union(*held.values()))
            key = self.config_key
            raise DataError(
                f"{self.name}: no scan of fold {fold} ({', '.join(cases)}) holds label value {value} "
                f"({organ} in {key}.label_map); their label files hold the values {present or 'none'}",
                hint=f"give {key}.label_map the value {organ} has in the label files, or leave {organ} out "
                f"with {key}.test_organs; `fsmis-bench check-data nifti_folder --path {self.folder} --label-map ...` "
                "lists each scan's values",
            )
        return value

    def label_values(self, case_id: str) -> set[int]:
        """The label values (0 left out) scan ``case_id`` holds."""
        if case_id not in self._label_values:
            self.load(case_id)
        return self._label_values[case_id]

    # -- files ----------------------------------------------------------------------------
    def _folder_missing(self) -> DataError:
        key = self.config_key
        where = "; ".join(
            f"{c} is a file, not a folder" if c.is_file() else f"{c} does not exist" for c in dict.fromkeys(self.tried)
        )
        return DataError(
            f"nifti_folder: {key}.path={self.options.get('path')} is not a folder ({where})",
            hint=f"{key}.path must be a folder of image_<id>.nii.gz and label_<id>.nii.gz files: an absolute path, "
            "or one relative to the working directory or to data_root",
        )

    def _case_ids(self) -> list[str]:
        if not self.folder.is_dir():
            raise self._folder_missing()
        images: dict[str, list[str]] = {}
        labels: dict[str, list[str]] = {}
        unmatched: list[str] = []
        for entry in sorted(self.folder.iterdir()):
            matched = False
            for pattern, found in ((_IMAGE_NAME, images), (_LABEL_NAME, labels)):
                if (m := pattern.fullmatch(entry.name)):
                    found.setdefault(m.group(1), []).append(entry.name)
                    matched = True
            if not matched and re.search(r"\.nii(\.gz)?$", entry.name, re.IGNORECASE):
                unmatched.append(entry.name)
        if unmatched:  # a scan the user meant to include would otherwise be missing without a word
            warnings.warn(
                f"nifti_folder: {len(unmatched)} NIfTI file(s) in {self.folder} are left out because their names "
                f"are not image_<id>.nii[.gz] or label_<id>.nii[.gz] (lower case): {', '.join(unmatched[:6])}"
                + (", ..." if len(unmatched) > 6 else ""),
                DataWarning, stacklevel=3,
            )
        for found in (images, labels):
            twice = {i: names for i, names in found.items() if len(names) > 1}
            if twice:
                case, names = next(iter(twice.items()))
                raise DataError(
                    f"nifti_folder: scan {case} has two files in {self.folder}: {' and '.join(names)}"
                    + (f" (and {len(twice) - 1} more ids like it)" if len(twice) > 1 else ""),
                    hint="keep one file per scan id (move the other out of the folder): only one of them would be read",
                )
        by_number: dict[str, list[str]] = {}
        for case in images:
            if case.isdigit():
                by_number.setdefault(str(int(case)), []).append(case)
        alike = [sorted(c) for c in by_number.values() if len(c) > 1]
        if alike:
            raise DataError(
                f"nifti_folder: scan ids {' and '.join(alike[0])} in {self.folder} are the same number",
                hint="rename one of them: fold_ids, support and modality mappings name scans by id, and a number "
                "cannot tell them apart (nor can the id order)",
            )
        ids = list(images)
        # a label that is a broken link or a folder is there: reading it names the problem
        missing = [i for i in ids if not _present(nifti_path(self.folder, f"label_{i}"))]
        if missing:
            padded = {i: o for i in missing for o in labels if o not in images and _same_number(i, o)}
            raise DataError(
                f"nifti_folder: images without labels in {self.folder}: {missing[:5]}"
                + (f"; labels with the same number but another zero-padding are there: "
                   f"{', '.join(f'image_{i} / label_{o}' for i, o in list(padded.items())[:3])}" if padded else ""),
                hint=("ids must match exactly: rename the labels (or the images) to one spelling, e.g. "
                      f"label_{next(iter(padded.values()))} -> label_{next(iter(padded))}" if padded else
                      "each image_<id>.nii.gz needs a label_<id>.nii.gz"),
            )
        if not ids:
            raise DataError(
                f"nifti_folder: no image_<id>.nii.gz files in {self.folder}",
                hint="expected image_<id>.nii.gz and label_<id>.nii.gz files",
            )
        orphans = [i for i in labels if i not in images]
        if orphans:
            one = len(orphans) == 1
            warnings.warn(
                f"nifti_folder: {', '.join(labels[i][0] for i in numeric_sort(orphans))} in {self.folder} "
                f"{'has' if one else 'have'} no image_<id> file and {'is' if one else 'are'} left out (a misnamed "
                "image?)", DataWarning, stacklevel=3,
            )
        if isinstance(self.modality_option, dict):
            unassigned = [i for i in ids if i not in self.modality_option]
            if unassigned:
                raise ConfigError(
                    f"{self.config_key}.modality names no modality for scans {unassigned[:5]}",
                    hint="give every scan id a modality, or use modality=auto",
                )
        return numeric_sort(ids)

    def _read(self, stem: str, dtype) -> NiftiVolume:
        return load_nifti(nifti_path(self.folder, stem), dtype, self.orientation)

    def _read_onto(self, path: Path, image: NiftiVolume) -> NiftiVolume:
        """A label or supervoxel file in the image's axis order. Read ``as_stored``, a label
        stored in another orientation (the same voxels, axes permuted or flipped) is turned
        onto the image's stored axes, as the canonical reading turns both; a header without
        orientation cannot be turned and is read as stored."""
        other = load_nifti(path, np.int32, self.orientation)
        if (self.orientation == AS_STORED and image.has_orientation and other.has_orientation
                and other.source_axcodes != image.source_axcodes):
            return load_nifti(path, np.int32, "".join(image.source_axcodes))
        return other

    def _load(self, case_id: str, with_supervoxels: bool) -> Volume:
        image = self._read(f"image_{case_id}", np.float32)
        label = self._read_onto(nifti_path(self.folder, f"label_{case_id}"), image)
        self._check_same_grid(case_id, image, label, "label")
        low, high = float(image.array.min()), float(image.array.max())
        if low == high:
            name = nifti_path(self.folder, f"image_{case_id}").name
            raise DataError(
                f"nifti_folder: case {case_id}: {name} is constant (every voxel {low:g}): there is nothing to segment",
                hint="replace or remove this scan (an empty export?)",
            )
        supervoxels = None
        if with_supervoxels:
            supervoxels = self._read_supervoxels(case_id, image)
        self.geometry[case_id] = CaseGeometry(
            nifti_path(self.folder, f"image_{case_id}"), image.source_axcodes, image.has_orientation,
            image.transform, image.source_affine, image.source_shape, image.file_shape, image.obliquity,
        )
        self._digests[case_id] = slice_digests(image.array)
        self._warn_about_geometry(case_id, image)
        self._warn_about_labels(case_id, label.array)
        modality, pixels = self._intensities(case_id, image.array)
        return Volume(case_id, pixels, label.array, supervoxels, image.spacing, image.affine, modality)

    @property
    def leave_one_out(self) -> bool:
        """``folds=loo``: every fold's support is the same scan, whatever ``protocol.supp_idx``."""
        return self._folds == "loo"

    @property
    def supervoxel_folder(self) -> Path | None:
        """Where the pseudo-labels are read from (None: none configured): ``auto``'s folder,
        or the one given (relative: beside the scans' folder)."""
        if _missing(self.supervoxel_dir):
            return None
        if str(self.supervoxel_dir) == "auto":
            if _missing(self.supervoxels_out):
                return self.folder / f"supervoxels_{self.n_supervoxels}"
            given = Path(str(self.supervoxels_out)).expanduser()
        else:
            given = Path(str(self.supervoxel_dir)).expanduser()
        return given if given.is_absolute() else self.folder.parent / given

    def supervoxel_provenance(self, case_id: str) -> str:
        """What ``supervoxels: auto`` makes scan ``case_id``'s pseudo-labels from, as the short
        digest written into each file's header (``descrip``): the recipe and its size, the
        orientation and intensity recipe the scan is read with, and the image file's bytes."""
        option = self.modality_option
        made_from = {"recipe": "felzenszwalb3d", "n_supervoxels": self.n_supervoxels, "orientation": self.orientation,
                     "modality": option[case_id] if isinstance(option, dict) else option,
                     "image_sha256": file_sha256(nifti_path(self.folder, f"image_{case_id}"))}
        return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:16]

    def supervoxel_state(self, case_id: str, provenance: str | None = None) -> str:
        """With ``supervoxels: auto``, where scan ``case_id``'s pseudo-labels stand: ``missing``,
        ``current`` (made from this scan with these settings), ``stale`` (made otherwise: a run
        makes them again) or ``foreign`` (not made by ``auto``: a run refuses the folder).
        ``provenance``: :meth:`supervoxel_provenance`, where the caller has it already."""
        folder = self.supervoxel_folder
        mark = _made_from(_supervoxel_path(folder, case_id)) if folder is not None else None
        if mark is None:
            return "missing"
        if mark == "":
            return "foreign"
        return "current" if mark == (provenance or self.supervoxel_provenance(case_id)) else "stale"

    def ensure_supervoxels(self) -> dict | None:
        """With ``supervoxels: auto``, make the pseudo-labels that are missing, or that were made
        from another scan file or with other settings (each file's header names what it was
        made from: :meth:`supervoxel_provenance`); see the module's docstring. Announced on
        stderr, with a progress bar. Scans are segmented in threads, as many at once as the
        cores and the free memory allow; a Ctrl-C keeps the files already made.

        Returns:
            what was generated (folder, cases, recipe, size, time) for the run record; None
            when nothing was to be made or the folder is not ``auto``'s.
        Raises:
            DataError: the folder cannot be written (with where to write instead), or holds
                files that ``auto`` did not make (it never overwrites those).
        """
        folder = self.supervoxel_folder
        if str(self.supervoxel_dir) != "auto" or folder is None:
            return None
        key = self.config_key
        ids = self.case_ids()
        made_from = {c: self.supervoxel_provenance(c) for c in ids}
        states = {c: self.supervoxel_state(c, made_from[c]) for c in ids}
        foreign = [c for c in ids if states[c] == "foreign"]
        if foreign:
            raise DataError(
                f"nifti_folder: {folder} holds supervoxels that supervoxels=auto did not make (scans {foreign[:5]}); "
                "it never overwrites them",
                hint=f"read them as they are with {key}.supervoxels={folder}, or move them away to have them made, "
                f"or let auto write elsewhere: {key}.supervoxels_out=<a folder>",
            )
        todo = [c for c in ids if states[c] != "current"]
        if not todo:
            return None
        stale = [c for c in todo if states[c] == "stale"]
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # named below with what to do
        if not folder.is_dir() or not can_write_in(folder):
            raise DataError(
                f"nifti_folder: {len(todo)} scans lack supervoxels and {folder} cannot be written",
                hint=f"let them be written elsewhere: {key}.supervoxels_out=<a writable folder> (relative: beside "
                f"{self.folder})",
            )
        print(f"nifti_folder: {len(todo) - len(stale)} of {len(ids)} scans have no supervoxels in {folder}"
              + (f", and {len(stale)} were made from another scan file or with other settings (scans {stale[:5]})"
                 if stale else "")
              + f"; making them now (ADNet 3-D Felzenszwalb, n_sv={self.n_supervoxels}; this takes a while per "
              "scan, and the new pseudo-labels become part of the run's identity)", file=sys.stderr, flush=True)
        from fsmis_bench.preparation.supervoxels import (  # late: SimpleITK, scikit-image
            segmentation_workers, supervoxels_3d,
        )

        began = time.time()
        volumes = {c: self.load(c) for c in todo}
        largest = max(v.image.size for v in volumes.values())
        workers = segmentation_workers(os.cpu_count() or 1, len(todo), largest, "nifti_folder")
        bar = tqdm(total=len(todo), desc="supervoxels", unit="scan", file=sys.stderr,
                   disable=os.environ.get("FSMIS_NO_PROGRESS") == "1")
        written: list[str] = []
        few: dict[str, int] = {}  # scans whose pseudo-labels hardly divide the body

        def write(case_id: str, segments: np.ndarray) -> None:
            count = int(np.count_nonzero(np.unique(segments)))
            if count < FEW_SUPERVOXELS:
                few[case_id] = count
            image = self.source_nifti(case_id, segments.astype(np.int32))
            image.header["descrip"] = f"{_PROVENANCE_MARK}{made_from[case_id]}".encode()
            _save_nifti(image, _supervoxel_path(folder, case_id))
            written.append(case_id)
            bar.update()

        # The segmentation (numba, without the GIL) runs in threads; the scans are written
        # here, one whole file after another.
        pool = ThreadPoolExecutor(max_workers=workers)
        pending = {pool.submit(supervoxels_3d, volumes[c].image, volumes[c].spacing, self.n_supervoxels): c
                   for c in todo}
        try:
            for done in as_completed(pending):
                write(pending[done], done.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the scans in progress end (a thread cannot be stopped)
            for future, case_id in pending.items():
                if case_id not in written and future.done() and not future.cancelled() and future.exception() is None:
                    write(case_id, future.result())
            bar.close()
            print(f"nifti_folder: stopped with {len(written)} of {len(todo)} scans' supervoxels made; the next run "
                  "makes the rest", file=sys.stderr, flush=True)
            raise
        finally:
            pool.shutdown(wait=True)
        bar.close()
        if few:
            smallest = min(int(volumes[c].image.size) for c in few)
            warnings.warn(
                f"{self.name}: supervoxels=auto made fewer than {FEW_SUPERVOXELS} supervoxels in scan"
                f"{'s' if len(few) > 1 else ''} {', '.join(f'{c} ({few[c]})' for c in todo if c in few)}: each holds "
                f"{self.n_supervoxels} voxels at least ({self.config_key}.n_supervoxels), a large share of scans of "
                f"{smallest} voxels, so self-supervised training has almost nothing to tell apart; lower it "
                f"(e.g. {self.config_key}.n_supervoxels={max(1, smallest // 50)}) or train on the labels "
                "(protocol.train_labels=gt)",
                DataWarning, 2,
            )
        return {"folder": str(folder), "cases": todo, "remade": stale, "recipe": "felzenszwalb3d",
                "n_supervoxels": self.n_supervoxels, "seconds": round(time.time() - began, 1)}

    def _read_supervoxels(self, case_id: str, image: NiftiVolume) -> np.ndarray:
        key = self.config_key
        folder = self.supervoxel_folder
        if folder is None:
            raise DataError(
                "nifti_folder has no supervoxels configured: self-supervised training on it "
                "(protocol.train_labels=supervoxels) needs pseudo-labels",
                hint=f"add {key}.supervoxels=auto to make them (ADNet's recipe, written beside the scans), "
                f"or give {key}.supervoxels=<folder of superpix-MIDDLE_<id>.nii.gz, each on its image's grid>, "
                "or train on its labels with protocol.train_labels=gt",
            )
        path = _supervoxel_path(folder, case_id)
        if not path.exists():
            raise DataError(f"nifti_folder: case {case_id} has no supervoxels: {path} is missing",
                            hint=f"add the file, or let {key}.supervoxels=auto make the scans' pseudo-labels "
                            f"(in {self.folder}/supervoxels_<n>, or in {key}.supervoxels_out)")
        try:
            supervoxels = self._read_onto(path, image)
        except DataError as error:
            # the reader's advice for a damaged file names `fsmis-bench prepare`, which makes
            # no supervoxels: say what makes this one again
            if path.is_file() and error.message.startswith("cannot read"):
                error.hint = (
                    f"delete {path}: the next run with {key}.supervoxels=auto makes it again"
                    if str(self.supervoxel_dir) == "auto" else
                    f"restore {path.name} (a given folder is read, never written), or let {key}.supervoxels=auto "
                    "make the scans' pseudo-labels instead"
                )
            raise
        self._check_same_grid(case_id, image, supervoxels, "supervoxels")
        return supervoxels.array

    def _check_same_grid(self, case_id: str, image: NiftiVolume, other: NiftiVolume, what: str) -> None:
        """Refuse a label (or supervoxel) file that does not cover the image voxel for voxel.

        The grids must have one shape and no voxel centre more than :data:`GRID_VOXELS`
        image voxels away from the image's (:func:`_grid_offset`); a file whose header
        names no orientation while the other's does is named as such (its grid is a guess).
        """
        if other.array.shape == image.array.shape and _grid_offset(image, other) <= GRID_VOXELS:
            return
        if image.has_orientation != other.has_orientation:
            missing, has = (what, "image") if image.has_orientation else ("image", what)
            raise DataError(
                f"nifti_folder: case {case_id}: the {missing} header names no orientation (qform and sform codes 0), "
                f"the {has}'s does, so their grids cannot be matched ({_grid_difference(image, other, what)})",
                hint=f"write the {missing} again with the {has}'s affine and header (e.g. nibabel: "
                f"nib.Nifti1Image(data, reference.affine, reference.header)); "
                f"check it with `fsmis-bench check-data nifti_folder --path {self.folder}`",
            )
        raise DataError(
            f"nifti_folder: case {case_id}: the {what} grid ({other.array.shape}, "
            f"{''.join(other.source_axcodes)}) does not match the image ({image.array.shape}, "
            f"{''.join(image.source_axcodes)}): {_grid_difference(image, other, what)}",
            hint=f"the {what} file must cover the image voxel for voxel (same size and affine, within "
            f"{GRID_VOXELS:g} voxel); check it with `fsmis-bench check-data nifti_folder --path {self.folder}`",
        )

    def _warn_about_geometry(self, case_id: str, image: NiftiVolume) -> None:
        where = f"nifti_folder scan {case_id}"
        if not image.has_orientation and self.orientation != "as_stored":
            warnings.warn(
                f"{where}: the header names no orientation (qform and sform codes 0), so it is read as "
                f"{''.join(image.source_axcodes)} and may be laid out wrongly", DataWarning, stacklevel=3,
            )
        dz, dy, dx = image.spacing
        if min(image.spacing) < 0.1 or max(image.spacing) > 50.0:
            warnings.warn(
                f"{where}: voxel sizes {dz:g} x {dy:g} x {dx:g} mm are implausible for a clinical scan "
                "(header units other than mm?)", DataWarning, stacklevel=3,
            )
        if max(dy, dx) > 2.0 * dz:
            advice = (
                f"its slices do not lie along the file's last axis: use orientation={CANONICAL_ORIENTATION}"
                if self.orientation == "as_stored" else
                "if its slices lie along the file's last axis (e.g. an oblique stack) use orientation=as_stored"
            )
            warnings.warn(
                f"{where}: read {self.orientation}, its thick axis ({max(dy, dx):g} mm) lies in-plane and the "
                f"slices ({dz:g} mm apart) cut across its acquisition planes; {advice}", DataWarning, stacklevel=3,
            )
        else:
            _, height, width = image.array.shape
            aspect = (height * dy) / (width * dx)
            if max(aspect, 1 / aspect) > FIELD_ASPECT:
                pixels = (f"pixels of {dy:g} x {dx:g} mm far from square" if max(dy, dx) > _ANISOTROPY * min(dy, dx)
                          else f"{width} x {height} pixels of {dx:g} x {dy:g} mm")
                warnings.warn(
                    f"{where}: its slices cover {width * dx:.0f} x {height * dy:.0f} mm ({pixels}); slices are resized "
                    f"to a square grid, so organs appear {'narrower' if aspect < 1 else 'wider'} by a factor "
                    f"{max(aspect, 1 / aspect):.2f} than they are (crop or pad the scans to a square field of view)",
                    DataWarning, stacklevel=3,
                )
        if self.orientation != AS_STORED and image.obliquity > OBLIQUE_DEGREES:
            warnings.warn(
                f"{where}: stored oblique, its voxel axes up to {image.obliquity:.0f} degrees off the patient's axes: "
                f"read {self.orientation}, each goes to the nearest patient axis, so the anatomy is seen turned by up "
                f"to {image.obliquity:.0f} degrees (near 45, a small change of angle turns it 90); resample it to an "
                "axial grid, or use orientation=as_stored if every scan is stored alike", DataWarning, stacklevel=3,
            )

    def _warn_about_labels(self, case_id: str, label: np.ndarray) -> None:
        """Label values outside the map, and test organs the scan does not show."""
        where = f"nifti_folder scan {case_id}"
        values = {int(v) for v in np.unique(label) if v != 0}
        self._label_values[case_id] = values
        other = sorted(values - set(self.label_map.values()))
        if other:
            warnings.warn(
                f"{where}: label values {other} are not in the label map (which gives "
                f"{', '.join(map(str, sorted(self.label_map.values())))}): read as background",
                DataWarning, stacklevel=4,
            )
        absent = [o for o in self.test_organs if self.label_map[o] not in values]
        if absent:
            warnings.warn(
                f"{where}: shows no {', '.join(absent)} (label value{'s' if len(absent) > 1 else ''} "
                f"{', '.join(str(self.label_map[o]) for o in absent)}): skipped as a query for "
                f"{'that organ' if len(absent) == 1 else 'those organs'}, and unusable as "
                f"{'its' if len(absent) == 1 else 'their'} support", DataWarning, stacklevel=4,
            )

    def pair_warnings(self, first: str, second: str) -> list[str]:
        """Sentences about scans ``first`` and ``second`` as a support/query pair: their
        voxel axes, as read, lie far apart (one is seen turned or mirrored against the other).

        Read ``as_stored``, two files stored in different orientations (LAS and RAS) show
        the patient mirrored; reoriented, two oblique scans near 45 degrees can get different
        nearest axes and show the patient turned 90 degrees. The advice names the other
        reading when it would bring the two together.
        """
        for case_id in (first, second):
            if case_id not in self.geometry:  # read once: a released scan is not read again
                self.load(case_id)
        a, b = self.geometry[first], self.geometry[second]
        angle = axis_rotation(_read_affine(a, self.orientation), _read_affine(b, self.orientation))
        if angle <= PAIR_DEGREES:
            return []
        alternative = CANONICAL_ORIENTATION if self.orientation == AS_STORED else AS_STORED
        other = axis_rotation(_read_affine(a, alternative), _read_affine(b, alternative))
        stored = f"stored {''.join(a.source_axcodes)} and {''.join(b.source_axcodes)}"
        if a.obliquity > OBLIQUE_DEGREES or b.obliquity > OBLIQUE_DEGREES:
            stored += f", {a.obliquity:.0f} and {b.obliquity:.0f} degrees oblique"
        advice = (f"orientation={alternative} brings them together ({other:.0f} degrees apart)"
                  if other <= PAIR_DEGREES else "resample the scans to one orientation")
        seen = "mirrored" if angle > 135 else "turned"
        return [
            f"lie {angle:.0f} degrees apart as read ({self.orientation}; {stored}): the query is seen {seen} against "
            f"the support, which lowers its Dice; {advice}"
        ]

    def recipe_of(self, case_id: str) -> str:
        """The intensity recipe scan ``case_id`` gets: ``ct``, ``mri`` or ``none`` (as stored)."""
        option = self.modality_option
        option = option[case_id] if isinstance(option, dict) else option
        return self.load(case_id).modality if option == "auto" else option

    def _intensities(self, case_id: str, pixels: np.ndarray) -> tuple[str, np.ndarray]:
        """The scan's modality and its pixels after its intensity recipe.

        Warnings here read ``nifti_folder scan <id>: <what>`` with nothing scan-specific in
        ``<what>``, so the CLI prints one line for every scan they hold for.
        """
        option = self.modality_option
        guessed = guess_modality(pixels)
        if isinstance(option, dict):
            option = option[case_id]
        if option == "auto":
            modality = guessed
        elif option in ("ct", "mri"):
            modality = option
            mismatch = modality_mismatch(option, pixels, guessed)
            if mismatch:
                warnings.warn(f"nifti_folder scan {case_id}: {mismatch}", DataWarning, stacklevel=3)
        else:
            if guessed == "ct":
                warnings.warn(
                    f"nifti_folder scan {case_id}: holds Hounsfield units (air near -1000 around soft tissue in "
                    f"-200..300) but {self.config_key}.modality=none passes them on as stored; set "
                    f"{self.config_key}.modality=ct or auto to apply the benchmark's CT window",
                    DataWarning, stacklevel=3,
                )
            return guessed, pixels
        from fsmis_bench.preparation.common import INTENSITY_RECIPES

        prepared = INTENSITY_RECIPES[modality](pixels).astype(np.float32)
        self._check_prepared(case_id, option, modality, prepared)
        return modality, prepared

    def _check_prepared(self, case_id: str, option: str, modality: str, prepared: np.ndarray) -> None:
        """Refuse a scan its intensity recipe leaves constant or mostly saturated: the model
        would see no anatomy (an MRI shifted below -125 and named ct is all 0), and its Dice
        would measure the recipe, not the method."""
        low, high = float(prepared.min()), float(prepared.max())
        problem = None
        if low == high:
            problem = f"constant (every voxel {low:g})"
        elif modality == "ct":
            top = np.count_nonzero(prepared >= 255.0) / prepared.size
            inside = np.count_nonzero((prepared > 0.0) & (prepared < 255.0)) / prepared.size
            if top > SATURATED_SHARE:
                problem = f"mostly saturated ({100 * top:.0f} % of its voxels above 275 HU, all shown as 255)"
            elif inside < INSIDE_WINDOW_SHARE:
                problem = f"mostly saturated (only {100 * inside:.2f} % of its voxels inside [-125, 275] HU)"
        if problem is None:
            return
        key = self.config_key
        how = "auto picked ct" if option == "auto" else f"{key}.modality={option}"
        name = nifti_path(self.folder, f"image_{case_id}").name
        raise DataError(
            f"nifti_folder: case {case_id}: {name} is {problem} after the {modality} intensity recipe ({how}): "
            "there is nothing left to segment",
            hint=f"name the modality its values have: {key}.modality=none (as stored), ct (Hounsfield units) or mri, "
            f"for this scan alone {key}.modality={{{case_id}:none,<id>:...}}; a CT stored without its rescale needs "
            "its scl_slope/scl_inter back first",
        )

    # -- what the harness asks besides volumes ---------------------------------------------
    def slice_digests(self, case_id: str) -> dict[bytes, int]:
        """Digests of the scan's non-constant slices as stored (before any intensity recipe)."""
        if case_id not in self._digests:
            self.load(case_id)
        return self._digests[case_id]

    def source_nifti(self, case_id: str, array: np.ndarray):
        """``(Z, H, W)`` array on this dataset's grid -> NIfTI in the scan file's grid and orientation."""
        import nibabel as nib

        volume = self.load(case_id)
        if tuple(array.shape) != volume.image.shape:
            raise DataError(f"nifti_folder: case {case_id} is {volume.image.shape}, got a mask of {array.shape}")
        geometry = self.geometry[case_id]
        data = to_source_array(array, geometry.transform)
        if len(geometry.file_shape) > 3 and data.shape == geometry.file_shape[:3]:
            data = data.reshape(geometry.file_shape)  # a 4-D (5-D) file with axes of length 1 after the third
        header = nib.load(str(geometry.image_path)).header
        image = nib.Nifti1Image(data, geometry.source_affine)
        image.set_qform(header.get_qform(), code=int(header["qform_code"]))
        image.set_sform(header.get_sform(), code=int(header["sform_code"]))
        # the scan's units: a header in metres read as millimetres would put the mask 1000x
        # too small in a viewer that honours them (ITK)
        image.header.set_xyzt_units(*header.get_xyzt_units())
        return image

    def identity(self, *, with_supervoxels: bool) -> dict:
        """Folder, label map, orientation policy, intensity recipe, folds, and a digest of the files."""
        ids = self.case_ids()
        files = [nifti_path(self.folder, f"{kind}_{i}") for i in ids for kind in ("image", "label")]
        identity = {
            "name": self.name,
            "path": str(self.folder.resolve()),
            "label_map": dict(self.label_map),
            "test_organs": list(self.test_organs),
            "orientation": self.orientation,
            "modality": self.modality_option,
            "intensity_recipe": {"ct": "HU clipped to [-125, 275], rescaled to 0..255",
                                 "mri": "clipped above the 99.5th percentile", "none": "as stored"},
            "folds": [[ids[i] for i in fold] for fold in self.folds],
            "support": self.support,
            "files_sha256": _digest_files(files),
            "with_supervoxels": bool(with_supervoxels),
        }
        sv_dir = self.supervoxel_folder
        if with_supervoxels and sv_dir is not None:
            identity["supervoxels"] = str(sv_dir.resolve())
            identity["supervoxels_sha256"] = _digest_files([_supervoxel_path(sv_dir, i) for i in ids])
        return identity


def _override_text(value) -> str:
    """``value`` as the command line writes it: ``[[0,1],[2,3]]``, not ``[[0, 1], [2, 3]]``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_text(v) for v in value) + "]"
    return str(value)


def _check_folds(value, key: str, *, by_id: bool):
    """The ``folds`` (``by_id``: ``fold_ids``) option as given, refused unless it is one of
    the forms the fold split reads: nothing (``null``, the default split), ``loo`` or ``all``
    (``folds`` only), or a list of folds, each a list of scan positions (``folds``: whole
    numbers, in id order) or scan ids (``fold_ids``).

    A flat ``[0,1,2]`` or a count ``3`` would otherwise stop the run (or check-data) deep
    inside the fold split with a Python error, after the folder was read.

    Raises:
        ConfigError: another form, with the list of lists to write instead.
    """
    option = f"{key}.{'fold_ids' if by_id else 'folds'}"
    if value is None or value in ("", "???") or (isinstance(value, (list, tuple)) and not value):
        return value
    what = "scan ids" if by_id else "scan positions (0, 1, ... in id order)"
    example = "[[1,2,3],[3,4,5]]" if by_id else "[[0,1,2],[3,4,5]]"
    forms = f"{option} takes a list of folds, each a list of {what}, e.g. {option}={example}"
    if isinstance(value, str):
        if not by_id and value in ("loo", "all"):
            return value
        raise ConfigError(
            f"{option}={value!r} is unknown" + ("" if by_id else ": it is loo, all, or a list of folds"),
            hint=f"{forms}" + (f"; for leave-one-out use {key}.folds=loo" if by_id else
                               "; loo makes one fold per query scan, all one fold of every scan"),
        )
    if not isinstance(value, (list, tuple)):
        raise ConfigError(
            f"{option}={_override_text(value)} is not a list of folds",
            hint=f"{forms}" + ("" if by_id else f"; or {key}.folds=loo, all, or null (the default split)"),
        )
    flat = [entry for entry in value if not isinstance(entry, (list, tuple))]
    if flat:
        one_fold = len(flat) == len(value) and all(isinstance(e, (str, int)) and not isinstance(e, bool) for e in value)
        raise ConfigError(
            f"{option}={_override_text(value)} is not a list of folds: each fold is a list of its own "
            f"({flat[0]!r} is not)",
            hint=f"{forms}" + (f"; one fold of these scans is {option}=[{_override_text(value)}]" if one_fold else ""),
        )
    for number, fold in enumerate(value):
        if not fold:
            raise ConfigError(f"{option}: fold {number} is empty", hint=f"{forms}; leave the empty one out")
        for entry in fold:
            if by_id:
                bad = isinstance(entry, bool) or not isinstance(entry, (str, int, float))
            else:
                bad = isinstance(entry, bool) or not (isinstance(entry, int)
                                                      or (isinstance(entry, str) and entry.strip().isdigit()))
            if bad:
                raise ConfigError(
                    f"{option}: fold {number} holds {_override_text(entry)}, not a "
                    + ("scan id" if by_id else "scan position (a whole number from 0, in id order)"),
                    hint=forms + ("" if by_id else f"; to name scans by their ids use {key}.fold_ids instead"),
                )
    return value


def _read_affine(geometry: CaseGeometry, orientation: str) -> np.ndarray:
    """The ``(4, 4)`` affine of a scan's voxel axes once read in ``orientation``."""
    from nibabel import orientations as ornt

    if orientation == AS_STORED:
        return geometry.source_affine
    transform = ornt.ornt_transform(ornt.io_orientation(geometry.source_affine), ornt.axcodes2ornt(orientation))
    return geometry.source_affine @ ornt.inv_ornt_aff(transform, geometry.source_shape)


def _present(path: Path) -> bool:
    """A file, folder or link (even a broken one) at ``path``."""
    return path.exists() or path.is_symlink()


def _same_number(first: str, second: str) -> bool:
    """``01`` and ``1``: two spellings of one number."""
    return first != second and first.isdigit() and second.isdigit() and int(first) == int(second)


def _grid_offset(image: NiftiVolume, other: NiftiVolume) -> float:
    """Largest distance, in image voxels along the image's axes, between a voxel centre of
    ``other``'s grid and the same voxel of ``image``'s (same shape), over the 8 corners.

    Affines are linear in the voxel index, so the corners bound every voxel: a shift of the
    origin, another voxel size and a rotation all count by how far they move a voxel.
    """
    shape = np.asarray(image.array.shape, dtype=np.float64) - 1
    corners = np.array([[*(shape * bits), 1.0] for bits in itertools.product((0, 1), repeat=3)]).T
    moved = (np.asarray(other.affine, dtype=np.float64) - np.asarray(image.affine, dtype=np.float64)) @ corners
    voxels = np.linalg.solve(np.asarray(image.affine, dtype=np.float64)[:3, :3], moved[:3])
    return float(np.abs(voxels).max())


def _grid_difference(image: NiftiVolume, other: NiftiVolume, what: str) -> str:
    """How two grids differ, in words (sizes, voxel sizes, axes, origin)."""
    def size(volume: NiftiVolume) -> str:
        return f"{'x'.join(map(str, volume.array.shape))} voxels of {' x '.join(f'{s:g}' for s in volume.spacing)} mm"

    if other.array.shape != image.array.shape:
        return f"the {what} has {size(other)}, the image {size(image)} (z, y, x)"
    parts = []
    if not np.allclose(other.spacing, image.spacing, rtol=1e-3):
        parts.append(f"voxel sizes {' x '.join(f'{s:g}' for s in other.spacing)} mm vs "
                     f"{' x '.join(f'{s:g}' for s in image.spacing)} mm (z, y, x)")
    angle = axis_rotation(other.affine, image.affine)
    if angle > 0.01:
        parts.append(f"axes {angle:.2f} degrees apart")
    shift = other.affine[:3, 3] - image.affine[:3, 3]
    if np.abs(shift).max() > 1e-4:
        voxels = np.linalg.lstsq(image.affine[:3, :3], shift, rcond=None)[0]  # (z, y, x) voxels
        parts.append(f"origin shifted by ({', '.join(f'{v:+.2f}' for v in shift)}) mm, "
                     f"({', '.join(f'{v:+.2f}' for v in voxels)}) voxels (z, y, x)")
    return "same size, but " + "; ".join(parts or [f"voxels up to {_grid_offset(image, other):.2f} voxels apart"])


def _digest_files(paths: list[Path]) -> str:
    """SHA-256 over the names and contents of ``paths`` (missing files count as empty)."""
    total = hashlib.sha256()
    for path in paths:
        total.update(path.name.encode())
        if path.is_file():
            one = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    one.update(block)
            total.update(one.digest())
    return total.hexdigest()


def _supervoxel_path(folder: Path, case_id: str) -> Path:
    from fsmis_bench.preparation.supervoxels import SUPERVOXEL_PREFIX  # late: SimpleITK, scikit-image

    return nifti_path(folder, f"{SUPERVOXEL_PREFIX}{case_id}")


#: the start of the ``descrip`` header field of a file ``supervoxels: auto`` made
_PROVENANCE_MARK = "fsmis-bench supervoxels=auto "


def _made_from(path: Path) -> str | None:
    """The provenance digest in a supervoxel file's header: None without a file, "" for a
    file that ``supervoxels: auto`` did not make."""
    if not path.exists():
        return None
    import nibabel as nib

    try:
        descrip = nib.load(str(path)).header["descrip"].item().decode(errors="replace")
    except Exception:  # noqa: BLE001 - an unreadable file is not one auto made; reading it later names it
        return ""
    return descrip[len(_PROVENANCE_MARK):].strip() if descrip.startswith(_PROVENANCE_MARK) else ""


def _save_nifti(image, path: Path) -> None:
    """Write through a temporary file and a rename: a stopped generation leaves no half file."""
    import nibabel as nib

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        nib.save(image, str(tmp))
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
