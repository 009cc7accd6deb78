"""Trustworthy run records: no code execution on load, no record that lies, bad data stops
the run (issue 9). Each test fails on a harness that lacks the guarantee it names."""

from __future__ import annotations

import errno
import inspect
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from fsmis_bench.cli import main
from fsmis_bench.config import compose
from fsmis_bench.data.base import Volume
from fsmis_bench.errors import DataError
from fsmis_bench.reporting.collect import load_results
from fsmis_bench.records import run_dir_for
from fsmis_bench.runner import identify

SMALL = [
    "method=prototype", "dataset=phantom", "dataset.size=64", "dataset.n_slices=16",
    "method.width=8", "method.feature_dim=16", "train.image_size=64", "train.batch_size=2",
    "protocol.min_fg_pixels=20", "train.steps=2",
]
# prototype on the tiny preprocessed layout below
TINY_PROTOTYPE = ["method=prototype", "train.steps=1", "train.image_size=32", "method.width=8",
                  "method.feature_dim=16", "protocol.min_fg_pixels=10"]


def _run_dirs(results: Path) -> list[Path]:
    return sorted(p.parent for p in results.glob("**/run.json"))


def _info(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def _nifti_folder(folder: Path, n: int = 10, nan_in: str | None = None, brighter: bool = False,
                  label_map: str = "{liver:1}", no_liver_in: str | None = None) -> list[str]:
    """``image_<i>``/``label_<i>`` pairs (i = 1..n) with a liver (1) and a spleen (2), except
    in ``no_liver_in`` (a label file's stem), which shows the spleen only."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        image = rng.normal(100, 10, size=(32, 32, 8)).astype(np.float32) + (50 if brighter else 0)
        label = np.zeros((32, 32, 8), dtype=np.uint8)
        label[8:20, 8:20, 2:7] = 1
        label[22:30, 22:30, 1:7] = 2
        if no_liver_in == f"label_{i}":
            label[label == 1] = 0
        image[label > 0] += 40 * label[label > 0]
        if nan_in == f"image_{i}":
            image[10:12, 10:12, 3] = np.nan
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"image_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(folder / f"label_{i}.nii.gz"))
    return ["dataset=nifti_folder", f"dataset.path={folder}", f"dataset.label_map={label_map}"]


def _chaos_layout(root: Path, with_supervoxels: bool = True) -> Path:
    """The CHAOS preprocessed layout in miniature: 20 scans of 32 x 32 x 10 voxels."""
    images, supervoxels = root / "CHAOST2" / "chaos_MR_T2_normalized", root / "CHAOST2" / "supervoxels_5000"
    images.mkdir(parents=True)
    rng = np.random.default_rng(1)
    organs = {4: (slice(2, 8), slice(2, 8)), 2: (slice(20, 26), slice(2, 8)), 3: (slice(2, 8), slice(20, 26)),
              1: (slice(12, 20), slice(12, 20))}
    for i in range(1, 21):
        label = np.zeros((32, 32, 10), dtype=np.float64)
        for value, (xs, ys) in organs.items():
            label[xs, ys, 2:8] = value
        image = rng.normal(100, 5, size=label.shape) + 40 * (label > 0)
        affine = np.diag([1.25, 1.25, 5.0, 1])
        nib.save(nib.Nifti1Image(image, affine), str(images / f"image_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(images / f"label_{i}.nii.gz"))
        if with_supervoxels:
            _write_supervoxels(supervoxels, i)
    return root


def _write_supervoxels(folder: Path, case: int, split: int = 12) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sv = np.zeros((32, 32, 10))
    sv[4:28, 4:28, 1:9] = 1 + (np.arange(32)[4:28, None, None] // split)
    nib.save(nib.Nifti1Image(sv, np.eye(4)), str(folder / f"superpix-MIDDLE_{case}.nii.gz"))


# -- 1. loading a checkpoint never runs code ------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle_file(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model": _Payload(marker), "step": 1}))


def _torch_save_file(path: Path, marker: Path) -> None:
    torch.save({"model": _Payload(marker), "step": 1}, path)


@pytest.mark.parametrize("write", [_pickle_file, _torch_save_file], ids=["pickle", "torch.save"])
def test_a_pickle_checkpoint_is_refused_and_never_executed(write, tmp_path, results_dir, capsys):
    evil, marker = tmp_path / "evil.pt", tmp_path / "payload_ran"
    write(evil, marker)
    assert main(["eval", *SMALL, f"checkpoint={evil}"]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "never loads pickles" in err and "Traceback" not in err
    assert not marker.exists()  # the payload did not run
    assert not results_dir.exists()
    # ... and it was a live payload: unpickling it the unsafe way does run it
    torch.load(evil, weights_only=False) if write is _torch_save_file else pickle.loads(evil.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("planted", ["last.pt", "final.pt", "last-00000002.safetensors"])
def test_a_pickle_planted_in_a_run_folder_is_refused_and_never_executed(planted, tmp_path, results_dir, capsys):
    marker = tmp_path / "payload_ran"
    checkpoints = identify(compose(SMALL)).run_dir / "checkpoints" / "all"
    checkpoints.mkdir(parents=True)
    _torch_save_file(checkpoints / planted, marker)
    if planted.endswith(".safetensors"):  # a resume state whose tensor file was swapped
        (checkpoints / "last.json").write_text(json.dumps({
            "format": "fsmis-bench", "kind": "training-state", "version": 1, "tensors": planted, "state": {"step": 2},
        }))
    assert main(["run", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and planted in err and "Traceback" not in err
    assert not marker.exists()


# -- 2. an external checkpoint is part of the identity and never satisfies `run` -------------
def test_external_checkpoint_is_hashed_recorded_and_never_satisfies_run(tmp_path, results_dir, capsys):
    assert main(["run", *SMALL, "seed=1"]) == 0  # another training supplies the "external" weights
    (trained,) = results_dir.glob("**/seed1-*/checkpoints/all/final.safetensors")
    external = tmp_path / "elsewhere" / "model.safetensors"
    external.parent.mkdir()
    shutil.copy(trained, external)

    assert main(["eval", *SMALL, f"checkpoint={external}"]) == 0
    (evaluated,) = [d for d in _run_dirs(results_dir) if _info(d)["seed"] == 0]
    info = _info(evaluated)
    assert info["inputs"]["checkpoint"]["path"] == str(external.resolve())
    assert len(info["inputs"]["checkpoint"]["sha256"]) == 64 and info["inputs"]["checkpoint"]["step"] == 2
    assert info["weights_from"] == "external_checkpoint"
    assert f"external_checkpoint={info['inputs']['checkpoint']['sha256'][:8]}" in info["non_standard"]

    capsys.readouterr()
    assert main(["run", *SMALL]) == 0  # the same overrides: trains, it does not reuse that eval
    assert "already complete" not in capsys.readouterr().err
    (trained_here,) = [d for d in _run_dirs(results_dir) if _info(d)["seed"] == 0 and d != evaluated]
    assert _info(trained_here)["weights_from"] == "training"

    other = trained_here / "checkpoints" / "all" / "final.safetensors"
    assert main(["eval", *SMALL, f"checkpoint={other}"]) == 0  # another checkpoint: another run
    assert "already complete" not in capsys.readouterr().err
    assert len([d for d in _run_dirs(results_dir) if _info(d)["seed"] == 0]) == 3


@pytest.mark.parametrize("content", ["empty", "partial", "foreign"])
def test_a_checkpoint_missing_trainable_weights_is_refused(content, tmp_path, results_dir, capsys):
    from fsmis_bench.runner import build_method
    from fsmis_bench.training.checkpoint import trainable_state

    full = {f"model/{k}": v.contiguous() for k, v in trainable_state(build_method(compose(SMALL))).items()}
    tensors = {
        "empty": {},
        "partial": dict(list(full.items())[:1]),
        "foreign": {"unet.conv_in.weight": torch.zeros(3)},
    }[content]
    path = tmp_path / f"{content}.safetensors"
    save_file(tensors, str(path), metadata={"step": "5"})
    assert main(["eval", *SMALL, f"checkpoint={path}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(path) in err
    assert re.search(r"lacks \d+ trainable tensors|holds no fsmis-bench weights", err), err
    assert not _run_dirs(results_dir)  # no record of a run that did not happen


# -- 3. pseudo-labels are part of the identity; regeneration is announced and recorded -------
def test_supervoxels_are_part_of_the_run_identity(tmp_path):
    root = _chaos_layout(tmp_path / "data")
    args = ["method=prototype", "dataset=abd_mri", f"data_root={root}"]
    first = identify(compose(args))
    train_data = first.inputs["train_data"]
    assert train_data["label_source"] == "supervoxels"
    assert train_data["supervoxels"]["supervoxel_dir"] == "CHAOST2/supervoxels_5000"
    assert len(train_data["supervoxels"]["sha256"]) == 64
    assert first.inputs["test_data"]["label_source"] == "ground_truth"

    _write_supervoxels(root / "CHAOST2" / "supervoxels_5000", 7, split=6)  # other pseudo-labels, one scan
    second = identify(compose(args))
    assert second.inputs["train_data"]["supervoxels"]["sha256"] != train_data["supervoxels"]["sha256"]
    assert second.run_dir != first.run_dir
    assert second.inputs["test_data"] == first.inputs["test_data"]

    gt = identify(compose([*args, "protocol.train_labels=gt"])).inputs["train_data"]
    assert gt["label_source"] == "ground_truth" and "supervoxels" not in gt


def test_missing_supervoxels_are_generated_announced_and_recorded(tmp_path, results_dir, capsys, monkeypatch):
    root = _chaos_layout(tmp_path / "data", with_supervoxels=False)
    import fsmis_bench.preparation as preparation

    def fake_generator(dataset_dir, n_sv, workers=1, **kwargs):  # the real one takes minutes
        for case in range(1, 21):
            _write_supervoxels(Path(dataset_dir) / f"supervoxels_{n_sv}", case)
        return Path(dataset_dir) / f"supervoxels_{n_sv}"

    monkeypatch.setattr(preparation, "ensure_supervoxels", fake_generator)
    argv = ["run", *TINY_PROTOTYPE, "dataset=abd_mri", f"data_root={root}", "protocol.organs=[liver]",
            "protocol.max_queries=1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "20 of 20 scans have no supervoxels" in err and "generating them now" in err
    (run_dir,) = _run_dirs(results_dir)
    (generated,) = _info(run_dir)["supervoxels_generated"]
    assert generated["cases"] == [str(i) for i in range(1, 21)] and generated["n_supervoxels"] == 5000
    assert _info(run_dir)["inputs"]["train_data"]["supervoxels"]["sha256"]


# -- 4. the report never merges runs on different data --------------------------------------
def test_the_report_keeps_runs_on_different_data_apart(tmp_path, results_dir):
    first = _nifti_folder(tmp_path / "scans_a")
    second = _nifti_folder(tmp_path / "scans_b", brighter=True)
    assert main(["run", "method=support_copy", *first]) == 0
    assert main(["run", "method=support_copy", *second]) == 0
    results = load_results(results_dir)
    assert len(results.runs) == 2
    assert not [n for n in results.notes if "superseded" in n]
    variants = sorted(results.runs["variant"])
    assert variants[0] != variants[1] and all(v.startswith("data=") for v in variants)
    assert results.fold_scores.groupby("variant").size().tolist() == [1, 1]


def test_the_record_names_the_support_and_a_query_without_the_organ_is_said_not_dropped(
        tmp_path, results_dir, capsys):
    args = _nifti_folder(tmp_path / "scans", label_map="{liver:1,spleen:2}", no_liver_in="label_2")
    assert main(["run", "method=support_copy", *args]) == 0  # fold 0 = ids 1, 2, 3; supp_idx 2 -> 3
    err = capsys.readouterr().err
    assert "fold 0: support scan 3; query scans 1 2; without the organ, not scored: 2 (liver)" in err
    assert "query scan 2 shows no liver, so it is left out of liver's mean" in err
    info = _info(_run_dirs(results_dir)[0])
    assert info["evaluated"] == {"liver": ["1"], "spleen": ["1", "2"]}
    assert info["absent"] == {"liver": ["2"]}
    # every scan shows the liver in z 2..6 (C = 5) and the spleen in z 1..6 (C = 6): int(p * C)
    # at p = 1/6, 1/2, 5/6 picks positions 0, 2, 4 and 1, 3, 5
    assert info["supports"] == {"liver": {"cases": ["3"], "slices": [[2, 4, 6]]},
                                "spleen": {"cases": ["3"], "slices": [[2, 4, 6]]}}


# -- 6. non-finite values stop the run before training, naming the file ----------------------
def test_nan_in_a_query_scan_stops_the_run_naming_the_file(tmp_path, results_dir, capsys):
    args = _nifti_folder(tmp_path / "scans", nan_in="image_1")  # fold 0 = ids 1, 2, 3; support 3
    assert main(["run", "method=support_copy", *args]) == 2
    err = capsys.readouterr().err
    assert "image_1.nii.gz" in err and "non-finite" in err and "Traceback" not in err
    assert not results_dir.exists()


def test_nan_in_a_training_scan_stops_the_run_before_training(tmp_path, results_dir, capsys):
    args = _nifti_folder(tmp_path / "scans", nan_in="image_7", label_map="{liver:1,spleen:2}")  # 7 trains fold 0
    argv = ["run", *args, "method=prototype", "protocol.train_labels=gt", "train.steps=2", "train.image_size=32",
            "method.width=8", "method.feature_dim=16", "protocol.min_fg_pixels=10"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "image_7.nii.gz" in err and "non-finite" in err and "Traceback" not in err
    assert "train prototype" not in err
    assert not _run_dirs(results_dir)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_every_volume_is_checked_whatever_plugin_loads_it(bad):
    image = np.zeros((4, 8, 8), dtype=np.float32)
    image[1, 2, 3] = bad
    with pytest.raises(DataError, match="case 7: the image has 1 non-finite voxels"):
        Volume("7", image, np.zeros((4, 8, 8), dtype=np.int32))


# -- 7. the report checks cases.csv against run.json ----------------------------------------
def _truncate(text: str) -> str:
    return text[: int(len(text) * 0.6)]


def _percent(text: str) -> str:
    frame = pd.read_csv(pd.io.common.StringIO(text), dtype={"case_id": str})
    frame.loc[0, "dice"] *= 100
    return frame.to_csv(index=False)


def _non_numeric(text: str) -> str:
    frame = pd.read_csv(pd.io.common.StringIO(text), dtype={"case_id": str})
    frame["tp"] = frame["tp"].astype(object)
    frame.loc[1, "tp"] = "n/a?"
    return frame.to_csv(index=False)


def _inconsistent(text: str) -> str:
    frame = pd.read_csv(pd.io.common.StringIO(text), dtype={"case_id": str})
    frame.loc[0, "dice"] = 0.5 if frame.loc[0, "dice"] != 0.5 else 0.25
    return frame.to_csv(index=False)


def _dropped_row(text: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(lines[:-1])


def _duplicated_row(text: str) -> str:
    lines = text.splitlines(keepends=True)
    return "".join(lines[:-1] + [lines[1]])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("records")
    os.environ["FSMIS_RESULTS_DIR"] = str(root)
    try:
        for seed in (0, 1):
            assert main(["run", "method=support_copy", "dataset.size=64", "dataset.n_slices=16", f"seed={seed}"]) == 0
    finally:
        del os.environ["FSMIS_RESULTS_DIR"]
    return root


@pytest.mark.parametrize("damage, reason", [
    (_truncate, r"lacks|is not a number"),
    (_percent, r"outside \[0, 1\] \(a percentage\?\)"),
    (_non_numeric, r"tp='n/a\?' is not a number"),
    (_inconsistent, r"2tp/\(2tp\+fp\+fn\)"),
    (_dropped_row, r"lacks 1 of the \d+ \(organ, query volume\) rows"),
    (_duplicated_row, r"more than once"),
], ids=["truncated", "percent", "non_numeric", "inconsistent", "dropped_row", "duplicated_row"])
def test_the_report_skips_a_damaged_run_with_a_named_note(damage, reason, two_runs, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(two_runs, results)
    damaged, intact = [d for d in _run_dirs(results)]
    cases = damaged / "cases.csv"
    cases.write_text(damage(cases.read_text()))
    loaded = load_results(results)
    assert loaded.runs["run_dir"].tolist() == [str(intact)]
    (note,) = [n for n in loaded.notes if str(damaged) in n]
    assert note.startswith(f"skipped {damaged}: ") and re.search(reason, note), note
    assert main(["report", "--results", str(results), "--no-published"]) == 0
    err = capsys.readouterr().err
    assert f"note: skipped {damaged}" in err and "Traceback" not in err


def test_the_report_survives_an_unreadable_record(two_runs, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(two_runs, results)
    damaged, intact = _run_dirs(results)
    (damaged / "run.json").write_text('{"method": "support_copy", "setting": "one", "fold": 0}')
    loaded = load_results(results)
    assert loaded.runs["run_dir"].tolist() == [str(intact)]
    assert any(n.startswith(f"skipped {damaged}") for n in loaded.notes)


# -- 8. options are checked before data or disk; write failures are named ---------------------
def test_a_read_only_results_folder_is_named_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    results = tmp_path / "read_only"
    results.mkdir()
    monkeypatch.setenv("FSMIS_RESULTS_DIR", str(results))
    if os.geteuid() != 0:
        results.chmod(0o555)
    else:  # root writes anywhere: make the check see what an ordinary user would
        import fsmis_bench.run_folder as run_folder

        real_check = run_folder.can_write_in
        monkeypatch.setattr(run_folder, "can_write_in", lambda folder: folder != results and real_check(folder))
    try:
        assert main(["run", "method=support_copy"]) == 2
    finally:
        results.chmod(0o755)
    err = capsys.readouterr().err
    assert f"cannot write to {results}" in err and "permission denied" in err and "Traceback" not in err
    assert list(results.iterdir()) == []


def test_a_finished_run_in_a_read_only_results_folder_is_shown_and_nothing_else_runs(results_dir, capsys,
                                                                                    monkeypatch):
    assert main(["run", "method=support_copy"]) == 0
    import fsmis_bench.run_folder as run_folder

    real_check = run_folder.can_write_in
    monkeypatch.setattr(run_folder, "can_write_in", lambda folder: folder != results_dir and real_check(folder))
    capsys.readouterr()
    assert main(["run", "method=support_copy"]) == 0  # nothing to write: its Dice are shown
    err = capsys.readouterr().err
    assert "already complete, not recomputed" in err and "(Dice, per_volume)" in err
    before = sorted(p.relative_to(results_dir) for p in results_dir.rglob("*"))
    import fsmis_bench.runner as runner_module

    def no_identify(*args, **kwargs):
        raise AssertionError("data read for a run that cannot be written")

    monkeypatch.setattr(runner_module, "identify", no_identify)
    assert main(["run", "method=support_copy", "seed=1"]) == 2  # a new run needs the folder: refused first
    assert f"cannot write to {results_dir}" in capsys.readouterr().err
    assert sorted(p.relative_to(results_dir) for p in results_dir.rglob("*")) == before


def test_a_failed_record_write_names_the_folder_and_leaves_no_run_behind(results_dir, capsys, monkeypatch):
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        if dir is not None and str(results_dir) in str(dir):
            raise PermissionError(errno.EROFS, "Read-only file system", os.path.join(dir, ".tmp"))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["run", "method=support_copy"]) == 2
    err = capsys.readouterr().err
    assert "cannot write to" in err and "the file system is read-only" in err and "Traceback" not in err
    assert not _run_dirs(results_dir) and not list(results_dir.glob("**/.lock"))


def test_a_full_disk_is_named_temp_files_go_and_the_rerun_resumes(results_dir, capsys, monkeypatch):
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def fileno(self):
            return self.handle.fileno()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        return FullDisk(handle) if ".cases_all.csv." in os.readlink(f"/proc/self/fd/{fd}") else handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    assert main(["run", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "parts" in err and "Traceback" not in err
    assert not [p for p in results_dir.rglob(".*") if p.name != ".lock"]  # no temporary files left
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert main(["run", *SMALL]) == 0
    assert "using trained weights" in capsys.readouterr().err  # the training was kept


@pytest.mark.parametrize("writes", ["train.async_checkpoint=false", "train.async_checkpoint=true"],
                         ids=["in-step", "background"])
def test_a_full_disk_while_writing_a_checkpoint_is_named_temp_files_go_and_the_rerun_resumes(
        writes, results_dir, capsys, monkeypatch):
    """A failed checkpoint write is the "Write failures" message, and the checkpoint saved
    before is resumed from."""
    import errno

    from fsmis_bench.training import checkpoint

    real_write, calls = checkpoint.write_tensor_file, {"n": 0}

    def full_at_the_second(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] < 2:
            return real_write(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 64)  # as far as it got
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_tensor_file", full_at_the_second)
    argv = ["run", *SMALL, "train.steps=3", "train.checkpoint_every=1", writes]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "OSError" not in err
    (run_dir,) = _run_dirs(results_dir)
    assert f"cannot write to {run_dir / 'checkpoints' / 'all'}: the disk is full" in err
    assert "free some space, then rerun the same command" in err
    assert not [p for p in results_dir.rglob(".*") if p.name != ".lock"]  # no temporary files left
    assert sorted(p.name for p in (run_dir / "checkpoints" / "all").glob("last*")) == [
        "last-00000001.safetensors", "last.json"]  # the checkpoint before the failure is whole
    monkeypatch.setattr(checkpoint, "write_tensor_file", real_write)
    assert main(argv) == 0
    assert "from step 1" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "pickle"])
def test_damaged_weights_found_in_a_run_folder_get_a_hint_about_that_folder(damage, results_dir, capsys):
    """The user passed no checkpoint: the hint says what to delete, not which file to pass."""
    assert main(["run", *SMALL]) == 0
    (run_dir,) = _run_dirs(results_dir)
    weights = run_dir / "checkpoints" / "all" / "final.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        _torch_save_file(weights, results_dir / "payload_ran")
    (run_dir / "COMPLETE").unlink()
    (run_dir / "parts" / "cases_all.csv").unlink()
    capsys.readouterr()
    assert main(["run", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: {weights} is " in err
    assert f"hint: delete {weights} and rerun the same command to train this group again from step 0" in err
    assert "pass a final.safetensors" not in err and "use a final.safetensors" not in err
    assert weights.exists()  # nothing is removed
    assert main(["eval", *SMALL]) == 2  # eval never trains: the training is `run`'s
    err = capsys.readouterr().err
    assert f"hint: delete {weights} and run the same overrides with `fsmis-bench run` to train" in err


def test_a_damaged_cases_csv_of_a_finished_run_is_rebuilt_from_its_parts(results_dir, capsys):
    assert main(["run", *SMALL]) == 0
    (run_dir,) = _run_dirs(results_dir)
    cases = run_dir / "cases.csv"
    good = cases.read_bytes()
    cases.write_bytes(good[: len(good) // 2])  # truncated
    capsys.readouterr()
    assert main(["run", *SMALL]) == 0
    err = capsys.readouterr().err
    assert f"{cases} was damaged (cases.csv" in err and "rebuilt it from the evaluation parts" in err
    assert "already complete, not recomputed" in err
    assert cases.read_bytes() == good
    assert main(["run", *SMALL]) == 0
    assert "was damaged" not in capsys.readouterr().err
    # in a sweep the summary says so, rather than "skipped"
    cases.write_bytes(good[: len(good) // 2])
    assert main(["run", "-m", *SMALL, "seed=0"]) == 0
    assert "1 repaired (complete, cases.csv rebuilt from its parts)" in capsys.readouterr().err
    assert cases.read_bytes() == good


@pytest.mark.parametrize("parts", ["damaged", "missing"])
def test_a_damaged_cases_csv_that_the_parts_cannot_rebuild_is_one_error(parts, results_dir, capsys):
    assert main(["run", *SMALL]) == 0
    (run_dir,) = _run_dirs(results_dir)
    cases, part = run_dir / "cases.csv", run_dir / "parts" / "cases_all.csv"
    cases.write_text(_percent(cases.read_text()))
    if parts == "damaged":
        part.write_text(_truncate(part.read_text()))
    else:
        part.unlink()
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    capsys.readouterr()
    assert main(["run", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert f"error: {cases} is damaged (cases.csv row" in err and "cannot be rebuilt" in err
    assert f"hint: delete {run_dir / 'COMPLETE'}" in err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing removed
    # the hint works: the trained weights are reused, only the evaluation is redone
    (run_dir / "COMPLETE").unlink()
    part.unlink(missing_ok=True)
    assert main(["run", *SMALL]) == 0
    err = capsys.readouterr().err
    assert "using trained weights" in err and load_results(results_dir).runs["run_dir"].tolist() == [str(run_dir)]


def test_a_run_that_fails_before_computing_leaves_no_empty_folders(results_dir, capsys):
    """A failed start removes the run folder and the folders it created above it, and only
    those: the results folder and the folders of other runs stay."""
    assert main(["run", "method=support_copy", "dataset.size=64", "dataset.n_slices=16"]) == 0
    before = sorted(results_dir.rglob("*"))
    # the tiny scans hold no training episode with this many foreground pixels: fails in training
    assert main(["run", *SMALL, "protocol.min_fg_pixels=100000"]) == 2
    err = capsys.readouterr().err
    assert "no training episode can be drawn" in err and "Traceback" not in err
    assert sorted(results_dir.rglob("*")) == before
    assert not (results_dir / "prototype").exists()
    shutil.rmtree(results_dir)  # a results folder made for the failed run goes too
    assert main(["run", *SMALL, "protocol.min_fg_pixels=100000"]) == 2
    assert not results_dir.exists()


# -- 10. small ones ------------------------------------------------------------------------
def test_record_files_honour_the_umask(results_dir):
    old = os.umask(0o027)
    try:
        assert main(["run", *SMALL]) == 0
    finally:
        os.umask(old)
    (run_dir,) = _run_dirs(results_dir)
    for name in ("run.json", "config.yaml", "cases.csv", "COMPLETE", "predictions.npz", "train_log.csv",
                 "checkpoints/all/final.safetensors"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o640, name


def test_no_progress_silences_supervoxel_generation(tmp_path, monkeypatch, capsys):
    from fsmis_bench.preparation import generate_supervoxels

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2):
        image = rng.normal(100, 20, size=(24, 24, 3)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(images / f"image_{i}.nii.gz"))
    monkeypatch.setenv("FSMIS_NO_PROGRESS", "1")
    run = generate_supervoxels(images, tmp_path / "sv", n_sv=20, method="felzenszwalb2d")
    assert run.ok and len(run.written) == 2
    assert not re.search(r"supervoxels felzenszwalb2d n=20:\s*\d+%", capsys.readouterr().err)


def test_no_progress_silences_report_out(tmp_path, monkeypatch, capsys):
    from fsmis_bench.reporting import write_report
    from fsmis_bench.reporting.synthetic import SyntheticDataset, counts_for_dice, write_run

    dataset = SyntheticDataset("abd_mri", ("liver",), n_cases=20, shape=(4, 16, 16))
    write_run(tmp_path / "results", "adnet", "abd_mri", 1, 0, 0, [("liver", "1", *counts_for_dice(0.7))])
    monkeypatch.setenv("FSMIS_NO_PROGRESS", "1")
    write_report(tmp_path / "results", tmp_path / "out", dataset_loader=lambda name: dataset, n_boot=20,
                 include_published=False)
    assert not re.search(r"report:\s*\d+%", capsys.readouterr().err)


def test_speed_switches_keep_earlier_run_identities():
    """A compute switch added later, left at its default, leaves the hashes of earlier runs as
    they were (their records and checkpoints stay found); set otherwise, it is hashed. The
    recorded-inference switch replays the plain kernels and is never hashed."""
    from omegaconf import OmegaConf

    from fsmis_bench.records import config_hash, training_hash

    cfg = compose(["method=sdfsmis", "backbone=tiny", "pretrained=false"])
    earlier = OmegaConf.to_container(cfg)  # a config from before the switches existed
    del earlier["train"]["compile_scope"], earlier["method"]["predict_cuda_graph"], earlier["method"]["joint_pass"]
    del earlier["train"]["async_checkpoint"], earlier["train"]["fused_clip"], earlier["train"]["cudnn_benchmark"]
    earlier = OmegaConf.create(earlier)
    for digest in (config_hash, training_hash):
        assert digest(cfg) == digest(earlier)
        assert digest(compose(["method=sdfsmis", "backbone=tiny", "pretrained=false", "method.predict_cuda_graph=true"])) \
            == digest(cfg)
        assert digest(compose(["method=sdfsmis", "backbone=tiny", "pretrained=false", "train.async_checkpoint=true"])) \
            == digest(cfg)
    blocks = compose(["method=sdfsmis", "backbone=tiny", "pretrained=false", "train.compile=default",
                      "train.compile_scope=blocks"])
    model = compose(["method=sdfsmis", "backbone=tiny", "pretrained=false", "train.compile=default"])
    assert training_hash(blocks) != training_hash(model) and config_hash(blocks) != config_hash(model)
    norms = compose(["method=sdfsmis", "backbone=tiny", "pretrained=false", "train.compile=default",
                     "train.compile_scope=norms"])
    assert len({training_hash(norms), training_hash(blocks), training_hash(model)}) == 3
    joint = compose(["method=sdfsmis", "backbone=tiny", "pretrained=false", "method.joint_pass=true"])
    assert training_hash(joint) != training_hash(cfg) and config_hash(joint) != config_hash(cfg)
    fused = ["method=sdfsmis", "backbone=tiny", "pretrained=false", "train.fused_optimizer=true"]
    clipped_outside, clipped_inside = (compose([*fused, f"train.fused_clip={flag}"]) for flag in ("false", "true"))
    for digest in (config_hash, training_hash):
        assert digest(clipped_inside) != digest(clipped_outside)
        assert digest(compose(fused)) == digest(clipped_inside)  # fused_clip=auto: inside a fused AdamW
        # the master-weight AdamW and fp16's scaler keep it outside
        for other in (["train.weight_dtype=bfloat16", "mixed_precision=bf16"], ["mixed_precision=fp16", "device=cuda"]):
            assert digest(compose([*fused, *other])) == digest(compose([*fused, *other, "train.fused_clip=false"]))
    timed = compose(["method=sdfsmis", "backbone=tiny", "pretrained=false", "train.cudnn_benchmark=true"])
    assert training_hash(timed) != training_hash(cfg) and config_hash(timed) != config_hash(cfg)
    # joint_pass=auto (the default) is one pass with CUDA: hashed as `true` there, as before on a CPU
    tiny_gpu = ["method=sdfsmis", "backbone=tiny", "pretrained=false", "device=cuda"]
    for digest in (config_hash, training_hash):
        assert digest(compose(tiny_gpu)) == digest(compose([*tiny_gpu, "method.joint_pass=true"]))
        assert digest(compose(tiny_gpu)) != digest(compose([*tiny_gpu, "method.joint_pass=false"]))
        # batched_encode=auto and fused_clip=auto likewise: on with CUDA (fused AdamW there)
        on = compose([*tiny_gpu, "method.batched_encode=true", "train.fused_clip=true"])
        assert digest(compose(tiny_gpu)) == digest(on)
        for off in ("method.batched_encode=false", "train.fused_clip=false"):
            assert digest(compose([*tiny_gpu, off])) != digest(on)


def test_a_cpu_runs_identity_holds_its_thread_count(results_dir):
    """A CPU's float sums depend on how many threads share them: a joblib worker (one
    thread) computes other numbers than a serial run on all cores, so it is another run,
    never found as the other's "already complete" record."""
    import torch

    from fsmis_bench.config import compose
    from fsmis_bench.runner import identify

    cfg = compose(["method=prototype", "dataset=phantom", "device=cpu"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = identify(cfg)
        torch.set_num_threads(2)
        two = identify(cfg)
    finally:
        torch.set_num_threads(threads)
    assert (one.inputs["cpu_threads"], two.inputs["cpu_threads"]) == (1, 2)
    assert one.run_dir != two.run_dir
    from fsmis_bench.records import training_hash

    assert training_hash(cfg, one.inputs) != training_hash(cfg, two.inputs)  # nor its trained weights


def test_the_record_names_the_code_and_machine_and_a_rerun_says_when_the_code_changed(
        tmp_path, results_dir, capsys):
    args = _nifti_folder(tmp_path / "scans")
    assert main(["run", "method=support_copy", *args]) == 0
    (run_dir,) = _run_dirs(results_dir)
    info = _info(run_dir)
    import hashlib

    from fsmis_methods.support_copy import SupportCopy

    source = Path(inspect.getfile(SupportCopy)).read_bytes()
    assert info["code"]["method_file_sha256"] == hashlib.sha256(source).hexdigest()
    assert set(info["code"]) == {"fsmis_bench_git", "method_file_sha256", "method_code_sha256", "method_code_files"}
    assert info["code"]["method_code_files"] == {"fsmis_methods.support_copy": hashlib.sha256(source).hexdigest()}
    assert info["machine"]["device"] == "cpu" and info["machine"]["cpu"]
    capsys.readouterr()
    assert main(["run", "method=support_copy", *args]) == 0  # the same code: kept, nothing to say
    assert "other code" not in capsys.readouterr().err
    info["code"]["method_code_files"]["fsmis_methods.support_copy"] = "0" * 64  # as if edited since
    (run_dir / "run.json").write_text(json.dumps(info))
    assert main(["run", "method=support_copy", *args]) == 0
    err = capsys.readouterr().err
    assert "already complete, not recomputed" in err
    assert "was computed by other code of method support_copy (its code has changed since " \
           "(fsmis_methods.support_copy))" in err
    # a record from before the modules were recorded: compared by the class's file
    for key in ("method_code_files", "method_code_sha256"):
        del info["code"][key]
    info["code"]["method_file_sha256"] = "0" * 64
    (run_dir / "run.json").write_text(json.dumps(info))
    assert main(["run", "method=support_copy", *args]) == 0
    assert "(the file defining SupportCopy has changed since)" in capsys.readouterr().err


def test_an_unfinished_run_with_a_damaged_record_is_rewritten_and_resumes(tmp_path, results_dir, capsys):
    args = _nifti_folder(tmp_path / "scans")
    assert main(["run", "method=support_copy", *args]) == 0
    (run_dir,) = _run_dirs(results_dir)
    finished = (run_dir / "cases.csv").read_bytes()
    (run_dir / "COMPLETE").unlink()
    (run_dir / "cases.csv").unlink()
    (run_dir / "run.json").write_text((run_dir / "run.json").read_text()[:200])  # truncated
    capsys.readouterr()
    assert main(["run", "method=support_copy", *args]) == 0
    err = capsys.readouterr().err
    assert "was damaged (unreadable JSON): written again" in err and "Traceback" not in err
    assert (run_dir / "cases.csv").read_bytes() == finished and _info(run_dir)["status"] == "complete"


def test_a_process_refused_by_the_lock_never_removes_the_holders_folder(tmp_path, monkeypatch):
    import fcntl

    from fsmis_bench import run_folder
    from fsmis_bench.errors import ConfigError

    run_dir = tmp_path / "prototype" / "fold0" / "seed0-abcdef12"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("x: 1\n")  # the holder's first files: nothing computed yet
    # the refused process had seen the folder missing a moment before the holder made it
    monkeypatch.setattr(run_folder, "_missing_folders", lambda path: [run_dir, run_dir.parent])
    with open(run_dir / ".lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="being computed by another process"):
            with run_folder._exclusive(run_dir):
                pass
        assert (run_dir / "config.yaml").exists() and (run_dir / ".lock").exists()


def _weights_at(folder: str) -> dict:
    """A weight identity as the SD loaders record it, read from ``folder``."""
    return {"unet": {"source": folder, "digest": "sha256:" + "ab" * 32, "layout": "diffusers",
                     "location": f"{folder}/unet", "files": {"model.safetensors": "sha256:" + "cd" * 32}}}


def test_the_same_weights_in_another_folder_are_the_same_run_and_earlier_records_are_still_found(
        tmp_path, results_dir, monkeypatch):
    from fsmis_bench.records import config_hash, training_hash
    from fsmis_methods.support_copy import SupportCopy

    args = ["method=support_copy", *_nifti_folder(tmp_path / "scans")]
    monkeypatch.setattr(SupportCopy, "weight_identity", lambda self: _weights_at("/nodeA/weights"))
    on_a = identify(compose(args))
    monkeypatch.setattr(SupportCopy, "weight_identity", lambda self: _weights_at("/nodeB/cache"))
    on_b = identify(compose(args))
    assert on_a.run_dir == on_b.run_dir and on_b.hash_form == "current"
    assert training_hash(on_a.cfg, on_a.inputs) == training_hash(on_b.cfg, on_b.inputs)
    # other content is another run
    other = _weights_at("/nodeB/cache")
    other["unet"]["digest"] = "sha256:" + "ef" * 32
    assert config_hash(on_b.cfg, {**on_b.inputs, "weights": other}) != config_hash(on_b.cfg, on_b.inputs)
    # a record made while the folder was hashed is found where it lies, and resumed there
    _found_and_resumed_under("weight_paths", args, on_b)


def _found_and_resumed_under(form: str, args: list[str], today) -> None:
    """A record made when hashes had the earlier ``form`` is found where it lies, not under
    ``today``'s folder, and a run finishes it there under that hash."""
    from fsmis_bench.records import config_hash

    earlier = run_dir_for(today.cfg, today.inputs, form)
    assert earlier != today.run_dir
    earlier.mkdir(parents=True)
    found = identify(compose(args))
    assert found.run_dir == earlier and found.hash_form == form
    assert main(["run", *args]) == 0
    assert _info(earlier)["config_hash"] == config_hash(found.cfg, found.inputs, form)
    assert _info(earlier)["status"] == "complete" and not today.run_dir.exists()


def test_the_same_weights_in_another_layout_are_the_same_run_and_earlier_records_are_still_found(
        tmp_path, results_dir, monkeypatch):
    """`weights download` writes a save_pretrained folder, `hf download` a hub cache: the same
    files either way, so one run, one training and one report row."""
    from fsmis_bench.records import training_hash, weights_identity_hash
    from fsmis_methods.support_copy import SupportCopy

    args = ["method=support_copy", *_nifti_folder(tmp_path / "scans")]
    in_folder = _weights_at("/root/stable-diffusion-v1-5")
    in_folder["unet"]["layout"] = "folder (save_pretrained)"
    in_cache = _weights_at("/root/hub/models--sd")
    in_cache["unet"]["layout"] = "hub cache"
    monkeypatch.setattr(SupportCopy, "weight_identity", lambda self: in_folder)
    from_folder = identify(compose(args))
    monkeypatch.setattr(SupportCopy, "weight_identity", lambda self: in_cache)
    from_cache = identify(compose(args))
    assert from_folder.run_dir == from_cache.run_dir
    assert training_hash(from_folder.cfg, from_folder.inputs) == training_hash(from_cache.cfg, from_cache.inputs)
    assert (weights_identity_hash({"inputs": from_folder.inputs})
            == weights_identity_hash({"inputs": from_cache.inputs}) != "")
    # a record made while the layout was hashed is found where it lies, and resumed there
    _found_and_resumed_under("weight_layout", args, from_cache)


#: config and training hashes of runs as fsmis-bench formed them at bc4c8db (2026-11-28), by
#: the code of that commit: a change to a method's config or to the hashing that moves one of
#: these makes every record of that kind unfindable (a rerun trains again in a new folder)
_EARLIER_HASHES = {
    ("method=adnet",): ("cf96cfe3", "b334f68d"),
    ("method=qnet",): ("6f266822", "cc4f459f"),
    ("method=ssl_alpnet",): ("38939020", "c8157d4d"),
    # the VTCT fallback of that time (`soft`, now a value of its own beside the default `soft_area`)
    ("method=sdfsmis", "backbone=tiny", "pretrained=false", "method.vtct_empty_mask=soft"): ("529664a5", "715a1e5e"),
}


@pytest.mark.parametrize("overrides", list(_EARLIER_HASHES), ids=lambda o: " ".join(o))
def test_records_made_earlier_keep_their_hashes(overrides):
    from fsmis_bench.records import config_hash, training_hash

    cfg = compose(list(overrides))
    # their training hashes held the options read only when predicting, which checkpoint
    # lookups still try (runner._find_checkpoint)
    assert (config_hash(cfg)[:8], training_hash(cfg, with_inference_options=True)[:8]) == _EARLIER_HASHES[overrides]


def test_the_area_fallback_of_vtct_hashes_apart_from_the_earlier_one():
    from fsmis_bench.records import config_hash

    earlier = compose(["method=sdfsmis", "backbone=tiny", "pretrained=false", "method.vtct_empty_mask=soft"])
    assert config_hash(compose(["method=sdfsmis", "backbone=tiny", "pretrained=false"])) != config_hash(earlier)


def test_the_recorded_commit_is_only_that_of_a_checkout_tracking_the_package(tmp_path):
    import subprocess

    from fsmis_bench.records import git_state

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    for name in ("tracked", "installed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    git("add", "tracked")
    git("commit", "-q", "-m", "x")
    state = git_state(tmp_path / "tracked")
    assert state is not None and len(state["commit"]) == 40 and state["dirty"] is False
    (tmp_path / "tracked" / "__init__.py").write_text("x = 1\n")
    assert git_state(tmp_path / "tracked")["dirty"] is True
    # a copy that merely lies inside another repository (a project's .venv) has no commit
    assert git_state(tmp_path / "installed") is None
    assert git_state(tmp_path.parent / "nowhere") is None
