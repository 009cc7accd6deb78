"""SD-1.5 / SD-2.1 U-Nets (architecture-identical, PROTOCOL.md §8) and a tiny CPU variant,
Marigold-style input-conv widening, and the empty-prompt text embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fsmis_bench.errors import ConfigError
from ._sd_weights import (  # noqa: F401
    UNET_DEFAULT_CROSS_DIM,
    BackboneSources,
    HUB_IDS,
    SD_VAE_SCALING,
    TEXT_TOKENS,
    _from_pretrained,
    _hub_hint,
    _mark,
    _missing_weights,
    _single_file,
    backbone_sources,
    hub_offline,
    resolve_source,
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

    Building under ``with torch.device("meta"):`` gives a weightless model (parameter counts).
    """
    from diffusers import UNet2DConditionModel

    cfg = unet_config(kind, cross_attention_dim)
    if not pretrained or kind == "tiny":
        return _mark(UNet2DConditionModel(**cfg), True)
    resolved = resolve_source(source, weights_root)
    what = f"Stable Diffusion U-Net ({kind})"
    if resolved.kind == "file":
        unet = _single_file(UNet2DConditionModel, resolved.location, cfg, what)
    else:
        unet = _from_pretrained(UNet2DConditionModel, what, source, weights_root, _hub_hint(source, kind), subfolder="unet")
    unet = unet.float()
    unet.requires_grad_(True)
    unet.train()
    loaded_dim = int(unet.config.cross_attention_dim)
    if loaded_dim != cfg["cross_attention_dim"] or list(unet.config.block_out_channels) != cfg["block_out_channels"]:
        raise ConfigError(
            f"weights at {source!r} are not a {kind} U-Net (cross_attention_dim {loaded_dim})",
            hint=f"point backbone.source at {HUB_IDS[kind]} weights, or pick the backbone that matches them",
        )
    return _mark(unet, False)


class Float32Conv2d(nn.Conv2d):
    """A convolution that computes in float32 even inside ``torch.autocast``.

    Used for the U-Net's output layer: under bf16/fp16 autocast its output would otherwise
    be rounded to 8 (or 11) mantissa bits before any later float32 cast, and the DDIM t = 999
    read-out of an epsilon-prediction U-Net multiplies that rounding by ~14.6.
    """

    def forward(self, x: Tensor) -> Tensor:
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


# ---------------------------------------------------------------------------------------
# text embedding (DiffewS)
# ---------------------------------------------------------------------------------------
def load_text_embedding(
    unet_kind: str,
    *,
    pretrained: bool,
    source: str | None,
    weights_root: str | None,
    cross_attention_dim: int,
    prompt: str = "",
) -> Tensor:
    """The CLIP text embedding of ``prompt`` (default: the empty prompt, DiffewS' null text).

    With ``pretrained=True`` and an sd15/sd21 backbone, loads the backbone's ``tokenizer/``
    and ``text_encoder/`` (transformers ``CLIPTokenizer`` / ``CLIPTextModel``), pads the prompt
    to 77 tokens and returns ``last_hidden_state``. For ``pretrained=False`` or the ``tiny``
    backbone no text encoder exists, and the embedding is a fixed **zero** tensor: a constant
    conditioning that the trained U-Net learns around, as the real null-text embedding is.

    Returns:
        ``(1, 77, cross_attention_dim)`` float32 on the CPU (register it as a buffer).
    """
    if not pretrained or unet_kind == "tiny":
        return torch.zeros(1, TEXT_TOKENS, int(cross_attention_dim))
    from transformers import CLIPTextModel, CLIPTokenizer

    resolved = resolve_source(source, weights_root)
    if resolved.kind == "file":
        raise ConfigError(
            f"the text encoder cannot be read from the single file {source!r}",
            hint="point backbone.source at a diffusers pipeline folder (with text_encoder/ and tokenizer/)",
        )
    hub = _hub_hint(source, unet_kind)
    if resolved.kind == "dir" and not (Path(resolved.location) / "tokenizer").is_dir():
        raise _missing_weights("CLIP text encoder", source, weights_root, hub, resolved.tried, detail=f"{resolved.location} has no tokenizer/ subfolder")
    tokenizer = _from_pretrained(CLIPTokenizer, "CLIP tokenizer", source, weights_root, hub, subfolder="tokenizer")
    encoder = _from_pretrained(CLIPTextModel, "CLIP text encoder", source, weights_root, hub, subfolder="text_encoder")
    ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embedding = encoder.float().eval()(ids).last_hidden_state
    if embedding.shape[-1] != int(cross_attention_dim):
        raise ConfigError(
            f"text encoder width {embedding.shape[-1]} does not match cross_attention_dim {cross_attention_dim}",
            hint="the U-Net and text encoder must come from the same backbone",
        )
    return embedding.detach().cpu()


def count_parameters(module: nn.Module, *, trainable: bool | None = None) -> int:
    """Number of parameters (all, or only those with ``requires_grad == trainable``)."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


