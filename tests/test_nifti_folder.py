"""Your own scans (issue 10): a NIfTI folder as test set, in any orientation and modality,
with folds for small folders, checks, and the predicted masks written back as NIfTI.

Every volume here is tiny (24 x 20 x 10 voxels) so each test takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from fsmis_bench.api import load_dataset
from fsmis_bench.cli import main
from fsmis_bench.config import compose, is_sweep
from fsmis_bench.errors import ConfigError, DataError, DataWarning
from fsmis_bench.protocol.metrics import confusion_counts, dice_from_counts

SHAPE_XYZ = (24, 20, 10)
SPACING = (1.5, 1.25, 4.0)
LAS_AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, 1.25, 0, -10.0], [0, 0, 4.0, 5.0], [0, 0, 0, 1]])
LABEL_MAP = "{liver:1,spleen:2}"


def _scan(index: int) -> tuple[np.ndarray, np.ndarray]:
    """An (x, y, z) image and label, stored LAS: a liver block and a spleen block that move
    with ``index``, so support and query masks overlap only partly."""
    rng = np.random.default_rng(index)
    label = np.zeros(SHAPE_XYZ, dtype=np.int16)
    shift = index % 4
    label[2 + shift:12 + shift, 3:11, 2:8] = 1
    label[15:21, 10 + shift // 2:17, 3 + shift // 2:8] = 2
    image = rng.normal(100.0, 8.0, SHAPE_XYZ) + 60.0 * (label == 1) + 120.0 * (label == 2)
    image[0, 0, :] = 0.0  # an asymmetric mark: flips and permutations change the array
    return image.astype(np.float32), label


def _save(folder: Path, name: str, data: np.ndarray, axcodes: str = "LAS") -> None:
    """Store (x, y, z) LAS data in orientation ``axcodes`` with a consistent affine."""
    transform = ornt_transform(axcodes2ornt("LAS"), axcodes2ornt(axcodes))
    stored = apply_orientation(data, transform)
    affine = LAS_AFFINE @ inv_ornt_aff(transform, data.shape)
    nib.save(nib.Nifti1Image(stored, affine), str(folder / f"{name}.nii.gz"))


def make_folder(folder: Path, n: int = 4, orientations: dict[int, tuple[str, str]] | None = None,
                image_fn=None) -> Path:
    """``image_<i>`` / ``label_<i>`` for i = 1..n; ``orientations`` stores scan i's image and
    label in other orientations (the same voxels, flipped/permuted, affines consistent)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, n + 1):
        image, label = _scan(i)
        if image_fn is not None:
            image = image_fn(i, image)
        image_codes, label_codes = (orientations or {}).get(i, ("LAS", "LAS"))
        _save(folder, f"image_{i}", image, image_codes)
        _save(folder, f"label_{i}", label, label_codes)
    return folder


MIXED = {1: ("RAS", "RAS"), 2: ("PSR", "LPS"), 3: ("IRP", "IRP"), 4: ("LAI", "SAL")}


def _folder_args(folder: Path, *extra: str) -> list[str]:
    return ["method=support_copy", "dataset=phantom", "protocol.test_dataset=nifti_folder",
            f"test_dataset.path={folder}", f"+test_dataset.label_map={LABEL_MAP}", *extra]


def _run_dir(results_dir: Path, pattern: str) -> Path:
    (run_json,) = results_dir.glob(f"{pattern}/run.json")
    return run_json.parent


# -- 1. a custom folder as the test set of a model trained elsewhere ---------------------
def test_folder_is_the_cross_domain_test_set_and_records_name_both(tmp_path, results_dir):
    folder = make_folder(tmp_path / "scans", n=3)
    assert main(["run", *_folder_args(folder)]) == 0
    run_dir = _run_dir(results_dir, "support_copy/phantom_to_nifti_folder/setting1/fold0/*")
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["dataset"], info["test_dataset"]) == ("phantom", "nifti_folder")
    cases = pd.read_csv(run_dir / "cases.csv", dtype={"case_id": str})
    assert set(cases.train_dataset) == {"phantom"} and set(cases.dataset) == {"nifti_folder"}
    # three scans form one fold: support = position 2 (scan 3), queries 1 and 2, both organs
    assert sorted(zip(cases.organ, cases.case_id)) == [("liver", "1"), ("liver", "2"), ("spleen", "1"), ("spleen", "2")]
    # the run's config rebuilds the test dataset (what figures and export need)
    from omegaconf import OmegaConf

    from fsmis_bench.runner import build_test_dataset

    rebuilt = build_test_dataset(OmegaConf.load(run_dir / "config.yaml"))
    assert rebuilt.label_map == {"liver": 1, "spleen": 2} and rebuilt.case_ids() == ["1", "2", "3"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "method=support_copy", "test_dataset.path=/x"], "test_dataset.path is an option of a cross-domain"),
        (["run", "method=support_copy", "protocol.test_dataset=nifti_folder"],
         "protocol.test_dataset=nifti_folder needs test_dataset.path"),
        (["run", "method=support_copy", "protocol.test_dataset=nifti_folder", "test_dataset.path=/nowhere"],
         "nifti_folder needs test_dataset.label_map"),
        (["run", "method=support_copy", "protocol.test_dataset=nifti_foldr"], "unknown dataset 'nifti_foldr'"),
        (["run", "method=support_copy", "dataset=nifti_folder"], "dataset=nifti_folder needs dataset.path"),
    ],
)
def test_test_dataset_option_errors(argv, message, capsys, results_dir):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not results_dir.exists()


def test_eval_of_a_finished_run_on_a_folder(tmp_path, results_dir, capsys):
    """Train on one dataset; evaluate that finished run on the folder; the workaround of
    the issue (dataset=nifti_folder with the checkpoint) is refused with the right hint."""
    folder = make_folder(tmp_path / "scans", n=3)
    train = ["method=prototype", "dataset=phantom", "dataset.size=32", "dataset.n_slices=12", "train.steps=2",
             "train.image_size=32", "method.width=8", "method.feature_dim=16", "protocol.min_fg_pixels=10",
             "protocol.max_queries=1"]
    assert main(["run", *train]) == 0
    trained = _run_dir(results_dir, "prototype/phantom/setting1/fold0/*")
    onto_folder = [*train, "protocol.test_dataset=nifti_folder", f"test_dataset.path={folder}",
                   f"test_dataset.label_map={LABEL_MAP}"]
    assert main(["eval", *onto_folder]) == 2  # no training under eval, and none found by config
    assert "checkpoint=<a finished run's directory" in capsys.readouterr().err
    assert main(["eval", *onto_folder, f"checkpoint={trained}"]) == 0
    run_dir = _run_dir(results_dir, "prototype/phantom_to_nifti_folder/setting1/fold0/*")
    cases = pd.read_csv(run_dir / "cases.csv", dtype={"case_id": str})
    assert set(cases.train_dataset) == {"phantom"} and set(cases.dataset) == {"nifti_folder"}
    assert not (run_dir / "checkpoints").exists()  # evaluated, not trained
    # the workaround: a record that would claim the folder as training data
    final = trained / "checkpoints" / "all" / "final.safetensors"
    wrong = ["method=prototype", "dataset=nifti_folder", f"dataset.path={folder}", f"dataset.label_map={LABEL_MAP}",
             "method.width=8", "method.feature_dim=16", "train.image_size=32", f"checkpoint={final}"]
    assert main(["eval", *wrong]) == 2
    err = capsys.readouterr().err
    assert "trained with another dataset (dataset=phantom)" in err and "protocol.test_dataset=nifti_folder" in err


# -- 2. orientation -------------------------------------------------------------------------
def test_mixed_orientations_read_as_the_same_volumes(tmp_path):
    plain = load_dataset("nifti_folder", path=str(make_folder(tmp_path / "plain")), label_map=LABEL_MAP)
    mixed = load_dataset("nifti_folder", path=str(make_folder(tmp_path / "mixed", orientations=MIXED)),
                         label_map=LABEL_MAP)
    for case in plain.case_ids():
        a, b = plain.load(case), mixed.load(case)
        assert a.image.shape == (10, 20, 24)  # (z, y, x) of the LAS layout
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert a.spacing == b.spacing == (4.0, 1.25, 1.5)
        assert np.allclose(a.affine, b.affine)
        # Volume.affine maps (z, y, x) indices to world: voxel (z, y, x) = file voxel (x, y, z)
        assert np.allclose(a.affine @ [3, 2, 1, 1], LAS_AFFINE @ [1, 2, 3, 1])
    same = make_folder(tmp_path / "same", orientations={2: ("PSR", "PSR")})
    stored = load_dataset("nifti_folder", path=str(same), label_map=LABEL_MAP, orientation="as_stored")
    with pytest.warns(DataWarning, match="thick axis .* lies in-plane"):
        assert stored.load("2").image.shape == (24, 10, 20)  # the PSR file's (k, j, i): slices along x


def test_mixed_orientation_folder_gives_exactly_the_dice_of_the_plain_one(tmp_path, results_dir):
    plain, mixed = make_folder(tmp_path / "plain"), make_folder(tmp_path / "mixed", orientations=MIXED)
    # used as delivered, an image and its label must at least share their storage order
    same = make_folder(tmp_path / "same", orientations={i: (codes[0], codes[0]) for i, codes in MIXED.items()})
    scores = {}
    for name, folder, extra in (("plain", plain, []), ("mixed", mixed, []),
                                ("ignored", same, ["test_dataset.orientation=as_stored"])):
        assert main(["run", *_folder_args(folder, *extra)]) == 0
        run_dirs = {p.parent for p in results_dir.glob("support_copy/phantom_to_nifti_folder/*/*/*/run.json")}
        (new,) = run_dirs - set(scores.values())
        scores[name] = new
    frames = {k: pd.read_csv(v / "cases.csv", dtype={"case_id": str}).sort_values(["organ", "case_id"]) for k, v in scores.items()}
    assert 0.2 < frames["plain"].dice.mean() < 0.95  # support and query overlap only partly
    assert frames["plain"].dice.tolist() == frames["mixed"].dice.tolist()
    # the same files used as delivered (the failure) score differently
    assert frames["ignored"].dice.tolist() != frames["plain"].dice.tolist()


def test_export_writes_masks_in_each_scans_own_grid(tmp_path, results_dir):
    """Exported masks overlay the original files: each has its label file's grid and affine,
    and its Dice against the label file as stored is the recorded Dice."""
    folder = make_folder(tmp_path / "mixed", orientations=MIXED)
    out = tmp_path / "masks"
    assert main(["run", *_folder_args(folder), "--export-masks", str(out)]) == 0
    run_dir = _run_dir(results_dir, "support_copy/phantom_to_nifti_folder/setting1/fold0/*")
    cases = pd.read_csv(run_dir / "cases.csv", dtype={"case_id": str})
    listing = pd.read_csv(out / "masks.csv", dtype={"case_id": str})
    assert len(listing) == len(cases) == 6  # 3 queries x 2 organs (scan 3 is the support)
    values = {"liver": 1, "spleen": 2}
    for row in cases.itertuples():
        image_file = nib.load(str(folder / f"image_{row.case_id}.nii.gz"))
        exported = nib.load(str(out / f"pred_{row.case_id}_{row.organ}.nii.gz"))
        assert exported.shape == image_file.shape and np.allclose(exported.affine, image_file.affine)
        # the label file as stored; where it is stored in another order than its image
        # (scan 2), brought onto the image's voxel axes by the two files' affines
        label_file = nib.load(str(folder / f"label_{row.case_id}.nii.gz"))
        truth = np.asarray(label_file.dataobj) == values[row.organ]
        to_image = ornt_transform(io_orientation(label_file.affine), io_orientation(image_file.affine))
        truth = apply_orientation(truth, to_image)
        pred = np.asarray(exported.dataobj) > 0
        assert dice_from_counts(*confusion_counts(pred, truth)) == pytest.approx(row.dice, abs=1e-12)
        combined = np.asarray(nib.load(str(out / f"pred_{row.case_id}.nii.gz")).dataobj)
        assert set(np.unique(combined)) <= {0, 1, 2} and ((combined == values[row.organ]) <= pred).all()
    # nothing is overwritten without --force
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert main(["export", str(run_dir), "--out", str(out), "--force"]) == 0


# -- 3. intensities -------------------------------------------------------------------------
def _hu(i: int, image: np.ndarray) -> np.ndarray:
    """Scan 2 as CT in Hounsfield units: air outside a body, a bright bone bar."""
    if i != 2:
        return image
    hu = image - 60.0  # soft tissue around 40..160 HU
    hu[:, :2, :] = image[:, :2, :] - 1100.0  # air, noisy as real air: a constant border plane would be padding
    hu[:3, 5, :] = 1200.0
    return hu


@pytest.mark.filterwarnings("ignore::fsmis_bench.errors.DataWarning")  # modality=none on HU, tested below
@pytest.mark.parametrize(
    "modality, expected_modality, windowed",
    [("ct", {"1": "ct", "2": "ct"}, {"1", "2"}),
     ("auto", {"1": "mri", "2": "ct"}, {"2"}),
     ({"1": "mri", "2": "ct"}, {"1": "mri", "2": "ct"}, {"2"}),
     ("mri", {"1": "mri", "2": "mri"}, set())],
)
def test_modality_applies_the_benchmark_recipe(tmp_path, modality, expected_modality, windowed):
    folder = make_folder(tmp_path / "scans", n=2, image_fn=_hu)
    raw = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality="none")
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality=modality)
    for case in ("1", "2"):
        volume, stored = dataset.load(case), raw.load(case).image
        assert volume.modality == expected_modality[case]
        if case in windowed:  # CT: HU clipped to [-125, 275], rescaled to 0..255
            expected = (np.clip(stored.astype(np.float64), -125, 275) + 125) / 400 * 255
            assert np.allclose(volume.image, expected, atol=1e-4)
        else:  # MRI: the top 0.5 % of the histogram clipped
            assert np.allclose(volume.image, np.minimum(stored, np.percentile(stored.astype(np.float64), 99.5)), atol=1e-3)


def test_hounsfield_units_without_a_modality_warn_and_bad_values_fail(tmp_path):
    folder = make_folder(tmp_path / "scans", n=2, image_fn=_hu)
    with pytest.warns(DataWarning, match="scan 2: holds Hounsfield units .*modality=ct or auto"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP).load("2")
    with pytest.raises(ConfigError, match="modality='pet' is unknown"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality="pet")
    with pytest.raises(ConfigError, match="names no modality for scans \\['2'\\]"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality={"1": "ct"}).case_ids()


def test_modality_is_part_of_the_record_and_identity(tmp_path, results_dir):
    folder = make_folder(tmp_path / "scans", n=3)
    assert main(["run", *_folder_args(folder, "test_dataset.modality=mri")]) == 0
    run_dir = _run_dir(results_dir, "support_copy/phantom_to_nifti_folder/setting1/fold0/*")
    config = (run_dir / "config.yaml").read_text()
    assert "modality: mri" in config and "orientation: LAS" in config
    identity = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality="mri").identity(
        with_supervoxels=False)
    assert identity["modality"] == "mri" and identity["orientation"] == "LAS"
    assert identity["label_map"] == {"liver": 1, "spleen": 2} and identity["folds"] == [["1", "2", "3"]]
    assert len(identity["files_sha256"]) == 64
    json.dumps(identity)  # JSON-serialisable
    other = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, modality="ct").identity(
        with_supervoxels=False)
    assert other != identity


# -- 4. label maps --------------------------------------------------------------------------
def test_hydra_dict_syntax_for_the_label_map(tmp_path, results_dir):
    folder = make_folder(tmp_path / "scans", n=3)
    assert not is_sweep([f"+dataset.label_map={LABEL_MAP}"]) and is_sweep(["fold=0,1"])
    argv = ["run", "method=support_copy", "dataset=nifti_folder", f"dataset.path={folder}",
            f"+dataset.label_map={LABEL_MAP}"]
    # in-domain on three scans with a method that needs no training: one fold, all scans
    assert main(argv) == 0
    cases = pd.read_csv(next(results_dir.glob("support_copy/nifti_folder/*/*/*/cases.csv")))
    assert set(cases.organ) == {"liver", "spleen"}


@pytest.mark.parametrize("suffix, text", [("yaml", "liver: 1\nspleen: 2\n"), ("json", '{"liver": 1, "spleen": 2}')])
def test_label_map_from_a_file_is_recorded_as_the_mapping(tmp_path, suffix, text):
    folder = make_folder(tmp_path / "scans", n=3)
    (tmp_path / f"map.{suffix}").write_text(text)
    cfg = compose(["dataset=nifti_folder", f"dataset.path={folder}", f"dataset.label_map={tmp_path / f'map.{suffix}'}"])
    assert dict(cfg.dataset.label_map) == {"liver": 1, "spleen": 2}
    with pytest.raises(ConfigError, match="neither a mapping nor an existing file"):
        compose(["dataset=nifti_folder", f"dataset.path={folder}", "dataset.label_map=nowhere.yaml"])
    (tmp_path / "bad.yaml").write_text("liver: one\n")
    with pytest.raises(ConfigError, match="'liver' has the label value 'one', not an integer"):
        compose(["dataset=nifti_folder", f"dataset.path={folder}", f"dataset.label_map={tmp_path / 'bad.yaml'}"])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be-bom", "utf-8-sig", "utf-8"])
def test_label_map_file_in_utf16_or_with_a_byte_order_mark_is_read(tmp_path, capsys, encoding):
    """PowerShell's `>` and Notepad's "Unicode" write UTF-16 with a byte-order mark; Notepad's
    UTF-8 may start with one: each is the same mapping, by check-data and a run alike."""
    folder = make_folder(tmp_path / "scans", n=3)
    text = "# Leber und Milz (organs of the vocabulary)\nliver: 1\nspleen: 2\n"
    data = b"\xfe\xff" + text.encode("utf-16-be") if encoding == "utf-16-be-bom" else text.encode(encoding)
    (tmp_path / "map.yaml").write_bytes(data)
    cfg = compose(["dataset=nifti_folder", f"dataset.path={folder}", f"dataset.label_map={tmp_path / 'map.yaml'}"])
    assert dict(cfg.dataset.label_map) == {"liver": 1, "spleen": 2}
    assert main(["check-data", "nifti_folder", "--path", str(folder), "--label-map", str(tmp_path / "map.yaml")]) == 0
    assert "label map {'liver': 1, 'spleen': 2}" in capsys.readouterr().out


@pytest.mark.parametrize("data, seen", [
    ("# Leber für Patienten\nliver: 1\n".encode("latin-1"), "byte 0xfc on line 1"),
    (bytes(range(128, 256)), "byte 0x80 on line 1"),
    ("liver: 1\n".encode("utf-16")[:-1], "starts with a UTF-16 byte-order mark but is not UTF-16 text"),
])
def test_label_map_file_in_another_encoding_is_one_error_naming_the_file(tmp_path, capsys, results_dir, data, seen):
    folder = make_folder(tmp_path / "scans", n=3)
    label_map = tmp_path / "map.yaml"
    label_map.write_bytes(data)
    assert main(["check-data", "nifti_folder", "--path", str(folder), "--label-map", str(label_map)]) == 2
    err = capsys.readouterr().err
    assert f"error: label map file {label_map} " in err and seen in err and "hint: save it as UTF-8" in err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err
    argv = ["run", "method=support_copy", "protocol.test_dataset=nifti_folder", f"test_dataset.path={folder}",
            f"+test_dataset.label_map={label_map}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: label map file {label_map} " in err and "Traceback" not in err
    assert not results_dir.exists()


def test_label_map_given_as_a_folder_says_it_is_a_folder(tmp_path, capsys):
    folder = make_folder(tmp_path / "scans", n=3)
    assert main(["check-data", "nifti_folder", "--path", str(folder), "--label-map", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"error: label map '{tmp_path}' is a folder, not a file" in err and "neither" not in err
    assert "the YAML/JSON file in it" in err


# -- 5. small datasets ----------------------------------------------------------------------
def test_small_folders_get_one_fold_and_clear_hints(tmp_path, results_dir, capsys):
    folder = make_folder(tmp_path / "scans", n=3)
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP)
    assert dataset.fold_cases(0) == ["1", "2", "3"]
    with pytest.raises(ConfigError, match="has one fold: use fold=0"):
        dataset.fold_cases(1)
    # in-domain training on the single fold: the hint names the ways out, not check-data
    argv = ["run", "method=prototype", "dataset=nifti_folder", f"dataset.path={folder}",
            f"dataset.label_map={LABEL_MAP}", "protocol.train_labels=gt"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "fold 0 holds all 3 scans of nifti_folder: no scan is left to train on" in err
    assert "protocol.test_dataset=nifti_folder" in err and "folds=loo" in err and "check-data" not in err
    assert not results_dir.exists()


def test_folds_by_position_by_id_and_leave_one_out(tmp_path):
    folder = make_folder(tmp_path / "scans", n=4)
    by_id = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, fold_ids=[[4, 1, 2], ["2", "3"]])
    # folds are sets taken in id order (the reference rule, PROTOCOL.md §2), whatever order they are written in
    assert by_id.fold_cases(0) == ["1", "2", "4"] and by_id.fold_cases(1) == ["2", "3"]
    assert by_id.train_cases(1) == ["1", "4"]
    with pytest.raises(ConfigError, match="fold_ids names scans that are not in .*\\['9'\\]"):
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, fold_ids=[[1, 9]]).folds
    with pytest.raises(ConfigError, match="folds holds positions \\[4\\], but .* has 4 scans") as error:
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, folds=[[0, 4]]).folds
    assert "fold_ids=" in error.value.hint and "data root" not in error.value.hint
    loo = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, folds="loo", support="3")
    assert [loo.fold_cases(k) for k in range(3)] == [["1", "3"], ["2", "3"], ["3", "4"]]
    assert loo.fold_support(1) == "3" and loo.train_cases(1) == ["1", "4"]


@pytest.mark.parametrize("option, value, message, suggestion", [
    ("folds", [0, 1, 2], "dataset.folds=[0,1,2] is not a list of folds", "dataset.folds=[[0,1,2]]"),
    ("fold_ids", [1, 2, 3], "dataset.fold_ids=[1,2,3] is not a list of folds", "dataset.fold_ids=[[1,2,3]]"),
    ("folds", 3, "dataset.folds=3 is not a list of folds", "dataset.folds=loo, all, or null"),
    ("folds", 0, "dataset.folds=0 is not a list of folds", "dataset.folds=loo, all, or null"),
    ("folds", [[0, 1], 2], "is not a list of folds: each fold is a list of its own (2 is not)", "[[0,1,2],[3,4,5]]"),
    ("folds", [[0, "a"]], "dataset.folds: fold 0 holds a, not a scan position", "use dataset.fold_ids instead"),
    ("folds", [[0, 1.5]], "fold 0 holds 1.5, not a scan position", "[[0,1,2],[3,4,5]]"),
    ("folds", [[0, 1], []], "dataset.folds: fold 1 is empty", "leave the empty one out"),
    ("fold_ids", "loo", "dataset.fold_ids='loo' is unknown", "for leave-one-out use dataset.folds=loo"),
    ("folds", "abc", "dataset.folds='abc' is unknown: it is loo, all, or a list of folds", "[[0,1,2],[3,4,5]]"),
])
def test_folds_not_given_as_lists_of_lists_are_one_clear_error(tmp_path, option, value, message, suggestion):
    """A flat list or a count stopped the fold split with "'int' object is not iterable";
    each form is refused when the dataset is made, with the list of lists to write."""
    folder = make_folder(tmp_path / "scans", n=4)
    with pytest.raises(ConfigError) as error:
        load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, **{option: value})
    assert message in error.value.message
    assert suggestion in error.value.hint


def test_flat_folds_are_one_error_in_check_data_and_in_a_run(tmp_path, capsys, results_dir):
    folder = make_folder(tmp_path / "scans", n=4)
    check = ["check-data", "nifti_folder", "--path", str(folder), "--label-map", LABEL_MAP]
    for flag, value in (("--folds", "[0,1,2]"), ("--fold-ids", "[1,2,3]")):
        assert main([*check, flag, value]) == 2
        err = capsys.readouterr().err
        assert f"error: {flag} {value} is not a list of folds" in err
        assert f"one fold of these scans is {flag} [{value}]" in err
        assert "Traceback" not in err and "dataset." not in err
    run = ["run", "method=support_copy", "protocol.test_dataset=nifti_folder", f"test_dataset.path={folder}",
           f"+test_dataset.label_map={LABEL_MAP}"]
    for override in ("test_dataset.folds=[0,1,2]", "test_dataset.fold_ids=[1,2,3]", "test_dataset.folds=3"):
        assert main([*run, override]) == 2
        err = capsys.readouterr().err
        assert f"error: {override} is not a list of folds" in err and "Traceback" not in err
    assert not results_dir.exists()
    # the forms the option takes still work
    assert main([*check, "--folds", "[[0,1,2]]"]) == 0 and main([*check, "--folds", "loo"]) == 0
    assert main([*check, "--folds", "null"]) == 0 and main([*check, "--fold-ids", "[[1,2,3]]"]) == 0


def test_leave_one_out_trains_in_domain_and_uses_the_chosen_support(tmp_path, results_dir):
    folder = make_folder(tmp_path / "scans", n=4)
    argv = ["run", "method=prototype", "dataset=nifti_folder", f"dataset.path={folder}",
            f"dataset.label_map={LABEL_MAP}", "dataset.folds=loo", "dataset.support=2", "fold=2",
            "protocol.train_labels=gt", "train.steps=2", "train.image_size=32", "method.width=8",
            "method.feature_dim=16", "protocol.min_fg_pixels=10"]
    assert main(argv) == 0  # supp_idx stays 2: the dataset fixes the support
    cases = pd.read_csv(next(results_dir.glob("prototype/nifti_folder/setting1/fold2/*/cases.csv")), dtype={"case_id": str})
    assert set(cases.case_id) == {"4"}  # fold 2 = [support 2, query 4]


# -- identical slices, spacing, modality between support and query ------------------------
def test_plan_warns_about_shared_slices_spacing_and_modality(tmp_path):
    from fsmis_bench.runner import plan

    folder = make_folder(tmp_path / "scans", n=3)
    image, label = _scan(1)  # scan 3: scan 1 cropped to its upper slices (the same patient twice)
    _save(folder, "image_3", image[:, :, 2:])
    _save(folder, "label_3", label[:, :, 2:])
    cfg = compose(_folder_args(folder))
    with pytest.warns(DataWarning, match="support scan 3 and query scan 1 share 8 identical slices"):
        plan(cfg)
    # another voxel size and modality for the support
    hu = _hu(2, _scan(3)[0])
    nib.save(nib.Nifti1Image(hu, LAS_AFFINE @ np.diag([3.0, 3.0, 1.0, 1.0])), str(folder / "image_3.nii.gz"))
    nib.save(nib.Nifti1Image(_scan(3)[1], LAS_AFFINE @ np.diag([3.0, 3.0, 1.0, 1.0])), str(folder / "label_3.nii.gz"))
    cfg = compose(_folder_args(folder, "test_dataset.modality=auto"))
    with pytest.warns(DataWarning) as caught:
        plan(cfg)
    text = "\n".join(str(w.message) for w in caught)
    assert "differ in modality (ct vs mri)" in text and "differ in voxel size: pixels of 4.12 mm vs 1.38 mm" in text


# -- check-data nifti_folder ----------------------------------------------------------------
def test_check_data_for_a_folder(tmp_path, capsys):
    folder = make_folder(tmp_path / "scans", n=3, orientations={2: ("RAS", "RAS")}, image_fn=_hu)
    image, label = _scan(1)
    _save(folder, "image_3", image[:, :, 1:])
    _save(folder, "label_3", label[:, :, 1:])
    argv = ["check-data", "nifti_folder", "--path", str(folder), "--label-map", LABEL_MAP, "--modality", "auto"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "orientation" in out and "RAS -> LAS" in out and "ct (auto)" in out and "mri (auto)" in out
    assert "scans 1 and 3 share 9 identical slices" in out and "mixes modalities" in out
    assert "3 scans in one fold" in out and "OK: 3 case(s)" in out
    (folder / "label_2.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5)), np.eye(4)), str(folder / "label_2.nii.gz"))
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "case 2: the label grid ((5, 5, 5), RAS) does not match the image" in out
    assert "FAILED" in out
    # built-in datasets keep their layout options, and nifti_folder needs its own
    assert main(["check-data", "nifti_folder", "--path", str(folder)]) == 2
    assert "needs --path and --label-map" in capsys.readouterr().err
    assert main(["check-data", "abd_mri", "--root", str(tmp_path), "--label-map", LABEL_MAP]) == 2
    assert "--label-map is an option of check-data nifti_folder" in capsys.readouterr().err


# -- the real data: built-ins unchanged, CHAOS through nifti_folder identical ----------------
@pytest.mark.realdata
def test_builtin_datasets_read_exactly_as_stored_and_carry_their_affine(real_data_root):
    for name, folder, case in (("abd_mri", "CHAOST2/chaos_MR_T2_normalized", "2"),
                               ("card_mri", "CMR/cmr_MR_normalized", "5")):
        volume = load_dataset(name, real_data_root).load(case)
        image_file = nib.load(str(real_data_root / folder / f"image_{case}.nii.gz"))
        # the arrays of the reader before orientation support existed: the file transposed
        assert np.array_equal(volume.image, np.asarray(image_file.dataobj).transpose(2, 1, 0).astype(np.float32))
        label = np.rint(np.asarray(nib.load(str(real_data_root / folder / f"label_{case}.nii.gz")).dataobj))
        assert np.array_equal(volume.label, label.transpose(2, 1, 0).astype(np.int32))
        assert np.allclose(volume.affine[:, [2, 1, 0, 3]], image_file.affine)
    assert nib.aff2axcodes(image_file.affine) in {("P", "S", "R"), ("L", "S", "P")}  # CMR: oblique, kept as stored


@pytest.mark.realdata
def test_chaos_files_through_nifti_folder_are_bit_identical_in_any_orientation(real_data_root, tmp_path):
    chaos = real_data_root / "CHAOST2" / "chaos_MR_T2_normalized"
    builtin = load_dataset("abd_mri", real_data_root)
    folder = load_dataset("nifti_folder", path=str(chaos), label_map={"liver": 1, "right_kidney": 2,
                                                                    "left_kidney": 3, "spleen": 4})
    assert folder.case_ids() == builtin.case_ids()
    reference = builtin.load("3")
    assert nib.aff2axcodes(nib.load(str(chaos / "image_3.nii.gz")).affine) == ("L", "A", "S")
    same = folder.load("3")
    assert np.array_equal(same.image, reference.image) and np.array_equal(same.label, reference.label)
    assert same.spacing == reference.spacing and np.allclose(same.affine, reference.affine)
    # the same scan stored RPI (every axis flipped or swapped), its label stored ASL
    copy = tmp_path / "copy"
    copy.mkdir()
    for kind, codes in (("image", "RPI"), ("label", "ASL")):
        source = nib.load(str(chaos / f"{kind}_3.nii.gz"))
        transform = ornt_transform(io_orientation(source.affine), axcodes2ornt(codes))
        data = apply_orientation(np.asarray(source.dataobj), transform)
        nib.save(nib.Nifti1Image(data, source.affine @ inv_ornt_aff(transform, source.shape)), str(copy / f"{kind}_3.nii.gz"))
    flipped = load_dataset("nifti_folder", path=str(copy), label_map={"liver": 1}).load("3")
    assert np.array_equal(flipped.image, reference.image) and np.array_equal(flipped.label, reference.label)


# -- 6. supervoxels for self-supervised training -------------------------------------------
def test_auto_supervoxels_lie_on_each_scans_own_grid_whatever_its_orientation(tmp_path):
    def scan_one(i, image):  # every scan holds scan 1's image; 2 and 3 are stored turned and mirrored
        return _scan(1)[0]

    folder = make_folder(tmp_path / "scans", n=3, orientations={2: ("PSR", "PSR"), 3: ("IRP", "IRP")},
                         image_fn=scan_one)
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, supervoxels="auto",
                           n_supervoxels=20)
    sv_dir = folder / "supervoxels_20"
    generated = dataset.ensure_supervoxels()
    assert generated["cases"] == ["1", "2", "3"] and generated["folder"] == str(sv_dir)
    assert generated["recipe"] == "felzenszwalb3d" and generated["n_supervoxels"] == 20
    for i in (1, 2, 3):  # written as the scan's file is stored: its shape, affine and orientation codes
        image = nib.load(str(folder / f"image_{i}.nii.gz"))
        written = nib.load(str(sv_dir / f"superpix-MIDDLE_{i}.nii.gz"))
        assert written.shape == image.shape and np.allclose(written.affine, image.affine)
        assert written.get_data_dtype() == np.int32
    read = [dataset.load(str(i), with_supervoxels=True).supervoxels for i in (1, 2, 3)]
    assert read[0].shape == dataset.load("1").image.shape and len(np.unique(read[0])) > 3
    # the same anatomy, stored three ways, gets the same pseudo-labels once read
    np.testing.assert_array_equal(read[0], read[1])
    np.testing.assert_array_equal(read[0], read[2])
    written_at = [p.stat().st_mtime_ns for p in sorted(sv_dir.iterdir())]
    assert dataset.ensure_supervoxels() is None  # nothing missing: nothing made again
    assert [p.stat().st_mtime_ns for p in sorted(sv_dir.iterdir())] == written_at
    identity = dataset.identity(with_supervoxels=True)
    assert identity["supervoxels"] == str(sv_dir.resolve()) and len(identity["supervoxels_sha256"]) == 64


def test_own_scans_train_on_auto_supervoxels_recorded_in_the_run(tmp_path, results_dir, capsys):
    folder = make_folder(tmp_path / "scans", n=10)
    argv = ["run", "method=prototype", "dataset=nifti_folder", f"dataset.path={folder}",
            f"+dataset.label_map={LABEL_MAP}", "dataset.supervoxels=auto", "dataset.n_supervoxels=20",
            "method.width=8", "method.feature_dim=16", "train.image_size=32", "train.steps=2",
            "protocol.min_fg_pixels=5"]
    # without pseudo-labels: one error that says how to get them
    assert main(argv[:5] + argv[7:]) == 2
    assert "dataset.supervoxels=auto" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main([*argv, f"dataset.supervoxels_out={blocker / 'sv'}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and "dataset.supervoxels_out=<a writable folder>" in err and "Traceback" not in err
    assert main(argv) == 0
    assert "10 of 10 scans have no supervoxels" in capsys.readouterr().err
    info = json.loads(next(results_dir.glob("prototype/nifti_folder/*/*/*/run.json")).read_text())
    assert info["supervoxels_generated"][0]["cases"] == [str(i) for i in range(1, 11)]
    assert info["status"] == "complete" and len(info["inputs"]["train_data"]["supervoxels_sha256"]) == 64
    capsys.readouterr()
    assert main(argv) == 0
    assert "already complete" in capsys.readouterr().err  # the same pseudo-labels: the same run


def _auto(folder: Path, **options):
    return load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, supervoxels="auto",
                        **{"n_supervoxels": 20, **options})


def test_auto_supervoxels_made_otherwise_are_made_again_and_foreign_ones_never_overwritten(tmp_path, capsys):
    folder = make_folder(tmp_path / "scans", n=3)
    out = tmp_path / "sv"
    assert _auto(folder, supervoxels_out=str(out)).ensure_supervoxels()["cases"] == ["1", "2", "3"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    # another size into the same folder: all made again, announced, not silently reused
    again = _auto(folder, supervoxels_out=str(out), n_supervoxels=40).ensure_supervoxels()
    assert again["cases"] == again["remade"] == ["1", "2", "3"]
    assert "3 were made from another scan file or with other settings" in capsys.readouterr().err
    assert all(first[p.name] != p.read_bytes() for p in out.iterdir())
    # a scan file replaced: only its pseudo-labels are made again
    image, _ = _scan(7)
    _save(folder, "image_2", image)
    assert _auto(folder, supervoxels_out=str(out), n_supervoxels=40).ensure_supervoxels()["cases"] == ["2"]
    # files auto did not make are refused, not overwritten
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "superpix-MIDDLE_1.nii.gz").write_bytes((out / "superpix-MIDDLE_1.nii.gz").read_bytes())
    nib.save(nib.Nifti1Image(np.zeros(SHAPE_XYZ, np.int32), LAS_AFFINE), str(foreign / "superpix-MIDDLE_2.nii.gz"))
    with pytest.raises(DataError, match=r"did not make \(scans \['2'\]\)") as error:
        _auto(folder, supervoxels_out=str(foreign), n_supervoxels=40).ensure_supervoxels()
    assert f"dataset.supervoxels={foreign}" in error.value.hint
    assert not (foreign / "superpix-MIDDLE_3.nii.gz").exists()


@pytest.mark.filterwarnings("ignore::fsmis_bench.errors.DataWarning")  # the tiny scans' field of view
def test_a_damaged_supervoxel_file_says_what_makes_it_again_not_prepare(tmp_path):
    """The reader's advice for a damaged file names `fsmis-bench prepare`, which makes no
    supervoxels: auto's file is deleted to be made again; a given folder's is restored."""
    folder = make_folder(tmp_path / "scans", n=3)
    out = tmp_path / "sv"
    _auto(folder, supervoxels_out=str(out)).ensure_supervoxels()
    damaged = out / "superpix-MIDDLE_2.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:200])
    with pytest.raises(DataError, match="cannot read") as error:
        _auto(folder, supervoxels_out=str(out)).load("2", with_supervoxels=True)
    assert error.value.hint == f"delete {damaged}: the next run with dataset.supervoxels=auto makes it again"
    given = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, supervoxels=str(out))
    with pytest.raises(DataError, match="cannot read") as error:
        given.load("2", with_supervoxels=True)
    assert "restore superpix-MIDDLE_2.nii.gz" in error.value.hint and "prepare" not in error.value.hint
    damaged.unlink()
    assert _auto(folder, supervoxels_out=str(out)).ensure_supervoxels()["cases"] == ["2"]  # as the hint says


@pytest.mark.parametrize("value", [0, -5, 2.7, "abc", True])
def test_n_supervoxels_must_be_a_positive_whole_number(tmp_path, value):
    folder = make_folder(tmp_path / "scans", n=3)
    with pytest.raises(ConfigError, match="n_supervoxels must be a whole, positive voxel count"):
        _auto(folder, n_supervoxels=value)


def test_a_stopped_generation_keeps_the_scans_made_and_the_next_run_makes_the_rest(tmp_path, monkeypatch, capsys):
    from fsmis_bench.preparation import supervoxels as recipe

    folder = make_folder(tmp_path / "scans", n=4)
    real = recipe.supervoxels_3d
    scan_3 = _auto(folder).load("3").image  # read here: the segmentation runs in threads

    def stopped_at_scan_3(image, spacing, n):
        if np.array_equal(image, scan_3):
            raise KeyboardInterrupt  # as a Ctrl-C would reach the run while scan 3 is segmented
        return real(image, spacing, n)

    monkeypatch.setattr(recipe, "supervoxels_3d", stopped_at_scan_3)
    with pytest.raises(KeyboardInterrupt):
        _auto(folder).ensure_supervoxels()
    made = sorted(p.name for p in (folder / "supervoxels_20").iterdir())
    assert "superpix-MIDDLE_3.nii.gz" not in made and all(not name.startswith(".") for name in made)
    assert made  # scans 1 and 2 are segmented at once, before scan 3 is: at least one is kept
    assert f"stopped with {len(made)} of 4 scans' supervoxels made" in capsys.readouterr().err
    monkeypatch.setattr(recipe, "supervoxels_3d", real)
    rest = _auto(folder).ensure_supervoxels()["cases"]
    assert sorted(rest + [n[len("superpix-MIDDLE_"):-len(".nii.gz")] for n in made]) == ["1", "2", "3", "4"]


def test_runs_and_checkpoints_made_before_the_supervoxel_options_are_found(tmp_path):
    """Records written before nifti_folder had n_supervoxels and supervoxels_out hold configs
    without them: they hash, and are accepted as a checkpoint's source, as today's configs
    with those options at their defaults (or inactive without supervoxels=auto)."""
    from omegaconf import OmegaConf

    from fsmis_bench.records import config_hash
    from fsmis_bench.runner import _check_checkpoint_source

    folder = make_folder(tmp_path / "scans", n=3)
    args = ["method=prototype", "dataset=nifti_folder", f"dataset.path={folder}", f"dataset.label_map={LABEL_MAP}"]
    today = compose(args)
    before = OmegaConf.create(OmegaConf.to_container(today))
    del before.dataset["n_supervoxels"], before.dataset["supervoxels_out"]
    assert config_hash(before) == config_hash(today) == config_hash(compose([*args, "dataset.n_supervoxels=300"]))
    auto = compose([*args, "dataset.supervoxels=auto"])
    assert config_hash(compose([*args, "dataset.supervoxels=auto", "dataset.n_supervoxels=300"])) != config_hash(auto)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(before, run_dir / "config.yaml")
    _check_checkpoint_source(today, run_dir)  # the same dataset: accepted


def test_check_data_says_what_supervoxels_auto_would_make(tmp_path, capsys):
    from fsmis_bench.preparation.check import check_nifti_folder

    folder = make_folder(tmp_path / "scans", n=3)

    def states(**extra):
        report = check_nifti_folder(folder, LABEL_MAP, supervoxels="auto", **extra)
        return report.ok, [row.supervoxels for row in report.rows]

    assert states(n_supervoxels=20) == (True, ["to be made"] * 3)
    _auto(folder).ensure_supervoxels()
    assert states(n_supervoxels=20) == (True, ["ok"] * 3)
    assert states(n_supervoxels=40) == (True, ["to be made"] * 3)  # another folder: supervoxels_40
    assert main(["check-data", "nifti_folder", "--path", str(folder), "--label-map", LABEL_MAP,
                 "--supervoxels", "auto", "--n-sv", "20"]) == 0
    assert "to be made" not in capsys.readouterr().out


def test_supervoxels_too_large_for_the_scans_are_said_by_check_data_and_the_run(tmp_path):
    """At the abdominal default of 5000 voxels, scans of a few thousand voxels get one
    supervoxel: the body. Said before (check-data) and after making them."""
    from fsmis_bench.errors import DataWarning
    from fsmis_bench.preparation.check import check_nifti_folder

    folder = make_folder(tmp_path / "scans", n=3)
    report = check_nifti_folder(folder, LABEL_MAP, supervoxels="auto")
    assert report.ok and any("hold at most 0 supervoxels of 5000 voxels (--n-sv)" in w for w in report.warnings)
    dataset = load_dataset("nifti_folder", path=str(folder), label_map=LABEL_MAP, supervoxels="auto")
    with pytest.warns(DataWarning, match=r"supervoxels=auto made fewer than 5 supervoxels in scans 1 \(\d\), "
                                         r"2 \(\d\), 3 \(\d\): each holds 5000 voxels at least"):
        dataset.ensure_supervoxels()
    small = check_nifti_folder(folder, LABEL_MAP, supervoxels="auto", n_supervoxels=20)
    assert not any("supervoxels of" in w for w in small.warnings)
