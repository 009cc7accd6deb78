"""SD-FSMIS cost on one accelerator: training-step time and peak memory, fp32 vs bf16, and
per-slice inference time. Prints one JSON line on stdout (progress goes to stderr).

GPU (the figures the README quotes)::

    python benchmarks/gpu_sd15_check.py                    # backbone=sd15 pretrained=false, 256 px, batch 1

CPU smoke check (the same code path on the tiny backbone; used by the tests)::

    python benchmarks/gpu_sd15_check.py --device cpu --tiny --size 64 --steps 1 --warmup 0 --slices 2

A training step is what the engine does per optimiser step at batch 1: ``training_loss``
forward, backward, gradient clipping and an AdamW step over ``Method.param_groups``
(weight decay 1e-2), so the peak memory includes the weights, gradients and the AdamW
moments. bf16 is ``torch.autocast(dtype=torch.bfloat16)`` around the loss (fp32 master
weights), as the engine's ``mixed_precision=bf16``. Inference calls ``Method.predict`` on
``--slices`` query slices of one chunk (the support encoded once) and reports the time per
slice. Random weights (``pretrained=false``) cost exactly what the real weights cost.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch


def _log(message: str) -> None:
    print(f"[gpu_sd15_check] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_slices(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth grey images in [-1, 1] with an elliptic organ-like mask: ``(n, 1, size, size)`` each."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, masks = [], []
    for _ in range(n):
        cx, cy, r = (torch.rand(3, generator=gen) * torch.tensor([0.6, 0.6, 0.2]) + torch.tensor([-0.3, -0.3, 0.25])).tolist()
        inside = ((x - cx) / r) ** 2 + ((y - cy) / (0.8 * r)) ** 2 <= 1.0
        body = torch.exp(-(x**2 + y**2) / 0.5)
        image = (0.8 * body + 0.4 * inside.float() + 0.05 * torch.randn(size, size, generator=gen)).clamp(0, 1) * 2 - 1
        images.append(image)
        masks.append(inside.float())
    return torch.stack(images)[:, None], torch.stack(masks)[:, None]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "n": len(times)}


def measure_training(method: Any, batch: Any, device: torch.device, precision: str, warmup: int, steps: int) -> dict[str, Any]:
    """Time full optimiser steps (loss, backward, clip, AdamW) and record the peak memory."""
    groups = [
        {"params": [p for p in g["params"] if p.requires_grad], "lr": float(g["lr"])}
        for g in method.param_groups()
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=1e-2)
    params = [p for g in groups for p in g["params"]]
    method.train()
    losses: list[float] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = method.training_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))

    _reset_memory(device)
    times = _timed(step, device, warmup, steps)
    peak = _peak_gib(device)
    optimizer.zero_grad(set_to_none=True)
    _reset_memory(device)
    return {**_summary(times), "peak_mem_gib": peak, "loss_finite": all(math.isfinite(v) for v in losses)}


def measure_inference(method: Any, device: torch.device, precision: str, size: int, slices: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Per-slice time of ``Method.predict`` on one chunk of ``slices`` query slices."""
    support_images, support_masks = _synthetic_slices(1, size, seed=1)
    query_images, _ = _synthetic_slices(slices, size, seed=2)
    support_images, support_masks, query_images = (t.to(device) for t in (support_images, support_masks, query_images))
    method.eval()
    shapes: list[tuple[int, ...]] = []

    def run() -> None:
        with torch.no_grad(), _autocast(device, precision):
            masks = method.predict(support_images, support_masks, query_images)
        shapes.append(tuple(masks.shape))

    _reset_memory(device)
    times = _timed(run, device, warmup, repeats)
    if shapes[-1] != (slices, size, size):
        raise RuntimeError(f"predict returned {shapes[-1]}, expected {(slices, size, size)}")
    per_slice = [t / slices for t in times]
    return {"per_slice_" + k if k != "n" else k: v for k, v in _summary(per_slice).items()} | {
        "chunk_slices": slices,
        "peak_mem_gib": _peak_gib(device),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="backbone=tiny instead of sd15 (CPU smoke check)")
    parser.add_argument("--method", default="sdfsmis", help="method plugin name (default sdfsmis)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per precision")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per precision")
    parser.add_argument("--slices", type=int, default=8, help="query slices in the timed inference chunk")
    parser.add_argument("--precisions", default=None, help="comma list of fp32,bf16 (default both on cuda, fp32 on cpu)")
    parser.add_argument("--extra", nargs="*", default=[], help="extra config overrides, e.g. fidelity=code")
    args = parser.parse_args(argv)

    from fsmis_bench.api import build_method
    from fsmis_bench.method import EpisodeBatch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; use --device cpu --tiny for the smoke check")
    precisions = (args.precisions or ("fp32,bf16" if device.type == "cuda" else "fp32")).split(",")
    backbone = "tiny" if args.tiny else "sd15"
    overrides = [f"method={args.method}", f"backbone={backbone}", "pretrained=false", f"device={device.type}", *args.extra]

    torch.manual_seed(0)
    _log(f"building {' '.join(overrides)}")
    start = time.perf_counter()
    method = None
    if device.type == "cuda":
        # random init of ~1 B parameters is several times faster on the GPU than on the CPU
        try:
            with torch.device(device):
                method = build_method(overrides)
        except Exception as exc:  # a method that builds CPU-only state: fall back
            _log(f"building on {device} failed ({type(exc).__name__}: {exc}); building on the CPU")
            method = None
            _reset_memory(device)
    if method is None:
        method = build_method(overrides)
    method.to(device)
    _sync(device)
    build_s = time.perf_counter() - start
    n_params = sum(p.numel() for p in method.parameters())
    n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
    _log(f"built in {build_s:.1f}s: {n_params:,} parameters, {n_train:,} trainable")

    support_images, support_masks = _synthetic_slices(1, args.size, seed=3)
    query_images, query_masks = _synthetic_slices(1, args.size, seed=4)
    batch = EpisodeBatch(
        support_images=support_images[None], support_masks=support_masks[None],
        query_images=query_images, query_masks=query_masks,
    ).to(device)

    result: dict[str, Any] = {
        "check": "gpu_sd15_check",
        "method": args.method,
        "backbone": backbone,
        "pretrained": False,
        "overrides": overrides,
        "image_size": args.size,
        "batch_size": 1,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})",
        "params": n_params,
        "trainable_params": n_train,
        "random_weights": bool(method.uses_random_weights()),
        "build_s": round(build_s, 2),
        # PyTorch defaults, as in a normal run: fp32 convolutions may use TF32 on Ampere+
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "weights_mem_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "train": {},
        "predict": {},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    for precision in precisions:
        _log(f"training steps, {precision}")
        result["train"][precision] = measure_training(method, batch, device, precision, args.warmup, args.steps)
        _log(f"  {result['train'][precision]}")
    for precision in precisions:
        _log(f"inference, {precision}")
        result["predict"][precision] = measure_inference(
            method, device, precision, args.size, args.slices, warmup=min(args.warmup, 1), repeats=max(1, min(args.steps, 3))
        )
        _log(f"  {result['predict'][precision]}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
