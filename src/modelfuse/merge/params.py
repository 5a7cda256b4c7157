"""Per-tensor parameter values: filters, gradients over layer depth, and their precedence.

mergekit's rules (see reference/mergekit-semantics.md): a value is a scalar, a gradient
(numbers interpolated across layer depth) or a list of ``{filter, value}`` conditions
where ``filter`` is a substring of the tensor name and the first match wins. Layer depth
comes from the tensor's name (``...layers.N.``, ``...h.N.``, ``...blocks.N.``,
``...layer.N.``), so no per-architecture definition is needed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from modelfuse.merge.recipe import Condition

#: the numbered-layer component of a tensor name: ``model.layers.12.mlp...`` -> 12
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
#: config.json keys that hold the number of layers, by model family
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: names of tensors that come before the layers (embeddings); others outside layers come after
_PRE_LAYER = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The layer number in a tensor name, or None for tensors outside the numbered layers."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def with_layer(name: str, index: int) -> str:
    """``name`` with its layer number replaced by ``index``."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        raise ValueError(f"{name!r} has no layer number")
    start, end = match.span(1)
    return f"{name[:start]}{index}{name[end:]}"


def is_pre_layer(name: str) -> bool:
    """Whether a tensor outside the layers belongs before them (embeddings) rather than after (norm, head)."""
    return bool(_PRE_LAYER.search(name))


def count_layers(names: Iterable[str], config: Mapping[str, Any] | None = None) -> int:
    """Number of numbered layers: from config.json when it says, else the largest index in the names + 1."""
    for key in LAYER_COUNT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    found = [i for i in map(layer_index, names) if i is not None]
    return max(found) + 1 if found else 0


def depth(layer: int | None, layers: int) -> float:
    """Gradient position t: layer j of N -> j / (N - 1) (1 when N = 1); outside the layers -> 0."""
    if layer is None:
        return 0.0
    if layers <= 1:
        return 1.0
    return layer / (layers - 1)


def interpolate(gradient: Sequence[float], t: float) -> float:
    """mergekit's gradient: with K values, s = t (K - 1), value = (1 - f) g[i] + f g[i+1]."""
    if len(gradient) == 1:
        return float(gradient[0])
    s = min(max(t, 0.0), 1.0) * (len(gradient) - 1)
    i = min(math.floor(s), len(gradient) - 2)
    f = s - i
    return (1 - f) * float(gradient[i]) + f * float(gradient[i + 1])


_NO_MATCH = object()


def evaluate(value: Any, name: str, t: float) -> Any:
    """One setting's value for tensor ``name`` at depth ``t``; ``_NO_MATCH`` when no filter matches."""
    if isinstance(value, list) and value and isinstance(value[0], Condition):
        for cond in value:
            if cond.filter in (None, "*", "") or cond.filter in name:
                return evaluate(cond.value, name, t)
        return _NO_MATCH
    if isinstance(value, list):
        return interpolate(value, t)
    return value


def lookup(key: str, levels: Sequence[Mapping[str, Any]], name: str, t: float, default: Any) -> Any:
    """The value of ``key`` from the first level (highest precedence first) whose setting applies."""
    for params in levels:
        if key in params:
            found = evaluate(params[key], name, t)
            if found is not _NO_MATCH:
                return found
    return default


def candidate_values(value: Any) -> list[Any]:
    """Every value a setting can produce (for validating a recipe once, before any tensor)."""
    if isinstance(value, list) and value and isinstance(value[0], Condition):
        return [v for cond in value for v in candidate_values(cond.value)]
    if isinstance(value, list):
        return list(value)
    return [value]
