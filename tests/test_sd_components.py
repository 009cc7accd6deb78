"""Stable Diffusion building blocks: architectures, weight loading, codecs, Marigold init."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fsmis_bench.errors import ConfigError, FsmisError
from fsmis_methods import _sd_components as sdc

REPO = Path(__file__).resolve().parents[1]


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _smooth_image(size: int = 256) -> torch.Tensor:
    """A smooth grey test image replicated to 3 channels, ``(1, 3, size, size)`` in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = 1.2 * torch.exp(-((x - 0.2) ** 2 + (y + 0.1) ** 2) / 0.3) - 0.6
    image = (blob + 0.3 * torch.sin(3 * x) * torch.cos(2 * y)).clamp(-1, 1)
    return image.expand(1, 3, size, size).contiguous()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    # peak-to-peak range of [-1, 1] images is 2
    return 10 * math.log10(4.0 / float(((a - b) ** 2).mean()))


# -- architectures (built weightless on the meta device) -----------------------------------
@pytest.mark.parametrize("kind, expected", [("sd15", 859_520_964), ("sd21", 865_910_724)])
def test_unet_parameter_counts_match_released_models(kind: str, expected: int) -> None:
    with torch.device("meta"):
        unet = sdc.build_unet(kind, pretrained=False, source=None, weights_root=None)
    assert _params(unet) == expected == sdc.UNET_PARAMS[kind]
    assert unet.config.in_channels == 4
    assert unet.random_weights is True


def test_sd21_architecture_details() -> None:
    cfg = sdc.unet_config("sd21")
    assert cfg["attention_head_dim"] == [5, 10, 20, 20]
    assert cfg["use_linear_projection"] and cfg["upcast_attention"]
    assert cfg["cross_attention_dim"] == 1024
    with pytest.raises(ConfigError):
        sdc.unet_config("sd15", cross_attention_dim=1024)


def test_sd_vae_and_dinov2_parameter_counts() -> None:
    with torch.device("meta"):
        vae = sdc.build_vae("sd", pretrained=False, source=None, weights_root=None)
        small = sdc.build_image_encoder("dinov2_small", pretrained=False, source=None, weights_root=None)
        base = sdc.build_image_encoder("dinov2_base", pretrained=False, source=None, weights_root=None)
    assert _params(vae) == 83_653_863
    assert (vae.latent_channels, vae.downsample, vae.scaling_factor) == (4, 8, 0.18215)
    assert _params(small) == 22_056_576 and small.dim == 384
    assert base.dim == 768 and base.grid == (16, 16) and base.input_size == 224
    assert vae.random_weights and small.random_weights
    assert not any(p.requires_grad for p in vae.parameters())


def test_tiny_unet_has_sd_block_types_and_runs() -> None:
    torch.manual_seed(0)
    unet = sdc.build_unet("tiny", pretrained=False, source=None, weights_root=None, cross_attention_dim=64)
    assert 1_000_000 < _params(unet) < 5_000_000
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.random_weights is True and all(p.requires_grad for p in unet.parameters())
    out = unet(torch.randn(2, 4, 16, 16), torch.tensor([999, 999]), encoder_hidden_states=torch.randn(2, 1, 64)).sample
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_random_weights_follow_the_torch_seed() -> None:
    torch.manual_seed(3)
    a = sdc.build_unet("tiny", pretrained=False, source=None, weights_root=None)
    torch.manual_seed(3)
    b = sdc.build_unet("tiny", pretrained=False, source=None, weights_root=None)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# -- Marigold input-conv widening -------------------------------------------------------
def test_expand_conv_in_on_duplicated_input_matches_original() -> None:
    torch.manual_seed(0)
    unet = sdc.build_unet("tiny", pretrained=False, source=None, weights_root=None)
    conv = unet.conv_in
    wide = sdc.expand_conv_in(conv, 8)
    assert (wide.in_channels, wide.out_channels) == (8, conv.out_channels)
    assert torch.equal(wide.bias, conv.bias) and wide.weight.data_ptr() != conv.weight.data_ptr()
    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(wide(torch.cat([x, x], dim=1)), conv(x), rtol=1e-5, atol=1e-6)
    # weights are the original ones halved, for each copy of the input channels
    torch.testing.assert_close(wide.weight[:, :4] * 2, conv.weight)
    torch.testing.assert_close(wide.weight[:, 4:] * 2, conv.weight)
    with pytest.raises(ValueError):
        sdc.expand_conv_in(conv, 6)


# -- codecs --------------------------------------------------------------------------------
def test_identity_codec_round_trips_exactly() -> None:
    codec = sdc.build_vae("identity", pretrained=False, source=None, weights_root=None)
    image = torch.rand(2, 1, 32, 48).mul(2).sub(1).expand(2, 3, 32, 48)
    latents = codec.encode(image)
    assert latents.shape == (2, 4, 16, 24) and codec.downsample == 2
    assert torch.equal(codec.decode(latents), image)
    assert _params(codec) == 0 and codec.random_weights is False


def test_codec_stays_frozen_and_in_eval_mode() -> None:
    codec = sdc.build_vae("taesd", pretrained=False, source=None, weights_root=None)
    codec.train()
    assert not codec.training and not codec.vae.training
    assert not any(p.requires_grad for p in codec.parameters())
    assert codec.random_weights is True and codec.scaling_factor == 1.0
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(1, 3, 30, 30))


def test_sd_codec_encodes_the_scaled_posterior_mean() -> None:
    from diffusers import AutoencoderKL

    # a 2-level KL-VAE (d = 2) keeps the test fast; the wrapper logic is what is tested
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, latent_channels=4)
    codec = sdc.KLCodec(vae, random_weights=True)
    assert (codec.downsample, codec.scaling_factor) == (2, 0.18215)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    first, second = codec.encode(image), codec.encode(image)
    assert first.shape == (1, 4, 16, 16) and torch.equal(first, second)
    torch.testing.assert_close(first, vae.encode(image).latent_dist.mean * 0.18215)
    assert codec.decode(first).shape == (1, 3, 32, 32)
    assert not any(p.requires_grad for p in codec.parameters())

    # sample=True: the released training script's latent_dist.sample(), from torch's CPU
    # generator (checkpointed by the engine), so a seed replays it exactly
    posterior = vae.encode(image).latent_dist
    torch.manual_seed(3)
    draw = codec.encode(image, sample=True)
    torch.manual_seed(3)
    assert torch.equal(draw, codec.encode(image, sample=True))
    noise = (draw / 0.18215 - posterior.mean) / posterior.std
    assert not torch.equal(draw, first) and abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1

    # a draw inside a CUDA-graph recording would be replayed forever: refused (the engine
    # draws before the step instead, tests/test_host_draws.py), so a step that still draws
    # inside falls back to eager (train.cuda_graph) instead of freezing the noise
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        with pytest.raises(RuntimeError, match="cannot be recorded"):
            codec.encode(image, sample=True)
        assert torch.equal(codec.encode(image), first)  # the mean needs no draw


def test_taesd_real_weights_round_trip(real_weights_root: Path) -> None:
    image = _smooth_image(256)
    codec = sdc.build_vae("taesd", pretrained=True, source=None, weights_root=str(real_weights_root))
    assert codec.random_weights is False
    latents = codec.encode(image)
    assert latents.shape == (1, 4, 32, 32)
    real_psnr = _psnr(codec.decode(latents).clamp(-1, 1), image)
    torch.manual_seed(0)
    random_codec = sdc.build_vae("taesd", pretrained=False, source=None, weights_root=None)
    random_psnr = _psnr(random_codec.decode(random_codec.encode(image)).clamp(-1, 1), image)
    assert real_psnr > 20.0, real_psnr
    assert random_psnr < real_psnr - 10.0, (random_psnr, real_psnr)


def test_taesd_from_a_diffusers_layout_folder(tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    torch.manual_seed(1)
    saved = AutoencoderTiny()
    saved.save_pretrained(tmp_path / "my_taesd")
    codec = sdc.build_vae("taesd", pretrained=True, source="my_taesd", weights_root=str(tmp_path))
    assert codec.random_weights is False
    assert all(torch.equal(a, b) for a, b in zip(codec.vae.state_dict().values(), saved.state_dict().values()))


# -- missing weights -------------------------------------------------------------------------
def test_missing_taesd_dir_gives_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FsmisError) as info:
        sdc.build_vae("taesd", pretrained=True, source=None, weights_root=str(tmp_path))
    err = info.value
    assert "TAESD" in err.message and str(tmp_path / "taesd") in err.message
    assert "hf download madebyollin/taesd" in err.hint and "pretrained=false" in err.hint


def test_missing_sd_weights_offline_gives_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    sdc.hub_offline.cache_clear()
    try:
        with pytest.raises(FsmisError) as info:
            sdc.build_unet("sd15", pretrained=True, source="stable-diffusion-v1-5/stable-diffusion-v1-5", weights_root=str(tmp_path))
        assert "stable-diffusion-v1-5" in info.value.hint and "pretrained=false" in info.value.hint
        assert f"--local-dir {tmp_path}/stable-diffusion-v1-5/stable-diffusion-v1-5" in info.value.hint
        # a local folder without any config is also reported, not a traceback from deep inside
        (tmp_path / "empty_sd").mkdir()
        with pytest.raises(FsmisError, match="config.json"):
            sdc.build_unet("sd15", pretrained=True, source="empty_sd", weights_root=str(tmp_path))
        with pytest.raises(FsmisError):
            sdc.build_image_encoder("dinov2_small", pretrained=True, source=None, weights_root=str(tmp_path))
        # a single file that is not an SD checkpoint: one error, no traceback from the converter
        from safetensors.torch import save_file

        save_file({"not_a_unet": torch.zeros(2)}, str(tmp_path / "wrong.safetensors"))
        with pytest.raises(FsmisError, match="single file"):
            sdc.build_unet("sd15", pretrained=True, source="wrong.safetensors", weights_root=str(tmp_path))
    finally:
        sdc.hub_offline.cache_clear()


# -- image encoder, text embedding, configs -----------------------------------------------
def test_tiny_image_encoder_tokens() -> None:
    encoder = sdc.build_image_encoder("tiny", pretrained=False, source=None, weights_root=None)
    tokens = encoder(torch.rand(2, 3, 256, 256) * 2 - 1)
    assert tokens.shape == (2, encoder.grid[0] * encoder.grid[1], encoder.dim) == (2, 64, 32)
    assert not tokens.requires_grad and encoder.random_weights


def test_text_embedding_without_weights_is_a_documented_zero_tensor() -> None:
    emb = sdc.load_text_embedding("sd15", pretrained=False, source=None, weights_root=None, cross_attention_dim=768)
    assert emb.shape == (1, 77, 768) and not emb.any()
    assert sdc.load_text_embedding("tiny", pretrained=True, source=None, weights_root=None, cross_attention_dim=64).shape == (1, 77, 64)


@pytest.mark.parametrize("name, unet, dim, prediction", [
    ("sd15", "sd15", 768, "epsilon"), ("sd21", "sd21", 1024, "v_prediction"), ("tiny", "tiny", 64, "v_prediction"),
])
def test_backbone_configs(name: str, unet: str, dim: int, prediction: str) -> None:
    cfg = OmegaConf.load(REPO / "configs" / "backbone" / f"{name}.yaml")
    paper = sdc.backbone_sources(cfg, "paper")
    code = sdc.backbone_sources(cfg, "code")
    assert (paper.name, paper.unet, paper.cross_attention_dim, paper.prediction_type) == (name, unet, dim, prediction)
    if name == "tiny":
        assert paper.image_encoder == code.image_encoder == "tiny" and paper.vae_source == "taesd"
    else:
        assert (paper.image_encoder, code.image_encoder) == ("dinov2_small", "dinov2_base")
        assert paper.vae_source == paper.source
    with pytest.raises(ConfigError):
        sdc.backbone_sources(OmegaConf.load(REPO / "configs" / "backbone" / "none.yaml"))


# -- the prepared GPU check, smoke-run on the CPU -------------------------------------------
@pytest.mark.slow
def test_gpu_check_script_smoke_runs_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    import json

    from fsmis_bench.plugins import registries

    if "sdfsmis" not in registries().methods:
        pytest.skip("method sdfsmis is not registered yet")
    spec = importlib.util.spec_from_file_location("gpu_sd15_check", REPO / "benchmarks" / "gpu_sd15_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--device", "cpu", "--tiny", "--size", "64", "--steps", "1", "--warmup", "0", "--slices", "2"]
    assert module.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["backbone"] == "tiny" and result["random_weights"] is True
    assert result["train"]["fp32"]["loss_finite"] and result["train"]["fp32"]["median_s"] > 0
    assert result["predict"]["fp32"]["chunk_slices"] == 2 and result["predict"]["fp32"]["per_slice_median_s"] > 0
