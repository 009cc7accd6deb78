"""The one training loop every method shares.

The engine owns the optimiser (AdamW, or SGD for the classic methods, with the method's
parameter groups), the learning-rate schedule, gradient accumulation and clipping, seeding, device placement and mixed
precision (through ``accelerate``, so ``accelerate launch`` runs it on several GPUs),
the input pipeline (:mod:`.loader`: episodes drawn ahead in worker processes), the step
and its compute switches (:mod:`.step`, :mod:`.optim`), the progress bar, periodic
checkpoints and resuming. A checkpoint holds only what training changes — trainable
parameters, buffers, optimiser, schedule, the position in the episode stream and the
loss log — so frozen multi-GB backbones are never copied; it is written and read by
:mod:`.checkpoint` (safetensors + JSON, never a pickle). SIGINT and SIGTERM stop the
loop at the next step boundary (:mod:`.interrupt`), so a resumed run continues exactly
where an uninterrupted one would be.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..method import Method
from ..plugins import plugin_code
from ..records import atomic_write, remove_unfinished_writes
from .checkpoint import (  # load_weights: re-exported for callers of the engine
    WEIGHTS_FILE, CheckpointWriter, clear_training_state, load_training_state, load_weights,
    rng_state, save_weights, set_rng_state, trainable_state,
)
from .episodes import EpisodeSampler
from .loader import EpisodeLoader, resolve_num_workers
from .optim import build_optimizer
from .interrupt import Interrupted, StopRequest
from .precision import apply_cudnn_benchmark, apply_tf32, precision_of, uses_cuda
from .cuda_graph import make_train_step
from .step import ComputeOptions, TrainingError, TrainStep, micro_batches, prepare_method  # noqa: F401 (TrainingError re-exported)


#: notes printed once per process
_SAID = {"fp16": False}


def make_accelerator(cfg: DictConfig, grad_accum: int = 1):
    """An ``accelerate.Accelerator`` honouring ``device`` and the resolved precision
    (``mixed_precision`` autocast, TF32 on or off: :mod:`.precision`); sets
    ``train.cudnn_benchmark`` for the process too (training and evaluation)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = precision_of(cfg)
    use_cpu = not uses_cuda(str(cfg.get("device", "auto")))
    if str(cfg.get("mixed_precision")) == "fp16" and precision.mixed_precision == "no" and not _SAID["fp16"]:
        _SAID["fp16"] = True
        print("mixed_precision=fp16: a CPU has no fp16 autocast, so this run computes in fp32 and is "
              "recorded as fp32 (use bf16 for CPU autocast)", file=sys.stderr)
    apply_tf32(precision.tf32)
    apply_cudnn_benchmark(bool(OmegaConf.select(cfg, "train.cudnn_benchmark") or False))
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision.mixed_precision:
        # accelerate keeps one precision per process; a sweep in one process may change it
        # between runs (the distributed PartialState is kept).
        AcceleratorState._reset_state()
    return Accelerator(cpu=use_cpu, mixed_precision=precision.mixed_precision, gradient_accumulation_steps=grad_accum)


def make_optimizer(groups: list[dict[str, Any]], tcfg: DictConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: ``adamw`` (default), ``sgd`` (``train.momentum``; the classic
    FSMIS methods) or ``adamw8bit``, with ``train.fused_optimizer`` and ``train.weight_dtype``
    (:mod:`.optim`); ``train.weight_decay`` is decoupled for AdamW, L2 for SGD, as in torch."""
    options = ComputeOptions.from_config(tcfg)
    return build_optimizer(
        [{k: v for k, v in g.items() if k != "name"} for g in groups],
        name=options.optimizer, weight_decay=float(tcfg.weight_decay), fused=options.fused_optimizer,
        weight_dtype=options.weight_dtype, momentum=float(tcfg.get("momentum", 0.9)),
    )


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


@dataclass
class Training:
    """What :func:`prepare_training` sets up: the prepared method and optimiser, the schedule,
    and the micro-batching (``batch_size`` episodes per forward, ``accum`` forwards per step)."""

    method: Any
    optimizer: Any
    scheduler: Any
    options: ComputeOptions
    batch_size: int
    accum: int


def prepare_training(method: Method, cfg: DictConfig, accelerator) -> Training:
    """Apply the compute switches to ``method``, build the optimiser and schedule, and
    ``accelerator.prepare`` them: everything the step needs (``benchmarks/gpu_engine_check.py``
    times this same path)."""
    tcfg = cfg.train
    steps, accum = int(tcfg.steps), int(tcfg.grad_accum)
    if steps < 1 or accum < 1:
        raise ConfigError("train.steps and train.grad_accum must be at least 1")
    options = ComputeOptions.from_config(tcfg)
    batch_size, accum = micro_batches(int(tcfg.batch_size), accum, options.accumulation)
    accelerator.gradient_accumulation_steps = accum  # `batched` folds the accumulation into the batch
    method.to(accelerator.device)
    prepare_method(method, options, str(accelerator.mixed_precision))
    with plugin_code("method", str(cfg.method.name), "its param_groups"):
        groups = method.param_groups()
    optimizer = make_optimizer(groups, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(str(tcfg.schedule), steps, int(tcfg.warmup_steps),
                             int(tcfg.get("lr_step_every", 1000)), float(tcfg.get("lr_gamma", 1.0)))
    )
    # The schedule is stepped by hand once per optimiser step, so it is not prepared.
    prepared, optimizer = accelerator.prepare(method, optimizer)
    return Training(prepared, optimizer, scheduler, options, batch_size, accum)


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

    Every ``train.checkpoint_every`` steps, and at the step boundary after SIGINT/SIGTERM,
    the resume state goes to ``checkpoint_dir/last.json`` + ``last-<step>.safetensors``
    (:mod:`.checkpoint`); ``final.safetensors`` holds the finished weights and replaces the
    resume state. The loss log is written to ``checkpoint_dir/train_log.csv``.

    With several processes (``accelerate launch``, ``torchrun``) ``train.batch_size`` is the
    batch of all of them together: each trains on its own share of every micro-batch of the
    one episode stream, so together they see the episodes of a one-process run; a stop
    request is agreed on at log steps, so that every process stops at the same step.

    Raises:
        Interrupted: a stop signal arrived; the state at the step boundary was saved.
        TrainingError: the loss became non-finite.
    """
    tcfg = cfg.train
    steps = int(tcfg.steps)
    method_name = str(cfg.method.name)
    accelerator = accelerator or make_accelerator(cfg, int(tcfg.grad_accum))
    setup = prepare_training(method, cfg, accelerator)
    method, optimizer, scheduler = setup.method, setup.optimizer, setup.scheduler
    batch_size, accum = setup.batch_size, setup.accum
    world, rank = accelerator.num_processes, accelerator.process_index
    if batch_size % world:
        raise ConfigError(
            f"a micro-batch of {batch_size} episodes cannot be split over {world} processes",
            hint=f"use a train.batch_size that is a multiple of {world} (it counts the episodes of all "
                 "processes together)",
        )
    inner: Method = accelerator.unwrap_model(method)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        for leftover in remove_unfinished_writes(checkpoint_dir):
            tqdm.write(f"removed {leftover.name}, a checkpoint write that an interrupted process left "
                       f"unfinished ({checkpoint_dir})", file=sys.stderr)
    start, log, elapsed_before = 0, [], 0.0
    if world > 1:  # each process its own stream for randomness drawn in the loss (saved per process)
        torch.manual_seed(int(cfg.seed) * 1_000_003 + rank)
    state = load_training_state(checkpoint_dir)
    if state is not None:
        inner.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        per_process = state.get("rng_per_process")
        if per_process and len(per_process) == world:
            set_rng_state(per_process[rank])
        start, log, elapsed_before = int(state["step"]), list(state["log"]), float(state["seconds"])
        tqdm.write(f"resuming {description} from step {start} ({checkpoint_dir})", file=sys.stderr)

    writer = CheckpointWriter(checkpoint_dir, background=_writes_in_background(tcfg, accelerator.device))

    method.train()
    began = time.time()
    step = start
    train_step = make_train_step(setup.options, method, optimizer, scheduler, accelerator,
                                 grad_clip=float(tcfg.grad_clip), first_step=start)

    def save(step: int, seconds: float) -> None:
        # With several processes all are at this step boundary and send their RNG states.
        per_process = _gather_rng_states(accelerator)
        if not accelerator.is_main_process:
            return
        sampler.seek(step * accum * batch_size)  # the stream position of the next step
        writer.save({
            **({"rng_per_process": per_process} if per_process else {}),
            "model": trainable_state(inner),
            "optimizer": train_step.optimizer_state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rng_state(),
            "step": step,
            "log": log,
            "seconds": seconds,
        })
        _write_log(checkpoint_dir / "train_log.csv", log)

    loader = EpisodeLoader(
        sampler, batch_size, start=start * accum, stop=steps * accum, device=accelerator.device,
        num_workers=resolve_num_workers(tcfg.get("num_workers", 0), accelerator.device.type == "cuda"),
        shard=(rank, world),
    )
    bar = tqdm(
        total=steps, initial=start, desc=description, file=sys.stderr, dynamic_ncols=True,
        disable=not accelerator.is_main_process or os.environ.get("FSMIS_NO_PROGRESS") == "1",
    )
    log_every = int(tcfg.log_every)
    if setup.options.compile is not None and accelerator.is_main_process and start < steps:
        # the bar stands still while the first step compiles; say why
        tqdm.write(f"train.compile={setup.options.compile} (scope {setup.options.compile_scope}): "
                   "the first steps compile, which can take minutes", file=sys.stderr)

    def stop_now() -> bool:
        # One process alone: its flag, every step. Several: agreed on at log steps (a
        # collective, so not every step), so that all stop at the same step.
        if world == 1:
            return stop.requested
        return step % log_every == 0 and _any_process(accelerator, stop.requested)

    try:
        with StopRequest() as stop:
            try:
                batches = iter(loader)
                # A signal only sets stop.requested; the loop ends at a step boundary.
                while step < steps and not stop_now():
                    with plugin_code("method", method_name, "its training loss"):
                        loss = train_step([next(batches) for _ in range(accum)])
                    step += 1
                    bar.update(1)
                    log_now = step % log_every == 0 or step == steps
                    save_now = step % int(tcfg.checkpoint_every) == 0 and step < steps
                    if log_now or save_now:
                        train_step.raise_if_nonfinite()  # the only host syncs: here and the loss below
                    seconds = elapsed_before + time.time() - began
                    if log_now:
                        value = _mean_over_processes(accelerator, loss)
                        log.append({"step": step, "loss": value, "lr": float(scheduler.get_last_lr()[0]), "elapsed_s": round(seconds, 2)})
                        bar.set_postfix(loss=f"{value:.4f}")
                    if save_now:
                        save(step, seconds)
                train_step.raise_if_nonfinite()
                # a recorded step leaves its static gradients on the parameters: free them for evaluation
                optimizer.zero_grad(set_to_none=True)
            except KeyboardInterrupt:
                # Raised mid-step (a second Ctrl-C): that state is half-advanced, so it is not
                # saved; the last periodic checkpoint still resumes exactly.
                bar.close()
                tqdm.write(f"stopped during step {step + 1}; the last checkpoint is kept, rerun the same command "
                           "to resume from it", file=sys.stderr)
                raise
        bar.close()
        seconds = elapsed_before + time.time() - began
        if step < steps:  # stopped by a signal, at a step boundary
            save(step, seconds)
            writer.wait()
            tqdm.write(f"interrupted at step {step}; checkpoint saved, rerun the same command to resume", file=sys.stderr)
            raise stop.stop() if stop.requested else Interrupted(signal.SIGTERM)  # another process was stopped
        writer.wait()  # the last periodic state is on disk (or its error raised) before it is replaced
        if accelerator.is_main_process:
            _write_log(checkpoint_dir / "train_log.csv", log)
            atomic_write(checkpoint_dir / STEP_FILE, json.dumps(_step_kind(train_step, accelerator)) + "\n")
            save_weights(checkpoint_dir / WEIGHTS_FILE, inner, step)
            # The resume state (optimiser moments: twice the trainable weights) is dead weight now.
            clear_training_state(checkpoint_dir)
        if stop.requested:  # the signal came during the last step: finished, but stop as asked
            raise stop.stop()
        method.eval()
        return TrainResult(step, seconds, log[-1]["loss"] if log else None, log)
    finally:
        writer.close()  # a write still pending on a raising path: waited for, not reported over it


def _writes_in_background(tcfg: DictConfig, device: torch.device) -> bool:
    """``train.async_checkpoint``: ``auto`` writes resume states in the background with CUDA
    (where the state is large and the device would otherwise idle for the write), not on a
    CPU (where the copy costs as much memory as the write saves time)."""
    value = tcfg.get("async_checkpoint", "auto")
    return device.type == "cuda" if value == "auto" else bool(value)


#: how the (last segment of the) training stepped: written beside train_log.csv, copied into run.json
STEP_FILE = "train_step.json"


def _step_kind(train_step: TrainStep, accelerator) -> dict[str, Any]:
    """``{"device", "processes", "cuda_graph", "cuda_graph_fell_back"}`` of a finished training."""
    return {"device": accelerator.device.type, "processes": accelerator.num_processes,
            "cuda_graph": bool(getattr(train_step, "graphed", False)),
            "cuda_graph_fell_back": getattr(train_step, "fell_back", None)}


def _gather_rng_states(accelerator) -> list[dict[str, Any]] | None:
    """Every process's RNG states, in process order (None for a single process)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object

    return gather_object([rng_state()])


def _any_process(accelerator, flag: bool) -> bool:
    """``flag`` of any process (one stop request stops every process at the same step)."""
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def _mean_over_processes(accelerator, loss: torch.Tensor) -> float:
    """The step's loss over all processes' shares (a host sync: only at log steps)."""
    if accelerator.num_processes == 1:
        return float(loss)
    return float(accelerator.reduce(loss.detach().reshape(1).float(), "mean").item())


def _write_log(path: Path, log: list[dict[str, Any]]) -> None:
    lines = ["step,loss,lr,elapsed_s"] + [f"{r['step']},{r['loss']:.6g},{r['lr']:.6g},{r['elapsed_s']}" for r in log]
    atomic_write(path, "\n".join(lines) + "\n")
