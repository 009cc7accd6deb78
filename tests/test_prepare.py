"""`fsmis-bench prepare`: tiny raw releases in the original formats -> prepared layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fsmis_bench.preparation import common
from fsmis_bench.preparation.commands import register

# -- tiny raw releases ------------------------------------------------------------------------

CHAOS_ROWS, CHAOS_COLS = 48, 56
CHAOS_PIXEL_SPACING = (6.0, 5.0)  # (row, column) mm: 288 x 280 mm field of view
CHAOS_SLICE_STEP = 7.7
CHAOS_SLICES = 5
CHAOS_ORIGIN = np.array([-140.0, -150.0, -20.0])


def _chaos_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw (Z, rows, cols) intensities and the CHAOS grey masks, Z from inferior to superior."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, size=(CHAOS_SLICES, CHAOS_ROWS, CHAOS_COLS)).astype(np.uint16)
    grey = np.zeros(image.shape, dtype=np.uint8)
    grey[:, 8:20, 6:18] = 63  # liver: anterior (low rows), patient right (low columns)
    grey[1:3, 30:36, 10:16] = 126  # right kidney
    grey[1:3, 30:36, 40:46] = 189  # left kidney
    grey[-1, 20:28, 44:52] = 252  # spleen only in the most superior slice
    image[grey > 0] += 300
    image[2, 40, 50] = 4000  # one spike to be clipped
    return image, grey


def write_chaos_raw(
    raw: Path, patients: tuple[int, ...] = (1, 3)
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A CHAOS_Train_Sets-like tree with DICOM series and PNG masks; returns the truth."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    truth = {}
    for pid in patients:
        image, grey = _chaos_volume(pid)
        truth[pid] = (image, grey)
        series = raw / "MR" / str(pid) / "T2SPIR"
        (series / "DICOM_anon").mkdir(parents=True)
        (series / "Ground").mkdir(parents=True)
        series_uid, study_uid = generate_uid(), generate_uid()
        # files are numbered in the reverse of the anatomical order, as scanners often do
        for z in range(CHAOS_SLICES):
            number = CHAOS_SLICES - z
            name = f"IMG-0004-{number:05d}"
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.Modality = "MR"
            ds.PatientID = f"chaos{pid}"
            ds.InstanceNumber = number
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [float(v) for v in CHAOS_ORIGIN + [0, 0, z * CHAOS_SLICE_STEP]]
            ds.PixelSpacing = list(CHAOS_PIXEL_SPACING)
            ds.SliceThickness = CHAOS_SLICE_STEP
            ds.SpacingBetweenSlices = CHAOS_SLICE_STEP
            ds.Rows, ds.Columns = CHAOS_ROWS, CHAOS_COLS
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.PixelData = image[z].tobytes()
            pydicom.dcmwrite(series / "DICOM_anon" / f"{name}.dcm", ds, enforce_file_format=True)
            sitk.WriteImage(sitk.GetImageFromArray(grey[z]), str(series / "Ground" / f"{name}.png"))
    return truth


def write_btcv_raw(raw: Path, ids: tuple[int, ...] = (1, 2), size: int = 96, slices: int = 4) -> None:
    """RawData/Training/{img,label}/img00XX.nii.gz with HU values and labels 0..13."""
    for number in ids:
        hu = np.full((slices, size, size), -1000.0)  # air
        hu[:, 20:76, 20:76] = 40.0  # soft tissue
        hu[:, 40:50, 30:40] = 1000.0  # bone, above the window
        label = np.zeros(hu.shape, dtype=np.int16)
        label[:, 40:56, 44:58] = 6  # liver, inside the kept 32..63 window
        label[:, 60:70, 30:40] = 1  # spleen
        label[1:3, 36:40, 36:40] = 13  # a tiny left adrenal
        label[:, 2:10, 2:10] = 7  # only inside the 32 px border: must vanish
        for kind, array in (("img", hu.astype(np.int16)), ("label", label)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.8, 0.8, 3.0))
            image.SetOrigin((-38.0, -38.0, 100.0))
            folder = raw / "Training" / kind
            folder.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(folder / f"{kind}{number:04d}.nii.gz"))


CMR_DIRECTION = tuple(
    np.array([[0.628, 0.507, -0.591], [0.729, -0.116, 0.675], [-0.273, 0.854, 0.442]]).T.ravel()
)


def _orthonormal(direction: tuple[float, ...]) -> tuple[float, ...]:
    q, r = np.linalg.qr(np.array(direction).reshape(3, 3))
    return tuple((q * np.sign(np.diag(r))).ravel())


def write_cmr_raw(
    raw: Path,
    ids: tuple[int, ...] = (1, 2),
    shape=(4, 40, 36),
    flat: bool = False,
    unlabelled: tuple[int, ...] = (),
    dtype=np.int16,
) -> None:
    """MS-CMRSeg-like patient<N>_C0.nii.gz + _manual with labels 200/500/600, oblique axes.

    The release layout: images in ``C0LET2_nii45_for_challenge19/c0t2lge/``, labels in the
    sibling ``c0gt/``; ``flat`` puts the labels beside the images instead. ``unlabelled``
    ids get an image only (the release's test scans).
    """
    base = raw / "C0LET2_nii45_for_challenge19"
    rng = np.random.default_rng(0)
    for number in ids:
        image = rng.integers(0, 100, size=shape).astype(dtype)
        if np.issubdtype(dtype, np.floating):
            image = image + rng.random(shape).astype(dtype)
        label = np.zeros(shape, dtype=np.int16)
        label[:, 10:22, 8:20] = 200
        label[:, 13:19, 11:17] = 500
        label[:, 24:32, 20:30] = 600
        image[label > 0] += 500
        for suffix, array in (("", image), ("_manual", label)):
            if suffix and number in unlabelled:
                continue
            folder = base / ("c0t2lge" if not suffix or flat else "c0gt")
            folder.mkdir(parents=True, exist_ok=True)
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing((1.5, 1.4, 8.0))
            itk.SetDirection(_orthonormal(CMR_DIRECTION))
            itk.SetOrigin((95.0, 212.0, -131.0))
            sitk.WriteImage(itk, str(folder / f"patient{number}_C0{suffix}.nii.gz"))


# -- helpers ----------------------------------------------------------------------------------


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def prepared_files(folder: Path) -> list[str]:
    """The image and label files of a prepared folder (not its classmap_*.json or records)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(("image_", "label_")))


def centroid_physical(image: sitk.Image, mask_zyx: np.ndarray) -> np.ndarray:
    z, y, x = np.nonzero(mask_zyx)
    index = (float(x.mean()), float(y.mean()), float(z.mean()))
    return np.array(image.TransformContinuousIndexToPhysicalPoint(index))


# -- abd_mri (CHAOS) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chaos_prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("chaos")
    truth = write_chaos_raw(base / "raw")
    assert (
        run_cli(
            "prepare", "abd_mri", "--raw", str(base / "raw"), "--out", str(base / "root"), "--no-progress"
        )
        == 0
    )
    return base, truth


def test_chaos_geometry_matches_the_prepared_convention(chaos_prepared):
    base, _ = chaos_prepared
    folder = base / "root" / "CHAOST2" / "chaos_MR_T2_normalized"
    assert prepared_files(folder) == [
        "image_1.nii.gz",
        "image_3.nii.gz",
        "label_1.nii.gz",
        "label_3.nii.gz",
    ]
    nii = nib.load(folder / "image_1.nii.gz")
    assert nii.header.get_data_dtype() == np.float64
    assert nib.load(folder / "label_1.nii.gz").header.get_data_dtype() == np.float64
    # the reference's grid: int(n * old / new + 1) voxels per axis, so 5 slices at 7.7 mm
    # become 6 and 280 x 288 mm at 1.25 mm 225 x 231, padded to 256 x 256
    assert nii.shape == (256, 256, CHAOS_SLICES + 1)
    assert np.allclose(nii.header.get_zooms(), (1.25, 1.25, 7.7))
    image = sitk.ReadImage(str(folder / "image_1.nii.gz"))
    # the direction of the distributed CHAOS files (ITK "LAS")
    assert np.allclose(image.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, 1))


def test_chaos_labels_land_where_they_were_in_patient_space(chaos_prepared):
    base, truth = chaos_prepared
    folder = base / "root" / "CHAOST2" / "chaos_MR_T2_normalized"
    _, grey = truth[1]
    label_img = sitk.ReadImage(str(folder / "label_1.nii.gz"))
    label = sitk.GetArrayFromImage(label_img)
    assert set(np.unique(label)) == {0.0, 1.0, 2.0, 3.0, 4.0}
    raw_img = sitk.GetImageFromArray(grey)
    raw_img.SetSpacing((CHAOS_PIXEL_SPACING[1], CHAOS_PIXEL_SPACING[0], CHAOS_SLICE_STEP))
    raw_img.SetOrigin(tuple(CHAOS_ORIGIN))
    for value, grey_value in ((1, 63), (2, 126), (3, 189), (4, 252)):
        expected = centroid_physical(raw_img, grey == grey_value)
        found = centroid_physical(label_img, label == value)
        assert np.allclose(found, expected, atol=3.0), (value, found, expected)
    # orientation as in the real data: liver (patient right, anterior) at low x, high y
    z, y, x = np.nonzero(label == 1)
    assert x.mean() < 128 < y.mean()
    # spleen only in the most superior scanned slice; the extra last slice lies past the scan
    assert np.nonzero(label == 4)[0].tolist() == [CHAOS_SLICES - 1] * int((label == 4).sum())
    assert not label[-1].any()


def test_chaos_intensities_are_clipped_integers(chaos_prepared):
    base, truth = chaos_prepared
    image = sitk.GetArrayFromImage(
        sitk.ReadImage(str(base / "root" / "CHAOST2" / "chaos_MR_T2_normalized" / "image_1.nii.gz"))
    )
    raw = truth[1][0].astype(float)
    assert image.min() >= 0
    assert image.max() <= np.percentile(raw, 99.5) + 1e-6
    assert image.max() < 4000  # the spike is gone
    assert np.all(image == np.rint(image))


def test_chaos_resume_and_force(chaos_prepared, capsys):
    base, _ = chaos_prepared
    raw, root = base / "raw", base / "root"
    folder = root / "CHAOST2" / "chaos_MR_T2_normalized"
    image_path, label_path = folder / "image_3.nii.gz", folder / "label_3.nii.gz"
    marker = sitk.GetImageFromArray(np.zeros((2, 2, 2)))
    sitk.WriteImage(marker, str(image_path))  # a user's file with the same name
    label_path.unlink()  # an interrupted run: the label half is missing
    (folder / ".label_9.partial-123.nii.gz").write_bytes(b"half")  # debris of a killed write
    assert run_cli("prepare", "abd_mri", "--raw", str(raw), "--out", str(root), "--no-progress") == 0
    out = capsys.readouterr()
    assert "--force" in out.err and "1 written, 1 skipped" in out.out
    assert label_path.exists() and not (folder / ".label_9.partial-123.nii.gz").exists()
    assert sitk.ReadImage(str(image_path)).GetSize() == (2, 2, 2)  # not overwritten
    assert run_cli("prepare", "abd_mri", "--raw", str(raw), "--out", str(root), "--no-progress") == 0
    assert "0 written, 2 skipped" in capsys.readouterr().out
    assert (
        run_cli("prepare", "abd_mri", "--raw", str(raw), "--out", str(root), "--force", "--no-progress") == 0
    )
    assert "2 written" in capsys.readouterr().out
    assert sitk.ReadImage(str(image_path)).GetSize() == (256, 256, CHAOS_SLICES + 1)


def test_chaos_corrupt_dicom_and_mask_are_named_and_skipped(tmp_path, capsys):
    raw = tmp_path / "raw"
    write_chaos_raw(raw, patients=(1, 2, 5))
    bad_dicom = raw / "MR" / "2" / "T2SPIR" / "DICOM_anon" / "IMG-0004-00003.dcm"
    bad_dicom.write_bytes(b"not a dicom file at all")
    bad_mask = raw / "MR" / "5" / "T2SPIR" / "Ground" / "IMG-0004-00002.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((CHAOS_ROWS, CHAOS_COLS), 90, np.uint8)), str(bad_mask))
    code = run_cli("prepare", "abd_mri", "--raw", str(raw), "--out", str(tmp_path / "root"), "--no-progress")
    out = capsys.readouterr().out
    assert code == 2
    assert "IMG-0004-00003.dcm" in out and "FAILED case 2" in out
    assert "IMG-0004-00002.png" in out and "unexpected mask grey values [90]" in out
    folder = tmp_path / "root" / "CHAOST2" / "chaos_MR_T2_normalized"
    assert prepared_files(folder) == ["image_1.nii.gz", "label_1.nii.gz"]


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "image_1.nii.gz"

    def crash(image, path, *args):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(common.sitk, "WriteImage", crash)
    with pytest.raises(KeyboardInterrupt):
        common.write_image_atomic(sitk.GetImageFromArray(np.zeros((2, 2, 2))), target)
    assert list(tmp_path.iterdir()) == []


# -- abd_ct (BTCV) ------------------------------------------------------------------------------


def test_btcv_window_crop_resample(tmp_path):
    raw = tmp_path / "RawData"
    write_btcv_raw(raw)
    assert (
        run_cli("prepare", "abd_ct", "--raw", str(raw), "--out", str(tmp_path / "root"), "--no-progress") == 0
    )
    folder = tmp_path / "root" / "SABS" / "sabs_CT_normalized"
    # the reference numbers the scans 0, 1, ... in file order (img0001 -> image_0)
    assert prepared_files(folder) == [
        "image_0.nii.gz",
        "image_1.nii.gz",
        "label_0.nii.gz",
        "label_1.nii.gz",
    ]
    image_img = sitk.ReadImage(str(folder / "image_0.nii.gz"))
    label_img = sitk.ReadImage(str(folder / "label_0.nii.gz"))
    assert nib.load(folder / "image_0.nii.gz").shape == (256, 256, 4)
    assert np.allclose(image_img.GetSpacing(), (0.8 * 32 / 256, 0.8 * 32 / 256, 3.0))
    image = sitk.GetArrayFromImage(image_img)
    label = sitk.GetArrayFromImage(label_img)
    assert image.min() >= 0 and image.max() <= 255
    assert np.isclose(image.max(), 255) and np.isclose(np.median(image), (40 + 125) / 400 * 255, atol=1)
    assert set(np.unique(label)) <= {0, 1, 6, 13} and {1, 6} <= set(np.unique(label))
    # label 7 lived only in the cropped border
    assert 7 not in np.unique(label)
    # the liver stays where it was in patient space
    raw_label = sitk.ReadImage(str(raw / "Training" / "label" / "label0001.nii.gz"))
    expected = centroid_physical(raw_label, sitk.GetArrayFromImage(raw_label) == 6)
    assert np.allclose(centroid_physical(label_img, label == 6), expected, atol=0.2)


def test_btcv_label_grid_mismatch_is_reported(tmp_path, capsys):
    raw = tmp_path / "RawData"
    write_btcv_raw(raw, ids=(1, 2))
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((3, 96, 96), np.int16)),
        str(raw / "Training" / "label" / "label0002.nii.gz"),
    )
    code = run_cli("prepare", "abd_ct", "--raw", str(raw), "--out", str(tmp_path / "root"), "--no-progress")
    out = capsys.readouterr().out
    assert code == 2 and "label0002.nii.gz" in out and "does not match" in out and "1 written" in out
    assert "FAILED case 1:" in out  # img0002 is the second scan: id 1


# -- card_mri (MS-CMRSeg) -----------------------------------------------------------------------


def test_cmr_resample_keeps_orientation_and_labels(tmp_path):
    raw = tmp_path / "MS-CMRSeg"
    write_cmr_raw(raw)
    assert (
        run_cli("prepare", "card_mri", "--raw", str(raw), "--out", str(tmp_path / "root"), "--no-progress")
        == 0
    )
    folder = tmp_path / "root" / "CMR" / "cmr_MR_normalized"
    image_img = sitk.ReadImage(str(folder / "image_2.nii.gz"))
    label_img = sitk.ReadImage(str(folder / "label_2.nii.gz"))
    # 4 slices at 8 mm: int(4 * 8 / 7.99 + 1) = 5 slices at 7.99 mm, the last past the scan
    assert nib.load(folder / "image_2.nii.gz").shape == (256, 256, 5)
    assert nib.load(folder / "label_2.nii.gz").header.get_data_dtype() == np.float64
    assert np.allclose(image_img.GetSpacing(), (1.25, 1.25, 7.99))
    assert np.allclose(image_img.GetDirection(), _orthonormal(CMR_DIRECTION), atol=1e-5)
    label = sitk.GetArrayFromImage(label_img)
    assert set(np.unique(label)) == {0, 200, 500, 600}
    assert not label[-1].any() and not sitk.GetArrayFromImage(image_img)[-1].any()
    raw_label = sitk.ReadImage(str(next(raw.rglob("patient2_C0_manual.nii.gz"))))
    for value in (200, 500, 600):
        expected = centroid_physical(raw_label, sitk.GetArrayFromImage(raw_label) == value)
        assert np.allclose(centroid_physical(label_img, label == value), expected, atol=1.0)
    image = sitk.GetArrayFromImage(image_img)
    assert image.min() == 0 and np.all(image == np.rint(image))  # an integer scan stays integer


def test_cmr_unknown_label_value_and_missing_label(tmp_path, capsys):
    raw = tmp_path / "MS-CMRSeg"
    write_cmr_raw(raw, ids=(1, 2, 3), flat=True)
    folder = next(raw.rglob("patient1_C0.nii.gz")).parent
    bad = sitk.ReadImage(str(folder / "patient2_C0_manual.nii.gz"))
    array = sitk.GetArrayFromImage(bad)
    array[0, 0, 0] = 88
    fixed = sitk.GetImageFromArray(array)
    fixed.CopyInformation(bad)
    sitk.WriteImage(fixed, str(folder / "patient2_C0_manual.nii.gz"))
    (folder / "patient3_C0_manual.nii.gz").unlink()
    code = run_cli("prepare", "card_mri", "--raw", str(raw), "--out", str(tmp_path / "root"), "--no-progress")
    captured = capsys.readouterr()
    assert code == 2
    assert "patient2_C0_manual.nii.gz: unexpected label values [88.0]" in captured.out
    # an image without a label is a scan the release does not label: a note, not a failure
    assert "FAILED case 3" not in captured.out
    assert "skipped 1 C0 image(s) without a manual label (patient 3)" in captured.err
    assert "1 written" in captured.out and "1 failed" in captured.out


def test_prepare_rejects_a_wrong_raw_folder(tmp_path):
    from fsmis_bench.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no MR/<patient>/T2SPIR"):
        run_cli("prepare", "abd_mri", "--raw", str(tmp_path / "empty"), "--out", str(tmp_path / "root"))
