"""Real-weight loading without the real files: tiny random models with the SD-1.5 / SD-2.1 /
DINOv2 structure, saved in every layout a user may have, loaded through the builders a run
uses. The weights must arrive (equal tensors), and a wrong or missing file must give one
error naming the file and the expected layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import sd_layouts as L
from fsmis_bench.errors import ConfigError, FsmisError
from fsmis_methods import _sd_components as sdc
from fsmis_methods import _weight_digest
from fsmis_methods._text_encoder import load_text_encoder

LAYOUTS = ("folder", "hub_cache", "safetensors", "ckpt")


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Tiny architectures, an empty hub cache, the hub offline, digests cached under tmp."""
    yield from L.go_offline(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per SD version: the tiny components and where each layout was written."""
    out = {}
    for kind in ("sd15", "sd21"):
        root = tmp_path_factory.mktemp(kind)
        components = L.build_components(kind, seed=1 if kind == "sd15" else 2)
        pipe = L.save_pipeline(root / "pipe", kind, components)
        L.hub_cache_tree(root / "cache", f"someone/tiny-{kind}", pipe)
        paths = {"folder": str(pipe), "hub_cache": f"someone/tiny-{kind}"}
        for suffix in ("safetensors", "ckpt"):
            paths[suffix] = str(L.save_single_file(root / suffix / f"model.{suffix}", kind, components))
            L.write_tokenizer(root / suffix / "tokenizer", kind)
        out[kind] = {"components": components, "root": root, "paths": paths}
    return out


def _source(written: dict, kind: str, layout: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if layout == "hub_cache":
        monkeypatch.setenv("HF_HUB_CACHE", str(written[kind]["root"] / "cache"))
    return written[kind]["paths"][layout]


# -- every layout ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_sd_components_load_from_every_layout(kind: str, layout: str, written: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = written[kind]["components"]
    source = _source(written, kind, layout, monkeypatch)
    unet = sdc.build_unet(kind, pretrained=True, source=source, weights_root=None, cross_attention_dim=L.TEXT_WIDTH)
    vae = sdc.build_vae("sd", pretrained=True, source=source, weights_root=None)
    text, _, _ = load_text_encoder(kind, source, None)
    assert L.same_tensors(unet, saved["unet"]) and L.same_tensors(vae.vae, saved["vae"]) and L.same_tensors(text, saved["text_encoder"])
    assert unet.random_weights is False and vae.random_weights is False
    assert all(p.requires_grad for p in unet.parameters()) and not any(p.requires_grad for p in vae.parameters())
    expected_layout = {"folder": "folder", "hub_cache": "hub cache"}.get(layout, "single file")
    assert unet.weight_files.layout.startswith(expected_layout)
    if layout == "hub_cache":
        assert "/snapshots/" in unet.weight_files.location and "models--someone--tiny-" in unet.weight_files.location

    # the empty prompt: <start>, <end>, then each version's own pad token (SD-1.5 <end>, SD-2.1 "!" = id 0)
    prompt = sdc.load_prompt_embedding(kind, pretrained=True, source=source, weights_root=None, cross_attention_dim=L.TEXT_WIDTH)
    vocab = L.tiny_vocab()
    pad = vocab["<|endoftext|>"] if kind == "sd15" else 0
    ids = torch.tensor([[vocab["<|startoftext|>"], vocab["<|endoftext|>"]] + [pad] * 75])
    with torch.no_grad():
        reference = saved["text_encoder"](ids).last_hidden_state
    assert prompt.embedding.shape == (1, 77, L.TEXT_WIDTH)
    torch.testing.assert_close(prompt.embedding, reference, rtol=0, atol=0)
    assert set(prompt.weight_files) == {"text_encoder", "tokenizer"}


@pytest.mark.parametrize("kind", ["dinov2_small", "dinov2_base"])
@pytest.mark.parametrize("layout", ["folder", "hub_cache"])
def test_dinov2_loads_from_a_folder_and_the_hub_cache(kind: str, layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = L.build_dinov2(kind, seed=3)
    repo = sdc.HUB_IDS[kind]
    if layout == "folder":  # `weights download` puts it at weights_root/<hub id>
        saved.save_pretrained(tmp_path / "root" / repo)
    else:
        saved.save_pretrained(tmp_path / "saved")
        L.hub_cache_tree(tmp_path / "hf_cache", repo, tmp_path / "saved")
    encoder = sdc.build_image_encoder(kind, pretrained=True, source=None, weights_root=str(tmp_path / "root"))
    assert L.same_tensors(encoder.model, saved) and encoder.random_weights is False
    tokens = encoder(torch.zeros(1, 3, 64, 64))
    assert tokens.shape == (1, 256, saved.config.hidden_size)


def test_hub_cache_under_the_weights_root_and_an_earlier_repo_name(written: dict, tmp_path: Path) -> None:
    # a cache copied into FSMIS_WEIGHTS_ROOT, holding SD-1.5 under its pre-2024 name
    L.hub_cache_tree(tmp_path / "root", "runwayml/stable-diffusion-v1-5", Path(written["sd15"]["paths"]["folder"]))
    unet = sdc.build_unet("sd15", pretrained=True, source=sdc.HUB_IDS["sd15"], weights_root=str(tmp_path / "root"))
    assert L.same_tensors(unet, written["sd15"]["components"]["unet"])
    assert "models--runwayml--stable-diffusion-v1-5" in unet.weight_files.location


def test_the_hub_cache_tree_is_one_huggingface_hub_reads(written: dict) -> None:
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(written["sd15"]["root"] / "cache")
    assert not info.warnings and [r.repo_id for r in info.repos] == ["someone/tiny-sd15"]
    (revision,) = next(iter(info.repos)).revisions
    assert revision.refs == frozenset({"main"})
    assert "unet/diffusion_pytorch_model.safetensors" in {str(f.file_path.relative_to(revision.snapshot_path)) for f in revision.files}


def test_a_partial_local_folder_of_a_hub_id_falls_back_to_the_hub_cache(written: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = "someone/tiny-sd15"
    L.write_tokenizer(tmp_path / "root" / repo / "tokenizer", "sd15")  # e.g. fetched for a single file earlier
    monkeypatch.setenv("HF_HUB_CACHE", str(written["sd15"]["root"] / "cache"))
    unet = sdc.build_unet("sd15", pretrained=True, source=repo, weights_root=str(tmp_path / "root"))
    assert unet.weight_files.layout == "hub cache" and L.same_tensors(unet, written["sd15"]["components"]["unet"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(sdc.WeightsNotFound, match="has neither unet/config.json nor config.json"):
        sdc.build_unet("sd15", pretrained=True, source=repo, weights_root=str(tmp_path / "root"))


def test_single_file_tokenizer_comes_from_the_hub_repo_when_none_is_beside(written: dict, tmp_path: Path) -> None:
    single = tmp_path / "ckpts" / "v1-5-pruned-emaonly.safetensors"
    single.parent.mkdir()
    single.write_bytes(Path(written["sd15"]["paths"]["safetensors"]).read_bytes())
    with pytest.raises(sdc.WeightsNotFound) as info:
        sdc.load_prompt_embedding("sd15", pretrained=True, source=str(single), weights_root=str(tmp_path / "root"), cross_attention_dim=L.TEXT_WIDTH)
    assert str(single.parent / "tokenizer") in info.value.message and "holds no tokenizer" in info.value.message
    assert "--include 'tokenizer/*'" in info.value.hint
    L.write_tokenizer(tmp_path / "root" / sdc.HUB_IDS["sd15"] / "tokenizer", "sd15")
    prompt = sdc.load_prompt_embedding("sd15", pretrained=True, source=str(single), weights_root=str(tmp_path / "root"), cross_attention_dim=L.TEXT_WIDTH)
    assert prompt.weight_files["tokenizer"].location == str(tmp_path / "root" / sdc.HUB_IDS["sd15"] / "tokenizer")


# -- wrong or missing files --------------------------------------------------------------------
def _broken(case: str, written: dict, tmp_path: Path) -> tuple[str, str, str]:
    """Write one broken layout; returns (source, what to load, the text the error must name)."""
    import shutil

    from safetensors.torch import load_file, save_file

    pipe = tmp_path / "pipe"
    shutil.copytree(written["sd15"]["paths"]["folder"], pipe)
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    single = tmp_path / "model.safetensors"
    if case == "no weights file":
        weights.unlink()
        return str(pipe), "unet", str(pipe / "unet")
    if case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:1000])
        return str(pipe), "unet", str(weights)
    if case == "weights lack tensors":
        state = load_file(str(weights))
        save_file({k: v for k, v in state.items() if "up_blocks.3" not in k}, str(weights))
        return str(pipe), "unet", str(weights)
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty"), "unet", "config.json"
    if case == "single file of another SD version":
        return written["sd21"]["paths"]["safetensors"], "unet", written["sd21"]["paths"]["safetensors"]
    if case == "single file without a text encoder":
        state = load_file(written["sd15"]["paths"]["safetensors"])
        save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}, str(single))
        return str(single), "text", "cond_stage_model"
    if case == "single file lacking U-Net tensors":
        state = load_file(written["sd15"]["paths"]["safetensors"])
        save_file({k: v for k, v in state.items() if "output_blocks.11" not in k}, str(single))
        return str(single), "unet", str(single)
    if case == "truncated single file":
        single.write_bytes(Path(written["sd15"]["paths"]["safetensors"]).read_bytes()[:5000])
        return str(single), "unet", str(single)
    if case == "not an SD checkpoint":
        save_file({"weight": torch.zeros(2)}, str(single))
        return str(single), "vae", "first_stage_model"
    raise AssertionError(case)


@pytest.mark.parametrize("case", [
    "no weights file", "truncated weights", "weights lack tensors", "empty folder",
    "single file of another SD version", "single file without a text encoder",
    "single file lacking U-Net tensors", "truncated single file", "not an SD checkpoint",
])
def test_a_wrong_or_missing_file_gives_one_error_naming_it(case: str, written: dict, tmp_path: Path) -> None:
    source, component, named = _broken(case, written, tmp_path)
    with pytest.raises(FsmisError) as info:
        if component == "unet":
            sdc.build_unet("sd15", pretrained=True, source=source, weights_root=None)
        elif component == "vae":
            sdc.build_vae("sd", pretrained=True, source=source, weights_root=None)
        else:
            load_text_encoder("sd15", source, None)
    err = info.value
    assert named in err.message, err.message
    assert err.hint, "every error says what to do"
    assert any(word in (err.message + err.hint) for word in ("single-file", "single file", "diffusers", "config.json", "SD version")), err


def test_a_folder_of_another_architecture_is_refused(written: dict) -> None:
    with pytest.raises(ConfigError, match="not a sd15 U-Net"):
        sdc.build_unet("sd15", pretrained=True, source=written["sd21"]["paths"]["folder"], weights_root=None)
    with pytest.raises(ConfigError, match="23 layers"):
        load_text_encoder("sd15", written["sd21"]["paths"]["folder"], None)


# -- the record: digests of the files read -------------------------------------------------------
def test_method_weight_identity_names_the_digests_of_the_files_read(written: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsmis_bench.api import build_method

    single = written["sd15"]["paths"]["safetensors"]
    tokenizer = Path(single).parent / "tokenizer"
    diffews = build_method(["method=diffews", "backbone=sd15", f"backbone.source={single}", "backbone.cross_attention_dim=32"])
    identity = diffews.weight_identity()
    assert set(identity) == {"unet", "vae", "text_encoder", "tokenizer"}
    for name in ("unet", "vae", "text_encoder"):
        assert identity[name]["files"] == {"model.safetensors": L.sha256(Path(single))}
        assert identity[name]["digest"] == L.sha256(Path(single)) and identity[name]["source"] == single
    assert identity["tokenizer"]["files"] == {p.name: L.sha256(p) for p in sorted(tokenizer.iterdir())}

    # SD-FSMIS with VTCT, from the hub cache: U-Net, VAE and DINOv2, no text encoder
    monkeypatch.setenv("HF_HUB_CACHE", str(written["sd21"]["root"] / "cache"))
    L.build_dinov2("dinov2_base", seed=4).save_pretrained(tmp_path / "root" / "facebook" / "dinov2-base")
    sdfsmis = build_method(["method=sdfsmis", "backbone=sd21", "fidelity=code", "backbone.source=someone/tiny-sd21",
                            "backbone.cross_attention_dim=32", f"weights_root={tmp_path / 'root'}"])
    identity = sdfsmis.weight_identity()
    assert set(identity) == {"unet", "vae", "image_encoder"}
    pipe = Path(written["sd21"]["paths"]["folder"])
    for name in ("unet", "vae"):
        files = {n: L.sha256(pipe / name / n) for n in ("config.json", "diffusion_pytorch_model.safetensors")}
        assert identity[name]["files"] == files and identity[name]["layout"] == "hub cache"
    encoder = tmp_path / "root" / "facebook" / "dinov2-base"
    assert identity["image_encoder"]["files"] == {n: L.sha256(encoder / n) for n in ("config.json", "model.safetensors")}
    assert len({identity[n]["digest"] for n in identity}) == 3
    assert json.loads(json.dumps(identity)) == identity  # goes into run.json as it is


def test_random_components_have_no_identity() -> None:
    from fsmis_bench.api import build_method

    method = build_method(["method=diffews", "backbone=sd15", "pretrained=false"])
    assert method.weight_identity() == {} and method.uses_random_weights()


def test_taesd_identity_is_the_digest_of_the_shipped_files(real_weights_root: Path) -> None:
    codec = sdc.build_vae("taesd", pretrained=True, source=None, weights_root=str(real_weights_root))
    identity = sdc.weight_identity_of({"vae": codec})["vae"]
    assert identity["files"] == {n: L.sha256(real_weights_root / "taesd" / n) for n in ("taesd_encoder.safetensors", "taesd_decoder.safetensors")}


def test_digests_are_cached_by_path_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = _weight_digest.sha256_of
    monkeypatch.setattr(_weight_digest, "sha256_of", lambda path: calls.append(path) or real(path))
    (tmp_path / "src").mkdir()
    weights = tmp_path / "src" / "w.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = _weight_digest.file_digest(weights)
    _weight_digest.forget_memo()  # a new process: the on-disk cache answers
    assert _weight_digest.file_digest(weights) == first == L.sha256(weights) and len(calls) == 1
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(1, 1))
    assert _weight_digest.file_digest(weights) == L.sha256(weights) != first and len(calls) == 2
    # a hub-cache blob is named by its SHA-256: never hashed
    snapshot = L.hub_cache_tree(tmp_path / "cache", "o/n", tmp_path / "src", revision="0" * 40)
    assert _weight_digest.file_digest(snapshot / "w.safetensors") == L.sha256(weights) and len(calls) == 2


# -- the original-key writer against diffusers' converters, at the real sizes (meta device) ------
@pytest.mark.parametrize("kind, model_type", [("sd15", "v1"), ("sd21", "v2")])
def test_original_key_names_round_trip_through_diffusers_at_real_size(kind: str, model_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    monkeypatch.undo()  # the real architectures, not the tiny ones
    with torch.device("meta"):
        unet = UNet2DConditionModel(**L.REAL_UNET_CONFIG(kind))
        vae = AutoencoderKL(**L.REAL_VAE_CONFIG())
        text = CLIPTextModel(CLIPTextConfig(**L.REAL_TEXT_CONFIG(kind)))
        state = L.original_state(kind, {"unet": unet, "vae": vae, "text_encoder": text})
    assert sfu.infer_diffusers_model_type(state) == model_type  # diffusers recognises the SD version from our names

    def same_keys_and_shapes(converted: dict, model: torch.nn.Module) -> bool:
        ours = {k.removeprefix("text_model."): v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        theirs = {k.removeprefix("text_model."): v.shape for k, v in converted.items() if not k.endswith("position_ids")}
        return ours == theirs

    assert same_keys_and_shapes(sfu.convert_ldm_unet_checkpoint(state, dict(unet.config)), unet)
    assert same_keys_and_shapes(sfu.convert_ldm_vae_checkpoint(state, dict(vae.config)), vae)
    if kind == "sd15":
        converted = sfu.convert_ldm_clip_checkpoint(state)
    else:
        converted = sfu.convert_open_clip_checkpoint(text, state)
    assert same_keys_and_shapes(converted, text)
