"""SD-FSMIS training through the whole engine path on one accelerator: episodes sampled and
augmented in DataLoader workers -> pinned copies -> ``TrainStep`` (forward, backward,
clipping, optimiser) -> the schedule, exactly as ``fsmis-bench run`` trains. One invocation
measures every compute switch; prints one JSON line on stdout (progress on stderr) with the
fields of ``gpu_sd15_check.py`` plus ``"engine_path": true``.

GPU (one H100: about 4 minutes; the figures of README "Measured figures")::

    python benchmarks/gpu_engine_check.py --out docs/measurements/gpu_engine_h100.json

CPU smoke check (the same code path, tiny backbone; run by the tests)::

    python benchmarks/gpu_engine_check.py --device cpu --tiny --size 64 --steps 2 --warmup 1 --slices 2

Variants (``train.<name>``), all on the same random-weight model, in this order:

* ``fp32``: fp32, TF32 off, foreach AdamW (the plain path);
* ``tf32``: + TF32 matmuls/convolutions; ``tf32_fused``: + fused AdamW;
* ``tf32_fused_batch4``: 4 episodes per step (``train.batch_size=4``; ``episodes_per_s``);
* ``lowmem``: ``memory=low`` (gradient checkpointing + 8-bit AdamW): the peak memory;
* ``bf16_autocast``: bf16 autocast over fp32 weights, fused AdamW;
* ``bf16_master``: bf16 weights + fp32 master copies (``train.weight_dtype=bfloat16``) and a
  bf16 VAE (``method.vae_dtype=bfloat16``), bf16 autocast, fused AdamW;
* ``tf32_fused_compiled``: + ``train.compile`` (``--compile-mode``, default ``default``), on a
  fresh model; its first-step time (compilation) is reported apart.

Each variant reports ``median_s`` / ``min_s`` of per-step times (the device synchronised
around each step), ``throughput_s`` (wall time of the timed steps / steps, one sync at the
end: what a run sees, as the step never syncs), ``peak_mem_gib`` and ``loss_finite``. Then
inference per query slice (``Method.predict``, support cached) and the tiny backbone's
steps/s through the same path (eager, and compiled ``--tiny-compile-mode`` if time is
left). Variants that would overrun ``--budget-s`` are skipped and say so; a variant that
fails records its error and the others still run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as fsmis_bench does; before torch loads OpenMP
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sd15_check import _peak_gib, _reset_memory, _summary, _sync, measure_inference  # noqa: E402

STARTED = time.perf_counter()


def _log(message: str) -> None:
    print(f"[gpu_engine_check {time.perf_counter() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def _set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def _accelerator(device: torch.device, mixed_precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # one precision per process in accelerate
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


@functools.lru_cache(maxsize=2)
def _sampler(size: int, seed: int = 0):
    """Training episodes from the procedural phantom (no files), at the model's size (built
    once per size; the loader positions it for every micro-batch)."""
    from fsmis_bench.protocol.settings import EvalGroup
    from fsmis_bench.training.episodes import EpisodeSampler
    from fsmis_datasets.phantom import Phantom

    dataset = Phantom(size=size, n_cases=4, n_slices=16)
    group = EvalGroup("all", tuple(dataset.test_organs))
    return EpisodeSampler(dataset, dataset.case_ids(), group, norm="minmax", min_fg_pixels=20, image_size=size, seed=seed)


def engine_steps(method, cfg, device: torch.device, *, warmup: int, steps: int, workers: int,
                 mixed_precision: str = "no") -> dict[str, Any]:
    """Time ``steps`` optimiser steps of the engine path (after ``warmup`` untimed ones)."""
    from fsmis_bench.training.engine import prepare_training
    from fsmis_bench.training.loader import EpisodeLoader
    from fsmis_bench.training.step import TrainStep

    accelerator = _accelerator(device, mixed_precision)
    _reset_memory(device)
    setup = prepare_training(method, cfg, accelerator)
    step = TrainStep(setup.method, setup.optimizer, setup.scheduler, accelerator, grad_clip=float(cfg.train.grad_clip))
    total = warmup + 2 * steps
    loader = EpisodeLoader(_sampler(int(cfg.train.image_size)), setup.batch_size, start=0,
                           stop=total * setup.accum, device=accelerator.device, num_workers=workers)
    batches = iter(loader)
    setup.method.train()
    losses, first_step_s = [], None
    for i in range(warmup):
        began = time.perf_counter()
        losses.append(step([next(batches) for _ in range(setup.accum)]))
        if i == 0:
            _sync(device)
            first_step_s = time.perf_counter() - began
    times = []
    for _ in range(steps):  # each step synchronised: per-step times
        _sync(device)
        began = time.perf_counter()
        losses.append(step([next(batches) for _ in range(setup.accum)]))
        _sync(device)
        times.append(time.perf_counter() - began)
    _sync(device)
    began = time.perf_counter()
    for _ in range(steps):  # as the engine runs: no sync until the end
        losses.append(step([next(batches) for _ in range(setup.accum)]))
    _sync(device)
    throughput = (time.perf_counter() - began) / steps
    result = {**_summary(times), "throughput_s": round(throughput, 4),
              "episodes_per_s": round(setup.batch_size * setup.accum / throughput, 2),
              "peak_mem_gib": _peak_gib(device), "loss_finite": all(math.isfinite(float(v)) for v in losses)}
    if first_step_s is not None:
        result["first_step_s"] = round(first_step_s, 2)
    del setup, step, loader, batches
    accelerator.free_memory()  # the accelerator holds the optimiser (and its states) otherwise
    _reset_memory(device)
    return result


def _config(overrides: list[str]):
    from fsmis_bench.config import compose

    return compose(overrides)


def _build(overrides: list[str], device: torch.device):
    from fsmis_bench.runner import build_method

    cfg = _config(overrides)
    torch.manual_seed(0)
    if device.type == "cuda":
        try:
            with torch.device(device):  # random init of ~1 B parameters is faster on the GPU
                return build_method(cfg).to(device)
        except Exception as exc:  # a method that builds CPU-only state
            _log(f"building on {device} failed ({type(exc).__name__}); building on the CPU")
            _reset_memory(device)
    return build_method(cfg).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="backbone=tiny for every variant (CPU smoke check)")
    parser.add_argument("--method", default="sdfsmis")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (twice: synced and not)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--slices", type=int, default=12, help="query slices in the timed inference chunk")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 4 on cuda, 0 on cpu)")
    parser.add_argument("--compile-mode", default="default", help="train.compile for the SD compiled variant ('none': skip)")
    parser.add_argument("--tiny-compile-mode", default="reduce-overhead", help="train.compile for the tiny backbone ('none': skip)")
    parser.add_argument("--tiny-steps", type=int, default=50, help="timed steps of the tiny backbone")
    parser.add_argument("--budget-s", type=float, default=230.0, help="skip variants that would end after this")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--extra", nargs="*", default=[], help="extra config overrides for every variant")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these variants (e.g. tf32_fused tf32_fused_compiled tiny_eager tiny_reduce-overhead)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; use --device cpu --tiny for the smoke check")
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    backbone = "tiny" if args.tiny else "sd15"
    base = [f"method={args.method}", f"backbone={backbone}", "pretrained=false", f"device={device.type}",
            f"train.image_size={args.size}", "train.num_workers=0", "train.schedule=constant", *args.extra]

    _log(f"building {' '.join(base)}")
    began = time.perf_counter()
    method = _build(base, device)
    _sync(device)
    build_s = time.perf_counter() - began
    n_params = sum(p.numel() for p in method.parameters())
    n_train = sum(p.numel() for p in method.parameters() if p.requires_grad)
    result: dict[str, Any] = {
        "check": "gpu_engine_check", "engine_path": True, "method": args.method, "backbone": backbone,
        "pretrained": False, "overrides": base, "image_size": args.size, "batch_size": 1,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads, {platform.machine()})",
        "params": n_params, "trainable_params": n_train, "random_weights": bool(method.uses_random_weights()),
        "build_s": round(build_s, 2), "dataloader_workers": workers,
        "weights_mem_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3) if cuda else None,
        "train": {}, "predict": {}, "tiny": {}, "skipped": {},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
    }
    per_step_guess = [None]  # seconds per step of the last variant, for the budget

    def run(name: str, overrides: list[str], mixed: str = "no", tf32: bool = False, model=None,
            extra_s: float = 0.0, steps: int | None = None, config: list[str] | None = None) -> dict[str, Any] | None:
        steps = steps or args.steps
        if args.only is not None and name not in args.only:
            result["skipped"][name] = "not selected (--only)"
            return None
        if per_step_guess[0] is not None:
            needed = (args.warmup + 2 * steps) * per_step_guess[0] * 1.5 + extra_s
            if time.perf_counter() - STARTED + needed > args.budget_s:
                result["skipped"][name] = f"time budget ({needed:.0f}s more needed)"
                _log(f"{name}: skipped (budget)")
                return None
        _log(f"{name}: {' '.join(overrides)} mixed_precision={mixed} tf32={tf32}")
        _set_tf32(tf32 and cuda)
        try:
            cfg = _config([*(config or base), *overrides])
            out = engine_steps(model if model is not None else method, cfg, device, warmup=args.warmup,
                               steps=steps, workers=workers, mixed_precision=mixed)
        except Exception as exc:  # record and go on: one variant must not cost the others
            result["skipped"][name] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            _log(f"{name}: failed: {exc!r}")
            _reset_memory(device)
            return None
        out["tf32"] = bool(tf32 and cuda)
        out["mixed_precision"] = mixed
        per_step_guess[0] = out["median_s"]
        _log(f"  {out}")
        return out

    def flush() -> None:  # partial results survive a run stopped at its time limit
        if args.out:
            Path(args.out).write_text(json.dumps({**result, "partial": True}) + "\n")

    variants = [
        ("fp32", ["train.fused_optimizer=false"], "no", False),
        ("tf32", ["train.fused_optimizer=false"], "no", True),
        ("tf32_fused", ["train.fused_optimizer=true"], "no", True),
        ("tf32_fused_batch4", ["train.fused_optimizer=true", "train.batch_size=4"], "no", True),
        ("lowmem", ["memory=low", "train.fused_optimizer=false"], "no", True),
    ]
    for name, overrides, mixed, tf32 in variants:
        if name == "lowmem":
            method.unet.enable_gradient_checkpointing()
        out = run(name, overrides, mixed, tf32)
        if name == "lowmem":
            method.unet.disable_gradient_checkpointing()
        if out is not None:
            result["train"][name] = out
        flush()
    # bf16 variants last on this model: accelerate wraps its forward in autocast
    out = run("bf16_autocast", ["train.fused_optimizer=true"], "bf16", True)
    if out is not None:
        result["train"]["bf16_autocast"] = out
    method.vae.to(torch.bfloat16)
    method.vae_dtype = torch.bfloat16
    out = run("bf16_master", ["train.fused_optimizer=true", "train.weight_dtype=bfloat16", "method.vae_dtype=bfloat16"], "bf16", True)
    if out is not None:
        result["train"]["bf16_master"] = out
    flush()
    del method
    _reset_memory(device)

    # a fresh model: inference, then the compiled step
    method = _build(base, device)
    _set_tf32(cuda)
    for label in ("tf32" if cuda else "fp32",):
        _log(f"inference, {label}")
        result["predict"][label] = measure_inference(method, device, "fp32", args.size, args.slices,
                                                     warmup=1, repeats=max(1, min(args.steps, 3)))
        _log(f"  {result['predict'][label]}")

    # tiny backbone through the same path (eager), before the long compilations
    tiny_base = [s.replace(f"backbone={backbone}", "backbone=tiny") for s in base]
    tiny = _build(tiny_base, device)
    out = run("tiny_eager", ["train.fused_optimizer=true"], "no", True, model=tiny, steps=args.tiny_steps, config=tiny_base)
    if out is not None:
        out["steps_per_s"] = round(1 / out["throughput_s"], 1)
        result["tiny"]["tiny_eager"] = out
    flush()

    if args.compile_mode != "none":
        if not cuda:
            result["skipped"]["tf32_fused_compiled"] = "compile is measured on CUDA only"
        else:
            out = run("tf32_fused_compiled", ["train.fused_optimizer=true", f"train.compile={args.compile_mode}"],
                      "no", True, extra_s=90.0)
            if out is not None:
                out["compile_mode"] = args.compile_mode
                result["train"]["tf32_fused_compiled"] = out
    del method
    _reset_memory(device)

    if args.tiny_compile_mode != "none":
        name = f"tiny_{args.tiny_compile_mode}"
        if not cuda:
            result["skipped"][name] = "compile is measured on CUDA only"
        else:
            per_step_guess[0] = result["tiny"].get("tiny_eager", {}).get("median_s")
            out = run(name, ["train.fused_optimizer=true", f"train.compile={args.tiny_compile_mode}"], "no", True,
                      model=tiny, steps=args.tiny_steps, extra_s=45.0, config=tiny_base)
            if out is not None:
                out["steps_per_s"] = round(1 / out["throughput_s"], 1)
                result["tiny"][name] = out

    result["total_s"] = round(time.perf_counter() - STARTED, 1)
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text, flush=True)
    _print_table(result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    """A short summary on stderr (the JSON line above is the record)."""
    rows = [("variant", "median_s", "throughput_s", "episodes/s", "peak GiB")]
    for name, r in {**result["train"], **result["tiny"]}.items():
        rows.append((name, r["median_s"], r["throughput_s"], r["episodes_per_s"], r["peak_mem_gib"]))
    for row in rows:
        print("  ".join(f"{str(c):>22}" if i == 0 else f"{str(c):>12}" for i, c in enumerate(row)), file=sys.stderr)
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    for name, r in result["predict"].items():
        print(f"predict {name}: {r['per_slice_median_s'] * 1000:.1f} ms per query slice", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
