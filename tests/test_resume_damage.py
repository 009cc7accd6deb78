"""Resuming a run that was stopped or left damaged: stop signals sent to the whole process
group with episode workers, damaged parts and step files of an unfinished run, a damaged
``run.json``'s resumption history."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from fsmis_bench.cli import main
from fsmis_bench.training.loader import _leave_signals_to_the_main_process

from tiny_runs import SMALL
from tiny_runs import run_dirs as _run_dirs


def _files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


class _Slow(Dataset):
    def __len__(self) -> int:
        return 1000

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.01)
        return torch.tensor(index)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_worker_leaves_stop_signals_to_the_main_process_but_obeys_its_terminate():
    iterator = iter(DataLoader(_Slow(), batch_size=None, num_workers=1,
                               worker_init_fn=_leave_signals_to_the_main_process))
    assert int(next(iterator)) == 0
    worker = iterator._workers[0]
    for name in ("TERM", "INT", "USR1", "USR2"):  # as another process (timeout, Slurm, a terminal) sends them
        subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
    time.sleep(0.3)
    assert [int(next(iterator)) for _ in range(3)] == [1, 2, 3]  # the worker lives and draws on
    worker.terminate()  # SIGTERM from its parent: torch's and multiprocessing's last resort
    worker.join(timeout=10)
    assert not _alive(worker.pid)
    del iterator


RUN = [sys.executable, "-m", "fsmis_bench.cli", "run", *SMALL, "train.steps=200", "train.checkpoint_every=4"]


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_exactly(tmp_path):
    """GNU ``timeout``, Slurm and a terminal's Ctrl-C signal the whole process group, the
    episode workers included: the main process still saves at the step boundary and the
    same command resumes to the uninterrupted record (workers never change a number, so
    the reference runs without them)."""
    env = {**os.environ, "FSMIS_NO_PROGRESS": "1"}
    reference = subprocess.run([*RUN, f"results_dir={tmp_path / 'reference'}", "train.num_workers=0"],
                               env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    (uninterrupted,) = _run_dirs(tmp_path / "reference")

    results = tmp_path / "stopped"
    argv = [*RUN, f"results_dir={results}", "train.num_workers=2"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 600
    while not list(results.glob("**/checkpoints/all/last.json")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(results.glob("**/checkpoints/all/last.json")), "no periodic checkpoint appeared"
    os.killpg(process.pid, signal.SIGTERM)  # the main process and its two workers
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "checkpoint saved" in stderr and "Traceback" not in stderr
    assert stderr.count("SIGTERM received") == 1  # the workers print nothing
    (run_dir,) = _run_dirs(results)
    assert not (run_dir / "COMPLETE").exists()

    resumed = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert _files(uninterrupted) == _files(run_dir)
    assert (uninterrupted / "cases.csv").read_bytes() == (run_dir / "cases.csv").read_bytes()
    assert ((uninterrupted / "checkpoints/all/final.safetensors").read_bytes()
            == (run_dir / "checkpoints/all/final.safetensors").read_bytes())


# -- an unfinished run's damaged files ----------------------------------------------------
ARGV = ["run", *SMALL, "train.steps=4"]


@pytest.fixture()
def parts_written(results_dir) -> tuple[Path, bytes]:
    """A run stopped after its evaluation parts were written, before they were put
    together (``_finish``), and the ``cases.csv`` an uninterrupted run wrote."""
    assert main(ARGV) == 0
    (run_dir,) = _run_dirs(results_dir)
    cases = (run_dir / "cases.csv").read_bytes()
    for name in ("COMPLETE", "cases.csv", "predictions.npz", "train_log.csv"):
        (run_dir / name).unlink()
    info = json.loads((run_dir / "run.json").read_text())
    info.update(status="running", finished_at=None)
    info.pop("training_step")
    (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return run_dir, cases


def _cut_mid_row(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _drop_column(path: Path) -> None:
    lines = path.read_text().splitlines()
    path.write_text("".join(",".join(line.split(",")[:-1]) + "\n" for line in lines))


def _keep_two_rows(path: Path) -> None:
    path.write_text("\n".join(path.read_text().splitlines()[:3]) + "\n")


@pytest.mark.parametrize("damage, said", [
    (lambda p: p.write_bytes(b""), "(empty)"),
    (_cut_mid_row, "(cut short in the middle of a row)"),
    (_drop_column, "lacks columns ['fn']"),
    (_keep_two_rows, "lacks 6 of the 8 (organ, query volume) rows"),
], ids=["empty", "cut-mid-row", "no-fn-column", "two-rows"])
def test_a_damaged_part_is_evaluated_again_with_the_trained_weights(parts_written, damage, said, capsys):
    run_dir, uninterrupted = parts_written
    part = run_dir / "parts" / "cases_all.csv"
    damage(part)
    capsys.readouterr()
    assert main(ARGV) == 0
    err = capsys.readouterr().err
    assert f"{part} is damaged {said}" in err or f"{part} is damaged ({said}" in err, err
    assert err.count("evaluating prototype/phantom s1 f0 [all] again (its trained weights are kept)") == 1
    assert "using trained weights" in err and "resuming train" not in err  # nothing trained again
    assert (run_dir / "COMPLETE").exists()
    assert (run_dir / "cases.csv").read_bytes() == uninterrupted
    assert part.read_bytes() == uninterrupted  # one group: the part is the whole


def test_a_damaged_predictions_part_is_evaluated_again(parts_written, capsys):
    run_dir, uninterrupted = parts_written
    predictions = run_dir / "parts" / "predictions_all.npz"
    whole = predictions.read_bytes()
    predictions.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert main(ARGV) == 0
    err = capsys.readouterr().err
    assert f"{predictions} is damaged (BadZipFile" in err and "again (its trained weights are kept)" in err
    assert (run_dir / "cases.csv").read_bytes() == uninterrupted
    assert predictions.read_bytes() == whole


def test_complete_is_never_written_over_a_damaged_part(parts_written, monkeypatch, capsys):
    """The last guard: parts damaged after ``_execute`` looked at them (here: a check that
    let one through) stop the run with one error, and it is not marked complete."""
    from fsmis_bench import runner

    run_dir, _ = parts_written
    _keep_two_rows(run_dir / "parts" / "cases_all.csv")
    monkeypatch.setattr(runner, "_part_damage", lambda p, group: None)
    capsys.readouterr()
    assert main(ARGV) == 2
    err = capsys.readouterr().err
    assert "are damaged (put together, cases.csv lacks 6 of the 8" in err and "not marked complete" in err
    assert "hint: rerun the same command" in err and "Traceback" not in err
    assert not (run_dir / "COMPLETE").exists() and not (run_dir / "cases.csv").exists()


@pytest.mark.parametrize("content", [b'{"device": "cpu", "proc', b"", b"[1, 2]\n"], ids=["cut", "empty", "list"])
def test_a_damaged_train_step_record_is_recorded_as_unknown(parts_written, content, capsys):
    run_dir, uninterrupted = parts_written
    step_file = run_dir / "checkpoints" / "all" / "train_step.json"
    step_file.write_bytes(content)
    capsys.readouterr()
    assert main(ARGV) == 0
    err = capsys.readouterr().err
    assert err.count(f"{step_file} is damaged (") == 1 and "training step as unknown" in err
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "complete"
    assert info["training_step"] == {"all": "unknown (train_step.json was damaged)"}
    assert (run_dir / "cases.csv").read_bytes() == uninterrupted


def test_an_empty_group_training_log_is_left_out_with_one_line(parts_written, capsys):
    run_dir, uninterrupted = parts_written
    log = run_dir / "checkpoints" / "all" / "train_log.csv"
    log.write_bytes(b"")
    capsys.readouterr()
    assert main(ARGV) == 0
    err = capsys.readouterr().err
    assert f"{log} is damaged (EmptyDataError" in err
    assert (run_dir / "COMPLETE").exists() and not (run_dir / "train_log.csv").exists()
    assert (run_dir / "cases.csv").read_bytes() == uninterrupted


# -- a damaged run.json keeps what it can of the run's history -----------------------------
HISTORY = [{"at": "2026-11-01T00:00:00+00:00", "code": {"fsmis_bench_git": {"commit": "abc", "dirty": False}},
            "machine": {"processor": "earlier"}}]


def _with_history(run_dir: Path) -> tuple[Path, dict, str]:
    """The run's record, as a dict with :data:`HISTORY` and as the text write_json makes."""
    record = run_dir / "run.json"
    info = json.loads(record.read_text())
    info["resumed"] = HISTORY
    return record, info, json.dumps(info, indent=2) + "\n"


def test_a_damaged_run_json_keeps_the_history_it_still_holds(parts_written, capsys):
    record, info, text = _with_history(parts_written[0])
    record.write_text("x" + text[1:])  # a bad first byte: no JSON, every value still there
    capsys.readouterr()
    assert main(ARGV) == 0
    assert "written again (its history is kept)" in capsys.readouterr().err
    again = json.loads(record.read_text())
    assert again["started_at"] == info["started_at"]
    assert again["code"] == info["code"] and again["machine"] == info["machine"]
    assert again["resumed"][0] == HISTORY[0]
    assert len(again["resumed"]) == 2 and set(again["resumed"][1]) == {"at", "code", "machine"}


def test_a_run_json_cut_short_records_its_history_as_lost(parts_written, capsys):
    record, info, text = _with_history(parts_written[0])
    record.write_text(text[: text.index('"resumed"') + 30])  # cut inside the history
    capsys.readouterr()
    assert main(ARGV) == 0
    assert "the rest recorded as unknown" in capsys.readouterr().err
    again = json.loads(record.read_text())
    lost, this = again["resumed"]
    assert lost["lost"] == "unknown (run.json was damaged): its earlier resumptions"
    assert set(this) == {"at", "code", "machine"}
    assert again["started_at"] == info["started_at"]  # written before the cut
    # the next resumption appends to the history as to any other
    (record.parent / "COMPLETE").unlink()
    assert main(ARGV) == 0
    assert len(json.loads(record.read_text())["resumed"]) == 3


# -- an interrupted parallel sweep ------------------------------------------------------------
SUPPORT_COPY = ["method=support_copy", "dataset=phantom", "dataset.size=48", "dataset.n_slices=12"]


def test_a_stop_pickles_as_itself():
    """A joblib job's stop reaches the sweep's process pickled (before, it failed to
    un-pickle there and the sweep ended with BrokenProcessPool, read as a pickling error)."""
    import pickle

    from fsmis_bench.training.interrupt import Interrupted

    again = pickle.loads(pickle.dumps(Interrupted(signal.SIGINT)))
    assert type(again) is Interrupted and again.signum == signal.SIGINT and again.exit_code == 130


def _fake_runs(results: Path) -> tuple[Path, Path]:
    """What a sweep's jobs leave: one finished run, one stopped before its end."""
    finished = results / "support_copy/phantom/setting1/fold0/seed0-aaaaaaaa"
    stopped = results / "support_copy/phantom/setting1/fold1/seed0-bbbbbbbb"
    for run in (finished, stopped):
        run.mkdir(parents=True)
        (run / "run.json").write_text("{}\n")
    (finished / "COMPLETE").write_text("x\n")
    return finished, stopped


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError], ids=["ctrl-c", "launcher-broke"])
def test_an_interrupted_joblib_sweep_says_what_finished_and_the_command_that_resumes(stop, tmp_path, capsys,
                                                                                    monkeypatch):
    from hydra._internal.hydra import Hydra

    results = tmp_path / "my results"
    before = results / "support_copy/phantom/setting1/fold4/seed0-cccccccc"  # finished before the sweep
    before.mkdir(parents=True)
    (before / "run.json").write_text("{}\n")
    (before / "COMPLETE").write_text("x\n")
    old = time.time() - 3600
    for path in (before, before / "run.json", before / "COMPLETE"):
        os.utime(path, (old, old))

    def stopped(*args, **kwargs):
        _fake_runs(results)
        raise stop("A result has failed to un-serialize")

    monkeypatch.setattr(Hydra, "multirun", stopped)
    argv = ["run", "-m", *SUPPORT_COPY, "fold=0,1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"results_dir={results}"]
    assert main(argv) == (130 if stop is KeyboardInterrupt else 2)
    err = capsys.readouterr().err
    assert (f"Under {results} since the sweep started, 1 run finished: support_copy/phantom/setting1/fold0/"
            "seed0-aaaaaaaa; 1 stopped before the end: support_copy/phantom/setting1/fold1/seed0-bbbbbbbb") in err
    assert f"`fsmis-bench runs --results '{results}'` lists every run's state" in err
    resume = "fsmis-bench run -m " + " ".join(argv[2:-1]) + f" 'results_dir={results}'"
    if stop is KeyboardInterrupt:
        assert "the sweep was interrupted" in err
        assert f"to resume, run the same command: {resume}\n" in err
    else:
        assert "error: the launcher stopped: RuntimeError: A result has failed to un-serialize." in err
        assert f"hint: finished runs are kept and the same command resumes the others: {resume} (" in err
    assert "Traceback" not in err


# -- `fsmis-bench runs`: runs that would read the same --------------------------------------
def test_runs_shows_what_tells_apart_two_runs_of_one_fold_and_seed(results_dir, monkeypatch, capsys):
    """Two stale runs whose configs differ in one value (another learning rate) are told
    apart by that value, in the table and the JSON; a run alone in its folder needs nothing."""
    from fsmis_bench.training import episodes

    original, calls = episodes.EpisodeSampler.batch, {"n": 0}

    def interrupted(self, batch_size, **kwargs):  # Ctrl-C at the 3rd draw of each run
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch_size, **kwargs)

    monkeypatch.setattr(episodes.EpisodeSampler, "batch", interrupted)
    every = ["train.steps=4", "train.checkpoint_every=1"]
    for options in (["method.lr=0.001"], ["method.lr=0.0005"], ["seed=1"]):
        calls["n"] = 0
        assert main(["run", *SMALL, *every, *options]) == 130
    capsys.readouterr()
    assert main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[8] == "differs"
    rows = {line.split()[-1].rsplit("/", 1)[-1].split("-")[0]: line for line in lines[1:]}
    told = sorted(line.split()[8] for line in lines[1:] if "/seed0-" in line)
    assert told == ["method.lr=0.0005", "method.lr=0.001"]
    assert rows["seed1"].split()[8] == "step"  # nothing to tell apart: the column stays empty
    assert main(["runs", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["differs"] for r in listed) == ["", "method.lr=0.0005", "method.lr=0.001"]


def test_runs_falls_back_to_the_config_hash_when_the_configs_do_not_say(results_dir, capsys):
    for name in ("seed0-aaaaaaaa", "seed0-bbbbbbbb"):
        run = results_dir / "prototype/phantom/setting1/fold0" / name
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"method": "prototype", "dataset": "phantom", "setting": 1,
                                                  "fold": 0, "seed": 0}))
        (run / "config.yaml").write_text("method:\n  name: prototype\n")  # the same (other data)
    assert main(["runs"]) == 0
    told = sorted(line.split()[8:10] for line in capsys.readouterr().out.splitlines()[1:])
    assert told == [["config", "aaaaaaaa"], ["config", "bbbbbbbb"]]


# -- finished weights keep checksums -------------------------------------------------------
def test_a_flipped_bit_in_finished_weights_is_refused_when_they_are_reused(parts_written, capsys):
    from fsmis_bench.training.checkpoint import read_metadata

    run_dir, _ = parts_written
    weights = run_dir / "checkpoints" / "all" / "final.safetensors"
    assert json.loads(read_metadata(weights)["checksums"])  # written with the weights
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    (run_dir / "parts" / "cases_all.csv").unlink()  # the group is evaluated again: its weights are read
    capsys.readouterr()
    assert main(ARGV) == 2
    err = capsys.readouterr().err
    assert f"error: {weights} does not hold the weights that were written: model/" in err
    assert f"hint: delete {weights} and rerun the same command to train this group again" in err
    assert "Traceback" not in err and not (run_dir / "COMPLETE").exists()
    weights.unlink()  # as the hint says: trained again, to the same record
    assert main(ARGV) == 0 and (run_dir / "COMPLETE").exists()
