"""Training steps/s on the CPU through the engine's step (forward, backward, clipping,
AdamW), the plain path of before issue 11 beside the current one, in one process under the
same load:

* ``prototype`` (the default demo: phantom, 128 px, 4 episodes per step): the alignment
  pass re-encoding both images in NCHW (``training_loss_reencoded``, as before) vs each
  image encoded once, channels_last (``training_loss``, today's config), that in NCHW
  (each switch's own share), and that under
  ``mixed_precision=bf16`` (not the default: other numbers; fast on CPUs with AMX);
* tiny SD-FSMIS (``backbone=tiny``, TAESD architecture with random weights, 256 px, one
  episode per step): fp32 VAE, contiguous tensors vs ``method.vae_dtype=bfloat16`` +
  ``train.channels_last=true``, and that with ``method.joint_pass=true`` (support and query
  through the U-Net as one batch), and that with ``method.batched_encode=true`` (the four
  VAE encodes as one call).

    make bench     # or: .venv/bin/python -m pytest benchmarks/test_bench_training.py --benchmark-only -p no:xdist

steps/s = 1 / the mean step time. One intra-op thread, as in test_bench_inference.py.
The "plain" rows rebuild the old path in today's engine, so they set every switch a later
config turned on back off (``tests/test_bench_baselines.py``); ``benchmarks/pre_issue_step.sh``
times the old commit's own steps against today's, alternating processes, for the README's
before/now figure (this CPU drifts by 10-20 % over minutes).
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from fsmis_bench.config import compose
from fsmis_bench.runner import build_method
from fsmis_bench.training.optim import build_optimizer
from fsmis_bench.training.step import ComputeOptions, TrainStep, prepare_method
from pre_issue_step import phantom_batches  # the one input both timings share

VARIANTS = {
    "prototype-plain": (["method=prototype", "train.channels_last=false"], "training_loss_reencoded"),
    "prototype-now": (["method=prototype", "train.channels_last=true"], "training_loss"),
    "prototype-nchw": (["method=prototype", "train.channels_last=false"], "training_loss"),  # one switch off
    # not the default: bf16 autocast changes the numbers (hashed); on a CPU with AMX it pays
    "prototype-bf16": (["method=prototype", "train.channels_last=true", "mixed_precision=bf16"], "training_loss"),
    "sdfsmis_tiny-plain": (["method=sdfsmis", "backbone=tiny", "pretrained=false"], "training_loss"),
    "sdfsmis_tiny-now": (
        ["method=sdfsmis", "backbone=tiny", "pretrained=false", "method.vae_dtype=bfloat16", "train.channels_last=true"],
        "training_loss",
    ),
    "sdfsmis_tiny-joint": (
        ["method=sdfsmis", "backbone=tiny", "pretrained=false", "method.vae_dtype=bfloat16", "train.channels_last=true",
         "method.joint_pass=true"],
        "training_loss",
    ),
    # not the default: one encoder call for the episode's four images, a GPU candidate
    "sdfsmis_tiny-joint-batched": (
        ["method=sdfsmis", "backbone=tiny", "pretrained=false", "method.vae_dtype=bfloat16", "train.channels_last=true",
         "method.joint_pass=true", "method.batched_encode=true"],
        "training_loss",
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _engine_step(name: str):
    overrides, loss_name = VARIANTS[name]
    cfg = compose([*overrides, "device=cpu"])
    torch.manual_seed(0)
    method = build_method(cfg)
    if loss_name != "training_loss":
        method.forward = getattr(method, loss_name)  # the engine calls method(batch)
    options = ComputeOptions.from_config(cfg.train)
    prepare_method(method, options)
    groups = [{k: v for k, v in g.items() if k != "name"} for g in method.param_groups()]
    optimizer = build_optimizer(groups, name=options.optimizer, fused=options.fused_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    AcceleratorState._reset_state(True)
    mixed = str(cfg.mixed_precision)
    accelerator = Accelerator(cpu=True, mixed_precision="no" if mixed == "auto" else mixed)
    method, optimizer = accelerator.prepare(method, optimizer)
    step = TrainStep(method, optimizer, scheduler, accelerator, grad_clip=float(cfg.train.grad_clip))
    next_batch = phantom_batches(cfg, method.input_norm)
    method.train()
    return lambda: float(step([next_batch()]))


def _record_steps_per_s(benchmark) -> None:
    if benchmark.stats is not None:  # None when benchmarks are disabled (pytest -n 2): one plain call
        benchmark.extra_info["steps_per_s"] = round(1 / benchmark.stats.stats.mean, 3)


@pytest.mark.benchmark(group="training-step-prototype")
@pytest.mark.parametrize("name", ["prototype-plain", "prototype-nchw", "prototype-now", "prototype-bf16"])
def test_prototype_step(benchmark, name):
    run = _engine_step(name)
    loss = benchmark.pedantic(run, rounds=8, warmup_rounds=2)
    _record_steps_per_s(benchmark)
    assert loss == loss


@pytest.mark.benchmark(group="training-step-sdfsmis-tiny")
@pytest.mark.parametrize("name", ["sdfsmis_tiny-plain", "sdfsmis_tiny-now", "sdfsmis_tiny-joint",
                                  "sdfsmis_tiny-joint-batched"])
def test_sdfsmis_tiny_step(benchmark, name):
    run = _engine_step(name)
    loss = benchmark.pedantic(run, rounds=4, warmup_rounds=1)
    _record_steps_per_s(benchmark)
    assert loss == loss
