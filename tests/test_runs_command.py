"""``fsmis-bench runs``: states, ages, and removing stale runs (never complete or running ones)."""

from __future__ import annotations

import fcntl
import json
import shutil

import pytest

from fsmis_bench.cli import main
from fsmis_bench.runs_command import format_age, scan

SMALL = [
    "method=prototype", "dataset=phantom", "dataset.size=64", "dataset.n_slices=16",
    "method.width=8", "method.feature_dim=16", "train.image_size=64", "train.batch_size=2",
    "protocol.min_fg_pixels=20", "train.steps=4", "train.checkpoint_every=1", "train.log_every=1",
]


@pytest.fixture()
def three_runs(results_dir, monkeypatch):
    """A complete run, a stale one (interrupted at step 2) and a running one (lock held)."""
    from fsmis_bench.training import episodes

    assert main(["run", *SMALL]) == 0
    original, calls = episodes.EpisodeSampler.batch, {"n": 0}

    def interrupted(self, batch_size, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch_size, **kwargs)

    monkeypatch.setattr(episodes.EpisodeSampler, "batch", interrupted)
    assert main(["run", *SMALL, "seed=1"]) == 130
    monkeypatch.setattr(episodes.EpisodeSampler, "batch", original)
    stale = next(results_dir.glob("prototype/phantom/setting1/fold0/seed1-*"))
    running = stale.with_name("seed2-0123abcd")
    shutil.copytree(stale, running)
    info = json.loads((running / "run.json").read_text())
    (running / "run.json").write_text(json.dumps({**info, "seed": 2}))
    with open(running / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as the live process computing it would
        yield results_dir


def test_runs_lists_state_age_and_progress(three_runs, capsys):
    states = {r.seed: r for r in scan(three_runs)}
    assert {seed: r.state for seed, r in states.items()} == {"0": "complete", "1": "stale", "2": "running"}
    assert states["1"].progress == "step 2, eval 0/1" and states["0"].progress == ""
    assert all(r.age_s is not None and 0 <= r.age_s < 3600 for r in states.values())
    assert main(["runs"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["state", "age", "idle"] and len(lines) == 4
    assert "3 runs under" in err and "1 complete, 1 running, 1 stale, 0 damaged" in err
    assert main(["runs", "--stale", "--format", "json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["state"] == "stale" and only["seed"] == "1"


def test_remove_stale_needs_yes_and_never_touches_complete_or_running_runs(three_runs, capsys):
    stale = next(three_runs.glob("prototype/phantom/setting1/fold0/seed1-*"))
    assert main(["runs", "--remove-stale"]) == 0
    assert "would remove 1 stale run (their" in capsys.readouterr().err and stale.exists()
    assert main(["runs", "--remove-stale", "--yes"]) == 0
    assert f"removed {stale}" in capsys.readouterr().err
    assert not stale.exists()
    assert sorted(r.state for r in scan(three_runs)) == ["complete", "running"]
    running = next(three_runs.glob("prototype/phantom/setting1/fold0/seed2-*"))
    shutil.rmtree(running)
    assert main(["runs"]) == 0
    assert "1 run under" in capsys.readouterr().err


def test_progress_is_the_resume_point_then_the_phase(three_runs, monkeypatch, capsys):
    """The step a rerun resumes from (the checkpoint, not the last logged step), then
    `trained` once the weights are final, with the evaluation groups done out of all."""
    from fsmis_bench import runner

    stale = next(three_runs.glob("prototype/phantom/setting1/fold0/seed1-*"))
    log = stale / "checkpoints" / "all" / "train_log.csv"
    log.write_text(log.read_text() + "3,0.5,0.001,1.0\n")  # logged, but not checkpointed (a kill -9)
    assert {r.seed: r.progress for r in scan(three_runs)}["1"] == "step 2, eval 0/1"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # during the evaluation, after the training finished

    monkeypatch.setattr(runner, "evaluate", killed)
    assert main(["run", *SMALL, "seed=3"]) == 130
    assert {r.seed: (r.state, r.progress) for r in scan(three_runs)}["3"] == ("stale", "trained, eval 0/1")
    assert main(["runs", "--stale"]) == 0
    assert "trained, eval 0/1" in capsys.readouterr().out


def test_a_finished_run_with_a_damaged_cases_csv_is_listed_damaged(three_runs, capsys):
    complete = next(three_runs.glob("prototype/phantom/setting1/fold0/seed0-*"))
    cases = complete / "cases.csv"
    cases.write_text("".join(cases.read_text().splitlines(keepends=True)[:3]))  # truncated
    (found,) = [r for r in scan(three_runs) if r.seed == "0"]
    assert found.state == "damaged" and "lacks" in found.progress and "truncated" in found.progress
    assert main(["runs"]) == 0
    out, err = capsys.readouterr()
    assert "1 running, 1 stale, 1 damaged" in err and "damaged runs are skipped by `report`" in err
    assert any(line.startswith("damaged") for line in out.splitlines())
    assert main(["runs", "--remove-stale", "--yes"]) == 0  # never removed by this command
    assert cases.exists() and (complete / "COMPLETE").exists()


def test_a_run_with_an_unreadable_run_json_takes_setting_fold_and_seed_from_its_path(three_runs):
    stale = next(three_runs.glob("prototype/phantom/setting1/fold0/seed1-*"))
    (stale / "run.json").write_text("{ damaged")
    (found,) = [r for r in scan(three_runs) if r.path == stale]
    assert (found.method, found.dataset, found.setting, found.fold, found.seed) == ("prototype", "phantom", "1", "0", "1")


@pytest.mark.parametrize("content", [b"[1]", b"\xff\xfe\x00garbage\x9c", b'{"started_at": "yesterday"}',
                                     b'{"started_at": 12}'])
def test_runs_lists_a_run_json_that_is_no_record_instead_of_failing(three_runs, capsys, content):
    """`runs` is the command that finds damaged records: a run.json holding JSON that is no
    record, bytes that are not UTF-8 or a start time that is no date must not stop it."""
    complete = next(three_runs.glob("prototype/phantom/setting1/fold0/seed0-*"))
    stale = next(three_runs.glob("prototype/phantom/setting1/fold0/seed1-*"))
    for run_dir in (complete, stale):
        (run_dir / "run.json").write_bytes(content)
    found = {r.path: r for r in scan(three_runs)}
    assert found[complete].state == "damaged" and found[stale].state == "stale"
    assert found[stale].seed == "1" and found[stale].age_s is None
    assert main(["runs"]) == 0
    assert "1 running, 1 stale, 1 damaged" in capsys.readouterr().err


def test_remove_stale_in_a_folder_it_cannot_write_is_one_error(three_runs, capsys, monkeypatch):
    from fsmis_bench import runs_command

    stale = next(three_runs.glob("prototype/phantom/setting1/fold0/seed1-*"))

    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(runs_command.shutil, "rmtree", read_only)
    assert main(["runs", "--remove-stale", "--yes"]) == 2
    err = capsys.readouterr().err
    assert "error: 1 stale run could not be removed" in err and str(stale) in err and "Read-only" in err
    assert "writable" in err and "Traceback" not in err and stale.exists()


@pytest.mark.parametrize("content", ["method: [unclosed\n", "- a\n- b\n", ""])
def test_a_finished_runs_damaged_config_yaml_is_named_then_written_again_by_its_command(
        three_runs, capsys, tmp_path, content):
    """A damaged config.yaml was read as "another method" by `eval checkpoint=`, raised
    tracebacks in `export`, and the run was listed complete and reported as config=unknown."""
    complete = next(three_runs.glob("prototype/phantom/setting1/fold0/seed0-*"))
    config = complete / "config.yaml"
    written = config.read_text()
    config.write_text(content)
    (found,) = [r for r in scan(three_runs) if r.path == complete]
    assert found.state == "damaged" and "config.yaml" in found.progress
    capsys.readouterr()
    for command in (["export", str(complete), "--out", str(tmp_path / "masks")],
                    ["eval", *SMALL, f"checkpoint={complete}", f"results_dir={tmp_path / 'evaluated'}"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"{complete}: config.yaml" in err and "run the run's own command again" in err, command
        assert "Traceback" not in err and "another method" not in err
    assert not (tmp_path / "masks").exists() and not (tmp_path / "evaluated").exists()
    main(["report", "--format", "csv", "--out", str(tmp_path / "report")])
    assert f"skipped {complete}: config.yaml" in capsys.readouterr().err
    assert main(["run", *SMALL]) == 0  # the same command: nothing recomputed, the file written again
    err = capsys.readouterr().err
    assert "written again from this command's config" in err and "already complete, not recomputed" in err
    assert config.read_text() == written
    assert [r.state for r in scan(three_runs) if r.path == complete] == ["complete"]


def test_a_config_yaml_cut_short_that_still_parses_is_written_again_by_the_runs_command(three_runs, capsys, tmp_path):
    """`export` refuses a config without its sections and asks for the run's command, so
    that command must write it again, not only a config that does not parse."""
    complete = next(three_runs.glob("prototype/phantom/setting1/fold0/seed0-*"))
    config = complete / "config.yaml"
    written = config.read_text()
    config.write_text("setting: 1\nfold: 0\n")
    assert main(["export", str(complete), "--out", str(tmp_path / "masks")]) == 2
    assert "config.yaml lacks ['method', 'dataset']" in capsys.readouterr().err
    assert main(["run", *SMALL]) == 0
    assert "written again from this command's config" in capsys.readouterr().err
    assert config.read_text() == written


def test_missing_results_folder_is_one_message(tmp_path, capsys):
    assert main(["runs", "--results", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: results folder") and "does not exist" in err and "hint:" in err
    (tmp_path / "a_file").write_text("x")
    for command in ("runs", "report"):
        assert main([command, "--results", str(tmp_path / "a_file")]) == 2
        assert "a_file is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("seconds, shown", [(None, "?"), (5, "5s"), (61, "1m"), (7200, "2h"), (90000, "1d")])
def test_format_age(seconds, shown):
    assert format_age(seconds) == shown
