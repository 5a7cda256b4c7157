"""Datasets by name: ``load("digits", upsample=True)``, ``list_datasets()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from modelfuse.data.splits import Splits
from modelfuse.registry import Registry, check_options

F = TypeVar("F", bound=Callable[..., Splits])

_DATASETS: Registry[Callable[..., Splits]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[F], F]:
    """Register a function ``(**options) -> Splits`` under ``name``."""

    def decorator(fn: F) -> F:
        _DATASETS.register(name, fn)
        return fn

    return decorator


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching a shell-style ``pattern``, sorted."""
    return _DATASETS.names(pattern)


def get_dataset(name: str) -> Callable[..., Splits]:
    """The function registered under ``name``; an unknown name lists the close ones."""
    return _DATASETS.get(name)


def load(name: str, **kwargs: Any) -> Splits:
    """Build the named dataset's :class:`Splits` with the given options."""
    fn = get_dataset(name)
    check_options(f"dataset {name!r}", fn, kwargs)
    return fn(**kwargs)
