"""SD-FSMIS inference on one EP1 chunk: support encoded once + query slices batched
(what ``SDFSMIS.predict`` does) vs the naive path that re-runs the support for every slice.

Tiny backbone (tiny U-Net, tiny ViT) on the CPU, 12 query slices, paper configuration (SII
cross-attention, QE, VTCT), with two codecs: the backbone's TAESD (random weights) at 128 px
(16 x 16 latents; the VAE dominates the time), and the parameter-free identity codec at 64 px
(32 x 32 latents, SD's grid at 256 px; the U-Net dominates).

    .venv/bin/python -m pytest benchmarks/test_bench_inference.py --benchmark-only --benchmark-group-by=param:chunk
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsmis_methods.sdfsmis import SDFSMIS
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
QUERY_SLICES = 12


@pytest.fixture(scope="module", params=[("taesd", 128), ("identity", 64)], ids=["taesd128", "identity64"])
def chunk(request):
    vae, size = request.param
    # one intra-op thread: stable figures on a shared 2-core machine (spinning OpenMP
    # threads make two-thread timings swing several-fold when other processes run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = OmegaConf.load(REPO / "configs" / "backbone" / "tiny.yaml")
    backbone.vae = vae
    method = OmegaConf.load(REPO / "configs" / "method" / "sdfsmis.yaml").method
    cfg = OmegaConf.create(
        {"pretrained": False, "weights_root": None, "fidelity": "paper", "backbone": backbone,
         "method": method, "train": {"image_size": size}}
    )
    model = SDFSMIS(cfg).eval()
    support = torch.rand(1, 1, size, size) * 2 - 1
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 3 : 3 * size // 4] = 1.0
    queries = torch.rand(QUERY_SLICES, 1, size, size) * 2 - 1
    yield model, support, mask, queries
    torch.set_num_threads(threads)


@pytest.mark.benchmark(group="sdfsmis-inference-12-slices")
def test_cached_support_batched_queries(benchmark, chunk):
    model, support, mask, queries = chunk
    out = benchmark.pedantic(model.predict, args=(support, mask, queries), rounds=3, warmup_rounds=1)
    assert out.shape == (QUERY_SLICES, *support.shape[-2:])


@pytest.mark.benchmark(group="sdfsmis-inference-12-slices")
def test_naive_support_per_slice(benchmark, chunk):
    model, support, mask, queries = chunk
    out = benchmark.pedantic(model.predict_uncached, args=(support, mask, queries), rounds=3, warmup_rounds=1)
    assert torch.equal(out, model.predict(support, mask, queries))
