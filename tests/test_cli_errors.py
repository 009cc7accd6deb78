"""Bad input: one clear message and exit status 2, no traceback, nothing written lost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fsmis_bench.cli import main


def _write_folder(folder: Path, n: int = 10, organ_missing_in: int | None = None) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        image = rng.normal(100, 10, size=(32, 32, 8)).astype(np.float32)
        label = np.zeros((32, 32, 8), dtype=np.uint8)
        if i != organ_missing_in:
            label[8:20, 8:20, 2:7] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"image_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(folder / f"label_{i}.nii.gz"))


def _folder_args(folder: Path) -> list[str]:
    return ["dataset=nifti_folder", f"dataset.path={folder}", "dataset.label_map={liver:1}", "method=support_copy"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "method=nope"], "unknown method 'nope'; known methods: .*prototype.*support_copy"),
        (["run", "dataset=abd_mry"], "unknown dataset 'abd_mry'"),
        (["run", "fold=7", "method=support_copy"], "fold=7 does not exist"),
        (["run", "setting=3"], "unknown setting '3'"),
        (["run", "protocol.dice=mean"], "protocol.dice='mean' is not allowed"),
        (["run", "nonsense"], "cannot read the argument 'nonsense'"),
        (["run", "method=support_copy", "fold=0,1"], r"sweep values \(a,b, range\(\), choice\(\), glob\(\)\) describe"),
        (["run", "method=glob(proto*)"], r"describe several runs.*add -m"),
        # Hydra's sweeps that need its config search or a sweeper: named, not Hydra's internals
        (["run", "-m", "method=glob(proto*)"], r"method=glob\(proto\*\): fsmis-bench cannot enumerate.*range"),
        (["run", "-m", "method.lr=interval(0.1,0.2)"], r"cannot enumerate this sweep"),
        (["run", "results_dir="], r"results_dir='' names no folder.*leave it out for \$FSMIS_RESULTS_DIR"),
        (["run", "results_dir=null"], r"results_dir=null names no folder"),
        (["run", "seed=18446744073709551616"], r"seed=18446744073709551616 is not allowed.*at most 9223372036854775807"),
        # every option is checked before data or disk is touched (no "running" folder)
        (["run", "train.steps=0"], r"train.steps=0 is not allowed.*at least 1"),
        (["run", "train.checkpoint_every=0"], r"train.checkpoint_every=0 is not allowed"),
        (["run", "train.batch_size=0"], r"train.batch_size=0 is not allowed"),
        (["run", "train.log_every=0"], r"train.log_every=0 is not allowed"),
        (["run", "train.grad_accum=0"], r"train.grad_accum=0 is not allowed"),
        (["run", "train.warmup_steps=-1"], r"train.warmup_steps=-1 is not allowed"),
        (["run", "train.image_size=4"], r"train.image_size=4 is not allowed"),
        (["run", "train.schedule=cos"], r"train.schedule='cos' is not allowed.*cosine"),
        (["run", "train.grad_clip=-1"], r"train.grad_clip=-1 is not allowed"),
        (["run", "train.steps=1.5"], r"train.steps must be an integer"),
        (["run", "train.augment=maybe"], r"train.augment='maybe' is not allowed"),
        (["run", "seed=-1"], r"seed=-1 is not allowed"),
        (["run", "protocol.n_part=0"], r"protocol.n_part=0 is not allowed"),
        (["run", "protocol.max_queries=0"], r"protocol.max_queries=0 is not allowed"),
        # a typo gets the close key, never a silent default
        (["run", "train.stepz=5"], r"unknown option 'train.stepz'.*did you mean train.steps\?"),
        (["run", "+train.stepz=5"], r"\+train.stepz adds a key that nothing reads.*did you mean train.steps\?"),
        (["run", "+method.widht=8"], r"nothing reads.*did you mean method.width\?"),
        # the file that declares the chosen method's options, a plugin's own included
        (["run", "method=prototype", "method.widht=8"],
         r"unknown option 'method.widht'.*did you mean method.width\? method=prototype declares its options in "
         r"\S*configs/method/prototype.yaml"),
        # another method's option: named as such, not "did you mean method.name?"
        (["run", "method.vae_dtype=bfloat16"],
         r"unknown option 'method.vae_dtype' for method=prototype.*is an option of method=diffews, method=sdfsmis, "
         r"method=sdfsmis_qe.*method=prototype declares its options in \S*prototype.yaml"),
        (["run", "method.foo=1"], r"unknown option 'method.foo'\n  hint: method=prototype declares"),
        (["run", "method=sdfsmis", "backbone=sd16"], r"unknown backbone 'sd16'.*did you mean 'sd15'\?"),
        # a value where a config group or a section of keys belongs
        (["run", "memory=true"], r"memory=true: memory is a config group, and 'true' is none of its configs.*"
                                 r"memory is one of: default, low"),
        (["run", "fidelity=1"], r"fidelity=1: fidelity is a config group.*code, paper"),
        (["run", "speed=null"], r"speed=null: speed is a config group"),
        (["run", "protocol=null"], r"protocol=null replaces the whole section protocol with one value.*"
                                   r"protocol.<key>=<value>"),
        (["run", "train=5"], r"train=5 replaces the whole section train"),
        (["run", "=5"], r"cannot read the argument '=5': it names no key"),
        (["run", "checkpoint=/x.safetensors"], r"checkpoint= is an option of `fsmis-bench eval`"),
        # a ${...} in an override that names nothing: one line, not OmegaConf's traceback
        (["run", "results_dir=${oc.env:FSMIS_SURELY_UNSET}/r"],
         r"Environment variable 'FSMIS_SURELY_UNSET' not found.*its \$\{...\} names something that does not exist"),
        (["run", "protocol=${nope}"], r"Interpolation key 'nope' not found"),
        (["run", "seed=${nope}"], r"Interpolation key 'nope' not found"),
        # a folder name Hydra's grammar reads otherwise: quote it
        (["run", "dataset=nifti_folder", "dataset.path=/data/scans,v2"],
         r"the comma makes two values of one path.*quote the path: \"dataset.path='/data/scans,v2'\""),
        (["run", "dataset=nifti_folder", "dataset.path=/data/scans(1)"],
         r"quote the path: \"dataset.path='/data/scans\(1\)'\""),
        (["run", "dataset=nifti_folder", "dataset.path=/data/sc\u00e4n"], r"quote the path: \"dataset.path='/data/sc\u00e4n'\""),
    ],
)
def test_bad_arguments(argv, message, capsys, results_dir):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err, __import__("re").S), err
    assert "Traceback" not in err
    assert not results_dir.exists()


@pytest.mark.parametrize("raised", [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000 bytes"),
    MemoryError(),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_running_out_of_memory_is_one_error_that_says_what_to_lower(raised, capsys, monkeypatch, results_dir):
    from fsmis_bench import runner

    def exhausted(*args, **kwargs):
        raise raised

    monkeypatch.setattr(runner, "execute", exhausted)
    assert main(["run", "method=support_copy", "dataset.size=64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and "train.image_size" in err and "Traceback" not in err


def test_another_runtime_error_is_not_taken_for_memory(monkeypatch, results_dir):
    from fsmis_bench import runner

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(runner, "execute", broken)
    with pytest.raises(RuntimeError, match="shapes"):
        main(["run", "method=support_copy", "dataset.size=64"])


def test_missing_data_root(capsys, results_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("FSMIS_DATA_ROOT", raising=False)
    assert main(["run", "method=support_copy", "dataset=abd_mri"]) == 2
    assert "needs a data root" in capsys.readouterr().err
    assert main(["run", "method=support_copy", "dataset=abd_mri", f"data_root={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "CHAOST2/chaos_MR_T2_normalized/image_<id>.nii.gz" in err


def test_corrupt_nifti(tmp_path, capsys, results_dir):
    folder = tmp_path / "scans"
    _write_folder(folder)
    (folder / "image_3.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert main(["run", *_folder_args(folder)]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "image_3.nii.gz" in err
    assert not results_dir.exists()


def test_support_without_the_organ(tmp_path, capsys, results_dir):
    folder = tmp_path / "scans"
    _write_folder(folder, organ_missing_in=3)  # fold 0 = scans 1,2,3; support = position 2 = id 3
    assert main(["run", *_folder_args(folder)]) == 2
    err = capsys.readouterr().err
    assert "support scan 3 shows liver in 0 slices" in err and "supp_idx" in err
    assert main(["run", *_folder_args(folder), "protocol.supp_idx=0"]) == 0


def test_supp_idx_minus_one_is_the_last_scan_of_the_fold(tmp_path, capsys, results_dir):
    """The hint of an out-of-range supp_idx offers -1 (the last scan, ADNet's choice): it must work."""
    folder = tmp_path / "scans"
    _write_folder(folder, organ_missing_in=3)  # fold 0 = scans 1,2,3: the last is 3, without the organ
    assert main(["run", *_folder_args(folder), "protocol.supp_idx=-1"]) == 2
    assert "support scan 3 shows liver in 0 slices" in capsys.readouterr().err
    assert main(["run", *_folder_args(folder), "protocol.supp_idx=5"]) == 2
    assert "or -1 for the last scan" in capsys.readouterr().err


def test_failed_run_in_a_sweep_keeps_finished_runs(tmp_path, capsys, results_dir):
    folder = tmp_path / "scans"
    _write_folder(folder, organ_missing_in=5)  # fold 0 = ids 1,2,3 (support 3); fold 1 = ids 3,4,5 (support 5 lacks it)
    assert main(["run", "-m", *_folder_args(folder), "fold=0,1"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 runs failed; finished runs are kept" in err
    assert len(list(results_dir.glob("support_copy/nifti_folder/setting1/fold0/*/COMPLETE"))) == 1


def test_console_script_prints_no_traceback(results_dir):
    done = subprocess.run(
        [sys.executable, "-m", "fsmis_bench.cli", "run", "method=nope"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "unknown method 'nope'" in done.stderr


@pytest.mark.parametrize("argv", [
    ["run", "--export-masks", "masks", "method=support_copy", "fold=1", "--cfg", "job"],
    ["run", "method=support_copy", "--cfg", "job", "fold=1"],
])
def test_overrides_after_an_option_are_still_overrides(argv, capsys):
    """README: `run ... --export-masks DIR`; a user who adds an override after the flag must
    not get argparse's 'unrecognized arguments'."""
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "name: support_copy" in out and "fold: 1" in out


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "method=support_copy", "--bogus"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`fsmis-bench check-data ... | head`: the pipe closes under a long output."""
    code = ("import sys\nfrom fsmis_bench import cli\n"
            "def long_listing(args):\n    for i in range(200000):\n        print('line', i)\n"
            "cli._list = long_listing\nsys.exit(cli.main(['list']))\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith(b"line")
    process.stdout.close()  # as `head` does
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_an_error_starts_its_own_line_after_a_progress_bar_left_open(capsys, monkeypatch):
    """A bar drawn with ``\\r`` and no newline, then the error: the message must not be glued
    to the bar's last state."""
    from tqdm import tqdm

    from fsmis_bench import cli
    from fsmis_bench.errors import ConfigError

    def failing(args):
        bar = tqdm(total=50, desc="train", file=sys.stderr, disable=False)
        bar.update(7)  # an exception leaves it open, as a failing training step does
        raise ConfigError("the method failed", hint="fix it")

    monkeypatch.setattr(cli, "_list", failing)
    assert main(["list"]) == 2
    err = capsys.readouterr().err
    assert "\nerror: the method failed\n  hint: fix it\n" in err and "train" in err


def test_grouped_data_warnings_name_each_scan_once_in_full(capsys):
    """Scans read twice (training, then evaluation) are named once, the first scan not again,
    one scan as "scan", and the sentence whole (it is printed far from its first line)."""
    from fsmis_bench.cli import _DataWarnings
    from fsmis_bench.errors import DataWarning

    long = "the header names no orientation (qform and sform codes 0), so it is read as LAS and may be laid out wrongly"
    shown = _DataWarnings()
    for case in ("2", "3", "5", "3", "5", "2"):
        shown.show(f"nifti_folder scan {case}: {long}", DataWarning, "x.py", 1)
    for case in ("7", "8"):
        shown.show(f"nifti_folder scan {case}: holds Hounsfield units", DataWarning, "x.py", 1)
    shown.flush()
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: nifti_folder scan 2: {long}",
                     "warning: nifti_folder scan 7: holds Hounsfield units",
                     f"warning: the same for nifti_folder scans 3, 5: {long}",
                     "warning: the same for nifti_folder scan 8: holds Hounsfield units"]


def test_a_key_given_twice_is_said_and_the_last_used(capsys):
    """Scripts keep defaults in a variable and override one after it: Hydra's last value wins,
    with a note."""
    assert main(["run", "--cfg", "job", "fold=1", "method=support_copy", "fold=2"]) == 0
    captured = capsys.readouterr()
    assert "\nfold: 2\n" in captured.out
    assert "note: fold is given twice (fold=1, then fold=2): the last is used" in captured.err


@pytest.mark.parametrize("argv, known", [
    (["check-data", "abd_mrri"], "abd_ct, abd_mri, card_mri, nifti_folder"),
    (["supervoxels", "abd_mrri"], "abd_ct, abd_mri, card_mri"),
    (["prepare", "abd_mrri", "--raw", "x", "--out", "y"], "abd_mri"),
])
def test_a_dataset_typo_in_the_data_commands_is_one_line_with_the_close_name(argv, known, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'abd_mrri'; did you mean 'abd_mri'?") and known in err
    assert "usage:" not in err


@pytest.mark.parametrize("command, said", [
    ("report", "interrupted; nothing was written (what was there is unchanged): run the same command again"),
    ("runs", "interrupted"),
])
def test_ctrl_c_says_what_each_command_leaves(command, said, monkeypatch, capsys, tmp_path) -> None:
    """A report is written whole or not at all: it does not resume, so it does not say so."""
    from fsmis_bench import cli

    def interrupted(args):
        raise KeyboardInterrupt

    parser = cli.build_parser(command)
    for subcommand in parser._subparsers._group_actions[0].choices.values():  # each interrupted at once
        subcommand.set_defaults(func=interrupted)
    monkeypatch.setattr(cli, "build_parser", lambda first: parser)
    assert main([command, "--results", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == said


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys) -> None:
    from fsmis_bench import cli

    def interrupted(first):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["report"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err
