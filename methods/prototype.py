"""``prototype``: a PANet-style prototype network on a small CNN trained from scratch.

Support features are masked-average-pooled into a foreground and a background prototype;
each query position is classified by scaled cosine similarity to the two. Training adds
an alignment loss after PANet's idea (the query's prediction, used as a support, must
segment the support back), in a form of its own: the soft foreground probability (PANet:
the argmax mask), the first shot only, masks pooled to the feature grid (PANet: features
upsampled to the mask). A baseline of this benchmark, not a reproduction of PANet. Fast
enough for CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsmis_bench.method import EpisodeBatch, Method


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(8, out_channels),
        nn.ReLU(inplace=True),
    )


class Encoder(nn.Module):
    """``(B, 1, H, W)`` -> ``(B, C, H/8, W/8)`` features (PANet's VGG works at 1/8 too)."""

    def __init__(self, width: int = 32, out_channels: int = 64) -> None:
        super().__init__()
        self.stages = nn.Sequential(
            nn.Conv2d(1, width, 5, stride=2, padding=2), nn.ReLU(inplace=True),
            _block(width, width), nn.MaxPool2d(2),
            _block(width, width * 2), nn.MaxPool2d(2),
            _block(width * 2, width * 4),
            nn.Conv2d(width * 4, out_channels, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(images)


def masked_average(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Prototype ``(B, C)`` of ``(B, C, h, w)`` features under ``(B, 1, H, W)`` masks."""
    masks = F.interpolate(masks, size=features.shape[-2:], mode="bilinear", align_corners=False)
    return (features * masks).sum((2, 3)) / (masks.sum((2, 3)) + 1e-5)


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, P, h, w)`` scaled cosine similarity of ``(B, C, h, w)`` features to ``(B, P, C)`` prototypes."""
    return scale * F.cosine_similarity(features.unsqueeze(1), prototypes[..., None, None], dim=2)


class PrototypeNet(Method):
    """Config (``method/prototype.yaml``): ``width``, ``feature_dim``, ``scale``, ``align_weight``, ``lr``."""

    input_norm = "zscore"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        m = cfg.method
        self.encoder = Encoder(int(m.get("width", 32)), int(m.get("feature_dim", 64)))
        self.scale = float(m.get("scale", 20.0))
        self.align_weight = float(m.get("align_weight", 1.0))

    def _logits(self, support_features, support_masks, query_features, size) -> torch.Tensor:
        """``(B, 2, H, W)`` background/foreground logits from encoded images.

        Args:
            support_features: ``(B, S, C, h, w)``; support_masks: ``(B, S, 1, H, W)``;
            query_features: ``(B, C, h, w)``; size: ``(H, W)`` of the logits.
        """
        batch, shots = support_features.shape[:2]
        features = support_features.flatten(0, 1)
        masks = support_masks.flatten(0, 1)
        foreground = masked_average(features, masks).view(batch, shots, -1).mean(1)
        background = masked_average(features, 1 - masks).view(batch, shots, -1).mean(1)
        prototypes = torch.stack([background, foreground], dim=1)
        logits = cosine_logits(query_features, prototypes, self.scale)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def training_loss(self, batch: EpisodeBatch) -> torch.Tensor:
        batch_size, shots = batch.support_images.shape[:2]
        size = batch.query_images.shape[-2:]
        # Each image is encoded once; the alignment pass reuses the features, as PANet does.
        support_features = self.encoder(batch.support_images.flatten(0, 1))
        support_features = support_features.view(batch_size, shots, *support_features.shape[1:])
        query_features = self.encoder(batch.query_images)
        logits = self._logits(support_features, batch.support_masks, query_features, size)
        loss = F.cross_entropy(logits, batch.query_masks[:, 0].long())
        if self.align_weight > 0:
            # prototype alignment: the query with its predicted mask segments the first support shot
            predicted = logits.softmax(1)[:, 1:2]
            back = self._logits(query_features.unsqueeze(1), predicted.unsqueeze(1), support_features[:, 0],
                               batch.support_images.shape[-2:])
            loss = loss + self.align_weight * F.cross_entropy(back, batch.support_masks[:, 0, 0].long())
        return loss

    def training_loss_reencoded(self, batch: EpisodeBatch) -> torch.Tensor:
        """The naive path :meth:`training_loss` improves on: the alignment pass encodes the
        query and the support again (four encoder passes instead of two; the same loss).
        Kept as the reference it is tested and benchmarked against."""
        def logits_of(support_images, support_masks, query_images):
            batch_size, shots = support_images.shape[:2]
            features = self.encoder(support_images.flatten(0, 1))
            features = features.view(batch_size, shots, *features.shape[1:])
            return self._logits(features, support_masks, self.encoder(query_images), query_images.shape[-2:])

        logits = logits_of(batch.support_images, batch.support_masks, batch.query_images)
        loss = F.cross_entropy(logits, batch.query_masks[:, 0].long())
        if self.align_weight > 0:
            predicted = logits.softmax(1)[:, 1:2]
            back = logits_of(batch.query_images.unsqueeze(1), predicted.unsqueeze(1), batch.support_images[:, 0])
            loss = loss + self.align_weight * F.cross_entropy(back, batch.support_masks[:, 0, 0].long())
        return loss

    def predict(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor
    ) -> torch.Tensor:
        """Support ``(S, 1, H, W)`` is shared by every query slice ``(Q, 1, H, W)``."""
        support_features = self.encoder(support_images)
        foreground = masked_average(support_features, support_masks).mean(0)
        background = masked_average(support_features, 1 - support_masks).mean(0)
        prototypes = torch.stack([background, foreground])[None].expand(query_images.shape[0], 2, -1)
        logits = cosine_logits(self.encoder(query_images), prototypes, self.scale)
        logits = F.interpolate(logits, size=query_images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1).bool()
