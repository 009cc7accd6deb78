"""SD-FSMIS on the tiny backbone: QE pinned by hand, SII uses the support in both forms,
frozen parts stay frozen, Marigold init, the K/V bank's shot layout, the objectives and the
numerics of the epsilon t = 999 read-out against float64, the mask read-out, the code-form
options, the registered variants' contract, and (slow) overfitting a real CHAOS episode with
each objective on an epsilon-prediction U-Net."""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fsmis_methods._sd_attention import AttentionBank, support_attention_parameters
from fsmis_methods._sd_unet import Float32Conv2d
from fsmis_methods.sdfsmis import (
    FIDELITY_DEFAULTS,
    SDFSMIS,
    SDFSMISQe,
    SDFSMISSii,
    SDFSMISVtct,
    SupportContext,
    largest_component,
    masked_average,
    masked_token_average,
    query_prototype_cosine,
    query_prototype_fg_bg,
    sd_alphas_cumprod,
    support_prototypes,
    threshold_decoded,
    topk_count,
)
from omegaconf import DictConfig, OmegaConf

from fsmis_bench.errors import ConfigError
from fsmis_bench.method import EpisodeBatch

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # identity codec: 32 px -> 16 x 16 latents (small, for 2 CPU cores)
OVERFIT_SIZE = 32  # -> 16 x 16 latents (SD's grid at 256 px is 32 x 32; 4x cheaper steps)

TINY_BACKBONE = {
    "name": "tiny",
    "unet": "tiny",
    "vae": "identity",
    "cross_attention_dim": 64,
    "image_encoder": "tiny",
    "source": None,
    "vae_source": None,
    "image_encoder_source": None,
    "prediction_type": "epsilon",
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread for these small models: as fast as two on an idle 2-core machine,
    and immune to the slowdown of spinning OpenMP threads when other processes load the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_cfg(method: dict | None = None, fidelity: str = "paper", **backbone) -> DictConfig:
    return OmegaConf.create(
        {
            "pretrained": False,
            "weights_root": None,
            "fidelity": fidelity,
            "backbone": {**TINY_BACKBONE, **backbone},
            "method": {"name": "sdfsmis", **(method or {})},
            "train": {"image_size": SIZE},
        }
    )


def build(cls=SDFSMIS, method: dict | None = None, fidelity: str = "paper", seed: int = 0, **backbone):
    torch.manual_seed(seed)
    return cls(make_cfg(method, fidelity, **backbone))


def blob_masks(n: int, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` masks with one rectangle each."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        y, x = torch.randint(4, size // 2, (2,), generator=g).tolist()
        h, w = torch.randint(8, size // 2, (2,), generator=g).tolist()
        masks[i, :, y : y + h, x : x + w] = 1.0
    return masks


def images(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1


def episode(b: int = 2, s: int = 1, seed: int = 0) -> EpisodeBatch:
    return EpisodeBatch(
        support_images=images(b * s, seed).view(b, s, 1, SIZE, SIZE),
        support_masks=blob_masks(b * s, seed=seed).view(b, s, 1, SIZE, SIZE),
        query_images=images(b, seed + 100),
        query_masks=blob_masks(b, seed=seed + 100),
    )


def query_output(model: SDFSMIS, support_images, support_masks, query_images) -> torch.Tensor:
    """Raw U-Net output of the query pass, ``(Q, 4, h, w)``."""
    with torch.no_grad():
        support = model.encode_support(support_images[None], support_masks[None])
        return model.query_pass(model.encode_images(query_images), support)


# ---------------------------------------------------------------------------------------
# QE, pinned against hand-computed prototypes
# ---------------------------------------------------------------------------------------
# three query positions on a 1 x 3 latent grid, 2 channels: [1, 0], [0, 1], [1, 1]
QUERY = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])  # (1, 2, 1, 3)


def test_masked_average_by_hand():
    features = torch.tensor([[[[[1.0, 3.0]], [[2.0, 4.0]]], [[[5.0, 7.0]], [[6.0, 8.0]]]]])  # (1, S=2, C=2, 1, 2)
    weights = torch.tensor([[[[[1.0, 0.0]]], [[[0.5, 0.5]]]]])  # (1, 2, 1, 1, 2)
    # (1*[1,2] + 0.5*[5,6] + 0.5*[7,8]) / 2 = ([1,2] + [6,7]) / 2
    assert torch.allclose(masked_average(features, weights), torch.tensor([[3.5, 4.5]]))


def test_qe_paper_cosine_by_hand():
    # cos to P_s = [1, 0]: 1, 0, 0.7071 -> positions 0 and 2 pass tau = 0.7
    proto = query_prototype_cosine(QUERY, torch.tensor([[1.0, 0.0]]), tau=0.7, k=1)
    assert torch.allclose(proto, torch.tensor([[1.0, 0.5]]))
    # tau = 0.75: only position 0
    proto = query_prototype_cosine(QUERY, torch.tensor([[1.0, 0.0]]), tau=0.75, k=1)
    assert torch.allclose(proto, torch.tensor([[1.0, 0.0]]))


def test_qe_paper_fallback_when_nothing_passes_tau():
    # cos to [1, -1]: 0.7071, -0.7071, 0 -> nothing passes 0.8; top-1 = position 0, top-2 adds position 2
    p_s = torch.tensor([[1.0, -1.0]])
    assert torch.allclose(query_prototype_cosine(QUERY, p_s, tau=0.8, k=1), torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(query_prototype_cosine(QUERY, p_s, tau=0.8, k=2), torch.tensor([[1.0, 0.5]]))


def test_qe_code_fg_bg_softmax_by_hand():
    fg, bg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    # cos_fg = 1, 0, .7071; cos_bg = 0, 1, .7071 -> p_fg = e/(e+1) = 0.731, 0.269, 0.5
    p_fg = torch.softmax(torch.tensor([[1.0, 0.0, 0.7071], [0.0, 1.0, 0.7071]]), dim=0)[0]
    assert p_fg[0] > 0.7 > p_fg[2]
    assert torch.allclose(query_prototype_fg_bg(QUERY, fg, bg, tau=0.7, k=2), torch.tensor([[1.0, 0.0]]))
    # nothing reaches 0.8: top-2 by p_fg = positions 0 and 2
    assert torch.allclose(query_prototype_fg_bg(QUERY, fg, bg, tau=0.8, k=2), torch.tensor([[1.0, 0.5]]))
    # per-episode fallback: episode 0 selects normally; episode 1 (positions [0,1], [1,1],
    # [1,1]: p_fg = .269, .5, .5) has nothing above 0.7 and falls back to its top-1, a [1, 1]
    query = torch.cat([QUERY, torch.tensor([[[[0.0, 1.0, 1.0]], [[1.0, 1.0, 1.0]]]])])
    out = query_prototype_fg_bg(query, fg.repeat(2, 1), bg.repeat(2, 1), tau=0.7, k=1)
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def test_topk_count_matches_code():
    assert topk_count(32, 0.1875) == 6
    assert topk_count(2, 0.1875) == 1


def test_support_prototypes_are_masked_latent_averages():
    model = build(SDFSMISQe)
    support, mask = images(1, 3), torch.zeros(1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2, :] = 1.0  # top half -> exactly the top half of the latent rows
    context = model.encode_support(support[None], mask[None])
    latents = F.pixel_unshuffle(support, 2)[0]  # the identity codec's latent
    half = SIZE // 4
    assert torch.allclose(context.fg_prototype[0], latents[:, :half].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(context.bg_prototype[0], latents[:, half:].mean(dim=(1, 2)), atol=1e-6)


def test_masked_token_average_by_hand():
    tokens = torch.arange(4.0).view(1, 4, 1)  # 2 x 2 grid
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1.0  # exactly the top-left patch
    assert masked_token_average(tokens, mask, (2, 2)).item() == pytest.approx(0.0)
    mask[..., :4, :] = 1.0  # top row
    assert masked_token_average(tokens, mask, (2, 2)).item() == pytest.approx(0.5)


def test_a_mask_below_every_patch_pools_soft_by_default_and_nothing_in_the_code_form():
    """``FeatureToConditioningMLP.py``: the mask is resized bilinearly to the patch grid,
    thresholded at > 0.5, and the tokens are summed under it and divided by its sum + 1e-6,
    so a support mask that covers no patch's centre gives a zero feature."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 16, 5, generator=generator)  # 4 x 4 grid
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 2:4, 2:4] = 1.0  # 4 px at the first patch's centre: 0.25 there after resizing
    masks[1, :, 0:16, 0:16] = 1.0  # the top-left 2 x 2 patches
    # the reference's steps on the same inputs
    resized = F.interpolate(masks, size=(4, 4), mode="bilinear", align_corners=False)
    hard = (resized > 0.5).float()
    spatial = tokens.reshape(2, 4, 4, 5).permute(0, 3, 1, 2)
    expected = (spatial * hard).sum(dim=[2, 3]) / (hard.sum(dim=[2, 3]) + 1e-6)
    code = masked_token_average(tokens, masks, (4, 4), empty="zero")
    assert torch.allclose(code, expected, atol=1e-6)
    assert torch.count_nonzero(code[0]) == 0
    paper = masked_token_average(tokens, masks, (4, 4))
    assert torch.allclose(paper[0], tokens[0, 0], atol=1e-6)  # only the first patch has weight
    assert torch.allclose(paper[1], code[1], atol=1e-5)  # a mask over whole patches: the same


def test_the_soft_fallback_sees_an_organ_between_the_pixels_bilinear_resizing_reads():
    """256 -> 16 bilinear (no antialiasing) reads only pixels 16 i + 7 and 16 i + 8: an organ
    between them is all zero after resizing, but the paper form must still pool its patches,
    weighted by how much of each the mask covers."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(1, 256, 3, generator=generator)  # 16 x 16 grid
    masks = torch.zeros(1, 1, 256, 256)
    masks[..., 33:38, 17:23] = 1.0  # 5 x 6 px inside patch (2, 1), missing rows 39/40 and columns 23/24
    masks[..., 48:51, 16:22] = 1.0  # 3 x 6 px inside patch (3, 1)
    assert F.interpolate(masks, size=(16, 16), mode="bilinear", align_corners=False).max() == 0
    assert torch.count_nonzero(masked_token_average(tokens, masks, (16, 16), empty="zero")) == 0
    paper = masked_token_average(tokens, masks, (16, 16))
    expected = (30 * tokens[0, 2 * 16 + 1] + 18 * tokens[0, 3 * 16 + 1]) / 48
    assert torch.allclose(paper[0], expected, atol=1e-6)
    # the earlier reading, kept for its records, pools nothing here
    assert torch.count_nonzero(masked_token_average(tokens, masks, (16, 16), empty="soft")) == 0


# ---------------------------------------------------------------------------------------
# SII uses the support (both forms)
# ---------------------------------------------------------------------------------------
def _perturb_sii_output(model: SDFSMIS) -> None:
    """Give the zero-initialised SII output projections the values training would give them."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in support_attention_parameters(model.unet):
            if p.ndim == 2 and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("sii", ["cross_attention", "kv_concat"])
def test_sii_output_depends_on_support(sii):
    model = build(SDFSMISSii, {"sii": sii}).eval()
    query = images(2, 50)
    mask = blob_masks(1, seed=1)
    if sii == "cross_attention":
        # zero-initialised output: at init the support has no say (pretrained behaviour kept)
        a = query_output(model, images(1, 1), mask, query)
        b = query_output(model, images(1, 2), blob_masks(1, seed=2), query)
        assert torch.equal(a, b)
        _perturb_sii_output(model)
    a = query_output(model, images(1, 1), mask, query)
    b = query_output(model, images(1, 2), mask, query)  # another support image
    c = query_output(model, images(1, 1), blob_masks(1, seed=2), query)  # another support mask
    assert (a - b).abs().max() > 1e-4
    assert (a - c).abs().max() > 1e-4


def test_sii_layers_are_zero_initialised_and_copied_from_self_attention():
    model = build(SDFSMISSii)
    blocks = [m for m in model.unet.modules() if hasattr(m, "sii_attn")]
    assert len(blocks) == len(model.support_attention_keys) > 0
    for block in blocks:
        assert not block.sii_attn.to_out[0].weight.abs().sum() and not block.sii_attn.to_out[0].bias.abs().sum()
        assert torch.equal(block.sii_attn.to_q.weight, block.attn1.to_q.weight)
        assert torch.equal(block.sii_norm.weight, block.norm1.weight)


def test_kv_concat_bank_concatenates_shots_along_tokens():
    model = build(SDFSMISSii, {"sii": "kv_concat"}).eval()
    shots = 3
    sup, masks = images(shots, 1), blob_masks(shots, seed=1)
    with torch.no_grad():
        one = model.encode_support(sup[:1][None], masks[:1][None]).bank
        many = model.encode_support(sup[None], masks[None]).bank
    assert set(one.entries) == set(many.entries) == set(model.support_attention_keys)
    for name, (key, value) in many.entries.items():
        k1, _ = one.entries[name]
        assert key.shape == value.shape == (1, shots * k1.shape[1], k1.shape[2])
        # shot 0's tokens are exactly the 1-shot bank
        assert torch.allclose(key[:, : k1.shape[1]], k1, atol=1e-5)
    # the query attends over a set of tokens: shot order does not matter
    query = images(2, 9)
    a = query_output(model, sup, masks, query)
    b = query_output(model, sup.flip(0), masks.flip(0), query)
    assert torch.allclose(a, b, atol=1e-4)


def test_kv_concat_read_pass_is_attention_over_query_and_support_tokens_by_hand():
    """The code's processor (``attention_processor_v2.py``) appends the support's projected
    keys/values to the query's along the token axis, shots side by side, and attends once:
    softmax(q [k_q ; k_s1 ; k_s2]^T / sqrt(d)) [v_q ; v_s1 ; v_s2] per head, then ``to_out``."""
    from diffusers.models.attention_processor import Attention

    from fsmis_methods._sd_attention import KVBankSelfAttnProcessor

    torch.manual_seed(0)
    heads, head_dim, width = 2, 4, 8
    attn = Attention(query_dim=width, heads=heads, dim_head=head_dim).eval()
    processor = KVBankSelfAttnProcessor("block")
    support = torch.randn(2, 3, width)  # one episode, two shots of 3 tokens
    query = torch.randn(1, 5, width)
    bank = AttentionBank()
    with torch.no_grad():
        processor(attn, support, bank=bank, bank_mode="write", shots=2)
        out = processor(attn, query, bank=bank, bank_mode="read", shots=2)
        tokens = torch.cat([query[0], support[0], support[1]])  # (5 + 3 + 3, C)
        q, k, v = attn.to_q(query[0]), attn.to_k(tokens), attn.to_v(tokens)
        per_head = []
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            weights = torch.softmax(q[:, cols] @ k[:, cols].T / head_dim ** 0.5, dim=-1)
            per_head.append(weights @ v[:, cols])
        expected = attn.to_out[0](torch.cat(per_head, dim=1))
    assert out.shape == (1, 5, width)
    assert torch.allclose(out[0], expected, atol=1e-5)


@pytest.mark.parametrize("sii", ["kv_concat", "cross_attention"])
def test_vtct_condition_reaches_the_support_pass_as_well_as_the_query_pass(sii):
    """PROTOCOL.md §6: E is the ``encoder_hidden_states`` of the support pass and the query
    pass. Changing E alone (the MLP's last bias) changes what the support pass leaves in the
    bank, and the query pass reads E itself."""
    model = build(SDFSMISVtct, {"sii": sii}).eval()
    sup, masks = images(1, 1), blob_masks(1, seed=1)
    with torch.no_grad():
        before = model.encode_support(sup[None], masks[None])
        model.vtct_mlp.mlp[-1].bias.add_(0.5)
        after = model.encode_support(sup[None], masks[None])
    assert torch.allclose(after.conditioning - before.conditioning, torch.full_like(before.conditioning, 0.5), atol=1e-5)
    changed = [name for name in before.bank.entries
               if not torch.allclose(before.bank.entries[name][0], after.bank.entries[name][0], atol=1e-6)]
    assert changed, "the support pass's bank does not depend on E"
    query = images(1, 9)
    with torch.no_grad():
        latents = model.encode_images(query)
        mixed = SupportContext(before.bank, after.conditioning, before.fg_prototype, before.bg_prototype, before.shots)
        assert not torch.allclose(model.query_pass(latents, before), model.query_pass(latents, mixed), atol=1e-6)


def test_bank_broadcasts_one_support_to_many_queries():
    bank = AttentionBank()
    bank.put("x", (torch.randn(2, 5, 3),), shots=2)  # one episode, two shots
    (entry,) = bank.get("x", batch=4)
    assert entry.shape == (4, 10, 3) and entry.stride(0) == 0  # a view, no copy
    with pytest.raises(RuntimeError, match="no entry"):
        bank.get("y", batch=1)


# ---------------------------------------------------------------------------------------
# Marigold init
# ---------------------------------------------------------------------------------------
def test_marigold_init_of_the_added_convs():
    model = build(SDFSMISSii)  # query_conv_in is the pretrained 4-channel conv_in
    z = torch.randn(2, 4, 16, 16)
    original = model.query_conv_in
    assert original.in_channels == 4 and model.support_conv_in.in_channels == 8
    assert torch.allclose(model.support_conv_in(torch.cat([z, z], 1)), original(z), atol=1e-5)

    full = build(SDFSMIS)  # with QE the query conv is 8 channels, same init from the same conv_in
    assert full.query_conv_in.in_channels == 8
    assert torch.equal(full.query_conv_in.weight, full.support_conv_in.weight)
    assert torch.equal(full.query_conv_in.bias, full.support_conv_in.bias)
    # both halves are half the pretrained kernel, so conv8(z ++ z) == conv4(z) with that kernel
    weight = full.query_conv_in.weight
    assert torch.equal(weight[:, :4], weight[:, 4:])
    conv4 = F.conv2d(z, 2 * weight[:, :4], full.query_conv_in.bias, padding=1)
    assert torch.allclose(full.query_conv_in(torch.cat([z, z], 1)), conv4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# frozen vs trained parts
# ---------------------------------------------------------------------------------------
def test_frozen_parts_get_no_gradient_and_do_not_change():
    model = build(SDFSMIS, vae="taesd")  # random TAESD: a codec with parameters
    # past the first step the zero-initialised SII output is non-zero and the support path
    # gets gradients too (at init it gets none: the support has no say yet)
    _perturb_sii_output(model)
    model.train()
    frozen = {"vae": model.vae, "image_encoder": model.image_encoder}
    before = {name: copy.deepcopy(m.state_dict()) for name, m in frozen.items()}
    trained = {
        "unet_conv_out": model.unet.conv_out.weight,
        "support_conv_in": model.support_conv_in.weight,
        "query_conv_in": model.query_conv_in.weight,
        "vtct_mlp": model.vtct_mlp.mlp[0].weight,
        "sii_out": next(b.sii_attn.to_out[0].weight for b in model.unet.modules() if hasattr(b, "sii_attn")),
    }
    trained_before = {k: v.detach().clone() for k, v in trained.items()}

    groups = model.param_groups()
    assert {g["name"]: g["lr"] for g in groups} == {"unet": 1e-5, "vtct": 5e-5}
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    for m in frozen.values():
        assert all(not p.requires_grad and id(p) not in grouped for p in m.parameters())

    optimiser = torch.optim.AdamW(groups, weight_decay=1e-2)
    loss = model.training_loss(episode(b=1))
    loss.backward()
    for m in frozen.values():
        assert all(p.grad is None for p in m.parameters())
    for key, value in trained.items():
        assert value.grad is not None and value.grad.abs().sum() > 0, f"{key} got no gradient"
    optimiser.step()
    for name, m in frozen.items():
        for key, value in m.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key} changed"
        assert not m.training  # frozen parts stay in eval mode under model.train()
    for key, value in trained.items():
        assert not torch.equal(value, trained_before[key]), f"{key} did not change"


@pytest.mark.parametrize("sii", ["kv_concat", "cross_attention"])
def test_gradient_checkpointing_gives_the_same_gradients(sii, monkeypatch):
    # checkpointing re-runs blocks in the backward pass; the bank travels in the call's
    # arguments, so the support pass is recomputed as a support pass
    import torch.utils.checkpoint as checkpoint_module

    calls = []
    original = checkpoint_module.checkpoint
    monkeypatch.setattr(checkpoint_module, "checkpoint", lambda fn, *a, **k: calls.append(1) or original(fn, *a, **k))
    batch = episode(b=1, s=2)
    grads = []
    for checkpointing in (False, True):
        calls.clear()
        model = build(SDFSMISSii, {"sii": sii, "gradient_checkpointing": checkpointing}, seed=3)
        _perturb_sii_output(model)
        model.training_loss(batch).backward()
        grads.append(model.support_conv_in.weight.grad.clone())  # reaches the support only via the bank
        assert bool(calls) == checkpointing
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def _float64(batch: EpisodeBatch) -> EpisodeBatch:
    return batch.apply(torch.Tensor.double)


@pytest.mark.parametrize("cls, fidelity, options", [
    (SDFSMIS, "paper", {}),  # SII cross-attention, cosine QE, VTCT
    (SDFSMIS, "code", {}),  # K/V concatenation, fg/bg QE, posterior samples
    (SDFSMISSii, "paper", {"gradient_checkpointing": True}),
])
def test_joint_pass_gives_the_two_pass_loss_and_gradients(cls, fidelity, options, monkeypatch):
    # float64, two episodes of two shots: each query row must read its own episode's shots
    batch = _float64(episode(b=2, s=2))
    results = []
    for joint in (False, True):
        model = build(cls, {**options, "joint_pass": joint}, fidelity=fidelity, seed=3).double()
        _perturb_sii_output(model)
        unet_calls = []
        forward = model.unet.forward
        monkeypatch.setattr(model.unet, "forward", lambda *a, **k: unet_calls.append(1) or forward(*a, **k))
        torch.manual_seed(11)  # the same posterior samples in both
        loss = model.training_loss(batch)
        loss.backward()
        assert len(unet_calls) == (1 if joint else 2)
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (two_pass_loss, two_pass_grads), (joint_loss, joint_grads) = results
    assert joint_grads.keys() == two_pass_grads.keys()
    assert two_pass_grads["support_conv_in.weight"].abs().sum() > 0  # the support is trained through the query
    torch.testing.assert_close(joint_loss, two_pass_loss, rtol=1e-9, atol=0)
    for name, grad in two_pass_grads.items():
        torch.testing.assert_close(joint_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)



@pytest.mark.parametrize("value, device, cuda_visible, expected", [
    ("auto", "auto", False, False),  # a CPU machine: two passes (no gain measured there)
    ("auto", "auto", True, True),  # a GPU machine: one pass (H100: recorded step 1.39x faster)
    ("auto", "cpu", True, False),  # the CPU asked for on a GPU machine
    ("auto", "cuda", False, True),  # as the run's hash resolves device=cuda (training/precision.py)
    (True, "cpu", False, True),
    (False, "cuda", True, False),
])
def test_joint_pass_auto_follows_the_device(value, device, cuda_visible, expected, monkeypatch):
    from fsmis_bench.training.precision import with_resolved_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_visible)
    cfg = make_cfg({"joint_pass": value})
    cfg.device = device
    model = SDFSMIS(cfg)
    assert model.options.joint_pass is expected
    assert with_resolved_precision(cfg).method.joint_pass is expected  # the hash sees what trains


@pytest.mark.parametrize("fidelity, joint", [("paper", False), ("code", True)])  # code: posterior samples
def test_batched_encode_gives_the_four_calls_latents(fidelity, joint, monkeypatch):
    # float64, two episodes of two shots: the split must hand each kind its own rows back
    batch = _float64(episode(b=2, s=2))
    results = []
    for batched in (False, True):
        model = build(SDFSMIS, {"batched_encode": batched, "joint_pass": joint}, fidelity=fidelity, seed=3).double()
        encoder_calls = []
        encode = model.vae.encode
        monkeypatch.setattr(model.vae, "encode", lambda *a, **k: encoder_calls.append(a[0].shape[0]) or encode(*a, **k))
        torch.manual_seed(11)  # the same posterior noise in both
        latents = model.episode_latents(batch, sample=model.options.train_latents == "sample")
        torch.manual_seed(11)
        loss = model.training_loss(batch)
        loss.backward()
        assert encoder_calls[:4 if not batched else 1] == ([4, 4, 2, 2] if not batched else [12])
        results.append((latents, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (four_latents, four_loss, four_grads), (one_latents, one_loss, one_grads) = results
    assert [x.shape for x in one_latents] == [x.shape for x in four_latents]
    for one, four in zip(one_latents, four_latents):
        torch.testing.assert_close(one, four, rtol=1e-9, atol=1e-12)
    assert not torch.equal(four_latents[0], four_latents[1])  # images and masks are different rows
    torch.testing.assert_close(one_loss, four_loss, rtol=1e-9, atol=0)
    for name, grad in four_grads.items():
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_batched_encode_keeps_four_calls_for_support_and_query_of_other_sizes(monkeypatch):
    model = build(SDFSMIS, {"batched_encode": True})
    batch = episode(b=1, s=1)
    batch = dataclasses.replace(batch, query_images=images(1, 5, size=2 * SIZE), query_masks=blob_masks(1, 2 * SIZE))
    calls = []
    encode = model.vae.encode
    monkeypatch.setattr(model.vae, "encode", lambda *a, **k: calls.append(tuple(a[0].shape[-2:])) or encode(*a, **k))
    latents = model.episode_latents(batch, sample=False)
    assert calls == [(SIZE, SIZE), (SIZE, SIZE), (2 * SIZE, 2 * SIZE), (2 * SIZE, 2 * SIZE)]
    assert latents[2].shape[-1] == 2 * latents[0].shape[-1]


def test_joint_pass_refuses_other_values():
    with pytest.raises(ConfigError, match="method.joint_pass='yes'"):
        SDFSMIS.resolve_options(OmegaConf.create({"joint_pass": "yes"}), "paper")

# ---------------------------------------------------------------------------------------
# objectives and read-out
# ---------------------------------------------------------------------------------------
def test_alpha_bar_999_of_the_sd_schedule():
    assert sd_alphas_cumprod()[999].item() == pytest.approx(0.0046601, rel=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_t999_inverts_the_forward_process(prediction_type):
    model = build(SDFSMISSii, prediction_type=prediction_type)
    a = sd_alphas_cumprod()[999].float()
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    output = eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(model.mask_latent_estimate(output, x_t), x0, atol=1e-4)


def test_degenerate_t1_objective_is_negated_output():
    model = build(SDFSMISSii, fidelity="code")
    assert model.options.objective == "degenerate_t1" and model.options.timestep == 1
    out = torch.randn(1, 4, 8, 8)
    assert torch.equal(model.mask_latent_estimate(out, torch.randn_like(out)), -out)


def test_direct_t999_reads_the_output_as_the_mask_latent_at_timestep_999():
    model = build(SDFSMISSii, {"objective": "direct_t999"})
    assert model.options.timestep == 999
    out = torch.randn(1, 4, 8, 8)
    assert torch.equal(model.mask_latent_estimate(out, torch.randn_like(out)), out)
    seen = []
    model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].tolist()))
    query_output(model, images(1, 1), blob_masks(1), images(1, 2))
    assert seen == [[999], [999]]  # support pass and query pass


#: Relative RMS error of the epsilon-prediction t = 999 estimate against float64, PROTOCOL.md
#: §6. The read-out (the U-Net's output layer + the x0 formula) under bf16 autocast: ~1e-7
#: measured, where a bf16 output layer gives ~1.3e-3 (x 14.6 amplification of its rounding).
READOUT_TOLERANCE = 1e-5
#: The whole query pass: in float32 (the default precision) ~4e-7 measured on the tiny U-Net;
#: under bf16 autocast ~0.6-0.8 %, the bf16 arithmetic of the layers before the output
#: (which is why float32 + TF32 is the default and `direct_t999` exists).
FP32_TOLERANCE, BF16_TOLERANCE = 1e-5, 1.2e-2


def _relative_rms(estimate: torch.Tensor, expected: torch.Tensor) -> float:
    return float((estimate.detach().double() - expected.detach()).pow(2).mean().sqrt() / expected.detach().pow(2).mean().sqrt())


def test_epsilon_t999_readout_is_float32_under_autocast():
    model = build(SDFSMISSii, prediction_type="epsilon")
    conv = model.unet.conv_out
    assert isinstance(conv, Float32Conv2d)
    g = torch.Generator().manual_seed(0)
    features, x_t = torch.randn(4, conv.in_channels, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    a = sd_alphas_cumprod()[999]
    output64 = F.conv2d(features.double(), conv.weight.double(), conv.bias.double(), padding=1)
    expected = (x_t.double() - (1 - a).sqrt() * output64) / a.sqrt()
    bf16_conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    bf16_conv.weight, bf16_conv.bias = conv.weight, conv.bias
    with torch.autocast("cpu", dtype=torch.bfloat16):
        estimate = model.mask_latent_estimate(conv(features), x_t)
        unprotected = model.mask_latent_estimate(bf16_conv(features), x_t)
    assert estimate.dtype == torch.float32
    assert _relative_rms(estimate, expected) < READOUT_TOLERANCE
    assert _relative_rms(unprotected, expected) > 20 * READOUT_TOLERANCE  # the test can tell


@pytest.mark.parametrize("autocast, tolerance", [(False, FP32_TOLERANCE), (True, BF16_TOLERANCE)])
def test_epsilon_t999_query_pass_against_float64(autocast, tolerance):
    model = build(SDFSMISSii, prediction_type="epsilon").eval()
    _perturb_sii_output(model)
    support, mask, query = images(1, 1), blob_masks(1, seed=1), images(4, 2)
    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        context = reference.encode_support(support[None].double(), mask[None].double())
        latents = reference.encode_images(query.double())
        expected = reference.mask_latent_estimate(reference.query_pass(latents, context), latents)
        assert expected.dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = query_output(model, support, mask, query)
            estimate = model.mask_latent_estimate(output, model.encode_images(query))
    assert output.dtype == estimate.dtype == torch.float32
    assert _relative_rms(estimate, expected) < tolerance


def test_float32_output_layer_keeps_parameters_and_state_dict_keys():
    plain = build(SDFSMISSii)
    assert "unet.conv_out.weight" in plain.state_dict() and "unet.conv_out.bias" in plain.state_dict()
    conv = plain.unet.conv_out
    x = torch.randn(1, conv.in_channels, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


def test_absolute_threshold_on_the_channel_mean():
    decoded = torch.tensor([[-1.0, -0.2, 0.1, 0.9]])[:, None, None, :].expand(1, 3, 1, 4)  # (Q, C, H, W)
    assert threshold_decoded(decoded, "absolute", 0.0).tolist() == [[[False, False, True, True]]]


def test_relative_threshold_uses_the_maximum_of_the_whole_chunk():
    """Code: ``mean_c(p) > 0.25 * max(p)`` with the maximum over all slices and channels
    of the chunk, ``p`` = decoded mapped from [-1, 1] to [0, 1]."""
    # slice 0: p = 0, .4, .55, .95 in every channel; slice 1: p = .1, .2, .2, .3
    slices = torch.tensor([[-1.0, -0.2, 0.1, 0.9], [-0.8, -0.6, -0.6, -0.4]])
    decoded = slices[:, None, None, :].repeat(1, 3, 1, 1)
    # chunk max .95 -> .2375: slice 1 keeps only the .3 pixel (per slice it would keep 3 of 4)
    assert threshold_decoded(decoded, "relative", 0.25).tolist() == [[[False, True, True, True]], [[False, False, False, True]]]
    # the maximum is over channels too: one channel at p = 1 (x = 1) raises it to .25
    decoded[0, 0, 0, 0] = 1.0  # slice 0 pixel 0: channel mean (1 + 0 + 0) / 3 = .33 > .25
    assert threshold_decoded(decoded, "relative", 0.25)[1].tolist() == [[False, False, False, True]]
    assert threshold_decoded(decoded, "relative", 0.25)[0, 0, 0]
    decoded[0, 0, 0, 3] = 1.0  # no change to the max; channel mean of pixel 3 still > .25
    assert threshold_decoded(decoded, "relative", 0.25)[0].tolist() == [[True, True, True, True]]


def test_relative_threshold_on_the_uint8_levels_the_released_pipeline_returns():
    """my_test_query.py thresholds the pipeline's uint8 image (``clip(0, 255).astype(uint8)``
    of ``(x + 1) / 2 * 255``, then ``to_tensor``): ``p`` is floored to a 1/255 level first."""
    # chunk max p = 1 (x = 1); a pixel at p = 0.2505 passes 0.25 continuously, not as uint8
    x = torch.tensor([[1.0, 2 * 0.2505 - 1, 2 * 0.2530 - 1]])
    decoded = x[:, None, None, :].repeat(1, 3, 1, 1)
    assert threshold_decoded(decoded, "relative", 0.25).tolist() == [[[True, True, True]]]
    assert threshold_decoded(decoded, "relative", 0.25, "uint8").tolist() == [[[True, False, True]]]
    # the reference's arithmetic, step by step on the same values
    levels = np.clip(((decoded.numpy() + 1) / 2) * 255, 0, 255).astype(np.uint8).astype(np.float32) / 255
    expected = levels.mean(axis=1) > levels.max() * 0.25
    assert threshold_decoded(decoded, "relative", 0.25, "uint8").numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("fidelity, levels, field, form", [
    ("paper", "continuous", "image", "standard"),
    ("code", "uint8", "own", "sdfsmis_code"),
])
def test_fidelity_sets_the_threshold_levels_and_the_code_forms_mask_field(fidelity, levels, field, form):
    from omegaconf import OmegaConf

    from fsmis_methods.sdfsmis import SDFSMIS

    opts = SDFSMIS.resolve_options(OmegaConf.create({}), fidelity)
    assert (opts.threshold_levels, opts.elastic_mask_field, opts.augment_form) == (levels, field, form)
    assert opts.vtct_empty_mask == {"paper": "soft_area", "code": "zero"}[fidelity]


def test_the_code_forms_new_options_give_fidelity_code_runs_a_hash_of_their_own():
    """Runs recorded before these options existed (one elastic field, continuous levels) keep
    their hashes under the earlier values; fidelity=code now hashes apart from them."""
    from fsmis_bench.config import compose
    from fsmis_bench.records import config_hash

    base = ["method=sdfsmis", "backbone=tiny", "pretrained=false"]
    code = compose([*base, "fidelity=code"])
    earlier_forms = ["method.elastic_mask_field=image", "method.threshold_levels=continuous", "method.vtct_empty_mask=soft"]
    earlier = compose([*base, "fidelity=code", *earlier_forms])
    assert config_hash(code) != config_hash(earlier)
    for code_form in ("method.elastic_mask_field=own", "method.threshold_levels=uint8", "method.vtct_empty_mask=zero"):
        key = code_form.split("=")[0]
        one = compose([*base, "fidelity=code", *[f for f in earlier_forms if not f.startswith(key)], code_form])
        assert config_hash(one) != config_hash(earlier), code_form  # each alone moves the hash
    paper = compose(base)
    assert config_hash(paper) == config_hash(compose([*base, "method.elastic_mask_field=own"]))  # no code form: unused


def test_largest_component_per_slice():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :3, :3] = True
    masks[0, 6:, 6:] = True  # 4 px, smaller
    out = largest_component(masks)
    assert out[0].sum() == 9 and out[0, :3, :3].all() and not out[1].any()


def test_largest_component_follows_the_released_rule_on_ties_and_diagonals():
    """The released test script (``cca`` in my_test_query.py) labels 8-connected components
    with OpenCV and keeps the one whose share of the mask is strictly larger than every
    earlier one's, so of two equal components the first in raster order; MONAI's
    KeepLargestConnectedComponent keeps both, which is why it is not used here."""
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 5:7, 5:7] = True  # 4 px, later in raster order
    masks[0, 0:2, 0:2] = True  # 4 px, first
    masks[1, 0, 0] = masks[1, 1, 1] = masks[1, 2, 2] = True  # one component through its corners: 3 px
    masks[1, 6, 0:2] = True  # 2 px
    out = largest_component(masks)
    assert out[0].sum() == 4 and out[0, 0:2, 0:2].all()
    assert out[1].sum() == 3 and out[1, 2, 2] and not out[1, 6].any()


def test_fidelity_switches_every_difference_and_options_override():
    paper = SDFSMIS.resolve_options(OmegaConf.create({}), "paper")
    code = SDFSMIS.resolve_options(OmegaConf.create({}), "code")
    for name in sorted(set(FIDELITY_DEFAULTS) - {"vtct_encoder"}):  # the encoder follows the backbone
        assert getattr(paper, name) == FIDELITY_DEFAULTS[name]["paper"]
        assert getattr(code, name) == FIDELITY_DEFAULTS[name]["code"]
    assert (code.train_latents, code.vtct_shot_pooling, code.threshold) == ("sample", "before_mlp", "relative")
    assert (paper.threshold_value, code.threshold_value) == (0.0, 0.25)
    mixed = SDFSMIS.resolve_options(OmegaConf.create({"sii": "kv_concat", "lcc": True}), "paper")
    assert (mixed.sii, mixed.lcc, mixed.objective) == ("kv_concat", True, "ddim_t999")
    with pytest.raises(ConfigError, match="train_latents"):
        SDFSMIS.resolve_options(OmegaConf.create({"train_latents": "mode"}), "paper")


@pytest.mark.parametrize("fidelity, sampled", [("paper", False), ("code", True)])
def test_training_encodes_posterior_samples_only_in_the_code_form(fidelity, sampled):
    model = build(SDFSMISSii, fidelity=fidelity)
    calls = []
    encode = model.vae.encode
    model.vae.encode = lambda images, sample=False, noise=None: calls.append(sample) or encode(images, sample, noise)
    model.training_loss(episode(b=1))
    assert calls == [sampled] * 4  # support image, support mask, query image, query mask
    calls.clear()
    model.eval().predict(images(1, 1), blob_masks(1), images(2, 2))
    assert calls == [False] * 3  # the posterior mean at test time


def test_shot_pooling_before_or_after_the_mlp():
    batch = episode(b=1, s=3)
    results = {}
    for pooling in ("after_mlp", "before_mlp"):
        model = build(SDFSMISVtct, {"vtct_shot_pooling": pooling})
        with torch.no_grad():
            results[pooling] = model.vtct_condition(batch.support_images, batch.support_masks)
            tokens = model.image_encoder(batch.support_images[0].expand(-1, 3, -1, -1))
            pooled = masked_token_average(tokens, batch.support_masks[0], model.image_encoder.grid)  # (3, d)
        expected = model.vtct_mlp(pooled).mean(0) if pooling == "after_mlp" else model.vtct_mlp(pooled.mean(0))
        assert results[pooling].shape == (1, 1, model.unet.config.cross_attention_dim)
        torch.testing.assert_close(results[pooling][0, 0], expected)
    assert not torch.allclose(results["after_mlp"], results["before_mlp"])  # the MLP is not linear
    with torch.no_grad():  # one shot: the same
        one = episode(b=1, s=1)
        conditions = [build(SDFSMISVtct, {"vtct_shot_pooling": p}).vtct_condition(one.support_images, one.support_masks)
                      for p in ("after_mlp", "before_mlp")]
    torch.testing.assert_close(*conditions)


def test_resolved_options_name_every_choice():
    options = build(SDFSMIS, fidelity="code").resolved_options()
    assert options["fidelity"] == "code" and options["prediction_type"] == "epsilon"
    assert options["vtct_encoder"] == "tiny"  # the tiny backbone's encoder, concrete
    assert build(SDFSMISSii).resolved_options()["vtct_encoder"] is None  # no VTCT
    for name in set(FIDELITY_DEFAULTS) - {"vtct_encoder"}:
        assert options[name] == FIDELITY_DEFAULTS[name]["code"]


def test_cached_batched_predict_equals_per_slice_recomputation():
    model = build(SDFSMIS, {"predict_batch_size": 3}).eval()
    _perturb_sii_output(model)
    sup, masks, queries = images(1, 1), blob_masks(1, seed=1), images(4, 2)
    cached = model.predict(sup, masks, queries)
    assert cached.shape == (4, SIZE, SIZE) and cached.dtype == torch.bool
    assert torch.equal(cached, model.predict_uncached(sup, masks, queries))


@pytest.mark.parametrize("fidelity", ["paper", "code"])  # absolute / relative threshold, no LCC / LCC
def test_recorded_predict_gives_the_plain_masks(monkeypatch, fidelity):
    """``method.predict_cuda_graph`` with the CPU stand-in for a CUDA graph: the support side
    and one chunk are recorded once, each later call replays them on new inputs (a new
    support, a short last chunk padded to the full one), and the masks are the plain ones."""
    from fsmis_bench import recorded

    plain = build(SDFSMIS, {"predict_batch_size": 3}, fidelity=fidelity).eval()
    _perturb_sii_output(plain)
    graphed = copy.deepcopy(plain)
    graphed.options = dataclasses.replace(plain.options, predict_cuda_graph=True)
    monkeypatch.setattr(recorded, "STAND_IN", recorded.EagerReplay)
    calls = [(images(1, 1), blob_masks(1, seed=1), images(7, 2)),  # chunks 3 + 3 + 1 (padded)
             (images(1, 3), blob_masks(1, seed=3), images(4, 4)),  # a new support
             (images(1, 1), blob_masks(1, seed=1), images(2, 5))]
    for support_images, support_masks, queries in calls:
        expected = plain.predict(support_images, support_masks, queries)
        assert expected.any() and not expected.all()  # a mask that can disagree
        assert torch.equal(graphed.predict(support_images, support_masks, queries), expected)
    support_side, query_side = graphed._recordings.values()
    assert len(graphed._recordings) == 2 and support_side.recordings == query_side.recordings == 1
    assert plain._recordings == {}  # off: nothing recorded


def test_recorded_predict_runs_plainly_where_it_cannot_record():
    model = build(SDFSMIS, {"predict_batch_size": 3, "predict_cuda_graph": True}).eval()
    assert model.options.predict_cuda_graph
    support_images, support_masks, queries = images(1, 1), blob_masks(1, seed=1), images(4, 2)
    assert torch.equal(model.predict(support_images, support_masks, queries),
                       model.predict_uncached(support_images, support_masks, queries))
    assert model._recordings == {}  # on a CPU without the stand-in: the plain path, nothing kept


# ---------------------------------------------------------------------------------------
# contract of every registered variant, built from its config file
# ---------------------------------------------------------------------------------------
VARIANTS = {"sdfsmis": SDFSMIS, "sdfsmis_sii": SDFSMISSii, "sdfsmis_qe": SDFSMISQe, "sdfsmis_vtct": SDFSMISVtct}


def method_config(name: str) -> dict:
    cfg = OmegaConf.load(REPO / "configs" / "method" / f"{name}.yaml")
    return OmegaConf.to_container(cfg.method)


def registered_target(name: str) -> str:
    """The ``module:Class`` string the built-in plugin registers for ``name``."""
    from fsmis_methods import _plugin

    found: dict[str, str] = {}

    class Collect:
        def register(self, key, target, description="", **_display):
            found[key] = target

    _plugin.fsmis_register_methods(Collect())
    if name not in found:
        pytest.fail(f"{name} is not registered in methods/_plugin.py")
    return found[name]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_registered_variant_contract(name):
    import importlib

    module, _, attr = registered_target(name).partition(":")
    cls = getattr(importlib.import_module(module), attr)
    assert cls is VARIANTS[name]
    method_cfg = method_config(name)
    assert method_cfg["name"] == name
    torch.manual_seed(0)
    model = cls(make_cfg({k: v for k, v in method_cfg.items() if k != "name"} | {"name": name}))
    expect_qe, expect_vtct = {"sdfsmis": (True, True), "sdfsmis_sii": (False, False), "sdfsmis_qe": (True, False), "sdfsmis_vtct": (False, True)}[name]
    assert (model.options.qe, model.options.vtct) == (expect_qe, expect_vtct)
    assert model.input_norm == "minmax" and model.needs_training
    model.train()
    loss = model.training_loss(episode(b=2, s=1))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    model.eval()
    batch = episode(b=1, s=2)
    out = model.predict(batch.support_images[0], batch.support_masks[0], images(3, 5))
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.bool
    parts = model.components()
    assert {"unet", "vae", "support_conv_in", "query_conv_in"} <= set(parts)
    assert ("vtct_mlp" in parts) == ("image_encoder" in parts) == expect_vtct
    assert model.uses_random_weights()  # tiny U-Net: random weights, flagged


# ---------------------------------------------------------------------------------------
# overfitting one real CHAOS episode
# ---------------------------------------------------------------------------------------
def chaos_liver_pair(root: Path, size: int) -> tuple[torch.Tensor, ...]:
    """Two adjacent liver slices of CHAOS scan 1, min-max normalised to [-1, 1] per volume,
    downsampled to ``size``: support image/mask, query image/mask, each ``(1, 1, size, size)``."""
    import nibabel as nib

    folder = root / "CHAOST2" / "chaos_MR_T2_normalized"
    image = np.asarray(nib.load(folder / "image_1.nii.gz").dataobj, dtype=np.float32)
    label = np.asarray(nib.load(folder / "label_1.nii.gz").dataobj)
    image = (image - image.min()) / (image.max() - image.min()) * 2 - 1
    liver = (label == 1).sum(axis=(0, 1))
    z = int(np.argmax(liver))  # the slice with the most liver and its neighbour
    out = []
    for s in (z, z + 1):
        img = torch.from_numpy(image[..., s].copy())[None, None]
        msk = torch.from_numpy((label[..., s] == 1).astype(np.float32))[None, None]
        out += [F.interpolate(img, size=(size, size), mode="area"), (F.interpolate(msk, size=(size, size), mode="area") > 0.5).float()]
    return tuple(out)


#: steps each objective may take to overfit on the epsilon-prediction tiny U-Net. The
#: well-conditioned objectives pass Dice 0.9 by step 25; the paper's DDIM read-out, which
#: multiplies output errors by 14.6 (and starts from x0 estimates ~14x too large with random
#: weights), took 175 steps when measured.
OVERFIT_BUDGET = {"ddim_t999": 300, "direct_t999": 100, "degenerate_t1": 100}


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(OVERFIT_BUDGET))
def test_tiny_sdfsmis_overfits_a_real_chaos_episode_with_each_objective(objective, real_data_root):
    """Paper configuration (SII cross-attention, QE, VTCT) on an epsilon-prediction tiny
    U-Net (as SD-1.5), once per objective: each learns one real CHAOS liver episode."""
    support, support_mask, query, query_mask = chaos_liver_pair(real_data_root, OVERFIT_SIZE)
    model = build(SDFSMIS, {"objective": objective}, prediction_type="epsilon")
    optimiser = torch.optim.Adam([p for g in model.param_groups() for p in g["params"]], lr=1e-3)
    batch = EpisodeBatch(support[None], support_mask[None], query, query_mask)
    truth = query_mask[0, 0].bool()

    def dice() -> float:
        model.eval()
        pred = model.predict(support, support_mask, query)[0]
        model.train()
        return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))

    start, best, steps, first_loss = time.perf_counter(), 0.0, 0, None
    model.train()
    for steps in range(1, OVERFIT_BUDGET[objective] + 1):
        loss = model.training_loss(batch)
        first_loss = first_loss if first_loss is not None else float(loss.detach())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if steps % 25 == 0:
            best = dice()
            if best > 0.9:
                break
    print(f"overfit {objective}: {steps} steps, {time.perf_counter() - start:.1f} s, "
          f"loss {first_loss:.3f} -> {float(loss.detach()):.3f}, Dice {best:.4f}")
    assert best > 0.9, f"{objective}: Dice {best:.3f} after {steps} steps"


def test_recorded_predict_falls_back_with_one_warning(monkeypatch):
    """Where the support side cannot be recorded (CUDA refuses work that waits for the host),
    inference warns once and runs as the plain path, keeping nothing per call."""
    from fsmis_bench import recorded

    class Refuses(recorded.EagerReplay):
        def record(self, body):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = build(SDFSMIS, {"predict_batch_size": 3, "predict_cuda_graph": True}).eval()
    monkeypatch.setattr(recorded, "STAND_IN", Refuses)
    support_images, support_masks, queries = images(1, 1), blob_masks(1, seed=1), images(4, 2)
    with pytest.warns(RuntimeWarning, match="method.predict_cuda_graph: the support pass cannot be recorded as a CUDA graph"):
        first = model.predict(support_images, support_masks, queries)
    assert torch.equal(first, model.predict_uncached(support_images, support_masks, queries))
    model.predict(support_images, support_masks, queries)  # no second warning, no new recording
    (support_side,) = model._recordings.values()
    assert support_side.fell_back.startswith("RuntimeError: operation not permitted")


def test_qe_support_prototypes_in_the_code_form_follow_proto_py():
    """``bilinear_per_shot`` as diffews/models/proto.py computes it, step by step:
    ``extract_vae_supp_prototype`` per shot, the shots' prototypes averaged in
    ``extract_vae_query_prototype``."""
    torch.manual_seed(0)
    latents = torch.randn(2, 3, 4, 8, 8)  # (B, S, C, h, w)
    masks = blob_masks(6).view(2, 3, 1, SIZE, SIZE)
    fg, bg = support_prototypes(latents, masks, "bilinear_per_shot")
    for episode_index in range(2):
        feats = latents[episode_index]  # [S, C, h, w]
        mask = masks[episode_index, :, 0]  # [S, H, W]
        resized = F.interpolate(mask.float().unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=True).squeeze(1)
        flat, mask_flat = feats.view(3, 4, -1), resized.view(3, -1)
        fg_shots = (flat * mask_flat.unsqueeze(1)).sum(2) / (mask_flat.sum(1).unsqueeze(1) + 1e-6)
        bg_flat = 1.0 - mask_flat
        bg_shots = (flat * bg_flat.unsqueeze(1)).sum(2) / (bg_flat.sum(1).unsqueeze(1) + 1e-6)
        torch.testing.assert_close(fg[episode_index], fg_shots.mean(0))
        torch.testing.assert_close(bg[episode_index], bg_shots.mean(0))
    area_fg, _ = support_prototypes(latents, masks, "area_pooled")
    assert not torch.allclose(area_fg, fg)  # the forms differ
    weights = F.interpolate(masks.flatten(0, 1), size=(8, 8), mode="area").view(2, 3, 1, 8, 8)
    torch.testing.assert_close(area_fg, masked_average(latents, weights))


def test_vtct_resize_crop_sees_the_centre_of_the_slice():
    """``resize_crop``: the DINOv2 processor's geometry (shortest side 256/224 of the input,
    centre crop), so content outside the central square never reaches the encoder, and the
    mask (resized from the whole slice) no longer lines up with the patches."""
    from fsmis_methods._image_encoders import ImageTokenEncoder, dinov2_config
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**dinov2_config("tiny")))
    crop = ImageTokenEncoder("tiny", model, 64, random_weights=True, preprocess="resize_crop")
    whole = ImageTokenEncoder("tiny", model, 64, random_weights=True, preprocess="resize")
    x = torch.rand(1, 3, 73, 73) * 2 - 1  # 73 = round(64 * 256 / 224): no resize, a 4-px border cut
    border = x.clone()
    border[..., :4, :] = border[..., -5:, :] = border[..., :, :4] = border[..., :, -5:] = -1.0
    torch.testing.assert_close(crop(x), crop(border))  # the border is cropped away
    assert not torch.allclose(whole(x), whole(border))
    wide = torch.rand(1, 3, 73, 146) * 2 - 1  # the shorter side decides the scale; the crop is square
    assert crop._resize_and_crop((wide + 1) / 2).shape[-2:] == (64, 64)
    with pytest.raises(ConfigError, match="preprocessing"):
        ImageTokenEncoder("tiny", model, 64, random_weights=True, preprocess="crop")


def test_late_code_forms_give_fidelity_code_runs_their_own_hash_and_keep_paper_hashes():
    """The two released-code forms found late (QE support prototypes, VTCT crop) follow
    ``fidelity`` through ``null``. A fidelity=code run of SD-FSMIS computes other numbers
    with them, so its hash must change; every run they do not touch keeps its hash."""
    from fsmis_bench.config import compose
    from fsmis_bench.records import _hashed_config

    def method_part(*overrides):
        return _hashed_config(compose(list(overrides)))["method"]

    code = method_part("method=sdfsmis", "fidelity=code")
    assert (code["qe_support_form"], code["vtct_preprocess"]) == ("bilinear_per_shot", "resize_crop")
    for overrides in (["method=sdfsmis"], ["method=diffews", "fidelity=code"], ["method=sdfsmis_sii", "fidelity=code"],
                      ["method=sdfsmis", "method.qe_support_form=area_pooled", "method.vtct_preprocess=resize"]):
        part = method_part(*overrides)
        assert "qe_support_form" not in part and "vtct_preprocess" not in part, overrides
    assert method_part("method=sdfsmis_qe", "fidelity=code")["qe_support_form"] == "bilinear_per_shot"
    assert "vtct_preprocess" not in method_part("method=sdfsmis_qe", "fidelity=code")  # no VTCT
    # the code's augmentation (Medical.py) applies to every SD method trained by that code
    assert method_part("method=diffews", "fidelity=code")["augment_form"] == "sdfsmis_code"
    assert "augment_form" not in method_part("method=diffews") and "augment_form" not in method_part("method=sdfsmis")
