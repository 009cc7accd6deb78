"""The three datasets of the FSMIS literature, in their shared preprocessed layout.

``<root>/<FOLDER>/<images>/image_<id>.nii.gz`` + ``label_<id>.nii.gz``, pseudo-labels in
``<root>/<FOLDER>/supervoxels_<n>/superpix-MIDDLE_<id>.nii.gz`` (PROTOCOL.md §1). A user who
prepared data for SSL-ALPNet, ADNet, Q-Net or SD-FSMIS points ``data_root`` at that folder.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np

from fsmis_bench.data.base import Volume, VolumeDataset
from fsmis_bench.data.digest import files_sha256
from fsmis_bench.data.nifti import load_nifti, nifti_path, numeric_sort, read_nifti
from fsmis_bench.errors import DataError
from fsmis_bench.preparation.facts import DATASET_FACTS, DatasetFacts
from fsmis_bench.protocol.folds import FOLDS

_ABDOMINAL_GROUPS = (("liver", "spleen"), ("left_kidney", "right_kidney"))


class PreprocessedLayout(VolumeDataset):
    """A dataset stored in the field's preprocessed layout, described by its
    :class:`~fsmis_bench.preparation.facts.DatasetFacts` (folders, label map, test organs)."""

    facts: ClassVar[DatasetFacts]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.label_map = dict(cls.facts.label_map)
        cls.test_organs = tuple(cls.facts.test_organs)
        cls.folder = cls.facts.folder
        cls.image_dir = cls.facts.image_folder

    def __init__(self, root=None, **options) -> None:
        super().__init__(root, **options)
        self.n_supervoxels = int(options.get("n_supervoxels") or self.facts.n_sv)
        # Another set of pseudo-labels (e.g. ones generated elsewhere), absolute or
        # relative to the data root; default: <FOLDER>/supervoxels_<n>.
        self.supervoxel_dir = options.get("supervoxel_dir")

    @property
    def folds(self):  # type: ignore[override]
        return FOLDS[self.facts.name]

    def layout(self) -> str:
        return (
            f"<data_root>/{self.folder}/{self.image_dir}/image_<id>.nii.gz and label_<id>.nii.gz, "
            f"pseudo-labels in <data_root>/{self.folder}/supervoxels_{self.n_supervoxels}/"
            "superpix-MIDDLE_<id>.nii.gz"
        )

    @property
    def image_root(self) -> Path:
        if self.root is None:
            raise DataError(
                f"{self.name} needs a data root, and none is set",
                hint=f"pass data_root=<dir> or set FSMIS_DATA_ROOT; expected layout: {self.layout()}",
            )
        path = self.root / self.folder / self.image_dir
        if not path.is_dir():
            raise DataError(
                f"{self.name}: {path} does not exist",
                hint=f"expected layout: {self.layout()} "
                f"(raw downloads: `fsmis-bench prepare {self.name} --raw <dir> --out <data_root>`)",
            )
        return path

    @property
    def supervoxel_root(self) -> Path:
        if self.supervoxel_dir:
            path = Path(str(self.supervoxel_dir)).expanduser()
            return path if path.is_absolute() or self.root is None else self.root / path
        return self.image_root.parent / f"supervoxels_{self.n_supervoxels}"

    def ensure_supervoxels(self) -> dict | None:
        """Generate the ADNet supervoxels when the default folder lacks some (PROTOCOL.md §1).

        Generation is announced on stderr (it takes minutes and changes the pseudo-labels,
        hence the run's identity).

        Returns:
            what was generated (folder, cases, recipe, time), for the run record; None when
            nothing was missing.
        """
        missing = [c for c in self.case_ids() if not nifti_path(self.supervoxel_root, f"superpix-MIDDLE_{c}").exists()]
        if not missing or self.supervoxel_dir:
            return None
        if not os.access(self.image_root.parent, os.W_OK):
            raise DataError(
                f"{self.name}: {len(missing)} scans lack supervoxels and {self.image_root.parent} is read-only",
                hint=f"generate them elsewhere with `fsmis-bench supervoxels {self.name} --root <data_root> "
                "--out <dir>` and pass dataset.supervoxel_dir=<dir>",
            )
        from fsmis_bench.preparation import ensure_supervoxels

        print(
            f"{self.name}: {len(missing)} of {len(self.case_ids())} scans have no supervoxels in "
            f"{self.supervoxel_root}; generating them now (ADNet 3-D Felzenszwalb, n_sv={self.n_supervoxels}; "
            "this takes minutes, and the new pseudo-labels become part of the run's identity)",
            file=sys.stderr, flush=True,
        )
        began = time.time()
        ensure_supervoxels(self.image_root.parent, self.n_supervoxels, workers=os.cpu_count() or 1)
        return {
            "folder": str(self.supervoxel_root),
            "cases": missing,
            "recipe": "felzenszwalb3d",
            "n_supervoxels": self.n_supervoxels,
            "seconds": round(time.time() - began, 1),
        }

    def identity(self, *, with_supervoxels: bool) -> dict:
        """Name, options, a digest of every image and label file, and with supervoxels
        the label source, the supervoxel folder as configured and a digest of its files.

        Paths under the data root are not part of it (moving the data keeps the
        identity); the bytes are. Digests are cached by size and mtime
        (:mod:`fsmis_bench.data.digest`), so an unchanged dataset costs one ``stat`` per file.
        """
        ids = self.case_ids()
        files = [nifti_path(self.image_root, f"{kind}_{c}") for c in ids for kind in ("image", "label")]
        identity = {
            "name": self.name,
            "options": dict(self.options),
            "layout": f"{self.folder}/{self.image_dir}",
            "cases": len(ids),
            "images_labels_sha256": files_sha256(files, self.image_root),
            "label_source": "supervoxels" if with_supervoxels else "ground_truth",
        }
        if with_supervoxels:
            sv_files = [nifti_path(self.supervoxel_root, f"superpix-MIDDLE_{c}") for c in ids]
            absent = [p for p in sv_files if not p.exists()]
            if absent:
                raise DataError(
                    f"{self.name}: {len(absent)} scans have no supervoxels, e.g. {absent[0]}",
                    hint=f"generate them with `fsmis-bench supervoxels {self.name} --root <data_root>`, "
                    "or train with protocol.train_labels=gt",
                )
            identity["supervoxels"] = {
                "supervoxel_dir": self.supervoxel_dir or f"{self.folder}/supervoxels_{self.n_supervoxels}",
                "n_supervoxels": self.n_supervoxels,
                "sha256": files_sha256(sv_files, self.supervoxel_root),
            }
        return identity

    def _case_ids(self) -> list[str]:
        ids = [
            m.group(1)
            for p in self.image_root.iterdir()
            if (m := re.fullmatch(r"image_(.+)\.nii(\.gz)?", p.name))
        ]
        if not ids:
            raise DataError(
                f"{self.name}: no image_<id>.nii.gz files in {self.image_root}",
                hint=f"expected layout: {self.layout()}",
            )
        return numeric_sort(ids)


    def _load(self, case_id: str, with_supervoxels: bool) -> Volume:
        # read as stored: the prepared files are the benchmark's reference layout
        image = load_nifti(nifti_path(self.image_root, f"image_{case_id}"), np.float32)
        label, _ = read_nifti(nifti_path(self.image_root, f"label_{case_id}"), np.int32)
        supervoxels = None
        if with_supervoxels:
            path = nifti_path(self.supervoxel_root, f"superpix-MIDDLE_{case_id}")
            if not path.exists():
                raise DataError(
                    f"{self.name}: no supervoxels for case {case_id} ({path})",
                    hint=f"generate them with `fsmis-bench supervoxels {self.name} --root <data_root>`, "
                    "or train with protocol.train_labels=gt",
                )
            try:
                supervoxels, _ = read_nifti(path, np.int32)
            except DataError as error:
                if error.message.startswith("cannot read"):  # `prepare` makes no supervoxels: say what does
                    from fsmis_bench.preparation.supervoxels import damaged_file_advice

                    error.hint = damaged_file_advice(path, self.name, self.image_root.parent.parent,
                                                     self.n_supervoxels)
                raise
        return Volume(case_id, image.array, label, supervoxels, image.spacing, image.affine, self.modality)


class AbdominalMRI(PreprocessedLayout):
    """CHAOS T2-SPIR abdominal MRI: 20 scans, liver 1, right kidney 2, left kidney 3, spleen 4."""

    facts = DATASET_FACTS["abd_mri"]
    setting2_groups = _ABDOMINAL_GROUPS
    modality = "mri"


class AbdominalCT(PreprocessedLayout):
    """Synapse/BTCV 'SABS' abdominal CT: 30 scans, 13 organs; four are test organs."""

    facts = DATASET_FACTS["abd_ct"]
    setting2_groups = _ABDOMINAL_GROUPS
    modality = "ct"


class CardiacMRI(PreprocessedLayout):
    """MS-CMRSeg bSSFP cardiac MRI: 35 scans, LV myocardium 200, LV blood pool 500, RV 600."""

    facts = DATASET_FACTS["card_mri"]
    setting2_groups = ()
    modality = "mri"
