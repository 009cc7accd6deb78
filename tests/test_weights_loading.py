"""What the real-weight loaders do with files that load but would give wrong numbers, and with
damaged files: the full SD release holding EMA and non-EMA U-Nets, a folder whose scheduler
predicts another quantity than the config says, the other SD version's tokenizer, tensors a
model has no place for, fp16-only folders, pickles that would run code, damaged TAESD files,
a weights root or hub cache that is not what it should be. Tiny random models with the real
structure (``sd_layouts``) stand in for the real files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import sd_layouts as L
from fsmis_bench.errors import ConfigError, FsmisError
from fsmis_methods import _sd_components as sdc
from fsmis_methods._text_encoder import load_text_encoder


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Tiny architectures, an empty hub cache, the hub offline, digests cached under tmp."""
    yield from L.go_offline(tmp_path, monkeypatch)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per SD version: the tiny components, a diffusers folder and an original single file."""
    out = {}
    for kind in ("sd15", "sd21"):
        root = tmp_path_factory.mktemp(kind)
        components = L.build_components(kind, seed=1 if kind == "sd15" else 2)
        pipe = L.save_pipeline(root / "pipe", kind, components)
        single = L.save_single_file(root / "single" / "model.ckpt", kind, components)
        L.write_tokenizer(root / "single" / "tokenizer", kind)
        out[kind] = {"components": components, "pipe": pipe, "ckpt": single}
    return out


def _pipe(written: dict, kind: str, tmp_path: Path) -> Path:
    """A private copy of a version's diffusers folder, to damage."""
    return Path(shutil.copytree(written[kind]["pipe"], tmp_path / f"pipe_{kind}"))


class RunsCode:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


# -- the full SD release: EMA and non-EMA U-Nets in one file ---------------------------------------
@pytest.mark.parametrize("suffix", ["safetensors", "ckpt"])
def test_a_checkpoint_with_ema_and_non_ema_unets_reads_the_ema_set(suffix: str, written: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    trained = written["sd15"]["components"]
    ema = L.build_components("sd15", seed=7)["unet"]
    path = L.save_single_file_with_ema(tmp_path / f"v1-5-pruned.{suffix}", "sd15", trained, ema)
    unet = sdc.build_unet("sd15", pretrained=True, source=str(path), weights_root=None)
    assert L.same_tensors(unet, ema) and not L.same_tensors(unet, trained["unet"])
    sdc.build_unet("sd15", pretrained=True, source=str(path), weights_root=None)
    said = [line for line in capsys.readouterr().err.splitlines() if "EMA" in line]
    assert len(said) == 1 and path.name in said[0], said  # once, not at every build
    vae = sdc.build_vae("sd", pretrained=True, source=str(path), weights_root=None)  # one set only: no choice made
    assert L.same_tensors(vae.vae, trained["vae"])
    identity = sdc.weight_identity_of({"unet": unet, "vae": vae})
    assert identity["unet"]["ema"] is True and "ema" not in identity["vae"]
    assert identity["unet"]["digest"] == L.sha256(path)  # the file is the same; which set was read is said beside it


def test_the_ema_choice_is_part_of_the_run_identity(written: dict, tmp_path: Path) -> None:
    from fsmis_bench.api import build_method
    from fsmis_bench.records import weights_identity_hash

    path = L.save_single_file_with_ema(tmp_path / "v1-5-pruned.safetensors", "sd15", written["sd15"]["components"],
                                       L.build_components("sd15", seed=7)["unet"])
    L.write_tokenizer(tmp_path / "tokenizer", "sd15")
    method = build_method(["method=diffews", "backbone=sd15", f"backbone.source={path}", "backbone.cross_attention_dim=32"])
    weights = method.weight_identity()  # what run.json records as inputs.weights
    assert weights["unet"]["ema"] is True
    # a run that read the other set of the same file (same digest) is another run, never merged with this one
    other = {name: {k: v for k, v in record.items() if k != "ema"} for name, record in weights.items()}
    assert weights_identity_hash({"inputs": {"weights": weights}}) != weights_identity_hash({"inputs": {"weights": other}})
    # an EMA-only file (the -emaonly release): one set, no choice, nothing added
    emaonly = L.save_single_file(tmp_path / "emaonly" / "v1-5-pruned-emaonly.safetensors", "sd15", written["sd15"]["components"])
    unet = sdc.build_unet("sd15", pretrained=True, source=str(emaonly), weights_root=None)
    assert "ema" not in unet.weight_files.identity()


def test_an_incomplete_ema_set_is_refused(written: dict, tmp_path: Path) -> None:
    path = L.save_single_file_with_ema(tmp_path / "v1-5-pruned.safetensors", "sd15", written["sd15"]["components"],
                                       L.build_components("sd15", seed=7)["unet"], drop_ema=5)
    with pytest.raises(FsmisError) as info:
        sdc.build_unet("sd15", pretrained=True, source=str(path), weights_root=None)
    assert str(path) in info.value.message and "EMA" in info.value.message and "lacks 5 " in info.value.message
    assert "emaonly" in info.value.hint


# -- prediction_type: the config against the folder's scheduler ----------------------------------------
def test_a_folder_whose_scheduler_predicts_another_quantity_is_refused_when_the_method_is_built(written: dict, tmp_path: Path) -> None:
    from fsmis_bench.api import build_method

    args = ["method=diffews", "backbone=sd21", "backbone.cross_attention_dim=32"]
    assert build_method(args + [f"backbone.source={written['sd21']['pipe']}"]).prediction_type == "v_prediction"
    pipe = _pipe(written, "sd21", tmp_path)  # SD-2.1-base: the same architecture, predicting epsilon
    scheduler = pipe / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(dict(json.loads(scheduler.read_text()), prediction_type="epsilon")))
    with pytest.raises(ConfigError) as info:
        build_method(args + [f"backbone.source={pipe}"])
    assert str(scheduler) in info.value.message and "v_prediction" in info.value.message
    assert "scheduler says epsilon" in info.value.hint and "backbone.prediction_type=epsilon" in info.value.hint
    # the hint's override is a config key a user can set, and it makes the run consistent
    assert build_method(args + [f"backbone.source={pipe}", "backbone.prediction_type=epsilon"]).prediction_type == "epsilon"


# -- the tokenizer of the other SD version ------------------------------------------------------------
def test_the_other_sd_versions_tokenizer_is_refused(written: dict, tmp_path: Path) -> None:
    other = written["sd21"]["pipe"] / "tokenizer"  # pads with "!", SD-1.5 with <|endoftext|>
    with pytest.raises(ConfigError) as info:
        sdc.load_prompt_embedding("sd15", pretrained=True, source=str(written["sd15"]["pipe"]), weights_root=None,
                                  cross_attention_dim=L.TEXT_WIDTH, tokenizer_source=str(other))
    assert str(other) in info.value.message and "'!'" in info.value.message and "<|endoftext|>" in info.value.message
    assert "tokenizer_source" in info.value.hint
    # an SD-2.1 single file with an SD-1.5 tokenizer/ beside it
    single = tmp_path / "v2-1_768-ema-pruned.ckpt"
    single.write_bytes(written["sd21"]["ckpt"].read_bytes())
    L.write_tokenizer(tmp_path / "tokenizer", "sd15")
    with pytest.raises(ConfigError, match="sd15 tokenizer"):
        sdc.load_prompt_embedding("sd21", pretrained=True, source=str(single), weights_root=None, cross_attention_dim=L.TEXT_WIDTH)


# -- tensors a model has no place for; a folder of another model ---------------------------------------------
def test_a_folder_with_tensors_the_model_has_no_place_for_is_refused(written: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    pipe = _pipe(written, "sd15", tmp_path)
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(dict(load_file(str(weights)), **{"extra_block.weight": torch.zeros(3)}), str(weights))
    with pytest.raises(FsmisError) as info:
        sdc.build_unet("sd15", pretrained=True, source=str(pipe), weights_root=None)
    assert str(weights) in info.value.message and "extra_block.weight" in info.value.message


def test_dinov2_with_registers_is_not_read_as_dinov2(tmp_path: Path) -> None:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = {k: v for k, v in L.tiny_dinov2_config("dinov2_small").items() if k != "layerscale_value"}
    folder = tmp_path / "dinov2-with-registers-small"
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**config, num_register_tokens=4)).save_pretrained(folder)
    with pytest.raises(ConfigError, match="dinov2_with_registers"):
        sdc.build_image_encoder("dinov2_small", pretrained=True, source=str(folder), weights_root=None)
    # its config relabelled as plain DINOv2: the register tokens would be dropped
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, model_type="dinov2", architectures=["Dinov2Model"])))
    with pytest.raises(FsmisError, match="register_tokens"):
        sdc.build_image_encoder("dinov2_small", pretrained=True, source=str(folder), weights_root=None)


def test_a_folder_of_another_component_is_named_as_such(written: dict) -> None:
    with pytest.raises(ConfigError, match="AutoencoderKL"):
        sdc.build_unet("sd15", pretrained=True, source=str(written["sd15"]["pipe"] / "vae"), weights_root=None)


def test_the_text_tower_of_a_full_clip_folder_still_loads(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=L.tiny_text_config("sd15"), vision_config=vision, projection_dim=L.TEXT_WIDTH))
    clip.save_pretrained(tmp_path / "clip-vit-large-patch14")
    text, _, _ = load_text_encoder("sd15", str(tmp_path / "clip-vit-large-patch14"), None)
    assert L.same_tensors(text, clip.text_model)  # the vision tower's tensors are not the text model's to read


# -- fp16 variant only -------------------------------------------------------------------------------------
def test_a_folder_with_only_the_fp16_variant_reads_it_upcast(written: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file, save_file

    pipe = _pipe(written, "sd15", tmp_path)
    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    half = {k: v.half() for k, v in load_file(str(weights)).items()}
    save_file(half, str(pipe / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    weights.unlink()
    unet = sdc.build_unet("sd15", pretrained=True, source=str(pipe), weights_root=None)
    state = unet.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert all(torch.equal(state[k], v.float()) for k, v in half.items())
    assert set(unet.weight_files.identity()["files"]) == {"config.json", "diffusion_pytorch_model.fp16.safetensors"}
    assert "fp16" in capsys.readouterr().err


def test_a_folder_without_weights_says_what_it_holds(written: dict, tmp_path: Path) -> None:
    pipe = _pipe(written, "sd15", tmp_path)
    (pipe / "unet" / "diffusion_pytorch_model.safetensors").rename(pipe / "unet" / "unet.ckpt")
    with pytest.raises(FsmisError) as info:
        sdc.build_unet("sd15", pretrained=True, source=str(pipe), weights_root=None)
    assert "unet.ckpt" in info.value.message and "fp16" in info.value.message


# -- pickles that would run code -----------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle.dump"])
def test_a_checkpoint_holding_code_is_refused_without_running_it(writer: str, written: dict, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    state = torch.load(written["sd15"]["ckpt"], weights_only=True)
    state["state_dict"]["extra"] = RunsCode(marker)
    path = tmp_path / "v1-5-pruned-emaonly.ckpt"
    if writer == "pickle.dump":
        with open(path, "wb") as handle:
            pickle.dump(state, handle)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=writer == "torch.save")
    with pytest.raises(FsmisError) as info:
        sdc.build_unet("sd15", pretrained=True, source=str(path), weights_root=None)
    assert not marker.exists()
    err = info.value
    assert str(path) in err.message and "non-tensor Python objects" in err.message and "system" in err.message
    assert "refused" in err.message and "run code" in err.message and "safetensors" in err.hint


def test_a_truncated_checkpoint_is_called_damaged_not_unsafe(written: dict, tmp_path: Path) -> None:
    data = written["sd15"]["ckpt"].read_bytes()
    path = tmp_path / "model.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FsmisError) as info:
        sdc.build_unet("sd15", pretrained=True, source=str(path), weights_root=None)
    assert str(path) in info.value.message and "it is truncated" in info.value.message and "re-download" in info.value.hint
    assert "non-tensor" not in info.value.message


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_a_folder_bin_holding_code_is_refused_without_running_it(component: str, written: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    marker = tmp_path / "ran"
    pipe = _pipe(written, "sd15", tmp_path)
    stem = "diffusion_pytorch_model" if component == "unet" else "model"
    weights = pipe / component / f"{stem}.safetensors"
    state = dict(load_file(str(weights)), extra=RunsCode(marker))
    weights.unlink()
    torch.save(state, pipe / component / ("diffusion_pytorch_model.bin" if component == "unet" else "pytorch_model.bin"))
    with pytest.raises(FsmisError, match="non-tensor Python objects") as info:
        if component == "unet":
            sdc.build_unet("sd15", pretrained=True, source=str(pipe), weights_root=None)
        else:
            load_text_encoder("sd15", str(pipe), None)
    assert not marker.exists() and "safetensors" in info.value.hint


# -- damaged TAESD files (the CPU backbone's codec) ---------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "swapped", "other tensors"])
def test_a_damaged_taesd_file_gives_one_error_naming_it(damage: str, real_weights_root: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "taesd"
    folder.mkdir()
    encoder, decoder = folder / "taesd_encoder.safetensors", folder / "taesd_decoder.safetensors"
    shipped = real_weights_root / "taesd"
    encoder.write_bytes((shipped / ("taesd_decoder.safetensors" if damage == "swapped" else encoder.name)).read_bytes())
    decoder.write_bytes((shipped / ("taesd_encoder.safetensors" if damage == "swapped" else decoder.name)).read_bytes())
    if damage == "truncated":
        encoder.write_bytes(encoder.read_bytes()[:100_000])
    elif damage == "other tensors":
        state = load_file(str(encoder))
        state["0.weight"] = torch.zeros(8, 3, 3, 3)
        save_file(state, str(encoder))
    with pytest.raises(FsmisError) as info:
        sdc.build_vae("taesd", pretrained=True, source=str(folder), weights_root=None)
    err = info.value
    assert str(encoder) in err.message and len(err.message) < 400, err.message  # one sentence, not a key dump
    if damage == "truncated":
        assert "truncated" in err.message and "re-download" in err.hint
    else:
        assert "not a TAESD encoder file" in err.message and "swap encoder and decoder" in err.hint


# -- a weights root or hub cache that is not what it should be ------------------------------------------------
def test_a_weights_root_that_does_not_exist_is_named(tmp_path: Path) -> None:
    from fsmis_bench.api import build_method

    root = tmp_path / "no such root"
    with pytest.raises(sdc.WeightsNotFound) as info:
        build_method(["method=sdfsmis", "backbone=tiny", f"weights_root={root}"])
    assert f"the weights root {root}" in info.value.message and "does not exist" in info.value.message
    assert "taesd_encoder.safetensors" in info.value.message and "taesd_decoder.safetensors" in info.value.message
    assert "FSMIS_WEIGHTS_ROOT" in info.value.hint


@pytest.mark.parametrize("damage", ["no refs/main", "refs/main names a missing snapshot", "blob missing"])
def test_a_damaged_hub_cache_says_what_was_found(damage: str, written: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    snapshot = L.hub_cache_tree(cache, "someone/tiny-sd15", written["sd15"]["pipe"])
    repo = cache / "models--someone--tiny-sd15"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    if damage == "no refs/main":
        (repo / "refs" / "main").unlink()
    elif damage == "refs/main names a missing snapshot":
        (repo / "refs" / "main").write_text("f" * 40)
    else:
        os.unlink(os.path.realpath(snapshot / "unet" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FsmisError) as info:
        sdc.build_unet("sd15", pretrained=True, source="someone/tiny-sd15", weights_root=None)
    message = info.value.message
    assert "in no hub cache" not in message
    if damage == "no refs/main":
        assert "no refs/main" in message and snapshot.name[:12] in message
    elif damage == "refs/main names a missing snapshot":
        assert "f" * 40 in message and "missing" in message
    else:
        assert "diffusion_pytorch_model.safetensors" in message and "interrupted download" in message
