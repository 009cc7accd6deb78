"""Plugin system: pluggy hook specifications and discovery.

A plugin is any module or object with ``@hookimpl`` functions, advertised through the
entry-point group ``fsmis_bench.plugins``. The built-in methods and datasets are
plugins of exactly that kind (see ``pyproject.toml``). A third-party package adds::

    [project.entry-points."fsmis_bench.plugins"]
    my_plugin = "my_package.fsmis_plugin"

and implements any of the hooks below.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy

from ._registry import Display, Registry

PROJECT = "fsmis_bench"
ENTRY_POINT_GROUP = "fsmis_bench.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    """The hooks a plugin may implement. Every hook is optional."""

    @hookspec
    def fsmis_register_methods(self, registry: Registry) -> None:
        """Register method classes (subclasses of :class:`fsmis_bench.method.Method`).

        ``registry.register(name, target, description=..., display=Display(...))``: the
        optional :class:`Display` gives the method's name, colour and published name in
        report figures.
        """

    @hookspec
    def fsmis_register_datasets(self, registry: Registry) -> None:
        """Register dataset classes (subclasses of :class:`fsmis_bench.data.VolumeDataset`).

        The optional ``display=Display(name=..., organ_names={...})`` names the dataset and
        its organs in report figures.
        """

    @hookspec
    def fsmis_register_backbones(self, registry: Registry) -> None:
        """Register backbone names (config groups under ``backbone/``) with a description."""

    @hookspec
    def fsmis_register_settings(self, registry: Registry) -> None:
        """Register evaluation settings (``setting=`` values) with a description."""

    @hookspec
    def fsmis_config_dirs(self) -> list[str]:
        """Directories holding Hydra config groups (``method/``, ``dataset/``, ``backbone/``).

        Returned paths are searched after the built-in ``configs/``.
        """


@dataclass
class Registries:
    """Every registry, filled by all loaded plugins."""

    methods: Registry
    datasets: Registry
    backbones: Registry
    settings: Registry
    config_dirs: list[Path]

    def all(self) -> dict[str, Registry]:
        return {
            "method": self.methods,
            "dataset": self.datasets,
            "setting": self.settings,
            "backbone": self.backbones,
        }


_extra_plugins: list[tuple[Any, str]] = []


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry points and in-process plugins loaded."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin, name in _extra_plugins:
        if pm.get_plugin(name) is None:
            pm.register(plugin, name=name)
    return pm


def register_plugin(plugin: Any, name: str) -> None:
    """Register a plugin object in this process (tests, notebooks) without an entry point."""
    _extra_plugins.append((plugin, name))
    plugin_manager.cache_clear()
    registries.cache_clear()


def unregister_plugin(name: str) -> None:
    """Undo :func:`register_plugin`."""
    _extra_plugins[:] = [(p, n) for p, n in _extra_plugins if n != name]
    plugin_manager.cache_clear()
    registries.cache_clear()


def _plugin_name(pm: pluggy.PluginManager, impl: pluggy.HookImpl) -> str:
    name = pm.get_name(impl.plugin) or repr(impl.plugin)
    dist = dict(pm.list_plugin_distinfo()).get(impl.plugin)
    return f"{name} ({dist.project_name})" if dist is not None else name


@functools.lru_cache(maxsize=1)
def registries() -> Registries:
    """Fill the registries by calling every plugin's hooks (once per process)."""
    pm = plugin_manager()
    regs = Registries(
        methods=Registry("method"),
        datasets=Registry("dataset"),
        backbones=Registry("backbone"),
        settings=Registry("setting"),
        config_dirs=[],
    )
    hook_for = {
        "fsmis_register_methods": regs.methods,
        "fsmis_register_datasets": regs.datasets,
        "fsmis_register_backbones": regs.backbones,
        "fsmis_register_settings": regs.settings,
    }
    for hook_name, registry in hook_for.items():
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            # Each plugin gets a view that stamps its own name on what it registers.
            impl.function(**_bind(impl, registry=_PluginView(registry, _plugin_name(pm, impl))))
    for impl in pm.hook.fsmis_config_dirs.get_hookimpls():
        for directory in impl.function(**_bind(impl)) or []:
            regs.config_dirs.append(Path(directory))
    return regs


def _bind(impl: pluggy.HookImpl, **kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in impl.argnames}


class _PluginView:
    """A registry proxy that records which plugin registered each name."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self._plugin = plugin

    def register(self, name: str, target: Any, *, description: str = "", display: Display | None = None) -> None:
        self._registry.register(name, target, plugin=self._plugin, description=description, display=display)

    def __contains__(self, name: object) -> bool:
        return name in self._registry
