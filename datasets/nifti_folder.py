"""A user's own image/label NIfTI pairs with a label map given in config.

Config example (``dataset=nifti_folder``)::

    dataset:
      name: nifti_folder
      path: /data/my_scans            # holds image_<id>.nii.gz and label_<id>.nii.gz
      label_map: {liver: 1, spleen: 2}
      test_organs: [liver, spleen]     # default: every organ of label_map
      supervoxels: supervoxels_5000    # optional sibling folder of superpix-MIDDLE_<id>.nii.gz
      folds: null                      # default: the standard five overlapping folds

The path may be absolute, or relative to ``data_root``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fsmis_bench.data.base import ORGANS, Volume, VolumeDataset
from fsmis_bench.data.nifti import nifti_path, numeric_sort, read_nifti
from fsmis_bench.errors import ConfigError, DataError
from fsmis_bench.protocol.folds import folds_for


class NiftiFolder(VolumeDataset):
    """``image_<id>.nii[.gz]`` / ``label_<id>.nii[.gz]`` pairs in one folder."""

    def __init__(self, root=None, **options) -> None:
        super().__init__(root, **options)
        path = options.get("path")
        if not path:
            raise ConfigError(
                "dataset=nifti_folder needs dataset.path",
                hint="add dataset.path=<folder with image_<id>.nii.gz and label_<id>.nii.gz>",
            )
        folder = Path(str(path)).expanduser()
        if not folder.is_absolute() and self.root is not None:
            folder = self.root / folder
        self.folder = folder
        label_map = dict(options.get("label_map") or {})
        if not label_map:
            raise ConfigError(
                "dataset=nifti_folder needs dataset.label_map",
                hint="e.g. 'dataset.label_map={liver:1,spleen:2}'",
            )
        unknown = [o for o in label_map if o not in ORGANS]
        if unknown:
            raise ConfigError(
                f"label_map names organs outside the vocabulary: {unknown}",
                hint=f"use names from: {', '.join(ORGANS)}",
            )
        self.label_map = {str(k): int(v) for k, v in label_map.items()}
        self.test_organs = tuple(options.get("test_organs") or self.label_map)
        self.setting2_groups = tuple(tuple(g) for g in (options.get("setting2_groups") or ()))
        self._folds = options.get("folds")
        self.supervoxel_dir = options.get("supervoxels")

    @property
    def folds(self):  # type: ignore[override]
        if self._folds:
            return tuple(tuple(int(i) for i in f) for f in self._folds)
        return folds_for(len(self.case_ids()))

    def _case_ids(self) -> list[str]:
        if not self.folder.is_dir():
            raise DataError(
                f"nifti_folder: {self.folder} does not exist",
                hint="expected image_<id>.nii.gz and label_<id>.nii.gz files in dataset.path",
            )
        ids = [
            m.group(1)
            for p in self.folder.iterdir()
            if (m := re.fullmatch(r"image_(.+?)\.nii(\.gz)?", p.name))
        ]
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
        return numeric_sort(ids)


    def _load(self, case_id: str, with_supervoxels: bool) -> Volume:
        image, spacing = read_nifti(nifti_path(self.folder, f"image_{case_id}"), np.float32)
        label, _ = read_nifti(nifti_path(self.folder, f"label_{case_id}"), np.int32)
        supervoxels = None
        if with_supervoxels:
            if not self.supervoxel_dir:
                raise DataError(
                    "nifti_folder has no supervoxels configured",
                    hint="set dataset.supervoxels=<folder>, or use protocol.train_labels=gt",
                )
            sv_dir = self.folder.parent / str(self.supervoxel_dir)
            supervoxels, _ = read_nifti(nifti_path(sv_dir, f"superpix-MIDDLE_{case_id}"), np.int32)
        return Volume(case_id, image, label, supervoxels, spacing)
