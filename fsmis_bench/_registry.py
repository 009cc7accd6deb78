"""Typed, lazy name registries.

A registry maps a name to a *factory* (a class or callable) plus the plugin that
contributed it. Entries may be given as ``"module:attr"`` strings so that heavy
modules (diffusers, transformers) are imported only when the entry is used.
Registering a name twice fails loudly; looking up an unknown name lists the known ones.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterator, TypeVar, Union

from .errors import NameCollisionError, UnknownNameError

T = TypeVar("T")


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
        organ_names: datasets: organ -> display name, for organs outside the built-in list.
    """

    name: str = ""
    colour: str = ""
    family: str = ""
    shade: int = 0
    published_names: tuple[str, ...] = ()
    organ_names: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Entry(Generic[T]):
    """One registered name."""

    name: str
    target: Union[str, Callable[..., T], None]
    plugin: str
    description: str = ""
    display: Display = field(default_factory=Display)
    _resolved: Callable[..., T] | None = field(default=None, repr=False)

    def load(self) -> Callable[..., T]:
        """Import (once) and return the factory."""
        if self._resolved is None:
            if isinstance(self.target, str):
                module_name, _, attr = self.target.partition(":")
                obj = importlib.import_module(module_name)
                for part in attr.split("."):
                    obj = getattr(obj, part)
                self._resolved = obj  # type: ignore[assignment]
            else:
                self._resolved = self.target
        return self._resolved  # type: ignore[return-value]


class Registry(Generic[T]):
    """A named collection of factories of one kind (methods, datasets, ...).

    Args:
        kind: what the registry holds, used in error messages (e.g. ``"method"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        target: Union[str, Callable[..., T], None],
        *,
        plugin: str = "<unknown>",
        description: str = "",
        display: Display | None = None,
    ) -> None:
        """Add ``name``; raises :class:`NameCollisionError` if it is taken.

        ``target`` may be None for names that only select config (settings, backbones).
        ``display`` says how reports show the name (display name, colour, published name).
        """
        if name in self._entries:
            other = self._entries[name].plugin
            raise NameCollisionError(
                f"{self.kind} {name!r} is registered twice: by plugin {other!r} and by {plugin!r}",
                hint="rename one of them; names are global across all installed plugins",
            )
        self._entries[name] = Entry(name, target, plugin, description, display or Display())

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
        """Call the factory registered as ``name``."""
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
