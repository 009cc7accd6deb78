"""Time a training step of the code as it was before issue 11 (commit ``ee93447^``), or
today's step of a ``make bench`` variant, one process per call, so that
``benchmarks/pre_issue_step.sh`` can alternate the two and compare medians: the CPU's
speed drifts by 10-20 % over minutes here, more than one ``make bench`` run can average out.

    bash benchmarks/pre_issue_step.sh          # checks the old commit out, alternates, summarises

Without ``--variant`` it times the old engine's step body (``fsmis_bench/training/engine.py``
at that commit: forward, ``isfinite`` check, backward, clipping, AdamW, ``float(loss)``)
with the old defaults, using only names that exist at both commits, so it runs against
whichever ``fsmis_bench`` is first on ``sys.path``. With ``--variant`` (a key of
``benchmarks/test_bench_training.py``'s ``VARIANTS``) it times today's engine step exactly
as ``make bench`` builds it. Either way: four pre-drawn phantom batches, one intra-op
thread, one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

import fsmis_bench
from fsmis_bench.config import compose
from fsmis_bench.protocol.settings import EvalGroup
from fsmis_bench.runner import build_method
from fsmis_bench.training.episodes import EpisodeSampler
from fsmis_datasets.phantom import Phantom

#: make bench's workloads: the prototype demo step, and tiny SD-FSMIS (random TAESD, 256 px)
WORKLOADS = {
    "prototype": ["method=prototype"],
    "sdfsmis_tiny": ["method=sdfsmis", "backbone=tiny", "pretrained=false"],
}


def phantom_batches(cfg, input_norm: str) -> Callable[[], Any]:
    """Four phantom batches of ``cfg.train`` (size, episodes), drawn once, handed out in turn:
    the input of every ``make bench`` training step."""
    size = int(cfg.train.image_size)
    dataset = Phantom(size=size)
    sampler = EpisodeSampler(
        dataset, dataset.train_cases(0), EvalGroup("all", tuple(dataset.test_organs)),
        norm=input_norm, image_size=size, seed=0,
    )
    turns = itertools.cycle([sampler.batch(int(cfg.train.batch_size)) for _ in range(4)])
    return lambda: next(turns)


def old_step(workload: str):
    """The pre-issue engine's step on ``workload`` with the old defaults (NCHW, fp32)."""
    cfg = compose([*WORKLOADS[workload], "device=cpu"])
    torch.manual_seed(0)
    method = build_method(cfg)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in method.param_groups()],
        weight_decay=float(cfg.train.weight_decay),
    )
    accelerator = Accelerator(cpu=True)
    method, optimizer = accelerator.prepare(method, optimizer)
    next_batch = phantom_batches(cfg, method.input_norm)
    method.train()

    def step() -> float:
        batch = next_batch()
        with accelerator.accumulate(method), accelerator.autocast():
            loss = method(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()}")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(method.parameters(), float(cfg.train.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(WORKLOADS), default="prototype")
    parser.add_argument("--variant", help="a make bench variant of today's code (default: the old step)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.variant:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from test_bench_training import _engine_step  # today's code only

        step = _engine_step(args.variant)
    else:
        step = old_step(args.method)
    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.rounds):
        began = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - began)
    print(json.dumps({
        "code": str(Path(fsmis_bench.__file__).parent),
        "method": args.method,
        "variant": args.variant or "pre_issue",
        "rounds": args.rounds,
        "mean_ms": round(1000 * statistics.mean(seconds), 1),
        "min_ms": round(1000 * min(seconds), 1),
    }))


if __name__ == "__main__":
    main()
