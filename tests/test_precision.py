"""Precision resolution: `auto` becomes concrete before a run, enters its hash and record,
and the accelerator and TF32 switches follow it."""

from __future__ import annotations

import pytest
import torch

from fsmis_bench.config import compose
from fsmis_bench.errors import ConfigError
from fsmis_bench.records import config_hash, training_hash
from fsmis_bench.training import precision as precision_module
from fsmis_bench.training.engine import make_accelerator
from fsmis_bench.training.precision import Precision, resolve_precision, with_resolved_precision


@pytest.mark.parametrize(
    "device, cuda, mixed, tf32, expected",
    [
        ("cpu", False, "auto", "auto", Precision("no", False)),
        ("cpu", False, "no", True, Precision("no", False)),  # no TF32 off CUDA: the record says what ran
        ("auto", False, "no", True, Precision("no", False)),
        ("cuda", True, "no", True, Precision("no", True)),
        ("cpu", False, "bf16", "auto", Precision("bf16", False)),
        ("auto", True, "auto", "auto", Precision("no", True)),  # the measured default: fp32 + TF32
        ("cuda", True, "auto", False, Precision("no", False)),
        ("auto", True, "bf16", "auto", Precision("bf16", True)),
        ("auto", True, "fp16", False, Precision("fp16", False)),
        ("cpu", False, "fp16", "auto", Precision("no", False)),  # no fp16 autocast on a CPU: it runs fp32
        ("auto", False, "fp16", True, Precision("no", False)),
        ("auto", False, "auto", "auto", Precision("no", False)),
    ],
)
def test_resolution_table(monkeypatch, device, cuda, mixed, tf32, expected):
    monkeypatch.setattr(precision_module.torch.cuda, "is_available", lambda: cuda)
    assert resolve_precision(device, mixed, tf32) == expected


def test_labels():
    assert [Precision(m, t).label for m, t in [("no", True), ("no", False), ("bf16", False), ("bf16", True)]] == [
        "fp32+tf32", "fp32", "bf16", "bf16+tf32",
    ]


def test_cuda_asked_for_without_one_is_a_clear_error_when_run(monkeypatch):
    monkeypatch.setattr(precision_module.torch.cuda, "is_available", lambda: False)
    assert resolve_precision("cuda", "auto", "auto") == Precision("no", True)  # defined, for its identity
    with pytest.raises(ConfigError, match="no CUDA device"):
        make_accelerator(compose(["device=cuda"]))


def test_resolved_config_is_concrete_and_hashed_by_what_runs(monkeypatch):
    cfg = compose(["method=sdfsmis", "backbone=tiny"])
    assert (cfg.mixed_precision, cfg.tf32) == ("auto", "auto")
    monkeypatch.setattr(precision_module.torch.cuda, "is_available", lambda: True)
    on_gpu = with_resolved_precision(cfg)
    assert (on_gpu.mixed_precision, on_gpu.tf32) == ("no", True)
    assert with_resolved_precision(on_gpu) == on_gpu  # idempotent
    monkeypatch.setattr(precision_module.torch.cuda, "is_available", lambda: False)
    on_cpu = with_resolved_precision(cfg)
    assert (on_cpu.mixed_precision, on_cpu.tf32) == ("no", False)
    # `auto` meant different things on the two machines: the resolved runs differ in identity
    assert config_hash(on_gpu) != config_hash(on_cpu) and training_hash(on_gpu) != training_hash(on_cpu)
    # and the unresolved config hashes as what it resolves to here
    assert config_hash(cfg) == config_hash(on_cpu) and training_hash(cfg) == training_hash(on_cpu)
    bf16 = with_resolved_precision(compose(["method=sdfsmis", "backbone=tiny", "mixed_precision=bf16"]))
    assert config_hash(bf16) != config_hash(on_cpu)


@pytest.mark.parametrize("device, cuda, asked, expected", [
    ("auto", True, "auto", True),    # the measured faster kernel with CUDA (docs/speed.md)
    ("auto", False, "auto", False),  # a CPU run keeps the plain path (and its hash)
    ("cpu", True, "auto", False),
    ("auto", True, False, False),    # explicit values are kept
    ("cpu", False, True, True),
    ("cuda", False, "auto", True),   # a GPU run's identity, computed on a machine without one
])
def test_fused_optimizer_auto_resolves_by_device(monkeypatch, device, cuda, asked, expected):
    monkeypatch.setattr(precision_module.torch.cuda, "is_available", lambda: cuda)
    cfg = compose(["method=prototype", f"device={device}", f"train.fused_optimizer={str(asked).lower()}"])
    resolved = with_resolved_precision(cfg)
    assert resolved.train.fused_optimizer is expected
    assert with_resolved_precision(resolved) == resolved


def test_fused_optimizer_auto_builds_the_plain_optimiser_for_cpu_parameters():
    from fsmis_bench.training.optim import build_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-3}]
    assert not build_optimizer(groups, fused="auto").defaults["fused"]
    assert build_optimizer(groups, fused=True).defaults["fused"]


def test_accelerator_follows_the_resolved_precision():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        accelerator = make_accelerator(compose(["device=cpu", "mixed_precision=bf16"]))
        assert accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu"
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        accelerator = make_accelerator(compose(["device=cpu", "fidelity=code"]))
        assert accelerator.mixed_precision == "no"  # its tf32=true resolves to false off CUDA
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match="tf32"):
        compose(["tf32=maybe"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        compose(["mixed_precision=fp8"])


def test_run_record_holds_the_concrete_precision(results_dir):
    import json

    from omegaconf import OmegaConf

    from fsmis_bench.cli import main

    assert main(["run", "method=support_copy", "device=cpu", "protocol.organs=[liver]", "protocol.max_queries=1"]) == 0
    (info_path,) = results_dir.glob("support_copy/**/run.json")
    info = json.loads(info_path.read_text())
    assert info["precision"] == {"mixed_precision": "no", "tf32": False, "label": "fp32"}
    assert info["method_options"]["name"] == "support_copy"  # Method.resolved_options()
    saved = OmegaConf.load(info_path.parent / "config.yaml")
    assert (saved.mixed_precision, saved.tf32) == ("no", False)


@pytest.mark.slow
def test_gpu_precision_check_smoke_runs_on_cpu(capsys):
    """The prepared GPU check (benchmarks/gpu_precision_check.py), on the tiny backbone."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_precision_check.py"
    spec = importlib.util.spec_from_file_location("gpu_precision_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--device", "cpu", "--tiny", "--size", "32", "--steps", "1", "--warmup", "0", "--episodes", "1",
            "--eval-episodes", "1", "--extra", "backbone.vae=identity"]
    assert module.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # on a CPU fp32+tf32 is fp32: two configurations measured, each from the same initial weights
    assert set(result["results"]) == {"fp32", "bf16+tf32"}
    fp32, bf16 = result["results"]["fp32"], result["results"]["bf16+tf32"]
    assert (fp32["mixed_precision"], bf16["mixed_precision"]) == ("no", "bf16")
    assert fp32["finite"] and bf16["finite"] and fp32["step_median_s"] > 0
    assert fp32["first_loss"] == pytest.approx(bf16["first_loss"], rel=0.05)  # same weights, same episode
    assert result["fastest"] in result["results"] and min(result["eval_loss_vs_best"].values()) == 1.0


def test_fp16_on_a_cpu_is_the_fp32_run_and_says_so(capsys, monkeypatch):
    """A CPU has no fp16 autocast (accelerate runs the step in fp32, the same losses bit for
    bit: tests/test_engine_compute.py): such a run is the fp32 run, recorded and hashed so."""
    from fsmis_bench.config import compose
    from fsmis_bench.records import config_hash
    from fsmis_bench.training import engine

    fp16, fp32 = compose(["mixed_precision=fp16", "device=cpu"]), compose(["device=cpu"])
    assert with_resolved_precision(fp16).mixed_precision == "no" and config_hash(fp16) == config_hash(fp32)
    monkeypatch.setitem(engine._SAID, "fp16", False)
    engine.make_accelerator(fp16)
    engine.make_accelerator(fp16)
    assert capsys.readouterr().err.count("a CPU has no fp16 autocast, so this run computes in fp32") == 1
