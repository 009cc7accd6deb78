"""`fsmis-bench prepare` against the reference preprocessing (SSL-ALPNet / Q-Net notebooks).

Grid, label resampling, pixel type, padding, SABS ids and the classmap files, checked on
tiny synthetic releases and, where the facts are in the distributed files, on those.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from test_prepare import run_cli, write_btcv_raw, write_chaos_raw

from fsmis_bench.preparation import cmr, common
from fsmis_bench.preparation.classmaps import CLASSMAPS, build_classmaps, write_classmaps

CMR_DIR = "CMR/cmr_MR_normalized"
CHAOS_DIR = "CHAOST2/chaos_MR_T2_normalized"


def write_cmr_case(
    raw: Path, number: int, image: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float]
) -> None:
    """One scan in the MS-CMRSeg release layout (identity axes, origin 0)."""
    base = raw / "C0LET2_nii45_for_challenge19"
    for sub, name, array in (
        ("c0t2lge", f"patient{number}_C0.nii.gz", image),
        ("c0gt", f"patient{number}_C0_manual.nii.gz", label),
    ):
        (base / sub).mkdir(parents=True, exist_ok=True)
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(spacing)
        sitk.WriteImage(itk, str(base / sub / name))


def prepare_cmr(tmp_path: Path, raw: Path) -> Path:
    assert run_cli("prepare", "card_mri", "--raw", str(raw), "--out", str(tmp_path / "root"), "--no-progress") == 0
    return tmp_path / "root" / CMR_DIR


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# -- 1. CMR slice spacing and the label rule ------------------------------------------------------


def test_cmr_slices_are_resampled_to_7_99_mm(tmp_path):
    """Q-Net's NEW_SPA = (1.25, 1.25, 7.99) for every scan: 12 mm slices are resampled too."""
    shape = (6, 40, 40)
    image = np.full(shape, 100, np.int16)
    label = np.zeros(shape, np.int16)
    label[:, 10:30, 10:30] = 500
    write_cmr_case(tmp_path / "raw", 1, image, label, (1.25, 1.25, 12.0))
    prepared = sitk.ReadImage(str(prepare_cmr(tmp_path, tmp_path / "raw") / "image_1.nii.gz"))
    assert np.allclose(prepared.GetSpacing(), (1.25, 1.25, 7.99))
    # 6 x 12 mm = 72 mm: int(72 / 7.99 + 1) = 10 slices, not the raw 6
    assert prepared.GetSize()[2] == 10


def test_shipped_cmr_and_chaos_files_have_the_target_spacing(real_data_root):
    """The distributed files are the reference's output: our targets must be their spacing."""
    from fsmis_bench.preparation import chaos

    for folder, target in ((CMR_DIR, cmr.TARGET_SPACING_XYZ), (CHAOS_DIR, chaos.TARGET_SPACING_XYZ)):
        for path in sorted((real_data_root / folder).glob("image_*.nii.gz")):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            assert np.allclose(reader.GetSpacing(), target, atol=1e-4), (path.name, reader.GetSpacing())


def test_label_voxel_needs_more_than_half_a_share(tmp_path):
    """Labels follow the reference's per-value linear masks rounded to 1, not nearest neighbour.

    In-plane 1.0 mm -> 1.25 mm samples raw x = 0, 1.25, 2.5, 3.75, 5, ...: a one-voxel
    line at raw x = 3 is at most half covered by any sample (at 2.5), so it vanishes, where
    nearest neighbour (2.5 -> 3) would keep it; a line at x = 10 is hit exactly and stays.
    """
    shape = (3, 41, 41)
    image = np.full(shape, 100, np.int16)
    label = np.zeros(shape, np.int16)
    label[:, 10:30, 3] = 600
    label[:, 10:30, 10] = 200
    label[:, 20:23, 20:23] = 500
    write_cmr_case(tmp_path / "raw", 1, image, label, (1.0, 1.0, 7.99))
    out = read(prepare_cmr(tmp_path, tmp_path / "raw") / "label_1.nii.gz")
    assert 600 not in np.unique(out)
    columns = np.nonzero((out == 200).any(axis=(0, 1)))[0]
    assert len(columns) == 1  # the x = 10 line: one output column (x = 8 before the padding)
    assert {0, 200, 500} == set(np.unique(out).tolist())


# -- 2. the reference's grid size, pixel type and padding ----------------------------------------


@pytest.mark.parametrize(
    ("slices", "step", "expected", "last_is_empty"),
    [
        (5, 7.7, 6, True),  # int(5 + 1): one plane a full voxel past the scan reads 0
        (5, 7.0, 5, False),  # int(4.55 + 1): the last plane is within the scan's last voxel
        (8, 8.8, 10, True),  # int(9.14 + 1)
    ],
)
def test_grid_is_int_n_plus_one_with_an_empty_plane_past_the_scan(slices, step, expected, last_is_empty):
    """``int(n * old / new + 1)`` per axis: why 16 of 20 CHAOS files end with an empty slice."""
    image = sitk.GetImageFromArray(np.full((slices, 48, 56), 7, np.int16))
    image.SetSpacing((5.0, 6.0, step))
    out = common.resample_to_spacing(image, (1.25, 1.25, 7.7), sitk.sitkLinear)
    # 56 x 5 mm -> int(224 + 1); 48 x 6 mm -> int(230.4 + 1)
    assert out.GetSize() == (225, 231, expected)
    array = sitk.GetArrayFromImage(out)
    # in-plane the last column and row lie past the scan too (280 mm > 275 + 2.5 mm)
    assert not array[:, :, -1].any() and not array[:, -1, :].any()
    inside = array[:, :200, :200]
    assert (not inside[-1].any()) == last_is_empty
    assert inside[:-1].min() == 7 and out.GetPixelID() == image.GetPixelID()


def test_float_cmr_scan_keeps_its_fractional_values(tmp_path):
    """The reference resamples in the scan's own type: 7 of the 35 shipped CMR images are
    float-valued (from float raw files); an integer scan comes out integer (truncated)."""
    rng = np.random.default_rng(0)
    shape = (4, 40, 40)
    label = np.zeros(shape, np.int16)
    label[:, 10:30, 10:30] = 500
    image = (100 + 50 * rng.random(shape)).astype(np.float32)
    write_cmr_case(tmp_path / "raw", 1, image, label, (1.3, 1.3, 8.0))
    out = read(prepare_cmr(tmp_path, tmp_path / "raw") / "image_1.nii.gz")
    body = out[out > 0]
    assert np.mean(body != np.rint(body)) > 0.9


def test_image_is_padded_with_its_minimum(tmp_path):
    """The reference pads the image with its minimum: 0 in most scans (the empty last plane),
    the scan's own floor when the grid stays inside the scan on every axis."""
    shape = (5, 41, 41)  # 41 x 1.0 / 1.25 -> 33 planes, the last at 40 mm: inside; z likewise
    image = np.full(shape, 50, np.int16)
    image[:, 10:30, 10:30] = 90
    label = np.zeros(shape, np.int16)
    label[:, 12:28, 12:28] = 500
    write_cmr_case(tmp_path / "raw", 1, image, label, (1.0, 1.0, 7.5))
    folder = prepare_cmr(tmp_path, tmp_path / "raw")
    out = read(folder / "image_1.nii.gz")
    assert out.shape == (5, 256, 256)
    assert out.min() == 50 and out[0, 0, 0] == 50  # padding, not 0
    assert read(folder / "label_1.nii.gz")[0, 0, 0] == 0


# -- 7. SABS ids ---------------------------------------------------------------------------------


def test_btcv_ids_are_positions_in_file_order(tmp_path):
    """image_0, image_1, ... in the order of the sorted file names, as the reference numbers
    them; the id-sorted list (what folds index) keeps the order of the BTCV numbers."""
    raw = tmp_path / "RawData"
    slices = {21: 3, 1: 4, 10: 5, 2: 6}  # a different slice count tells the scans apart
    for number, count in slices.items():
        write_btcv_raw(raw, ids=(number,), slices=count)
    assert run_cli("prepare", "abd_ct", "--raw", str(raw), "--out", str(tmp_path / "root"), "--no-progress") == 0
    folder = tmp_path / "root" / "SABS" / "sabs_CT_normalized"
    found = {
        int(p.name[6:-7]): nib.load(p).shape[2] for p in folder.glob("image_*.nii.gz")
    }
    assert found == {0: 4, 1: 6, 2: 5, 3: 3}  # img0001, img0002, img0010, img0021
    classmap = json.loads((folder / "classmap_1.json").read_text())
    assert list(classmap["LIVER"]) == ["0", "1", "2", "3"]


def test_resuming_into_a_folder_of_other_scans_is_refused(tmp_path, capsys):
    """Ids are positions, so adding a scan renumbers the others: an existing image_0 of
    another scan is not kept as if it were this one."""
    raw, root = tmp_path / "RawData", tmp_path / "root"
    write_btcv_raw(raw, ids=(2, 3))
    assert run_cli("prepare", "abd_ct", "--raw", str(raw), "--out", str(root), "--no-progress") == 0
    capsys.readouterr()
    write_btcv_raw(raw, ids=(1,))  # now img0001 is scan 0, img0002 scan 1
    assert run_cli("prepare", "abd_ct", "--raw", str(raw), "--out", str(root), "--no-progress") == 2
    out = capsys.readouterr().out
    assert "image_0.nii.gz" in out and "was prepared from img0002, but id 0 is now img0001" in out
    assert "--force" in out
    assert run_cli("prepare", "abd_ct", "--raw", str(raw), "--out", str(root), "--force", "--no-progress") == 0
    assert "3 written" in capsys.readouterr().out


# -- 10. classmap_<n>.json -----------------------------------------------------------------------


@pytest.mark.parametrize(("dataset", "folder"), [("card_mri", CMR_DIR), ("abd_mri", CHAOS_DIR)])
def test_classmaps_match_the_distributed_files_byte_for_byte(real_data_root, tmp_path, dataset, folder):
    shipped = real_data_root / folder
    for path in shipped.glob("*_*.nii.gz"):
        if path.name.startswith(("image_", "label_")):
            (tmp_path / path.name).symlink_to(path)  # read in place, never written
    written = write_classmaps(dataset, tmp_path)
    assert [p.name for p in written] == [f"classmap_{n}.json" for n in CLASSMAPS[dataset].thresholds]
    for path in written:
        assert path.read_bytes() == (shipped / path.name).read_bytes(), path.name


def test_classmap_rules_of_the_two_notebooks():
    """CHAOS/CMR list a slice when the class occurs and the slice's label values sum to >= n;
    SABS when >= n pixels are the class."""
    label = np.zeros((2, 20, 20))
    label[0, :6, :10] = 1  # 60 px liver
    label[0, 10:13, :10] = 4  # 30 px spleen: the slice sums to 60 + 120 = 180
    chaos = build_classmaps("abd_mri", {"5": label})[100]
    assert chaos["LIVER"] == {"5": [0]} and chaos["SPLEEN"] == {"5": [0]} and chaos["BG"] == {"5": [0]}
    assert chaos["RK"] == {"5": []}
    sabs = build_classmaps("abd_ct", {"0": label})
    assert sabs[100]["SPLEEN"] == {"0": []} and sabs[1]["SPLEEN"] == {"0": [0]}
    assert sabs[1]["BGD"] == {"0": [0, 1]}
    cardiac = build_classmaps("card_mri", {"1": np.where(label == 1, 200.0, 0.0)})
    assert cardiac[1]["LV-MYO"] == {"1": [0]} and cardiac[200]["LV-MYO"] == {"1": []}  # 60 x 1 < 200


def test_prepare_writes_the_classmaps(tmp_path):
    raw = tmp_path / "raw"
    write_chaos_raw(raw, patients=(1, 3))
    assert run_cli("prepare", "abd_mri", "--raw", str(raw), "--out", str(tmp_path / "root"), "--no-progress") == 0
    folder = tmp_path / "root" / CHAOS_DIR
    for n in (1, 100, 400):
        classmap = json.loads((folder / f"classmap_{n}.json").read_text())
        assert list(classmap) == ["BG", "LIVER", "RK", "LK", "SPLEEN"]
        assert list(classmap["LIVER"]) == ["1", "3"]
    liver_slices = json.loads((folder / "classmap_1.json").read_text())["LIVER"]["1"]
    label = read(folder / "label_1.nii.gz")
    assert liver_slices == [z for z in range(label.shape[0]) if (label[z] == 1).any()]
