"""``fsmis-bench describe``: component counts, trained flags, added U-Net layers, totals."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fsmis_bench.method import Method
from fsmis_methods import _describe
from fsmis_methods import _sd_components as sdc


class _HandBuiltDiffusionMethod(Method):
    """An SD-FSMIS-shaped method built by hand: tiny U-Net with an added 8-channel support
    conv_in and one added attention layer, frozen codec and encoder, a trainable MLP, and a
    loose trainable scale that belongs to no component."""

    def __init__(self) -> None:
        cfg = OmegaConf.create({"backbone": {"name": "tiny"}, "pretrained": False, "fidelity": "paper", "method": {"lr": 1e-5}})
        super().__init__(cfg)
        torch.manual_seed(0)
        self.unet = sdc.build_unet("tiny", pretrained=False, source=None, weights_root=None)
        self.unet.conv_in_support = sdc.expand_conv_in(self.unet.conv_in, 8)
        block = self.unet.down_blocks[0].attentions[0].transformer_blocks[0]
        block.sii_attn = nn.Linear(32, 32)
        self.vae = sdc.build_vae("taesd", pretrained=False, source=None, weights_root=None)
        self.image_encoder = sdc.build_image_encoder("tiny", pretrained=False, source=None, weights_root=None)
        self.vtct = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
        self.loose_scale = nn.Parameter(torch.ones(3))

    def components(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "image_encoder": self.image_encoder, "vtct": self.vtct}

    def uses_random_weights(self) -> bool:
        return True


@pytest.fixture(scope="module")
def method() -> _HandBuiltDiffusionMethod:
    return _HandBuiltDiffusionMethod()


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["component"]: row for row in rows}


def test_counts_add_up_and_frozen_parts_are_not_trained(method: _HandBuiltDiffusionMethod) -> None:
    rows = _describe.describe_method(method)
    named = _by_name(rows)
    total = rows[-1]
    assert total["kind"] == "total" and total["params"] == sum(p.numel() for p in method.parameters())
    summed = [r for r in rows if r["kind"] in ("component", "other")]
    assert sum(r["params"] for r in summed) == total["params"]
    assert sum(r["trainable_params"] for r in summed) == total["trainable_params"]
    assert named["vae"]["trained"] == "no" and named["vae"]["trainable_params"] == 0
    assert named["vae"]["params"] == sum(p.numel() for p in method.vae.parameters()) > 0
    assert named["image_encoder"]["trained"] == "no"
    assert named["unet"]["trained"] == "yes" and named["vtct"]["trained"] == "yes"
    assert named["(other)"]["params"] == 3
    assert named["unet"]["random_weights"] is True and named["vtct"]["random_weights"] is None
    assert total["random_weights"] is True


def test_added_unet_layers_are_listed_with_counts(method: _HandBuiltDiffusionMethod) -> None:
    named = _by_name(_describe.describe_method(method))
    conv = named["unet: added input conv"]
    attn = named["unet: added attention"]
    assert conv["params"] == method.unet.conv_in_support.weight.numel() + method.unet.conv_in_support.bias.numel()
    assert conv["params"] == 8 * 32 * 9 + 32
    assert attn["params"] == 32 * 32 + 32
    assert conv["parent"] == attn["parent"] == "unet" and conv["kind"] == attn["kind"] == "added"
    assert conv["class"] == "Conv2d x1" and attn["class"] == "Linear x1"


def test_layer_moved_out_of_the_unet_is_reported_as_removed() -> None:
    torch.manual_seed(0)
    holder = nn.Module()
    holder.unet = sdc.build_unet("tiny", pretrained=False, source=None, weights_root=None)
    holder.support_conv_in = sdc.expand_conv_in(holder.unet.conv_in, 8)
    holder.unet.conv_in = nn.Identity()  # what SD-FSMIS does: the method owns the input convs
    rows = _describe.describe_method(holder)
    named = _by_name(rows)
    assert named["unet: removed conv_in"]["params"] == 4 * 32 * 9 + 32
    assert named["support_conv_in"]["params"] == 8 * 32 * 9 + 32
    summed = sum(r["params"] for r in rows if r["kind"] in ("component", "other"))
    assert summed == rows[-1]["params"] == sum(p.numel() for p in holder.parameters())


def test_reshaped_stock_layer_is_reported_as_modified() -> None:
    torch.manual_seed(0)
    unet = sdc.build_unet("tiny", pretrained=False, source=None, weights_root=None)
    unet.conv_in = sdc.expand_conv_in(unet.conv_in, 8)  # e.g. QE's 8-channel query input
    holder = nn.Module()
    holder.unet = unet
    named = _by_name(_describe.describe_method(holder))
    modified = named["unet: modified conv_in"]
    assert modified["kind"] == "modified" and modified["params"] == 8 * 32 * 9 + 32


def test_frozen_unet_is_reported_partial_when_only_added_layers_train(method: _HandBuiltDiffusionMethod) -> None:
    method.unet.requires_grad_(False)
    method.unet.conv_in_support.requires_grad_(True)
    try:
        named = _by_name(_describe.describe_method(method))
        assert named["unet"]["trained"] == "partial"
        assert named["unet"]["trainable_params"] == named["unet: added input conv"]["params"]
    finally:
        method.unet.requires_grad_(True)


def test_json_report_and_table(method: _HandBuiltDiffusionMethod) -> None:
    report = _describe.describe_report(method, ["method=hand", "backbone=tiny"])
    text = json.dumps(report)
    assert json.loads(text)["random_weights"] is True
    assert report["backbone"] == "tiny" and report["pretrained"] is False
    assert report["total_params"] == report["trainable_params"] + report["frozen_params"]
    table = _describe.format_table(report)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("component"))
    # numeric columns are right-aligned under their header
    params_end = header.index("params") + len("params")
    vae_line = next(line for line in lines if line.startswith("vae "))
    vae_params = next(r["params"] for r in report["components"] if r["component"] == "vae")
    assert vae_line[:params_end].endswith(f"{vae_params:,}")
    assert lines[-1].startswith("note: the tiny backbone has no pretrained weights: random by design")
    assert any(line.startswith("total") and f"{report['total_params']:,}" in line for line in lines)


def test_register_adds_describe_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    sub = parser.add_subparsers(dest="command")
    _describe.register(sub)
    args = parser.parse_args(["describe", "method=sdfsmis", "backbone=sd15", "pretrained=false", "--format", "json"])
    assert args.overrides == ["method=sdfsmis", "backbone=sd15", "pretrained=false"]
    assert args.format == "json" and callable(args.func) and args.meta is False


def test_describe_command_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("fsmis_bench.api", reason="fsmis_bench.api not written yet")
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    sub = parser.add_subparsers(dest="command")
    _describe.register(sub)
    args = parser.parse_args(["describe", "method=prototype", "--format", "json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "prototype" and report["class"] == "PrototypeNet"  # the registered name
    assert report["total_params"] == sum(r["params"] for r in report["components"] if r["kind"] in ("component", "other"))


@pytest.mark.parametrize("name, weights", [
    ("prototype", "no pretrained weights (trained from scratch)"),  # `pretrained` means nothing for it
    ("support_copy", "no weights"),
])
def test_the_title_says_pretrained_only_for_methods_that_load_weights(name, weights, capsys) -> None:
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    _describe.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["describe", f"method={name}"])
    assert args.func(args) == 0
    title = capsys.readouterr().out.splitlines()[0]
    from importlib.metadata import version

    assert title == (f"{name}  backbone=none  {weights}  fidelity=paper  "
                     f"plugin=builtin_methods (fsmis-bench {version('fsmis-bench')})")


def test_meta_flag_refuses_pretrained_weights() -> None:
    pytest.importorskip("fsmis_bench.api", reason="fsmis_bench.api not written yet")
    from fsmis_bench.errors import ConfigError

    parser = argparse.ArgumentParser(prog="fsmis-bench")
    _describe.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["describe", "method=prototype", "pretrained=true", "--meta"])
    with pytest.raises(ConfigError):
        args.func(args)


@pytest.mark.parametrize("method, backbone, total", [
    ("sdfsmis", "tiny", None),
    ("diffews", "tiny", None),
    # PROTOCOL.md §8: SD-1.5's U-Net has 859,520,964 parameters with 4 input channels;
    # DiffewS adds an 8-channel support conv_in beside it
    ("diffews", "sd15", 859_520_964),
])
def test_the_readme_describe_meta_command_builds_the_diffusion_methods(method, backbone, total, capsys) -> None:
    """README: ``fsmis-bench describe method=sdfsmis backbone=sd15 --meta --format json``; a
    schedule computed on the default (meta) device once made every SD build fail here."""
    parser = argparse.ArgumentParser(prog="fsmis-bench")
    _describe.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["describe", f"method={method}", f"backbone={backbone}", "--meta", "--format", "json"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["meta"] is True and report["total_params"] > 0
    if total is not None:
        rows = {row["component"]: row["params"] for row in report["components"]}
        assert rows["unet"] + rows["unet: removed conv_in"] == total  # conv_in moved out of the U-Net
        assert rows["unet: removed conv_in"] == 4 * 320 * 9 + 320
        assert rows["vae"] == 83_653_863  # PROTOCOL.md §8
