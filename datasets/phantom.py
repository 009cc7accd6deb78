"""Procedural abdominal phantoms: the embedded default dataset, no files needed.

Each case is a body ellipse with a liver, a spleen and two kidneys as smooth, randomly
placed and deformed ellipsoids, with organ-specific intensities (CT-like or MRI-like),
a smooth bias field and noise. Supervoxels are a 3-D block partition of the body split by
intensity level, so self-supervised training has organ-like pseudo-classes. Everything is
a deterministic function of ``(seed, case index)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fsmis_bench.data.base import Volume, VolumeDataset
from fsmis_bench.protocol.folds import folds_for

# Mean intensity per tissue: (background, body, liver, right kidney, left kidney, spleen)
_CONTRAST = {
    "ct": (0.0, 120.0, 150.0, 190.0, 190.0, 165.0),
    "mri": (0.0, 300.0, 520.0, 820.0, 820.0, 680.0),
}
# Organ centres (y, x as fractions of the size), radii (fractions), z extent (fraction of Z)
_ORGANS = {
    1: ((0.45, 0.33), (0.22, 0.17), (0.15, 0.85)),  # liver, image left = patient right
    2: ((0.60, 0.36), (0.10, 0.075), (0.30, 0.80)),  # right kidney
    3: ((0.60, 0.66), (0.10, 0.075), (0.25, 0.75)),  # left kidney
    4: ((0.42, 0.72), (0.12, 0.09), (0.20, 0.65)),  # spleen
}


class Phantom(VolumeDataset):
    """Synthetic CHAOS-like dataset.

    Options (config group ``dataset/phantom.yaml``): ``n_cases`` (10), ``size`` (H = W,
    128), ``n_slices`` (24), ``modality`` (``mri`` | ``ct``), ``seed`` (0).
    """

    label_map = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    test_organs = ("spleen", "liver", "left_kidney", "right_kidney")
    setting2_groups = (("liver", "spleen"), ("left_kidney", "right_kidney"))
    has_file_geometry = False

    def __init__(self, root=None, **options) -> None:
        super().__init__(None, **options)
        self.n_cases = int(options.get("n_cases", 10))
        self.size = int(options.get("size", 128))
        self.n_slices = int(options.get("n_slices", 24))
        self.modality = str(options.get("modality", "mri"))
        self.seed = int(options.get("seed", 0))
        if self.modality not in _CONTRAST:
            from fsmis_bench.errors import ConfigError

            raise ConfigError(f"phantom modality {self.modality!r} is unknown", hint="use mri or ct")

    @property
    def folds(self):  # type: ignore[override]
        return folds_for(self.n_cases)

    def _case_ids(self) -> list[str]:
        return [str(i + 1) for i in range(self.n_cases)]

    def _load(self, case_id: str, with_supervoxels: bool) -> Volume:
        rng = np.random.default_rng([self.seed, int(case_id)])
        z_size, size = self.n_slices, self.size
        zz, yy, xx = np.meshgrid(
            np.linspace(0, 1, z_size), np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij"
        )
        body_radius = rng.uniform(0.40, 0.46, size=2)
        body = ((yy - 0.5) / body_radius[0]) ** 2 + ((xx - 0.5) / body_radius[1]) ** 2 < 1.0
        label = np.zeros((z_size, size, size), dtype=np.int32)
        for value, ((cy, cx), (ry, rx), (z0, z1)) in _ORGANS.items():
            cy, cx = cy + rng.normal(0, 0.02), cx + rng.normal(0, 0.02)
            ry, rx = ry * rng.uniform(0.85, 1.15), rx * rng.uniform(0.85, 1.15)
            zc, zr = (z0 + z1) / 2 + rng.normal(0, 0.03), (z1 - z0) / 2 * rng.uniform(0.9, 1.1)
            # Radius shrinks towards the organ's z ends, with a smooth random wobble.
            taper = np.sqrt(np.clip(1 - ((zz - zc) / zr) ** 2, 0, 1))
            wobble = 1 + 0.08 * np.sin(2 * np.pi * (rng.uniform() + 2 * yy + 3 * xx))
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < (taper * wobble) ** 2
            label[inside & body & (label == 0)] = value

        means = _CONTRAST[self.modality]
        image = np.full(label.shape, means[0], dtype=np.float32)
        image[body] = means[1]
        for value in _ORGANS:
            image[label == value] = means[value + 1] * rng.uniform(0.95, 1.05)
        bias = 1 + 0.1 * np.sin(np.pi * (yy + rng.uniform())) * np.cos(np.pi * (xx + rng.uniform()))
        image = image * bias + rng.normal(0, 0.04 * means[1], size=image.shape)
        image = ndimage.gaussian_filter(image, sigma=(0.5, 1.0, 1.0)).astype(np.float32)
        image = np.clip(image, 0, None)

        supervoxels = self._supervoxels(image, body) if with_supervoxels else None
        return Volume(case_id, image, label, supervoxels, (4.0, 2.5, 2.5))

    def _supervoxels(self, image: np.ndarray, body: np.ndarray) -> np.ndarray:
        """Blocks of the body split by intensity level: organ-sized pseudo-classes."""
        z_size, size = image.shape[0], image.shape[1]
        block = max(size // 6, 4)
        zi, yi, xi = np.meshgrid(
            np.arange(z_size) // 8, np.arange(size) // block, np.arange(size) // block, indexing="ij"
        )
        levels = np.digitize(ndimage.gaussian_filter(image, 1.5), np.quantile(image[body], [0.5, 0.85]))
        ids = ((zi * 64 + yi) * 64 + xi) * 3 + levels
        ids = np.where(body, ids + 1, 0)
        _, relabelled = np.unique(ids, return_inverse=True)
        return relabelled.reshape(image.shape).astype(np.int32)
