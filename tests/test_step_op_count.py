"""benchmarks/step_op_count.py counts a step's operations by phase on the CPU; the joint
pass (method.joint_pass) must launch far fewer than the two passes, with the frozen parts
and the optimiser unchanged."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_op_count.py"


@pytest.fixture(scope="module")
def step_op_count():
    spec = importlib.util.spec_from_file_location("step_op_count", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_joint_pass_halves_the_unet_operations(step_op_count):
    base = ["method=sdfsmis", "backbone=tiny", "train.image_size=64", "train.fused_optimizer=true"]
    two_pass = step_op_count.count_step(base)
    joint = step_op_count.count_step([*base, "method.joint_pass=true"])
    for counted in (two_pass, joint):
        assert counted["kernel_ops"] == sum(n for phase, n in counted["by_phase"].items() if phase != "views")
        assert counted["by_phase"]["optimizer"] > 0 and counted["by_phase"]["views"] > 0
    # one U-Net call instead of two; the frozen VAE/encoder work and the optimiser are the same
    assert joint["by_phase"]["forward"] < 0.65 * two_pass["by_phase"]["forward"]
    assert joint["by_phase"]["backward"] < 0.55 * two_pass["by_phase"]["backward"]
    assert joint["by_phase"]["no_grad"] == two_pass["by_phase"]["no_grad"]
    assert joint["by_phase"]["optimizer"] == two_pass["by_phase"]["optimizer"]
    # the backward of the two passes sums a second gradient into every weight used twice
    assert two_pass["top"]["backward:add"] > 2 * joint["top"].get("backward:add", 0)


@pytest.mark.slow
def test_batched_encode_makes_the_frozen_encoder_one_call(step_op_count):
    base = ["method=sdfsmis", "backbone=tiny", "train.image_size=64", "train.fused_optimizer=true",
            "method.joint_pass=true"]
    four = step_op_count.count_step(base)
    one = step_op_count.count_step([*base, "method.batched_encode=true"])
    # the TAESD encoder's convolutions run once instead of four times (35 each, and one other);
    # autograd's part is the same, but for the concatenation of the four inputs
    assert one["top"]["no_grad:convolution"] < 0.3 * four["top"]["no_grad:convolution"]
    assert one["by_phase"]["no_grad"] < 0.4 * four["by_phase"]["no_grad"]
    assert one["by_phase"]["forward"] == four["by_phase"]["forward"] + 1
    for phase in ("backward", "optimizer"):
        assert one["by_phase"][phase] == four["by_phase"][phase]
