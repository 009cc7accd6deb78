"""`fsmis-bench prepare` on raw releases as users have them: release layouts, stray files,
duplicates, incomplete series, reruns with --force, and runs where nothing can be prepared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_prepare import CHAOS_COLS, CHAOS_ROWS, prepared_files, run_cli, write_btcv_raw, write_chaos_raw, write_cmr_raw

from fsmis_bench.errors import DataError

CHAOS_DIR = ("CHAOST2", "chaos_MR_T2_normalized")


def prepare(dataset: str, raw: Path, out: Path, *extra: str) -> int:
    return run_cli("prepare", dataset, "--raw", str(raw), "--out", str(out), "--no-progress", *extra)


# -- 3. MS-CMRSeg as released --------------------------------------------------------------------


def test_cmr_release_layout_reads_labels_from_c0gt_and_skips_unlabelled_scans(tmp_path, capsys):
    """c0t2lge/patient<N>_C0.nii.gz with c0gt/patient<N>_C0_manual.nii.gz; 45 images, 35 labels."""
    raw = tmp_path / "MS-CMRSeg"
    write_cmr_raw(raw, ids=(1, 2, 3, 4, 6), unlabelled=(3, 4, 6))
    assert prepare("card_mri", raw, tmp_path / "root") == 0
    captured = capsys.readouterr()
    folder = tmp_path / "root" / "CMR" / "cmr_MR_normalized"
    assert prepared_files(folder) == ["image_1.nii.gz", "image_2.nii.gz", "label_1.nii.gz", "label_2.nii.gz"]
    assert "2 written, 0 skipped, 0 failed" in captured.out
    notes = [line for line in captured.err.splitlines() if "without a manual label" in line]
    assert len(notes) == 1 and "patient 3-4, 6" in notes[0]


def test_cmr_release_without_any_label_is_refused(tmp_path):
    raw = tmp_path / "MS-CMRSeg"
    write_cmr_raw(raw, ids=(1, 2), unlabelled=(1, 2))
    with pytest.raises(DataError, match="none of the 2 C0 images has a manual label") as error:
        prepare("card_mri", raw, tmp_path / "root")
    assert "c0gt" in (error.value.hint or "")
    assert not (tmp_path / "root").exists()


# -- 4. CHAOS as the zip unpacks -----------------------------------------------------------------


def test_chaos_mr_folder_is_found_below_the_unpacked_zip(tmp_path, capsys):
    """CHAOS_Train_Sets.zip unpacks as Train_Sets/{CT,MR}/<pid>; --raw may be above it."""
    top = tmp_path / "CHAOS_Train_Sets"
    write_chaos_raw(top / "Train_Sets", patients=(1, 3))
    (top / "Train_Sets" / "CT" / "1" / "DICOM_anon").mkdir(parents=True)
    assert prepare("abd_mri", top, tmp_path / "root") == 0
    captured = capsys.readouterr()
    assert "2 written" in captured.out
    assert f"reading CHAOS patients from {top / 'Train_Sets' / 'MR'}" in captured.err


def test_chaos_two_mr_folders_at_the_same_depth_are_refused(tmp_path):
    write_chaos_raw(tmp_path / "raw" / "a", patients=(1,))
    write_chaos_raw(tmp_path / "raw" / "b", patients=(2,))
    with pytest.raises(DataError, match="several CHAOS MR folders"):
        prepare("abd_mri", tmp_path / "raw", tmp_path / "root")


# -- 5. entries that are no part of a release ------------------------------------------------------


def test_chaos_system_files_and_notes_are_ignored_with_one_note(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_chaos_raw(raw, patients=(1,))
    mr = raw / "MR"
    (mr / "__MACOSX" / "1").mkdir(parents=True)
    (mr / "__MACOSX" / "1" / "._IMG-0004-00001.dcm").write_bytes(b"\x00\x05")
    (mr / ".DS_Store").write_bytes(b"\x00")
    (mr / "notes.txt").write_text("downloaded 2024\n")
    (mr / "1" / "T2SPIR" / "DICOM_anon" / ".DS_Store").write_bytes(b"\x00")
    # macOS resource forks beside the files (a copy to an exFAT drive makes them)
    (mr / "1" / "T2SPIR" / "DICOM_anon" / "._IMG-0004-00001.dcm").write_bytes(b"\x00\x05")
    (mr / "1" / "T2SPIR" / "Ground" / "._IMG-0004-00001.png").write_bytes(b"\x00\x05")
    assert prepare("abd_mri", raw, tmp_path / "root") == 0
    captured = capsys.readouterr()
    assert "1 written, 0 skipped, 0 failed" in captured.out
    notes = [line for line in captured.err.splitlines() if "hold no scan" in line]
    assert len(notes) == 1
    assert all(name in notes[0] for name in ("__MACOSX/", ".DS_Store", "notes.txt"))


def test_btcv_notes_and_backup_copies_are_ignored_but_damage_still_fails(tmp_path, capsys):
    raw = tmp_path / "RawData"
    write_btcv_raw(raw, ids=(1, 2))
    img = raw / "Training" / "img"
    (img / "notes.txt").write_text("x")
    (img / "img0002.nii.gz.bak").write_bytes((img / "img0002.nii.gz").read_bytes())
    (img / ".DS_Store").write_bytes(b"\x00")
    assert prepare("abd_ct", raw, tmp_path / "root") == 0
    captured = capsys.readouterr()
    assert "2 written, 0 skipped, 0 failed" in captured.out
    assert "ignored 3 entries that hold no scan" in captured.err
    # a truncated scan keeps its data name: it is damage, not a stray file
    data = (img / "img0001.nii.gz").read_bytes()
    (img / "img0001.nii.gz").write_bytes(data[: len(data) // 2])
    assert prepare("abd_ct", raw, tmp_path / "root2") == 2
    assert "FAILED case 0" in capsys.readouterr().out


def test_out_folder_inside_raw_does_not_break_the_next_run(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_chaos_raw(raw, patients=(1, 3))
    out = raw / "MR" / "prepared"
    assert prepare("abd_mri", raw / "MR", out) == 0
    assert prepare("abd_mri", raw / "MR", out) == 0
    captured = capsys.readouterr()
    assert "0 written, 2 skipped, 0 failed" in captured.out
    assert "prepared" not in "".join(line for line in captured.err.splitlines() if "hold no scan" in line)


# -- 6. --force and the supervoxels of the old images ----------------------------------------------


def test_force_removes_the_supervoxels_of_rewritten_cases(tmp_path, capsys):
    raw, root = tmp_path / "raw", tmp_path / "root"
    write_chaos_raw(raw, patients=(1, 3))
    assert prepare("abd_mri", raw, root) == 0
    dataset = root / "CHAOST2"
    stale = []
    for folder in ("supervoxels_5000", "supervoxels_400"):
        (dataset / folder).mkdir()
        for case_id in ("1", "3"):
            path = dataset / folder / f"superpix-MIDDLE_{case_id}.nii.gz"
            sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int32)), str(path))
            stale.append(path)
    other = dataset / "supervoxels_5000" / "superpix-MIDDLE_13.nii.gz"  # a case not in this raw
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 2, 2), np.int32)), str(other))
    capsys.readouterr()
    assert prepare("abd_mri", raw, root) == 0  # nothing rewritten: supervoxels stay
    assert all(p.exists() for p in stale)
    assert prepare("abd_mri", raw, root, "--force") == 0
    out = capsys.readouterr().out
    assert not any(p.exists() for p in stale) and other.exists()
    lines = [line for line in out.splitlines() if "removed the supervoxels" in line]
    assert len(lines) == 1
    assert "1, 3" in lines[0] and "supervoxels_400/" in lines[0] and "supervoxels_5000/" in lines[0]
    assert "fsmis-bench supervoxels abd_mri" in lines[0]


# -- 8. ambiguous and incomplete raw data ----------------------------------------------------------


def test_chaos_patient_folders_1_and_01_are_refused(tmp_path):
    raw = tmp_path / "raw"
    write_chaos_raw(raw, patients=(1, 2))
    (raw / "MR" / "2").rename(raw / "MR" / "01")
    with pytest.raises(DataError, match="patient folders '01' and '1' both mean patient 1"):
        prepare("abd_mri", raw, tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_chaos_missing_end_slice_with_its_mask_present_fails_the_case(tmp_path, capsys):
    """Without the most inferior slice the positions stay even: only the orphan mask tells."""
    raw = tmp_path / "raw"
    write_chaos_raw(raw, patients=(1, 3))
    (raw / "MR" / "3" / "T2SPIR" / "DICOM_anon" / "IMG-0004-00005.dcm").unlink()  # z = 0
    assert prepare("abd_mri", raw, tmp_path / "root") == 2
    out = capsys.readouterr().out
    assert "FAILED case 3" in out and "no DICOM slice in DICOM_anon/ for the mask(s) IMG-0004-00005.png" in out
    assert "1 written" in out


def test_btcv_image_and_label_may_differ_in_extension(tmp_path):
    raw = tmp_path / "RawData"
    write_btcv_raw(raw, ids=(1, 2))
    for path in (raw / "Training" / "img" / "img0002.nii.gz",):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path.with_name("img0002.nii")))
        path.unlink()
    label = raw / "Training" / "label" / "label0001.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(label)), str(label.with_name("label0001.nii")))
    label.unlink()
    assert prepare("abd_ct", raw, tmp_path / "root") == 0


def test_btcv_two_files_of_one_scan_are_refused(tmp_path):
    raw = tmp_path / "RawData"
    write_btcv_raw(raw, ids=(1, 2))
    img = raw / "Training" / "img"
    sitk.WriteImage(sitk.ReadImage(str(img / "img0002.nii.gz")), str(img / "img0002.nii"))
    with pytest.raises(DataError, match="img0002.nii and img0002.nii.gz are both scan 2"):
        prepare("abd_ct", raw, tmp_path / "root")


# -- 9. nothing prepared, nothing left behind -------------------------------------------------------


def test_a_run_where_every_case_fails_leaves_no_folders(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_chaos_raw(raw, patients=(1,))
    mask = raw / "MR" / "1" / "T2SPIR" / "Ground" / "IMG-0004-00002.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((CHAOS_ROWS, CHAOS_COLS), 90, np.uint8)), str(mask))
    assert prepare("abd_mri", raw, tmp_path / "new" / "root") == 2
    assert "FAILED case 1" in capsys.readouterr().out
    assert not (tmp_path / "new" / "root").exists()
    # an --out that existed is the user's: it stays, only what the run created goes
    (tmp_path / "mine").mkdir()
    assert prepare("abd_mri", raw, tmp_path / "mine") == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())
