"""Operations per training step, counted on the CPU: how many device kernels one step of the
engine launches, by phase, without a GPU.

A recorded CUDA-graph step runs at the sum of its kernels' times, and on an H100 a small
kernel costs a few microseconds however little it computes (``docs/measurements/``: the
tiny backbone's 2 M-parameter step took 22.6 ms). So the count of kernel-launching
operations is what a change to a method's step can be judged by before a GPU measures it.
Each ATen operation dispatched during one step (after one warm-up step) is counted once,
under its phase:

* ``no_grad``: outside autograd (the frozen VAE and image encoder, data preparation);
* ``forward``: recorded for autograd;
* ``backward``: run by autograd's engine;
* ``optimizer``: inside ``optimizer.step`` (fused AdamW on CUDA is a handful of kernels; on
  the CPU the default is the per-parameter loop, hence ``train.fused_optimizer=true`` below).

Views and shape-only operations (``view``, ``t``, ``transpose``, ``detach``, ...) launch no
kernel and are counted apart (``views``). The count is the dispatcher's, not the GPU's: one
CPU operation can be one or a few CUDA kernels, and cuDNN/cuBLAS may add layout kernels.
Compare counts with each other, not with a profiler's kernel list.

    python benchmarks/step_op_count.py method=sdfsmis backbone=tiny train.fused_optimizer=true
    python benchmarks/step_op_count.py method=sdfsmis backbone=tiny train.fused_optimizer=true method.joint_pass=true

Prints one JSON line: the overrides, ``kernel_ops`` (the total without views), ``by_phase``
and the most frequent operations.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.optim.optimizer as optimizer_hooks
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_engine_check import _accelerator, _build, _config, engine_path  # noqa: E402

#: operations that are not views but launch no kernel (metadata, allocation)
NO_KERNEL = frozenset({"_unsafe_view", "promote_types", "result_type", "empty", "empty_like", "empty_strided",
                       "new_empty", "new_empty_strided", "lift_fresh", "sym_size", "sym_stride", "sym_numel"})


class StepOpCounter(TorchDispatchMode):
    """Counts dispatched ATen operations by phase (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.in_optimizer = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.is_view or name in NO_KERNEL:
            phase = "views"
        elif self.in_optimizer:
            phase = "optimizer"
        elif torch._C._current_autograd_node() is not None:
            phase = "backward"
        elif torch.is_grad_enabled():
            phase = "forward"
        else:
            phase = "no_grad"
        self.counts[(phase, name)] += 1
        return func(*args, **(kwargs or {}))

    def summary(self, top: int = 25) -> dict[str, Any]:
        by_phase: collections.Counter[str] = collections.Counter()
        by_op: collections.Counter[str] = collections.Counter()
        for (phase, name), n in self.counts.items():
            by_phase[phase] += n
            if phase != "views":
                by_op[f"{phase}:{name}"] += n
        kernel_ops = sum(n for phase, n in by_phase.items() if phase != "views")
        return {"kernel_ops": kernel_ops, "by_phase": dict(sorted(by_phase.items())),
                "top": dict(by_op.most_common(top))}


def count_step(overrides: list[str]) -> dict[str, Any]:
    """Build the method of ``overrides`` on the CPU, run one engine step, count the next one."""
    device = torch.device("cpu")
    overrides = ["pretrained=false", "device=cpu", "train.num_workers=0", *overrides]
    cfg = _config(overrides)
    _, step, next_batches = engine_path(_build(overrides, device), cfg, _accelerator(device, "no"), steps=2, workers=0)
    step(next_batches())  # warm-up: lazy state (optimiser moments)
    counter = StepOpCounter()

    def enter(*_):
        counter.in_optimizer = True

    def leave(*_):
        counter.in_optimizer = False

    hooks = [optimizer_hooks.register_optimizer_step_pre_hook(enter),
             optimizer_hooks.register_optimizer_step_post_hook(leave)]
    batch = next_batches()
    try:
        with counter:
            step(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return {"check": "step_op_count", "overrides": overrides, "torch": torch.__version__, **counter.summary()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="fsmis-bench config overrides (method=..., backbone=..., ...)")
    args = parser.parse_args(argv)
    print(json.dumps(count_step(args.overrides)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
