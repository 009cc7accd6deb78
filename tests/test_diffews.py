"""DiffewS on the tiny backbone: its fixed choices (whatever the fidelity), the K/V bank
uses the support, the input convs, the null-text conditioning and the method contract."""

from __future__ import annotations

import importlib

import pytest
import torch
from fsmis_methods._sd_attention import (
    KVBankSelfAttnProcessor,
    support_attention_parameters,
)
from fsmis_methods.diffews import DiffewS
from omegaconf import OmegaConf
from test_sdfsmis import (  # noqa: F401  (single_thread: the autouse fixture, shared)
    SIZE,
    blob_masks,
    episode,
    images,
    make_cfg,
    method_config,
    query_output,
    registered_target,
    single_thread,
)


@pytest.fixture(scope="module")
def model() -> DiffewS:
    torch.manual_seed(0)
    method = {k: v for k, v in method_config("diffews").items()}
    return DiffewS(make_cfg(method, fidelity="paper"))


def test_registered_and_configured():
    module, _, attr = registered_target("diffews").partition(":")
    assert getattr(importlib.import_module(module), attr) is DiffewS
    assert method_config("diffews")["name"] == "diffews"


@pytest.mark.parametrize("fidelity", ["paper", "code"])
def test_fixed_choices_ignore_fidelity(fidelity):
    opts = DiffewS.resolve_options(OmegaConf.create({"sii": "cross_attention", "qe": True}), fidelity)
    assert (opts.sii, opts.qe, opts.vtct) == ("kv_concat", False, False)
    assert (opts.objective, opts.timestep) == ("degenerate_t1", 1)
    assert (opts.threshold, opts.threshold_value, opts.lcc) == ("relative", 0.25, False)


def test_architecture(model):
    assert model.support_conv_in.in_channels == 8  # conv_in_ref: image latent ++ mask latent
    assert model.query_conv_in.in_channels == 4  # the pretrained conv_in
    assert model.image_encoder is None and model.vtct_mlp is None
    assert support_attention_parameters(model.unet) == []  # no added layers
    processors = [m.processor for m in model.unet.modules() if hasattr(m, "processor")]
    assert sum(isinstance(p, KVBankSelfAttnProcessor) for p in processors) == len(model.support_attention_keys) > 0
    # null-text conditioning: the tiny backbone's fixed zero embedding, (1, 77, d_text)
    assert model.empty_prompt.shape == (1, 77, 64) and not model.empty_prompt.any()
    groups = model.param_groups()
    assert [g["name"] for g in groups] == ["unet"] and groups[0]["lr"] == 1e-5
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


def test_output_depends_on_support(model):
    model.eval()
    query, mask = images(2, 50), blob_masks(1, seed=1)
    a = query_output(model, images(1, 1), mask, query)
    b = query_output(model, images(1, 2), mask, query)
    c = query_output(model, images(1, 1), blob_masks(1, seed=2), query)
    assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4


def test_training_loss_and_predict_contract(model):
    model.train()
    batch = episode(b=2, s=1)
    loss = model.training_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.support_conv_in.weight.grad.abs().sum() > 0  # the support is trained through the bank
    # the degenerate objective: loss == MSE(-output, mask latent)
    model.zero_grad()
    with torch.no_grad():
        support = model.encode_support(batch.support_images, batch.support_masks)
        output = model.query_pass(model.encode_images(batch.query_images), support)
        expected = torch.nn.functional.mse_loss(output, -model.encode_masks(batch.query_masks))
        assert torch.allclose(model.training_loss(batch), expected, rtol=1e-5)
    model.eval()
    out = model.predict(batch.support_images[0], batch.support_masks[0], images(3, 5))
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.bool
    assert model.uses_random_weights()
