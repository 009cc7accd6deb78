"""benchmarks/compile_cost.py: the first (compiling) step, the graph count and the steps
after it, for a compile scope against the plain step."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_cost.py"
SMALL = ["method=prototype", "method.width=8", "method.feature_dim=16", "train.image_size=32", "train.batch_size=2"]


@pytest.fixture(scope="module")
def compile_cost():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("compile_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(SCRIPT.parent))


def test_norms_scope_counts_its_graphs_and_keeps_the_first_loss(compile_cost, monkeypatch, capsys):
    from fsmis_bench.training import step as step_module

    monkeypatch.setattr(step_module, "COMPILE_BACKEND", "aot_eager")  # capture, no code generation
    plain = compile_cost.compile_cost(SMALL, steps=1)
    assert compile_cost.main([*SMALL, "train.compile=default", "train.compile_scope=norms", "--steps", "1"]) == 0
    norms = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    torch._dynamo.reset()
    assert plain["unique_graphs"] == 0 and norms["unique_graphs"] >= 1
    assert norms["first_loss"] == pytest.approx(plain["first_loss"], rel=1e-6)
    assert norms["overrides"][-2:] == ["train.compile=default", "train.compile_scope=norms"]
    assert norms["first_step_s"] > 0 and norms["step_s"] > 0
