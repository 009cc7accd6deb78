"""`fsmis-bench check-data`: the real roots pass, damaged copies fail with the reason."""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fsmis_bench.errors import DataError
from fsmis_bench.preparation import DATASET_FACTS, check_dataset
from fsmis_bench.preparation.check import format_report
from fsmis_bench.preparation.commands import register

CHAOS_IDS = ("1", "2", "3")


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture()
def chaos_copy(real_data_root: Path, tmp_path: Path) -> Path:
    """Three real CHAOS cases (images, labels, supervoxels) copied to a temp root."""
    src = real_data_root / "CHAOST2"
    images = tmp_path / "CHAOST2" / "chaos_MR_T2_normalized"
    svs = tmp_path / "CHAOST2" / "supervoxels_5000"
    images.mkdir(parents=True)
    svs.mkdir(parents=True)
    for case_id in CHAOS_IDS:
        for name in (f"image_{case_id}.nii.gz", f"label_{case_id}.nii.gz"):
            shutil.copy(src / "chaos_MR_T2_normalized" / name, images / name)
        shutil.copy(src / "supervoxels_5000" / f"superpix-MIDDLE_{case_id}.nii.gz", svs)
    return tmp_path


def _rewrite_label(path: Path, change) -> None:
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    change(array)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


@pytest.mark.realdata
@pytest.mark.parametrize("dataset, cases", [("abd_mri", 20), ("card_mri", 35)])
def test_real_roots_pass(real_data_root, dataset, cases):
    report = check_dataset(dataset, real_data_root)
    assert report.ok, report.problems
    assert len(report.rows) == cases
    facts = DATASET_FACTS[dataset]
    assert all(set(r.labels) == set(facts.label_map.values()) and r.supervoxels == "ok" for r in report.rows)
    assert all(r.shape[1:] == (256, 256) for r in report.rows)
    assert [r.case_id for r in report.rows] == sorted((r.case_id for r in report.rows), key=int)
    table = format_report(report)
    assert f"OK: {cases} case(s)" in table and table.count("\n") >= cases + 3


@pytest.mark.realdata
def test_copy_passes_then_each_damage_is_named(chaos_copy, capsys):
    assert check_dataset("abd_mri", chaos_copy).ok
    images = chaos_copy / "CHAOST2" / "chaos_MR_T2_normalized"
    svs = chaos_copy / "CHAOST2" / "supervoxels_5000"
    # 1: spleen removed; 2: an unknown label value; 3: supervoxels of the wrong shape
    _rewrite_label(images / "label_1.nii.gz", lambda a: a.__setitem__(a == 4, 0))
    _rewrite_label(images / "label_2.nii.gz", lambda a: a.__setitem__((0, 0, 0), 7))
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((3, 256, 256), np.int32)), str(svs / "superpix-MIDDLE_3.nii.gz")
    )
    report = check_dataset("abd_mri", chaos_copy)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "case 1: test organ(s) absent: spleen" in text
    assert "case 2: unknown label values [7]" in text
    assert "case 3: supervoxels (3, 256, 256) != image" in text
    assert [r.missing_organs for r in report.rows] == [["spleen"], [], []]
    assert run_cli("check-data", "abd_mri", "--root", str(chaos_copy)) == 2
    out = capsys.readouterr().out
    assert "FAILED: 3 problem(s)" in out and "PROBLEM" in out


@pytest.mark.realdata
def test_missing_and_truncated_files(chaos_copy):
    images = chaos_copy / "CHAOST2" / "chaos_MR_T2_normalized"
    (images / "label_2.nii.gz").unlink()
    data = (images / "image_3.nii.gz").read_bytes()
    (images / "image_3.nii.gz").write_bytes(data[: len(data) // 3])
    (chaos_copy / "CHAOST2" / "supervoxels_5000" / "superpix-MIDDLE_1.nii.gz").unlink()
    report = check_dataset("abd_mri", chaos_copy)
    text = "\n".join(report.problems)
    assert "case 2: label_2.nii.gz is missing" in text
    assert "case 3: image_3.nii.gz cannot be read" in text
    assert "case 1: supervoxels superpix-MIDDLE_1.nii.gz missing" in text
    # without supervoxels required, only the two file problems remain
    relaxed = check_dataset("abd_mri", chaos_copy, require_supervoxels=False)
    assert len(relaxed.problems) == 2


@pytest.mark.realdata
def test_geometry_mismatch_between_image_and_label(chaos_copy):
    images = chaos_copy / "CHAOST2" / "chaos_MR_T2_normalized"
    label = sitk.ReadImage(str(images / "label_1.nii.gz"))
    label.SetSpacing((1.0, 1.0, 7.7))
    sitk.WriteImage(label, str(images / "label_1.nii.gz"))
    report = check_dataset("abd_mri", chaos_copy)
    assert any(p.startswith("case 1: image and label geometry differ: spacing") for p in report.problems)


def _synthetic_root(root: Path, dataset: str, shape=(3, 256, 256), labels=(1, 2, 3, 6)) -> Path:
    facts = DATASET_FACTS[dataset]
    images, svs = facts.image_dir(root), facts.supervoxel_dir(root)
    images.mkdir(parents=True)
    svs.mkdir(parents=True)
    for case_id in ("0", "1"):
        image = np.random.default_rng(int(case_id)).uniform(0, 255, shape)
        label = np.zeros(shape)
        for i, value in enumerate(labels):
            label[:, 10 * i : 10 * i + 5, :5] = value
        for name, array in ((f"image_{case_id}", image), (f"label_{case_id}", label)):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing((1.5, 1.5, 3.0))
            sitk.WriteImage(itk, str(images / f"{name}.nii.gz"))
        sitk.WriteImage(
            sitk.GetImageFromArray(np.ones(shape, np.int32)), str(svs / f"superpix-MIDDLE_{case_id}.nii.gz")
        )
    return root


def test_synthetic_abd_ct_layout_passes_and_extra_organs_are_fine(tmp_path):
    root = _synthetic_root(tmp_path, "abd_ct", labels=(1, 2, 3, 6, 11))
    report = check_dataset("abd_ct", root)
    assert report.ok, report.problems
    assert report.rows[0].labels == [1, 2, 3, 6, 11]


def test_synthetic_abd_ct_missing_liver_and_wrong_size(tmp_path):
    root = _synthetic_root(tmp_path, "abd_ct", shape=(2, 200, 256), labels=(1, 2, 3))
    report = check_dataset("abd_ct", root)
    text = "\n".join(report.problems)
    assert "test organ(s) absent: liver" in text
    assert "in-plane size 256x200, expected 256x256" in text


def test_orphan_label_and_missing_folders(tmp_path):
    root = _synthetic_root(tmp_path, "abd_ct")
    images = DATASET_FACTS["abd_ct"].image_dir(root)
    shutil.copy(images / "label_1.nii.gz", images / "label_9.nii.gz")
    shutil.rmtree(DATASET_FACTS["abd_ct"].supervoxel_dir(root))
    report = check_dataset("abd_ct", root)
    text = "\n".join(report.problems)
    assert "label_9.nii.gz has no image_9.nii.gz" in text
    assert "supervoxel folder" in text and "fsmis-bench supervoxels abd_ct" in text
    assert not check_dataset("card_mri", root).ok
    assert "does not exist" in check_dataset("card_mri", root).problems[0]


def test_unknown_dataset_and_missing_root(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown prepared dataset"):
        check_dataset("abd_pet", tmp_path)
    monkeypatch.delenv("FSMIS_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match="no data root given"):
        run_cli("check-data", "abd_mri")


def test_gzip_garbage_label_is_reported(tmp_path):
    root = _synthetic_root(tmp_path, "abd_ct", labels=(1, 2, 3, 6))
    images = DATASET_FACTS["abd_ct"].image_dir(root)
    with gzip.open(images / "label_0.nii.gz", "wb") as handle:
        handle.write(b"this is not nifti")
    report = check_dataset("abd_ct", root)
    assert any("case 0: label_0.nii.gz cannot be read" in p for p in report.problems)


def test_truncated_supervoxels_are_reported(tmp_path):
    root = _synthetic_root(tmp_path, "abd_ct")
    sv = DATASET_FACTS["abd_ct"].supervoxel_dir(root) / "superpix-MIDDLE_1.nii.gz"
    sv.write_bytes(sv.read_bytes()[:200])
    report = check_dataset("abd_ct", root)
    assert report.rows[1].supervoxels == "unreadable"
    assert any("case 1: superpix-MIDDLE_1.nii.gz cannot be read (damaged gzip" in p for p in report.problems)
    # what remakes it: not `prepare` (it makes no supervoxels), and the supervoxels command
    # keeps a file that exists unless --force
    problem = next(p for p in report.problems if "superpix-MIDDLE_1" in p)
    assert f"delete {sv} and make it again with `fsmis-bench supervoxels abd_ct --root {root}`" in problem
    assert "--force" in problem and "prepare" not in problem
    from fsmis_bench.runner import build_dataset  # a run reading it gives the same advice

    with pytest.raises(DataError) as raised:
        build_dataset({"name": "abd_ct"}, str(root)).load("1", with_supervoxels=True)
    assert f"delete {sv} and make it again with `fsmis-bench supervoxels abd_ct --root {root}`" in raised.value.hint


def test_a_file_given_for_a_folder_is_said_to_be_a_file(tmp_path, monkeypatch):
    """check-data --root / supervoxels --root / prepare --raw naming a file said the path
    "does not exist"."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    monkeypatch.delenv("FSMIS_DATA_ROOT", raising=False)
    for argv in (["check-data", "abd_mri", "--root", str(a_file)], ["supervoxels", "abd_mri", "--root", str(a_file)]):
        with pytest.raises(DataError, match=f"data root {a_file} is a file, not a folder"):
            run_cli(*argv)
    with pytest.raises(DataError, match=f"raw folder {a_file} is a file, not a folder"):
        run_cli("prepare", "abd_mri", "--raw", str(a_file), "--out", str(tmp_path / "out"))
    with pytest.raises(DataError, match=f"data root {tmp_path / 'nowhere'} does not exist"):
        run_cli("check-data", "abd_mri", "--root", str(tmp_path / "nowhere"))
    assert not (tmp_path / "out").exists()
