"""Training-episode augmentations (PROTOCOL.md §5), built on MONAI transforms.

Gamma in [0.5, 1.5]; affine (rotate ±5°, translate ±5 px, scale 0.9–1.2, shear ±5°)
followed by elastic deformation (alpha 10, sigma 5). The image and its mask get the same
geometric transform; the mask is resampled with nearest neighbour. Randomness comes from
the caller's generator so that a resumed run draws the same episodes.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class EpisodeAugmenter:
    """Augments one ``(H, W)`` slice and its mask."""

    def __init__(self) -> None:
        from monai.transforms import Rand2DElastic

        degrees = math.radians(5)
        shear = math.tan(math.radians(5))
        # Rand2DElastic applies the affine and the elastic field in one resampling.
        self._geometric = Rand2DElastic(
            spacing=(5, 5),  # control-point spacing ~ sigma 5 px
            magnitude_range=(0, 10 / 5),  # displacement up to ~alpha 10 px spread over sigma 5
            prob=1.0,
            rotate_range=(degrees,),
            shear_range=(shear, shear),
            translate_range=(5, 5),
            scale_range=((-0.1, 0.2), (-0.1, 0.2)),  # MONAI adds 1: scale in 0.9–1.2
            padding_mode="zeros",
        )

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Returns the augmented ``(H, W)`` image and ``(H, W)`` bool mask."""
        lo, hi = float(image.min()), float(image.max())
        span = max(hi - lo, 1e-6)
        gamma = rng.uniform(0.5, 1.5)
        image = ((image - lo) / span) ** gamma * span + lo

        self._geometric.set_random_state(seed=int(rng.integers(2**31 - 1)))
        stacked = torch.from_numpy(np.stack([image, mask.astype(np.float32)])).float()
        self._geometric.randomize(stacked.shape[1:])
        out_image = self._geometric(stacked[:1], randomize=False, mode="bilinear")
        out_mask = self._geometric(stacked[1:], randomize=False, mode="nearest")
        return (
            np.asarray(out_image[0], dtype=np.float32),
            np.asarray(out_mask[0]) > 0.5,
        )
