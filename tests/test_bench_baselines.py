"""The CPU speed benchmark compares today's step with the step of before issue 11. Its
"plain" variants rebuild the old path inside today's engine, so they must not inherit a
switch that a later config turned on; benchmarks/pre_issue_step.py times the old code
itself, and must run against any checkout (it is checked here against this one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fsmis_bench.config import compose
from fsmis_bench.training.precision import with_resolved_precision

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _variants() -> dict:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import test_bench_training
    finally:
        sys.path.remove(str(BENCHMARKS))
    return test_bench_training.VARIANTS


@pytest.mark.parametrize("name", ["prototype-plain", "sdfsmis_tiny-plain"])
def test_plain_variants_keep_the_pre_issue_switches(name):
    overrides, loss_name = _variants()[name]
    cfg = compose([*overrides, "device=cpu"])
    # before issue 11: NCHW, fp32 everywhere, no fused or compiled step
    assert cfg.train.channels_last is False
    assert str(cfg.mixed_precision) in ("no", "auto")
    assert cfg.train.compile is False and cfg.train.weight_dtype == "float32"
    assert cfg.method.get("vae_dtype", "float32") == "float32"
    assert not with_resolved_precision(cfg).method.get("joint_pass", False)  # `auto` is off on a CPU
    if name.startswith("prototype"):
        assert loss_name == "training_loss_reencoded"


@pytest.mark.parametrize("variant", [None, "prototype-now"], ids=["old-step-body", "make-bench-variant"])
def test_pre_issue_step_script_runs_on_this_checkout(tmp_path, variant):
    """The old step body uses only names that exist at both commits: it must run here too."""
    command = [sys.executable, str(BENCHMARKS / "pre_issue_step.py"), "--rounds", "1", "--warmup", "0"]
    result = subprocess.run(
        command + (["--variant", variant] if variant else []),
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "FSMIS_NO_PROGRESS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["method"] == "prototype" and record["rounds"] == 1
    assert record["variant"] == (variant or "pre_issue")
    assert 0 < record["min_ms"] <= record["mean_ms"]
