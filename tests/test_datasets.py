"""Dataset plugins: the SABS layout on synthetic volumes, cross-domain runs, the phantom,
NIfTI orientation, and our Dice against MONAI's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from fsmis_bench.api import load_dataset
from fsmis_bench.cli import main
from fsmis_bench.protocol.metrics import confusion_counts, dice_from_counts


def _write_layout(root: Path, folder: str, image_dir: str, n: int, organs: dict[int, tuple[slice, slice]],
                  n_sv: int = 5000) -> None:
    """Tiny volumes in the field's layout, slices along the last NIfTI axis."""
    images, supervoxels = root / folder / image_dir, root / folder / f"supervoxels_{n_sv}"
    images.mkdir(parents=True)
    supervoxels.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        label = np.zeros((32, 32, 10), dtype=np.float64)  # (x, y, z) as stored
        for value, (xs, ys) in organs.items():
            label[xs, ys, 2:8] = value
        image = rng.normal(100, 5, size=label.shape) + 40 * (label > 0)
        sv = np.zeros_like(label)
        sv[4:28, 4:28, 1:9] = 1 + (np.arange(32)[4:28, None, None] // 12)
        for name, data in (("image", image), ("label", label)):
            nib.save(nib.Nifti1Image(data, np.diag([1.25, 1.25, 5.0, 1])), str(images / f"{name}_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(sv, np.eye(4)), str(supervoxels / f"superpix-MIDDLE_{i}.nii.gz"))


SABS_ORGANS = {1: (slice(2, 8), slice(2, 8)), 2: (slice(20, 26), slice(2, 8)), 3: (slice(2, 8), slice(20, 26)),
               6: (slice(12, 20), slice(12, 20)), 7: (slice(20, 26), slice(20, 26))}
CHAOS_ORGANS = {4: (slice(2, 8), slice(2, 8)), 2: (slice(20, 26), slice(2, 8)), 3: (slice(2, 8), slice(20, 26)),
                1: (slice(12, 20), slice(12, 20))}


@pytest.fixture()
def synthetic_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _write_layout(root, "SABS", "sabs_CT_normalized", 30, SABS_ORGANS)
    ids = [1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39]
    _write_layout(root, "CHAOST2", "chaos_MR_T2_normalized", 20, CHAOS_ORGANS)
    # CHAOS ids are not 0..19: rename so numeric ordering matters (10 after 8, not after 1).
    folder = root / "CHAOST2" / "chaos_MR_T2_normalized"
    for i, real in reversed(list(enumerate(ids))):
        for name in ("image", "label"):
            (folder / f"{name}_{i}.nii.gz").rename(folder / f"{name}_{real}.nii.gz")
        sv = root / "CHAOST2" / "supervoxels_5000"
        (sv / f"superpix-MIDDLE_{i}.nii.gz").rename(sv / f"superpix-MIDDLE_{real}.nii.gz")
    return root


def test_abd_ct_reads_the_sabs_layout(synthetic_root):
    dataset = load_dataset("abd_ct", synthetic_root)
    assert dataset.case_ids()[:12] == [str(i) for i in range(12)]
    assert dataset.fold_cases(4) == ["0", "24", "25", "26", "27", "28", "29"]  # a set, id-sorted (PROTOCOL.md §2)
    volume = dataset.load("3", with_supervoxels=True)
    assert volume.image.shape == (10, 32, 32)  # slices first
    assert volume.spacing == pytest.approx((5.0, 1.25, 1.25))
    assert volume.label.dtype == np.int32 and set(np.unique(volume.label)) == {0, 1, 2, 3, 6, 7}
    liver = volume.organ_mask(dataset.organ_value("liver"))
    assert liver[2:8, 12:20, 12:20].all() and liver.sum() == 6 * 8 * 8  # (z, y, x) = transposed (x, y, z)
    assert volume.supervoxels.max() == 3


def test_case_ids_sort_numerically(synthetic_root):
    ids = load_dataset("abd_mri", synthetic_root).case_ids()
    assert ids[:6] == ["1", "2", "3", "5", "8", "10"]


def test_support_copy_on_abd_ct_with_wrapping_fold(synthetic_root, results_dir):
    assert main(["run", "method=support_copy", "dataset=abd_ct", "fold=4", f"data_root={synthetic_root}"]) == 0
    (cases,) = results_dir.glob("support_copy/abd_ct/setting1/fold4/*/cases.csv")
    frame = pd.read_csv(cases, dtype={"case_id": str})
    assert set(frame.organ) == {"liver", "spleen", "left_kidney", "right_kidney"}
    assert sorted(set(frame.case_id)) == sorted(["0", "24", "26", "27", "28", "29"])  # 25 (position 2) is the support
    assert np.allclose(frame.dice, 1.0)  # identical organ positions everywhere


def test_cross_domain_trains_on_one_dataset_and_tests_on_another(synthetic_root, results_dir):
    argv = ["run", "method=prototype", "dataset=abd_ct", "protocol.test_dataset=abd_mri", "fold=1",
            f"data_root={synthetic_root}", "train.steps=2", "train.image_size=32", "method.width=8",
            "method.feature_dim=16", "protocol.min_fg_pixels=10"]
    assert main(argv) == 0
    (run_dir,) = {p.parent for p in results_dir.glob("prototype/abd_ct_to_abd_mri/setting1/fold1/*/run.json")}
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["dataset"], info["test_dataset"]) == ("abd_ct", "abd_mri")
    frame = pd.read_csv(run_dir / "cases.csv", dtype={"case_id": str})
    assert set(frame.dataset) == {"abd_mri"} and set(frame.train_dataset) == {"abd_ct"}
    # abd_mri fold 1 = positions 4..8 = ids 8, 10, 13, 15, 19; the support (position 2) is 13
    assert sorted(set(frame.case_id), key=int) == ["8", "10", "15", "19"]


def test_phantom_is_deterministic_and_has_both_contrasts():
    first = load_dataset("phantom").load("3", with_supervoxels=True)
    again = load_dataset("phantom").load("3", with_supervoxels=True)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.supervoxels, again.supervoxels)
    other_seed = load_dataset("phantom", seed=1).load("3")
    assert not np.array_equal(first.image, other_seed.image)
    ct = load_dataset("phantom", modality="ct").load("3")
    phantom = load_dataset("phantom")
    for organ in phantom.test_organs:
        assert first.organ_mask(phantom.organ_value(organ)).any(axis=(1, 2)).sum() >= 3, organ
    # organ contrast: kidneys are the brightest organs in the MRI-like and the CT-like volumes
    for volume in (first, ct):
        liver = volume.image[volume.label == 1].mean()
        kidney = volume.image[volume.label == 2].mean()
        assert kidney > liver > volume.image[(volume.label == 0) & (volume.image > 0)].mean() * 0.9
    assert first.image.max() > 2 * ct.image.max()  # MRI-like intensity scale vs CT-like 0..255


def test_dice_agrees_with_monai():
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    pred = rng.random((5, 16, 16)) > 0.6
    truth = rng.random((5, 16, 16)) > 0.5
    ours = dice_from_counts(*confusion_counts(pred, truth))
    theirs = compute_dice(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(truth)[None, None].float())
    assert ours == pytest.approx(float(theirs), abs=1e-6)
