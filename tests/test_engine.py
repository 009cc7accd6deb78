"""The shared engine: records, no recomputation, resume after a kill, reuse of checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fsmis_bench.cli import main

from tiny_runs import SMALL
from tiny_runs import run_dirs as _run_dirs


def test_run_writes_a_complete_record_and_is_not_recomputed(results_dir, capsys):
    argv = ["run", *SMALL, "train.steps=4", "train.log_every=2"]
    assert main(argv) == 0
    (run_dir,) = _run_dirs(results_dir)
    assert run_dir.relative_to(results_dir).parts[:4] == ("prototype", "phantom", "setting1", "fold0")
    info = json.loads((run_dir / "run.json").read_text())
    # 4 steps, below prototype's own 800: marked as the reduced budget it is
    assert info["status"] == "complete" and info["non_standard"] == ["min_fg_pixels=20", "train.steps=4"]
    assert info["reference_config"] == {"train.steps": 800}  # what reports judge this record against
    assert info["random_weights"] is False
    assert len(info["config_hash"]) == 64 and "torch" in info["versions"]
    cases = pd.read_csv(run_dir / "cases.csv")
    assert list(cases.columns[:8]) == ["method", "dataset", "train_dataset", "setting", "fold", "seed", "organ", "case_id"]
    assert set(cases.organ) == {"liver", "spleen", "left_kidney", "right_kidney"}
    assert cases.dice.between(0, 1).all()
    assert (run_dir / "COMPLETE").exists() and (run_dir / "predictions.npz").exists()
    assert list(pd.read_csv(run_dir / "train_log.csv").step) == [2, 4]
    # which step trained is recorded; train.cuda_graph (auto: off on a CPU) is not hashed
    assert info["training_step"] == {"all": {"device": "cpu", "processes": 1, "cuda_graph": False,
                                             "cuda_graph_fell_back": None}}
    assert main([*argv, "train.cuda_graph=false"]) == 0
    assert len(_run_dirs(results_dir)) == 1
    before = (run_dir / "cases.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "already complete, not recomputed" in err
    # the kept run's Dice, as its first computation printed them
    summary = err.split("already complete, not recomputed: ", 1)[1].split("\n", 1)[1]
    assert summary.startswith("(Dice, per_volume)\n")
    liver = float(next(line for line in summary.splitlines() if line.startswith("liver")).split()[1])
    assert liver == pytest.approx(cases[cases.organ == "liver"].dice.mean(), abs=5e-5)
    assert (run_dir / "cases.csv").stat().st_mtime_ns == before
    # Another config never overwrites: a new directory appears beside the first.
    assert main([*argv, "seed=1"]) == 0
    assert len(_run_dirs(results_dir)) == 2


def test_eval_reuses_the_trained_checkpoint_for_another_protocol_option(results_dir, capsys):
    assert main(["run", *SMALL, "train.steps=3"]) == 0
    capsys.readouterr()
    assert main(["eval", *SMALL, "train.steps=3", "protocol.dice=pooled"]) == 0
    assert "using trained weights" in capsys.readouterr().err
    pooled = [d for d in _run_dirs(results_dir) if "dice=pooled" in json.loads((d / "run.json").read_text())["non_standard"]]
    assert len(pooled) == 1 and not (pooled[0] / "checkpoints").exists()
    assert main(["eval", *SMALL, "train.steps=5"]) == 2
    assert "no trained checkpoint" in capsys.readouterr().err


def test_setting2_trains_one_model_per_organ_group(results_dir):
    assert main(["run", *SMALL, "train.steps=2", "setting=2"]) == 0
    (run_dir,) = _run_dirs(results_dir)
    groups = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert groups == ["left_kidney+right_kidney", "liver+spleen"]
    assert set(pd.read_csv(run_dir / "train_log.csv").group) == set(groups)


RESUME_ARGV = [sys.executable, "-m", "fsmis_bench.cli", "run", *SMALL, "train.steps=30", "train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: the resume runs below must end in exactly this record."""
    results = tmp_path_factory.mktemp("uninterrupted")
    env = {**os.environ, "FSMIS_NO_PROGRESS": "1", "FSMIS_RESULTS_DIR": str(results)}
    done = subprocess.run(RESUME_ARGV, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (run_dir,) = _run_dirs(results)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("signum, exit_code, extra", [
    (signal.SIGKILL, -signal.SIGKILL, []),  # no handler: resumes from the last periodic checkpoint
    (signal.SIGTERM, 128 + signal.SIGTERM, []),  # saved at the next step boundary
    (signal.SIGINT, 128 + signal.SIGINT, []),  # Ctrl-C: the same
    # resume states written by a background thread (the default with CUDA): the same record
    (signal.SIGTERM, 128 + signal.SIGTERM, ["train.async_checkpoint=true"]),
    (signal.SIGKILL, -signal.SIGKILL, ["train.async_checkpoint=true"]),
], ids=["SIGKILL", "SIGTERM", "SIGINT", "SIGTERM-background", "SIGKILL-background"])
def test_interrupted_run_resumes_exactly(uninterrupted, tmp_path, signum, exit_code, extra):
    env = {**os.environ, "FSMIS_NO_PROGRESS": "1", "FSMIS_RESULTS_DIR": str(tmp_path)}
    argv = [*RESUME_ARGV, *extra]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # generous: a loaded CI machine starts slowly
    while not list(tmp_path.glob("**/checkpoints/all/last.json")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob("**/checkpoints/all/last.json")), "no periodic checkpoint appeared"
    process.send_signal(signum)  # during one of the steps after the first checkpoint
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == exit_code, stderr
    (run_b,) = _run_dirs(tmp_path)
    assert not (run_b / "COMPLETE").exists()
    assert "Traceback" not in stderr
    if signum != signal.SIGKILL:
        assert "checkpoint saved" in stderr

    resumed = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(uninterrupted) == files(run_b)
    # the resumed stream of episodes, optimiser and schedule are the uninterrupted ones
    assert (uninterrupted / "cases.csv").read_bytes() == (run_b / "cases.csv").read_bytes()


def _ctrl_c_at_step(step: int, monkeypatch):
    """Send SIGINT to this process while training step ``step`` draws its batch; returns the
    sampler's own ``batch`` (to put back)."""
    from fsmis_bench.training import episodes

    calls = {"n": 0}
    original = episodes.EpisodeSampler.batch

    def interrupted(self, batch_size):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size)

    monkeypatch.setattr(episodes.EpisodeSampler, "batch", interrupted)
    return original


@pytest.mark.parametrize("writes", ["train.async_checkpoint=false", "train.async_checkpoint=true"],
                         ids=["in-step", "background"])
def test_interrupt_saves_a_checkpoint_at_the_step_boundary(writes, results_dir, monkeypatch, capsys):
    from fsmis_bench.training import episodes
    from fsmis_bench.training.checkpoint import load_training_state

    original = _ctrl_c_at_step(3, monkeypatch)
    assert main(["run", *SMALL, "train.steps=6", writes]) == 130
    (checkpoint_dir,) = {p.parent for p in results_dir.glob("**/checkpoints/all/last.json")}
    state = load_training_state(checkpoint_dir)
    assert state["step"] == 3  # step 3 finished, then the state was saved
    assert "interrupted at step 3; checkpoint saved" in capsys.readouterr().err
    monkeypatch.setattr(episodes.EpisodeSampler, "batch", original)
    assert main(["run", *SMALL, "train.steps=6"]) == 0
    assert "resuming" in capsys.readouterr().err
    assert not (checkpoint_dir / "last.json").exists() and (checkpoint_dir / "final.safetensors").exists()


def test_writes_left_unfinished_by_a_killed_process_are_removed_on_resume(results_dir, monkeypatch, capsys):
    """``kill -9`` during a write leaves its temporary file: a checkpoint's (10.3 GB for
    SD-1.5) or a record's (the training log, ``run.json``). The resumed run removes each,
    says so, and ends as an uninterrupted one's folder does (which is what the SIGKILL case
    of the resume test compares)."""
    from fsmis_bench.training import episodes

    original = episodes.EpisodeSampler.batch
    calls = {"n": 0}

    def interrupted(self, batch_size):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size)

    monkeypatch.setattr(episodes.EpisodeSampler, "batch", interrupted)
    assert main(["run", *SMALL, "train.steps=6"]) == 130
    (checkpoint_dir,) = {p.parent for p in results_dir.glob("**/checkpoints/all/last.json")}
    run_dir = checkpoint_dir.parent.parent
    leftovers = [checkpoint_dir / ".last-00000004.safetensors.tmp-4242",  # what the kill left mid-write
                 checkpoint_dir / ".train_log.csv.tmp-x52i_oyd", run_dir / ".run.json.tmp-ab3_9xyz"]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    (run_dir / ".notes").write_text("a hidden file of the user's")
    monkeypatch.setattr(episodes.EpisodeSampler, "batch", original)
    capsys.readouterr()
    assert main(["run", *SMALL, "train.steps=6"]) == 0
    err = capsys.readouterr().err
    for leftover in leftovers:
        assert f"removed {leftover.relative_to(run_dir)}, a write that an interrupted process left" in err
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["final.safetensors", "train_log.csv",
                                                                 "train_step.json"]
    assert (run_dir / ".notes").exists() and not list(run_dir.rglob("*.tmp-*"))


def test_smoke_subset_is_evaluated_and_marked(results_dir):
    assert main(["run", "method=support_copy", "protocol.organs=[liver]", "protocol.max_queries=1", "setting=2"]) == 0
    (run_dir,) = _run_dirs(results_dir)
    cases = pd.read_csv(run_dir / "cases.csv")
    assert list(cases.organ) == ["liver"]
    assert json.loads((run_dir / "run.json").read_text())["non_standard"] == ["organs=liver", "max_queries=1"]
    assert main(["run", "method=support_copy", "protocol.organs=[heart]"]) == 2


def test_a_run_directory_has_one_writer(results_dir, capsys):
    import fcntl

    from fsmis_bench.config import compose
    from fsmis_bench.runner import identify

    argv = ["run", *SMALL, "train.steps=2"]
    run_dir = identify(compose(argv[1:])).run_dir
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another live process would
        assert main(argv) == 2
        assert "being computed by another process" in capsys.readouterr().err
    assert main(argv) == 0  # the lock goes with its holder


def test_evaluating_a_saved_checkpoint_gives_the_in_process_masks(results_dir):
    # prototype trains in NHWC on a CPU (train.channels_last); weights read back from a file
    # must be evaluated in the same layout, or a few voxels round the other way
    argv = [*SMALL, "dataset.size=128", "train.image_size=128", "method.width=16", "train.steps=6"]
    assert main(["run", *argv]) == 0
    (trained,) = _run_dirs(results_dir)
    assert main(["eval", *argv, f"checkpoint={trained}"]) == 0
    (external,) = [d for d in _run_dirs(results_dir) if d != trained]
    counts = ["organ", "case_id", "tp", "fp", "fn"]
    in_process = pd.read_csv(trained / "cases.csv")[counts].sort_values(["organ", "case_id"])
    from_file = pd.read_csv(external / "cases.csv")[counts].sort_values(["organ", "case_id"])
    assert in_process.to_numpy().tolist() == from_file.to_numpy().tolist()


def test_another_checkpoint_or_log_cadence_is_the_same_run_and_resumes_it(results_dir, tmp_path, monkeypatch, capsys):
    from fsmis_bench.training import episodes

    original = _ctrl_c_at_step(4, monkeypatch)
    assert main(["run", *SMALL, "train.steps=6", "train.checkpoint_every=2", "train.log_every=1"]) == 130
    monkeypatch.setattr(episodes.EpisodeSampler, "batch", original)
    capsys.readouterr()
    # resumed with another cadence: the same folder, from its saved state
    assert main(["run", *SMALL, "train.steps=6", "train.checkpoint_every=5", "train.log_every=3"]) == 0
    assert "resuming" in capsys.readouterr().err
    (run_dir,) = _run_dirs(results_dir)
    # and the numbers of an uninterrupted run with the default cadence
    monkeypatch.setenv("FSMIS_RESULTS_DIR", str(tmp_path / "reference"))
    assert main(["run", *SMALL, "train.steps=6"]) == 0
    (reference,) = _run_dirs(tmp_path / "reference")
    assert reference.name == run_dir.name
    assert (reference / "cases.csv").read_bytes() == (run_dir / "cases.csv").read_bytes()
    assert json.loads((reference / "run.json").read_text())["training_hash"] == \
        json.loads((run_dir / "run.json").read_text())["training_hash"]


def test_a_record_made_while_the_cadence_was_hashed_is_found_and_reused(results_dir, capsys):
    from fsmis_bench.config import compose
    from fsmis_bench.records import config_hash, run_dir_for
    from fsmis_bench.runner import identify

    argv = [*SMALL, "train.steps=2", "train.checkpoint_every=1"]
    assert main(["run", *argv]) == 0
    (made,) = _run_dirs(results_dir)
    ident = identify(compose(argv))
    # move the finished record to where a version that hashed the cadence put it
    earlier = run_dir_for(ident.cfg, ident.inputs, "cadence")
    assert earlier != made
    earlier.parent.mkdir(parents=True, exist_ok=True)
    made.rename(earlier)
    info = json.loads((earlier / "run.json").read_text())
    info["config_hash"] = config_hash(ident.cfg, ident.inputs, "cadence")
    (earlier / "run.json").write_text(json.dumps(info))
    found = identify(compose(argv))
    assert found.run_dir == earlier and found.hash_form == "cadence"
    capsys.readouterr()
    assert main(["run", *argv]) == 0
    assert "already complete, not recomputed" in capsys.readouterr().err
    assert _run_dirs(results_dir) == [earlier]
    # under another cadence it is not that record (its hash held the cadence): a run of its own
    assert identify(compose([*SMALL, "train.steps=2", "train.checkpoint_every=7"])).run_dir == made


def test_a_training_recorded_with_its_cadence_hashed_serves_an_evaluation_under_another_cadence(results_dir, capsys):
    from fsmis_bench.config import compose
    from fsmis_bench.records import config_hash, run_dir_for, training_hash
    from fsmis_bench.runner import identify

    argv = [*SMALL, "train.steps=3", "train.checkpoint_every=7"]
    assert main(["run", *argv]) == 0
    (made,) = _run_dirs(results_dir)
    ident = identify(compose(argv))
    earlier = run_dir_for(ident.cfg, ident.inputs, "cadence")  # as a version that hashed the cadence made it
    earlier.parent.mkdir(parents=True, exist_ok=True)
    made.rename(earlier)
    info = json.loads((earlier / "run.json").read_text())
    info.update(config_hash=config_hash(ident.cfg, ident.inputs, "cadence"),
                training_hash=training_hash(ident.cfg, ident.inputs, "cadence"))
    (earlier / "run.json").write_text(json.dumps(info))
    capsys.readouterr()
    # another evaluation option, the default cadence: that training's weights, not a new training
    assert main(["eval", *SMALL, "train.steps=3", "protocol.n_part=2"]) == 0
    assert "using trained weights" in capsys.readouterr().err
