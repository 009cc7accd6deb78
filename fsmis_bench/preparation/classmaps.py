"""``classmap_<n>.json``: per class and scan, the slices holding it (SSL-ALPNet / Q-Net indexes).

SSL-ALPNet's data loaders (``dataloaders/ManualAnnoDatasetv2.py``,
``GenericSuperDatasetv2.py``) open ``classmap_<min_fg>.json`` and ``classmap_1.json`` in
the image folder; setting 2 reads the excluded slices from ``classmap_1.json``. The
structure is ``{class name: {scan id: [slice indices]}}`` with the classes in label order
(index = label value, background first) and the scans in numeric id order, written with
``json.dump`` defaults. The rule that selects a slice differs between the notebooks, and
the files here follow each one:

- CHAOS and CMR (``data/CHAOST2|CMR/class_slice_index_gen.ipynb``; CMR values 200/500/600
  read as 1/2/3): a slice is listed for class ``c`` when ``c`` occurs in it and the **sum of
  the label values** over the slice is at least ``n``. So ``BG`` lists the slices holding any
  organ, and ``n`` bounds the slice's labelled area, not the class's. The distributed
  ``classmap_{1,100,400}.json`` (CHAOS) and ``classmap_{1,200}.json`` (CMR) are these,
  byte for byte.
- SABS (``data/SABS/Synapse_abdominal_classmap.ipynb``): listed when at least ``n`` pixels of
  the slice are class ``c``. The notebook writes ``n = 1``; ``n = 100`` is written too
  because it is SSL-ALPNet's default ``min_fg_data``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ._io import PARTIAL_TAG, read_image_checked, sorted_case_ids


@dataclass(frozen=True)
class ClassmapSpec:
    """How one dataset's class maps are made.

    Attributes:
        class_names: names in label order (index = class number, 0 = background).
        thresholds: the ``n`` of each ``classmap_<n>.json`` written.
        per_class_count: True: at least ``n`` pixels of the class (SABS); False: the class
            occurs and the slice's label values sum to at least ``n`` (CHAOS, CMR).
        value_to_class: stored label value -> class number, where they differ (CMR).
    """

    class_names: tuple[str, ...]
    thresholds: tuple[int, ...]
    per_class_count: bool
    value_to_class: dict[int, int] | None = None


CLASSMAPS: dict[str, ClassmapSpec] = {
    "abd_mri": ClassmapSpec(("BG", "LIVER", "RK", "LK", "SPLEEN"), (1, 100, 400), per_class_count=False),
    "card_mri": ClassmapSpec(
        ("BG", "LV-MYO", "LV-BP", "RV"), (1, 200), per_class_count=False, value_to_class={200: 1, 500: 2, 600: 3}
    ),
    "abd_ct": ClassmapSpec(
        (
            "BGD", "SPLEEN", "KID_R", "KID_l", "GALLBLADDER", "ESOPHAGUS", "LIVER", "STOMACH", "AORTA", "IVC",
            "PS_VEIN", "PANCREAS", "AG_R", "AG_L",
        ),
        (1, 100),
        per_class_count=True,
    ),
}


def classmap_path(image_dir: Path, threshold: int) -> Path:
    return Path(image_dir) / f"classmap_{threshold}.json"


def _classes(spec: ClassmapSpec, label: np.ndarray) -> np.ndarray:
    if not spec.value_to_class:
        return label
    out = label.copy()
    for value, cls in spec.value_to_class.items():
        out[label == value] = cls
    return out


def slices_per_class(spec: ClassmapSpec, label: np.ndarray, threshold: int) -> list[list[int]]:
    """For each class of ``spec``, the slice indices of ``label`` (``(Z, Y, X)``) it is listed in."""
    classes = _classes(spec, label)
    listed: list[list[int]] = [[] for _ in spec.class_names]
    for z, plane in enumerate(classes):
        present = set(np.unique(plane).tolist())
        total = float(plane.sum())
        for cls in range(len(spec.class_names)):
            if cls not in present:
                continue
            if spec.per_class_count:
                keep = int(np.count_nonzero(plane == cls)) >= threshold
            else:
                keep = total >= threshold
            if keep:
                listed[cls].append(z)
    return listed


def build_classmaps(dataset: str, labels: dict[str, np.ndarray]) -> dict[int, dict]:
    """``{n: classmap}`` of ``labels`` (scan id -> ``(Z, Y, X)`` label array)."""
    spec = CLASSMAPS[dataset]
    ids = sorted(labels, key=int)
    maps: dict[int, dict] = {}
    for threshold in spec.thresholds:
        classmap: dict[str, dict[str, list[int]]] = {name: {} for name in spec.class_names}
        for case_id in ids:
            for name, listed in zip(spec.class_names, slices_per_class(spec, labels[case_id], threshold), strict=True):
                classmap[name][case_id] = listed
        maps[threshold] = classmap
    return maps


def write_classmaps(dataset: str, image_dir: Path) -> list[Path]:
    """Write the ``classmap_<n>.json`` files of every ``label_<id>`` in ``image_dir``.

    Returns:
        The files written (none when the folder holds no labelled scan).
    Raises:
        RuntimeError: a label file cannot be read (named).
    """
    image_dir = Path(image_dir)
    labels: dict[str, np.ndarray] = {}
    for case_id in sorted_case_ids(image_dir):
        path = image_dir / f"label_{case_id}.nii.gz"
        if not path.exists():
            continue
        try:
            labels[case_id] = sitk.GetArrayFromImage(read_image_checked(path))
        except RuntimeError as error:
            raise RuntimeError(f"{path.name}: {str(error).strip().splitlines()[-1]}") from None
    if not labels:
        return []
    written = []
    for threshold, classmap in build_classmaps(dataset, labels).items():
        path = classmap_path(image_dir, threshold)
        tmp = path.with_name(f".{path.name}{PARTIAL_TAG}{os.getpid()}")
        tmp.write_text(json.dumps(classmap))  # json.dump's defaults, as the reference files
        os.replace(tmp, path)
        written.append(path)
    return written


def missing_classmaps(dataset: str, image_dir: Path) -> bool:
    return any(not classmap_path(image_dir, n).exists() for n in CLASSMAPS[dataset].thresholds)
