"""ADNet: anomaly-detection-inspired few-shot segmentation with one foreground prototype.

Hansen et al., "Anomaly detection-inspired few-shot medical image segmentation through
self-supervision with supervoxels", Medical Image Analysis 2022; released code
``sha168/ADNet`` (``models/fewshot_anom.py``, ``main_train.py``).

The idea: the background of a medical slice is too varied for a prototype, so only the
foreground gets one. Every query position gets an *anomaly score* — its negative scaled
cosine similarity to the support's foreground prototype — and is foreground when the score
falls below a learned threshold ``T``:

    S(x) = -alpha * cos(f(x), p)                 (alpha = 20)
    P_fg(x) = 1 - sigmoid(kappa * (S(x) - T))    (kappa = 0.5, T learned, starts at -10)

1. **Encoder** (shared with SSL-ALPNet): DeepLabv3-ResNet-101 backbone at output stride 8,
   a 1x1 ``localconv`` to 256 channels; grey slices z-scored per volume and repeated to 3
   channels.
2. **Prototype**: the support features upsampled (bilinear) to the mask's size, masked
   average under the support mask; shots averaged.
3. **Losses**: the query's ``[1 - P_fg, P_fg]`` (upsampled with ``align_corners=True``)
   against its mask, negative log-likelihood with class weights ``[0.1, 1]``; PANet-style
   *prototype alignment* (the query's predicted mask gives a query prototype, on the
   feature grid, that must segment the support back; unweighted); and the *threshold loss*
   ``T / alpha``, which pushes ``T`` down and so the predicted foreground to stay compact.
4. **Prediction**: ``P_fg > 0.5`` after bilinear upsampling.

Training (``configs/method/adnet.yaml``, from ``main_train.py``): SGD, lr 1e-3, momentum 0.9,
weight decay 5e-4, batch 1, 50k steps, lr x 0.95 every 1000 steps, no gradient clipping.

Where the paper text and the released code differ (``FIDELITY_DEFAULTS``, ``null`` options
follow ``cfg.fidelity``):

* ``init`` — the paper uses the encoder of SSL-ALPNet, pretrained on MS-COCO. The released
  ``main_train.py`` builds ``FewShotSeg(False)``: torchvision's ``deeplabv3_resnet101(
  pretrained=False)``, which in the torchvision of that time (<= 0.12) still loads the
  *ImageNet* ResNet-101 into the backbone (``pretrained_backbone=True`` by default). So the
  code trains from an ImageNet backbone, not from COCO. ``paper``: ``coco``; ``code``:
  ``imagenet``, chosen with ``method.init=imagenet``: ``fidelity=code`` is the SD-FSMIS
  code's protocol and is refused for ADNet (:attr:`~fsmis_bench.method.Method.released_code_protocol`).

Protocol differences of the released code (evaluation episodes EP2 by default, support = the
last scan of the fold) belong to the harness: ``protocol.*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from fsmis_bench.errors import ConfigError
from fsmis_bench.method import EpisodeBatch

from ._resnet_encoders import DeepLabFeatures, encoder_from_cfg, ResNetEncoderMethod

#: paper text vs released code, per option (``null`` options follow ``cfg.fidelity``).
FIDELITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "init": {"paper": "coco", "code": "imagenet"},
}
EPS = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------
# the mechanism (pure functions, pinned by the tests)
# ---------------------------------------------------------------------------------------
def upsampled_masked_average(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked average pooling at the mask's resolution (ADNet's ``getFeatures``).

    Args:
        features: ``(N, C, h, w)``; masks: ``(N, 1, H, W)`` in [0, 1].
    Returns:
        ``(N, C)``: features upsampled bilinearly to ``(H, W)``, ``sum(f m) / (sum(m) + 1e-5)``.
    """
    up = F.interpolate(features, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return (up * masks).sum((2, 3)) / (masks.sum((2, 3)) + 1e-5)


def feature_masked_average(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked average on the feature grid; ``(N, C, h, w)``, ``(N, 1, h, w)`` -> ``(N, C)``."""
    return (features * masks).sum((2, 3)) / (masks.sum((2, 3)) + 1e-5)


def anomaly_scores(features: torch.Tensor, prototypes: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """``S = -scale * cos(f, p)``: ``(N, C, h, w)`` features, ``(N, C)`` prototypes -> ``(N, h, w)``."""
    return -scale * F.cosine_similarity(features, prototypes[..., None, None], dim=1)


def foreground_probability(scores: torch.Tensor, threshold: torch.Tensor, steepness: float = 0.5) -> torch.Tensor:
    """``P_fg = 1 - sigmoid(steepness * (S - T))``; ``threshold`` broadcasts over ``(N, h, w)``
    (a scalar for ADNet, ``(N, 1, 1)`` for Q-Net's per-query ``T``)."""
    return 1.0 - torch.sigmoid(steepness * (scores - threshold))


def two_class(probability: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(N, h, w)`` foreground probability -> ``(N, 2, H, W)`` ``[1 - p, p]``, upsampled
    bilinearly with ``align_corners=True`` (as the references do) when ``size`` is given."""
    p = probability.unsqueeze(1)
    if size is not None and tuple(p.shape[-2:]) != tuple(size):
        p = F.interpolate(p, size=size, mode="bilinear", align_corners=True)
    return torch.cat([1.0 - p, p], dim=1)


def sum_of_nonempty(losses: list[torch.Tensor], nonempty: torch.Tensor, batch: int) -> torch.Tensor:
    """``sum(losses[i] for non-empty i) / batch``; 0 when every prediction is empty.

    The released code skips an episode whose predicted foreground is empty. Here every
    episode's loss is computed (an empty prediction gives the all-zero prototype, whose
    loss is finite) and masked out, so no value is read on the host mid-step and the step
    can be recorded as a CUDA graph. The masked losses get zero gradient.
    """
    stacked = torch.stack(losses)
    return torch.where(nonempty, stacked, torch.zeros_like(stacked)).sum() / batch


def probability_nll(probabilities: torch.Tensor, labels: torch.Tensor, weights: tuple[float, float] | None = None) -> torch.Tensor:
    """NLL of clamped class probabilities ``(N, 2, H, W)`` against ``(N, H, W)`` labels in {0, 1}."""
    log_p = torch.log(probabilities.clamp(EPS, 1.0 - EPS))
    # filled on the device, not copied from the host: the step stays recordable as a CUDA graph
    weight = None if weights is None else torch.stack([log_p.new_full((), float(w)) for w in weights])
    return F.nll_loss(log_p, labels.long(), weight=weight)


# ---------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ADNetOptions:
    """``cfg.method`` resolved against ``cfg.fidelity``."""

    init: str
    scale: float
    steepness: float
    threshold_init: float
    bg_weight: float
    threshold_loss_weight: float
    align_weight: float
    feature_dim: int
    predict_batch_size: int
    lr: float


def resolve_option(method_cfg: DictConfig, name: str, fidelity: str, table: dict[str, dict[str, Any]]) -> Any:
    """``method.<name>``, or ``table[name][fidelity]`` when it is null."""
    if fidelity not in ("paper", "code"):
        raise ConfigError(f"unknown fidelity {fidelity!r}", hint="use fidelity=paper or fidelity=code")
    value = method_cfg.get(name)
    return table[name][fidelity] if value is None else value


class ADNet(ResNetEncoderMethod):
    """ADNet (``method/adnet.yaml``): one foreground prototype, anomaly score vs learned ``T``."""

    input_norm: ClassVar[str] = "zscore"

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.fidelity = str(cfg.get("fidelity", "paper"))
        self.options = opts = self.resolve_options(cfg.method, self.fidelity)
        built = encoder_from_cfg(cfg, dilation=(False, True, True), with_fc=False, init=opts.init)
        self.encoder = DeepLabFeatures(built, opts.feature_dim)
        self.threshold = nn.Parameter(torch.tensor([opts.threshold_init]))

    @classmethod
    def resolve_options(cls, m: DictConfig, fidelity: str) -> ADNetOptions:
        def get(name: str, default: Any) -> Any:
            value = m.get(name)
            return default if value is None else value

        return ADNetOptions(
            init=str(resolve_option(m, "init", fidelity, FIDELITY_DEFAULTS)),
            scale=float(get("scale", 20.0)),
            steepness=float(get("steepness", 0.5)),
            threshold_init=float(get("threshold_init", -10.0)),
            bg_weight=float(get("bg_weight", 0.1)),
            threshold_loss_weight=float(get("threshold_loss_weight", 1.0)),
            align_weight=float(get("align_weight", 1.0)),
            feature_dim=int(get("feature_dim", 256)),
            predict_batch_size=int(get("predict_batch_size", 8)),
            lr=float(get("lr", 1e-3)),
        )

    # -- pieces ----------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` -> ``(N, C, h, w)``."""
        return self.encoder(images)

    def support_prototype(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(B, S, C, h, w)`` features, ``(B, S, 1, H, W)`` masks -> ``(B, C)`` (shots averaged)."""
        b, s = features.shape[:2]
        return upsampled_masked_average(features.flatten(0, 1), masks.flatten(0, 1)).view(b, s, -1).mean(1)

    def thresholds(self, query_features: torch.Tensor) -> torch.Tensor:
        """``T`` for each query ``(B, 1, 1)``: ADNet's one learned scalar."""
        return self.threshold.view(1, 1, 1).expand(query_features.shape[0], 1, 1)

    def probability(self, features: torch.Tensor, prototypes: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Foreground probability ``(N, h, w)`` on the feature grid."""
        o = self.options
        return foreground_probability(anomaly_scores(features, prototypes, o.scale), thresholds, o.steepness)

    def alignment_loss(self, query_features, query_probability, support_features, support_masks, thresholds) -> torch.Tensor:
        """PANet-style alignment: the query's predicted foreground (``P_fg > 0.5`` on the
        feature grid) gives a query prototype that must segment each support shot; episodes
        whose prediction is empty are skipped (count as 0), as in the released code."""
        b, s = support_features.shape[:2]
        fg = (query_probability > 0.5).unsqueeze(1).to(query_features.dtype)
        prototypes = feature_masked_average(query_features, fg)
        losses = []
        for i in range(b):
            prob = self.probability(support_features[i], prototypes[i : i + 1].expand(s, -1), thresholds[i])
            labels = support_masks[i, :, 0]
            losses.append(probability_nll(two_class(prob, labels.shape[-2:]), labels))
        return sum_of_nonempty(losses, fg.sum((1, 2, 3)) > 0, b)

    # -- Method interface --------------------------------------------------------------------
    def training_loss(self, batch: EpisodeBatch) -> torch.Tensor:
        o = self.options
        b, s = batch.support_images.shape[:2]
        features = self.encode(torch.cat([batch.support_images.flatten(0, 1), batch.query_images]))
        support = features[: b * s].view(b, s, *features.shape[1:])
        query = features[b * s :]
        thresholds = self.thresholds(query)
        prob = self.probability(query, self.support_prototype(support, batch.support_masks), thresholds)
        labels = batch.query_masks[:, 0]
        loss = probability_nll(two_class(prob, labels.shape[-2:]), labels, (o.bg_weight, 1.0))
        if o.align_weight > 0:
            loss = loss + o.align_weight * self.alignment_loss(query, prob, support, batch.support_masks, thresholds)
        if o.threshold_loss_weight > 0:
            loss = loss + o.threshold_loss_weight * (thresholds.mean() / o.scale)
        return loss

    @torch.no_grad()
    def predict(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor
    ) -> torch.Tensor:
        """Support ``(S, 1, H, W)`` encoded once; query slices ``(Q, 1, H, W)`` in batches."""
        prototype = self.support_prototype(self.encode(support_images)[None], support_masks[None])
        masks = []
        for chunk in query_images.split(self.options.predict_batch_size):
            features = self.encode(chunk)
            prob = self.probability(features, prototype.expand(len(chunk), -1), self.thresholds(features))
            masks.append(two_class(prob, chunk.shape[-2:])[:, 1] > 0.5)
        return torch.cat(masks)

    # -- introspection -----------------------------------------------------------------------
    def components(self) -> dict[str, nn.Module]:
        return {"encoder.backbone": self.encoder.backbone, "encoder.localconv": self.encoder.localconv}


__all__ = [
    "ADNet", "ADNetOptions", "FIDELITY_DEFAULTS", "anomaly_scores", "feature_masked_average",
    "foreground_probability", "probability_nll", "two_class", "upsampled_masked_average",
]
