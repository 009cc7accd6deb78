"""Typed, lazy name registries.

A registry maps a name to a *factory* (a class or callable) plus the plugin that
contributed it. Entries may be given as ``"module:attr"`` strings so that heavy
modules (diffusers, transformers) are imported only when the entry is used.
Registering a name twice fails loudly; looking up an unknown name lists the known ones.
A plugin's entry that cannot be imported or built raises :class:`PluginError` naming the
plugin and the distribution that installed it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sysconfig
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar, Union

from .errors import FsmisError, NameCollisionError, UnknownNameError


class PluginError(FsmisError):
    """A plugin failed: it cannot be imported, a hook raised, or a registered class broke
    its contract (a constructor that raised, a ``predict`` output of the wrong shape)."""

T = TypeVar("T")

#: the distribution of fsmis-bench itself, whose entry points register the built-ins
BUILTIN_DISTRIBUTION = "fsmis-bench"


def closest(name: str, candidates: list[str] | set[str]) -> str | None:
    """The candidate most like ``name`` (a typo's intended word), or None if none is close.

    Ties in similarity go to the longer common prefix, so ``sd16`` suggests ``sd15``
    rather than ``sd21``, and ``train.stepz`` suggests ``train.steps``.
    """
    close = difflib.get_close_matches(name, list(candidates), n=len(candidates) or 1, cutoff=0.6)
    if not close:
        return None

    def rank(candidate: str) -> tuple[float, int]:
        ratio = difflib.SequenceMatcher(None, name, candidate).ratio()
        prefix = len(os.path.commonprefix([name, candidate]))
        return (round(ratio, 6), prefix)

    return max(close, key=rank)
@dataclass(frozen=True)
class Display:
    """How reports show a registered name (all optional; empty means "derive it").

    Attributes:
        name: human-readable name in figures (``"SD-FSMIS"`` for ``sdfsmis``).
        colour: methods: a matplotlib colour (``"#CC79A7"``); default: a fixed colour for
            the built-ins and a stable colour derived from the name for the others.
        family: methods: draw as a shade of this method's colour (an ablation of it).
        shade: methods: which shade of the family colour (0 = the family colour itself,
            1, 2, ... = lighter), so members of one family stay apart.
        published_names: methods: the names under which the published tables list this
            method (``published_results.csv``), for the measured-vs-published figure.
        published_backbone: methods: the backbone of the paper's default configuration
            (``"sd15"`` for SD-FSMIS), i.e. of its published rows that name no backbone. A
            run on another backbone the paper reports (``sd21``) is compared only with rows
            naming that backbone; empty: the paper does not say, any backbone compares.
        published_caveat: methods: why a run of this method is not like-for-like with its
            published numbers even under the standard protocol (reports print it beside
            the comparison), e.g. the published numbers came from another training scheme.
        organ_names: datasets: organ -> display name, for organs outside the built-in list.
    """

    name: str = ""
    colour: str = ""
    family: str = ""
    shade: int = 0
    published_names: tuple[str, ...] = ()
    published_backbone: str = ""
    published_caveat: str = ""
    organ_names: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Entry(Generic[T]):
    """One registered name."""

    name: str
    target: Union[str, Callable[..., T], None]
    plugin: str
    description: str = ""
    display: Display = field(default_factory=Display)
    #: the installed distribution (``pip`` name) whose entry point registered the name, and
    #: its version; empty for plugins registered in-process (:func:`~fsmis_bench.plugins.register_plugin`)
    distribution: str = ""
    version: str = ""
    kind: str = ""
    _resolved: Callable[..., T] | None = field(default=None, repr=False)

    @property
    def plugin_name(self) -> str:
        """The registering plugin's own name (:attr:`plugin` without its distribution)."""
        return self.plugin.split(" (", 1)[0]

    @property
    def origin(self) -> str:
        """``"plugin 'mini' of fsmis-mini-plugin 0.2.0"``: who registered the name, for messages."""
        name = self.plugin_name
        if not self.distribution:
            return f"plugin {name!r}"
        return f"plugin {name!r} of {self.distribution} {self.version}".rstrip()

    def described(self) -> str:
        """``"method 'mini_conv' (plugin 'mini' of fsmis-mini-plugin 0.2.0)"``."""
        return f"{self.kind or 'entry'} {self.name!r} ({self.origin})"

    def remedy(self) -> str:
        """How a user gets rid of a broken plugin (:func:`remedy`)."""
        return remedy(self.distribution)

    def failure_hint(self, exc: BaseException) -> str:
        """What to do about ``exc`` raised by this entry's code: declare a config key it reads
        but no config declares, else :meth:`remedy`."""
        key = missing_config_key(exc)
        if key is None and self.distribution == BUILTIN_DISTRIBUTION and not isinstance(exc, ImportError):
            # a built-in that imports but then fails is a fault of fsmis-bench, which no
            # reinstall mends
            return ("a fault in fsmis-bench itself, not in your setup: rerun with FSMIS_TRACEBACK=1 for the "
                    "traceback and report it")
        if key is None:
            return self.remedy()
        try:
            from .config import _config_file  # the registry knows no config: imported when needed

            where = _config_file(self.kind, self.name)
        except Exception:  # noqa: BLE001 - a hint must not fail
            where = None
        return f"declare {key} with a default in {where or f'{self.kind}/{self.name}.yaml in the plugin config folder'}"

    def source_dir(self) -> Path | None:
        """The folder of the module that defines the factory (None if unknown): where a
        failure's own line is looked for (:func:`_exception_text`)."""
        try:
            return Path(inspect.getsourcefile(inspect.unwrap(self.load())) or "").resolve().parent
        except (TypeError, OSError, PluginError):
            return None

    def load(self) -> Callable[..., T]:
        """Import (once) and return the factory; an import that fails raises :class:`PluginError`."""
        if self._resolved is None:
            if isinstance(self.target, str):
                try:
                    obj = _import_target(self.target)
                except Exception as exc:  # noqa: BLE001 - any failure of plugin code
                    raise PluginError(
                        f"{self.described()} cannot be imported from {self.target!r}: {_exception_text(exc)}",
                        hint=self.remedy() + (" (or install the package it needs)"
                                              if isinstance(exc, ImportError) else ""),
                    ) from exc
                self._resolved = obj  # type: ignore[assignment]
            else:
                self._resolved = self.target
        return self._resolved  # type: ignore[return-value]


def remedy(distribution: str) -> str:
    """The hint for a broken plugin of ``distribution``: fix it or uninstall its package
    (the built-ins: reinstall fsmis-bench; in-process plugins: stop registering it)."""
    if distribution == BUILTIN_DISTRIBUTION:
        return f"a built-in plugin: reinstall {BUILTIN_DISTRIBUTION} with its dependencies (pip install -e .)"
    if distribution:
        return f"fix the plugin, or uninstall it: pip uninstall {distribution}"
    return "fix the plugin, or stop registering it"


def _exception_text(exc: BaseException, source: Path | None = None) -> str:
    """``"ValueError: bad width (fsmis_mini/__init__.py:12)"``: type, first line of the message,
    and the plugin's own line, so a plugin author knows where to look without a traceback.

    The line is the innermost frame under ``source`` (the plugin's folder) if there is one,
    else the innermost frame outside the installed libraries, else the innermost frame. A key
    the code reads but no config declares (omegaconf's ``Missing key``) is said as such.
    """
    missing = missing_config_key(exc)
    if missing is not None:
        text = f"it reads the config key {missing!r}, which no config declares"
    else:
        lines = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    frames = [
        f for f in (traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else [])
        if f.filename and not f.filename.startswith(("<", _STDLIB)) and Path(f.filename).name not in _OWN_FRAMES
        and Path(f.filename).parent.name != "pluggy"
    ]
    own = [f for f in frames if source is not None and Path(f.filename).resolve().is_relative_to(source)]
    outside_libraries = [f for f in frames if not _LIBRARIES.search(f.filename)]
    chosen = own or outside_libraries or frames
    if chosen:
        text += f" ({Path(chosen[-1].filename).parent.name}/{Path(chosen[-1].filename).name}:{chosen[-1].lineno})"
    return text


def missing_config_key(exc: BaseException) -> str | None:
    """The dotted key of omegaconf's "Missing key" error (``method.pos_weight``), else None."""
    if type(exc).__module__.startswith("omegaconf") and str(exc).startswith("Missing key"):
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        return str(key) if key else None
    return None


def _import_target(target: str) -> Any:
    """The object a ``"module:attr.attr"`` target names (imported)."""
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: installed packages (site-packages, dist-packages): not where a plugin author's line is
_LIBRARIES = re.compile(r"[/\\](site|dist)-packages[/\\]")
# frames of the loading machinery itself, never the place a plugin author should look
_OWN_FRAMES = ("_registry.py", "plugins.py")
_STDLIB = sysconfig.get_paths()["stdlib"]


class Registry(Generic[T]):
    """A named collection of factories of one kind (methods, datasets, ...).

    Args:
        kind: what the registry holds, used in error messages (e.g. ``"method"``).
        base: ``"module:Class"``: what :meth:`build` must return (None: anything).
        contract: ``"module:function"`` that :meth:`build` calls with the registered class
            before building it and with the built object after:
            ``[(what is wrong, what to change)]``, empty when nothing is (e.g.
            :func:`fsmis_bench.method.contract_problems`; None: no check).
    """

    def __init__(self, kind: str, base: str | None = None, contract: str | None = None) -> None:
        self.kind = kind
        #: ``"module:Class"`` every built object must be an instance of (imported when first
        #: needed, so that a registry costs no heavy import), e.g. the method base class
        self.base = base
        self.contract = contract
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        target: Union[str, Callable[..., T], None],
        *,
        plugin: str = "<unknown>",
        description: str = "",
        display: Display | None = None,
        distribution: str = "",
        version: str = "",
    ) -> None:
        """Add ``name``; raises :class:`NameCollisionError` if it is taken.

        ``target`` may be None for names that only select config (settings, backbones).
        ``display`` says how reports show the name (display name, colour, published name).
        ``distribution``/``version``: the installed package whose plugin registers the name.
        """
        entry = Entry(name, target, plugin, description, display or Display(), distribution, version, self.kind)
        if name in self._entries:
            other = self._entries[name]
            packages = [f"{e.distribution} {e.version}".rstrip() for e in (other, entry) if e.distribution]
            # the third-party package is the one to remove (fsmis-bench owns the built-in names)
            removable = [e.distribution for e in (other, entry) if e.distribution not in ("", BUILTIN_DISTRIBUTION)]
            hint = "names are global across all installed plugins: rename one of them"
            if packages:
                hint = f"installed by {' and by '.join(packages)}; {hint}"
            if removable:
                hint += f", or uninstall one: pip uninstall {removable[-1]}"
            raise NameCollisionError(
                f"{self.kind} {name!r} is registered twice: by {other.origin} and by {entry.origin}",
                hint=hint,
            )
        shown = entry.display.name or name
        for other in self._entries.values():
            if (other.display.name or other.name).casefold() == shown.casefold():
                # reports group rows by the shown name: two methods under one name would share
                # a row label, a colour and a legend entry. The message names the third-party
                # entry first (fsmis-bench owns the built-in names), whichever registered first.
                new, old = (other, entry) if entry.distribution == BUILTIN_DISTRIBUTION else (entry, other)
                raise NameCollisionError(
                    f"{self.kind} {new.name!r} of {new.origin} would be shown in reports as "
                    f"{new.display.name or new.name!r}, the name {self.kind} {old.name!r} of {old.origin} is shown under",
                    hint="give it another display name: registry.register(..., display=Display(name=...))",
                )
        self._entries[name] = entry

    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name``; unknown names raise with the list of known ones."""
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            close = closest(name, known)
            hint = f"did you mean {close!r}? " if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(known) or '(none)'}",
                hint=hint + "run `fsmis-bench list` to see every name with the plugin it came from",
            ) from None

    def get(self, name: str) -> Callable[..., T]:
        """The (imported) factory registered as ``name``."""
        return self.entry(name).load()

    def build(self, name: str, *args, **kwargs) -> T:
        """Call the factory registered as ``name``.

        An :class:`~fsmis_bench.errors.FsmisError` the factory raises (a plugin's own
        message for its user) passes unchanged; any other exception becomes a
        :class:`PluginError` naming the entry and the plugin that registered it. So does a
        class or built object that breaks the registry's ``contract`` (checked on the class
        before it is built, so before any weights load, and on the built object).
        """
        entry = self.entry(name)
        factory = entry.load()
        base = _import_target(self.base) if self.base else None
        if base is not None and isinstance(factory, type) and not issubclass(factory, base):
            raise PluginError(f"{entry.described()} registers {_qualified(factory)}, which is not a subclass of "
                              f"{_qualified(base)}", hint=f"register a {base.__name__} subclass; {entry.remedy()}")
        if isinstance(factory, type):
            self._check_contract(entry, factory)
        try:
            built = factory(*args, **kwargs)
        except FsmisError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of plugin code
            raise PluginError(f"{entry.described()} failed to build: {_exception_text(exc, entry.source_dir())}",
                              hint=entry.failure_hint(exc)) from exc
        if base is not None and not isinstance(built, base):
            raise PluginError(f"{entry.described()} is registered as {entry.target!r}, which built a "
                              f"{_qualified(type(built))}, not a {_qualified(base)}",
                              hint=f"register a {base.__name__} subclass (or a factory returning one); {entry.remedy()}")
        self._check_contract(entry, built)
        return built

    def _check_contract(self, entry: Entry[T], obj: Any) -> None:
        """Raise one :class:`PluginError` listing how ``obj`` (the registered class, or what it
        built) breaks :attr:`contract`, with what to change."""
        if not self.contract:
            return
        problems = _import_target(self.contract)(obj)
        if not problems:
            return
        owner = _qualified(obj if isinstance(obj, type) else type(obj))
        raise PluginError(
            f"{entry.described()} breaks the {self.kind} contract: {owner}: " + "; ".join(p for p, _ in problems),
            hint="; ".join([*(fix for _, fix in problems), entry.remedy()]),
        )

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
