"""Broken third-party plugins: one clear message naming the plugin and its distribution,
exit status 2, no traceback and nothing written; and what a working plugin's run records.

Plugins are "installed" in-process as `pip install` would leave them: a package and a
dist-info with an entry point in the group, on sys.path (no pip, no subprocess).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmis_bench import plugins
from fsmis_bench.cli import main
from fsmis_bench.errors import ConfigError, FsmisError, NameCollisionError
from fsmis_bench.evaluation import check_prediction
from fsmis_bench.method import Method
from fsmis_bench.plugins import PluginError, PluginWarning

# A training-free method plugin; {name}: its registered name, {output}: what predict returns
# (q, h, w: the chunk's query count and size).
METHOD_PLUGIN = '''
from pathlib import Path

import torch

from fsmis_bench.method import Method
from fsmis_bench.plugins import hookimpl


class Fixed(Method):
    needs_training = False

    def predict(self, support_images, support_masks, query_images):
        q, _, h, w = query_images.shape
        return {output}


@hookimpl
def fsmis_register_methods(registry):
    registry.register("{name}", Fixed, description="test plugin")


@hookimpl
def fsmis_config_dirs():
    return [str(Path(__file__).parent / "configs")]
'''
BOOL_OUTPUT = "torch.ones(q, h, w, dtype=torch.bool)"

Install = Callable[..., None]


def _reload() -> None:
    plugins.plugin_manager.cache_clear()
    plugins.registries.cache_clear()


@pytest.fixture()
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """``install(dist, version, module, source, configs={"method/x.yaml": text}, entry=None)``:
    a plugin package plus its dist-info (entry point ``<entry or module> = module``), found on
    sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def _install(dist: str, version: str, module: str, source: str, configs: dict[str, str] | None = None,
                 entry: str | None = None) -> None:
        package = site / module
        package.mkdir()
        (package / "__init__.py").write_text(textwrap.dedent(source))
        for relative, text in (configs or {}).items():
            path = package / "configs" / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[fsmis_bench.plugins]\n{entry or module} = {module}\n")
        modules.append(module)
        importlib.invalidate_caches()
        _reload()

    yield _install
    for module in modules:
        sys.modules.pop(module, None)
    _reload()


def _method_plugin(install: Install, name: str, output: str = BOOL_OUTPUT, config: str | None = None,
                   dist: str | None = None, version: str = "0.1.0") -> None:
    config = f"# @package _global_\nmethod:\n  name: {name}\n" if config is None else config
    install(dist or f"fsmis-{name.replace('_', '-')}", version, f"pkg_{name}",
            METHOD_PLUGIN.format(name=name, output=output), {f"method/{name}.yaml": config})


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with one message holding every ``expected`` text."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    # a run may say what it reads first (its fold's scans); then the one message, no traceback
    assert ("\n" + err).count("\nerror: ") == 1 and "Traceback" not in err, err
    err = err[err.index("error: "):]
    assert err.startswith("error: ")
    for text in expected:
        assert text in err, err
    return err


# -- a plugin that fails to load ---------------------------------------------------------------
@pytest.mark.parametrize("argv", [["list"], ["run", "method=support_copy"], ["describe", "method=prototype"]])
def test_plugin_that_raises_on_import_is_named_with_its_distribution(install, argv, capsys, results_dir):
    install("fsmis-bad-importerr", "0.1.0", "pkg_importerr", "import this_module_does_not_exist_xyz\n")
    _fails(argv, capsys, "plugin 'pkg_importerr' of fsmis-bad-importerr 0.1.0 failed to load",
           "entry point 'pkg_importerr = pkg_importerr'",
           "ModuleNotFoundError: No module named 'this_module_does_not_exist_xyz'",
           "hint: fix the plugin, or uninstall it: pip uninstall fsmis-bad-importerr")
    assert not results_dir.exists()


def test_plugin_hook_that_raises_is_named(install, capsys):
    install("fsmis-bad-hook", "2.0", "pkg_badhook", """
        from fsmis_bench.plugins import hookimpl

        @hookimpl
        def fsmis_register_methods(registry):
            raise ValueError("no weights for my method")
    """)
    _fails(["list"], capsys, "plugin 'pkg_badhook' of fsmis-bad-hook 2.0 failed in its hook fsmis_register_methods",
           "ValueError: no weights for my method (pkg_badhook/__init__.py:6)", "pip uninstall fsmis-bad-hook")


def test_config_dirs_hook_must_return_a_list(install):
    install("fsmis-bad-dirs", "0.1.0", "pkg_baddirs", """
        from fsmis_bench.plugins import hookimpl

        @hookimpl
        def fsmis_config_dirs():
            return "/some/configs"  # a string would be read letter by letter
    """)
    with pytest.raises(PluginError, match="fsmis_config_dirs returned '/some/configs', not a list of folders"):
        plugins.registries()


# -- names, configs, shadowing -------------------------------------------------------------------
def test_name_collision_names_both_distributions(install, capsys):
    _method_plugin(install, "prototype", dist="fsmis-bad-collide")
    with pytest.raises(NameCollisionError) as info:
        plugins.registries()
    message, hint = info.value.message, info.value.hint
    assert message.startswith("method 'prototype' is registered twice: by plugin ")
    assert "plugin 'builtin_methods' of fsmis-bench 0.1.0" in message
    assert "plugin 'pkg_prototype' of fsmis-bad-collide 0.1.0" in message
    assert "fsmis-bench 0.1.0" in hint and "fsmis-bad-collide 0.1.0" in hint
    assert hint.endswith("pip uninstall fsmis-bad-collide")  # the built-in name stays


def test_display_name_of_another_method_is_refused(install, capsys):
    """Reports group rows by the shown name: a plugin method shown as "Prototype" would be
    merged with the built-in prototype's rows."""
    source = METHOD_PLUGIN.format(name="tinyproto", output=BOOL_OUTPUT).replace(
        'description="test plugin")', 'description="test plugin", display=Display(name="prototype"))').replace(
        "from fsmis_bench.plugins import hookimpl", "from fsmis_bench.plugins import Display, hookimpl")
    install("fsmis-same-display", "0.1.0", "pkg_same_display", source)
    _fails(["list"], capsys, "method 'tinyproto' of plugin 'pkg_same_display' of fsmis-same-display 0.1.0 would be "
           "shown in reports as 'prototype', the name method 'prototype' of plugin 'builtin_methods'",
           "give it another display name")


@pytest.mark.parametrize("entry", ["threshold", "builtin_methods"])
def test_two_packages_advertising_one_plugin_name_are_refused(install, entry, capsys):
    """pluggy keeps one plugin per name: the other package's methods would vanish, or every
    built-in one (an entry point named like fsmis-bench's own)."""
    source = METHOD_PLUGIN.format(name="{name}", output=BOOL_OUTPUT)
    install("fsmis-first-copy", "0.1.0", "pkg_first", source.replace("{name}", "first_method"), entry=entry)
    install("fsmis-second-copy", "0.2.0", "pkg_second", source.replace("{name}", "second_method"), entry=entry)
    err = _fails(["list"], capsys, f"two installed packages advertise a plugin named {entry!r}",
                 "only one of them could be loaded", "another entry-point name in its pyproject.toml")
    assert "fsmis-second-copy 0.2.0" in err or "fsmis-first-copy 0.1.0" in err
    if entry == "threshold":
        assert "fsmis-first-copy 0.1.0 (threshold = pkg_first)" in err and "fsmis-second-copy 0.2.0" in err


def test_config_hidden_by_a_builtin_one_warns(install, capsys):
    install("fsmis-bad-shadow", "0.1.0", "pkg_shadow", """
        from pathlib import Path
        from fsmis_bench.plugins import hookimpl

        @hookimpl
        def fsmis_config_dirs():
            return [str(Path(__file__).parent / "configs")]
    """, {"method/prototype.yaml": "# @package _global_\nmethod:\n  name: prototype\n  width: 8\n"})
    with pytest.warns(PluginWarning, match=r"plugin 'pkg_shadow' of fsmis-bad-shadow 0.1.0 ships method/prototype.yaml, "
                      r"which is never read: the built-in configs/method/prototype.yaml comes first"):
        plugins.registries()
    _reload()
    assert main(["list"]) == 0  # a warning, not an error; the CLI prints it as one line
    err = capsys.readouterr().err
    assert err.startswith("warning: plugin 'pkg_shadow'") and "pip uninstall fsmis-bad-shadow" in err


def test_method_registered_without_a_config_names_its_plugin(install, capsys, results_dir):
    install("fsmis-bad-nocfg", "0.1.0", "pkg_nocfg", """
        import torch
        from fsmis_bench.method import Method
        from fsmis_bench.plugins import hookimpl

        class P(Method):
            needs_training = False

        @hookimpl
        def fsmis_register_methods(registry):
            registry.register("nocfg_method", P)
    """)
    _fails(["run", "method=nocfg_method"], capsys,
           "method 'nocfg_method' (plugin 'pkg_nocfg' of fsmis-bad-nocfg 0.1.0) has no config",
           "its plugin returns no folder from an fsmis_config_dirs hook", "must ship method/nocfg_method.yaml",
           "in a folder that its fsmis_config_dirs hook returns")
    assert not results_dir.exists()


def test_a_method_whose_config_a_plugin_ships_but_never_registers_is_named(install, capsys, results_dir):
    install("fsmis-forgot", "0.1.0", "pkg_forgot", """
        from pathlib import Path
        from fsmis_bench.plugins import hookimpl

        @hookimpl
        def fsmis_config_dirs():
            return [str(Path(__file__).parent / "configs")]
    """, {"method/forgot_method.yaml": "# @package _global_\nmethod:\n  name: forgot_method\n"})
    _fails(["run", "method=forgot_method"], capsys, "unknown method 'forgot_method'",
           "plugin 'pkg_forgot' of fsmis-forgot 0.1.0 ships ", "pkg_forgot/configs/method/forgot_method.yaml, but no "
           "plugin registers a method named 'forgot_method'", "hint: register it in the plugin's "
           "fsmis_register_methods hook: registry.register('forgot_method'")
    assert not results_dir.exists()


@pytest.mark.parametrize("value, expected", [
    ("[8", ["cannot read ", "pkg_yaml_method/configs/method/yaml_method.yaml, line ",
            "hint: fix the YAML syntax there"]),
    ("${oops}", ["method.width cannot be resolved: Interpolation key 'oops' not found",
                 "fix the ${...} interpolation that sets method.width in its config file"]),
])
def test_a_config_file_that_cannot_be_read_or_resolved_is_one_line(value, expected, install, capsys, results_dir):
    _method_plugin(install, "yaml_method", config=f"# @package _global_\nmethod:\n  name: yaml_method\n  width: {value}\n")
    _fails(["run", "method=yaml_method"], capsys, *expected)
    assert not results_dir.exists()


@pytest.mark.parametrize("config, expected", [
    # no `# @package _global_`: the options land under method.* and the name is missing
    ("lr: 0.5\n", ["does not set method.name", "# @package _global_", "name: noname_method"]),
    ("# @package _global_\ntrain:\n  steps: 3\n", ["does not set method.name", "add `name: noname_method`"]),
    # a name of another method would silently run that method
    ("# @package _global_\nmethod:\n  name: support_copy\n",
     ["sets method.name='support_copy', so method=noname_method would run 'support_copy'",
      "set `name: noname_method`"]),
])
def test_method_name_must_exist_and_equal_the_config_name(install, config, expected, capsys, results_dir):
    _method_plugin(install, "noname_method", config=config)
    err = _fails(["run", "method=noname_method"], capsys, *expected)
    assert "pkg_noname_method/configs/method/noname_method.yaml (method=noname_method)" in err
    assert not results_dir.exists()


DATASET_PLUGIN = '''
from pathlib import Path

from fsmis_bench.plugins import hookimpl
from fsmis_datasets.phantom import Phantom


@hookimpl
def fsmis_register_datasets(registry):
    registry.register("{name}", Phantom, description="test plugin")


@hookimpl
def fsmis_config_dirs():
    return [str(Path(__file__).parent / "configs")]
'''


@pytest.mark.parametrize("config, expected", [
    ("n_cases: 10\n", ["does not set dataset.name", "add the line `name: my_scans`"]),
    # the name of another dataset would silently load that dataset
    ("name: phantom\nn_cases: 10\n", ["sets dataset.name='phantom', so dataset=my_scans would run 'phantom'",
                                       "set `name: my_scans`"]),
])
def test_dataset_name_must_exist_and_equal_the_config_name(install, config, expected, capsys, results_dir):
    install("fsmis-my-scans", "0.1.0", "pkg_my_scans", DATASET_PLUGIN.format(name="my_scans"),
            {"dataset/my_scans.yaml": config})
    err = _fails(["run", "method=support_copy", "dataset=my_scans"], capsys, *expected)
    assert "pkg_my_scans/configs/dataset/my_scans.yaml (dataset=my_scans)" in err
    assert not results_dir.exists()


def test_dataset_name_cannot_be_overridden(capsys, results_dir):
    _fails(["run", "method=support_copy", "dataset=phantom", "dataset.name=abd_mri"], capsys,
           "dataset.name=abd_mri overrides the name that dataset=phantom set", "dataset=abd_mri")
    assert not results_dir.exists()


def test_method_name_cannot_be_overridden(capsys, results_dir):
    _fails(["run", "method=prototype", "method.name=support_copy"], capsys,
           "method.name=support_copy overrides the name that method=prototype set", "method=support_copy")


# -- method options ----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["method.lr=abc"], "method.lr='abc' is not allowed: method 'prototype' (plugin 'builtin_methods' of fsmis-bench"),
    (["method.width=abc"], "method.width='abc' is not allowed: method 'prototype' (plugin 'builtin_methods'"),
    (["method.width=8.5"], "declares method.width as an integer in method/prototype.yaml"),
    (["method.width=true"], "declares method.width as an integer"),
    (["method.scale=fast"], "declares method.scale as a number"),
    (["method.lr=-1"], "method.lr=-1 is not allowed"),
    (["method.lr=0"], "method.lr=0 is not allowed"),
    (["method.lr=nan"], "method.lr=nan is not allowed"),
    (["method.lr=inf"], "method.lr=inf is not allowed"),
    (["method.lr=null"], "method.lr=None is not allowed"),
    (["method=sdfsmis", "backbone=tiny", "method.lr_vtct=-5e-5"], "method.lr_vtct=-5e-05 is not allowed"),
    (["method=sdfsmis", "backbone=tiny", "method.vae_dtype=16"],
     "declares method.vae_dtype as text"),
    (["method=sdfsmis", "backbone=tiny", "method.joint_pass=yes"],
     "declares method.joint_pass as auto, true or false"),
    # 0 used to fail after training (ADNet's split) or read as 8 (SD-FSMIS's `or 8`)
    (["method=adnet", "pretrained=false", "method.predict_batch_size=0"], "method.predict_batch_size=0 is not allowed"),
    (["method=sdfsmis", "backbone=tiny", "method.predict_batch_size=0"], "method.predict_batch_size=0 is not allowed"),
    (["method=qnet", "pretrained=false", "method.predict_batch_size=-2"], "method.predict_batch_size=-2 is not allowed"),
])
def test_method_options_are_checked_before_anything_is_written(argv, message, capsys, results_dir):
    err = _fails(["run", *argv], capsys, message)
    if "lr" in message:
        assert "finite number > 0" in err or "a number" in err
    assert not results_dir.exists()


def test_method_options_of_the_declared_type_are_accepted():
    from fsmis_bench.config import compose

    assert compose(["method.lr=1"]).method.lr == 1  # an integer where a number is declared
    assert compose(["method.width=16", "method.scale=10"]).method.width == 16
    # options declared null take any value (they follow `fidelity` when left null)
    cfg = compose(["method=sdfsmis", "backbone=tiny", "method.sii=kv_concat", "method.threshold_value=0.3"])
    assert cfg.method.sii == "kv_concat" and cfg.method.threshold_value == 0.3
    assert compose(["method=sdfsmis", "backbone=tiny", "method.vae_dtype='16'"]).method.vae_dtype == "16"
    # a switch declared `auto` takes true and false as well
    for value in ("true", "false", "auto"):
        assert str(compose(["method=sdfsmis", "backbone=tiny", f"method.joint_pass={value}"]).method.joint_pass).lower() == value


def test_a_plugin_method_options_are_checked_too(install, capsys, results_dir):
    _method_plugin(install, "opts_method", config="# @package _global_\nmethod:\n  name: opts_method\n  lr: 0.01\n"
                   "  depth: 3\n  extra: null\n", dist="fsmis-opts", version="1.2.3")
    _fails(["run", "method=opts_method", "method.depth=deep"], capsys,
           "method.depth='deep' is not allowed: method 'opts_method' (plugin 'pkg_opts_method' of fsmis-opts 1.2.3) "
           "declares method.depth as an integer in method/opts_method.yaml", "e.g. method.depth=3")
    _fails(["run", "method=opts_method", "method.lr=-0.1"], capsys, "method.lr=-0.1 is not allowed")
    from fsmis_bench.config import compose

    assert compose(["method=opts_method", "method.extra=[1,2]"]).method.extra == [1, 2]


def test_method_constructor_errors_name_the_method_and_plugin(install):
    from fsmis_bench.config import compose

    _method_plugin(install, "ctor_method", dist="fsmis-ctor", version="0.3.0")
    registry = plugins.registries().methods
    cls = registry.get("ctor_method")
    cfg = compose(["method=ctor_method"])

    def broken(self, cfg):
        raise KeyError("weights")

    cls.__init__ = broken
    with pytest.raises(PluginError, match=r"method 'ctor_method' \(plugin 'pkg_ctor_method' of fsmis-ctor 0.3.0\) "
                       r"failed to build: KeyError: 'weights' \(.*test_plugins_robustness.py:\d+\)") as info:
        registry.build("ctor_method", cfg)
    assert info.value.hint == "fix the plugin, or uninstall it: pip uninstall fsmis-ctor"

    def refusing(self, cfg):
        raise ConfigError("method.depth must be odd", hint="use 3")

    cls.__init__ = refusing
    with pytest.raises(ConfigError, match="method.depth must be odd"):  # a method's own message, unchanged
        registry.build("ctor_method", cfg)


# -- predict's output ------------------------------------------------------------------------
class _Named(Method):
    def __init__(self) -> None:
        from omegaconf import OmegaConf

        super().__init__(OmegaConf.create({"method": {"name": "prototype"}}))


@pytest.mark.parametrize("mask, got", [
    (torch.full((3, 8, 8), 0.7), "a torch.float32 tensor of shape (3, 8, 8)"),
    (torch.ones(3, 8, 8), "a torch.float32 tensor of shape (3, 8, 8)"),  # even {0, 1}: bool is the contract
    (torch.full((3, 8, 8), math.nan), "torch.float32"),
    (torch.ones(1, 8, 8, dtype=torch.bool), "shape (1, 8, 8)"),  # would be broadcast over every slice
    (torch.ones(3, 1, 8, 8, dtype=torch.bool), "shape (3, 1, 8, 8)"),
    (torch.ones(2, 8, 8, dtype=torch.bool), "shape (2, 8, 8)"),
    (torch.ones(3, 4, 4, dtype=torch.bool), "shape (3, 4, 4)"),
    (np.ones((3, 8, 8), dtype=bool), "a ndarray"),
])
def test_predict_output_must_be_q_h_w_bool(mask, got):
    with pytest.raises(PluginError) as info:
        check_prediction(_Named(), mask, 3, (8, 8))
    message = info.value.message
    assert message.startswith("method 'prototype' (plugin 'builtin_methods' of fsmis-bench 0.1.0) broke the predict contract")
    assert got in message and "for 3 query slices of 8x8" in message
    assert "must return a (Q, H, W) torch.bool tensor" in info.value.hint
    check_prediction(_Named(), torch.zeros(3, 8, 8, dtype=torch.bool), 3, (8, 8))  # the contract passes


def test_predict_output_must_be_on_the_query_images_device():
    with pytest.raises(PluginError, match=r"returned a torch.bool tensor of shape \(3, 8, 8\) on device meta for 3 "
                       r"query slices of 8x8 \(expected torch.bool of shape \(3, 8, 8\) on device cpu\)"):
        check_prediction(_Named(), torch.ones(3, 8, 8, dtype=torch.bool, device="meta"), 3, (8, 8), torch.device("cpu"))
    check_prediction(_Named(), torch.ones(3, 8, 8, dtype=torch.bool), 3, (8, 8), torch.device("cpu"))


@pytest.mark.parametrize("output, got", [
    ("torch.ones(q, h, w, dtype=torch.bool, device='meta')", "on device meta"),  # holds no data to copy out
    ("torch.full((q, h, w), 0.7)", "torch.float32 tensor of shape"),
    ("torch.full((q, h, w), float('nan'))", "torch.float32"),
    ("torch.ones(q, 1, h, w, dtype=torch.bool)", "shape ("),
    ("torch.ones(max(q - 1, 0), h, w, dtype=torch.bool)", "shape ("),
])
def test_a_run_with_a_broken_predict_stops_with_the_plugin_named(install, output, got, capsys, results_dir, monkeypatch):
    monkeypatch.setenv("FSMIS_NO_PROGRESS", "1")
    _method_plugin(install, "bad_predict", output=output, dist="fsmis-bad-predict", version="0.1.1")
    _fails(["run", "method=bad_predict", "fold=1", "protocol.max_queries=1"], capsys,
           "method 'bad_predict' (plugin 'pkg_bad_predict' of fsmis-bad-predict 0.1.1) broke the predict contract",
           got, "hint: Method.predict(")
    assert not list(results_dir.glob("**/COMPLETE")) and not list(results_dir.glob("**/run.json"))


# -- what a run records ------------------------------------------------------------------------
def test_run_records_the_distribution_of_its_method_and_dataset(install, results_dir):
    from fsmis_bench.config import compose
    from fsmis_bench.records import package_versions, registered_by

    _method_plugin(install, "mini_method", dist="fsmis-mini-plugin", version="0.2.0")
    cfg = compose(["method=mini_method"])
    assert registered_by(cfg) == {
        "method": {"name": "mini_method", "plugin": "pkg_mini_method", "distribution": "fsmis-mini-plugin",
                   "version": "0.2.0"},
        "dataset": {"name": "phantom", "plugin": "builtin_datasets", "distribution": "fsmis-bench",
                    "version": package_versions()["fsmis-bench"]},
    }
    assert package_versions()["fsmis-mini-plugin"] == "0.2.0"
    # the plugin's version is not hashed: upgrading a plugin keeps its records found
    from fsmis_bench.records import config_hash

    before = config_hash(cfg)
    _reload()
    assert config_hash(compose(["method=mini_method"])) == before


def test_plugin_errors_are_user_errors():
    assert issubclass(PluginError, FsmisError)


# -- a plugin's own code failing inside a run ----------------------------------------------------
TRAINED_PLUGIN = '''
from pathlib import Path

import torch
import torch.nn.functional as F

from fsmis_bench.method import Method
from fsmis_bench.plugins import hookimpl


class Trained(Method):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        {init}

    def training_loss(self, batch):
        logits = self.conv(batch.query_images)
        {loss}
        return F.binary_cross_entropy_with_logits(logits, batch.query_masks)

    def predict(self, support_images, support_masks, query_images):
        {predict}
        return self.conv(query_images)[:, 0] > 0


@hookimpl
def fsmis_register_methods(registry):
    registry.register("{name}", Trained)


@hookimpl
def fsmis_config_dirs():
    return [str(Path(__file__).parent / "configs")]
'''


def _trained_plugin(install: Install, name: str, *, init: str = "pass", loss: str = "pass",
                    predict: str = "pass") -> None:
    config = f"# @package _global_\nmethod:\n  name: {name}\n  lr: 1.0e-3\ntrain:\n  steps: 2\n  batch_size: 1\n  image_size: 32\n"
    install(f"fsmis-{name.replace('_', '-')}", "0.2.0", f"pkg_{name}",
            TRAINED_PLUGIN.format(name=name, init=init, loss=loss, predict=predict), {f"method/{name}.yaml": config})


def _line_of(placeholder: str) -> int:
    """The plugin file's line number of ``placeholder`` (each fills one line)."""
    return next(i for i, line in enumerate(TRAINED_PLUGIN.splitlines(), start=1) if line.strip() == placeholder)


@pytest.mark.parametrize("where, doing", [
    ("loss", "its training loss"), ("predict", "predict"), ("init", "failed to build"),
])
def test_an_undeclared_config_key_a_plugin_reads_is_one_line_at_the_plugins_own_line(where, doing, install, capsys,
                                                                                     results_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("FSMIS_NO_PROGRESS", "1")
    name = f"undeclared_{where}"
    _trained_plugin(install, name, **{where: "self.cfg.method.pos_weight"})
    line = _line_of("{" + where + "}")
    err = _fails(["run", f"method={name}", "fold=1", "protocol.max_queries=1"], capsys,
                 f"method '{name}' (plugin 'pkg_{name}' of fsmis-undeclared-{where} 0.2.0)", doing,
                 f"it reads the config key 'method.pos_weight', which no config declares (pkg_{name}/__init__.py:{line})",
                 f"hint: declare method.pos_weight with a default in {tmp_path}/site/pkg_{name}/configs/method/{name}.yaml")
    assert "omegaconf" not in err


def test_the_default_param_groups_need_a_declared_learning_rate(install, capsys, results_dir, monkeypatch, tmp_path):
    """The default optimiser groups read method.lr: a yaml without it used to train at 1e-4,
    a rate no record named (and method.lr= on the command line was refused as unknown)."""
    monkeypatch.setenv("FSMIS_NO_PROGRESS", "1")
    name = "no_lr"
    config = f"# @package _global_\nmethod:\n  name: {name}\ntrain:\n  steps: 2\n  batch_size: 1\n  image_size: 32\n"
    install("fsmis-no-lr", "0.2.0", f"pkg_{name}", TRAINED_PLUGIN.format(name=name, init="pass", loss="pass",
                                                                         predict="pass"), {f"method/{name}.yaml": config})
    _fails(["run", f"method={name}", "fold=1", "protocol.max_queries=1"], capsys,
           f"method '{name}' (plugin 'pkg_{name}' of fsmis-no-lr 0.2.0) breaks the method contract",
           "it trains with the default param_groups, which read method.lr, but its config declares no method.lr",
           "hint: declare method.lr (e.g. lr: 1.0e-3) in the method's yaml, or override param_groups")
    assert not results_dir.exists()  # refused when the method is built, before anything is written


def test_an_exception_in_a_plugins_predict_is_one_line_and_keeps_the_trained_weights(install, capsys, results_dir,
                                                                                    monkeypatch):
    monkeypatch.setenv("FSMIS_NO_PROGRESS", "1")
    _trained_plugin(install, "raising_predict", predict="raise IndexError('slice 7 of 3')")
    line = _line_of("{predict}")
    _fails(["run", "method=raising_predict", "fold=1", "protocol.max_queries=1"], capsys,
           "method 'raising_predict' (plugin 'pkg_raising_predict' of fsmis-raising-predict 0.2.0) failed in predict: "
           f"IndexError: slice 7 of 3 (pkg_raising_predict/__init__.py:{line})",
           "hint: fix the plugin, or uninstall it: pip uninstall fsmis-raising-predict; "
           "FSMIS_TRACEBACK=1 prints the whole traceback")
    assert list(results_dir.glob("raising_predict/**/final.safetensors"))  # the training is kept
    assert not list(results_dir.glob("**/COMPLETE"))
    # the whole traceback for whoever debugs it, then the same one-line error
    monkeypatch.setenv("FSMIS_TRACEBACK", "1")
    assert main(["run", "method=raising_predict", "fold=1", "protocol.max_queries=1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "raise IndexError('slice 7 of 3')" in err and "error: method 'raising_predict'" in err


def test_fsmis_bench_and_builtin_failures_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):  # a built-in method's bug: the traceback is what finds it
        with plugins.plugin_code("method", "prototype", "predict"):
            1 / 0
    with pytest.raises(ValueError):  # a name no plugin registered
        with plugins.plugin_code("method", "no_such_method", "predict"):
            raise ValueError("x")


def test_a_registered_target_must_build_a_method(install, capsys, results_dir):
    install("fsmis-not-a-method", "0.1.0", "pkg_notmethod", """
        from pathlib import Path

        from fsmis_bench.plugins import hookimpl

        class Model:
            def __init__(self, cfg):
                pass

        def factory(cfg):
            return {"weights": 1}

        @hookimpl
        def fsmis_register_methods(registry):
            registry.register("plain_class", Model)
            registry.register("dict_factory", factory)

        @hookimpl
        def fsmis_config_dirs():
            return [str(Path(__file__).parent / "configs")]
    """, {f"method/{name}.yaml": f"# @package _global_\nmethod:\n  name: {name}\n"
          for name in ("plain_class", "dict_factory")})
    _fails(["run", "method=plain_class"], capsys,
           "method 'plain_class' (plugin 'pkg_notmethod' of fsmis-not-a-method 0.1.0) registers pkg_notmethod.Model, "
           "which is not a subclass of fsmis_bench.method.Method", "hint: register a Method subclass")
    _fails(["run", "method=dict_factory"], capsys, "which built a builtins.dict, not a fsmis_bench.method.Method")
    assert not results_dir.exists()


# -- the method contract, checked when the method is built ------------------------------------
CONTRACT_PLUGIN = '''
from pathlib import Path

import torch
import torch.nn.functional as F

from fsmis_bench.method import Method
from fsmis_bench.plugins import hookimpl


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.count = 0

    def get_extra_state(self):
        return {{"count": self.count}}

    def set_extra_state(self, state):
        self.count = state["count"]


class Broken(Method):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        {init}

    def training_loss(self, batch):
        return F.binary_cross_entropy_with_logits(self.conv(batch.query_images), batch.query_masks)

    def predict(self, support_images, support_masks, query_images):
        return self.conv(query_images)[:, 0] > 0

    {attribute}  # last: it may undo a method above


@hookimpl
def fsmis_register_methods(registry):
    registry.register("{name}", Broken)


@hookimpl
def fsmis_config_dirs():
    return [str(Path(__file__).parent / "configs")]
'''


@pytest.mark.parametrize("attribute, init, expected", [
    # refused from the class, before it is built (the constructor would load the weights)
    ("predict = Method.predict", "raise RuntimeError('the constructor ran')",
     ["pkg_contract.Broken: it does not override predict", "hint: define predict(self, support_images, "
      "support_masks, query_images) returning a (Q, H, W) torch.bool mask"]),
    ("training_loss = Method.training_loss", "pass",
     ["it is trainable (needs_training is true) but does not override training_loss",
      "define training_loss(self, batch) returning a 0-dim loss tensor, or set needs_training = False"]),
    ("input_norm = 'min_max'", "raise RuntimeError('the constructor ran')",
     ["its input_norm is 'min_max'", "did you mean 'minmax'? set the class attribute input_norm to one of "
      "'zscore', 'minmax', 'none'"]),
    ("input_norm = None", "pass", ["its input_norm is None", "one of 'zscore', 'minmax', 'none'"]),
    # state that a checkpoint does not save (trainable_state: trainable parameters and buffers)
    ("get_extra_state = lambda self: {'calls': 1}", "pass",
     ["it overrides get_extra_state, whose state a checkpoint does not save",
      "keep every state that training changes in a trainable parameter or a registered buffer"]),
    ("pass", "self.counter = Counter()",
     ["its submodule 'counter' (Counter) overrides get_extra_state", "an EMA or teacher copy too"]),
    # the optimiser would get an empty parameter list
    ("pass", "self.conv.requires_grad_(False)",
     ["it is trainable (needs_training is true) but has no trainable parameter",
      "or set needs_training = False for a method that trains nothing"]),
])
def test_a_method_that_breaks_the_contract_is_refused_when_it_is_built(attribute, init, expected, install, capsys,
                                                                       results_dir):
    install("fsmis-contract", "0.4.0", "pkg_contract",
            CONTRACT_PLUGIN.format(name="contract_method", attribute=attribute, init=init),
            {"method/contract_method.yaml": "# @package _global_\nmethod:\n  name: contract_method\n"})
    err = _fails(["run", "method=contract_method", "fold=1", "protocol.max_queries=1"], capsys,
                 "method 'contract_method' (plugin 'pkg_contract' of fsmis-contract 0.4.0) breaks the method contract",
                 *expected, "pip uninstall fsmis-contract")
    assert "the constructor ran" not in err
    assert not results_dir.exists()  # refused before anything is trained or written


@pytest.mark.parametrize("loss, expected", [
    ("return F.binary_cross_entropy_with_logits(logits, batch.query_masks, reduction='none')",
     "broke the training_loss contract: it returned a torch.float32 tensor of shape (1, 1, 32, 32), not a scalar loss"),
    ("return float(logits.mean())", "broke the training_loss contract: it returned a float, not a scalar loss"),
    ("return logits.mean().detach()", "broke the training_loss contract: it returned a scalar without a gradient "
     "(computed under torch.no_grad, detached, or from no trained parameter)"),
    ("return logits.mean() * float('nan')",
     "non-finite loss at step 1: the loss that method 'loss_method' (plugin 'pkg_loss_method' of "
     "fsmis-loss-method 0.2.0) returned from its training_loss was NaN or infinite"),
])
def test_a_training_loss_that_is_not_a_finite_scalar_names_the_method(loss, expected, install, capsys, results_dir,
                                                                      monkeypatch):
    monkeypatch.setenv("FSMIS_NO_PROGRESS", "1")
    _trained_plugin(install, "loss_method", loss=loss)
    _fails(["run", "method=loss_method", "fold=1", "protocol.max_queries=1"], capsys,
           "method 'loss_method' (plugin 'pkg_loss_method' of fsmis-loss-method 0.2.0)", expected)
    assert not list(results_dir.glob("**/final.safetensors"))


@pytest.mark.parametrize("hook, meant", [
    ("fsmis_register_method", "fsmis_register_methods"),  # the final s
    ("fsmis_config_dir", "fsmis_config_dirs"),
    ("register_methods", "fsmis_register_methods"),
])
def test_a_misspelled_hook_is_named_with_the_one_meant(hook, meant, install, capsys):
    install("fsmis-hook-typo", "0.1.0", "pkg_hooktypo", f"""
        from fsmis_bench.plugins import hookimpl

        @hookimpl
        def {hook}(registry):
            registry.register("never_registered", object)
    """)
    _fails(["list"], capsys,
           f"plugin 'pkg_hooktypo' of fsmis-hook-typo 0.1.0 implements the hook '{hook}', which fsmis-bench does not "
           "have, so it would never be called",
           f"hint: did you mean '{meant}'? the hooks are fsmis_config_dirs, fsmis_register_backbones, "
           "fsmis_register_datasets, fsmis_register_methods, fsmis_register_settings",
           "pip uninstall fsmis-hook-typo")


# -- which code computed a run -------------------------------------------------------------------
def test_an_edited_helper_module_of_a_plugin_is_named_when_its_results_are_reused(install, capsys, results_dir,
                                                                                 monkeypatch, tmp_path):
    """The method's code is the class's file and every module of its package that it imports:
    an edit to a helper is named when a finished run is kept, and when its trained weights
    are reused by another evaluation (which records the training's code)."""
    monkeypatch.setenv("FSMIS_NO_PROGRESS", "1")
    _trained_plugin(install, "helper_method", init="from ._net import SCALE")
    helper = tmp_path / "site" / "pkg_helper_method" / "_net.py"
    helper.write_text("SCALE = 1.0\n")
    args = ["run", "method=helper_method", "fold=1", "protocol.max_queries=1"]
    assert main(args) == 0
    (run_dir,) = [p.parent for p in results_dir.glob("helper_method/**/run.json")]
    code = json.loads((run_dir / "run.json").read_text())["code"]
    assert sorted(code["method_code_files"]) == ["pkg_helper_method", "pkg_helper_method._net"]
    capsys.readouterr()
    assert main(args) == 0
    assert "other code" not in capsys.readouterr().err  # nothing changed: nothing to say

    helper.write_text("SCALE = 1.0  # tuned\n")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "already complete, not recomputed" in err
    assert "was computed by other code of method helper_method (its code has changed since (pkg_helper_method._net))" in err

    assert main([*args, "protocol.dice=pooled"]) == 0  # another evaluation of the same training
    err = capsys.readouterr().err
    assert f"using trained weights {run_dir}" in err
    assert "were trained by other code of method helper_method (its code has changed since (pkg_helper_method._net))" in err
    (pooled,) = [p.parent for p in results_dir.glob("helper_method/**/run.json") if p.parent != run_dir]
    trained_by = json.loads((pooled / "run.json").read_text())["weights_trained_by"]
    assert trained_by == {"all": {"run": run_dir.name, "code": code, "registered_by": {
        "name": "helper_method", "plugin": "pkg_helper_method", "distribution": "fsmis-helper-method",
        "version": "0.2.0"}}}


def test_a_report_names_the_release_that_trained_reused_weights():
    from fsmis_bench.reporting.collect import plugin_release

    meta = {"registered_by": {"method": {"distribution": "fsmis-mine", "version": "0.2.0"}}}
    assert plugin_release(meta) == "fsmis-mine-0.2.0"
    meta["weights_trained_by"] = {"all": {"registered_by": {"distribution": "fsmis-mine", "version": "0.2.0"}}}
    assert plugin_release(meta) == "fsmis-mine-0.2.0"
    meta["weights_trained_by"] = {"all": {"registered_by": {"distribution": "fsmis-mine", "version": "0.1.0"}}}
    assert plugin_release(meta) == "fsmis-mine-0.2.0 (weights 0.1.0)"
