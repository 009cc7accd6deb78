"""``train.compile_scope=norms``: every GroupNorm of a method runs one compiled function.

Why GroupNorm: in the SD-1.5 step with ``train.channels_last`` on an H100 (torch 2.11,
``gpu_engine_nhwc_h100.json``; TF32, two passes) PyTorch's GroupNorm still ran its NCHW
moments kernel, 6.4 ms per step, beside 11 ms of strided elementwise copies, of 88 ms of
kernel time: CUDA's GroupNorm on torch 2.11 returns NCHW for an NHWC input
(``group_norm_keeps_channels_last: false`` in ``gpu_step_switches_h100.json``). The compiled
kernels read the NHWC activations where they lie and write NHWC for the next convolution,
forward and backward: the recorded bf16 + NHWC joint step went 0.0630 -> 0.0577 s on an H100
(``gpu_norms_h100.json``; 4 graphs, 22 s of compilation), and is part of ``speed=fast``. In
TF32 with NCHW activations it gains nothing (``gpu_combined_h100.json``).

Why one function with dynamic shapes: compilation time, which is what kept compiled blocks
(``train.compile_scope=blocks``) out of reach on a lent GPU (over 100 s for SD-1.5). Blocks
compile one graph per block shape; here a graph covers every shape of one dtype, memory
format, grad mode, group count and ``eps``. The tiny SD-FSMIS step on the 2-core
development CPU (``benchmarks/compile_cost.py method=sdfsmis backbone=tiny
train.channels_last=true method.vae_dtype=bfloat16 train.compile=default
train.compile_scope=norms``, then ``=blocks``): 4 graphs and a 24.4 s first step, against 15
graphs and 64.8 s for its blocks; the same first loss as the plain step. On the CPU it is
no faster afterwards (0.324 s per step against 0.288 s plain): the CPU's GroupNorm reads
NHWC already.

The modules keep their parameters, names and state dict; only their class changes (to
:class:`CompiledGroupNorm`, still an ``nn.GroupNorm``), so checkpoints are unaffected.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

def _group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> torch.Tensor:
    """``F.group_norm`` whose output keeps an NHWC input's memory format, whatever the
    device's kernel returns: the next convolution then reads it without a copy."""
    out = F.group_norm(x, num_groups, weight, bias, eps)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class CompiledGroupNorm(nn.GroupNorm):
    """An ``nn.GroupNorm`` whose forward calls the shared compiled function.

    Shapes: ``(B, C, *)`` in and out, as ``nn.GroupNorm``.
    """

    compiled_group_norm: Callable[..., torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Views, not the Parameters: dynamo keeps a Parameter's shape static, which would
        # compile one graph per channel count. A view costs no kernel; gradients flow through it.
        weight = None if self.weight is None else self.weight.view(-1)
        bias = None if self.bias is None else self.bias.view(-1)
        return self.compiled_group_norm(x, self.num_groups, weight, bias, self.eps)


def group_norms(module: nn.Module) -> list[nn.GroupNorm]:
    """Every ``nn.GroupNorm`` inside ``module``, in module order."""
    return [m for m in module.modules() if isinstance(m, nn.GroupNorm)]


def compile_group_norms(module: nn.Module, mode: str, backend: str) -> list[nn.GroupNorm]:
    """Switch every GroupNorm of ``module`` to one ``torch.compile``-d function (in place).

    A subclass with a forward of its own (a plugin's) is left as it is: the compiled
    function computes ``nn.GroupNorm``'s, not its.

    Returns:
        the switched modules (empty when ``module`` has no GroupNorm: nothing changes).
    """
    norms = [m for m in group_norms(module) if type(m).forward is nn.GroupNorm.forward]
    if not norms:
        return []
    compiled = torch.compile(_group_norm, mode=mode, backend=backend, dynamic=True)
    for norm in norms:
        norm.plain_class = type(norm)
        norm.__class__ = CompiledGroupNorm
        norm.compiled_group_norm = compiled
    return norms


def restore_group_norms(norms: list[nn.Module]) -> list[nn.GroupNorm]:
    """Undo :func:`compile_group_norms` for ``norms``: each is of its own class again.

    Returns:
        the modules switched back (those of ``norms`` that were switched).
    """
    restored = [m for m in norms if isinstance(m, CompiledGroupNorm)]
    for norm in restored:
        norm.__class__ = norm.__dict__.pop("plain_class", nn.GroupNorm)
        del norm.compiled_group_norm
    return restored
