"""Numbered layer stacks: their names in checkpoints and their ranges, shared by every level.

Transformer checkpoints number their blocks in tensor names (``model.layers.12.mlp...``,
``transformer.h.3...``, ``encoder.layer.5...``, ``blocks.7...``), so the layer a tensor
belongs to, and the depth of a model, need no per-architecture definition. A layer range
is ``[start, end)`` as in mergekit's ``slices`` and in Python slicing. Both the merge
engine's checkpoint-level ``slices`` (``modelfuse.merge``) and module-level layer stacking
(``modelfuse.structure.stack_layers``) check ranges with :func:`check_layer_range`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from modelfuse.errors import ConfigError

#: names of the containers that hold numbered layers (``model.layers``, ``transformer.h``, ``encoder.layer``)
LAYER_CONTAINERS = ("layers", "h", "blocks", "layer")
#: the numbered-layer component of a tensor name: ``model.layers.12.mlp...`` -> 12
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:" + "|".join(LAYER_CONTAINERS) + r")\.(\d+)\.")
#: config.json keys that hold the number of layers, by model family
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


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


def count_layers(names: Iterable[str], config: Mapping[str, Any] | None = None) -> int:
    """Number of numbered layers: from config.json when it says, else the largest index in the names + 1."""
    for key in LAYER_COUNT_KEYS:
        value = (config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    found = [i for i in map(layer_index, names) if i is not None]
    return max(found) + 1 if found else 0


def check_layer_range(
    layer_range: Sequence[int], n_layers: int, where: str, *, model: str = "the model"
) -> tuple[int, int]:
    """``layer_range`` as ``(start, end)`` if it is a range ``[start, end)`` inside ``n_layers`` layers.

    Otherwise a ConfigError names ``where`` the range was given (``slices[0].sources[1].layer_range``),
    the range, ``model``'s depth and the valid bounds.
    """
    values = list(layer_range)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where} {values}: a layer range is two integers [start, end), e.g. [0, 4]")
    start, end = values
    if start < 0 or end <= start:
        raise ConfigError(
            f"{where} {values}: a layer range is [start, end) with 0 <= start < end (the end is exclusive)"
        )
    if end > n_layers:
        raise ConfigError(
            f"{where} {values}: {model} has {n_layers} layers (0 to {n_layers - 1}); "
            f"the end of a range is exclusive, at most {n_layers}"
        )
    return start, end
