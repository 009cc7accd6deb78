"""Which precision should SD-FSMIS train in? Loss after N steps and step time for fp32,
fp32 + TF32 and bf16 autocast, on the SD-1.5 architecture with random weights.

Prints one JSON line on stdout (progress goes to stderr). GPU (decides the default
precision the README quotes; one H100, about 2 minutes)::

    python benchmarks/gpu_precision_check.py               # sdfsmis, backbone=sd15, 256 px, 30 steps

CPU smoke check (the same code path on the tiny backbone; used by the tests)::

    python benchmarks/gpu_precision_check.py --device cpu --tiny --size 64 --steps 2 --warmup 0 --eval-episodes 1

Each precision is the configuration the engine resolves (``fsmis_bench.training.precision``):
``fp32`` = ``mixed_precision=no tf32=false``; ``fp32+tf32`` = ``mixed_precision=no`` (the
default); ``bf16+tf32`` = ``mixed_precision=bf16`` (autocast, fp32 master weights). For each,
the method is rebuilt from the same seed (identical initial weights) and trained for
``--steps`` optimiser steps (AdamW over ``Method.param_groups`` at their learning rates,
weight decay 1e-2, gradient clipping 1.0, as the engine) on the same fixed sequence of
synthetic episodes. Reported: step time after ``--warmup`` untimed steps, the training
losses, and ``eval_loss``: the trained model's loss in float32 on ``--eval-episodes``
held-out episodes, the comparison of what each precision learned. The default method
config is the paper's (``ddim_t999`` on the epsilon-prediction SD-1.5 U-Net: the objective
most sensitive to precision); ``--extra objective=...`` style overrides change it.
On a CPU, TF32 does not exist and ``fp32+tf32`` resolves to ``fp32`` (skipped as a duplicate).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch

#: label -> (mixed_precision, tf32) config values
PRECISIONS = {"fp32": ("no", False), "fp32+tf32": ("no", "auto"), "bf16+tf32": ("bf16", "auto")}


def _log(message: str) -> None:
    print(f"[gpu_precision_check] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_episodes(n: int, size: int, seed: int):
    """``n`` one-shot episodes of smooth grey images in [-1, 1] with elliptic masks."""
    from fsmis_bench.method import EpisodeBatch

    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")

    def slice_pair() -> tuple[torch.Tensor, torch.Tensor]:
        cx, cy, r = (torch.rand(3, generator=gen) * torch.tensor([0.6, 0.6, 0.2]) + torch.tensor([-0.3, -0.3, 0.25])).tolist()
        inside = (((x - cx) / r) ** 2 + ((y - cy) / (0.8 * r)) ** 2 <= 1.0).float()
        body = torch.exp(-(x**2 + y**2) / 0.5)
        image = (0.8 * body + 0.4 * inside + 0.05 * torch.randn(size, size, generator=gen)).clamp(0, 1) * 2 - 1
        return image[None], inside[None]

    episodes = []
    for _ in range(n):
        (si, sm), (qi, qm) = slice_pair(), slice_pair()
        episodes.append(EpisodeBatch(si[None, None], sm[None, None], qi[None], qm[None]))
    return episodes


def run_precision(label: str, overrides: list[str], device: torch.device, args: argparse.Namespace,
                  train_episodes: list, eval_episodes: list) -> dict[str, Any]:
    """Build from seed 0, train ``args.steps`` steps in ``label``'s precision, evaluate in fp32."""
    from fsmis_bench.api import build_method
    from fsmis_bench.training.precision import apply_tf32, resolve_precision

    mixed, tf32 = PRECISIONS[label]
    precision = resolve_precision(device.type, mixed, tf32)
    apply_tf32(precision.tf32)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision.mixed_precision)

    torch.manual_seed(0)
    start = time.perf_counter()
    method = None
    if device.type == "cuda":
        try:  # random init of ~1 B parameters is several times faster on the GPU
            with torch.device(device):
                method = build_method(overrides)
        except Exception as exc:  # a method that builds CPU-only state: fall back
            _log(f"building on {device} failed ({type(exc).__name__}: {exc}); building on the CPU")
            torch.cuda.empty_cache()
    if method is None:
        method = build_method(overrides)
    method.to(device)
    _sync(device)
    build_s = time.perf_counter() - start
    groups = [{"params": [p for p in g["params"] if p.requires_grad], "lr": float(g["lr"])} for g in method.param_groups()]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
    params = [p for g in groups for p in g["params"]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    method.train()
    torch.manual_seed(1)  # the same sampled latents / dropout stream for every precision
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        batch = train_episodes[step % len(train_episodes)].to(device)
        _sync(device)
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext():
            loss = method.training_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - began)
            losses.append(float(loss.detach()))
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None

    # what was learned, measured the same way for every precision: fp32, no TF32
    apply_tf32(False)
    method.eval()
    with torch.no_grad():
        eval_loss = statistics.fmean(float(method.training_loss(e.to(device))) for e in eval_episodes)
    del method, optimizer, params, groups
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    last = losses[-min(5, len(losses)):]
    return {
        "mixed_precision": precision.mixed_precision,
        "tf32": precision.tf32,
        "build_s": round(build_s, 2),
        "step_median_s": round(statistics.median(times), 4),
        "step_min_s": round(min(times), 4),
        "steps": len(times),
        "first_loss": round(losses[0], 6),
        "last_losses_mean": round(statistics.fmean(last), 6),
        "eval_loss": round(eval_loss, 6),
        "peak_mem_gib": peak,
        "finite": all(v == v and abs(v) != float("inf") for v in losses + [eval_loss]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="backbone=tiny instead of sd15 (CPU smoke check)")
    parser.add_argument("--method", default="sdfsmis", help="method plugin name (default sdfsmis)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per precision (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed (but trained) warm-up steps (default 3)")
    parser.add_argument("--episodes", type=int, default=8, help="distinct training episodes, cycled (default 8)")
    parser.add_argument("--eval-episodes", type=int, default=4, help="held-out episodes for eval_loss (default 4)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma list of {', '.join(PRECISIONS)}")
    parser.add_argument("--extra", nargs="*", default=[], help="extra config overrides, e.g. method.objective=direct_t999")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; use --device cpu --tiny for the smoke check")
    unknown = [p for p in args.precisions.split(",") if p not in PRECISIONS]
    if unknown:
        raise SystemExit(f"unknown precisions {unknown}; use {', '.join(PRECISIONS)}")
    backbone = "tiny" if args.tiny else "sd15"
    overrides = [f"method={args.method}", f"backbone={backbone}", "pretrained=false", f"device={device.type}", *args.extra]
    train_episodes = synthetic_episodes(args.episodes, args.size, seed=3)
    eval_episodes = synthetic_episodes(args.eval_episodes, args.size, seed=4)

    from fsmis_bench.training.precision import resolve_precision

    result: dict[str, Any] = {
        "check": "gpu_precision_check",
        "overrides": overrides,
        "image_size": args.size,
        "batch_size": 1,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})",
        "results": {},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    seen = set()
    for label in args.precisions.split(","):
        resolved = resolve_precision(device.type, *PRECISIONS[label])
        if resolved in seen:
            _log(f"{label}: resolves to {resolved.label} on {device.type}, already measured")
            continue
        seen.add(resolved)
        _log(f"{label}: building and training {args.warmup}+{args.steps} steps")
        result["results"][label] = run_precision(label, overrides, device, args, train_episodes, eval_episodes)
        _log(f"  {result['results'][label]}")
    measured = result["results"]
    fastest = min(measured, key=lambda k: measured[k]["step_median_s"])
    best_loss = min(v["eval_loss"] for v in measured.values())
    result["fastest"] = fastest
    result["eval_loss_vs_best"] = {k: round(v["eval_loss"] / best_loss, 4) if best_loss > 0 else None for k, v in measured.items()}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
