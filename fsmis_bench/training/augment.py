"""Training-episode augmentations (PROTOCOL.md §5).

Two independent parts, each applied to one side of an episode that the sampler draws on
its own (Q-Net, SD-FSMIS): :meth:`EpisodeAugmenter.gamma`, gamma in [0.5, 1.5];
:meth:`EpisodeAugmenter.geometric`, affine (rotate ±5°, translate ±5 px, scale 0.9–1.2, shear ±5°)
followed by elastic deformation (alpha 10, sigma 5, the Simard/scipy convention:
a uniform random displacement field smoothed by a Gaussian of ``sigma`` px and scaled by
``alpha``). Affine and elastic are composed into one sampling grid, so the image is
interpolated once; the mask takes the same grid with nearest-neighbour sampling.
Randomness comes from the caller's generator so that a resumed run draws the same
episodes.

``form="sdfsmis_code"`` is the released SD-FSMIS training code's variant
(``evaluation_util/data/Medical.py``): every elastic deformation uses the same fixed
displacement fields, drawn from ``np.random.RandomState(2025)`` at every call (``reflect``
smoothing), and gamma acts on the images mapped from [-1, 1] to [0, 1] and clamped there,
not on each slice's own range. That code hands one generator to the image's deformation
and then to the mask's, so the image takes the generator's first two fields and its mask
the next two: image and mask are deformed differently (up to ~2 px apart at 256 px), and
this form does so too. ``sdfsmis_code_shared_field`` deforms the mask with the image's
field (fsmis-bench's earlier reading, kept so that earlier runs can be reproduced). The sampler applies the geometric part
before gamma in that form, as that code does. (MONAI's ``Rand2DElastic`` does the same job but cost ~0.3 s per 256² slice on
2 cores, which dominated CPU training; this costs about a millisecond.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

AUGMENT_FORMS = ("standard", "sdfsmis_code", "sdfsmis_code_shared_field")
#: the forms of the released SD-FSMIS code: fixed elastic fields, gamma on [0, 1]
CODE_FORMS = ("sdfsmis_code", "sdfsmis_code_shared_field")
#: the seed of the released SD-FSMIS code's elastic field (Medical.py)
SDFSMIS_CODE_ELASTIC_SEED = 2025


class EpisodeAugmenter:
    """Augments one ``(H, W)`` slice and its mask."""

    def __init__(
        self,
        gamma: tuple[float, float] = (0.5, 1.5),
        rotate_deg: float = 5.0,
        translate_px: float = 5.0,
        scale: tuple[float, float] = (0.9, 1.2),
        shear_deg: float = 5.0,
        elastic_alpha: float = 10.0,
        elastic_sigma: float = 5.0,
        form: str = "standard",
    ) -> None:
        if form not in AUGMENT_FORMS:
            raise ValueError(f"augmentation form {form!r}: expected one of {AUGMENT_FORMS}")
        self.form = form
        self._fixed_fields: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.gamma_range = gamma
        self.rotate = math.radians(rotate_deg)
        self.translate = translate_px
        self.scale = scale
        self.shear = math.radians(shear_deg)
        self.alpha = elastic_alpha
        self.sigma = elastic_sigma

    def grid(self, height: int, width: int, rng: np.random.Generator) -> torch.Tensor:
        """``(1, H, W, 2)`` sampling grid in normalised coordinates (affine then elastic)."""
        return self._grids(height, width, rng)[0]

    def _grids(self, height: int, width: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's and the mask's ``(1, H, W, 2)`` sampling grids: one affine, then the
        elastic field of each (the same one except in the ``sdfsmis_code`` form)."""
        angle = rng.uniform(-self.rotate, self.rotate)
        shear = rng.uniform(-self.shear, self.shear)
        scale = rng.uniform(*self.scale)
        shift = rng.uniform(-self.translate, self.translate, size=2)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        shearing = np.array([[1.0, math.tan(shear)], [0.0, 1.0]])
        # The grid maps output to input coordinates, hence the inverse of the forward map.
        forward = rotation @ shearing * scale
        inverse = np.linalg.inv(forward)
        offset = -inverse @ (shift * 2 / np.array([width, height]))
        theta = torch.tensor(np.concatenate([inverse, offset[:, None]], axis=1), dtype=torch.float32)[None]
        grid = F.affine_grid(theta, [1, 1, height, width], align_corners=False)
        if self.form in CODE_FORMS:
            image_field, mask_field = self._fixed_fields_of(height, width)
            if self.form == "sdfsmis_code_shared_field":
                mask_field = image_field
        else:
            image_field = mask_field = np.stack(
                [gaussian_filter(rng.uniform(-1, 1, size=(height, width)), self.sigma, mode="constant") * self.alpha
                 for _ in range(2)],
                axis=-1,
            )
        # Pixels -> normalised units (x first in grid_sample's last axis).
        scale = 2 / np.array([width, height])
        image_grid = grid + torch.from_numpy((image_field * scale).astype(np.float32))[None]
        if mask_field is image_field:
            return image_grid, image_grid
        return image_grid, grid + torch.from_numpy((mask_field * scale).astype(np.float32))[None]

    def _fixed_fields_of(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The code form's image and mask displacement fields ``(H, W, 2)`` in pixels, x then
        y: the first and the second pair of draws of one ``RandomState(2025)``."""
        if (height, width) not in self._fixed_fields:
            state = np.random.RandomState(SDFSMIS_CODE_ELASTIC_SEED)
            fields = []
            for _ in range(2):  # the image's deformation draws first, then its mask's
                dx = gaussian_filter(state.rand(height, width) * 2 - 1, self.sigma, mode="reflect") * self.alpha
                dy = gaussian_filter(state.rand(height, width) * 2 - 1, self.sigma, mode="reflect") * self.alpha
                fields.append(np.stack([dx, dy], axis=-1))
            self._fixed_fields[(height, width)] = (fields[0], fields[1])
        return self._fixed_fields[(height, width)]

    def gamma(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Gamma on the intensities rescaled to [0, 1], mapped back: ``(H, W)`` -> ``(H, W)``.

        Standard form: each slice's own range is rescaled. Code form: the [-1, 1] images are
        mapped to [0, 1] and clamped (torchvision's ``adjust_gamma``)."""
        if self.form in CODE_FORMS:
            unit = np.clip((image + 1.0) / 2.0, 0.0, 1.0)
            return (unit ** rng.uniform(*self.gamma_range) * 2.0 - 1.0).astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        span = max(hi - lo, 1e-6)
        return (((image - lo) / span) ** rng.uniform(*self.gamma_range) * span + lo).astype(np.float32)

    def geometric(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Affine then elastic: image bilinear, mask nearest, on one grid (on two in the
        ``sdfsmis_code`` form: see the module docstring)."""
        image_grid, mask_grid = self._grids(*image.shape, rng)
        pair = torch.from_numpy(np.stack([image, mask]).astype(np.float32))[:, None]
        warped_image = F.grid_sample(pair[:1], image_grid, mode="bilinear", padding_mode="border", align_corners=False)
        warped_mask = F.grid_sample(pair[1:], mask_grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return warped_image[0, 0].numpy(), warped_mask[0, 0].numpy() > 0.5

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both parts on one slice: the augmented ``(H, W)`` float32 image and ``(H, W)`` bool mask."""
        return self.geometric(self.gamma(image, rng), mask, rng)
