"""SD-1.5 / SD-2.1 U-Nets (architecture-identical, PROTOCOL.md §8) and a tiny CPU variant,
loaded from any layout, and Marigold-style input-conv widening."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fsmis_bench.errors import ConfigError
from ._sd_single_file import load_diffusers_model
from ._sd_weights import (
    HUB_IDS,
    _hub_hint,
    _mark,
    expected_layout,
    load_folder,
    locate,
)


# ---------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------
#: parameter counts with 4 input channels (PROTOCOL.md §8), checked by the tests.
UNET_PARAMS = {"sd15": 859_520_964, "sd21": 865_910_724}


def unet_config(kind: str, cross_attention_dim: int | None = None) -> dict[str, Any]:
    """``UNet2DConditionModel`` config of a U-Net kind (``sd15``, ``sd21``, ``tiny``)."""
    down = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    common = dict(
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        center_input_sample=False,
        downsample_padding=1,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
    )
    # Both SD versions share the block layout (PROTOCOL.md §8); they differ in attention.
    sd_layout = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, norm_num_groups=32)
    if kind == "sd15":
        cfg = dict(
            common,
            **sd_layout,
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            use_linear_projection=False,
            upcast_attention=False,
        )
    elif kind == "sd21":
        cfg = dict(
            common,
            **sd_layout,
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
            upcast_attention=True,
        )
    elif kind == "tiny":
        # Same block types and nesting as SD (every transformer hook the methods patch
        # exists), ~2 M parameters so a training step takes well under a second on a CPU.
        cfg = dict(
            common,
            sample_size=32,
            block_out_channels=[32, 64, 64, 64],
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=64,
            attention_head_dim=4,
            use_linear_projection=False,
            upcast_attention=False,
        )
    else:
        raise ConfigError(f"unknown U-Net kind {kind!r}", hint="backbone.unet must be one of: sd15, sd21, tiny")
    if cross_attention_dim is not None:
        if kind != "tiny" and int(cross_attention_dim) != cfg["cross_attention_dim"]:
            raise ConfigError(
                f"backbone {kind} has cross_attention_dim {cfg['cross_attention_dim']}, not {cross_attention_dim}",
                hint=f"remove the backbone.cross_attention_dim override or set it to {cfg['cross_attention_dim']}",
            )
        cfg["cross_attention_dim"] = int(cross_attention_dim)
    return cfg


def build_unet(
    kind: str,
    *,
    pretrained: bool,
    source: str | None,
    weights_root: str | None,
    cross_attention_dim: int | None = None,
    prediction_type: str | None = None,
) -> nn.Module:
    """Build a ``diffusers.UNet2DConditionModel`` with 4 input channels, trainable (requires_grad).

    Args:
        kind: ``sd15`` / ``sd21`` (architecture-identical to the released models, PROTOCOL.md
            §8) or ``tiny`` (~2 M params, same block types, no pretrained weights exist).
        pretrained: load ``source``; False (and always for ``tiny``) gives random weights and
            ``random_weights=True``. Random weights follow the caller's torch seed.
        source: a diffusers pipeline dir (``unet/`` subfolder) or the U-Net dir itself, a
            single-file checkpoint (``.safetensors``/``.ckpt``), or a hub id (local cache only
            when offline). Relative paths are looked up under ``weights_root`` first.
        weights_root: root of local weights.
        cross_attention_dim: ``d_text``; must match sd15/sd21, free for ``tiny``.
        prediction_type: what the backbone config says the U-Net predicts (``epsilon`` /
            ``v_prediction``); a diffusers folder whose ``scheduler/`` says otherwise is refused.

    Building under ``with torch.device("meta"):`` gives a weightless model (parameter counts).
    """
    from diffusers import UNet2DConditionModel

    cfg = unet_config(kind, cross_attention_dim)
    if not pretrained or kind == "tiny":
        return _mark(UNet2DConditionModel(**cfg), True)
    what = f"Stable Diffusion U-Net ({kind})"
    located = locate(what, source, weights_root, hub_id=_hub_hint(source, kind), subfolder="unet", library="diffusers",
                     prediction_type=prediction_type)
    if located.kind == "file":
        unet, record = load_diffusers_model(UNet2DConditionModel, located, "unet", cfg, what)
    else:
        unet, record = load_folder(UNet2DConditionModel, what, located, "diffusers", expected_layout(what, "unet", "diffusers", True))
    _check_structure(unet.config, cfg, kind, located.path)
    unet = unet.float()
    unet.requires_grad_(True)
    unet.train()
    return _mark(unet, False, record)


#: config entries that decide a U-Net's parameters and attention layout.
STRUCTURE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                  "up_block_types", "cross_attention_dim", "attention_head_dim", "use_linear_projection")


def _check_structure(loaded: Any, expected: dict[str, Any], kind: str, where: Any) -> None:
    def norm(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    wrong = [f"{k} {norm(loaded.get(k))!r} (expected {norm(expected[k])!r})"
             for k in STRUCTURE_KEYS if k in expected and norm(loaded.get(k)) != norm(expected[k])]
    if wrong:
        raise ConfigError(
            f"the weights at {where} are not a {kind} U-Net: {'; '.join(wrong)}",
            hint=f"point backbone.source at {HUB_IDS[kind]} weights, or pick the backbone that matches them",
        )


class Float32Conv2d(nn.Conv2d):
    """A convolution that computes in float32 even inside ``torch.autocast``.

    Used for the U-Net's output layer: under bf16/fp16 autocast its output would otherwise
    be rounded to 8 (or 11) mantissa bits before any later float32 cast, and the DDIM t = 999
    read-out of an epsilon-prediction U-Net multiplies that rounding by ~14.6.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))  # the weights' float32 (or float64)


def float32_output_layer(unet: nn.Module) -> None:
    """Make ``unet.conv_out`` a :class:`Float32Conv2d` sharing its parameters (same state-dict
    keys, so pretrained weights and checkpoints load unchanged)."""
    conv = unet.conv_out
    if isinstance(conv, Float32Conv2d):
        return
    new = Float32Conv2d(
        conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        padding_mode=conv.padding_mode, device="meta",
    )
    new.weight = conv.weight
    new.bias = conv.bias
    unet.conv_out = new


def expand_conv_in(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Widen an input conv Marigold-style: the weights repeated over the new input channels
    and scaled by ``old / new``, bias copied.

    With ``in_channels = k * conv.in_channels``, feeding ``x`` repeated ``k`` times along the
    channel axis gives exactly ``conv(x)``.

    Args:
        conv: the pretrained ``conv_in`` (``C_in -> C_out``); left untouched.
        in_channels: new input channels, a multiple of ``conv.in_channels``.
    Returns:
        a new ``nn.Conv2d(in_channels, C_out, ...)`` on the same device/dtype.
    """
    old = conv.in_channels
    if conv.groups != 1:
        raise ValueError("expand_conv_in supports groups=1 convolutions only")
    if in_channels % old:
        raise ValueError(f"in_channels={in_channels} is not a multiple of {old}")
    repeats = in_channels // old
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight.detach().repeat(1, repeats, 1, 1) * (old / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach())
    return new


def count_parameters(module: nn.Module, *, trainable: bool | None = None) -> int:
    """Number of parameters (all, or only those with ``requires_grad == trainable``)."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)
