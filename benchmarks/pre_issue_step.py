"""Time the ``prototype`` demo step of the code as it was before issue 11 (commit
``ee93447^``), to check that ``make bench``'s ``prototype-plain`` variant, a
reconstruction of that path inside today's engine, costs what the old code cost.

    bash benchmarks/pre_issue_step.sh          # checks the old commit out, then runs this file

The step body is the old engine's (``fsmis_bench/training/engine.py`` at that commit):
forward, ``isfinite`` check, backward, clipping, AdamW, ``float(loss)``, on four pre-drawn
phantom batches (128 px, 4 episodes), one intra-op thread, as in ``make bench``. It only
uses names that exist at both commits, so it runs against whichever ``fsmis_bench`` is
first on ``sys.path``; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from accelerate import Accelerator

import fsmis_bench
from fsmis_bench.config import compose
from fsmis_bench.protocol.settings import EvalGroup
from fsmis_bench.runner import build_method
from fsmis_bench.training.episodes import EpisodeSampler
from fsmis_datasets.phantom import Phantom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = compose(["method=prototype", "device=cpu"])
    torch.manual_seed(0)
    method = build_method(cfg)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "name"} for g in method.param_groups()],
        weight_decay=float(cfg.train.weight_decay),
    )
    accelerator = Accelerator(cpu=True)
    method, optimizer = accelerator.prepare(method, optimizer)
    size = int(cfg.train.image_size)
    dataset = Phantom(size=size)
    sampler = EpisodeSampler(
        dataset, dataset.train_cases(0), EvalGroup("all", tuple(dataset.test_organs)),
        norm=method.input_norm, image_size=size, seed=0,
    )
    batches = [sampler.batch(int(cfg.train.batch_size)) for _ in range(4)]
    method.train()

    def step(batch) -> float:
        with accelerator.accumulate(method), accelerator.autocast():
            loss = method(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()}")
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(method.parameters(), float(cfg.train.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    seconds = []
    for i in range(args.rounds):
        began = time.perf_counter()
        step(batches[i % len(batches)])
        seconds.append(time.perf_counter() - began)
    print(json.dumps({
        "code": fsmis_bench.__file__,
        "method": "prototype",
        "rounds": args.rounds,
        "mean_ms": round(1000 * statistics.mean(seconds), 1),
        "min_ms": round(1000 * min(seconds), 1),
    }))


if __name__ == "__main__":
    main()
