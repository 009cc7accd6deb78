"""Plugin system: pluggy hook specifications and discovery.

A plugin is any module or object with ``@hookimpl`` functions, advertised through the
entry-point group ``fsmis_bench.plugins``. The built-in methods and datasets are
plugins of exactly that kind (see ``pyproject.toml``). A third-party package adds::

    [project.entry-points."fsmis_bench.plugins"]
    my_plugin = "my_package.fsmis_plugin"

and implements any of the hooks below.

A plugin that fails (its import raises, a hook raises) stops every command with one
:class:`PluginError` naming the entry point and the distribution that installed it, never a
traceback; so does a ``@hookimpl`` whose name is no hook below (``fsmis_register_method``),
which pluggy would otherwise never call. A config file a plugin ships but that another file
of the same name hides warns (:class:`PluginWarning`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from ._registry import (
    BUILTIN_DISTRIBUTION, Display, PluginError, Registry, _exception_text, closest, missing_config_key, remedy,
)
from .errors import DataWarning, FsmisError

if TYPE_CHECKING:  # for annotations only: the registries name their base classes by string, loaded lazily
    from .data.base import VolumeDataset
    from .method import Method

PROJECT = "fsmis_bench"
ENTRY_POINT_GROUP = "fsmis_bench.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class HookSpecs:
    """The hooks a plugin may implement. Every hook is optional."""

    @hookspec
    def fsmis_register_methods(self, registry: Registry[Method]) -> None:
        """Register method classes (subclasses of :class:`fsmis_bench.method.Method`).

        ``registry.register(name, target, description=..., display=Display(...))``: the
        optional :class:`Display` gives the method's name, colour and published name in
        report figures.
        """

    @hookspec
    def fsmis_register_datasets(self, registry: Registry[VolumeDataset]) -> None:
        """Register dataset classes (subclasses of :class:`fsmis_bench.data.VolumeDataset`).

        The optional ``display=Display(name=..., organ_names={...})`` names the dataset and
        its organs in report figures.
        """

    @hookspec
    def fsmis_register_backbones(self, registry: Registry[Any]) -> None:
        """Register backbone names (config groups under ``backbone/``) with a description."""

    @hookspec
    def fsmis_register_settings(self, registry: Registry[Any]) -> None:
        """Register evaluation settings (``setting=`` values) with a description."""

    @hookspec
    def fsmis_config_dirs(self) -> list[str]:
        """Directories holding Hydra config groups (``method/``, ``dataset/``, ``backbone/``).

        Returned paths are searched after the built-in ``configs/``.
        """


class PluginWarning(DataWarning):
    """A plugin that works but may not do what its author meant (a config file it ships is
    hidden by another of the same name); the CLI prints it as one ``warning:`` line."""


@dataclass(frozen=True)
class PluginOrigin:
    """Who a loaded plugin is: its name (the entry point's, or :func:`register_plugin`'s)
    and the installed distribution that advertised it (empty for in-process plugins)."""

    name: str
    distribution: str = ""
    version: str = ""
    entry_point: str = ""  # "threshold = fsmis_threshold"

    @property
    def label(self) -> str:
        """``"threshold (fsmis-threshold-plugin)"``: the ``plugin`` column of ``fsmis-bench list``."""
        return f"{self.name} ({self.distribution})" if self.distribution else self.name

    def __str__(self) -> str:
        if not self.distribution:
            return f"plugin {self.name!r}"
        return f"plugin {self.name!r} of {self.distribution} {self.version}".rstrip()

    def remedy(self) -> str:
        """The hint for a broken plugin: fix it, or ``pip uninstall`` its distribution."""
        return remedy(self.distribution)


@dataclass
class Registries:
    """Every registry, filled by all loaded plugins."""

    methods: Registry[Method]
    datasets: Registry[VolumeDataset]
    #: backbones and settings register names (config groups) with a description, no class
    backbones: Registry[Any]
    settings: Registry[Any]
    config_dirs: list[Path]
    #: which plugin returned each of :attr:`config_dirs` (its hook's folders, in order)
    config_dir_plugins: dict[Path, PluginOrigin] = field(default_factory=dict)
    #: every loaded plugin by name
    plugins: dict[str, PluginOrigin] = field(default_factory=dict)

    def dirs_of(self, plugin: str) -> list[Path]:
        """The config folders that a plugin (its name, or its :attr:`PluginOrigin.label`, as in
        :attr:`~fsmis_bench._registry.Entry.plugin`) returned from ``fsmis_config_dirs``."""
        return [d for d, origin in self.config_dir_plugins.items() if plugin in (origin.name, origin.label)]

    def all(self) -> dict[str, Registry]:
        return {
            "method": self.methods,
            "dataset": self.datasets,
            "setting": self.settings,
            "backbone": self.backbones,
        }


_extra_plugins: list[tuple[Any, str]] = []
# plugin name -> origin, filled by plugin_manager() (entry points: with their distribution)
_origins: dict[str, PluginOrigin] = {}


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry points and in-process plugins loaded.

    Raises:
        PluginError: an entry point's module failed to import, or its hooks do not match
            the specifications (named with its distribution and version).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(HookSpecs)
    _origins.clear()
    _load_entry_points(pm)
    for plugin, name in _extra_plugins:
        if pm.get_plugin(name) is None:
            _register(pm, plugin, PluginOrigin(name))
        elif name in _origins and _origins[name].distribution:
            raise PluginError(f"register_plugin({name!r}): {_origins[name]} already has that name",
                              hint="register the in-process plugin under another name")
    _check_hook_names(pm)
    return pm


#: the hooks a plugin may implement (:class:`HookSpecs`)
HOOK_NAMES = tuple(sorted(name for name in vars(HookSpecs) if name.startswith("fsmis_")))


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """pluggy's ``check_pending``: a ``@hookimpl`` whose name is no hook of :class:`HookSpecs`
    (``fsmis_register_method``) would never be called, so its plugin would silently register
    nothing. Raised as one :class:`PluginError` naming the plugin, its distribution and the
    hook it probably meant."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        unknown = [(name, impl) for name, caller in vars(pm.hook).items()
                   if callable(getattr(caller, "has_spec", None)) and not caller.has_spec()
                   for impl in caller.get_hookimpls() if not impl.optionalhook]
        if not unknown:  # pluggy found something else: its own words
            raise PluginError(f"a plugin cannot be registered: {exc}",
                              hint="the hooks and their arguments: fsmis_bench/plugins.py") from exc
        name, impl = unknown[0]
        origin = _origins.get(impl.plugin_name) or PluginOrigin(impl.plugin_name)
        close = closest(name, list(HOOK_NAMES))
        raise PluginError(
            f"{origin} implements the hook {name!r}, which fsmis-bench does not have, so it would never be called",
            hint=(f"did you mean {close!r}? " if close else "") + f"the hooks are {', '.join(HOOK_NAMES)}; "
                 + origin.remedy(),
        ) from exc


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """pluggy's ``load_setuptools_entrypoints``, with each failure named by its plugin."""
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.is_blocked(ep.name):
                continue
            origin = PluginOrigin(ep.name, dist.metadata["Name"] or "", dist.version or "",
                                  f"{ep.name} = {ep.value}")
            if pm.has_plugin(ep.name):
                _refuse_shared_name(_origins[ep.name], origin)
                continue  # the same distribution found twice on the path: the first one imports
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any failure of plugin code
                raise PluginError(
                    f"{origin} failed to load (entry point {origin.entry_point!r} in group "
                    f"{ENTRY_POINT_GROUP}): {_exception_text(exc)}",
                    hint=origin.remedy(),
                ) from exc
            _register(pm, plugin, origin)


def _refuse_shared_name(first: PluginOrigin, second: PluginOrigin) -> None:
    """Two distributions advertising one plugin name: pluggy keeps one plugin per name, so
    the other's methods and datasets would vanish (which one depends on the install order)."""
    if _normalised(first.distribution) == _normalised(second.distribution):
        return
    raise PluginError(
        f"two installed packages advertise a plugin named {first.name!r}: {first.distribution} {first.version} "
        f"({first.entry_point}) and {second.distribution} {second.version} ({second.entry_point}); "
        "only one of them could be loaded",
        hint=f"plugin names are global: give one of them another entry-point name in its pyproject.toml "
             f'([project.entry-points."{ENTRY_POINT_GROUP}"], e.g. its distribution\'s name) and reinstall it, '
             f"or pip uninstall one",
    )


def _normalised(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _register(pm: pluggy.PluginManager, plugin: Any, origin: PluginOrigin) -> None:
    try:
        pm.register(plugin, name=origin.name)
    except (pluggy.PluginValidationError, ValueError) as exc:  # a hook that matches no spec, a module twice
        raise PluginError(f"{origin} cannot be registered: {exc}",
                          hint=origin.remedy() + "; the hooks and their arguments: fsmis_bench/plugins.py") from exc
    _origins[origin.name] = origin


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


def _origin(pm: pluggy.PluginManager, impl: pluggy.HookImpl) -> PluginOrigin:
    name = pm.get_name(impl.plugin) or repr(impl.plugin)
    return _origins.get(name) or PluginOrigin(name)


@functools.lru_cache(maxsize=1)
def registries() -> Registries:
    """Fill the registries by calling every plugin's hooks (once per process).

    Raises:
        PluginError: a plugin failed to load, or one of its hooks raised (an
            :class:`~fsmis_bench.errors.FsmisError` a hook raises, such as a name collision,
            passes unchanged).
    """
    pm = plugin_manager()
    regs = Registries(
        methods=Registry("method", base="fsmis_bench.method:Method", contract="fsmis_bench.method:contract_problems"),
        datasets=Registry("dataset", base="fsmis_bench.data.base:VolumeDataset"),
        backbones=Registry("backbone"),
        settings=Registry("setting"),
        config_dirs=[],
        plugins=dict(_origins),
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
            origin = _origin(pm, impl)
            _call(impl, hook_name, origin, registry=_PluginView(registry, origin))
    for impl in pm.hook.fsmis_config_dirs.get_hookimpls():
        origin = _origin(pm, impl)
        returned = _call(impl, "fsmis_config_dirs", origin)
        if isinstance(returned, (str, Path)) or not isinstance(returned, (list, tuple, type(None))):
            raise PluginError(
                f"{origin}: its hook fsmis_config_dirs returned {returned!r}, not a list of folders",
                hint=origin.remedy() + "; return e.g. [str(Path(__file__).parent / 'configs')]",
            )
        for directory in returned or []:
            regs.config_dirs.append(Path(directory))
            regs.config_dir_plugins.setdefault(Path(directory), origin)
    _warn_about_hidden_configs(regs)
    return regs


def _call(impl: pluggy.HookImpl, hook_name: str, origin: PluginOrigin, **kwargs: Any) -> Any:
    """One plugin's hook; anything but an :class:`FsmisError` it raises becomes a :class:`PluginError`."""
    try:
        return impl.function(**_bind(impl, **kwargs))
    except FsmisError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of plugin code
        raise PluginError(f"{origin} failed in its hook {hook_name}: {_exception_text(exc)}",
                          hint=origin.remedy()) from exc


def _bind(impl: pluggy.HookImpl, **kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in impl.argnames}


def _warn_about_hidden_configs(regs: Registries) -> None:
    """Warn about every config file of a plugin that an earlier file of the same name hides.

    Hydra takes ``<group>/<name>.yaml`` from the first folder that has it: the built-in
    ``configs/``, then the plugins' folders in order. A plugin file behind another is never
    read, so a plugin shipping ``method/prototype.yaml`` changes nothing that
    ``method=prototype`` runs.
    """
    from .config import config_dir

    builtin = config_dir()
    first: dict[str, tuple[Path, str]] = {}  # "method/x.yaml" -> (file, who shipped it)
    for path in sorted(builtin.glob("*/*.yaml")):
        relative = path.relative_to(builtin).as_posix()
        first[relative] = (path.resolve(), f"the built-in configs/{relative}")
    for directory in regs.config_dirs:
        origin = regs.config_dir_plugins.get(directory, PluginOrigin("?"))
        for path in sorted([*directory.glob("*/*.yaml"), *directory.glob("*/*.yml")]):
            relative = path.relative_to(directory).with_suffix(".yaml").as_posix()
            if relative not in first:
                first[relative] = (path.resolve(), f"{path} ({origin})")
                continue
            hiding, who = first[relative]
            if hiding == path.resolve():
                continue  # the same folder returned twice
            group, name = relative.split("/", 1)
            remove = (f"pip uninstall {origin.distribution}" if origin.distribution
                      and origin.distribution != BUILTIN_DISTRIBUTION else "remove the file")
            warnings.warn(
                f"{origin} ships {relative}, which is never read: {who} comes first, so "
                f"`{group}={name[:-len('.yaml')]}` does not use it (a plugin ships configs only for the "
                f"names it registers: rename the file and register that name, or {remove})",
                PluginWarning, stacklevel=3,
            )


class _PluginView:
    """A registry proxy that records which plugin registered each name."""

    def __init__(self, registry: Registry, origin: PluginOrigin) -> None:
        self._registry = registry
        self._origin = origin

    def register(self, name: str, target: Any, *, description: str = "", display: Display | None = None) -> None:
        """Register ``name`` -> ``target`` (a class, or ``"module:Class"`` imported when first used)."""
        self._registry.register(name, target, plugin=self._origin.label, description=description, display=display,
                                distribution=self._origin.distribution, version=self._origin.version)

    def __contains__(self, name: object) -> bool:
        return name in self._registry


def origin_of(kind: str, name: str) -> str:
    """``"method 'mini_conv' (plugin 'mini' of fsmis-mini-plugin 0.2.0)"``, for messages;
    ``"method 'x'"`` for a name no loaded plugin registered."""
    registry = registries().all().get(kind)
    if registry is None or name not in registry:
        return f"{kind} {name!r}"
    return registry.entry(name).described()


@contextmanager
def plugin_code(kind: str, name: str, doing: str) -> Iterator[None]:
    """Run a registered plugin's own code (a method's training loss, its ``predict``) so that
    its failure is one :class:`PluginError`, not a traceback.

    A third-party plugin's exception whose traceback passes through the plugin's own folder
    becomes "``method 'x' (plugin ... of dist 1.0) failed in its training loss: KeyError: 'a'
    (x/model.py:41)``" with the way to fix or uninstall it; so does a config key that any
    plugin, built-in or not, reads but no config declares. Everything else (fsmis-bench's own
    code, the built-in methods' bugs, out of memory) passes unchanged: a traceback is what
    finds those. ``FSMIS_TRACEBACK=1`` prints the whole traceback behind a PluginError too.

    Args:
        kind, name: the registry (``"method"``) and the name the plugin registered.
        doing: what the code was doing, for the message (``"its training loss"``).
    """
    try:
        yield
    except (FsmisError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - sorted below: plugin code or not
        registry = registries().all().get(kind)
        entry = registry.entry(name) if registry is not None and name in registry else None
        if entry is None or type(exc).__name__ == "OutOfMemoryError":
            raise
        source = entry.source_dir()
        in_plugin = source is not None and any(
            Path(frame.filename).resolve().is_relative_to(source) for frame in traceback.extract_tb(exc.__traceback__))
        if missing_config_key(exc) is not None:
            raise PluginError(f"{entry.described()} failed in {doing}: {_exception_text(exc, source)}",
                              hint=entry.failure_hint(exc)) from exc
        if entry.distribution == BUILTIN_DISTRIBUTION or not in_plugin:
            raise
        raise PluginError(f"{entry.described()} failed in {doing}: {_exception_text(exc, source)}",
                          hint=f"{entry.remedy()}; FSMIS_TRACEBACK=1 prints the whole traceback") from exc

