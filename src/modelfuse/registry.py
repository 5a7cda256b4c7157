"""Named registries, one per level (datasets, architectures, merge methods, combiners, ...).

A registry maps names to entries; what the CLI, YAML recipes and the test batteries
enumerate. Unknown names and bad options raise errors that list what would be valid.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from modelfuse.errors import ConfigError, RegistryError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one ``kind`` by name: ``register``, ``get`` (with close-name hints), ``names(pattern)``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, same: Callable[[T, T], bool] | None = None) -> T:
        """Add ``entry`` under ``name``; registering another entry under a taken name is an error."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.kind} needs a non-empty string name, found {name!r}")
        old = self._entries.get(name)
        if old is not None and not (same(old, entry) if same else old is entry):
            raise RegistryError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style ``pattern`` (``"cnn*"``), sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def check_options(
    what: str, fn: Callable[..., Any], options: Mapping[str, Any], fixed: Iterable[str] = ()
) -> None:
    """Raise ConfigError naming the valid options when ``options`` do not fit ``fn``'s signature.

    ``fixed`` are parameters the caller fills itself (left out of the list shown to users).
    """
    sig = inspect.signature(fn)
    fixed = set(fixed)
    try:
        sig.bind_partial(**options)
        missing = [
            p.name
            for p in sig.parameters.values()
            if p.default is p.empty
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.name not in options
            and p.name not in fixed
        ]
        if missing:
            raise TypeError(f"missing required option(s): {', '.join(missing)}")
    except TypeError as exc:
        valid = [
            p.name for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD and p.name not in fixed
        ]
        raise ConfigError(f"{what}: {exc}. Valid options: {', '.join(valid) or '(none)'}") from None
