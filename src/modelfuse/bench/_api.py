"""The contract between the benchmark runner and the fusion methods it runs.

A suite (YAML) names a *pool builder* and a list of *bench methods* with their parameters.
For each seed the runner builds the pool once (``build(seed=..., **pool_options) -> BenchPool``;
pool builders cache trained models through :mod:`modelfuse.zoo`), then calls each method
``fn(pool, **params) -> Outcome``. The runner, not the method, measures the fusion time (wall
clock of the call), the fused model's parameter count and inference time (on
``pool.inference_input``), records the exact recipe and catches a failing method.

Metric names in ``Outcome.metrics``: ``accuracy`` (fraction in [0, 1]) and ``nll`` on the pool's
test data where they apply; per-task figures of merges as ``accuracy/<task>``; anything else a
method wants to report under its own name. ``Outcome.series`` holds curves for the report's
plots under the names in :data:`SERIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelfuse.registry import Registry

__all__ = [
    "LEVELS",
    "SERIES",
    "BenchMethod",
    "BenchPool",
    "Outcome",
    "get_bench_method",
    "get_pool_builder",
    "list_bench_methods",
    "list_pool_builders",
    "register_bench_method",
    "register_pool_builder",
]

#: the fusion levels a bench method belongs to (the report groups and colours by level)
LEVELS = ("output", "feature", "structure", "parameter", "activation", "loss", "baseline")

#: curve names the report plots, each a list of (x, y) points
SERIES = {
    "lambda_sweep": "task-arithmetic scaling lambda -> average accuracy",
    "barrier": "interpolation t in [0, 1] -> test loss along the path (one curve per method)",
    "members": "number of ensemble members -> accuracy",
}


@dataclass
class BenchPool:
    """What a pool builder returns for one seed: named models, the data, and anything else methods need.

    ``models``: the trained members (or fine-tunes), by name, in a fixed order. ``data``: usually a
    :class:`modelfuse.data.Splits` (methods evaluate on its test split). ``tasks``: for multi-task
    pools, task name -> that task's Splits (per-task accuracies). ``base``: the shared pretrained
    model of fine-tune pools. ``inference_input``: a batch the runner times fused models on.
    ``info``: JSON-serialisable facts about the pool (recorded with each result).
    """

    name: str
    seed: int
    models: dict[str, nn.Module]
    data: Any
    tasks: dict[str, Any] = field(default_factory=dict)
    base: nn.Module | None = None
    inference_input: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """What a bench method returns: its metrics, the fused model (for size and speed), curves, notes."""

    metrics: dict[str, float]
    model: nn.Module | None = None
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    notes: str = ""


@dataclass(frozen=True)
class BenchMethod:
    """A registered bench method: its ``level``, the callable, what it is (one line)."""

    name: str
    level: str
    fn: Callable[..., Outcome]
    summary: str = ""


_METHODS: Registry[BenchMethod] = Registry("bench method")
_POOLS: Registry[Callable[..., BenchPool]] = Registry("pool builder")


def register_bench_method(name: str, level: str, summary: str = "") -> Callable[[Callable[..., Outcome]], Callable[..., Outcome]]:
    """Register ``fn(pool, **params) -> Outcome`` as bench method ``name`` of fusion ``level``."""
    if level not in LEVELS:
        from modelfuse.errors import ConfigError

        raise ConfigError(f"bench method {name!r}: level must be one of {', '.join(LEVELS)}; found {level!r}")

    def deco(fn: Callable[..., Outcome]) -> Callable[..., Outcome]:
        doc = (fn.__doc__ or "").strip().splitlines()
        _METHODS.register(name, BenchMethod(name, level, fn, summary or (doc[0] if doc else "")))
        return fn

    return deco


_BUILTIN = {"loaded": False}


def _builtin() -> None:
    """Register the built-in suites' pools and methods (once, on the first look-up)."""
    if not _BUILTIN["loaded"]:
        _BUILTIN["loaded"] = True
        from modelfuse.bench.schema import load_builtin

        load_builtin()


def get_bench_method(name: str) -> BenchMethod:
    """The bench method registered as ``name`` (unknown names list the registered ones)."""
    _builtin()
    return _METHODS.get(name)


def list_bench_methods(pattern: str = "*") -> list[str]:
    """Registered bench methods (the built-in suites' included) matching ``pattern``, sorted."""
    _builtin()
    return _METHODS.names(pattern)


def register_pool_builder(name: str) -> Callable[[Callable[..., BenchPool]], Callable[..., BenchPool]]:
    """Register ``build(seed, **options) -> BenchPool`` as pool builder ``name``."""

    def deco(fn: Callable[..., BenchPool]) -> Callable[..., BenchPool]:
        _POOLS.register(name, fn)
        return fn

    return deco


def get_pool_builder(name: str) -> Callable[..., BenchPool]:
    """The pool builder registered as ``name`` (unknown names list the registered ones)."""
    _builtin()
    return _POOLS.get(name)


def list_pool_builders(pattern: str = "*") -> list[str]:
    """Registered pool builders (the built-in suites' included) matching ``pattern``, sorted."""
    _builtin()
    return _POOLS.names(pattern)


def info_of(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` made JSON-serialisable (tuples to lists, other objects to their repr)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) else repr(x) for x in v]
        elif isinstance(v, Mapping):
            out[k] = info_of(v)
        else:
            out[k] = repr(v)
    return out
