"""The optimiser phase of a step on the CPU: gradient clipping then fused AdamW, against the
clipping folded into fused AdamW (``train.fused_clip=true``: the optimiser divides the
gradients by :func:`~fsmis_bench.training.step.clip_divisor` as it reads them, instead of a
separate pass that multiplies all of them).

Both phases are memory-bound, so 50 M float32 parameters (200 MB of weights, as much again
for the gradients and twice that for AdamW's moments) stand in for the step's traffic; the
SD-1.5 U-Net has 859 M. Two threads, the machine's cores.

    .venv/bin/python -m pytest benchmarks/test_bench_optimizer.py --benchmark-only -p no:xdist
"""

from __future__ import annotations

import pytest
import torch

from fsmis_bench.training.optim import build_optimizer
from fsmis_bench.training.step import clip_divisor

PARAMETERS = 50_000_000
TENSORS = 100
GRAD_CLIP = 1.0


@pytest.fixture(scope="module")
def parameters() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(PARAMETERS // TENSORS, generator=generator)) for _ in range(TENSORS)]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    return params


@pytest.mark.parametrize("fused_clip", [False, True], ids=["clip-then-adamw", "clip-inside-adamw"])
def test_optimizer_phase(benchmark, parameters, fused_clip):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    optimizer = build_optimizer([{"params": parameters, "lr": 1e-5}], fused=True)

    def phase() -> None:
        # the clipped gradients stay at norm <= 1 after the first round, so every round of the
        # plain phase still runs its multiply (by 1), as a training step does
        if fused_clip:
            optimizer.grad_scale = clip_divisor(parameters, GRAD_CLIP)
            optimizer.step()
            del optimizer.grad_scale
        else:
            torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP)
            optimizer.step()

    phase()  # AdamW's moments allocated outside the timing
    try:
        benchmark.pedantic(phase, rounds=10, iterations=1)
    finally:
        torch.set_num_threads(threads)
    # no divisor left behind for a later step, and finite weights after the timed rounds
    assert not hasattr(optimizer, "grad_scale")
    assert all(bool(torch.isfinite(p).all()) for p in parameters[:3])
