"""``fsmis-bench weights check|download``: what a configuration needs, where it was found,
whether it loads; downloads planned offline against a mocked hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sd_layouts as L
from fsmis_bench.cli import main
from fsmis_methods import _sd_components as sdc
from fsmis_methods import _weights as weights_module
from fsmis_methods._hub import select_repo_files


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    yield from L.go_offline(tmp_path, monkeypatch, tiny=False)


def test_check_tiny_passes_with_the_shipped_taesd(real_weights_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "check", "backbone=tiny", f"weights_root={real_weights_root}"]) == 0
    out = capsys.readouterr().out
    assert f"{real_weights_root / 'taesd'}  [TAESD original files]" in out
    assert "random by design" in out and "all components load" in out


def test_check_sd15_without_weights_lists_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "root").mkdir()
    assert main(["weights", "check", "backbone=sd15", f"weights_root={tmp_path / 'root'}"]) == 2
    out = capsys.readouterr().out
    for name in ("unet", "vae", "text_encoder", "tokenizer", "image_encoder"):
        assert any(line.split()[:2] == [name, "MISSING"] for line in out.splitlines()), name
    assert str(tmp_path / "root" / "stable-diffusion-v1-5" / "stable-diffusion-v1-5") in out  # the exact places searched
    assert str(tmp_path / "hf_cache" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5") in out
    assert str(tmp_path / "root" / "facebook" / "dinov2-small") in out
    assert "fsmis-bench weights download backbone=sd15" in out


def test_check_only_what_the_method_needs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "check", "method=diffews", "backbone=sd21", f"weights_root={tmp_path}", "--format", "json"]) == 2
    rows = json.loads(capsys.readouterr().out)["components"]
    assert [r["component"] for r in rows] == ["unet", "vae", "text_encoder", "tokenizer"]  # no VTCT image encoder
    assert main(["weights", "check", "method=sdfsmis", "backbone=sd21", "fidelity=code", f"weights_root={tmp_path}", "--format", "json"]) == 2
    rows = json.loads(capsys.readouterr().out)["components"]
    assert [(r["component"], r["kind"]) for r in rows] == [("unet", "sd21"), ("vae", "sd"), ("image_encoder", "dinov2_base")]
    assert main(["weights", "check", "backbone=sd15", "pretrained=false"]) == 0


def _tiny_weights_root(root: Path, kind: str = "sd15") -> Path:
    """A weights root as `weights download` leaves it: the pipeline and DINOv2 under their hub ids."""
    L.save_pipeline(root / sdc.HUB_IDS[kind], kind, L.build_components(kind))
    L.build_dinov2("dinov2_small").save_pretrained(root / sdc.HUB_IDS["dinov2_small"])
    return root


def test_check_passes_when_everything_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    L.use_tiny_architectures(monkeypatch)
    root = _tiny_weights_root(tmp_path / "root")
    assert main(["weights", "check", "backbone=sd15", f"weights_root={root}", "--digests"]) == 0
    out = capsys.readouterr().out
    assert "all components load" in out and "MISSING" not in out
    unet_file = root / sdc.HUB_IDS["sd15"] / "unet" / "diffusion_pytorch_model.safetensors"
    assert f"{L.sha256(unet_file)}  diffusion_pytorch_model.safetensors" in out


def test_download_fetches_exactly_what_the_loaders_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub

    L.use_tiny_architectures(monkeypatch)
    staged = _tiny_weights_root(tmp_path / "staged")  # what "the hub" holds
    repos = {sdc.HUB_IDS["sd15"]: staged / sdc.HUB_IDS["sd15"], sdc.HUB_IDS["dinov2_small"]: staged / sdc.HUB_IDS["dinov2_small"]}
    extras = ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin",
              "text_encoder/pytorch_model.bin", "safety_checker/model.safetensors", "v1-5-pruned.ckpt", "README.md"]
    calls = []

    class FakeApi:
        def list_repo_files(self, repo_id: str) -> list[str]:
            return sorted(str(p.relative_to(repos[repo_id])) for p in repos[repo_id].rglob("*") if p.is_file()) + extras

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str], local_dir: str | None = None) -> str:
        calls.append((repo_id, sorted(allow_patterns), local_dir))
        for name in allow_patterns:
            target = Path(local_dir) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((repos[repo_id] / name).read_bytes())
        return local_dir

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(weights_module, "hub_offline", lambda: False)  # "the hub" above is reachable
    root = tmp_path / "root"
    assert main(["weights", "download", "backbone=sd15", f"weights_root={root}", "--dry-run"]) == 0
    assert calls == [] and not root.exists()
    assert main(["weights", "download", "backbone=sd15", f"weights_root={root}"]) == 0
    assert calls == [
        (sdc.HUB_IDS["sd15"], sorted(["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                                      "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
                                      "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
                                      "tokenizer/vocab.json", "model_index.json", "scheduler/scheduler_config.json"]),
         str(root / sdc.HUB_IDS["sd15"])),
        (sdc.HUB_IDS["dinov2_small"], ["config.json", "model.safetensors"], str(root / sdc.HUB_IDS["dinov2_small"])),
    ]
    assert "all components load" in capsys.readouterr().out  # download ends with a check
    # a second download finds everything and fetches nothing
    assert main(["weights", "download", "backbone=sd15", f"weights_root={root}"]) == 0
    assert len(calls) == 2 and "nothing to download" in capsys.readouterr().out


def test_download_without_the_hub_stops_at_once_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Not after huggingface_hub's retries (about half a minute): the hub is checked first."""
    import huggingface_hub

    class FakeApi:
        def list_repo_files(self, repo_id: str) -> list[str]:
            raise AssertionError("the hub was contacted")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeApi().list_repo_files)
    monkeypatch.setattr(weights_module, "hub_offline", lambda: True)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["weights", "download", "backbone=tiny", f"weights_root={tmp_path / 'root'}"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot download madebyollin/taesd: the hub is unreachable from here" in err
    assert "fsmis-bench weights download backbone=tiny" in err and "Traceback" not in err
    # behind a proxy the direct probe proves nothing: the download itself tries (and says why it failed)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert main(["weights", "download", "backbone=tiny", f"weights_root={tmp_path / 'root'}"]) == 2
    err = capsys.readouterr().err
    assert "downloading madebyollin/taesd failed: AssertionError: the hub was contacted" in err


def test_download_needs_a_destination(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FSMIS_WEIGHTS_ROOT", raising=False)
    assert main(["weights", "download", "backbone=sd15"]) == 2
    assert "FSMIS_WEIGHTS_ROOT" in capsys.readouterr().err


@pytest.mark.parametrize("files, components, expected", [
    # fp32 safetensors preferred over .bin and the fp16 / EMA variants
    (["unet/config.json", "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors",
      "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.bin"],
     [("unet", "diffusers")], ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]),
    # sharded weights: the index and every shard
    (["text_encoder/config.json", "text_encoder/model.safetensors.index.json", "text_encoder/model-00001-of-00002.safetensors",
      "text_encoder/model-00002-of-00002.safetensors", "text_encoder/pytorch_model.bin"],
     [("text_encoder", "transformers")], ["text_encoder/config.json", "text_encoder/model.safetensors.index.json",
                                          "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model-00002-of-00002.safetensors"]),
    # only .bin in the repo
    (["vae/config.json", "vae/diffusion_pytorch_model.bin"], [("vae", "diffusers")], ["vae/config.json", "vae/diffusion_pytorch_model.bin"]),
    # a single-model repo keeps its files at the root (TAESD asked for as vae/)
    (["config.json", "diffusion_pytorch_model.safetensors", "taesd_encoder.pth"], [("vae", "diffusers")],
     ["config.json", "diffusion_pytorch_model.safetensors"]),
])
def test_select_repo_files(files: list[str], components: list, expected: list[str]) -> None:
    assert select_repo_files(files, components) == expected


# -- what `check` says beyond "found": classic methods, damaged TAESD, a scheduler that disagrees ----------
@pytest.mark.parametrize("method", ["adnet", "qnet", "ssl_alpnet"])
def test_check_a_classic_method_lists_its_torchvision_file(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("fsmis_methods._resnet_encoders._host_answers", lambda url, timeout=1.5: False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["weights", "check", f"method={method}", f"weights_root={tmp_path}"]) == 2
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:1] == ["encoder"])
    assert row.split()[1] == "MISSING" and "deeplabv3_resnet101_coco-586e9e4e.pth" in row
    assert str(tmp_path / "torchvision" / "deeplabv3_resnet101_coco-586e9e4e.pth") in out  # where it was looked for
    assert "download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth" in out
    assert main(["weights", "check", f"method={method}", "pretrained=false"]) == 0


def test_check_a_classic_method_loads_the_file_it_finds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from fsmis_methods._resnet_encoders import ResNet

    torch.manual_seed(0)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(ResNet(18).state_dict(), path)
    overrides = ["method=adnet", "method.encoder=resnet18", "method.init=imagenet", f"method.encoder_source={path}"]
    assert main(["weights", "check", *overrides]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "loaded" in out and "all components load" in out
    torch.save({"conv1.weight": torch.zeros(1)}, path)  # another architecture: FAILED, not found
    assert main(["weights", "check", *overrides]) == 2
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "swapped"])
def test_check_tiny_with_a_damaged_taesd_file_names_it(damage: str, real_weights_root: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "root" / "taesd"
    folder.mkdir(parents=True)
    names = ["taesd_encoder.safetensors", "taesd_decoder.safetensors"]
    for name, shipped in zip(names, names[::-1] if damage == "swapped" else names):
        (folder / name).write_bytes((real_weights_root / "taesd" / shipped).read_bytes())
    if damage == "truncated":
        (folder / names[0]).write_bytes((folder / names[0]).read_bytes()[:100_000])
    assert main(["weights", "check", "backbone=tiny", f"weights_root={tmp_path / 'root'}"]) == 2
    out = capsys.readouterr().out
    assert str(folder / names[0]) in out and "Traceback" not in out
    assert ("re-download" in out) if damage == "truncated" else ("did you swap encoder and decoder" in out)


def test_check_a_folder_trained_for_another_prediction_type_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    L.use_tiny_architectures(monkeypatch)
    pipe = L.save_pipeline(tmp_path / "sd21-base", "sd21", L.build_components("sd21"))
    scheduler = pipe / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(dict(json.loads(scheduler.read_text()), prediction_type="epsilon")))
    args = ["weights", "check", "method=diffews", "backbone=sd21", f"backbone.source={pipe}", "backbone.cross_attention_dim=32"]
    assert main(args) == 2
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["unet", "FAILED"] for line in out.splitlines())
    assert "set backbone.prediction_type=epsilon" in out
    assert main(args + ["backbone.prediction_type=epsilon"]) == 0


def test_check_says_when_the_weights_root_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "check", "backbone=tiny", f"weights_root={tmp_path / 'nope'}"]) == 2
    out = capsys.readouterr().out
    assert f"the weights root {tmp_path / 'nope'}" in out and "does not exist" in out
    assert "taesd_encoder.safetensors" in out
