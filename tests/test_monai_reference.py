"""The episode pipeline's intensity normalisation and resizing against MONAI, an
implementation no one here wrote, and why each keeps its own lines (README, "MONAI").

* Resizing (``resize_slices``): MONAI's ``Resize`` gives the same values bit for bit; it
  builds a MetaTensor on every call, which costs more than the interpolation itself
  (``benchmarks/test_bench_resize.py``), on every episode.
* ``minmax``: MONAI's ``ScaleIntensity`` gives the same values bit for bit, except for a
  constant volume, which it maps to ``-value`` instead of ``-1``.
* ``zscore``: MONAI's ``NormalizeIntensity`` sums in torch, another order than numpy's, so
  on some volumes the last bits differ, which would change recorded numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity, Resize, ScaleIntensity

from fsmis_bench.data.base import normalise_volume
from fsmis_bench.training.episodes import resize_slices


def _volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """MR-like intensities: positive, skewed."""
    return np.random.default_rng(seed).gamma(2.0, 300.0, size=shape).astype(np.float32)


@pytest.mark.parametrize("size", [(64, 64), (128, 128), (200, 200), (96, 160), (300, 300)],
                         ids=["64", "128", "200", "96x160", "300-up"])
@pytest.mark.parametrize("nearest", [False, True], ids=["bilinear", "nearest"])
def test_resize_slices_is_monai_resize_bit_for_bit(size, nearest):
    slices = torch.from_numpy(normalise_volume(_volume((3, 256, 232)), "zscore"))
    if nearest:
        slices = (slices > 0.5).float()
    resize = Resize(size, mode="nearest" if nearest else "bilinear", **({} if nearest else {"align_corners": False}))
    # slice by slice, as the sampler resizes; MONAI would take a stack as channels, and with
    # one thread torch's bilinear kernel rounds several channels differently from one
    theirs = torch.cat([torch.as_tensor(resize(one[None])).as_subclass(torch.Tensor) for one in slices])
    ours = resize_slices(slices, size, nearest=nearest)
    assert ours.shape == (3, *size)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(7, 33, 45), (3, 97, 131), (20, 256, 256)])
def test_minmax_is_monai_scale_intensity_bit_for_bit(shape):
    volume = _volume(shape)
    theirs = np.asarray(ScaleIntensity(minv=-1.0, maxv=1.0)(volume.copy()))
    assert np.array_equal(normalise_volume(volume, "minmax"), theirs)


def test_minmax_of_a_constant_volume_is_minus_one_where_monai_gives_minus_the_value():
    constant = np.full((2, 8, 8), 5.0, np.float32)
    assert np.all(normalise_volume(constant, "minmax") == -1.0)
    assert np.all(np.asarray(ScaleIntensity(minv=-1.0, maxv=1.0)(constant.copy())) == -5.0)


def test_zscore_is_monai_normalize_intensity_up_to_the_last_bits():
    volume = _volume((3, 97, 131))
    ours = normalise_volume(volume, "zscore")
    theirs = np.asarray(NormalizeIntensity()(volume.copy()))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(ours, theirs)  # another summation order: why zscore keeps numpy's
