"""The GPU engine benchmark's CPU smoke mode: every CPU-able variant runs through the engine
path and the JSON carries gpu_sd15_check's fields plus ``engine_path``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_engine_check.py"


@pytest.mark.slow
def test_cpu_smoke_mode_runs_every_variant(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_engine_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "engine.json"
    argv = ["--device", "cpu", "--tiny", "--size", "64", "--steps", "1", "--warmup", "1", "--slices", "2",
            "--tiny-steps", "1", "--budget-s", "1e9", "--out", str(out)]
    assert module.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["engine_path"] is True and result["backbone"] == "tiny" and result["random_weights"] is True
    for key in ("check", "method", "device", "params", "trainable_params", "image_size", "batch_size", "versions"):
        assert key in result
    expected = {"fp32", "tf32", "tf32_fused", "tf32_fused_batch4", "lowmem", "bf16_autocast", "bf16_master"}
    assert set(result["train"]) == expected, result["skipped"]
    for name, row in result["train"].items():
        assert row["loss_finite"] and row["median_s"] > 0 and row["n"] == 1, name
    assert result["train"]["tf32_fused_batch4"]["episodes_per_s"] > 0
    assert result["predict"]["fp32"]["chunk_slices"] == 2
    assert result["tiny"]["tiny_eager"]["steps_per_s"] > 0
    assert set(result["skipped"]) == {"tf32_fused_compiled", "tiny_reduce-overhead"}  # CUDA only
