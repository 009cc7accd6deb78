"""SD-FSMIS training through the whole engine path on one accelerator: episodes sampled and
augmented in DataLoader workers -> pinned copies -> ``TrainStep`` (forward, backward,
clipping, optimiser) -> the schedule, exactly as ``fsmis-bench run`` trains. One invocation
measures every compute switch; prints one JSON line on stdout (progress on stderr) with the
fields of ``gpu_sd15_check.py`` plus ``"engine_path": true``.

GPU (one H100: about 4 minutes; the figures of README "Measured figures")::

    python benchmarks/gpu_engine_check.py --out docs/measurements/gpu_engine_h100.json

On a GPU machine without internet access whose image lacks some of the project's
dependencies (the H100 images used for docs/measurements had torch, accelerate and
transformers, not diffusers, hydra-core, omegaconf or nibabel), carry them as
wheels with the project's own, built where pip works, in a folder git ignores::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 -d .whl2 diffusers hydra-core omegaconf \
        antlr4-python3-runtime==4.9.3 nibabel monai importlib-metadata lazy-importer
    python3 -m pip wheel --no-deps -w .whl2 .          # the project itself, rebuilt after every change
    # there, from the repository root:
    python3 -m pip install --no-deps --no-index .whl2/*.whl
    OUT=/some/dir bash benchmarks/gpu_speed_check.sh

CPU smoke check (the same code path, tiny backbone; run by the tests)::

    python benchmarks/gpu_engine_check.py --device cpu --tiny --size 64 --steps 2 --warmup 1 --slices 2

Variants (``train.<name>``), all from the same random weights and the same episodes (the
weights are restored before each), in this order:

* ``fp32``: fp32, TF32 off, foreach AdamW (the plain path);
* ``tf32``: + TF32 matmuls/convolutions; ``tf32_fused``: + fused AdamW;
* ``tf32_fused_repeat``: ``tf32_fused`` again: how far two eager runs' losses drift apart
  on this device (cuDNN/cuBLAS kernels are not bit-reproducible);
* ``<variant>_graph``: + ``train.cuda_graph=true`` (the whole step recorded once and
  replayed); ``loss_max_rel_diff_vs_eager`` and ``speedup_vs_eager`` compare it with the
  eager variant;
* ``*_nhwc``: + ``train.channels_last=true`` (NHWC weights and activations);
* ``*_blocks_graph``: + ``train.compile=default train.compile_scope=blocks`` (each repeated
  U-Net block compiled: fused GroupNorm/SiLU/elementwise kernels) inside the recorded step,
  compared with the eager variant of the same name without ``_blocks``; the compilation
  falls in the warm-up steps (``first_step_s``);
* ``*_norms``: + ``train.compile=default train.compile_scope=norms`` (every GroupNorm runs
  one compiled function with dynamic shapes: NHWC read and written in place, and far fewer
  graphs to compile than ``_blocks``), compared with the same variant without it
  (``speedup_vs_eager_norms``); ``compiled_group_norms`` counts the GroupNorms that ran compiled,
  ``graphs_compiled`` the graphs dynamo compiled for the variant (none where an earlier
  variant's graphs serve);
* ``*_joint``: + ``method.joint_pass=true`` (support and query through the U-Net as one
  batch), compared with the eager variant without ``_joint`` and, as
  ``speedup_vs_two_pass``, with the same variant's two-pass form;
* ``*_batched``: + ``method.batched_encode=true`` (an episode's four frozen-VAE encodes as
  one call), compared with the same variant without it (``speedup_vs_four_encodes``);
* ``*_bf16vae``: the frozen VAE in bf16 (``method.vae_dtype=bfloat16``, no autocast, so its
  GroupNorms run in bf16 too), compared with the fp32 VAE (``speedup_vs_fp32_vae``);
* ``*_fclip``: + ``train.fused_clip=true`` (the clipping applied inside fused AdamW, one pass
  over the gradients fewer), compared with the same variant without it
  (``speedup_vs_clip_pass``);
* ``*_cudnnbench``: + ``train.cudnn_benchmark=true`` (cuDNN times its convolution
  algorithms once per shape instead of choosing by heuristics), compared with the same
  variant without it (``speedup_vs_cudnn_heuristics``);
* ``tf32_fused_joint_batched_fclip_graph`` (and ``tiny_joint_batched_fclip_graph``): the
  default step with CUDA, every ``auto`` switch on; ``tf32_fused_nhwc_joint_batched_fclip_graph``
  and ``..._norms_graph``: the same in NHWC, without and with compiled GroupNorms, compared
  with the NCHW step (``speedup_vs_nchw``); ``bf16_autocast_nhwc_joint_batched_fclip_norms_graph``:
  the fastest step measured, opt-in (bf16, NHWC, compiled GroupNorms on top);
* ``tf32_fused_batch4``: 4 episodes per step (``train.batch_size=4``; ``episodes_per_s``);
* ``bf16_autocast``: bf16 autocast over fp32 weights, fused AdamW; ``bf16_autocast_repeat``:
  again, for bf16's own eager-vs-eager drift;
* ``lowmem``: ``memory=low`` (gradient checkpointing + 8-bit AdamW): the peak memory;
* ``bf16_master``: bf16 weights + fp32 master copies (``train.weight_dtype=bfloat16``) and a
  bf16 VAE (``method.vae_dtype=bfloat16``), bf16 autocast, fused AdamW;
* ``tf32_fused_compiled``: + ``train.compile`` (``--compile-mode``, default off), on a
  fresh model; its first-step time (compilation) is reported apart.

Each variant reports ``median_s`` / ``min_s`` of per-step times (the device synchronised
around each step), ``throughput_s`` (wall time of the timed steps / steps, one sync at the
end: what a run sees, as the step never syncs), ``peak_mem_gib``, ``loss_finite`` and every
step's loss; with ``--profile N`` the eager variants also report the device's kernel time
per step (``kernel_ms_per_step``: the floor for a replayed graph) and the top kernels. Then
inference per query slice (``Method.predict``, support cached) in several variants with a
breakdown of where the time goes (``*_graph``: ``method.predict_cuda_graph``, the support
side and the query chunk recorded and replayed), and the tiny backbone's steps/s through
the same path (eager, eager again, graphed, joint pass + graphed, compiled blocks +
graphed). Variants that would overrun ``--budget-s`` are skipped and say so; a variant
that fails records its error and the others still run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fsmis_bench  # noqa: E402,F401  (its OpenMP wait settings, before torch loads OpenMP)
import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sd15_check import _peak_gib, _reset_memory, _summary, _sync, measure_inference  # noqa: E402

from fsmis_bench.training.compiled_norms import CompiledGroupNorm, compile_group_norms  # noqa: E402
from fsmis_bench.training.precision import apply_cudnn_benchmark  # noqa: E402
from fsmis_bench.training.step import COMPILE_BACKEND  # noqa: E402

STARTED = time.perf_counter()


#: the override of the ``*_cudnnbench`` variants, which the benchmark applies itself (it
#: builds its own accelerators, not the engine's ``make_accelerator``)
CUDNN_BENCHMARK = "train.cudnn_benchmark=true"


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


def engine_path(method, cfg, accelerator, *, steps: int, workers: int) -> tuple[Any, Any, Any]:
    """The engine's own training set-up for ``method``: ``(setup, step, next_batches)``, where
    ``next_batches()`` gives one step's micro-batches, enough for ``steps`` steps."""
    from fsmis_bench.training.cuda_graph import make_train_step
    from fsmis_bench.training.engine import prepare_training
    from fsmis_bench.training.loader import EpisodeLoader

    setup = prepare_training(method, cfg, accelerator)
    step = make_train_step(setup.options, setup.method, setup.optimizer, setup.scheduler, accelerator,
                           grad_clip=float(cfg.train.grad_clip))
    loader = EpisodeLoader(_sampler(int(cfg.train.image_size)), setup.batch_size, start=0,
                           stop=steps * setup.accum, device=accelerator.device, num_workers=workers)
    batches = iter(loader)
    setup.method.train()
    return setup, step, lambda: [next(batches) for _ in range(setup.accum)]


def engine_steps(method, cfg, device: torch.device, *, warmup: int, steps: int, workers: int,
                 mixed_precision: str = "no", profile_steps: int = 0) -> dict[str, Any]:
    """Time ``steps`` optimiser steps of the engine path (after ``warmup`` untimed ones);
    with ``profile_steps`` on CUDA, then sum the device's kernel time over that many more."""
    from fsmis_bench.training.cuda_graph import WARMUP_STEPS

    accelerator = _accelerator(device, mixed_precision)
    _reset_memory(device)
    profile_steps = profile_steps if device.type == "cuda" else 0
    most_warmup = max(warmup, WARMUP_STEPS + 2)  # the episodes are drawn lazily: room for either
    setup, step, next_batches = engine_path(method, cfg, accelerator, steps=most_warmup + 2 * steps + profile_steps,
                                            workers=workers)
    graphed = hasattr(step, "graphed")
    if graphed:  # eager warm-up steps, the recording step, then one replay before the timing
        warmup = most_warmup
    losses, first_step_s = [], None
    for i in range(warmup):
        began = time.perf_counter()
        losses.append(step(next_batches()))
        if i == 0:
            _sync(device)
            first_step_s = time.perf_counter() - began
    times = []
    for _ in range(steps):  # each step synchronised: per-step times
        _sync(device)
        began = time.perf_counter()
        losses.append(step(next_batches()))
        _sync(device)
        times.append(time.perf_counter() - began)
    _sync(device)
    began = time.perf_counter()
    for _ in range(steps):  # as the engine runs: no sync until the end
        losses.append(step(next_batches()))
    _sync(device)
    throughput = (time.perf_counter() - began) / steps
    busy = _kernel_time(lambda: losses.append(step(next_batches())), device,
                        profile_steps) if profile_steps else None
    values = [float(v) for v in losses]
    result = {**_summary(times), "throughput_s": round(throughput, 4),
              "episodes_per_s": round(setup.batch_size * setup.accum / throughput, 2),
              "peak_mem_gib": _peak_gib(device), "loss_finite": all(math.isfinite(v) for v in values),
              "losses": [round(v, 7) for v in values], "warmup": warmup}
    if first_step_s is not None:
        result["first_step_s"] = round(first_step_s, 2)
    if busy is not None:
        result.update(busy)
    if graphed:
        result["cuda_graph"] = bool(step.graphed)
        if step.fell_back:
            result["cuda_graph_fell_back"] = step.fell_back
    del setup, step, next_batches
    accelerator.free_memory()  # the accelerator holds the optimiser (and its states) otherwise
    _reset_memory(device)
    return result


def _kernel_time(step, device: torch.device, repeats: int) -> dict[str, Any]:
    """The device's kernel time per step over ``repeats`` steps (``torch.profiler``): the
    floor that a step without launch gaps (a replayed CUDA graph) can reach."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        _sync(device)

    def device_us(event) -> float:
        return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))

    by_name: dict[str, float] = {}
    for event in prof.key_averages():  # kernels whose names differ only after 90 characters add up
        if device_us(event) > 0:
            by_name[event.key[:90]] = by_name.get(event.key[:90], 0.0) + device_us(event)
    top = sorted(by_name.items(), key=lambda item: item[1], reverse=True)[:10]
    return {"kernel_ms_per_step": round(sum(by_name.values()) / repeats / 1000, 2),
            "top_kernels_ms_per_step": {name: round(us / repeats / 1000, 2) for name, us in top}}


def predict_parts(method, device: torch.device, size: int, slices: int, repeats: int = 3) -> dict[str, float]:
    """Where one chunk of ``slices`` query slices goes in ``SDFSMIS.predict`` (ms per chunk,
    median of ``repeats``; the device synchronised around each part)."""
    from gpu_sd15_check import _synthetic_slices

    support_images, support_masks = (t.to(device) for t in _synthetic_slices(1, size, seed=1))
    query_images = _synthetic_slices(slices, size, seed=2)[0].to(device)
    parts: dict[str, list[float]] = {}

    def timed(name: str, fn):
        _sync(device)
        began = time.perf_counter()
        value = fn()
        _sync(device)
        parts.setdefault(name, []).append((time.perf_counter() - began) * 1000)
        return value

    method.eval()
    with torch.no_grad():
        for _ in range(repeats + 1):
            support = timed("support_pass", lambda: method.encode_support(support_images[None], support_masks[None]))
            latents = timed("vae_encode", lambda: method.encode_images(query_images))
            out = timed("unet_query_pass", lambda: method.query_pass(latents, support))
            estimate = method.mask_latent_estimate(out, latents)
            decoded = timed("vae_decode", lambda: method.decode(estimate, (size, size)))
            timed("threshold_lcc_cpu", lambda: method.masks_from_decoded(decoded))
    return {name: round(statistics.median(times[1:]), 2) for name, times in parts.items()}


def measure_predict_variants(method, device: torch.device, size: int, slices: int, repeats: int,
                             out: dict[str, Any] | None = None, report=None) -> dict[str, Any]:
    """Inference per query slice (``Method.predict``, support cached) in each variant, and
    where the plain variant's time goes. Variants: the configured chunk (``predict_batch_size``
    8, ``slices`` slices), 32 (and 64) slices in one chunk, bf16 autocast, NHWC, a bf16 VAE
    with and without autocast, each recorded (``_graph``) where it may pay, and two with
    ``train.cudnn_benchmark`` (``_cudnnbench``). Each variant lands in ``out`` (returned), and
    ``report()``, where given, runs after each: a run stopped at its limit keeps the finished ones."""
    import dataclasses

    cuda = device.type == "cuda"
    plain = "tf32" if cuda else "fp32"
    options = method.options
    out = {} if out is None else out

    def one(name: str, precision: str, n: int, batch: int, recorded: bool = False, cudnn_benchmark: bool = False) -> None:
        method.options = dataclasses.replace(options, predict_batch_size=batch, predict_cuda_graph=recorded)
        method._recordings.clear()  # a recorded variant records its own graphs (and frees the last one's)
        _reset_memory(device)
        apply_cudnn_benchmark(cudnn_benchmark)  # timed in the warm-up pass, before any recording
        try:
            out[name] = {**measure_inference(method, device, precision, size, n, warmup=1, repeats=repeats),
                         "predict_batch_size": batch, "predict_cuda_graph": recorded}
            if cudnn_benchmark:
                out[name]["cudnn_benchmark"] = True
        except Exception as exc:  # one variant must not cost the others
            out[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            apply_cudnn_benchmark(False)
        _log(f"predict {name}: {out[name]}")
        if report is not None:
            report()

    one(plain, "fp32", slices, options.predict_batch_size)
    method.options = options
    out[plain]["parts_ms_per_chunk"] = predict_parts(method, device, size, options.predict_batch_size)
    _log(f"predict parts: {out[plain]['parts_ms_per_chunk']}")
    one(f"{plain}_chunk32", "fp32", 32, 32)
    if cuda:
        one("bf16_autocast_chunk32", "bf16", 32, 32)
        method.to(memory_format=torch.channels_last)
        one("bf16_autocast_nhwc_chunk32", "bf16", 32, 32)
        one(f"{plain}_nhwc_chunk32", "fp32", 32, 32)
        method.to(memory_format=torch.contiguous_format)
        # method.predict_cuda_graph: the support side and the query chunk recorded and replayed
        one(f"{plain}_graph", "fp32", slices, options.predict_batch_size, recorded=True)
        one(f"{plain}_chunk32_graph", "fp32", 32, 32, recorded=True)
        one("bf16_autocast_chunk32_graph", "bf16", 32, 32, recorded=True)
        one("bf16_autocast_chunk64_graph", "bf16", 64, 64, recorded=True)
        one("bf16_autocast_chunk32_cudnnbench_graph", "bf16", 32, 32, recorded=True, cudnn_benchmark=True)
        # a bf16 VAE: under autocast its GroupNorms still run in fp32 (autocast's list), without
        # autocast in bf16 (the U-Net then in TF32)
        method.vae.to(torch.bfloat16)
        method.vae_dtype = torch.bfloat16
        one("bf16_vae_autocast_chunk32", "bf16", 32, 32)
        one(f"{plain}_bf16_vae_chunk32", "fp32", 32, 32)
        one(f"{plain}_bf16_vae_chunk32_graph", "fp32", 32, 32, recorded=True)
        one("bf16_vae_autocast_chunk32_graph", "bf16", 32, 32, recorded=True)
        one(f"{plain}_bf16_vae_chunk32_cudnnbench_graph", "fp32", 32, 32, recorded=True, cudnn_benchmark=True)
        one(f"{plain}_bf16_vae_chunk64_graph", "fp32", 64, 64, recorded=True)  # the two best of before, together
        method.vae.to(torch.float32)
        method.vae_dtype = torch.float32
        # NHWC recorded, then with every GroupNorm compiled (as `speed=fast` leaves them for the
        # evaluation after its training): CUDA's GroupNorm returns NCHW, the compiled one keeps
        # NHWC. Last, since they compile first (no-grad graphs of their own)
        method.to(memory_format=torch.channels_last)
        one("bf16_autocast_nhwc_chunk32_graph", "bf16", 32, 32, recorded=True)
        compile_group_norms(method, "default", COMPILE_BACKEND)
        one("bf16_autocast_nhwc_norms_chunk32_graph", "bf16", 32, 32, recorded=True)
        one("bf16_autocast_nhwc_norms_chunk64_graph", "bf16", 64, 64, recorded=True)
        _uncompile(method)
        method.to(memory_format=torch.contiguous_format)
        method._recordings.clear()
    method.options = options
    return out


def _compare(out: dict[str, Any], other: dict[str, Any], label: str, losses: bool = True) -> None:
    """``speedup_vs_<label>`` of ``out`` over ``other`` and, with ``losses``, the largest
    relative difference of their step losses (the same weights and batches)."""
    out[f"speedup_vs_{label}"] = round(other["median_s"] / out["median_s"], 2)
    if losses:
        pairs = zip(other["losses"], out["losses"])
        out[f"loss_max_rel_diff_vs_{label}"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)


def _group_norm_keeps_channels_last(device: torch.device) -> bool:
    x = torch.randn(2, 64, 8, 8, device=device).to(memory_format=torch.channels_last)
    return torch.nn.functional.group_norm(x, 32).is_contiguous(memory_format=torch.channels_last)


def _uncompile(model) -> None:
    """Undo ``nn.Module.compile`` and compiled GroupNorms on every submodule (the next variant runs eagerly)."""
    for module in model.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
        if isinstance(module, CompiledGroupNorm):
            module.__class__ = torch.nn.GroupNorm
            del module.compiled_group_norm


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
    parser.add_argument("--compile-mode", default="none", help="train.compile for the SD compiled variant ('none': skip)")
    parser.add_argument("--tiny-compile-mode", default="none", help="train.compile for the tiny backbone ('none': skip)")
    parser.add_argument("--tiny-steps", type=int, default=50, help="timed steps of the tiny backbone")
    parser.add_argument("--budget-s", type=float, default=230.0, help="skip variants that would end after this")
    parser.add_argument("--compile-budget-s", type=float, default=90.0,
                        help="time a `_blocks` or `_norms` variant's compilation is expected to take (for the budget)")
    parser.add_argument("--profile", type=int, default=0,
                        help="eager variants: sum the kernel time of this many more steps (torch.profiler)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--extra", nargs="*", default=[], help="extra config overrides for every variant")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these variants (e.g. tf32_fused tf32_fused_compiled tiny_eager tiny_reduce-overhead)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; use --device cpu --tiny for the smoke check")
    cuda = device.type == "cuda"

    def _compile_s(name: str) -> float:  # the budget a compiling variant needs beyond its steps
        return args.compile_budget_s if "_blocks" in name or "_norms" in name else 0.0

    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    backbone = "tiny" if args.tiny else "sd15"
    base = [f"method={args.method}", f"backbone={backbone}", "pretrained=false", f"device={device.type}",
            f"train.image_size={args.size}", "train.num_workers=0", "train.schedule=constant",
            "train.cuda_graph=false"]  # eager unless a variant records (`_graph`)
    # the switches a variant's name turns on stay off in the others, whatever their default
    # (`auto` turns joint_pass, batched_encode and fused_clip on with CUDA)
    base.append("train.fused_clip=false")
    for switch in ("joint_pass", "batched_encode"):
        if _config(base).method.get(switch) is not None:
            base.append(f"method.{switch}=false")
    base += args.extra

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
        # whether this torch's GroupNorm keeps NHWC on the device: where it does not, every
        # GroupNorm of a channels_last step copies its input and output to and from NCHW
        "group_norm_keeps_channels_last": _group_norm_keeps_channels_last(device),
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
        apply_cudnn_benchmark(CUDNN_BENCHMARK in overrides)
        target_model = model if model is not None else method
        # a variant's method.* options (e.g. method.joint_pass), applied to the shared model
        built_options = target_model.options if any(o.startswith("method.") for o in overrides) else None
        try:
            cfg = _config([*(config or base), *overrides])
            if built_options is not None:
                target_model.options = type(target_model).resolve_options(cfg.method, target_model.fidelity)
            graphs_before = counters["stats"]["unique_graphs"]
            out = engine_steps(target_model, cfg, device, warmup=args.warmup,
                               steps=steps, workers=workers, mixed_precision=mixed,
                               profile_steps=args.profile if not name.endswith("_graph") else 0)
            out["cudnn_benchmark"] = torch.backends.cudnn.benchmark  # as the variant ran
            out["compiled_group_norms"] = sum(isinstance(m, CompiledGroupNorm) for m in target_model.modules())
            if "train.compile=default" in overrides:  # dynamo's graphs compiled by this variant (forward)
                out["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs_before
            joint_pass = getattr(getattr(target_model, "options", None), "joint_pass", None)
            if joint_pass is not None:
                out["joint_pass"] = joint_pass
        except Exception as exc:  # record and go on: one variant must not cost the others
            result["skipped"][name] = f"error: {type(exc).__name__}: {str(exc)[:300]}"
            _log(f"{name}: failed: {exc!r}")
            _reset_memory(device)
            return None
        finally:
            apply_cudnn_benchmark(False)
            if built_options is not None:
                target_model.options = built_options
        out["tf32"] = bool(tf32 and cuda)
        out["mixed_precision"] = mixed
        per_step_guess[0] = out["median_s"]
        _log(f"  { {k: v for k, v in out.items() if k != 'losses'} }")
        return out

    def flush() -> None:  # partial results survive a run stopped at its time limit
        if args.out:
            Path(args.out).write_text(json.dumps({**result, "partial": True}) + "\n")

    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def restore(model) -> None:
        """Every variant starts from the same weights and generator states (so its losses compare with another's)."""
        saved = snapshots.setdefault(id(model), {n: p.detach().clone() for n, p in model.named_parameters()})
        # and the same random draws: fidelity=code's posterior noise and the classic methods'
        # sampling come from the global generators, which would otherwise run on between variants
        torch.manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                # a frozen part keeps the dtype its variant gave it (a bf16 VAE stays bf16)
                p.data = saved[n].clone() if p.requires_grad else saved[n].to(p.dtype, copy=True)
                # an NHWC variant leaves NHWC gradients behind; fused AdamW refuses a gradient
                # whose strides differ from its (restored, contiguous) parameter's
                p.grad = None

    def measure(name: str, overrides: list[str], mixed: str, tf32: bool, target: dict, model=None,
                config: list[str] | None = None, steps: int | None = None, extra_s: float = 0.0) -> None:
        model = model if model is not None else method
        if name.endswith("_graph") and not cuda:
            result["skipped"][name] = "CUDA graphs are measured on CUDA only"
            return
        if args.only is None or name in args.only:
            restore(model)
        out = run(name, overrides, mixed, tf32, model=model, config=config, steps=steps, extra_s=extra_s)
        if "_blocks" in name or "_norms" in name:  # compiled parts stay compiled on the shared model otherwise
            _uncompile(model)
        if out is not None:
            if model is not method:
                out["steps_per_s"] = round(1 / out["throughput_s"], 1)
            base_name = name.removesuffix("_graph").removesuffix("_repeat")
            for part in ("_blocks", "_norms", "_joint", "_batched", "_bf16vae", "_fclip", "_cudnnbench"):
                base_name = base_name.replace(part, "")
            base_name = "tiny_eager" if base_name == "tiny" else base_name
            eager = target.get(base_name) if base_name != name else None
            if eager is not None:  # the same weights and batches: recorded (or eager again) vs eager
                _compare(out, eager, "eager")
            two_pass = target.get(name.replace("_joint", "")) if "_joint" in name else None
            if two_pass is not None:
                _compare(out, two_pass, "two_pass", losses=False)
            for part, label in (("_batched", "four_encodes"), ("_bf16vae", "fp32_vae"), ("_fclip", "clip_pass"),
                                ("_cudnnbench", "cudnn_heuristics"), ("_norms", "eager_norms"), ("_nhwc", "nchw")):
                other = target.get(name.replace(part, "")) if part in name else None
                if other is not None:  # the same step with that one switch off
                    _compare(out, other, label)
            target[name] = out
        flush()

    graph = "train.cuda_graph=true"
    fused = "train.fused_optimizer=true"
    blocks = ["train.compile=default", "train.compile_scope=blocks"]
    norms = ["train.compile=default", "train.compile_scope=norms"]
    joint = "method.joint_pass=true"
    batched = "method.batched_encode=true"
    fclip = "train.fused_clip=true"
    train = result["train"]
    for name, overrides, mixed, tf32 in [
        ("fp32", ["train.fused_optimizer=false"], "no", False),
        ("tf32", ["train.fused_optimizer=false"], "no", True),
        ("tf32_fused", [fused], "no", True),
        ("tf32_fused_repeat", [fused], "no", True),
        ("tf32_fused_graph", [fused, graph], "no", True),
        ("tf32_fused_batch4", [fused, "train.batch_size=4"], "no", True),
        ("tf32_fused_batch4_graph", [fused, "train.batch_size=4", graph], "no", True),
        ("bf16_autocast", [fused], "bf16", True),
        ("bf16_autocast_repeat", [fused], "bf16", True),
        ("bf16_autocast_graph", [fused, graph], "bf16", True),
        # NHWC weights: cuDNN's NCHW<->NHWC transposes were the largest kernels of the plain step
        ("tf32_fused_nhwc", [fused, "train.channels_last=true"], "no", True),
        ("tf32_fused_nhwc_graph", [fused, "train.channels_last=true", graph], "no", True),
        ("bf16_autocast_nhwc", [fused, "train.channels_last=true"], "bf16", True),
        ("bf16_autocast_nhwc_graph", [fused, "train.channels_last=true", graph], "bf16", True),
        # support and query rows as one U-Net batch: half the kernels, weights read once
        ("tf32_fused_joint", [fused, joint], "no", True),
        ("tf32_fused_joint_graph", [fused, joint, graph], "no", True),
        ("bf16_autocast_nhwc_joint_graph", [fused, "train.channels_last=true", joint, graph], "bf16", True),
        # the four frozen-VAE encodes of an episode as one call (method.batched_encode)
        ("tf32_fused_joint_batched", [fused, joint, batched], "no", True),
        ("tf32_fused_joint_batched_graph", [fused, joint, batched, graph], "no", True),
        ("bf16_autocast_nhwc_joint_batched_graph", [fused, "train.channels_last=true", joint, batched, graph],
         "bf16", True),
        # the clipping inside fused AdamW (train.fused_clip): no separate pass over the gradients
        ("tf32_fused_joint_fclip", [fused, joint, fclip], "no", True),
        ("tf32_fused_joint_fclip_graph", [fused, joint, fclip, graph], "no", True),
        ("bf16_autocast_nhwc_joint_fclip_graph", [fused, "train.channels_last=true", joint, fclip, graph],
         "bf16", True),
        # cuDNN's convolution algorithms timed once per shape instead of chosen by heuristics
        ("tf32_fused_joint_cudnnbench", [fused, joint, CUDNN_BENCHMARK], "no", True),
        ("tf32_fused_joint_cudnnbench_graph", [fused, joint, CUDNN_BENCHMARK, graph], "no", True),
        ("bf16_autocast_nhwc_joint_cudnnbench_graph", [fused, "train.channels_last=true", joint, CUDNN_BENCHMARK, graph],
         "bf16", True),
        # every GroupNorm compiled (dynamic shapes): NHWC without layout copies, few graphs
        ("tf32_fused_joint_norms", [fused, joint, *norms], "no", True),
        ("tf32_fused_joint_norms_graph", [fused, joint, *norms, graph], "no", True),
        ("bf16_autocast_nhwc_joint_norms_graph", [fused, "train.channels_last=true", joint, *norms, graph],
         "bf16", True),
        # both candidates on the fastest path: the clipping inside AdamW and compiled GroupNorms
        ("bf16_autocast_nhwc_joint_fclip_norms_graph",
         [fused, "train.channels_last=true", joint, fclip, *norms, graph], "bf16", True),
        # the default with CUDA (every `auto` on), and the fastest step measured (opt-in)
        ("tf32_fused_joint_batched_fclip", [fused, joint, batched, fclip], "no", True),  # eager: --profile
        ("tf32_fused_joint_batched_fclip_graph", [fused, joint, batched, fclip, graph], "no", True),
        # the default in NHWC, plain and with compiled GroupNorms: TF32 still, so a candidate
        # for the default if its losses stay within TF32's drift (`loss_max_rel_diff_vs_nchw`)
        ("tf32_fused_nhwc_joint_batched_fclip_graph",
         [fused, "train.channels_last=true", joint, batched, fclip, graph], "no", True),
        ("tf32_fused_nhwc_joint_batched_fclip_norms_graph",
         [fused, "train.channels_last=true", joint, batched, fclip, *norms, graph], "no", True),
        ("bf16_autocast_nhwc_joint_batched_fclip_norms_graph",
         [fused, "train.channels_last=true", joint, batched, fclip, *norms, graph], "bf16", True),
        # compiled blocks (fused GroupNorm/SiLU/elementwise kernels) inside the recorded step;
        # compared with the eager variant without `_blocks`
        ("tf32_fused_blocks_graph", [fused, *blocks, graph], "no", True),
        ("bf16_autocast_nhwc_blocks_graph", [fused, "train.channels_last=true", *blocks, graph], "bf16", True),
    ]:
        measure(name, overrides, mixed, tf32, train, extra_s=_compile_s(name))
    method.to(memory_format=torch.contiguous_format)

    def selected(*names: str) -> bool:
        return args.only is None or any(n in args.only for n in names)

    bf16_vae = {"tf32_fused_joint_bf16vae": [fused, joint], "tf32_fused_joint_bf16vae_graph": [fused, joint, graph],
                "tf32_fused_joint_batched_bf16vae_graph": [fused, joint, batched, graph]}
    if selected(*bf16_vae):  # the frozen VAE's weights in bf16 without autocast (its GroupNorms in bf16 too)
        method.vae.to(torch.bfloat16)
        method.vae_dtype = torch.bfloat16
        for name, overrides in bf16_vae.items():
            measure(name, [*overrides, "method.vae_dtype=bfloat16"], "no", True, train)
        method.vae.to(torch.float32)
        method.vae_dtype = torch.float32

    if selected("lowmem"):
        method.unet.enable_gradient_checkpointing()
        measure("lowmem", ["memory=low", "train.fused_optimizer=false"], "no", True, train)
        method.unet.disable_gradient_checkpointing()
    if selected("bf16_master", "bf16_master_graph"):  # bf16 weights last on this model: the VAE stays bf16
        method.vae.to(torch.bfloat16)
        method.vae_dtype = torch.bfloat16
        master = [fused, "train.weight_dtype=bfloat16", "method.vae_dtype=bfloat16"]
        measure("bf16_master", master, "bf16", True, train)
        measure("bf16_master_graph", [*master, graph], "bf16", True, train)
    del method
    _reset_memory(device)

    # a fresh model: inference, then the compiled step
    method = _build(base, device)
    _set_tf32(cuda)
    if selected("predict"):
        measure_predict_variants(method, device, args.size, args.slices, repeats=max(1, min(args.steps, 3)),
                                 out=result["predict"], report=flush)
        flush()

    # tiny backbone through the same path
    tiny_base = [s.replace(f"backbone={backbone}", "backbone=tiny") for s in base]
    tiny_names = {"tiny_eager": [fused], "tiny_eager_repeat": [fused], "tiny_graph": [fused, graph],
                  "tiny_joint_graph": [fused, joint, graph], "tiny_joint_batched_graph": [fused, joint, batched, graph],
                  "tiny_joint_fclip_graph": [fused, joint, fclip, graph],
                  "tiny_joint_batched_fclip": [fused, joint, batched, fclip],  # eager: its kernel time with --profile
                  "tiny_joint_batched_fclip_graph": [fused, joint, batched, fclip, graph],  # the default with CUDA
                  "tiny_joint_norms_graph": [fused, joint, *norms, graph],
                  "tiny_blocks_graph": [fused, *blocks, graph],
                  # every U-Net block compiled: inductor fuses the elementwise kernels around the
                  # matmuls and convolutions, the candidate for a step bound by its ~1,700 kernels
                  "tiny_joint_batched_fclip_blocks_graph": [fused, joint, batched, fclip, *blocks, graph]}
    tiny = _build(tiny_base, device) if selected(*tiny_names) else None
    for name, overrides in tiny_names.items():
        measure(name, overrides, "no", True, result["tiny"], model=tiny, config=tiny_base, steps=args.tiny_steps,
                extra_s=_compile_s(name))

    if args.compile_mode != "none":
        if not cuda:
            result["skipped"]["tf32_fused_compiled"] = "compile is measured on CUDA only"
        else:
            out = run("tf32_fused_compiled", [fused, f"train.compile={args.compile_mode}"], "no", True, extra_s=90.0)
            if out is not None:
                out["compile_mode"] = args.compile_mode
                train["tf32_fused_compiled"] = out
    del method
    _reset_memory(device)

    if args.tiny_compile_mode != "none":
        name = f"tiny_{args.tiny_compile_mode}"
        if not cuda:
            result["skipped"][name] = "compile is measured on CUDA only"
        else:
            per_step_guess[0] = result["tiny"].get("tiny_eager", {}).get("median_s")
            out = run(name, [fused, f"train.compile={args.tiny_compile_mode}"], "no", True,
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
