"""Your own data, audited: what a folder of scans can get wrong, and how the run, check-data
and export say so (oblique and mirrored scans, duplicate ids, label values and maps,
changed files under export, modalities, folds, messages, field of view, 4-D files).

Every volume is tiny (24 x 24 x 8 voxels of 1.25 x 1.25 x 4 mm: a square field of view),
so each test takes a second or two.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from fsmis_bench.api import load_dataset
from fsmis_bench.cli import main
from fsmis_bench.config import compose
from fsmis_bench.data.options import read_label_map
from fsmis_bench.errors import ConfigError, DataError, DataWarning

SHAPE = (24, 24, 8)
LAS = np.array([[-1.25, 0, 0, 15.0], [0, 1.25, 0, -15.0], [0, 0, 4.0, 0.0], [0, 0, 0, 1]])
LABEL_MAP = "{liver:1,spleen:2}"


def _rotation_z(degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rotation


def _scan(index: int) -> tuple[np.ndarray, np.ndarray]:
    """An (x, y, z) image and label: a liver block and a spleen block moving with ``index``."""
    rng = np.random.default_rng(index)
    label = np.zeros(SHAPE, dtype=np.int16)
    shift = index % 3
    label[3 + shift:12 + shift, 4:14, 1:7] = 1
    label[15:21, 12 + shift:20, 2:7] = 2
    image = rng.normal(100.0, 8.0, SHAPE) + 60.0 * (label == 1) + 120.0 * (label == 2)
    image[0, 0, :] = 0.0  # asymmetric: a flip changes the array
    return image.astype(np.float32), label


def _store(path: Path, data: np.ndarray, affine: np.ndarray = LAS, axcodes: str = "LAS") -> None:
    """(x, y, z) LAS data stored in ``axcodes`` with ``affine`` (the LAS affine) kept consistent."""
    transform = ornt_transform(axcodes2ornt("LAS"), axcodes2ornt(axcodes))
    nib.save(nib.Nifti1Image(apply_orientation(data, transform), affine @ inv_ornt_aff(transform, data.shape)),
             str(path))


def make_folder(folder: Path, n: int = 3, affines: dict | None = None, axcodes: dict | None = None,
                label_fn=None, image_fn=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        image, label = _scan(i)
        if image_fn is not None:
            image = image_fn(i, image)
        if label_fn is not None:
            label = label_fn(i, label)
        affine, codes = (affines or {}).get(i, LAS), (axcodes or {}).get(i, "LAS")
        _store(folder / f"image_{i}.nii.gz", image, affine, codes)
        _store(folder / f"label_{i}.nii.gz", label, affine, codes)
    return folder


def _args(folder: Path, *extra: str, label_map: str = LABEL_MAP) -> list[str]:
    return ["method=support_copy", "dataset=phantom", "protocol.test_dataset=nifti_folder",
            f"test_dataset.path={folder}", f"+test_dataset.label_map={label_map}", *extra]


def _check(folder: Path, *extra: str, label_map: str = LABEL_MAP) -> list[str]:
    return ["check-data", "nifti_folder", "--path", str(folder), "--label-map", label_map, *extra]


def _run_dir(results_dir: Path) -> Path:
    (run_json,) = results_dir.glob("support_copy/phantom_to_nifti_folder/*/*/*/run.json")
    return run_json.parent


def _plan_warnings(folder: Path, *extra: str) -> str:
    from fsmis_bench.runner import plan

    with pytest.warns(DataWarning) as caught:
        plan(compose(_args(folder, *extra)))
    return "\n".join(str(w.message) for w in caught)


# -- 1, 2. oblique scans, and support/query axes far apart as read ---------------------------
def test_oblique_scans_near_45_degrees_warn_in_the_run_and_check_data(tmp_path, capsys):
    """Support rotated 50 degrees, queries 40 about z: each is reoriented to other nearest
    axes, so they end up turned 80 degrees against each other (the audit's Dice 0)."""
    folder = make_folder(tmp_path / "oblique", affines={i: _rotation_z(50 if i == 3 else 40) @ LAS for i in (1, 2, 3)})
    text = _plan_warnings(folder)
    assert "scan 3: stored oblique, its voxel axes up to 40 degrees off the patient's axes" in text
    assert "support scan 3 and query scan 1 lie 80 degrees apart as read (LAS" in text
    assert "orientation=as_stored brings them together (10 degrees apart)" in text
    assert main(_check(folder)) == 0
    out = capsys.readouterr().out
    assert "scans 1 and 3 lie 80 degrees apart as read" in out and "stored oblique" in out
    # read as stored, the three are 10 degrees apart: no pair warning, no obliquity warning
    from fsmis_bench.runner import plan

    with warnings_recorded() as caught:
        plan(compose(_args(folder, "test_dataset.orientation=as_stored")))
    assert not any("apart as read" in m or "oblique" in m for m in caught)
    # a scan 20 degrees off is within the tolerance
    mild = make_folder(tmp_path / "mild", affines={i: _rotation_z(20) @ LAS for i in (1, 2, 3)})
    with warnings_recorded() as caught:
        load_dataset("nifti_folder", path=str(mild), label_map=LABEL_MAP).load("1")
    assert not any("oblique" in m for m in caught)


def test_as_stored_support_and_query_mirrored_against_each_other_warn(tmp_path, capsys):
    folder = make_folder(tmp_path / "flipped", axcodes={1: "RAS", 2: "LPS"})
    text = _plan_warnings(folder, "test_dataset.orientation=as_stored")
    assert "support scan 3 and query scan 1 lie 180 degrees apart as read (as_stored; stored LAS and RAS)" in text
    assert "seen mirrored" in text and "orientation=LAS brings them together (0 degrees apart)" in text
    assert "query scan 2 lie 180 degrees apart" in text
    assert main(_check(folder, "--orientation", "as_stored")) == 0
    assert "scans 1 and 2 lie 180 degrees apart as read" in capsys.readouterr().out
    # the default LAS reads the three alike: no warning about their axes
    with warnings_recorded() as caught:
        from fsmis_bench.runner import plan

        plan(compose(_args(folder)))
    assert not any("apart as read" in m for m in caught)


class warnings_recorded:  # noqa: N801 - a context manager, used like pytest.warns
    """Every DataWarning's text, without failing when there is none."""

    def __enter__(self) -> list[str]:
        import warnings

        self._context = warnings.catch_warnings(record=True)
        self._caught = self._context.__enter__()
        warnings.simplefilter("always", DataWarning)
        self.messages: list[str] = []
        return self.messages

    def __exit__(self, *exc) -> bool:
        self.messages.extend(str(w.message) for w in self._caught if issubclass(w.category, DataWarning))
        self._context.__exit__(*exc)
        return False


# -- 3. duplicate ids ---------------------------------------------------------------------------
def test_two_files_for_one_scan_id_are_refused(tmp_path, capsys):
    folder = make_folder(tmp_path / "dup")
    image, label = _scan(7)
    nib.save(nib.Nifti1Image(image, LAS), str(folder / "image_1.nii"))
    with pytest.raises(DataError, match=r"scan 1 has two files in .*: image_1.nii and image_1.nii.gz"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).case_ids()
    assert main(["run", *_args(folder)]) == 2
    assert "image_1.nii and image_1.nii.gz" in capsys.readouterr().err
    assert main(_check(folder)) == 2
    assert "image_1.nii and image_1.nii.gz" in capsys.readouterr().out
    (folder / "image_1.nii").unlink()
    for kind, data in (("image", image), ("label", label)):
        nib.save(nib.Nifti1Image(data, LAS), str(folder / f"{kind}_01.nii.gz"))
    with pytest.raises(DataError, match="scan ids 01 and 1 .* are the same number"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).case_ids()


# -- 4. non-integer labels ----------------------------------------------------------------------
def test_non_integer_labels_are_refused_by_the_run_as_by_check_data(tmp_path, capsys, results_dir):
    def fractional(i, label):
        label = label.astype(np.float32)
        if i == 2:
            label[label == 1] = 1.4  # a linearly resampled label: rounding would hide it
        return label

    folder = make_folder(tmp_path / "frac", label_fn=fractional)
    with pytest.raises(DataError, match=r"label_2.nii.gz holds non-integer label values \(1.4\)"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("2")
    assert main(["run", *_args(folder)]) == 2
    err = capsys.readouterr().err
    assert "label_2.nii.gz holds non-integer label values" in err and "nearest-neighbour" in err
    assert "Traceback" not in err and not results_dir.exists()
    assert main(_check(folder)) == 2
    assert "case 2: label_2.nii.gz holds non-integer label values (1.4)" in capsys.readouterr().out
    # float labels holding whole numbers are fine
    whole = make_folder(tmp_path / "whole", label_fn=lambda i, label: label.astype(np.float32))
    assert load_dataset("nifti_folder", path=str(whole), label_map=LABEL_MAP).load("2").label.max() == 2


# -- 5. label maps --------------------------------------------------------------------------------
@pytest.mark.parametrize("mapping, message", [
    ({"liver": 1, "spleen": 0}, "'spleen' has the label value 0, which is the background"),
    ({"liver": 1, "spleen": 1}, "'liver' and 'spleen' share the label value 1"),
])
def test_label_map_with_background_or_shared_values_is_refused(tmp_path, mapping, message, capsys):
    with pytest.raises(ConfigError, match=message) as error:
        read_label_map(mapping)
    assert error.value.hint
    folder = make_folder(tmp_path / "scans")
    text = "{" + ",".join(f"{k}:{v}" for k, v in mapping.items()) + "}"
    assert main(["run", *_args(folder, label_map=text)]) == 2
    err = capsys.readouterr().err
    assert message in err and "hint:" in err and "Traceback" not in err


# -- 6, 9, 10, 14. export ------------------------------------------------------------------------
def test_export_refuses_changed_files_and_never_leaves_partial_masks(tmp_path, results_dir, capsys, monkeypatch):
    folder = make_folder(tmp_path / "scans")
    assert main(["run", *_args(folder)]) == 0
    run_dir = _run_dir(results_dir)
    image, label = _scan(9)  # scan 1 replaced by another one after the run
    _store(folder / "image_1.nii.gz", image)
    _store(folder / "label_1.nii.gz", label)
    out = tmp_path / "masks"
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "changed since the run" in err and "files_sha256" in err and "Traceback" not in err
    assert not out.exists()
    # restored: the export works, through a temporary folder moved into place
    make_folder(folder)
    import fsmis_bench.export as export_module

    calls = []
    real = export_module._save

    def failing(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(path))
        real(image, path)

    monkeypatch.setattr(export_module, "_save", failing)
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "cannot write masks to" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".masks.export-*"))  # nothing half-written
    monkeypatch.setattr(export_module, "_save", real)
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["masks.csv"] + [f"pred_{c}{o}.nii.gz" for c in ("1", "2") for o in ("", "_liver", "_spleen")])
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # an ordinary folder, not mkdtemp's
    # --force into a folder another export wrote: its masks of other scans go
    (out / "pred_99_liver.nii.gz").write_bytes(b"stale")
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert f"fsmis-bench export {run_dir} --out {out} --force" in capsys.readouterr().err
    monkeypatch.setattr(export_module, "_save", failing)  # a failure into an existing folder changes nothing
    calls.clear()
    assert main(["export", str(run_dir), "--out", str(out), "--force"]) == 2
    assert (out / "pred_99_liver.nii.gz").exists() and not list(out.glob(".export-*"))
    monkeypatch.setattr(export_module, "_save", real)
    assert main(["export", str(run_dir), "--out", str(out), "--force"]) == 0
    assert not (out / "pred_99_liver.nii.gz").exists() and not list(out.glob(".export-*"))
    # --out that is a file, or under one
    (tmp_path / "a_file").write_text("x")
    for target in (tmp_path / "a_file", tmp_path / "a_file" / "sub"):
        assert main(["export", str(run_dir), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert "a_file is a file, not a folder" in err and "Traceback" not in err


def test_export_masks_is_checked_before_the_run(tmp_path, results_dir, capsys, monkeypatch):
    folder = make_folder(tmp_path / "scans")
    out = tmp_path / "masks"
    out.mkdir()
    (out / "masks.csv").write_text("case_id\n")
    assert main(["run", *_args(folder), "--export-masks", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds exported masks" in err and "--out" in err and "--force" in err
    assert "fsmis-bench export" in err and not results_dir.exists()  # refused before anything ran
    (tmp_path / "a_file").write_text("x")
    assert main(["run", *_args(folder), "--export-masks", str(tmp_path / "a_file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and not results_dir.exists()
    import fsmis_bench.export as export_module

    monkeypatch.setattr(export_module, "can_write_in", lambda folder: False)
    assert main(["run", *_args(folder), "--export-masks", str(tmp_path / "new")]) == 2
    assert "is not writable" in capsys.readouterr().err and not results_dir.exists()


def test_export_masks_of_a_dataset_made_in_memory_is_refused_before_the_run(tmp_path, results_dir, capsys):
    """The phantom has no scan files: its masks used to fail after the run, with a hint to
    `fsmis-bench export`, which fails the same way."""
    out = tmp_path / "masks"
    assert main(["run", "method=support_copy", "dataset.size=64", "--export-masks", str(out)]) == 2
    err = capsys.readouterr().err
    assert "phantom is made in memory" in err and "drop --export-masks" in err and "Traceback" not in err
    assert not results_dir.exists() and not out.exists()


def test_writability_is_found_by_writing_not_by_permission_bits(tmp_path):
    from fsmis_bench.records import can_write_in

    # os.access says yes to root everywhere; /proc refuses a new file even to root
    assert can_write_in(tmp_path) and not list(tmp_path.iterdir())  # the probe file is gone
    assert not can_write_in(Path("/proc"))


def test_an_export_removes_the_staging_folders_of_killed_exports_of_this_host_only(tmp_path, results_dir):
    from fsmis_bench.export import host_tag

    folder = make_folder(tmp_path / "scans")
    assert main(["run", *_args(folder)]) == 0
    host = host_tag()
    dead = 4_194_305  # above Linux's largest process id: no process has it
    killed = tmp_path / f".masks.export-{host}-{dead}-abc123"
    running = tmp_path / f".masks.export-{host}-{os.getpid()}-def456"
    elsewhere = tmp_path / f".masks.export-another-node-{dead}-ghi789"
    for stale in (killed, running, elsewhere):
        stale.mkdir()
        (stale / "pred_1.nii.gz").write_bytes(b"half")
    assert main(["export", str(_run_dir(results_dir)), "--out", str(tmp_path / "masks")]) == 0
    assert not killed.exists() and running.exists() and elsewhere.exists()


@pytest.mark.parametrize("value, dtype", [(-1, np.int16), (70000, np.int32), (40000, np.uint16), (4, np.uint8)])
def test_exported_label_maps_hold_any_label_value(tmp_path, results_dir, value, dtype):
    folder = make_folder(tmp_path / "scans", label_fn=lambda i, label: np.where(label == 1, value, 0).astype(np.int32))
    out = tmp_path / "masks"
    assert main(["run", *_args(folder, label_map=f"{{liver:{value}}}"), "--export-masks", str(out)]) == 0
    combined = nib.load(str(out / "pred_1.nii.gz"))
    assert combined.get_data_dtype() == dtype
    assert set(np.unique(np.asarray(combined.dataobj))) == {0, value}


def test_masks_of_a_4d_file_have_its_shape(tmp_path, results_dir):
    folder = tmp_path / "fourd"
    folder.mkdir()
    for i in (1, 2, 3):
        image, label = _scan(i)
        nib.save(nib.Nifti1Image(image[..., None], LAS), str(folder / f"image_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label[..., None], LAS), str(folder / f"label_{i}.nii.gz"))
    out = tmp_path / "masks"
    assert main(["run", *_args(folder), "--export-masks", str(out)]) == 0
    for name in ("pred_1.nii.gz", "pred_1_liver.nii.gz"):
        exported = nib.load(str(out / name))
        assert exported.shape == (*SHAPE, 1) and np.allclose(exported.affine, LAS)
    assert main(_check(folder)) == 0  # check-data reads it as the run does


# -- 7. modality named against the stored values --------------------------------------------
def test_modality_named_against_the_values_warns(tmp_path):
    folder = make_folder(tmp_path / "mri")
    with pytest.warns(DataWarning, match="scan 1: named ct, but its values do not look like Hounsfield units"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality="ct").load("1")
    hu = make_folder(tmp_path / "ct", image_fn=lambda i, image: np.where(image > 50, image, -1000.0).astype(np.float32))
    with pytest.warns(DataWarning, match="scan 2: named mri, but its values look like Hounsfield units"):
        load_dataset("nifti_folder", path=str(hu), label_map=LABEL_MAP, modality={"1": "ct", "2": "mri", "3": "ct"}
                     ).load("2")
    with warnings_recorded() as caught:
        load_dataset("nifti_folder", path=str(hu), label_map=LABEL_MAP, modality="ct").load("1")
    assert not any("named" in m for m in caught)
    from fsmis_bench.data.consistency import guess_modality

    assert "scl_slope" in guess_modality.__doc__  # the advice for CT stored without its rescale


# -- 8. folds of a test folder -------------------------------------------------------------------
def test_a_test_folder_evaluated_on_one_fold_of_five_says_so(tmp_path, results_dir, capsys):
    folder = make_folder(tmp_path / "ten", n=10)
    assert main(["run", *_args(folder)]) == 0
    err = capsys.readouterr().err
    assert "fold 0 of 5: 3 of 10 scans evaluated (test_dataset.folds=all evaluates all 10 in one fold" in err
    assert main(["run", *_args(folder, "test_dataset.folds=all")]) == 0
    assert "scans evaluated" not in capsys.readouterr().err
    runs = sorted(results_dir.glob("support_copy/phantom_to_nifti_folder/*/*/*/cases.csv"), key=os.path.getmtime)
    assert pd.read_csv(runs[-1], dtype={"case_id": str}).case_id.nunique() == 9  # every scan but the support
    # in-domain folds are unchanged and not announced
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP)
    assert len(dataset.folds) == 5 and dataset.fold_cases(0) == ["1", "2", "3"]


# -- 11. check-data and the run agree -------------------------------------------------------------
def test_check_data_and_the_run_agree(tmp_path, results_dir, capsys):
    # a sheared affine (SimpleITK refuses it) and a 4-D file: both read by the run's reader
    sheared = LAS.copy()
    sheared[0, 1] = 0.25
    folder = make_folder(tmp_path / "shear", affines={i: sheared for i in (1, 2, 3)})
    assert main(_check(folder)) == 0
    assert main(["run", *_args(folder)]) == 0
    capsys.readouterr()
    # an orphan label and label values outside the map: warnings in both
    folder = make_folder(tmp_path / "orphan", label_fn=lambda i, label: np.where(label == 2, 7, label) if i == 1
                         else label)
    nib.save(nib.Nifti1Image(_scan(9)[1], LAS), str(folder / "label_9.nii.gz"))
    assert main(_check(folder)) == 0
    out = capsys.readouterr().out
    assert "label_9.nii.gz has no image_<id> file" in out
    assert "case 1: label values [7] are not in the label map" in out and "case 1: shows no spleen" in out
    with pytest.warns(DataWarning) as caught:
        from fsmis_bench.runner import plan

        plan(compose(_args(folder)))
    text = "\n".join(str(w.message) for w in caught)
    assert "label_9.nii.gz" in text and "scan 1: label values [7]" in text and "scan 1: shows no spleen" in text
    # a constant image: refused by both
    folder = make_folder(tmp_path / "const", image_fn=lambda i, image: np.zeros_like(image) if i == 2 else image)
    assert main(_check(folder)) == 2
    assert "case 2: image_2.nii.gz is constant" in capsys.readouterr().out
    assert main(["run", *_args(folder)]) == 2
    assert "image_2.nii.gz is constant" in capsys.readouterr().err
    # two scans: check-data says that the default support position is outside the fold
    folder = make_folder(tmp_path / "two", n=2)
    assert main(_check(folder)) == 0
    assert "default protocol.supp_idx=2" in capsys.readouterr().out
    assert main(["run", *_args(folder)]) == 2
    assert main(["run", *_args(folder, "protocol.supp_idx=0")]) == 0


# -- 12. messages -----------------------------------------------------------------------------
def test_messages_name_the_real_cause(tmp_path, capfd, monkeypatch):
    # a label shifted by 5 voxels: same shape and axis codes, so the shift is what differs
    folder = make_folder(tmp_path / "shift")
    shifted = LAS.copy()
    shifted[:3, 3] += shifted[:3, 0] * 5
    _store(folder / "label_2.nii.gz", _scan(2)[1], shifted)
    with pytest.raises(DataError, match=r"same size, but origin shifted by \(-6.25, \+0.00, \+0.00\) mm"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("2")
    # a voxel size of 0: refused with the reason, and no stray nibabel line
    folder = make_folder(tmp_path / "zero")
    image = nib.load(str(folder / "image_2.nii.gz"))
    broken = nib.Nifti1Image(np.asarray(image.dataobj), None)
    broken.header["pixdim"][1:4] = [0.0, 1.25, 4.0]
    nib.save(broken, str(folder / "image_2.nii.gz"))
    capfd.readouterr()
    with pytest.raises(DataError, match=r"image_2.nii.gz: the header gives a voxel size of 0 \(pixdim\[1..3\] = 0"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("2")
    assert "setting 0 dims" not in capfd.readouterr().err
    # a path that is a file, or found nowhere: every place tried is named
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans.txt").write_text("x")
    for path, cause in (("scans.txt", "scans.txt is a file, not a folder"), ("nowhere", "nowhere does not exist")):
        with pytest.raises(DataError) as error:
            load_dataset("nifti_folder", tmp_path / "root", path=path, label_map=LABEL_MAP).case_ids()
        assert cause in error.value.message and str(tmp_path / "root" / path) in error.value.message
        assert "working directory" in error.value.hint
    # the label map gives liver the wrong value: said so, not "pick another support"
    folder = make_folder(tmp_path / "values", label_fn=lambda i, label: np.where(label == 1, 6, label))
    from fsmis_bench.runner import plan

    with pytest.raises(DataError, match=r"no scan of fold 0 \(1, 2, 3\) holds label value 1 \(liver in "
                                        r"test_dataset.label_map\); their label files hold the values \[2, 6\]"):
        with warnings_recorded():
            plan(compose(_args(folder)))


def test_nibabel_header_messages_reach_no_root_handler(tmp_path):
    """A handler on the root logger (Hydra's, a notebook's) sees none of nibabel's header
    messages: they become the load's own error, with the file named."""
    import io
    import logging

    folder = make_folder(tmp_path / "zero")
    image = nib.load(str(folder / "image_2.nii.gz"))
    broken = nib.Nifti1Image(np.asarray(image.dataobj), None)
    broken.header["pixdim"][1:4] = [0.0, 1.25, 4.0]
    nib.save(broken, str(folder / "image_2.nii.gz"))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(DataError, match=r"image_2.nii.gz: the header gives a voxel size of 0"):
            load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("2")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "setting 0 dims" not in stream.getvalue()


# -- 13. field of view ----------------------------------------------------------------------------
def test_a_field_of_view_far_from_square_warns(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in (1, 2, 3):
        image, label = _scan(i)
        pad = ((4, 4), (0, 0), (0, 0))  # 32 x 24 pixels of 1.25 mm: 40 x 30 mm
        _store(folder / f"image_{i}.nii.gz", np.pad(image, pad, constant_values=1.0))
        _store(folder / f"label_{i}.nii.gz", np.pad(label, pad))
    with pytest.warns(DataWarning, match=r"slices cover 40 x 30 mm \(32 x 24 pixels of 1.25 x 1.25 mm\).*"
                                         r"narrower by a factor 1.33"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("1")
    with warnings_recorded() as caught:  # a square field of view
        load_dataset("nifti_folder", path=str(make_folder(tmp_path / "square")), label_map=LABEL_MAP).load("1")
    assert not any("slices cover" in m for m in caught)



# -- files that are not a single-channel real volume, or not a file --------------------------
def _rgb(data: np.ndarray) -> np.ndarray:
    channels = np.clip(data, 0, 255).astype(np.uint8)
    rgb = np.zeros(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for name in ("R", "G", "B"):
        rgb[name] = channels
    return rgb


@pytest.mark.parametrize("kind, replace, message", [
    ("image", lambda i, x: _rgb(x) if i == 2 else x, r"image_2.nii.gz holds colour voxels \(R, G, B\); a single-channel"),
    ("label", lambda i, x: _rgb(x) if i == 2 else x, r"label_2.nii.gz holds colour voxels"),
    ("image", lambda i, x: x.astype(np.complex64) if i == 2 else x, r"image_2.nii.gz holds complex voxels"),
])
def test_colour_and_complex_volumes_are_refused_by_the_run_as_by_check_data(kind, replace, message, tmp_path, capsys,
                                                                          results_dir):
    folder = make_folder(tmp_path / "scans", **{f"{kind}_fn": replace})
    with pytest.raises(DataError, match=message):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("2")
    assert main(["run", *_args(folder)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error: ") == 1
    assert main(_check(folder)) == 2
    assert "holds c" in capsys.readouterr().out
    assert not list(results_dir.glob("**/COMPLETE"))


def test_a_folder_or_a_broken_link_in_a_scans_place_is_named_as_such(tmp_path):
    folder = make_folder(tmp_path / "scans")
    (folder / "image_2.nii.gz").unlink()
    (folder / "image_2.nii.gz").mkdir()
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP)
    with pytest.raises(DataError, match=r"image_2.nii.gz is a folder, not a NIfTI file"):
        dataset.load("2")
    (folder / "image_2.nii.gz").rmdir()
    (folder / "image_2.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(DataError, match=r"image_2.nii.gz is a link to a file that does not exist \(.*gone.nii.gz\)"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("2")


def test_nifti_files_named_otherwise_are_named_not_dropped_silently(tmp_path, capsys):
    folder = make_folder(tmp_path / "scans", n=4)
    for kind in ("image", "label"):
        (folder / f"{kind}_4.nii.gz").rename(folder / f"{kind.capitalize()}_4.NII.GZ")
    with pytest.warns(DataWarning, match=r"2 NIfTI file\(s\) in .* are left out because their names are not "
                      r"image_<id>.nii\[.gz\] or label_<id>.nii\[.gz\] \(lower case\): Image_4.NII.GZ, Label_4.NII.GZ"):
        assert load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).case_ids() == ["1", "2", "3"]
    assert main(_check(folder)) == 0
    assert "Image_4.NII.GZ" in capsys.readouterr().out


def test_a_warning_every_scan_shares_is_one_line_for_all_of_them(tmp_path, capsys, results_dir):
    folder = make_folder(tmp_path / "scans", n=5)
    assert main(["run", *_args(folder, label_map="{liver:1,spleen:9}")]) == 2
    err = capsys.readouterr().err.splitlines()
    no_spleen = [line for line in err if "shows no spleen" in line]
    assert no_spleen[0].startswith("warning: nifti_folder scan 1: shows no spleen (label value 9)")
    assert no_spleen[1].startswith("warning: the same for nifti_folder scans 2, 3, 4, 5: shows no spleen")
    assert len(no_spleen) == 2
    assert err[-2].startswith("error: ") and "holds label value 9" in err[-2]  # the cause comes last, once


def test_an_export_finds_a_moved_scan_folder_through_scans_and_checks_its_files(tmp_path, results_dir, capsys):
    folder = make_folder(tmp_path / "scans")
    assert main(["run", *_args(folder)]) == 0
    run_dir = _run_dir(results_dir)
    moved = folder.rename(tmp_path / "moved")
    out = tmp_path / "masks"
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the scan folder this run read, {folder}, is not there any more" in err
    assert f"fsmis-bench export {run_dir} --out {out} --scans <folder>" in err and not out.exists()
    assert main(["export", str(run_dir), "--out", str(out), "--scans", str(tmp_path / "nosuch")]) == 2
    err = capsys.readouterr().err  # the flag the user gave, not the dataset's test_dataset.path
    assert f"--scans {tmp_path / 'nosuch'}: does not exist" in err and "test_dataset.path" not in err
    assert main(["export", str(run_dir), "--out", str(out), "--scans", str(moved)]) == 0
    assert (out / "pred_1.nii.gz").is_file()
    image, label = _scan(9)  # another scan in the moved folder: refused, as for the folder itself
    _store(moved / "image_1.nii.gz", image)
    _store(moved / "label_1.nii.gz", label)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "other"), "--scans", str(moved)]) == 2
    assert "changed since the run" in capsys.readouterr().err


def test_an_export_of_a_run_with_a_damaged_run_json_says_the_scans_are_unchecked(tmp_path, results_dir, capsys):
    folder = make_folder(tmp_path / "scans")
    assert main(["run", *_args(folder)]) == 0
    run_dir = _run_dir(results_dir)
    (run_dir / "run.json").write_text("{ damaged")
    capsys.readouterr()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "masks")]) == 0
    assert "run.json is unreadable (JSONDecodeError), so the scans cannot be checked" in capsys.readouterr().err
    assert (tmp_path / "masks" / "pred_1.nii.gz").is_file()


def test_scans_is_refused_for_a_run_on_a_built_in_dataset(tmp_path, results_dir, capsys):
    assert main(["run", "method=support_copy", "dataset=phantom", "protocol.max_queries=1"]) == 0
    (run_json,) = results_dir.glob("support_copy/phantom/*/*/*/run.json")
    assert main(["export", str(run_json.parent), "--out", str(tmp_path / "m"), "--scans", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--scans applies to runs tested on nifti_folder" in err and "--data-root" in err


# -- second audit: modality guess, label maps, grids, messages, grouping, padding ---------------
def _body(image: np.ndarray) -> np.ndarray:
    """A disc-shaped body across the slices (air around it in the corners)."""
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    return ((x - 11.5) ** 2 + (y - 11.5) ** 2 < 12.5 ** 2)[..., None] & np.ones(image.shape, bool)


def _padded(image: np.ndarray) -> np.ndarray:
    """An MRI resampled onto a wider grid: border strips of the fill value -1024."""
    image = image.copy()
    image[:2], image[-2:] = -1024.0, -1024.0
    return image


def _ct(image: np.ndarray, air: str = "noisy") -> np.ndarray:
    """Hounsfield units: soft tissue 40..160 HU in a disc, air around it (noisy, or exactly
    -1024 as many CTs clip it), and a bone bar."""
    hu = np.where(_body(image), image - 60.0, image - 1100.0 if air == "noisy" else -1024.0)
    hu[10:13, 10:13, :] = 1200.0
    return hu.astype(np.float32)


def _store_scaled(path: Path, data: np.ndarray) -> None:
    """A CT stored as uint16 with its rescale in the header (scl_slope 1, scl_inter -1024)."""
    image = nib.Nifti1Image(np.rint(data + 1024).astype(np.uint16), LAS)
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, str(path))


@pytest.mark.parametrize("image_fn, guessed", [
    (lambda i, x: x, "mri"),
    (lambda i, x: _padded(x), "mri"),                    # padding-only negatives are no Hounsfield units
    (lambda i, x: x - 5000.0, "mri"),                    # an MRI shifted by an offset
    (lambda i, x: _ct(x), "ct"),                          # HU with air around the body
    (lambda i, x: _ct(x, air="clipped"), "ct"),           # air exactly -1024, also in the corners
])
def test_modality_auto_needs_hounsfield_structure_not_a_low_minimum(tmp_path, image_fn, guessed):
    folder = make_folder(tmp_path / "scans", image_fn=image_fn)
    assert load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality="auto").load("1").modality == \
        guessed
    with warnings_recorded() as caught:  # modality=none warns on Hounsfield units only
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("1")
    assert any("holds Hounsfield units" in m for m in caught) == (guessed == "ct")


def test_a_ct_stored_with_its_rescale_in_the_header_is_ct(tmp_path):
    folder = make_folder(tmp_path / "scans")
    for i in (1, 2, 3):
        _store_scaled(folder / f"image_{i}.nii.gz", _ct(_scan(i)[0]))
    volume = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality="auto").load("1")
    assert volume.modality == "ct" and volume.image.min() == 0 and volume.image.max() == 255  # windowed HU


@pytest.mark.parametrize("modality, message", [
    ("ct", r"case 1: image_1.nii.gz is constant \(every voxel 0\) after the ct intensity recipe "
           r"\(test_dataset.modality=ct\)"),
    ("{1:ct,2:mri,3:mri}", r"case 1: image_1.nii.gz is constant \(every voxel 0\) after the ct intensity recipe"),
])
def test_a_scan_its_recipe_leaves_constant_is_refused(tmp_path, capsys, results_dir, modality, message):
    """An MRI shifted below the CT window, named ct: every voxel would be 0."""
    folder = make_folder(tmp_path / "scans", image_fn=lambda i, x: x - 5000.0)
    assert main(["run", *_args(folder, f"test_dataset.modality={modality}")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert re.search(message, err)
    assert "modality=none (as stored), ct (Hounsfield units) or mri" in err
    assert main(_check(folder, "--modality", "ct")) == 2
    out = capsys.readouterr().out
    assert "is constant (every voxel 0) after the ct intensity recipe" in out and "FAILED" in out
    # an MRI named ct with most of its body above the window: refused as mostly saturated
    bright = make_folder(tmp_path / "bright", image_fn=lambda i, x: x + 250.0)
    with pytest.raises(DataError, match=r"is mostly saturated \(100 % of its voxels above 275 HU, all shown as 255\)"):
        with warnings_recorded():
            load_dataset("nifti_folder", path=str(bright), label_map=LABEL_MAP, modality="ct").load("1")


@pytest.mark.parametrize("write, message", [
    (lambda d: (d / "dup.yaml").write_text("liver: 1\nspleen: 2\nliver: 4\n") and d / "dup.yaml",
     r"dup.yaml names 'liver' twice \(lines 1 and 3\)"),
    (lambda d: (d / "dup.json").write_text('{"liver": 1,\n "spleen": 2,\n "liver": 4}') and d / "dup.json",
     r"dup.json names 'liver' twice \(lines 1 and 3\)"),
    (lambda d: "{liver:1,spleen:2,liver:4}", r"names 'liver' twice: only the last value would be kept"),
    (lambda d: "{'liver':1,spleen:2,liver:4}", r"names 'liver' twice"),
])
def test_a_label_map_naming_an_organ_twice_is_refused(tmp_path, capsys, write, message):
    value = write(tmp_path)
    with pytest.raises(ConfigError, match=message) as error:
        read_label_map(str(value))
    assert "give each organ once" in error.value.hint
    folder = make_folder(tmp_path / "scans")
    assert main(_check(folder, label_map=str(value))) == 2
    assert "twice" in capsys.readouterr().err


@pytest.mark.parametrize("text, result", [
    ('{"1": "liver", "2": "spleen"}', r"is inverted: it maps label values to organ names .* turn it round: "
                                      r"\{liver:1,spleen:2\}"),
    ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}',
     {"liver": 1, "spleen": 2}),
    # nnU-Net v1 and the Medical Segmentation Decathlon write value -> name: read as such
    ('{"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "liver", "2": "spleen"}, "numTraining": 3}',
     {"liver": 1, "spleen": 2}),
    ('{"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "liver", "2": "liver"}, "numTraining": 3}',
     r"names 'liver' for two label values.*give each organ once"),
    ('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": [1, 2]}, "file_ending": ".nii.gz"}',
     r"gives regions \(liver: \[1, 2\]\), not one label value per organ"),
])
def test_label_maps_of_other_forms_are_read_or_named(tmp_path, text, result):
    (tmp_path / "map.json").write_text(text)
    if isinstance(result, dict):
        assert read_label_map(str(tmp_path / "map.json")) == result
        return
    with pytest.raises(ConfigError) as error:
        read_label_map(str(tmp_path / "map.json"))
    assert re.search(result, f"{error.value.message} hint: {error.value.hint}")


def test_organ_names_near_the_vocabulary_get_a_did_you_mean(tmp_path):
    folder = make_folder(tmp_path / "scans")
    with pytest.raises(ConfigError, match=r"did you mean Liver -> liver, kidney_right -> right_kidney, "
                                          r"left kidney -> left_kidney\?") as error:
        load_dataset("nifti_folder", path=str(folder), label_map={"Liver": 1, "kidney_right": 2, "left kidney": 3})
    assert "lower case with underscores" in error.value.hint


def _moved(affine: np.ndarray, voxels_x: float = 0.0, degrees: float = 0.0) -> np.ndarray:
    out = affine.copy()
    out[:3, 3] += out[:3, 0] * voxels_x
    return _rotation_z(degrees) @ out


@pytest.mark.parametrize("origin_z, change, refused", [
    (-1500.0, dict(voxels_x=1.0), r"origin shifted by \(-1.25, \+0.00, \+0.00\) mm"),  # 1.5 mm passed at -1500
    (-1500.0, dict(degrees=1.0), r"axes 1.00 degrees apart"),
    (0.0, dict(degrees=1.0), r"axes 1.00 degrees apart"),
    (-1500.0, dict(voxels_x=0.05), None),                                                # within 0.1 voxel
    (-1500.0, dict(voxels_x=1e-4, degrees=1e-4), None),                                  # float noise
])
def test_a_label_grid_tolerance_in_voxels_whatever_the_origin(tmp_path, origin_z, change, refused):
    base = LAS.copy()
    base[2, 3] = origin_z
    folder = make_folder(tmp_path / "scans", affines={i: base for i in (1, 2, 3)})
    _store(folder / "label_2.nii.gz", _scan(2)[1], _moved(base, **change))
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP)
    if refused is None:
        dataset.load("2")
        return
    with pytest.raises(DataError, match=r"case 2: the label grid .* does not match the image .*" + refused):
        dataset.load("2")


def _without_orientation(path: Path) -> None:
    image = nib.load(str(path))
    bare = nib.Nifti1Image(np.asarray(image.dataobj), None)
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    bare.header.set_zooms(image.header.get_zooms())
    nib.save(bare, str(path))


def _gzip_swap(folder: Path, name: str, new_name: str, compress: bool) -> None:
    import gzip

    data = (folder / name).read_bytes()
    (folder / name).unlink()
    (folder / new_name).write_bytes(gzip.compress(gzip.decompress(data)) if compress else gzip.decompress(data))


@pytest.mark.parametrize("damage, message", [
    (lambda d: ((d / "label_2.nii.gz").unlink(), (d / "label_2.nii.gz").symlink_to(d / "gone.nii.gz")),
     r"label_2.nii.gz is a link to a file that does not exist"),
    (lambda d: _without_orientation(d / "label_2.nii.gz"),
     r"case 2: the label header names no orientation \(qform and sform codes 0\), the image's does"),
    (lambda d: [(d / f"image_{i}.nii.gz").rename(d / f"image_0{i}.nii.gz") for i in (1, 2, 3)],
     r"images without labels in .*: \['01', '02', '03'\]; labels with the same number but another "
     r"zero-padding are there: image_01 / label_1"),
    (lambda d: _gzip_swap(d, "image_2.nii.gz", "image_2.nii.gz", compress=False),
     r"image_2.nii.gz: it is not gzip-compressed although its name ends in .gz .* hint: rename it to image_2.nii "),
    (lambda d: (d / "image_2.nii.gz").rename(d / "image_2.nii"),
     r"image_2.nii: it is gzip-compressed although its name ends in .nii .* hint: rename it to image_2.nii.gz"),
    (lambda d: nib.save(nib.Nifti1Image(_scan(2)[0][:, :, 3], LAS), str(d / "image_2.nii.gz")),
     r"image_2.nii.gz holds a 2-D array of shape \(24, 24\).*a single slice is read when stored as \(x, y, 1\)"),
])
def test_messages_name_what_is_wrong_with_a_file(tmp_path, capsys, damage, message):
    folder = make_folder(tmp_path / "scans")
    damage(folder)
    with pytest.raises(DataError) as error:
        dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP)
        for case in dataset.case_ids():
            dataset.load(case)
    assert re.search(message, f"{error.value.message} hint: {error.value.hint}")
    assert main(_check(folder)) == 2
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("shape", [(*SHAPE, 1, 1), (*SHAPE[:2], 1)])
def test_a_5d_file_of_one_volume_and_a_single_slice_are_read(tmp_path, results_dir, shape):
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in (1, 2, 3):
        image, label = _scan(i)
        image, label = image[..., :shape[2]], np.zeros(label[..., :shape[2]].shape, np.int16)
        label[3:9, 4:12, :] = 1  # liver in every slice
        nib.save(nib.Nifti1Image(image.reshape(shape), LAS), str(folder / f"image_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label.reshape(shape), LAS), str(folder / f"label_{i}.nii.gz"))
    dataset = load_dataset("nifti_folder", path=str(folder), label_map="{liver:1}")
    assert dataset.load("1").image.shape == (shape[2], SHAPE[1], SHAPE[0])
    assert dataset.source_nifti("1", np.zeros(dataset.load("1").image.shape, np.uint8)).shape == shape
    assert main(_check(folder, label_map="{liver:1}")) == 0


def test_test_organs_given_as_one_name_is_one_organ(tmp_path):
    folder = make_folder(tmp_path / "scans")
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, test_organs="liver")
    assert dataset.test_organs == ("liver",)
    cfg = compose(_args(folder, "+test_dataset.test_organs=liver"))
    from fsmis_bench.runner import plan

    assert [g.organs for g in plan(cfg).groups] == [("liver",)]


def test_warnings_about_hounsfield_units_and_shared_slices_are_one_line_for_all_scans(tmp_path, capsys, results_dir):
    """Every scan the same CT (a copy task): one line per warning, the other scans named after it."""
    folder = make_folder(tmp_path / "scans", n=5, image_fn=lambda i, x: _ct(_scan(1)[0]),
                         label_fn=lambda i, label: _scan(1)[1])
    assert main(["run", *_args(folder)]) == 0
    err = capsys.readouterr().err.splitlines()
    hounsfield = [line for line in err if "holds Hounsfield units" in line]
    assert hounsfield[0].startswith("warning: nifti_folder scan 1: holds Hounsfield units")
    assert hounsfield[1].startswith("warning: the same for nifti_folder scans 2, 3, 4, 5: holds Hounsfield units")
    shared = [line for line in err if "identical slices" in line]
    assert shared[0].startswith("warning: nifti_folder: support scan 3 and query scan 1 share 8 identical slices")
    assert shared[1].startswith("warning: the same for nifti_folder: support scan 3 and query scans 2, 4, 5: share 8")
    assert len(hounsfield) == len(shared) == 2


def test_slices_of_padding_only_are_not_shared_slices(tmp_path):
    from fsmis_bench.data.consistency import informative_slice
    from fsmis_bench.runner import plan

    plane = np.zeros((24, 24), np.float32)
    strip = plane.copy()
    strip[:2] = -1024.0
    assert not informative_slice(plane) and not informative_slice(strip)
    assert informative_slice(_scan(1)[0][..., 0].astype(np.float32))

    def empty_ends(i, image):  # each scan's first slice all zero but for the padding strip
        image = _padded(image)
        image[2:-2, :, 0] = 0.0
        return image

    folder = make_folder(tmp_path / "scans", image_fn=empty_ends)
    with warnings_recorded() as caught:
        plan(compose(_args(folder)))
    assert not any("identical slices" in m for m in caught)


def test_in_domain_training_on_supervoxels_says_how_to_train_without_them(tmp_path):
    folder = make_folder(tmp_path / "scans")
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP)
    with pytest.raises(DataError, match=r"no supervoxels configured") as error:
        dataset.load("1", with_supervoxels=True)
    assert "dataset.supervoxels=auto" in error.value.hint and "protocol.train_labels=gt" in error.value.hint
    given = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, supervoxels=str(tmp_path / "sv"))
    with pytest.raises(DataError, match=r"case 1 has no supervoxels: .*superpix-MIDDLE_1.nii.gz is missing") as error:
        given.load("1", with_supervoxels=True)
    assert "supervoxels=auto" in error.value.hint
    assert given.ensure_supervoxels() is None and not (tmp_path / "sv").exists()  # a given folder is never written


def test_an_organ_named_twice_on_the_command_line_is_refused_before_hydra_drops_one():
    from fsmis_bench.config import compose
    from fsmis_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="names 'liver' twice"):
        compose(["dataset=nifti_folder", "dataset.path=/nowhere",
                 "dataset.label_map={liver:1,right_kidney:2,left_kidney:3,liver:4}"], resolve_datasets=False)


# -- audit: check-data names the support that stops a run; memory; export names and units ------
def test_check_data_names_a_support_scan_that_lacks_an_organ_as_the_run_does(tmp_path, capsys, results_dir):
    """Scan 3 is the default support (position 2 of the one fold): without spleen the run
    stops, and check-data must not say OK."""
    folder = make_folder(tmp_path / "scans", label_fn=lambda i, label: np.where(label == 2, 0, label) if i == 3
                         else label)
    assert main(_check(folder)) == 0  # a warning: a folder that only trains a model draws no support
    out = capsys.readouterr().out
    assert "scan 3 is the support of fold 0 (at position protocol.supp_idx=2) but shows no spleen: a run that " \
           "evaluates fold 0 of this folder stops before it trains" in out
    assert main(["run", *_args(folder)]) == 2
    assert "support scan 3 shows spleen in 0 slices" in capsys.readouterr().err
    assert main(["run", *_args(folder, "protocol.supp_idx=0")]) == 0  # the other support the hint names


def test_check_data_holds_one_scan_at_a_time(tmp_path, monkeypatch):
    """A folder of large CTs must not stay in memory whole while it is checked."""
    from fsmis_bench.plugins import registries
    from fsmis_bench.preparation.check import check_nifti_folder

    folder = make_folder(tmp_path / "scans", n=4)
    cls = registries().datasets.get("nifti_folder")
    held = []
    real_load = cls._load

    def counting(self, case_id, with_supervoxels):
        held.append(len(self._cache))
        return real_load(self, case_id, with_supervoxels)

    monkeypatch.setattr(cls, "_load", counting)
    report = check_nifti_folder(folder, LABEL_MAP)
    assert report.ok and len(held) == 4 and max(held) == 0


def test_export_refuses_two_scans_whose_masks_would_share_a_file_name(tmp_path, results_dir, capsys):
    folder = make_folder(tmp_path / "scans")
    for kind in ("image", "label"):
        (folder / f"{kind}_2.nii.gz").rename(folder / f"{kind}_1_liver.nii.gz")
    assert main(["run", *_args(folder)]) == 0
    capsys.readouterr()
    assert main(["export", str(_run_dir(results_dir)), "--out", str(tmp_path / "masks")]) == 2
    err = capsys.readouterr().err
    assert "would both be written as pred_1_liver.nii.gz" in err and "rename one scan's files" in err
    assert not (tmp_path / "masks").exists()


def test_exported_masks_keep_the_scans_spatial_units(tmp_path, results_dir):
    folder = make_folder(tmp_path / "scans")
    for path in folder.glob("*.nii.gz"):  # a header in metres
        image = nib.load(str(path))
        metres = image.affine.copy()
        metres[:3] /= 1000.0
        stored = nib.Nifti1Image(np.asarray(image.dataobj), metres)
        stored.header.set_xyzt_units("meter", "sec")
        nib.save(stored, str(path))
    out = tmp_path / "masks"
    assert main(["run", *_args(folder), "--export-masks", str(out)]) == 0
    for name in ("pred_1.nii.gz", "pred_1_liver.nii.gz"):
        assert nib.load(str(out / name)).header.get_xyzt_units() == ("meter", "sec")


def test_as_stored_reads_a_label_stored_in_another_axis_order_onto_its_image(tmp_path):
    """The same voxels, the label's file in another orientation than its image's: read as
    stored, the label is turned onto the image's axes (as the canonical reading turns both)."""
    plain = make_folder(tmp_path / "plain")
    turned = tmp_path / "turned"
    turned.mkdir()
    for i in (1, 2, 3):
        image, label = _scan(i)
        _store(turned / f"image_{i}.nii.gz", image, LAS, "RAS")
        _store(turned / f"label_{i}.nii.gz", label, LAS, "PIR")
    expected = load_dataset("nifti_folder", path=str(plain), label_map=LABEL_MAP, orientation="as_stored")
    read = load_dataset("nifti_folder", path=str(turned), label_map=LABEL_MAP, orientation="as_stored")
    for case in ("1", "2", "3"):
        volume = read.load(case)
        ras = np.flip(expected.load(case).label, axis=2)  # the images themselves: RAS against LAS
        np.testing.assert_array_equal(volume.label, ras)
    assert main(_check(turned, "--orientation", "as_stored")) == 0


def test_an_export_that_fails_after_the_run_points_to_the_saved_run(tmp_path, results_dir, capsys, monkeypatch):
    import fsmis_bench.export as export_module

    def failing(run_dir, out_dir, **kwargs):
        raise DataError(f"cannot write to {out_dir}: the disk is full")

    monkeypatch.setattr(export_module, "export_masks", failing)
    folder = make_folder(tmp_path / "scans")
    assert main(["run", *_args(folder), "--export-masks", str(tmp_path / "masks")]) == 2
    err = capsys.readouterr().err
    run_dir = _run_dir(results_dir)
    assert (run_dir / "COMPLETE").exists()
    assert f"the run is saved in {run_dir}: `fsmis-bench export {run_dir} --out DIR` writes its masks" in err


def test_check_data_names_its_own_flags_in_label_map_errors(tmp_path, capsys):
    folder = make_folder(tmp_path / "scans")
    assert main(_check(folder, label_map="{Liver:1}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --label-map names organs outside the vocabulary") and "dataset.label_map" not in err
    assert main(_check(folder, label_map="{liver:0}")) == 2
    err = capsys.readouterr().err
    assert "--label-map '{liver:1,spleen:2}'" in err and "dataset.label_map" not in err


# -- check-data picks the supports a run with the same options picks -----------------------------
_NO_SPLEEN_IN_4 = {"label_fn": lambda i, label: np.where(label == 2, 0, label) if i == 4 else label}


@pytest.mark.parametrize(
    ("check_flags", "run_overrides", "said"),
    [
        # the second of two shots (positions 2 and 3 of the one fold) lacks the spleen
        (["--n-shot", "2"], ["protocol.n_shot=2"],
         "scan 4 is the support (shot 2) of fold 0 (at position protocol.supp_idx=2 + 1) but shows no spleen"),
        (["--supp-idx", "3"], ["protocol.supp_idx=3"],
         "scan 4 is the support of fold 0 (at position protocol.supp_idx=3) but shows no spleen"),
        (["--support", "4"], ["+test_dataset.support=4"],
         "scan 4 is the support of fold 0 (named with support=) but shows no spleen"),
    ],
    ids=["second-shot", "supp-idx", "named"],
)
def test_check_data_fails_a_support_it_was_asked_about_that_stops_the_run(
        tmp_path, capsys, results_dir, check_flags, run_overrides, said):
    folder = make_folder(tmp_path / "scans", n=4, **_NO_SPLEEN_IN_4)
    assert main(_check(folder)) == 0  # the default support (scan 3) shows both organs
    capsys.readouterr()
    assert main(_check(folder, *check_flags)) == 2
    out = capsys.readouterr().out
    assert said in out and "FAILED: 1 problem(s)" in out
    assert main(["run", *_args(folder, *run_overrides)]) == 2  # the run stops as check-data said
    assert "support scan 4 shows spleen in 0 slices" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--support", "9"], "fold 0: support='9' is not a scan in"),
        (["--supp-idx", "7"], "fold 0: a fold of 4 scans stops a run with protocol.supp_idx=7 (the support at "
                              "position 7); run with protocol.supp_idx=<0..3>"),
        (["--n-shot", "4"], "fold 0: a fold of 4 scans leaves no query scan beside protocol.n_shot=4 support scans"),
    ],
    ids=["unknown-support", "supp-idx-outside", "no-query-left"],
)
def test_check_data_fails_supports_a_run_cannot_draw(tmp_path, capsys, flags, said):
    folder = make_folder(tmp_path / "scans", n=4)
    assert main(_check(folder, *flags)) == 2
    assert said in capsys.readouterr().out


def test_check_data_says_a_support_shared_by_folds_once(tmp_path, capsys):
    folder = make_folder(tmp_path / "scans", n=4, **_NO_SPLEEN_IN_4)
    assert main(_check(folder, "--folds", "loo", "--support", "4")) == 2
    out = capsys.readouterr().out
    assert out.count("scan 4 is the support") == 1
    assert "scan 4 is the support of folds 0, 1, 2 (named with support=) but shows no spleen: a run that evaluates " \
           "one of these folds of this folder stops before it trains; name another support scan with support=<id>\n" in out


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--n-shot", "0"], "error: --n-shot 0: a run needs one support scan at least"),
        (["--test-organs", "[kidney]"], "error: --test-organs ['kidney'] are not in the label map"),
        (["--fold-ids", "1,2"], "error: --fold-ids 1,2: a list of folds is needed"),
    ],
    ids=["no-shot", "unknown-organ", "fold-ids-not-a-list"],
)
def test_check_data_support_flags_refuse_bad_values_in_one_line(tmp_path, capsys, argv, said):
    folder = make_folder(tmp_path / "scans", n=4)
    assert main(_check(folder, *argv)) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_check_data_support_flags_belong_to_nifti_folder(tmp_path, capsys):
    assert main(["check-data", "abd_mri", "--root", str(tmp_path), "--n-shot", "2"]) == 2
    err = capsys.readouterr().err
    assert "--n-shot is an option of check-data nifti_folder" in err
    assert "folds and support scans are the protocol's" in err


def test_check_data_says_supp_idx_moves_no_fixed_support(tmp_path, capsys):
    """With folds=loo the support is the first scan whatever protocol.supp_idx says: no advice
    to move it, and --supp-idx neither fails the check nor goes unsaid."""
    folder = make_folder(tmp_path / "scans", n=4, label_fn=lambda i, label: np.where(label == 2, 0, label) if i == 1
                         else label)
    assert main(_check(folder, "--folds", "loo", "--supp-idx", "1")) == 0
    out = capsys.readouterr().out
    assert "--supp-idx 1 is not used: the support of every fold is the first scan, with folds=loo" in out
    assert "scan 1 is the support of folds 0, 1, 2 (the first scan, with folds=loo)" in out
    assert "protocol.supp_idx=<i>" not in out
    assert main(_check(folder, "--folds", "null")) == 0  # null, as the help lists it: the default folds
