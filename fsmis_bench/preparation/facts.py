"""The one table of prepared-dataset facts (folders, label maps, test organs).

Preparation, supervoxel generation, ``check-data`` and the built-in dataset plugins
(``datasets/preprocessed.py``) all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError


@dataclass(frozen=True)
class DatasetFacts:
    """Layout and label facts of one prepared dataset.

    Attributes:
        name: benchmark name (``abd_mri``, ``abd_ct``, ``card_mri``).
        folder: top folder under the data root (``CHAOST2``).
        image_folder: folder of ``image_<id>``/``label_<id>`` files inside ``folder``.
        n_sv: supervoxel ``min_size`` of the ADNet recipe; pseudo-labels live in
            ``<folder>/supervoxels_<n_sv>/superpix-MIDDLE_<id>.nii.gz``.
        label_map: organ name -> label value.
        test_organs: organs evaluated by the protocol (each must appear in every scan),
            in the column order of the papers' tables.
    """

    name: str
    folder: str
    image_folder: str
    n_sv: int
    label_map: dict[str, int]
    test_organs: tuple[str, ...]

    def image_dir(self, root: Path) -> Path:
        return Path(root) / self.folder / self.image_folder

    def supervoxel_dir(self, root: Path, n_sv: int | None = None) -> Path:
        return Path(root) / self.folder / f"supervoxels_{n_sv or self.n_sv}"


DATASET_FACTS: dict[str, DatasetFacts] = {
    "abd_mri": DatasetFacts(
        name="abd_mri",
        folder="CHAOST2",
        image_folder="chaos_MR_T2_normalized",
        n_sv=5000,
        label_map={"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4},
        test_organs=("spleen", "liver", "left_kidney", "right_kidney"),
    ),
    "abd_ct": DatasetFacts(
        name="abd_ct",
        folder="SABS",
        image_folder="sabs_CT_normalized",
        n_sv=5000,
        label_map={
            "spleen": 1,
            "right_kidney": 2,
            "left_kidney": 3,
            "gallbladder": 4,
            "esophagus": 5,
            "liver": 6,
            "stomach": 7,
            "aorta": 8,
            "ivc": 9,
            "portal_splenic_vein": 10,
            "pancreas": 11,
            "right_adrenal": 12,
            "left_adrenal": 13,
        },
        test_organs=("spleen", "liver", "left_kidney", "right_kidney"),
    ),
    "card_mri": DatasetFacts(
        name="card_mri",
        folder="CMR",
        image_folder="cmr_MR_normalized",
        n_sv=1000,
        label_map={"lv_myo": 200, "lv_bp": 500, "rv": 600},
        test_organs=("lv_bp", "lv_myo", "rv"),
    ),
}


def dataset_facts(name: str) -> DatasetFacts:
    """The facts of dataset ``name``; a :class:`DataError` names the known ones otherwise."""
    try:
        return DATASET_FACTS[name]
    except KeyError:
        raise DataError(
            f"unknown prepared dataset {name!r}",
            hint=f"use one of: {', '.join(sorted(DATASET_FACTS))}",
        ) from None
