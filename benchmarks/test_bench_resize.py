"""One training slice resized to the model's size, as the episode sampler does it twice per
episode (image and mask): ``resize_slices`` (``F.interpolate``) against MONAI's ``Resize``,
which gives the same values bit for bit (``tests/test_monai_reference.py``) and wraps the
same interpolation in a MetaTensor.

    .venv/bin/python -m pytest benchmarks/test_bench_resize.py --benchmark-only -p no:xdist
"""

from __future__ import annotations

import pytest
import torch
from monai.transforms import Resize

from fsmis_bench.training.episodes import resize_slices

SIZE = 128


@pytest.fixture(scope="module")
def one_slice() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(1, 256, 256)


@pytest.mark.benchmark(group="resize-one-slice")
def test_resize_slices(benchmark, one_slice):
    out = benchmark(resize_slices, one_slice, SIZE)
    assert out.shape == (1, SIZE, SIZE)


@pytest.mark.benchmark(group="resize-one-slice")
def test_monai_resize(benchmark, one_slice):
    resize = Resize((SIZE, SIZE), mode="bilinear", align_corners=False)
    out = benchmark(resize, one_slice)
    assert torch.equal(torch.as_tensor(out).as_subclass(torch.Tensor), resize_slices(one_slice, SIZE))
