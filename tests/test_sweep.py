"""Sweeps through Hydra's multirun: launchers, identical records, summary, checks, --cfg, --help."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from fsmis_bench.cli import main
from fsmis_bench.sweep import claim_device, print_summary, split_overrides

SUPPORT_COPY = ["method=support_copy", "dataset=phantom", "dataset.size=64", "dataset.n_slices=20"]


@pytest.fixture(autouse=True)
def _restore_logging():
    """Hydra's multirun configures the root logger (console + a file per job); undo that."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def _records(results: Path) -> dict[str, pd.DataFrame]:
    """fold<k>/<run dir> -> cases.csv of every complete run under ``results``."""
    return {
        str(p.parent.relative_to(results)): pd.read_csv(p, dtype={"case_id": str})
        for p in sorted(results.glob("*/*/setting*/fold*/*/cases.csv"))
        if (p.parent / "COMPLETE").exists()
    }


def _serial(results: Path, overrides: list[str], folds: list[int]) -> dict[str, pd.DataFrame]:
    for fold in folds:
        assert main(["run", *overrides, f"fold={fold}", f"results_dir={results}"]) == 0
    return _records(results)


def _assert_same_records(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    """The same runs with the same numbers. A CPU run's hash holds its thread count (a
    joblib worker has one thread, a serial run all cores), so runs are matched on their
    path without the hash."""
    def by_run(records: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return {key.rsplit("-", 1)[0]: frame for key, frame in records.items()}

    a, b = by_run(a), by_run(b)
    assert sorted(a) == sorted(b) and a  # the same runs, none missing
    for key in a:
        pd.testing.assert_frame_equal(a[key], b[key])


def test_sweep_goes_through_hydra_multirun_and_matches_serial_runs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(["run", "-m", *SUPPORT_COPY, "fold=0,1", f"results_dir={sweep}"]) == 0
    out, err = capsys.readouterr()
    assert "sweep summary: 2 runs: 2 completed, 0 resumed, 0 skipped (already complete), 0 failed" in err
    (multirun_yaml,) = sweep.glob("_sweeps/*/multirun.yaml")  # Hydra's sweep folder, beside the records
    assert sorted(p.name for p in multirun_yaml.parent.iterdir() if p.is_dir()) == ["0", "1"]
    assert (multirun_yaml.parent / "1" / ".hydra" / "overrides.yaml").exists()
    printed = out.split()
    assert len(printed) == 2 and all((Path(p) / "COMPLETE").exists() for p in printed)
    _assert_same_records(_records(sweep), _serial(tmp_path / "serial", SUPPORT_COPY, [0, 1]))

    assert main(["run", "-m", *SUPPORT_COPY, "fold=0,1,2", f"results_dir={sweep}"]) == 0
    err = capsys.readouterr().err
    assert "3 runs: 1 completed, 0 resumed, 2 skipped (already complete), 0 failed" in err

    # under torchrun only the main process (which alone evaluates) prints the summary
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANK", "1")
        assert main(["run", "-m", *SUPPORT_COPY, "fold=0", f"results_dir={sweep}"]) == 0
    out, err = capsys.readouterr()
    assert "sweep summary" not in err and not out.strip()


def test_a_key_that_only_the_swept_methods_have_reaches_every_job(tmp_path, capsys):
    # Hydra composes a multirun once without its sweep values, i.e. with the default method
    # (prototype), which has no method.vae_dtype: that composition must not refuse the key.
    tiny_sd = ["backbone=tiny", "backbone.vae=identity", "pretrained=false", "dataset=phantom", "dataset.size=64",
               "dataset.n_slices=16", "train.image_size=32", "train.steps=1", "protocol.min_fg_pixels=10", "protocol.organs=[liver]",
               "protocol.max_queries=1"]
    argv = ["run", "-m", "method=sdfsmis,diffews", "method.vae_dtype=bfloat16", *tiny_sd, f"results_dir={tmp_path}"]
    assert main(argv) == 0
    assert "2 runs: 2 completed" in capsys.readouterr().err
    configs = sorted(tmp_path.glob("*/phantom/setting1/fold0/*/run.json"))
    assert [json.loads(p.read_text())["method_options"]["vae_dtype"] for p in configs] == ["bfloat16", "bfloat16"]
    assert not any("++" in p.read_text() for p in configs)  # records hold the overrides as the user wrote them


def test_relative_results_dir_means_the_launch_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "-m", *SUPPORT_COPY, "fold=0", "results_dir=rel", "hydra.job.chdir=true"]) == 0
    assert len(_records(tmp_path / "rel")) == 1  # not inside Hydra's job folder
    assert not list((tmp_path / "rel" / "_sweeps").glob("*/0/rel"))


def test_every_config_is_checked_before_anything_runs(tmp_path, capsys):
    assert main(["run", "-m", *SUPPORT_COPY, "protocol.dice=per_volume,mean", f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: protocol.dice='mean' is not allowed") and "Traceback" not in err
    assert main(["run", "-m", "method=support_copy,nope", f"results_dir={tmp_path}"]) == 2
    assert "unknown method 'nope'; known methods:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    # a fold the dataset lacks, among good ones: refused before any job, as a single run is
    assert main(["run", "-m", *SUPPORT_COPY, "fold=3,7", f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fold=7 does not exist for phantom") and "use fold=0..4" in err
    assert not any(tmp_path.iterdir())
    # a setting the dataset does not define (card_mri has no setting 2), among good ones
    from fsmis_datasets.phantom import Phantom

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Phantom, "setting2_groups", ())
        assert main(["run", "-m", *SUPPORT_COPY, "setting=1,2", f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: setting 2 is defined for the abdominal datasets only; phantom has no")
    assert not any(tmp_path.iterdir())
    (tmp_path / "a_file").write_text("x")  # a results folder that is a file: before any job, as a run says it
    assert main(["run", "-m", *SUPPORT_COPY, "fold=0,1", f"results_dir={tmp_path / 'a_file'}"]) == 2
    err = capsys.readouterr().err
    assert "a_file is a file, not a folder" in err and "launcher stopped" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message, hint",
    [
        (["-m", "hydra/launcher=jobli"], "Could not find 'hydra/launcher/jobli'", "Available options in 'hydra/launcher'"),
        (["-m", "hydra.launcher.n_jobs=2"], "Could not override 'hydra.launcher.n_jobs'", "needs its launcher"),
        (["hydra/launcher=joblib"], "overrides set how a sweep is launched", "add -m"),
    ],
)
def test_launcher_mistakes_get_one_message(argv, message, hint, tmp_path, capsys):
    assert main(["run", *argv, *SUPPORT_COPY, f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and hint in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_summary_table_names_the_swept_values_and_reasons(capsys):
    results = [
        {"overrides": ["method=a", "fold=0"], "run_dir": "r/a/0", "outcome": "completed", "reason": ""},
        {"overrides": ["method=a", "fold=1"], "run_dir": "r/a/1", "outcome": "resumed", "reason": ""},
        {"overrides": ["method=a", "fold=2"], "run_dir": "r/a/2", "outcome": "skipped", "reason": ""},
        {"overrides": ["method=a", "fold=3"], "run_dir": None, "outcome": "failed", "reason": "support scan 5 lacks liver"},
    ]
    print_summary(results, "r/_sweeps/x", file=sys.stdout)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "sweep summary: 4 runs: 1 completed, 1 resumed, 1 skipped (already complete), 1 failed"
    assert lines[1] == "Hydra sweep folder: r/_sweeps/x"
    assert lines[2].split() == ["job", "outcome", "run", "record", "/", "reason"]
    assert lines[3].split() == ["0", "completed", "fold=0", "r/a/0"]  # method=a is the same everywhere
    assert lines[6].split()[:3] == ["3", "failed", "fold=3"] and lines[6].endswith("support scan 5 lacks liver")


def test_split_overrides():
    run, hydra = split_overrides(["method=a", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+hydra.x=1", "fold=0"])
    assert run == ["method=a", "fold=0"]
    assert hydra == ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "+hydra.x=1"]


def test_cfg_job_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    assert main(["run", "method=sdfsmis", "fold=3", f"results_dir={tmp_path / 'r'}", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "fold: 3" in out and "name: sd15" in out and "steps: 15000" in out  # the method's default backbone
    assert "hydra" not in out
    assert main(["run", "-m", *SUPPORT_COPY, "fold=0,1", f"results_dir={tmp_path / 'r'}", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert out.count("# method=support_copy") == 2 and "fold: 1" in out
    assert main(["run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=3", *SUPPORT_COPY, "--cfg", "hydra"]) == 0
    assert "n_jobs: 3" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_run_help_lists_the_main_config_keys(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for expected in ("--cfg", "-m, --multirun", "protocol.dice", "per_volume | pooled", "train.steps",
                     "results_dir", "hydra/launcher", "support_copy"):
        assert expected in out, expected


def test_each_local_worker_claims_its_own_device(tmp_path):
    first = claim_device(["2", "3"], tmp_path / "a")
    assert first == "2" and claim_device(["2", "3"], tmp_path / "a") == "2"  # kept for the process's life
    # Another process sees device 2 taken and gets 3; with both taken, jobs share by index.
    code = (
        "import sys; from pathlib import Path; from fsmis_bench.sweep import claim_device;"
        f"print(claim_device(['2', '3'], Path({str(tmp_path / 'a')!r}), 5))"
    )
    import subprocess

    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert second == "3"


# -- launcher plugins (pip install 'fsmis-bench[launchers]') ------------------------------------
def _launcher_sweep(tmp_path: Path, launcher: list[str], folds: list[int], data: list[str]) -> tuple[str, str]:
    import subprocess

    argv = [sys.executable, "-m", "fsmis_bench.cli", "run", "-m", *launcher, *data,
            "fold=" + ",".join(map(str, folds)), f"results_dir={tmp_path / 'sweep'}"]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "FSMIS_NO_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out, err = _launcher_sweep(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], [0, 1], SUPPORT_COPY)
    assert "Joblib.Parallel(n_jobs=2" in err and "2 runs: 2 completed" in err
    assert len(list((tmp_path / "sweep").glob("_sweeps/*/multirun.yaml"))) == 1
    _assert_same_records(_records(tmp_path / "sweep"), _serial(tmp_path / "serial", SUPPORT_COPY, [0, 1]))


@pytest.mark.slow
def test_joblib_workers_can_train_with_episode_workers(tmp_path):
    """joblib's worker processes default to loky's start method; the training's DataLoader
    workers (train.num_workers) need the platform's own."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    training = ["method=prototype", "dataset=phantom", "dataset.size=64", "dataset.n_slices=16", "method.width=8",
                "method.feature_dim=16", "train.image_size=64", "train.batch_size=2", "protocol.min_fg_pixels=20",
                "train.steps=3", "train.num_workers=1", "protocol.organs=[liver]", "seed=0,1"]
    out, err = _launcher_sweep(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], [0], training)
    assert "2 runs: 2 completed" in err and len(out.split()) == 2


@pytest.mark.slow
def test_submitit_local_launcher_runs_jobs_with_a_job_folder(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out, err = _launcher_sweep(tmp_path, ["hydra/launcher=submitit_local"], [2, 3], SUPPORT_COPY)
    assert "Submitit 'local' sweep output dir" in err and "2 runs: 2 completed" in err
    (sweep_dir,) = (tmp_path / "sweep").glob("_sweeps/*")
    assert (sweep_dir / "multirun.yaml").exists()
    assert len(list(sweep_dir.glob(".submitit/*/*_result.pkl"))) == 2  # submitit's job folder, one per job
    _assert_same_records(_records(tmp_path / "sweep"), _serial(tmp_path / "serial", SUPPORT_COPY, [2, 3]))


ABD_MRI = ["method=support_copy", "dataset=abd_mri"]


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize(
    "launcher, folds",
    [(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], [0, 1]), (["hydra/launcher=submitit_local"], [2, 3])],
    ids=["joblib", "submitit_local"],
)
def test_readme_sweeps_on_real_data_match_serial_runs(launcher, folds, tmp_path, real_data_root, monkeypatch):
    """The two commands of the README, on CHAOS: complete records identical to serial runs."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    monkeypatch.setenv("FSMIS_DATA_ROOT", str(real_data_root))
    out, err = _launcher_sweep(tmp_path, launcher, folds, ABD_MRI)
    assert "2 runs: 2 completed" in err
    info = [json.loads((Path(p) / "run.json").read_text()) for p in out.split()]
    assert [i["fold"] for i in info] == folds and all(i["status"] == "complete" for i in info)
    _assert_same_records(_records(tmp_path / "sweep"), _serial(tmp_path / "serial", ABD_MRI, folds))


def test_submitit_slurm_without_a_cluster_is_one_message(tmp_path, capsys):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import shutil

    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    assert main(["run", "-m", "hydra/launcher=submitit_slurm", *SUPPORT_COPY, f"results_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "error: the launcher stopped: RuntimeError: Could not detect \"srun\"" in err
    assert f"{tmp_path / '_sweeps'}" in err and "Traceback" not in err


@pytest.mark.slow
def test_paper_grid_is_80_runs_and_100_trainings():
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "paper_grid.py"
    done = subprocess.run([sys.executable, str(script), "--cost", "--step-seconds", "0.212"],
                          capture_output=True, text=True, check=True)
    total = next(line for line in done.stdout.splitlines() if line.endswith("total")).split()
    assert total[:3] == ["80", "100", "1500000"]
    assert "88.3 GPU-hours" in done.stdout


def test_sweep_exports_each_runs_masks_below_its_record_path(tmp_path, results_dir, capsys):
    from test_nifti_folder import _folder_args, make_folder

    folder = make_folder(tmp_path / "scans", n=4)
    out = tmp_path / "masks"
    assert main(["run", "-m", *_folder_args(folder), "seed=0,1", "--export-masks", str(out)]) == 0
    listings = sorted(p.parent.relative_to(out) for p in out.glob("**/masks.csv"))
    runs = sorted(p.parent.relative_to(results_dir) for p in results_dir.glob("*/*/*/*/*/COMPLETE"))
    assert listings == runs and len(runs) == 2


def test_an_interrupted_sweep_says_what_it_finished_and_what_it_did_not(tmp_path, capsys, monkeypatch):
    from fsmis_bench.training import episodes

    small = ["method=prototype", "dataset=phantom", "dataset.size=64", "dataset.n_slices=16", "method.width=8",
             "method.feature_dim=16", "train.image_size=64", "train.batch_size=2", "protocol.min_fg_pixels=20",
             "train.steps=4", "train.checkpoint_every=1", "train.log_every=1"]
    original, calls = episodes.EpisodeSampler.batch, {"n": 0}

    def interrupted(self, batch_size, **kwargs):  # Ctrl-C at the 7th draw: in the second run
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self, batch_size, **kwargs)

    monkeypatch.setattr(episodes.EpisodeSampler, "batch", interrupted)
    assert main(["run", "-m", *small, "seed=0,1,2", f"results_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err
    assert ("sweep summary: 3 runs: 1 completed, 0 resumed, 0 skipped (already complete), 0 failed, "
            "1 interrupted (saved; the same command resumes), 1 not started") in err
    assert "stopped; the same command resumes it" in err  # a Ctrl-C inside a step: the last checkpoint
    assert err.rstrip().endswith("interrupted; finished work is kept and the same command resumes")


@pytest.mark.parametrize("launcher, says_still_running", [("joblib", False), ("submitit_local", True)])
def test_an_interrupted_parallel_sweep_points_to_the_runs_listing(launcher, says_still_running, tmp_path, capsys,
                                                                  monkeypatch):
    from hydra._internal.hydra import Hydra

    def stopped(*args, **kwargs):  # the stop reaches the launching process while its jobs run elsewhere
        raise KeyboardInterrupt

    monkeypatch.setattr(Hydra, "multirun", stopped)
    argv = ["run", "-m", *SUPPORT_COPY, "seed=0,1", f"hydra/launcher={launcher}", f"results_dir={tmp_path}"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "the sweep was interrupted" in err
    assert f"`fsmis-bench runs --results {tmp_path}` lists every run's state" in err
    assert ("submitit's jobs may still be running" in err) == says_still_running
    assert f"to resume, run the same command: fsmis-bench {' '.join(argv)}\n" in err
    import shlex

    hinted = err.split("`fsmis-bench ", 1)[1].split("`", 1)[0]
    assert main(shlex.split(hinted)) == 0  # the command it names works as given
