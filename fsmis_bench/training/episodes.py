"""Self-supervised / supervised training episodes (PROTOCOL.md §5, the ADNet recipe).

Pick a training scan at random, then a class — a supervoxel id, or a GT organ — then a
pair of adjacent slices that both contain it: support = one slice, query = the other
(order inverted with p = 0.5). A pair whose larger mask has fewer than ``min_fg_pixels``
pixels is rejected and the draw starts again. Gamma goes on one side (support or query,
p = 0.5) and affine + elastic on a side drawn independently (p = 0.5), so in half the
episodes the two sides are augmented differently (Q-Net, SD-FSMIS). Slices excluded by the
setting never enter an episode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.base import VolumeDataset, normalise_volume
from ..errors import DataError
from ..method import EpisodeBatch
from ..protocol.settings import EvalGroup, excluded_slices
from .augment import EpisodeAugmenter


@dataclass
class _Case:
    image: np.ndarray  # (Z, H, W) normalised
    classes: np.ndarray  # (Z, H, W) class map (supervoxel ids or GT values)
    pairs: dict[int, np.ndarray]  # class -> (P,) z of pairs (z, z + 1) both containing it


class EpisodeSampler:
    """Draws training episodes for one evaluation group.

    Args:
        dataset: the training dataset.
        cases: training case ids.
        group: the evaluation group (decides excluded slices and GT training organs).
        train_labels: ``"supervoxels"`` or ``"gt"``.
        norm: per-volume normalisation (the method's ``input_norm``).
        min_fg_pixels: rejection threshold on the larger of the two masks.
        augment: gamma on one side, affine + elastic on an independently drawn side.
        image_size: resize slices to ``(image_size, image_size)``; None keeps them.
        seed: seed of the sampler's own generator (its state is checkpointed).
    """

    def __init__(
        self,
        dataset: VolumeDataset,
        cases: list[str],
        group: EvalGroup,
        *,
        train_labels: str = "supervoxels",
        norm: str = "zscore",
        min_fg_pixels: int = 200,
        augment: bool = True,
        image_size: int | None = None,
        seed: int = 0,
    ) -> None:
        self.rng = np.random.default_rng(seed)
        self.min_fg_pixels = min_fg_pixels
        self.image_size = image_size
        self.augmenter = EpisodeAugmenter() if augment else None
        self.cases: list[_Case] = []
        self.excluded_slice_count = 0
        for case_id in cases:
            volume = dataset.load(case_id, with_supervoxels=train_labels == "supervoxels")
            values = [dataset.label_map[o] for o in group.excluded_organs if o in dataset.label_map]
            dropped = excluded_slices(volume.label, values, group.exclusion)
            self.excluded_slice_count += int(dropped.sum())
            if train_labels == "supervoxels":
                classes = volume.supervoxels
            else:
                keep = [dataset.label_map[o] for o in group.train_organs if o in dataset.label_map]
                classes = np.where(np.isin(volume.label, keep), volume.label, 0)
            pairs = self._adjacent_pairs(classes, dropped)
            if pairs:
                self.cases.append(_Case(normalise_volume(volume.image, norm), classes, pairs))
        if not self.cases:
            raise DataError(
                f"no training episode can be drawn from {len(cases)} {dataset.name} scans "
                f"(labels={train_labels}, excluded organs={list(group.excluded_organs)})",
                hint="check the supervoxels (`fsmis-bench check-data`) or the setting",
            )

    @staticmethod
    def _adjacent_pairs(classes: np.ndarray, dropped: np.ndarray) -> dict[int, np.ndarray]:
        """For each class, the z of every adjacent slice pair (z, z+1) that both contain it."""
        present: list[set[int]] = []
        for z in range(classes.shape[0]):
            ids = set() if dropped[z] else set(np.unique(classes[z]).tolist())
            ids.discard(0)
            present.append(ids)
        pairs: dict[int, list[int]] = {}
        for z in range(classes.shape[0] - 1):
            for cls in present[z] & present[z + 1]:
                pairs.setdefault(cls, []).append(z)
        return {cls: np.asarray(zs) for cls, zs in pairs.items()}

    # -- checkpointing of the random stream ------------------------------------------
    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    # -- drawing ------------------------------------------------------------------------
    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One episode: support image, support mask, query image, query mask, each ``(H, W)``."""
        for _ in range(10_000):
            case = self.cases[self.rng.integers(len(self.cases))]
            class_ids = list(case.pairs)
            cls = class_ids[self.rng.integers(len(class_ids))]
            z = int(case.pairs[cls][self.rng.integers(len(case.pairs[cls]))])
            first, second = case.classes[z] == cls, case.classes[z + 1] == cls
            if max(first.sum(), second.sum()) < self.min_fg_pixels:
                continue
            slices = [self._fit(case.image[z], first), self._fit(case.image[z + 1], second)]
            if self.rng.uniform() < 0.5:
                slices.reverse()
            if self.augmenter is not None:
                gamma_side = int(self.rng.uniform() < 0.5)  # 0: support, 1: query
                image, mask = slices[gamma_side]
                slices[gamma_side] = (self.augmenter.gamma(image, self.rng), mask)
                geometric_side = int(self.rng.uniform() < 0.5)  # drawn independently
                slices[geometric_side] = self.augmenter.geometric(*slices[geometric_side], self.rng)
            (support_image, support_mask), (query_image, query_mask) = slices
            return support_image, support_mask, query_image, query_mask
        raise DataError(
            f"no training pair reaches {self.min_fg_pixels} foreground pixels after 10000 draws",
            hint="lower protocol.min_fg_pixels, or check the training labels",
        )

    def _fit(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Resize to the training size first, so augmentation runs at the model's size."""
        if self.image_size is None or image.shape == (self.image_size, self.image_size):
            return image, mask
        image = resize_slices(torch.from_numpy(image)[None], self.image_size)[0].numpy()
        mask = resize_slices(torch.from_numpy(mask.astype(np.float32))[None], self.image_size, nearest=True)[0].numpy()
        return image, mask > 0.5

    def batch(self, batch_size: int) -> EpisodeBatch:
        """``batch_size`` episodes as tensors (one support shot)."""
        episodes = [self.sample() for _ in range(batch_size)]
        stack = [torch.from_numpy(np.stack([e[k] for e in episodes]).astype(np.float32)) for k in range(4)]
        support_images, support_masks, query_images, query_masks = (t.unsqueeze(1) for t in stack)
        return EpisodeBatch(
            support_images=support_images.unsqueeze(1),
            support_masks=support_masks.unsqueeze(1),
            query_images=query_images,
            query_masks=query_masks,
        )


def resize_slices(
    slices: torch.Tensor, size: int | tuple[int, int] | None, nearest: bool = False
) -> torch.Tensor:
    """Resize ``(N, H, W)`` slices to ``(N, size, size)`` or ``(N, *size)`` (masks: nearest)."""
    if size is None:
        return slices
    shape = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(slices.shape[-2:]) == shape:
        return slices
    mode = "nearest" if nearest else "bilinear"
    kwargs = {} if nearest else {"align_corners": False}
    return F.interpolate(slices.unsqueeze(1).float(), size=shape, mode=mode, **kwargs).squeeze(1)
