"""Config composition: defaults, presets, sweeps, hashes."""

from __future__ import annotations

import pytest

from fsmis_bench.config import compose, config_dir, expand_sweep
from fsmis_bench.errors import ConfigError
from fsmis_bench.records import config_hash, non_standard_options, run_dir_for, training_hash


def test_default_run_is_prototype_on_phantom():
    cfg = compose([])
    assert (cfg.method.name, cfg.dataset.name, cfg.setting, cfg.fold, cfg.seed) == ("prototype", "phantom", 1, 0, 0)
    assert cfg.backbone.name == "none" and cfg.fidelity == "paper"
    assert (config_dir() / "config.yaml").is_file()
    assert "hydra" not in cfg


def test_diffusion_methods_get_their_default_backbone_unless_given():
    assert compose(["method=sdfsmis"]).backbone.name == "sd15"
    assert compose(["method=sdfsmis", "backbone=tiny"]).backbone.name == "tiny"
    assert compose(["method=diffews", "backbone=sd21"]).backbone.cross_attention_dim == 1024


def test_fidelity_code_switches_every_harness_level_difference():
    paper, code = compose(["method=sdfsmis"]), compose(["method=sdfsmis", "fidelity=code"])
    assert (paper.protocol.train_labels, paper.protocol.dice, paper.train.grad_accum) == ("supervoxels", "per_volume", 1)
    assert code.fidelity == "code"
    assert (code.protocol.train_labels, code.protocol.dice, code.protocol.exclusion) == ("gt", "pooled", "all")
    assert (code.train.grad_accum, code.train.schedule) == (4, "linear")
    assert (paper.protocol.gt_exclusion, code.protocol.gt_exclusion) == ("per_group", "liver_spleen")
    assert (code.mixed_precision, code.tf32) == ("no", True)  # --mixed_precision no --allow_tf32
    assert (paper.protocol.chunk_support, code.protocol.chunk_support) == ("matched", "all")  # my_test_query.py
    assert compose(["fidelity=code", "train.grad_accum=2"]).train.grad_accum == 2  # the command line wins
    marks = non_standard_options(compose(["fidelity=code", "setting=2"]), random_weights=False)
    assert marks == ["exclusion=all", "dice=pooled", "train_labels=gt", "gt_exclusion=liver_spleen", "chunk_support=all"]


@pytest.mark.parametrize("override, message, options", [
    ("fidelity=codes", "unknown fidelity 'codes'; did you mean 'code'?", "code, paper"),
    ("speed=fastest", "unknown speed 'fastest'; did you mean 'fast'?", "default, fast"),
    ("memory=lo", "unknown memory 'lo'; did you mean 'low'?", "default, low"),
    ("memory=tiny", "unknown memory 'tiny'", "default, low"),
])
def test_unknown_preset_lists_the_options(override, message, options):
    with pytest.raises(ConfigError) as info:
        compose([override])
    assert str(info.value) == message or str(info.value).startswith(message)
    assert options in info.value.hint


def test_sweep_expansion():
    runs = expand_sweep(["method=a,b", "fold=range(0,3)", "seed=1"])
    assert len(runs) == 6
    assert ["method=a", "fold=0", "seed=1"] in runs and ["method=b", "fold=2", "seed=1"] in runs


def test_hashes_ignore_paths_and_training_hash_ignores_evaluation_options(tmp_path):
    base = compose(["method=prototype"])
    moved = compose(["method=prototype", f"results_dir={tmp_path}", "data_root=/elsewhere", "device=cpu"])
    assert config_hash(base) == config_hash(moved)
    pooled = compose(["method=prototype", "protocol.dice=pooled"])
    assert config_hash(base) != config_hash(pooled) and training_hash(base) == training_hash(pooled)
    assert training_hash(base) != training_hash(compose(["method=prototype", "train.steps=7"]))
    assert run_dir_for(base).parent == run_dir_for(pooled).parent  # siblings: same method/dataset/setting/fold


def test_a_checkout_imported_over_the_installed_package_is_refused_clearly(monkeypatch):
    """`python -m fsmis_bench.cli` run from a checkout's root imports the checkout's
    fsmis_bench, which has no `configs` subpackage (the wheel maps the top-level configs/
    there), while the methods still come from the wheel: a lent H100 failed every run that
    way with a traceback. It is one clear error now, saying what to do."""
    from fsmis_bench import config

    real_files = config.resources.files

    def without_configs_package(anchor):
        if anchor == "fsmis_bench.configs":
            raise ModuleNotFoundError("No module named 'fsmis_bench.configs'")
        return real_files(anchor)

    monkeypatch.setattr(config.resources, "files", without_configs_package)
    with pytest.raises(ConfigError, match="two versions of the code") as caught:
        config_dir()
    assert "python -P" in caught.value.hint and "pip install -e ." in caught.value.hint


def test_a_second_checkout_over_an_editable_install_is_refused(tmp_path, monkeypatch):
    """`python -m fsmis_bench` in another checkout's root imports that checkout's fsmis_bench
    while the editable install still serves the methods: refused, never mixed."""
    import importlib.machinery
    import importlib.util

    from fsmis_bench import config
    from fsmis_bench.errors import ConfigError

    config._check_one_tree.__wrapped__()  # this checkout: one tree
    other = tmp_path / "first_checkout" / "methods" / "__init__.py"
    real = importlib.util.find_spec

    def elsewhere(name, *args):
        if name == "fsmis_methods":
            return importlib.machinery.ModuleSpec(name, None, origin=str(other))
        return real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", elsewhere)
    with pytest.raises(ConfigError, match=r"the built-in fsmis_methods from .*first_checkout: two copies of the code"):
        config._check_one_tree.__wrapped__()
