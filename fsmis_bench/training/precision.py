"""Numeric precision of a run: resolved to concrete values before anything is computed.

Two config keys decide it: ``mixed_precision`` (``auto | no | bf16 | fp16``, accelerate's
names) and ``tf32`` (``auto | true | false``: TensorFloat-32 for fp32 matmuls and
convolutions on CUDA). ``auto`` depends on the device, which is not part of a run's
identity, so :func:`resolve_precision` replaces both by what will actually run; the concrete
values are then part of the run's hash and record.

The defaults (``auto``):

* CUDA: fp32 weights and activations with TF32 matmuls/convolutions — the released SD-FSMIS
  code's setting (``--mixed_precision no --allow_tf32``) and the fastest one measured for the
  diffusion methods on an H100 (bf16 autocast was slower than fp32; README "Measured
  figures", ``benchmarks/gpu_precision_check.py``). The classic methods' reference code
  trains in fp32 as well.
* CPU: fp32, TF32 off (it does not exist there).

``auto`` is resolved, and ``tf32=true`` off CUDA becomes ``false``: TF32 does not exist
there, and a record saying ``fp32+tf32`` for a CPU run would claim a precision that never
ran (``fidelity=code`` sets it, as the released code's ``--allow_tf32`` does). Likewise
``mixed_precision=fp16`` off CUDA becomes ``no``: a CPU has no fp16 autocast, accelerate runs
such a step in fp32 (the same losses, bit for bit), and the record and hash say so.
Resolving is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ..errors import ConfigError

MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """A concrete precision.

    Attributes:
        mixed_precision: ``no`` (fp32), ``bf16`` or ``fp16`` autocast (fp32 master weights).
        tf32: TF32 for the fp32 matmuls and convolutions (CUDA only).
    """

    mixed_precision: str
    tf32: bool

    @property
    def label(self) -> str:
        """``fp32``, ``fp32+tf32``, ``bf16``, ``bf16+tf32``, ...: for logs and tables."""
        base = "fp32" if self.mixed_precision == "no" else self.mixed_precision
        return base + ("+tf32" if self.tf32 else "")

    def as_record(self) -> dict:
        return {"mixed_precision": self.mixed_precision, "tf32": self.tf32, "label": self.label}


def selects_cuda(device: str) -> bool:
    """Whether the config value ``device`` means CUDA: ``cuda`` counts even where no GPU is
    visible (unlike :func:`uses_cuda`), so that run's configuration is still defined."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def uses_cuda(device: str) -> bool:
    """Whether ``device`` (``auto | cpu | cuda``) runs on CUDA in this process."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for, but no CUDA device is visible", hint="use device=cpu")
    return selects_cuda(device)


def resolve_precision(device: str, mixed_precision: str, tf32: bool | str) -> Precision:
    """The concrete precision for the given config values on this machine (``device=cuda``
    counts as CUDA even where none is visible: that run's precision is still defined)."""
    cuda = selects_cuda(device)
    mixed = "no" if mixed_precision == "auto" else str(mixed_precision)
    if mixed not in MIXED_PRECISION:
        raise ConfigError(f"mixed_precision={mixed_precision!r} is not allowed", hint="use auto, no, bf16 or fp16")
    if tf32 not in ("auto", True, False):
        raise ConfigError(f"tf32={tf32!r} is not allowed", hint="use auto, true or false")
    if mixed == "fp16" and not cuda:
        mixed = "no"  # what runs: no fp16 autocast on a CPU (the module docstring)
    return Precision(mixed, cuda if tf32 == "auto" else bool(tf32) and cuda)


def precision_of(cfg: DictConfig) -> Precision:
    """:func:`resolve_precision` for a run config (missing keys count as ``auto``)."""
    return resolve_precision(str(cfg.get("device", "auto")), str(cfg.get("mixed_precision", "auto")), cfg.get("tf32", "auto"))


def fused_clip_applies(value: Any, *, optimizer: str, fused: bool, weight_dtype: str, mixed_precision: str) -> bool:
    """``train.fused_clip`` as it runs: ``true`` or ``false`` as given; ``auto`` on where the
    optimiser is the fused AdamW on fp32 weights (its step takes the ``grad_scale`` the
    clipping uses) and no fp16 gradient scaler owns that input, so on with CUDA by default
    (SD-1.5 recorded step 1.02x faster on an H100) and off on a CPU, where AdamW is not fused."""
    if value != "auto":
        return bool(value)
    return optimizer == "adamw" and bool(fused) and weight_dtype == "float32" and mixed_precision != "fp16"


def with_resolved_precision(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` whose ``mixed_precision``, ``tf32``, ``train.fused_optimizer``,
    ``method.joint_pass``, ``method.batched_encode`` and ``train.fused_clip`` are concrete
    (idempotent). Each ``auto`` among the switches is on with CUDA, where it was measured
    faster, and off on a CPU, so a CPU run hashes as before (``train.fused_clip``: where
    AdamW is fused, :func:`fused_clip_applies`)."""
    precision = precision_of(cfg)
    cuda = selects_cuda(str(cfg.get("device", "auto")))
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(resolved):
        resolved.mixed_precision = precision.mixed_precision
        resolved.tf32 = precision.tf32
        for group, key in (("train", "fused_optimizer"), ("method", "joint_pass"), ("method", "batched_encode")):
            node = resolved.get(group)
            if isinstance(node, DictConfig) and node.get(key) == "auto":
                node[key] = cuda
        train = resolved.get("train")
        if isinstance(train, DictConfig) and train.get("fused_clip") == "auto":
            train.fused_clip = fused_clip_applies(
                "auto", optimizer=str(train.get("optimizer", "adamw")), fused=train.get("fused_optimizer") is True,
                weight_dtype=str(train.get("weight_dtype", "float32")), mixed_precision=precision.mixed_precision)
    return resolved


def apply_tf32(enabled: bool) -> None:
    """Switch TF32 for fp32 CUDA matmuls and cuDNN convolutions (process-wide, as torch has it)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def apply_cudnn_benchmark(enabled: bool) -> None:
    """``train.cudnn_benchmark``: whether cuDNN times its convolution algorithms for every new
    input shape and keeps the fastest, instead of choosing by heuristics (process-wide, as
    torch has it). The shapes of a run are static, so it times each once, in the first
    (eager) steps, before a CUDA graph is recorded. Other algorithms round differently."""
    torch.backends.cudnn.benchmark = enabled
