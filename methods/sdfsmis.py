"""SD-FSMIS: Stable Diffusion adapted for few-shot medical image segmentation.

Li et al., "SD-FSMIS: Adapting Stable Diffusion for Few-Shot Medical Image Segmentation"
(arXiv 2604.03134); PROTOCOL.md §6 lists the paper text and where the released code differs.

The idea, in the order a forward pass runs:

1. **Latents.** A frozen VAE encodes the grey images and the masks (replicated to 3
   channels, in [-1, 1]) to 4-channel latents.
2. **Support pass.** The support image latent ++ support mask latent (8 channels) enters
   the U-Net through its own ``support_conv_in`` (Marigold-initialised from the pretrained
   ``conv_in``). The pass leaves, in an :class:`AttentionBank`, what the query will look at.
3. **Support-Query Interaction (SII)**, ``method.sii``:
   ``cross_attention`` (paper) — an added cross-attention in every transformer block from
   the query's tokens to the support's tokens of that block; ``kv_concat`` (code) — the
   query's self-attention attends over its own and the support's keys/values. Machinery in
   ``_sd_attention.py``.
4. **Query Enhancement (QE)** (variants with QE): a support foreground prototype (masked
   average of the support image latent) finds confident query positions by cosine
   similarity; their mean, the *query prototype*, is broadcast and concatenated to the query
   latent (8 channels into ``query_conv_in``, Marigold-initialised).
5. **Visual-to-Textual Condition Translation (VTCT)** (variants with VTCT): a frozen image
   encoder's patch tokens, masked-averaged under the support mask, go through an MLP to one
   "text" token ``E`` that replaces the prompt embedding as ``encoder_hidden_states``.
   Without VTCT the conditioning is the backbone's empty-prompt embedding.
6. **One-step objective.** The U-Net's output is turned into an estimate of the query-mask
   latent and compared (MSE) with the VAE latent of the true query mask; see
   :meth:`SDFSMIS.mask_latent_estimate` for the paper's DDIM t=999, its well-conditioned
   reading ``direct_t999`` and the code's degenerate t=1.
7. **Mask.** The estimate is VAE-decoded, its 3 channels averaged and thresholded
   (absolute, or relative to the chunk's maximum), optionally keeping the largest connected
   component per slice.

Every paper/code difference is a named ``cfg.method`` option whose ``null`` default follows
``cfg.fidelity``; ``FIDELITY_DEFAULTS`` below is the table. The registered variants
(``sdfsmis``, ``sdfsmis_sii``, ``sdfsmis_qe``, ``sdfsmis_vtct``) are the paper's ablations.

Choices the paper leaves open, made here:

* SII layer: LayerNorm and q/k/v copied from the block's self-attention, output projection
  zero-initialised (the pretrained U-Net's behaviour is exact at step 0); see ``_sd_attention``.
* DDIM t = 999: the clean query latent is ``x_t``; the output becomes ``x0`` by the DDIM
  formula for the backbone's ``prediction_type`` (:meth:`SDFSMIS.mask_latent_estimate`).
  On an epsilon-prediction U-Net (SD-1.5) that formula multiplies output errors by
  1 / sqrt(alpha_bar_999) = 14.6, so the U-Net's output layer and the formula run in float32
  even under autocast. ``objective=direct_t999`` is the well-conditioned reading: timestep
  999, the output read directly as the mask latent (as the code reads it at t = 1).
* Paper QE when no query position passes tau: the top ``k`` positions (the code's fallback).
* Masks resized to the latent grid by area averaging (soft weights); to the VTCT patch grid
  bilinearly and > 0.5 (soft weights if no patch passes).
* Absolute threshold: ``> 0`` on the decoded mean, the midpoint of the mask levels -1 and +1.
  Relative threshold (code): the channel mean, mapped from [-1, 1] to [0, 1], ``> 0.25 x``
  the maximum over the whole chunk (all its slices and channels).
* Latents: the posterior mean (code: a posterior sample in training, ``train_latents``).
* Training runs the support pass, then the query pass. ``method.joint_pass`` (default
  ``auto``: on with CUDA, where it was measured faster) runs them as one U-Net batch: the
  same loss and gradients up to float rounding, with half the U-Net's kernels
  (``_sd_attention``, ``joint``). ``method.batched_encode`` (likewise ``auto``) runs an
  episode's four frozen-VAE encodes as one call.
* Shots: prototypes pool all shots' masked positions; ``E`` is the mean of the shots' ``E``
  (code: the shots' pooled features are averaged before the MLP, ``vtct_shot_pooling``);
  the SII/K-V bank concatenates the shots' tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from scipy import ndimage
from torch import nn

from fsmis_bench import recorded
from fsmis_bench.errors import ConfigError
from fsmis_bench.method import EpisodeBatch, Method
from fsmis_bench.training.precision import selects_cuda

from ._sd_attention import (
    SUPPORT_ATTENTION_FORMS,
    AttentionBank,
    bank_kwargs,
    install_support_attention,
)
from ._sd_components import (
    VTCT_PREPROCESSING,
    backbone_sources,
    build_image_encoder,
    build_unet,
    build_vae,
    expand_conv_in,
    float32_output_layer,
    load_prompt_embedding,
    weight_identity_of,
)

#: paper text vs released code, per option (PROTOCOL.md §6). ``null`` options follow ``cfg.fidelity``.
FIDELITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sii": {"paper": "cross_attention", "code": "kv_concat"},
    "qe_form": {"paper": "cosine", "code": "fg_bg_softmax"},
    "vtct_encoder": {"paper": "dinov2_small", "code": "dinov2_base"},
    "objective": {"paper": "ddim_t999", "code": "degenerate_t1"},
    "threshold": {"paper": "absolute", "code": "relative"},
    "lcc": {"paper": False, "code": True},
    "train_latents": {"paper": "mean", "code": "sample"},
    "vtct_shot_pooling": {"paper": "after_mlp", "code": "before_mlp"},
    # QE's support prototypes: masks area-resized to the latent grid, all shots' positions
    # pooled (paper reading) | bilinear align_corners=True, one prototype per shot, averaged
    # (code, diffews/models/proto.py)
    "qe_support_form": {"paper": "area_pooled", "code": "bilinear_per_shot"},
    # VTCT's image encoder input: the whole slice resized (paper reading: patches and mask
    # line up) | the DINOv2 processor's resize to 256 + centre crop to 224 while the mask
    # stays the whole slice's (code: ~14 % misregistered)
    "vtct_preprocess": {"paper": "resize", "code": "resize_crop"},
    # training augmentation: PROTOCOL.md §5 | the code's Medical.py (one fixed elastic field,
    # gamma on [-1, 1] mapped to [0, 1]; fsmis_bench/training/augment.py)
    "augment_form": {"paper": "standard", "code": "sdfsmis_code"},
    # that form's mask deformation: the image's field (fsmis-bench's earlier reading) | its
    # own, the generator's next draws (code: Medical.py hands one RandomState to both calls)
    "elastic_mask_field": {"paper": "image", "code": "own"},
    # the relative threshold's values: continuous | uint8 (code: the pipeline returns the
    # decoded image as uint8, floor(p * 255), and the test script thresholds those levels)
    "threshold_levels": {"paper": "continuous", "code": "uint8"},
    # VTCT's pooling where the support mask covers no patch grid cell above 0.5 (a small
    # organ): the fraction of each patch the mask covers weights the average (paper reading:
    # the organ's own feature) | nothing is pooled, E = MLP(0) (code: FeatureToConditioningMLP.py,
    # hard mask over its sum + 1e-6). `soft`, the bilinearly resized mask as weights, is the
    # earlier paper reading (records made before 2026-11-28 04:30 UTC): bilinear resizing
    # without antialiasing reads 2 of every 16 pixels and loses most small organs too
    "vtct_empty_mask": {"paper": "soft_area", "code": "zero"},
    # The harness-level differences (GT training labels with the shipped liver+spleen
    # exclusion, pooled Dice, legacy setting-2 exclusion, fp32 + TF32, gradient accumulation,
    # linear decay) are set by the config group configs/fidelity/.
}
OBJECTIVES = ("ddim_t999", "direct_t999", "degenerate_t1")
#: dtype of the frozen VAE (it runs without gradients in training): bf16 is 4.6x faster for
#: TAESD on a CPU with AMX and halves its traffic on a GPU; latents come back as fp32
VAE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QE_FORMS = ("cosine", "fg_bg_softmax")
THRESHOLDS = ("absolute", "relative")
THRESHOLD_LEVELS = ("continuous", "uint8")
ELASTIC_MASK_FIELDS = ("image", "own")
VTCT_EMPTY_MASKS = ("soft_area", "soft", "zero")
#: the training augmentation a config may name (augment.py's third form is chosen by
#: ``elastic_mask_field``)
CONFIG_AUGMENT_FORMS = ("standard", "sdfsmis_code")
TRAIN_LATENTS = ("mean", "sample")
SHOT_POOLINGS = ("after_mlp", "before_mlp")
QE_SUPPORT_FORMS = ("area_pooled", "bilinear_per_shot")
#: DDPM schedule of SD-1.x/2.x: scaled_linear betas 0.00085..0.012 over 1000 steps.
TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def sd_alphas_cumprod() -> torch.Tensor:
    """``alpha_bar_t`` of the SD DDPM schedule, ``(1000,)`` float64 (``alpha_bar_999 = 0.00466``)."""
    # on the CPU whatever the default device (``describe --meta`` builds under "meta")
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_TIMESTEPS, dtype=torch.float64, device="cpu") ** 2
    return torch.cumprod(1.0 - betas, dim=0)


# ---------------------------------------------------------------------------------------
# Query Enhancement: prototypes on the latent grid (pure functions, pinned by the tests)
# ---------------------------------------------------------------------------------------
def masked_average(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Masked average pooling over shots and positions.

    Args:
        features: ``(B, S, C, h, w)``.
        weights: ``(B, S, 1, h, w)`` in [0, 1].
    Returns:
        ``(B, C)``: ``sum(w * f) / sum(w)`` over shots and positions.
    """
    return (features * weights).sum(dim=(1, 3, 4)) / weights.sum(dim=(1, 3, 4)).clamp_min(eps)


def support_prototypes(latents: torch.Tensor, masks: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """QE's support foreground and background prototypes.

    Args:
        latents: ``(B, S, C, h, w)`` support image latents.
        masks: ``(B, S, 1, H, W)`` support masks in {0, 1}.
        form: ``"area_pooled"``: masks area-averaged onto the latent grid, one average over
            every shot's positions; ``"bilinear_per_shot"`` (released code): masks resized
            bilinearly with ``align_corners=True``, one prototype per shot (``+ 1e-6`` on the
            weight sums), the shots' prototypes averaged.
    Returns:
        ``(B, C)`` foreground and background prototypes.
    """
    b, s = latents.shape[:2]
    grid = latents.shape[-2:]
    flat = masks.flatten(0, 1).float()
    if form == "area_pooled":
        weights = F.interpolate(flat, size=grid, mode="area").view(b, s, 1, *grid)
        return masked_average(latents, weights), masked_average(latents, 1.0 - weights)
    weights = F.interpolate(flat, size=grid, mode="bilinear", align_corners=True).view(b, s, 1, *grid)

    def per_shot(w: torch.Tensor) -> torch.Tensor:
        return ((latents * w).sum(dim=(3, 4)) / (w.sum(dim=(3, 4)) + 1e-6)).mean(dim=1)

    return per_shot(weights), per_shot(1.0 - weights)


def topk_count(latent_width: int, ratio: float) -> int:
    """The fallback's ``k = int(ratio * latent width)``, at least 1 (6 for a 32-wide latent)."""
    return max(1, int(ratio * latent_width))


def _mean_of_selected(query: torch.Tensor, score: torch.Tensor, selected: torch.Tensor, k: int) -> torch.Tensor:
    """Mean query latent over ``selected`` positions; where none is selected, over the top ``k`` by ``score``.

    ``query (B, C, h, w)``, ``score``/``selected`` ``(B, h, w)``; returns ``(B, C)``.
    """
    flat_score = score.flatten(1)
    weights = selected.flatten(1).to(query.dtype)
    empty = weights.sum(dim=1) == 0
    # the fallback is computed whether needed or not: no host sync on `empty`
    top = flat_score.topk(min(k, flat_score.shape[1]), dim=1).indices
    fallback = torch.zeros_like(weights).scatter_(1, top, 1.0)
    weights = torch.where(empty[:, None], fallback, weights)
    return (query.flatten(2) * weights[:, None]).sum(-1) / weights.sum(-1, keepdim=True)


def query_prototype_cosine(
    query: torch.Tensor, fg_prototype: torch.Tensor, tau: float, k: int
) -> torch.Tensor:
    """Paper QE: mean of the query latents whose cosine similarity to ``P_s`` exceeds ``tau``.

    When no position passes ``tau`` (the paper does not say what happens), the top ``k``
    positions by similarity are used, the same fallback as the released code's form.

    Args:
        query: ``(B, C, h, w)`` query image latent.
        fg_prototype: ``(B, C)`` support foreground prototype ``P_s``.
    Returns:
        ``(B, C)`` query prototype ``P_q``.
    """
    similarity = F.cosine_similarity(query, fg_prototype[:, :, None, None], dim=1)
    return _mean_of_selected(query, similarity, similarity > tau, k)


def query_prototype_fg_bg(
    query: torch.Tensor, fg_prototype: torch.Tensor, bg_prototype: torch.Tensor, tau: float, k: int
) -> torch.Tensor:
    """Code QE: softmax over the (fg, bg) cosine maps; mean of the positions with fg probability > ``tau``,
    falling back to the top ``k`` by fg probability.

    Args:
        query: ``(B, C, h, w)``; ``fg_prototype``, ``bg_prototype``: ``(B, C)``.
    Returns:
        ``(B, C)``.
    """
    cos_fg = F.cosine_similarity(query, fg_prototype[:, :, None, None], dim=1)
    cos_bg = F.cosine_similarity(query, bg_prototype[:, :, None, None], dim=1)
    fg_probability = torch.softmax(torch.stack([cos_fg, cos_bg]), dim=0)[0]
    return _mean_of_selected(query, fg_probability, fg_probability > tau, k)


# ---------------------------------------------------------------------------------------
# VTCT: support image + mask -> one "text" token
# ---------------------------------------------------------------------------------------
class VTCTProjector(nn.Module):
    """The VTCT MLP (the released code's shape; the paper gives none):
    ``Linear(d, 2t), LN, GELU, 2 x [Linear(2t, 2t), LN, GELU], Linear(2t, t)``.

    Args:
        in_dim: image-encoder token width ``d``.
        text_dim: U-Net cross-attention width ``t``.
    """

    def __init__(self, in_dim: int, text_dim: int) -> None:
        super().__init__()
        hidden = 2 * text_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU()]
        for _ in range(2):
            layers += [nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU()]
        layers.append(nn.Linear(hidden, text_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """``(..., d)`` -> ``(..., t)``."""
        return self.mlp(pooled)


def masked_token_average(tokens: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int],
                         empty: str = "soft_area") -> torch.Tensor:
    """Average of the patch tokens under the mask resized to the patch grid and > 0.5.

    A mask too small to cover half of any patch selects nothing. ``empty="soft_area"``: the
    fraction of each patch the mask covers weights the average instead, so a tiny organ
    still gives its own feature. ``"soft"``: the bilinearly resized mask weights it (the
    earlier reading, kept for its records). ``"zero"`` (code): the average is zero, as the
    code's sum over ``mask sum + 1e-6``.

    Args:
        tokens: ``(N, gh * gw, d)``; masks: ``(N, 1, H, W)`` in {0, 1}.
    Returns:
        ``(N, d)``.
    """
    resized = F.interpolate(masks.float(), size=grid, mode="bilinear", align_corners=False).flatten(1)
    hard = (resized > 0.5).to(tokens.dtype)
    if empty == "zero":
        return (tokens * hard[..., None]).sum(1) / (hard.sum(1, keepdim=True) + 1e-6)
    if empty == "soft":
        covered = resized.to(tokens.dtype)
    else:  # bilinear resizing reads 2 of every 16 pixels (256 -> 16, no antialiasing): a small
        # organ between them would vanish from the fallback too, so it counts what each patch covers
        covered = F.interpolate(masks.float(), size=grid, mode="area").flatten(1).to(tokens.dtype)
    weights = torch.where(hard.sum(1, keepdim=True) > 0, hard, covered)
    return (tokens * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1e-6)


# ---------------------------------------------------------------------------------------
# masks from the decoded prediction
# ---------------------------------------------------------------------------------------
def threshold_decoded(decoded: torch.Tensor, mode: str, value: float, levels: str = "continuous") -> torch.Tensor:
    """Foreground from the decoded prediction of one EP1 chunk.

    Args:
        decoded: ``(Q, C, H, W)``: the chunk's ``Q`` slices in the image space of the VAE,
            about [-1, 1] (background -1, foreground +1), ``C`` (3) channels.
        mode: ``absolute``: channel mean ``> value`` (paper default value 0, the midpoint of
            the two mask levels); ``relative`` (code): every channel rescaled to [0, 1] as an
            image would be, channel mean ``p > value * max`` with the maximum taken over the
            whole chunk, all slices and channels (default value 0.25).
        levels: ``relative`` only: ``uint8`` thresholds ``floor(p * 255) / 255``, the
            levels of the uint8 image the released pipeline returns, as its test script
            does (a pixel at p = 0.2505 of a chunk whose maximum is 1 is then background).
    Returns:
        ``(Q, H, W)`` bool.
    """
    if mode == "absolute":
        return decoded.mean(dim=1) > value
    if mode == "relative":
        p = ((decoded + 1.0) / 2.0).clamp(0.0, 1.0)
        if levels == "uint8":
            p = torch.floor(p * 255.0) / 255.0
        return p.mean(dim=1) > value * p.max().clamp_min(1e-6)
    raise ConfigError(f"unknown threshold {mode!r}", hint=f"method.threshold must be one of {THRESHOLDS}")


def largest_component(masks: torch.Tensor) -> torch.Tensor:
    """Keep the largest 8-connected component of each slice; ``(Q, H, W)`` bool -> same.

    Of components of equal size the first in raster order stays, as in the released test
    script, which keeps a component only if it is strictly larger than every earlier one.
    MONAI's ``KeepLargestConnectedComponent`` keeps all of them, so it is not used here."""
    out = np.zeros(tuple(masks.shape), dtype=bool)
    for i, mask in enumerate(masks.cpu().numpy()):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        if count:
            sizes = np.bincount(labels.ravel())[1:]
            out[i] = labels == (int(np.argmax(sizes)) + 1)
    return torch.from_numpy(out).to(masks.device)


# ---------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------
def _auto_or_bool(name: str, value: Any) -> bool | str:
    """A switch that takes ``auto`` (decided by the device when the model is built), true or false."""
    if value is None or value is False:
        return False
    if value is True or value == "auto":
        return value
    raise ConfigError(f"method.{name}={value!r} is not allowed", hint=f"use method.{name}=auto, true or false")


@dataclass(frozen=True)
class SDFSMISOptions:
    """``cfg.method`` resolved against ``cfg.fidelity`` (every field concrete)."""

    sii: str
    qe: bool
    qe_form: str
    qe_tau: float
    qe_topk_ratio: float
    vtct: bool
    vtct_encoder: str | None
    objective: str
    threshold: str
    threshold_value: float
    threshold_levels: str
    lcc: bool
    train_latents: str
    vtct_shot_pooling: str
    qe_support_form: str
    vtct_preprocess: str
    augment_form: str
    elastic_mask_field: str
    vtct_empty_mask: str
    predict_batch_size: int
    predict_cuda_graph: bool
    joint_pass: bool | str
    batched_encode: bool | str
    gradient_checkpointing: bool
    vae_dtype: str
    lr: float
    lr_vtct: float

    @property
    def timestep(self) -> int:
        return 1 if self.objective == "degenerate_t1" else TRAIN_TIMESTEPS - 1


@dataclass
class SupportContext:
    """Everything the query pass needs from the support, computed once per episode/chunk.

    Attributes:
        bank: the support pass's K/V (``kv_concat``) or block tokens (``cross_attention``).
        conditioning: ``(B or 1, L, t)`` ``encoder_hidden_states`` (``E`` or the empty prompt).
        fg_prototype, bg_prototype: ``(B or 1, C)`` support latent prototypes (QE), else None.
        shots: ``S``.
    """

    bank: AttentionBank
    conditioning: torch.Tensor
    fg_prototype: torch.Tensor | None
    bg_prototype: torch.Tensor | None
    shots: int

    def for_batch(self, batch: int) -> SupportContext:
        """Broadcast a batch-1 context to ``batch`` queries (views, no copies)."""

        def grow(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None or x.shape[0] == batch:
                return x
            return x.expand(batch, *x.shape[1:])

        return SupportContext(self.bank, grow(self.conditioning), grow(self.fg_prototype), grow(self.bg_prototype), self.shots)


class SDFSMIS(Method):
    """SD-FSMIS (full: SII + QE + VTCT). Subclasses fix the ablation variants.

    Trainable: the U-Net, the new input convs and SII layers (``method.lr``, 1e-5) and the
    VTCT MLP (``method.lr_vtct``, 5e-5). Frozen: the VAE and the image encoder.
    """

    input_norm: ClassVar[str] = "minmax"
    #: configs/fidelity/code.yaml is this code's protocol (DiffewS inherits it: the paper
    #: re-ran DiffewS in the same pipeline)
    released_code_protocol: ClassVar[bool] = True
    #: how the decoded prediction becomes a mask: read at test time only (Method.inference_options)
    inference_options: ClassVar[tuple[str, ...]] = (
        *Method.inference_options, "threshold", "threshold_value", "threshold_levels", "lcc")
    #: the variant's modules when ``cfg.method`` does not name them.
    default_qe: ClassVar[bool] = True
    default_vtct: ClassVar[bool] = True
    #: released-code forms found after runs were recorded; the value every earlier run had
    late_options: ClassVar[dict[str, Any]] = {
        "qe_support_form": "area_pooled", "vtct_preprocess": "resize", "augment_form": "standard",
        "elastic_mask_field": "image", "threshold_levels": "continuous", "vtct_empty_mask": "soft",
    }

    @classmethod
    def late_option_values(cls, cfg: DictConfig) -> dict[str, Any]:
        """As :meth:`resolve_options` resolves them; the earlier value where the module they
        shape (QE, VTCT) is off, so that turning a form on changes no run without it."""
        opts = cls.resolve_options(cfg.method, str(cfg.get("fidelity", "paper")))
        return {
            "qe_support_form": opts.qe_support_form if opts.qe else "area_pooled",
            "vtct_preprocess": opts.vtct_preprocess if opts.vtct else "resize",
            "augment_form": opts.augment_form,
            "elastic_mask_field": opts.elastic_mask_field if opts.augment_form == "sdfsmis_code" else "image",
            "threshold_levels": opts.threshold_levels if opts.threshold == "relative" else "continuous",
            "vtct_empty_mask": opts.vtct_empty_mask if opts.vtct else "soft",
        }

    @classmethod
    def option_values(cls, cfg: DictConfig) -> dict[str, Any]:
        """Every option :meth:`resolve_options` fills from ``fidelity`` or its own default
        (``vtct_encoder``, which the backbone decides, stays unresolved)."""
        options = asdict(cls.resolve_options(cfg.method, str(cfg.get("fidelity", "paper"))))
        return {name: value for name, value in options.items() if value is not None}

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.fidelity = str(cfg.get("fidelity", "paper"))
        if self.fidelity not in ("paper", "code"):
            raise ConfigError(f"unknown fidelity {self.fidelity!r}", hint="use fidelity=paper or fidelity=code")
        self.options = self.resolve_options(cfg.method, self.fidelity)
        cuda = selects_cuda(str(cfg.get("device", "auto")))
        for switch in ("joint_pass", "batched_encode"):  # `auto` as the run's hash resolves it (training/precision.py)
            if getattr(self.options, switch) == "auto":
                self.options = replace(self.options, **{switch: cuda})
        opts = self.options
        backbone = backbone_sources(cfg.backbone, self.fidelity)
        self.prediction_type = backbone.prediction_type
        pretrained = bool(cfg.get("pretrained", True))
        weights_root = cfg.get("weights_root")

        self.vae = build_vae(backbone.vae, pretrained=pretrained, source=backbone.vae_source, weights_root=weights_root)
        self.vae_dtype = VAE_DTYPES[opts.vae_dtype]
        self.vae.to(self.vae_dtype)
        self.unet = build_unet(
            backbone.unet, pretrained=pretrained, source=backbone.source,
            weights_root=weights_root, cross_attention_dim=backbone.cross_attention_dim,
            prediction_type=backbone.prediction_type,
        )
        latent_channels = self.vae.latent_channels
        if self.unet.config.in_channels != latent_channels:
            raise ConfigError(
                f"U-Net takes {self.unet.config.in_channels} channels but the VAE gives {latent_channels}",
                hint="pick a backbone whose vae and unet belong together",
            )
        # The method owns the U-Net's input convs: conv_in becomes the identity and the
        # query/support convs run before the U-Net (UNet2DConditionModel.forward does not
        # look at the channel count of its input).
        pretrained_conv_in = self.unet.conv_in
        self.support_conv_in = expand_conv_in(pretrained_conv_in, 2 * latent_channels)
        self.query_conv_in = expand_conv_in(pretrained_conv_in, 2 * latent_channels) if opts.qe else pretrained_conv_in
        self.unet.conv_in = nn.Identity()
        self.support_attention_keys = install_support_attention(self.unet, opts.sii)
        # float32 output whatever the autocast: see mask_latent_estimate
        float32_output_layer(self.unet)
        if opts.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        text_dim = int(self.unet.config.cross_attention_dim)

        self.image_encoder = None
        self.vtct_mlp = None
        self.text_weight_files: dict = {}
        self.vtct_encoder_kind: str | None = None
        if opts.vtct:
            encoder_kind = self.vtct_encoder_kind = opts.vtct_encoder or backbone.image_encoder
            source = backbone.image_encoder_source if encoder_kind == backbone.image_encoder else None
            self.image_encoder = build_image_encoder(
                encoder_kind, pretrained=pretrained, source=source, weights_root=weights_root,
                preprocess=opts.vtct_preprocess,
            )
            self.image_encoder.requires_grad_(False)
            self.vtct_mlp = VTCTProjector(self.image_encoder.dim, text_dim)
            self.register_buffer("empty_prompt", None, persistent=False)
        else:
            prompt = load_prompt_embedding(
                backbone.unet, pretrained=pretrained, source=backbone.text_encoder_source,
                weights_root=weights_root, cross_attention_dim=text_dim, tokenizer_source=backbone.tokenizer_source,
            )
            self.register_buffer("empty_prompt", prompt.embedding, persistent=False)
            self.text_weight_files = prompt.weight_files
        self.vae.requires_grad_(False)
        #: alpha_bar at the objective's timestep, a float64 Python scalar
        self.alpha_bar = float(sd_alphas_cumprod()[opts.timestep])
        #: ``method.predict_cuda_graph``'s recorded support and query sides
        self._recordings: dict[Any, recorded.RecordedCall] = {}

    # -- configuration -------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, method_cfg: DictConfig, fidelity: str) -> SDFSMISOptions:
        """Fill every ``null`` option from ``FIDELITY_DEFAULTS[option][fidelity]`` and validate."""
        get = method_cfg.get

        def pick(name: str) -> Any:
            value = get(name)
            return FIDELITY_DEFAULTS[name][fidelity] if value is None else value

        objective = str(pick("objective"))
        threshold = str(pick("threshold"))
        threshold_value = get("threshold_value")
        if threshold_value is None:
            threshold_value = 0.0 if threshold == "absolute" else 0.25
        opts = SDFSMISOptions(
            sii=str(pick("sii")),
            qe=bool(cls.default_qe if get("qe") is None else get("qe")),
            qe_form=str(pick("qe_form")),
            qe_tau=float(get("qe_tau") if get("qe_tau") is not None else 0.7),
            qe_topk_ratio=float(get("qe_topk_ratio") if get("qe_topk_ratio") is not None else 0.1875),
            vtct=bool(cls.default_vtct if get("vtct") is None else get("vtct")),
            # null: the backbone's image_encoder, which itself follows fidelity when null
            vtct_encoder=None if get("vtct_encoder") is None else str(get("vtct_encoder")),
            objective=objective,
            threshold=threshold,
            threshold_value=float(threshold_value),
            threshold_levels=str(pick("threshold_levels")),
            lcc=bool(pick("lcc")),
            train_latents=str(pick("train_latents")),
            vtct_shot_pooling=str(pick("vtct_shot_pooling")),
            qe_support_form=str(pick("qe_support_form")),
            vtct_preprocess=str(pick("vtct_preprocess")),
            augment_form=str(pick("augment_form")),
            elastic_mask_field=str(pick("elastic_mask_field")),
            vtct_empty_mask=str(pick("vtct_empty_mask")),
            predict_batch_size=int(get("predict_batch_size") or 8),
            predict_cuda_graph=bool(get("predict_cuda_graph") or False),
            joint_pass=_auto_or_bool("joint_pass", get("joint_pass")),
            batched_encode=_auto_or_bool("batched_encode", get("batched_encode")),
            gradient_checkpointing=bool(get("gradient_checkpointing") or False),
            vae_dtype=str(get("vae_dtype") or "float32"),
            lr=float(get("lr") or 1e-5),
            lr_vtct=float(get("lr_vtct") or 5e-5),
        )
        for name, value, allowed in (
            ("sii", opts.sii, SUPPORT_ATTENTION_FORMS),
            ("qe_form", opts.qe_form, QE_FORMS),
            ("objective", opts.objective, OBJECTIVES),
            ("threshold", opts.threshold, THRESHOLDS),
            ("vae_dtype", opts.vae_dtype, tuple(VAE_DTYPES)),
            ("train_latents", opts.train_latents, TRAIN_LATENTS),
            ("vtct_shot_pooling", opts.vtct_shot_pooling, SHOT_POOLINGS),
            ("qe_support_form", opts.qe_support_form, QE_SUPPORT_FORMS),
            ("vtct_preprocess", opts.vtct_preprocess, VTCT_PREPROCESSING),
            ("augment_form", opts.augment_form, CONFIG_AUGMENT_FORMS),
            ("elastic_mask_field", opts.elastic_mask_field, ELASTIC_MASK_FIELDS),
            ("threshold_levels", opts.threshold_levels, THRESHOLD_LEVELS),
            ("vtct_empty_mask", opts.vtct_empty_mask, VTCT_EMPTY_MASKS),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"method.{name}={value!r} is not one of {', '.join(allowed)}",
                    hint=f"set method.{name}=null to follow fidelity, or pick one of {', '.join(allowed)}",
                )
        return opts

    # -- parameters ----------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        # the SII layers live inside the U-Net, so the U-Net group already holds them
        # (the U-Net's own conv_in is now query_conv_in, outside self.unet)
        main = [*self.unet.parameters(), *self.support_conv_in.parameters(), *self.query_conv_in.parameters()]
        groups = [{"name": "unet", "params": [p for p in main if p.requires_grad], "lr": self.options.lr}]
        if self.vtct_mlp is not None:
            groups.append({"name": "vtct", "params": list(self.vtct_mlp.parameters()), "lr": self.options.lr_vtct})
        return groups

    def compile_regions(self) -> list[nn.Module]:
        """``train.compile_scope=blocks``: the ResNet blocks (U-Net and VAE) and the transformer
        blocks' feed-forward parts. The transformer blocks themselves read or write the
        support bank under their own layer name, so compiled whole each would specialise on
        it: one compilation per block and pass instead of one per shape."""
        return [m for m in self.modules() if type(m).__name__ in ("ResnetBlock2D", "FeedForward")]

    def components(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"unet": self.unet, "vae": self.vae}
        parts["support_conv_in"] = self.support_conv_in
        parts["query_conv_in"] = self.query_conv_in
        if self.image_encoder is not None:
            parts["image_encoder"] = self.image_encoder
            parts["vtct_mlp"] = self.vtct_mlp
        return parts

    def weight_identity(self) -> dict:
        """``{component: {"source", "digest", ...}}`` of every pretrained file read: U-Net, VAE,
        image encoder, text encoder and tokenizer (those built with random weights are absent)."""
        identity = weight_identity_of({"unet": self.unet, "vae": self.vae, "image_encoder": self.image_encoder})
        identity.update({name: record.identity() for name, record in self.text_weight_files.items()})
        return identity

    def resolved_options(self) -> dict[str, Any]:
        """Every option as this run uses it (``null`` ones resolved from ``fidelity``), for run.json."""
        options = {"fidelity": self.fidelity, "prediction_type": self.prediction_type, **asdict(self.options)}
        options["vtct_encoder"] = self.vtct_encoder_kind  # null options.vtct_encoder: the backbone's
        return options

    def augment_form(self) -> str:
        if self.options.augment_form == "sdfsmis_code" and self.options.elastic_mask_field == "image":
            return "sdfsmis_code_shared_field"  # fsmis-bench's earlier reading of the code form
        return self.options.augment_form

    def uses_random_weights(self) -> bool:
        frozen = [self.vae] + ([self.image_encoder] if self.image_encoder is not None else [])
        return bool(getattr(self.unet, "random_weights", False)) or any(m.random_weights for m in frozen)

    # -- latents -------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, sample: bool = False,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, 1, H, W)`` in [-1, 1] -> ``(N, C, h, w)`` latents (frozen VAE, no autograd):
        the posterior mean, or a posterior sample with ``sample=True`` (with ``noise``, the
        ``(N, C, h, w)`` standard normal draw drawn before the step; else drawn now)."""
        images = images.to(torch.promote_types(images.dtype, torch.float32))  # fp32 (fp64 stays)
        with torch.no_grad():
            codec_input = images if self.vae_dtype == torch.float32 else images.to(self.vae_dtype)
            latents = self.vae.encode(codec_input.expand(-1, 3, -1, -1), sample=sample, noise=noise)
            return latents.to(images.dtype).detach()

    def encode_masks(self, masks: torch.Tensor, sample: bool = False,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, 1, H, W)`` in {0, 1} -> ``(N, C, h, w)``: the mask as a [-1, 1] 3-channel image, encoded."""
        return self.encode_images(self.mask_image(masks), sample, noise)

    @staticmethod
    def mask_image(masks: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` in {0, 1} -> the same in {-1, 1}, float32 (float64 stays)."""
        return masks.to(torch.promote_types(masks.dtype, torch.float32)) * 2.0 - 1.0

    def host_draws(self, batch: EpisodeBatch) -> dict[str, torch.Tensor]:
        """``train_latents=sample`` on a VAE with a posterior (``fidelity=code`` on SD): the
        posterior noise of :meth:`episode_latents`, drawn before the step so a recorded step can
        read it. Episode by episode (support images, support masks, query image, query mask),
        so a batch of ``B`` episodes draws what ``B`` one-episode micro-batches draw:
        ``train.accumulation=batched`` then gives the sequential step's numbers."""
        if self.options.train_latents != "sample" or not self.vae.samples:
            return {}
        shots = batch.support_images.shape[1]
        support, query = tuple(batch.support_images.shape[-2:]), tuple(batch.query_images.shape[-2:])
        shapes = {"support_images": (shots, 3, *support), "support_masks": (shots, 3, *support),
                  "query_images": (1, 3, *query), "query_masks": (1, 3, *query)}
        drawn: dict[str, list[torch.Tensor]] = {kind: [] for kind in shapes}
        for _ in range(batch.batch_size):
            for kind, shape in shapes.items():
                drawn[kind].append(self.vae.posterior_noise(shape))
        return {f"{kind}_noise": torch.cat(parts) for kind, parts in drawn.items()}

    def episode_latents(self, batch: EpisodeBatch, sample: bool) -> tuple[torch.Tensor, ...]:
        """Support image, support mask, query image and query mask latents, ``(B * S, C, h, w)``
        twice and ``(B, C, h, w)`` twice; with ``sample``, posterior samples whose noise is
        ``batch.host_draws`` (the engine's), else drawn now by :meth:`host_draws`.

        ``method.batched_encode`` (``auto``: with CUDA) makes the four VAE calls one, a quarter
        of the encoder's kernel launches (the same latents up to float rounding; the posterior
        noise is the four calls' noise, concatenated). On the CPU one call of four times the
        batch was slower: the activations leave the cache."""
        noise = (batch.host_draws or self.host_draws(batch)) if sample else {}
        kinds = (("support_images", batch.support_images.flatten(0, 1), False),
                 ("support_masks", batch.support_masks.flatten(0, 1), True),
                 ("query_images", batch.query_images, False),
                 ("query_masks", batch.query_masks, True))
        if not self.options.batched_encode or len({tuple(x.shape[-2:]) for _, x, _ in kinds}) > 1:
            return tuple((self.encode_masks if is_mask else self.encode_images)(x, sample, noise.get(f"{kind}_noise"))
                         for kind, x, is_mask in kinds)
        images = [self.mask_image(x) if is_mask else x for _, x, is_mask in kinds]
        joined_noise = torch.cat([noise[f"{kind}_noise"] for kind, _, _ in kinds]) if noise else None
        latents = self.encode_images(torch.cat(images), sample, joined_noise)
        return tuple(latents.split([len(x) for x in images]))

    # -- support side --------------------------------------------------------------------
    def vtct_condition(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        """``E``: ``(B, S, 1, H, W)`` images and masks -> ``(B, 1, t)``.

        Several shots: ``after_mlp`` averages the shots' ``E``; ``before_mlp`` (code) averages
        the shots' pooled features and maps the mean once. One shot: the two are identical.
        """
        b, s = support_images.shape[:2]
        with torch.no_grad():
            tokens = self.image_encoder(support_images.flatten(0, 1).float().expand(-1, 3, -1, -1))
            pooled = masked_token_average(tokens, support_masks.flatten(0, 1), self.image_encoder.grid,
                                          self.options.vtct_empty_mask)
        pooled = pooled.detach().view(b, s, -1)
        if self.options.vtct_shot_pooling == "before_mlp":
            return self.vtct_mlp(pooled.mean(dim=1, keepdim=True))
        return self.vtct_mlp(pooled).mean(dim=1, keepdim=True)

    def support_side(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        image_latents: torch.Tensor,
        mask_latents: torch.Tensor,
    ) -> tuple[torch.Tensor, SupportContext]:
        """Everything of the support side but its U-Net pass.

        Args:
            support_images: ``(B, S, 1, H, W)``; support_masks: ``(B, S, 1, H, W)``.
            image_latents, mask_latents: their latents, ``(B * S, C, h, w)``.
        Returns:
            the support pass's U-Net input ``(B * S, C', h, w)`` and a :class:`SupportContext`
            for ``B`` episodes whose bank is still empty.
        """
        b, s = support_images.shape[:2]
        if self.vtct_mlp is not None:
            conditioning = self.vtct_condition(support_images, support_masks)
        else:
            conditioning = self.empty_prompt.expand(b, -1, -1)

        fg_prototype = bg_prototype = None
        if self.options.qe:
            latents = image_latents.view(b, s, *image_latents.shape[1:])
            fg_prototype, bg_prototype = support_prototypes(latents, support_masks, self.options.qe_support_form)

        support_input = self.support_conv_in(torch.cat([image_latents, mask_latents], dim=1))
        return support_input, SupportContext(AttentionBank(), conditioning, fg_prototype, bg_prototype, s)

    def encode_support(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> SupportContext:
        """Run the support side once, at inference (posterior means): :meth:`support_side`,
        then :meth:`write_support`. Training goes through :meth:`episode_latents` instead.

        Args:
            support_images: ``(B, S, 1, H, W)``; support_masks: ``(B, S, 1, H, W)``.
        Returns:
            the :class:`SupportContext` for ``B`` episodes.
        """
        image_latents = self.encode_images(support_images.flatten(0, 1))
        mask_latents = self.encode_masks(support_masks.flatten(0, 1))
        support_input, support = self.support_side(support_images, support_masks, image_latents, mask_latents)
        self.write_support(support_input, support)
        return support

    def write_support(self, support_input: torch.Tensor, support: SupportContext) -> None:
        """The support's U-Net pass, ``(B * S, C', h, w)``: fills ``support.bank``."""
        self.unet(
            support_input,
            self._timesteps(support_input.shape[0], support_input.device),
            encoder_hidden_states=support.conditioning.repeat_interleave(support.shots, dim=0),
            cross_attention_kwargs=bank_kwargs(support.bank, "write", support.shots),
        )

    # -- query side ----------------------------------------------------------------------
    def query_prototype(self, query_latents: torch.Tensor, support: SupportContext) -> torch.Tensor:
        """QE's ``P_q``: ``(B, C, h, w)`` -> ``(B, C)``."""
        opts = self.options
        k = topk_count(query_latents.shape[-1], opts.qe_topk_ratio)
        if opts.qe_form == "cosine":
            return query_prototype_cosine(query_latents, support.fg_prototype, opts.qe_tau, k)
        return query_prototype_fg_bg(query_latents, support.fg_prototype, support.bg_prototype, opts.qe_tau, k)

    def query_input(self, query_latents: torch.Tensor, support: SupportContext) -> torch.Tensor:
        """The query pass's U-Net input: ``(B, C, h, w)`` latents (++ QE's prototype) through
        ``query_conv_in``; ``support`` already broadcast to ``B``."""
        if not self.options.qe:
            return self.query_conv_in(query_latents)
        prototype = self.query_prototype(query_latents, support)
        return self.query_conv_in(torch.cat([query_latents, prototype[:, :, None, None].expand_as(query_latents)], dim=1))

    def query_pass(self, query_latents: torch.Tensor, support: SupportContext) -> torch.Tensor:
        """The U-Net on the query, reading the support: ``(B, C, h, w)`` -> raw output ``(B, C, h, w)``."""
        b = query_latents.shape[0]
        support = support.for_batch(b)
        return self.unet(
            self.query_input(query_latents, support),
            self._timesteps(b, query_latents.device),
            encoder_hidden_states=support.conditioning,
            cross_attention_kwargs=bank_kwargs(support.bank, "read", support.shots),
        ).sample

    def joint_pass(self, query_latents: torch.Tensor, support_input: torch.Tensor, support: SupportContext) -> torch.Tensor:
        """Support and query through the U-Net as one batch (``method.joint_pass``): the query
        rows read the support rows block by block, so this is :meth:`write_support` followed
        by :meth:`query_pass`, up to float rounding, in one pass.

        Args:
            query_latents: ``(B, C, h, w)``; support_input: ``(B * S, C', h, w)`` and
                ``support`` from :meth:`support_side` (the same ``B`` episodes).
        Returns:
            the query rows' raw output ``(B, C, h, w)``.
        """
        b, s = query_latents.shape[0], support.shots
        support = support.for_batch(b)
        rows = torch.cat([support_input, self.query_input(query_latents, support)])
        conditioning = torch.cat([support.conditioning.repeat_interleave(s, dim=0), support.conditioning])
        output = self.unet(
            rows,
            self._timesteps(rows.shape[0], rows.device),
            encoder_hidden_states=conditioning,
            cross_attention_kwargs=bank_kwargs(None, "joint", s),
        ).sample
        return output[b * s:]

    def mask_latent_estimate(self, model_output: torch.Tensor, query_latents: torch.Tensor) -> torch.Tensor:
        """The U-Net output as an estimate of the query-mask latent ``x0``.

        ``ddim_t999`` (paper, "single-step DDIM at t = 999"): the U-Net sees the clean query
        latent as ``x_t`` at timestep 999 of the SD DDPM schedule (scaled_linear betas
        0.00085..0.012, 1000 steps, ``a = alpha_bar_999 = 0.00466``), and its output is read
        per the backbone's ``prediction_type`` as one DDIM step to ``t = 0``:
        ``epsilon``: ``x0 = (x_t - sqrt(1 - a) * out) / sqrt(a)``;
        ``v_prediction``: ``x0 = sqrt(a) * x_t - sqrt(1 - a) * out``; ``sample``: ``x0 = out``.
        The epsilon form multiplies output errors by ``1 / sqrt(a) = 14.6``; it is computed in
        float32 (or wider) with autocast off, from a float32 output layer.

        ``direct_t999`` (well-conditioned reading of t = 999): timestep 999, ``x0 = out``.

        ``degenerate_t1`` (code): the released code's scheduler has ``beta = 1`` so
        ``alpha_bar = 0`` and, with v-prediction, ``x0 = -out`` (the U-Net input is the clean
        query latent at timestep 1). Its loss against the negated mask latent equals the MSE
        of this ``x0`` against the mask latent.

        Args:
            model_output, query_latents: ``(B, C, h, w)``.
        Returns:
            ``(B, C, h, w)`` in float32 (float64 for float64 inputs).
        """
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        with torch.autocast(device_type=model_output.device.type, enabled=False):
            out, x_t = model_output.to(dtype), query_latents.to(dtype)
            if self.options.objective == "degenerate_t1":
                return -out
            if self.options.objective == "direct_t999":
                return out
            a = self.alpha_bar
            if self.prediction_type == "epsilon":
                return (x_t - (1 - a) ** 0.5 * out) / a**0.5
            if self.prediction_type == "v_prediction":
                return a**0.5 * x_t - (1 - a) ** 0.5 * out
            if self.prediction_type == "sample":
                return out
        raise ConfigError(
            f"unknown prediction_type {self.prediction_type!r}",
            hint="backbone.prediction_type must be epsilon, v_prediction or sample",
        )

    def _timesteps(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.options.timestep, dtype=torch.long, device=device)

    # -- Method interface ----------------------------------------------------------------
    def training_loss(self, batch: EpisodeBatch) -> torch.Tensor:
        """MSE between the estimated and the true query-mask latent."""
        support_latents, support_mask_latents, query_latents, target = self.episode_latents(
            batch, sample=self.options.train_latents == "sample")
        support_input, support = self.support_side(batch.support_images, batch.support_masks,
                                                   support_latents, support_mask_latents)
        if self.options.joint_pass is True:
            output = self.joint_pass(query_latents, support_input, support)
        else:
            self.write_support(support_input, support)
            output = self.query_pass(query_latents, support)
        estimate = self.mask_latent_estimate(output, query_latents)
        return F.mse_loss(estimate.float(), target.float())

    def decode(self, mask_latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(Q, C, h, w)`` latents -> ``(Q, 3, H, W)`` float32 decoded images, about [-1, 1]."""
        latents = mask_latents.float() if self.vae_dtype == torch.float32 else mask_latents.to(self.vae_dtype)
        decoded = self.vae.decode(latents).float()
        if tuple(decoded.shape[-2:]) != tuple(size):
            decoded = F.interpolate(decoded, size=size, mode="bilinear", align_corners=False)
        return decoded

    def masks_from_decoded(self, decoded: torch.Tensor) -> torch.Tensor:
        """One chunk's ``(Q, 3, H, W)`` decoded prediction -> ``(Q, H, W)`` bool (threshold, LCC)."""
        masks = threshold_decoded(decoded, self.options.threshold, self.options.threshold_value,
                                  self.options.threshold_levels)
        return largest_component(masks) if self.options.lcc else masks

    @torch.no_grad()
    def predict_uncached(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        query_images: torch.Tensor,
    ) -> torch.Tensor:
        """The naive path :meth:`predict` improves on: the support side (VAE, VTCT, U-Net
        support pass) re-run for every query slice, one slice at a time. Kept as the
        reference the cached path is tested and benchmarked against."""
        decoded = []
        for query in query_images.split(1):
            support = self.encode_support(support_images[None], support_masks[None])
            decoded.append(self.decoded_chunk(query, support))
        return self.masks_from_decoded(torch.cat(decoded))

    def decoded_chunk(self, query_images: torch.Tensor, support: SupportContext) -> torch.Tensor:
        """``(Q, 1, H, W)`` query slices -> ``(Q, 3, H, W)`` decoded mask images (one chunk)."""
        query_latents = self.encode_images(query_images)
        estimate = self.mask_latent_estimate(self.query_pass(query_latents, support), query_latents)
        return self.decode(estimate, tuple(query_images.shape[-2:]))

    @torch.no_grad()
    def predict(
        self,
        support_images: torch.Tensor,
        support_masks: torch.Tensor,
        query_images: torch.Tensor,
    ) -> torch.Tensor:
        """The support is encoded once (one U-Net pass) and shared by every query slice;
        query slices run in batches of ``method.predict_batch_size``; the mask is read from
        the whole chunk's decoded prediction (the relative threshold looks at all of it).

        ``method.predict_cuda_graph`` (CUDA): the support side and a chunk's query side are
        each recorded once as a CUDA graph and replayed (:mod:`fsmis_bench.recorded`); the
        short last chunk is padded to the full chunk, whose slices do not interact."""
        chunk_size = self.options.predict_batch_size
        recording = self.options.predict_cuda_graph and recorded.can_record(query_images.device)
        if recording:
            recorded_support = self._recorded_call("support", self.encode_support,
                                                   "method.predict_cuda_graph: the support pass")
            support = recorded_support(support_images[None], support_masks[None])
            recording = recorded_support.fell_back is None  # else a fresh support each call: nothing to record against
        else:
            support = self.encode_support(support_images[None], support_masks[None])
        if recording:
            decoded_chunk = self._recorded_call(("query", id(support)), lambda chunk: self.decoded_chunk(chunk, support),
                                                "method.predict_cuda_graph: a query chunk")
        decoded = []
        for chunk in query_images.split(chunk_size):
            if recording:
                # copied out of the static output before the next replay overwrites it
                decoded.append(decoded_chunk(recorded.pad_to(chunk, chunk_size))[: len(chunk)].clone())
            else:
                decoded.append(self.decoded_chunk(chunk, support))
        return self.masks_from_decoded(torch.cat(decoded))

    def _recorded_call(self, key: Any, fn: Any, name: str) -> recorded.RecordedCall:
        # The query side is recorded once per recorded support (one per support shape): its
        # graph reads that support's static tensors, which each support replay rewrites.
        if key not in self._recordings:
            self._recordings[key] = recorded.RecordedCall(fn, name)
        return self._recordings[key]


class SDFSMISSii(SDFSMIS):
    """Ablation: SII only (no QE, no VTCT: empty-prompt conditioning)."""

    default_qe = False
    default_vtct = False


class SDFSMISQe(SDFSMIS):
    """Ablation: SII + QE."""

    default_qe = True
    default_vtct = False


class SDFSMISVtct(SDFSMIS):
    """Ablation: SII + VTCT."""

    default_qe = False
    default_vtct = True


__all__ = [
    "FIDELITY_DEFAULTS",
    "SDFSMIS",
    "SDFSMISOptions",
    "SDFSMISQe",
    "SDFSMISSii",
    "SDFSMISVtct",
    "SupportContext",
    "VTCTProjector",
    "largest_component",
    "masked_average",
    "masked_token_average",
    "query_prototype_cosine",
    "query_prototype_fg_bg",
    "sd_alphas_cumprod",
    "threshold_decoded",
    "topk_count",
]
