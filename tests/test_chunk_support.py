"""Which support slices a query chunk is segmented with (``protocol.chunk_support``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsmis_bench.evaluation import predict_case
from fsmis_bench.protocol.ep1 import QueryCase, SupportSlices


class _Recorder(torch.nn.Module):
    """A method whose prediction is empty; it keeps the support each call was given."""

    def __init__(self):
        super().__init__()
        self.supports: list[tuple[torch.Tensor, torch.Tensor]] = []

    def predict(self, support_images, support_masks, query_images):
        self.supports.append((support_images.clone(), support_masks.clone()))
        return torch.zeros(query_images.shape[0], *query_images.shape[-2:], dtype=torch.bool)


def _episode(n_part=3, shots=2, size=8):
    # support slice (part p, shot s) has the value 10 p + s everywhere; its mask the pixel (p, s)
    images = np.array([[np.full((size, size), 10.0 * p + s, np.float32) for s in range(shots)] for p in range(n_part)])
    masks = np.zeros((n_part, shots, size, size), bool)
    for p in range(n_part):
        for s in range(shots):
            masks[p, s, p, s] = True
    support = SupportSlices(["a", "b"][:shots], np.zeros((n_part, shots), int), images, masks)
    query = QueryCase("q", np.arange(6), np.zeros((6, size, size), np.float32), np.zeros((6, size, size), bool),
                      [0, 2, 4, 6])
    return support, query


@pytest.mark.parametrize("chunk_support", ["matched", "all"])
def test_each_chunk_gets_its_support_slices(chunk_support):
    support, query = _episode()
    method = _Recorder()
    predict_case(method, support, query, torch.device("cpu"), None, chunk_support=chunk_support)
    assert len(method.supports) == 3  # one call per chunk
    for part, (images, masks) in enumerate(method.supports):
        values = images[:, 0, 0, 0].tolist()
        if chunk_support == "matched":  # EP1: chunk i, slice i of each shot
            assert values == [10.0 * part + s for s in range(2)]
        else:  # released SD-FSMIS test: all n_part slices of every shot, part by part
            assert values == [10.0 * p + s for p in range(3) for s in range(2)]
        # each mask travels with its own image
        for image, mask in zip(images[:, 0], masks[:, 0]):
            p, s = divmod(int(image[0, 0]), 10)
            assert torch.nonzero(mask).tolist() == [[p, s]]
