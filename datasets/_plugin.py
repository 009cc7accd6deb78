"""Registers the built-in datasets and settings, through the public entry-point group."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fsmis_bench.plugins import Display, Registry, hookimpl

if TYPE_CHECKING:  # annotations only: the datasets are registered by name and imported when built
    from fsmis_bench.data import VolumeDataset


@hookimpl
def fsmis_register_datasets(registry: Registry[VolumeDataset]) -> None:
    registry.register("abd_mri", "fsmis_datasets.preprocessed:AbdominalMRI",
                      description="CHAOS T2-SPIR, 20 scans (CHAOST2/ layout)", display=Display(name="Abd-MRI"))
    registry.register("abd_ct", "fsmis_datasets.preprocessed:AbdominalCT",
                      description="Synapse/BTCV 'SABS', 30 scans (SABS/ layout)", display=Display(name="Abd-CT"))
    registry.register("card_mri", "fsmis_datasets.preprocessed:CardiacMRI",
                      description="MS-CMRSeg bSSFP, 35 scans (CMR/ layout)", display=Display(name="Card-MRI"))
    # a user's own data; `fsmis-bench report --rename nifti_folder="..."` gives it its real name
    registry.register("nifti_folder", "fsmis_datasets.nifti_folder:NiftiFolder",
                      description="your own image/label NIfTI pairs, label map in config",
                      display=Display(name="NIfTI folder"))
    registry.register("phantom", "fsmis_datasets.phantom:Phantom",
                      description="procedural abdominal volumes (CT/MRI-like), no files; the default",
                      display=Display(name="Phantom"))


@hookimpl
def fsmis_register_settings(registry: Registry[Any]) -> None:
    registry.register("1", None,
                      description="train on all non-fold scans; test organs may appear unlabelled")
    registry.register("2", None,
                      description="also drop training slices showing a test organ (exclusion=any|all)")
