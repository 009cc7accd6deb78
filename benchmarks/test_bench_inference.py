"""SD-FSMIS inference on one EP1 chunk: support encoded once + query slices batched
(what ``SDFSMIS.predict`` does) vs the naive path that re-runs the support for every slice.

Tiny backbone (tiny U-Net, random TAESD, tiny ViT) on the CPU, 128 px slices (16 x 16
latents), 12 query slices, paper configuration (SII cross-attention, QE, VTCT).

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/test_bench_inference.py --benchmark-only
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fsmis_methods.sdfsmis import SDFSMIS

REPO = Path(__file__).resolve().parents[1]
SIZE = 128
QUERY_SLICES = 12


def predict_per_slice(model: SDFSMIS, support_images, support_masks, query_images) -> torch.Tensor:
    """Naive: the whole support side (VAE, VTCT, U-Net support pass) recomputed per slice."""
    with torch.no_grad():
        out = []
        for query in query_images.split(1):
            support = model.encode_support(support_images[None], support_masks[None])
            latents = model.encode_images(query)
            estimate = model.mask_latent_estimate(model.query_pass(latents, support), latents)
            out.append(model.decode_masks(estimate, tuple(query.shape[-2:])))
        return torch.cat(out)


@pytest.fixture(scope="module")
def chunk():
    torch.manual_seed(0)
    backbone = OmegaConf.load(REPO / "configs" / "backbone" / "tiny.yaml")
    method = OmegaConf.load(REPO / "configs" / "method" / "sdfsmis.yaml").method
    cfg = OmegaConf.create(
        {"pretrained": False, "weights_root": None, "fidelity": "paper", "backbone": backbone,
         "method": method, "train": {"image_size": SIZE}}
    )
    model = SDFSMIS(cfg).eval()
    support = torch.rand(1, 1, SIZE, SIZE) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 32:96, 40:100] = 1.0
    queries = torch.rand(QUERY_SLICES, 1, SIZE, SIZE) * 2 - 1
    return model, support, mask, queries


@pytest.mark.benchmark(group="sdfsmis-inference-12-slices")
def test_cached_support_batched_queries(benchmark, chunk):
    model, support, mask, queries = chunk
    out = benchmark.pedantic(model.predict, args=(support, mask, queries), rounds=3, warmup_rounds=1)
    assert out.shape == (QUERY_SLICES, SIZE, SIZE)


@pytest.mark.benchmark(group="sdfsmis-inference-12-slices")
def test_naive_support_per_slice(benchmark, chunk):
    model, support, mask, queries = chunk
    out = benchmark.pedantic(predict_per_slice, args=(model, support, mask, queries), rounds=3, warmup_rounds=1)
    assert torch.equal(out, model.predict(support, mask, queries))
