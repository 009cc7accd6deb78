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
      folds: null                      # null | [[positions], ...] | loo
      fold_ids: null                   # [[scan ids], ...]: folds by id instead of position
      support: null                    # a scan id: the support of every fold
      supervoxels: null                # sibling folder of superpix-MIDDLE_<id>.nii.gz

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
fewer scans form a single fold (a test set for a model trained elsewhere). ``folds`` lists
positions into the id-sorted scans, ``fold_ids`` lists scan ids; either way a fold is a set,
taken in id order like the built-in folds (PROTOCOL.md §2), so ``protocol.supp_idx`` counts
in that order. ``folds: loo`` makes one fold per query scan: ``{support, query}``, with
``support`` (default: the first scan) the support of every fold whatever its position, and
training (in-domain) on all other scans.

The path may be absolute, relative to the working directory, or relative to ``data_root``.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fsmis_bench.data.base import ORGANS, Volume, VolumeDataset
from fsmis_bench.data.consistency import guess_modality, slice_digests
from fsmis_bench.data.nifti import (
    CANONICAL_ORIENTATION, NiftiVolume, check_orientation, load_nifti, nifti_path, numeric_sort, to_source_array,
)
from fsmis_bench.data.options import read_label_map
from fsmis_bench.errors import ConfigError, DataError, DataWarning
from fsmis_bench.protocol.folds import folds_for

MODALITIES = ("none", "ct", "mri", "auto")
_IMAGE_NAME = re.compile(r"image_(.+?)\.nii(\.gz)?")
#: in-plane pixels more anisotropic than this are distorted by the square resize of slices
_ANISOTROPY = 1.5


@dataclass
class CaseGeometry:
    """How one scan's file maps to the volume the harness sees."""

    image_path: Path
    source_axcodes: tuple[str, str, str]
    has_orientation: bool
    transform: np.ndarray
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]


def _missing(value) -> bool:
    return value in (None, "", "???")


class NiftiFolder(VolumeDataset):
    """``image_<id>.nii[.gz]`` / ``label_<id>.nii[.gz]`` pairs in one folder."""

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
        folder = Path(str(path)).expanduser()
        if not folder.is_absolute():
            folder = self.root / folder if self.root is not None and not folder.resolve().is_dir() else folder.resolve()
        self.folder = folder
        label_map = read_label_map(options.get("label_map"))
        if not label_map:
            raise ConfigError(
                f"nifti_folder needs {key}.label_map",
                hint=f"e.g. '{key}.label_map={{liver:1,spleen:2}}', or {key}.label_map=<a YAML/JSON file>",
            )
        unknown = [o for o in label_map if o not in ORGANS]
        if unknown:
            raise ConfigError(
                f"{key}.label_map names organs outside the vocabulary: {unknown}",
                hint=f"use names from: {', '.join(ORGANS)}",
            )
        self.label_map = label_map
        self.test_organs = tuple(options.get("test_organs") or self.label_map)
        missing_organs = [o for o in self.test_organs if o not in self.label_map]
        if missing_organs:
            raise ConfigError(f"{key}.test_organs {missing_organs} are not in the label map {self.label_map}")
        self.setting2_groups = tuple(tuple(g) for g in (options.get("setting2_groups") or ()))
        self.orientation = check_orientation(options.get("orientation") or CANONICAL_ORIENTATION)
        self.modality_option = self._check_modality(options.get("modality"))
        self._folds = options.get("folds")
        self._fold_ids = options.get("fold_ids")
        if self._folds and self._fold_ids:
            raise ConfigError(f"give {key}.folds (positions) or {key}.fold_ids (scan ids), not both")
        if isinstance(self._folds, str) and self._folds != "loo":
            raise ConfigError(f"{key}.folds={self._folds!r} is unknown", hint="use loo, or lists of positions")
        self.support = None if _missing(options.get("support")) else str(options["support"])
        self.supervoxel_dir = options.get("supervoxels")
        self.geometry: dict[str, CaseGeometry] = {}
        self._digests: dict[str, dict[bytes, int]] = {}

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

    # -- files ----------------------------------------------------------------------------
    def _case_ids(self) -> list[str]:
        if not self.folder.is_dir():
            raise DataError(
                f"nifti_folder: {self.folder} does not exist",
                hint=f"{self.config_key}.path must be a folder of image_<id>.nii.gz and label_<id>.nii.gz files",
            )
        ids = [m.group(1) for p in self.folder.iterdir() if (m := _IMAGE_NAME.fullmatch(p.name))]
        missing = [i for i in ids if not nifti_path(self.folder, f"label_{i}").exists()]
        if missing:
            raise DataError(
                f"nifti_folder: images without labels in {self.folder}: {missing[:5]}",
                hint="each image_<id>.nii.gz needs a label_<id>.nii.gz",
            )
        if not ids:
            raise DataError(
                f"nifti_folder: no image_<id>.nii.gz files in {self.folder}",
                hint="expected image_<id>.nii.gz and label_<id>.nii.gz files",
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

    def _load(self, case_id: str, with_supervoxels: bool) -> Volume:
        image = self._read(f"image_{case_id}", np.float32)
        label = self._read(f"label_{case_id}", np.int32)
        self._check_same_grid(case_id, image, label, "label")
        supervoxels = None
        if with_supervoxels:
            supervoxels = self._read_supervoxels(case_id, image)
        self.geometry[case_id] = CaseGeometry(
            nifti_path(self.folder, f"image_{case_id}"), image.source_axcodes, image.has_orientation,
            image.transform, image.source_affine, image.source_shape,
        )
        self._digests[case_id] = slice_digests(image.array)
        self._warn_about_geometry(case_id, image)
        modality, pixels = self._intensities(case_id, image.array)
        return Volume(case_id, pixels, label.array, supervoxels, image.spacing, image.affine, modality)

    def _read_supervoxels(self, case_id: str, image: NiftiVolume) -> np.ndarray:
        if not self.supervoxel_dir:
            raise DataError(
                "nifti_folder has no supervoxels configured",
                hint=f"set {self.config_key}.supervoxels=<folder>, or use protocol.train_labels=gt",
            )
        sv_dir = Path(str(self.supervoxel_dir)).expanduser()
        if not sv_dir.is_absolute():
            sv_dir = self.folder.parent / sv_dir
        supervoxels = load_nifti(nifti_path(sv_dir, f"superpix-MIDDLE_{case_id}"), np.int32, self.orientation)
        self._check_same_grid(case_id, image, supervoxels, "supervoxels")
        return supervoxels.array

    def _check_same_grid(self, case_id: str, image: NiftiVolume, other: NiftiVolume, what: str) -> None:
        tolerance = 1e-3 * max(1.0, float(np.abs(image.affine[:3, 3]).max()))
        if other.array.shape != image.array.shape or not np.allclose(other.affine, image.affine, atol=tolerance):
            raise DataError(
                f"nifti_folder: case {case_id}: the {what} grid ({other.array.shape}, "
                f"{''.join(other.source_axcodes)}) does not match the image ({image.array.shape}, "
                f"{''.join(image.source_axcodes)})",
                hint=f"the {what} file must cover the image voxel for voxel (same size and affine); "
                f"check it with `fsmis-bench check-data nifti_folder --path {self.folder}`",
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
        elif max(dy, dx) > _ANISOTROPY * min(dy, dx):
            warnings.warn(
                f"{where}: pixels of {dy:g} x {dx:g} mm are far from square; slices are resized to a square "
                "grid, so organs appear stretched", DataWarning, stacklevel=3,
            )

    def recipe_of(self, case_id: str) -> str:
        """The intensity recipe scan ``case_id`` gets: ``ct``, ``mri`` or ``none`` (as stored)."""
        option = self.modality_option
        option = option[case_id] if isinstance(option, dict) else option
        return self.load(case_id).modality if option == "auto" else option

    def _intensities(self, case_id: str, pixels: np.ndarray) -> tuple[str, np.ndarray]:
        option = self.modality_option
        guessed = guess_modality(pixels)
        if isinstance(option, dict):
            option = option[case_id]
        if option == "auto":
            modality = guessed
        elif option in ("ct", "mri"):
            modality = option
        else:
            if guessed == "ct":
                warnings.warn(
                    f"nifti_folder scan {case_id} holds Hounsfield-like values (min {float(pixels.min()):g}) but "
                    f"{self.config_key}.modality=none passes them on as stored; set modality=ct or auto to "
                    "apply the benchmark's CT window", DataWarning, stacklevel=3,
                )
            return guessed, pixels
        from fsmis_bench.preparation.common import INTENSITY_RECIPES

        return modality, INTENSITY_RECIPES[modality](pixels).astype(np.float32)

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
        header = nib.load(str(geometry.image_path)).header
        image = nib.Nifti1Image(data, geometry.source_affine)
        image.set_qform(header.get_qform(), code=int(header["qform_code"]))
        image.set_sform(header.get_sform(), code=int(header["sform_code"]))
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
        if with_supervoxels and self.supervoxel_dir:
            sv_dir = Path(str(self.supervoxel_dir)).expanduser()
            sv_dir = sv_dir if sv_dir.is_absolute() else self.folder.parent / sv_dir
            identity["supervoxels"] = str(sv_dir.resolve())
            identity["supervoxels_sha256"] = _digest_files([nifti_path(sv_dir, f"superpix-MIDDLE_{i}") for i in ids])
        return identity


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
