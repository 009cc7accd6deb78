"""Frozen image encoders for VTCT: DINOv2-small (paper), DINOv2-base (code), a tiny ViT."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsmis_bench.errors import ConfigError
from ._sd_weights import (
    HUB_IDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _freeze,
    _hub_hint,
    _mark,
    expected_layout,
    load_folder,
    locate,
)


# ---------------------------------------------------------------------------------------
# image encoder (VTCT)
# ---------------------------------------------------------------------------------------
def dinov2_config(kind: str) -> dict[str, Any]:
    """``transformers.Dinov2Config`` arguments of an encoder kind (PROTOCOL.md §8)."""
    common = dict(patch_size=14, image_size=518, mlp_ratio=4, num_hidden_layers=12, layerscale_value=1.0, hidden_act="gelu", layer_norm_eps=1e-6)
    if kind == "dinov2_small":
        return dict(common, hidden_size=384, num_attention_heads=6)
    if kind == "dinov2_base":
        return dict(common, hidden_size=768, num_attention_heads=12)
    if kind == "tiny":
        return dict(patch_size=8, image_size=64, mlp_ratio=2, num_hidden_layers=2, hidden_size=32, num_attention_heads=2, layerscale_value=1.0, hidden_act="gelu", layer_norm_eps=1e-6)
    raise ConfigError(f"unknown image encoder {kind!r}", hint="backbone.image_encoder must be one of: dinov2_small, dinov2_base, tiny (or null)")


#: input resolution of each encoder kind (224 px -> a 16 x 16 patch grid for DINOv2).
ENCODER_INPUT_SIZE = {"dinov2_small": 224, "dinov2_base": 224, "tiny": 64}
#: ``resize``: the whole image resized to the input size; ``resize_crop``: what the DINOv2
#: processor of the released SD-FSMIS code does, the shorter side resized to 256/224 of the
#: input size (bicubic), then the centre input-size square cropped.
VTCT_PREPROCESSING = ("resize", "resize_crop")


class ImageTokenEncoder(nn.Module):
    """Frozen ViT patch-token encoder.

    ``forward(images (B, 3, H, W) in [-1, 1]) -> (B, gh * gw, dim)`` patch tokens (CLS
    dropped), after resizing to ``input_size`` (``preprocess="resize"``; with
    ``"resize_crop"`` the shorter side to ``input_size * 256 / 224`` and the centre square
    cropped, so the tokens cover the middle of the image only) and ImageNet normalisation.
    Runs without autograd and stays in eval mode.

    Attributes:
        name: encoder kind.
        dim: token width ``d``.
        grid: patch grid ``(gh, gw)``.
        input_size: side of the square input.
        random_weights: True when an encoder that should be pretrained has random weights.
    """

    def __init__(self, name: str, model: nn.Module, input_size: int, *, random_weights: bool,
                 preprocess: str = "resize") -> None:
        super().__init__()
        if preprocess not in VTCT_PREPROCESSING:
            raise ConfigError(f"unknown image encoder preprocessing {preprocess!r}",
                              hint=f"use one of {', '.join(VTCT_PREPROCESSING)}")
        self.preprocess = preprocess
        self.name = name
        self.model = _freeze(model)
        self.input_size = int(input_size)
        patch = int(model.config.patch_size)
        self.dim = int(model.config.hidden_size)
        self.grid = (self.input_size // patch, self.input_size // patch)
        self.random_weights = bool(random_weights)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ImageTokenEncoder":
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image encoder expects (B, 3, H, W), got {tuple(images.shape)}")
        with torch.no_grad():
            x = (images.float() + 1.0) / 2.0
            if self.preprocess == "resize_crop":
                x = self._resize_and_crop(x)
            elif x.shape[-2:] != (self.input_size, self.input_size):
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
            x = (x - self.mean) / self.std
            hidden = self.model(pixel_values=x).last_hidden_state
            return hidden[:, 1:]  # DINOv2 small/base have no register tokens

    def _resize_and_crop(self, x: Tensor) -> Tensor:
        """The DINOv2 processor's geometry (``BitImageProcessor``: shortest edge 256, bicubic,
        centre crop 224), scaled to ``input_size``: ``(B, 3, H, W)`` -> ``(B, 3, s, s)``."""
        shortest = round(self.input_size * 256 / 224)
        height, width = x.shape[-2:]
        scale = shortest / min(height, width)
        size = (max(shortest, round(height * scale)), max(shortest, round(width * scale)))
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.input_size) // 2, (size[1] - self.input_size) // 2
        return x[..., top:top + self.input_size, left:left + self.input_size]

    def extra_repr(self) -> str:
        return (f"name={self.name}, dim={self.dim}, grid={self.grid}, input_size={self.input_size}, "
                f"preprocess={self.preprocess}, random_weights={self.random_weights}")


def build_image_encoder(kind: str, *, pretrained: bool, source: str | None, weights_root: str | None,
                        preprocess: str = "resize") -> ImageTokenEncoder:
    """Build the frozen VTCT image encoder.

    Args:
        kind: ``dinov2_small`` (paper, d = 384, 22,056,576 params), ``dinov2_base`` (released
            code, d = 768) or ``tiny`` (random 2-layer ViT, d = 32, for CPU tests).
        pretrained: load weights (``tiny`` has none: always random, flagged).
        source: a local ``transformers`` model folder (``save_pretrained``) or a hub id
            (default: the facebook/ id; local folder ``weights_root/<id>`` first, then the hub
            cache); relative paths under ``weights_root`` first.
        weights_root: root of local weights.
        preprocess: ``resize`` or ``resize_crop`` (:data:`VTCT_PREPROCESSING`).
    """
    from transformers import Dinov2Config, Dinov2Model

    cfg = dinov2_config(kind)
    size = ENCODER_INPUT_SIZE[kind]
    if not pretrained or kind == "tiny":
        return ImageTokenEncoder(kind, Dinov2Model(Dinov2Config(**cfg)), size, random_weights=True, preprocess=preprocess)
    source = source or HUB_IDS[kind]
    what = f"DINOv2 ({kind})"
    located = locate(what, source, weights_root, hub_id=_hub_hint(source, kind), subfolder=None, library="transformers", single_file=False)
    model, record = load_folder(Dinov2Model, what, located, "transformers", expected_layout(what, None, "transformers", False))
    if int(model.config.hidden_size) != cfg["hidden_size"] or int(model.config.num_hidden_layers) != cfg["num_hidden_layers"]:
        raise ConfigError(
            f"the weights at {located.path} are {model.config.hidden_size} wide with {model.config.num_hidden_layers} layers, "
            f"not {kind} ({cfg['hidden_size']} wide, {cfg['num_hidden_layers']} layers)",
            hint=f"point backbone.image_encoder_source at {HUB_IDS[kind]} weights",
        )
    return _mark(ImageTokenEncoder(kind, model.float(), size, random_weights=False, preprocess=preprocess), False, record)
