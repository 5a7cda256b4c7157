"""Per-tensor parameter values: filters, gradients over layer depth, and their precedence.

mergekit's rules (see reference/mergekit-semantics.md): a value is a scalar, a gradient
(numbers interpolated across layer depth) or a list of ``{filter, value}`` conditions
where ``filter`` is a substring of the tensor name and the first match wins. Layer depth
comes from the tensor's name (``...layers.N.``, ``...h.N.``, ``...blocks.N.``,
``...layer.N.``), so no per-architecture definition is needed; those layer-name helpers live
in :mod:`modelfuse.layers` (re-exported here) and are shared with ``modelfuse.structure``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from modelfuse.layers import LAYER_COUNT_KEYS as LAYER_COUNT_KEYS
from modelfuse.layers import LAYER_PATTERN as LAYER_PATTERN
from modelfuse.layers import count_layers as count_layers
from modelfuse.layers import layer_index as layer_index
from modelfuse.layers import with_layer as with_layer
from modelfuse.merge.recipe import Condition

#: names of tensors that come before the layers (embeddings); others outside layers come after
_PRE_LAYER = re.compile(r"embed|(?:^|\.)(?:wte|wpe)(?:\.|$)")


def is_pre_layer(name: str) -> bool:
    """Whether a tensor outside the layers belongs before them (embeddings) rather than after (norm, head)."""
    return bool(_PRE_LAYER.search(name))


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


def resolve_value(value: Any, name: str, t: float) -> Any:
    """One setting's value for tensor ``name`` at depth ``t``; ``_NO_MATCH`` when no filter matches."""
    if isinstance(value, list) and value and isinstance(value[0], Condition):
        for cond in value:
            if cond.filter in (None, "*", "") or cond.filter in name:
                return resolve_value(cond.value, name, t)
        return _NO_MATCH
    if isinstance(value, list):
        return interpolate(value, t)
    return value


def lookup(key: str, levels: Sequence[Mapping[str, Any]], name: str, t: float, default: Any) -> Any:
    """The value of ``key`` from the first level (highest precedence first) whose setting applies."""
    for params in levels:
        if key in params:
            found = resolve_value(params[key], name, t)
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
