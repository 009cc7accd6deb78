"""The one training loop every method shares.

The engine owns the optimiser (AdamW, or SGD for the classic methods, with the method's
parameter groups), the learning-rate schedule, gradient accumulation and clipping, seeding, device placement and mixed
precision (through ``accelerate``, so ``accelerate launch`` runs it on several GPUs),
the progress bar, periodic checkpoints and resuming. A checkpoint holds only what
training changes — trainable parameters, buffers, optimiser, schedule, the sampler's
random stream and the loss log — so frozen multi-GB backbones are never copied.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..method import Method
from ..records import atomic_write
from .episodes import EpisodeSampler
from .interrupt import Interrupted, StopRequest
from .precision import apply_tf32, precision_of, uses_cuda


def make_accelerator(cfg: DictConfig, grad_accum: int = 1):
    """An ``accelerate.Accelerator`` honouring ``device`` and the resolved precision
    (``mixed_precision`` autocast, TF32 on or off: :mod:`.precision`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = precision_of(cfg)
    use_cpu = not uses_cuda(str(cfg.get("device", "auto")))
    apply_tf32(precision.tf32)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision.mixed_precision:
        # accelerate keeps one precision per process; a sweep in one process may change it
        # between runs (the distributed PartialState is kept).
        AcceleratorState._reset_state()
    return Accelerator(cpu=use_cpu, mixed_precision=precision.mixed_precision, gradient_accumulation_steps=grad_accum)


def make_optimizer(groups: list[dict[str, Any]], tcfg: DictConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: ``adamw`` (default) or ``sgd`` (``train.momentum``; the classic
    FSMIS methods); ``train.weight_decay`` is decoupled for AdamW, L2 for SGD, as in torch."""
    params = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    name = str(tcfg.get("optimizer", "adamw"))
    weight_decay = float(tcfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=params[0]["lr"], momentum=float(tcfg.get("momentum", 0.9)), weight_decay=weight_decay)
    raise ConfigError(f"train.optimizer={name!r} is unknown", hint="use adamw or sgd")


def _schedule(name: str, total: int, warmup: int, step_every: int = 1000, gamma: float = 1.0):
    """LR factor per optimiser step. ``step``: x ``gamma`` every ``step_every`` steps, the
    last decay at ``total - step_every`` (torch's MultiStepLR with milestones
    ``[k * step_every for k in 1 .. total // step_every - 1]``, as the classic methods use)."""
    decays = max(0, total // max(1, step_every) - 1)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if name == "constant":
            return 1.0
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if name == "step":
            return gamma ** min(step // max(1, step_every), decays)
        raise ConfigError(f"train.schedule={name!r} is unknown", hint="use constant, linear, cosine or step")

    return factor


def _trainable_state(method: Method) -> dict[str, torch.Tensor]:
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in method.named_buffers()}
    return {k: v.detach().cpu() for k, v in method.state_dict().items() if k in trainable | buffers}


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float | None
    log: list[dict[str, Any]] = field(default_factory=list)


def train(
    method: Method,
    sampler: EpisodeSampler,
    cfg: DictConfig,
    checkpoint_dir: Path,
    *,
    description: str = "train",
    accelerator=None,
) -> TrainResult:
    """Train ``method`` for ``cfg.train.steps`` optimiser steps, resuming if possible.

    Checkpoints go to ``checkpoint_dir/last.pt`` every ``train.checkpoint_every`` steps
    and on interruption; ``final.pt`` holds the finished weights and replaces ``last.pt``. The loss log is written
    to ``checkpoint_dir/train_log.csv``.
    """
    tcfg = cfg.train
    steps, accum = int(tcfg.steps), int(tcfg.grad_accum)
    if steps < 1 or accum < 1:
        raise ConfigError("train.steps and train.grad_accum must be at least 1")
    accelerator = accelerator or make_accelerator(cfg, accum)
    # train.batch_size is the batch of one optimiser step over all processes, so a run's
    # numbers do not depend on how many processes share it (up to float summation order).
    world, rank, batch_size = accelerator.num_processes, accelerator.process_index, int(tcfg.batch_size)
    if batch_size % world:
        raise ConfigError(
            f"train.batch_size={batch_size} cannot be split over {world} processes",
            hint=f"use a multiple of {world} (train.batch_size counts the episodes of all processes together)",
        )
    groups = method.param_groups()
    optimizer = make_optimizer(groups, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(str(tcfg.schedule), steps, int(tcfg.warmup_steps),
                             int(tcfg.get("lr_step_every", 1000)), float(tcfg.get("lr_gamma", 1.0)))
    )
    # The schedule is stepped by hand once per optimiser step, so it is not prepared.
    method, optimizer = accelerator.prepare(method, optimizer)
    inner: Method = accelerator.unwrap_model(method)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = checkpoint_dir / "last.pt"
    start, log, elapsed_before = 0, [], 0.0
    if world > 1:  # each process its own stream for the noise a loss may draw (saved per process)
        torch.manual_seed(int(cfg.seed) * 1_000_003 + rank)
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        inner.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        per_process = state.get("torch_rng_per_process")
        if per_process and len(per_process) == world:
            torch.set_rng_state(per_process[rank])
        start, log, elapsed_before = state["step"], state["log"], state.get("seconds", 0.0)
        tqdm.write(f"resuming {description} from step {start} ({last})", file=sys.stderr)

    def save(step: int, seconds: float, every_process: bool = True) -> None:
        # every_process: all processes are at this step boundary and send their RNG state
        per_process = _gather_rng_states(accelerator) if every_process else None
        if not accelerator.is_main_process:
            return
        state = {
            "torch_rng_per_process": per_process,
            "model": _trainable_state(inner),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "log": log,
            "seconds": seconds,
        }
        tmp = last.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, last)
        _write_log(checkpoint_dir / "train_log.csv", log)

    method.train()
    began = time.time()
    step = start
    bar = tqdm(
        total=steps, initial=start, desc=description, file=sys.stderr, dynamic_ncols=True,
        disable=not accelerator.is_main_process or os.environ.get("FSMIS_NO_PROGRESS") == "1",
    )
    with StopRequest() as stop:
        try:
            # A signal only sets stop.received; the loop ends at a step boundary.
            while step < steps and not _any_process(accelerator, stop.requested):
                running = 0.0
                for _ in range(accum):
                    batch = sampler.batch(batch_size, **({"shard": (rank, world)} if world > 1 else {}))
                    batch = batch.to(accelerator.device)
                    with accelerator.accumulate(method), accelerator.autocast():
                        loss = method(batch)  # forward == training_loss; through the DDP wrapper
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and float(tcfg.grad_clip) > 0:
                            accelerator.clip_grad_norm_(method.parameters(), float(tcfg.grad_clip))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    running += float(loss.detach()) / accum
                scheduler.step()
                step += 1
                bar.update(1)
                seconds = elapsed_before + time.time() - began
                if step % int(tcfg.log_every) == 0 or step == steps:
                    running = _mean_over_processes(accelerator, running)
                    log.append({"step": step, "loss": running, "lr": scheduler.get_last_lr()[0], "elapsed_s": round(seconds, 2)})
                    bar.set_postfix(loss=f"{running:.4f}")
                if step % int(tcfg.checkpoint_every) == 0 and step < steps:
                    save(step, seconds)
        except KeyboardInterrupt:
            save(step, elapsed_before + time.time() - began, every_process=False)
            bar.close()
            tqdm.write(f"interrupted at step {step}; checkpoint saved, rerun the same command to resume", file=sys.stderr)
            raise
    bar.close()
    seconds = elapsed_before + time.time() - began
    if step < steps:  # stopped by a signal, at a step boundary
        save(step, seconds)
        tqdm.write(f"interrupted at step {step}; checkpoint saved, rerun the same command to resume", file=sys.stderr)
        raise stop.stop() if stop.requested else Interrupted(signal.SIGTERM)  # another process was stopped
    if accelerator.is_main_process:
        _write_log(checkpoint_dir / "train_log.csv", log)
        final = checkpoint_dir / "final.pt"
        torch.save({"model": _trainable_state(inner), "step": step}, final.with_suffix(".tmp"))
        os.replace(final.with_suffix(".tmp"), final)
        # The resume state (optimiser moments: twice the trainable weights) is dead weight now.
        last.unlink(missing_ok=True)
    method.eval()
    return TrainResult(step, seconds, log[-1]["loss"] if log else None, log)


def load_weights(method: Method, checkpoint: Path) -> int:
    """Load a ``final.pt`` or ``last.pt`` into ``method``; returns its step."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    missing, unexpected = method.load_state_dict(state["model"], strict=False)
    if unexpected:
        raise ConfigError(
            f"checkpoint {checkpoint} does not fit {type(method).__name__}: unexpected keys {unexpected[:3]}",
            hint="evaluate it with the method and backbone it was trained with",
        )
    return int(state.get("step", 0))


def _gather_rng_states(accelerator) -> list[torch.Tensor] | None:
    """Every process's torch RNG state, in process order (None for a single process)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return gather_object([torch.get_rng_state()])


def _any_process(accelerator, flag: bool) -> bool:
    """``flag`` of any process (one stop request stops every process at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def _mean_over_processes(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), "mean").item())


def _write_log(path: Path, log: list[dict[str, Any]]) -> None:
    lines = ["step,loss,lr,elapsed_s"] + [f"{r['step']},{r['loss']:.6g},{r['lr']:.6g},{r['elapsed_s']}" for r in log]
    atomic_write(path, "\n".join(lines) + "\n")
