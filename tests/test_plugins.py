"""Registry and plugin discovery, the out-of-tree example plugin end to end, and the
contract every registered method must honour."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import pytest
import torch

from fsmis_bench import plugins
from fsmis_bench._registry import PluginError, Registry
from fsmis_bench.cli import main
from fsmis_bench.errors import NameCollisionError, UnknownNameError
from fsmis_bench.method import EpisodeBatch, contract_problems

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "threshold_plugin"


def test_registry_collision_and_unknown_name():
    registry = Registry("method")
    registry.register("alpha", dict, plugin="p1")
    with pytest.raises(NameCollisionError, match="registered twice.*p1.*p2"):
        registry.register("alpha", dict, plugin="p2")
    with pytest.raises(UnknownNameError, match="known methods: alpha") as info:
        registry.get("alpah")
    assert "did you mean 'alpha'" in info.value.hint


def test_registry_is_lazy():
    registry = Registry("thing")
    registry.register("lazy", "no_such_module_anywhere:Thing", plugin="p")
    assert "lazy" in registry  # registering imported nothing
    # a failed import names the entry and its plugin (one message, no traceback in the CLI)
    with pytest.raises(PluginError, match=r"thing 'lazy' \(plugin 'p'\) cannot be imported.*No module named"):
        registry.get("lazy")


def test_builtins_register_through_the_entry_point_group():
    regs = plugins.registries()
    for kind, registry, name in (("method", regs.methods, "prototype"), ("dataset", regs.datasets, "abd_mri")):
        assert registry.entry(name).plugin.startswith("builtin_"), kind
    assert {"abd_mri", "abd_ct", "card_mri", "nifti_folder", "phantom"} <= set(regs.datasets.names())
    assert {"1", "2"} <= set(regs.settings.names())


@pytest.fixture()
def installed_example_plugin(tmp_path, monkeypatch):
    """Make the example plugin discoverable exactly as `pip install` would: a dist-info
    with an entry point in the group, on sys.path."""
    site = tmp_path / "site"
    dist = site / "fsmis_threshold_plugin-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fsmis-threshold-plugin\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[fsmis_bench.plugins]\nthreshold = fsmis_threshold\n")
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    plugins.plugin_manager.cache_clear()
    plugins.registries.cache_clear()
    yield
    sys.modules.pop("fsmis_threshold", None)
    plugins.plugin_manager.cache_clear()
    plugins.registries.cache_clear()


def test_out_of_tree_plugin_end_to_end(installed_example_plugin, results_dir, capsys):
    entry = plugins.registries().methods.entry("intensity_window")
    assert entry.plugin == "threshold (fsmis-threshold-plugin)"
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    (line,) = [row for row in listed.splitlines() if " intensity_window " in row]
    assert f"threshold (fsmis-threshold-plugin {entry.version})" in line and entry.version
    assert main(["describe", "method=intensity_window"]) == 0
    assert f"plugin=threshold (fsmis-threshold-plugin {entry.version})" in capsys.readouterr().out.splitlines()[0]
    assert main(["run", "method=intensity_window", "dataset=phantom", "fold=1"]) == 0
    (cases,) = results_dir.glob("intensity_window/phantom/setting1/fold1/*/cases.csv")
    assert (cases.parent / "COMPLETE").exists()
    assert len(cases.read_text().splitlines()) > 1
    # report figures show the plugin's own display name and colour
    from matplotlib.colors import to_rgb

    from fsmis_bench.reporting import figures, load_results, style

    assert style.method_label("intensity_window") == "Intensity window"
    assert style.method_colour("intensity_window") == pytest.approx(to_rgb("#882255"))
    fig = figures.organ_dice_figure(load_results(results_dir))
    assert "Intensity window" in [t.get_text().split("\u00a0")[0] for t in fig.findobj(matplotlib.text.Text)]


def test_plugin_name_collision_is_reported(monkeypatch):
    class Duplicate:
        @plugins.hookimpl
        def fsmis_register_methods(self, registry):
            registry.register("prototype", dict)

    plugins.register_plugin(Duplicate(), "duplicate")
    try:
        with pytest.raises(NameCollisionError, match="'prototype' is registered twice"):
            plugins.registries()
    finally:
        plugins.unregister_plugin("duplicate")


# -- the method contract --------------------------------------------------------------------
def _method_overrides(name: str) -> list[str]:
    from fsmis_bench.config import compose

    overrides = [f"method={name}", "dataset=phantom"]
    method_cfg = compose(overrides).method
    if method_cfg.get("default_backbone"):
        overrides += ["backbone=tiny", "pretrained=false"]
    if method_cfg.get("encoder"):
        # the classic methods' ResNet-101 is pinned by tests/test_classic_methods.py; the
        # contract runs on the same code with the smallest encoder and random weights
        overrides += ["method.encoder=resnet18", "pretrained=false"]
    return overrides


@pytest.mark.parametrize("name", plugins.registries().methods.names())
def test_method_contract(name):
    from fsmis_bench.api import build_method
    from fsmis_bench.evaluation import check_prediction

    torch.manual_seed(0)
    method = build_method(_method_overrides(name))
    assert method.input_norm in ("zscore", "minmax")
    assert contract_problems(method) == []  # what building a third-party method checks
    size = 64
    support_images = torch.randn(1, 1, size, size)
    support_masks = torch.zeros(1, 1, size, size)
    support_masks[..., 16:40, 20:44] = 1
    query_images = torch.randn(3, 1, size, size)
    method.eval()
    with torch.no_grad():
        mask = method.predict(support_images, support_masks, query_images)
    assert mask.shape == (3, size, size) and mask.dtype == torch.bool
    check_prediction(method, mask, 3, (size, size))  # what evaluation checks of every chunk
    if method.needs_training:
        groups = method.param_groups()
        assert groups and all(g["params"] and g["lr"] > 0 for g in groups)
        method.train()
        batch = EpisodeBatch(support_images[None], support_masks[None], query_images[:1], support_masks)
        loss = method(batch)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert any(p.grad is not None for g in groups for p in g["params"])


@pytest.mark.parametrize("meta, random", [
    # the record's own random_weights (the method's uses_random_weights()) decides
    ({"pretrained": False, "random_weights": False}, False),  # pretrained=false on a method without pretrained weights
    ({"pretrained": True, "random_weights": True}, True),  # e.g. the tiny backbone
    ({"pretrained": False, "random_weights": True}, True),
    # a record written before random_weights existed: pretrained=false meant random weights
    ({"pretrained": False}, True),
    ({"pretrained": True}, False),
    ({}, False),
])
def test_random_weights_come_from_the_record(meta, random):
    from fsmis_bench.reporting.collect import is_random

    assert is_random(meta) is random


def test_python_m_fsmis_bench_is_the_cli(monkeypatch, capsys):
    """`python -m fsmis_bench ...` where the console script is not installed (a venv that sees
    fsmis-bench through a .pth file)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["fsmis_bench", "list"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("fsmis_bench", run_name="__main__")
    assert info.value.code == 0
    assert "support_copy" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["fsmis_bench", "run", "method=no_such_method"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("fsmis_bench", run_name="__main__")
    assert info.value.code == 2  # the CLI's own exit status
