"""The engine's optimisers: AdamW (``fused`` kernel or not), 8-bit AdamW, and AdamW over fp32
master copies of bf16 weights. Chosen by ``train.optimizer``, ``train.fused_optimizer`` and
``train.weight_dtype``; every choice is measured by ``benchmarks/gpu_engine_check.py``.

* ``adamw``: ``torch.optim.AdamW``. ``fused=True`` updates every parameter of a group in
  one kernel (CUDA and CPU); ``false`` uses the multi-tensor (``foreach``) path; ``auto`` (the
  default) is fused where the parameters are on CUDA. Both compute
  the same update up to rounding.
* ``sgd``: momentum SGD (``train.momentum``), the classic methods' optimiser.
* ``adamw8bit``: bitsandbytes' ``AdamW8bit``, the two moments stored block-wise quantised
  in 8 bits (2 bytes per parameter instead of 8), on CUDA and CPU: the memory preset
  (``memory=low``).
* ``weight_dtype=bfloat16``: the model holds bf16 weights (half the weight traffic, no
  autocast casts), :class:`MasterWeightAdamW` keeps fp32 master copies and the AdamW state.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW over fp32 master copies of low-precision model parameters.

    ``step`` copies the model's gradients into the masters (upcast), updates the masters and
    writes them back into the model (rounded to its dtype). The masters travel in the
    ``state_dict`` (``"master_params"``), so a resumed run continues from the fp32 values.

    Args:
        groups: parameter groups of the model (bf16 parameters).
        **kwargs: ``torch.optim.AdamW`` options.
    """

    def __init__(self, groups: list[dict[str, Any]], **kwargs: Any) -> None:
        model_params, master_groups = [], []
        for group in groups:
            masters = []
            for param in group["params"]:
                model_params.append(param)
                masters.append(param.detach().float().clone().requires_grad_(True))
            master_groups.append({**group, "params": masters})
        super().__init__(master_groups, **kwargs)
        self.model_params = model_params
        self.master_params = [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for model, master in zip(self.model_params, self.master_params):
            master.grad = None if model.grad is None else model.grad.float()
        loss = super().step(closure)
        torch._foreach_copy_(self.model_params, self.master_params)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model_params:
            param.grad = None
        super().zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["master_params"] = [p.detach().cpu().clone() for p in self.master_params]
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("master_params")
        super().load_state_dict(state_dict)
        for master, saved, model in zip(self.master_params, masters, self.model_params):
            master.copy_(saved)
            model.copy_(saved)


def build_optimizer(
    groups: list[dict[str, Any]],
    *,
    name: str = "adamw",
    weight_decay: float = 0.01,
    fused: bool | str = False,
    weight_dtype: str = "float32",
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """The optimiser for a method's parameter groups (``[{"params", "lr", ...}]``).

    ``sgd`` (the classic FSMIS methods; ``momentum``): weight decay as L2, as in torch;
    AdamW's is decoupled."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer={name!r} is unknown", hint=f"use one of {', '.join(OPTIMIZERS)}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"train.weight_dtype={weight_dtype!r} is unknown", hint="use float32 or bfloat16")
    groups = [g for g in groups if g["params"]]
    if fused == "auto":  # the fused kernel where it was measured faster: CUDA
        fused = any(p.is_cuda for g in groups for p in g["params"])
    if weight_dtype != "float32":
        if name != "adamw":
            raise ConfigError(
                f"train.weight_dtype={weight_dtype} keeps fp32 master weights for AdamW only",
                hint="use train.optimizer=adamw with it, or weight_dtype=float32 with adamw8bit",
            )
        return MasterWeightAdamW(groups, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError(
                "train.optimizer=adamw8bit (memory=low) needs bitsandbytes",
                hint='pip install "fsmis-bench[lowmem]" (bitsandbytes uses the installed torch)',
            ) from None

        # moments of tensors under 4096 elements stay 32-bit (bitsandbytes' default)
        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=fused or None)
