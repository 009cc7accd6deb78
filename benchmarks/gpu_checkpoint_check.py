"""Cost and exactness of the resume checkpoint at SD-1.5 scale on one accelerator.

The SD methods train the whole U-Net (~860 M parameters), so a resume state holds the
weights plus two AdamW moments (~10 GB in fp32). This script builds parameters of that
total size on the device (plain tensors: no diffusers needed), takes one AdamW step, and
then times :func:`fsmis_bench.training.checkpoint.save_training_state` and
:func:`load_training_state` (the engine's periodic checkpoint and resume), checks that
the loaded state equals the saved one bit for bit (weights, moments, CPU and CUDA RNG
states) and that one more AdamW step from the reloaded state gives the same weights as
one from the live state. Then a background save (``train.async_checkpoint``): how long the
step waits (``background_stall_s``: the device-to-host copies) against the whole write
(``background_total_s``, one more AdamW step running meanwhile), and that the file holds the
state at the save: into ordinary host memory, then into the writer's page-locked buffers
(``background``: their first save, which allocates them, and the next). Prints one JSON
line on stdout (progress on stderr).

GPU::

    python benchmarks/gpu_checkpoint_check.py --out /tmp/ckpt      # 860 M parameters

CPU smoke check::

    python benchmarks/gpu_checkpoint_check.py --device cpu --params 2e6 --out /tmp/ckpt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fsmis_bench.training.checkpoint import (
    CheckpointWriter, load_training_state, rng_state, save_training_state, set_rng_state,
)


def _log(message: str) -> None:
    print(f"[gpu_checkpoint_check] {message}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _parameters(total: int, device: torch.device) -> list[torch.nn.Parameter]:
    """U-Net-like tensor sizes (many 320..1280-channel convs and linears) adding up to ``total``."""
    shapes, count = [], 0
    pattern = [(1280, 1280, 3, 3), (640, 640, 3, 3), (320, 320, 3, 3), (1280, 768), (1280,), (640, 1280)]
    while count < total:
        shape = pattern[len(shapes) % len(pattern)]
        size = 1
        for s in shape:
            size *= s
        if count + size > total:
            shape, size = (total - count,), total - count
        shapes.append(shape)
        count += size
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    # the layouts and dtypes a run's state also holds: NHWC weights (train.channels_last), bf16
    # ones (train.weight_dtype=bfloat16); each goes through the page-locked copies its own way
    nhwc = (torch.randn(64, 32, 3, 3, generator=gen) * 0.02).to(device).contiguous(memory_format=torch.channels_last)
    bf16 = (torch.randn(1280, generator=gen) * 0.02).to(device, torch.bfloat16)
    return [*params, torch.nn.Parameter(nhwc), torch.nn.Parameter(bf16)]


def _snapshot(state: Any) -> Any:
    """A deep copy of ``state`` whose tensors are host clones (what a file must hold)."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_snapshot(v) for v in state)
    return state


def _same(written: Any, saved: Any) -> bool:
    """``written`` (read back from a file) holds exactly ``saved``: values, dtypes, shapes."""
    if isinstance(saved, torch.Tensor):
        return isinstance(written, torch.Tensor) and written.dtype == saved.dtype and torch.equal(written, saved)
    if isinstance(saved, dict):
        return isinstance(written, dict) and written.keys() == saved.keys() and all(
            _same(written[k], v) for k, v in saved.items())
    if isinstance(saved, (list, tuple)):
        return len(written) == len(saved) and all(_same(w, v) for w, v in zip(written, saved))
    return written == saved


def _adamw_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3  # draws from the device RNG, like dropout would
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--params", type=float, default=859_520_964, help="trainable parameters (SD-1.5 U-Net)")
    parser.add_argument("--out", required=True, help="scratch folder for the checkpoint (removed afterwards)")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)

    torch.manual_seed(0)
    params = _parameters(int(args.params), device)
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    _adamw_step(params, optimizer)
    _sync(device)
    _log(f"{sum(p.numel() for p in params) / 1e6:.1f} M parameters on {device}; saving")

    state = {"model": {f"p{i}": p for i, p in enumerate(params)}, "optimizer": optimizer.state_dict(),
             "rng": rng_state(), "step": 1, "log": [{"step": 1, "loss": 0.5}], "seconds": 1.0}
    began = time.perf_counter()
    save_training_state(out, state)
    save_s = time.perf_counter() - began
    size_gb = sum(f.stat().st_size for f in out.iterdir()) / 1e9

    # the live run goes on one step
    _adamw_step(params, optimizer)
    live = [p.detach().clone() for p in params]

    _log(f"saved {size_gb:.2f} GB in {save_s:.1f} s; loading")
    began = time.perf_counter()
    loaded = load_training_state(out)
    load_s = time.perf_counter() - began

    # a resumed run: fresh parameters and optimiser, filled from the checkpoint
    # (in each parameter's own layout, as the engine loads a state into the prepared model)
    resumed = [torch.nn.Parameter(torch.empty_like(p).copy_(loaded["model"][f"p{i}"])) for i, p in enumerate(params)]
    resumed_optimizer = torch.optim.AdamW(resumed, lr=1e-5, weight_decay=1e-2)
    began = time.perf_counter()
    resumed_optimizer.load_state_dict(loaded["optimizer"])
    set_rng_state(loaded["rng"])
    _sync(device)
    restore_s = time.perf_counter() - began
    _adamw_step(resumed, resumed_optimizer)
    _sync(device)
    next_step_identical = all(torch.equal(a, b) for a, b in zip(live, resumed))
    rng_identical = torch.equal(loaded["rng"]["torch"], state["rng"]["torch"]) and all(
        torch.equal(a, b) for a, b in zip(loaded["rng"].get("cuda", []), state["rng"].get("cuda", [])))
    shutil.rmtree(out, ignore_errors=True)

    # train.async_checkpoint: the step waits only for the host copies; a step runs during the
    # write. Into ordinary memory (as before), then the default page-locked buffers: their
    # first save allocates them, the next ones reuse them.
    background: dict[str, Any] = {}
    for label, pinned, saves in (("pageable", False, 1), ("pinned", True, 2)):
        writer = CheckpointWriter(out, background=True, pinned=pinned)
        for save in range(saves):
            state = {"model": {f"p{i}": p for i, p in enumerate(params)}, "optimizer": optimizer.state_dict(),
                     "rng": rng_state(), "step": 2 + save, "log": [], "seconds": 2.0}
            saved = _snapshot(state)
            began = time.perf_counter()
            writer.save(state)
            stall_s = time.perf_counter() - began
            _adamw_step(params, optimizer)
            _sync(device)
            writer.wait()
            total_s = time.perf_counter() - began
            written = load_training_state(out)
            # every tensor: weights (NHWC and bf16 ones too), AdamW moments and steps, RNG states
            identical = _same(written, saved)
            name = f"{label}_first" if saves > 1 and save == 0 else label
            background[name] = {"stall_s": round(stall_s, 2), "total_s": round(total_s, 2), "identical": identical}
            _log(f"background save ({name}): the step waited {stall_s:.1f} s of {total_s:.1f} s")
        # what the buffers hold, and the host memory they keep (page-locked chunks included)
        background[f"{label}_buffers_gb"] = round(writer.staging.nbytes / 1e9, 3)
        background[f"{label}_reserved_gb"] = round(writer.staging.reserved_bytes / 1e9, 3)
        background[f"{label}_page_locked"] = writer.staging.page_locked
        writer.close()
        shutil.rmtree(out, ignore_errors=True)
    background_identical = all(v["identical"] for v in background.values() if isinstance(v, dict))
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters_m": round(sum(p.numel() for p in params) / 1e6, 1),
        "checkpoint_gb": round(size_gb, 2),
        "save_s": round(save_s, 2),
        "load_s": round(load_s, 2),
        "restore_to_device_s": round(restore_s, 2),
        "next_step_identical": next_step_identical,
        "rng_identical": rng_identical,
        "background_stall_s": background["pinned"]["stall_s"],  # the default writer, buffers made
        "background_total_s": background["pinned"]["total_s"],
        "background": background,
        "background_state_identical": background_identical,
    }
    print(json.dumps(result))
    if not (next_step_identical and rng_identical and background_identical):
        sys.exit(1)


if __name__ == "__main__":
    main()
