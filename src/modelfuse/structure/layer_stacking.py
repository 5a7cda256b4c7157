"""Layer stacking: a deeper (or shallower) network from layer ranges of networks of one family.

The "passthrough" of LLM merging (mergekit's ``slices``; e.g. Goliath-120B, two Llama-2-70B
fine-tunes interleaved) and depth up-scaling (Kim et al. 2023, "SOLAR 10.7B: Scaling
large language models with simple yet effective depth up-scaling": layers 0-24 of a
32-layer model followed by layers 8-32 of a copy) build a model whose layer stack is
the concatenation of ranges ``[start, end)`` of other models' stacks. This is the
module-level version; ``modelfuse.merge``'s ``slices`` write the same thing as a
checkpoint, and both check ranges with :func:`modelfuse.layers.check_layer_range`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import nn

from modelfuse.errors import ConfigError, StructureError
from modelfuse.layers import LAYER_CONTAINERS, LAYER_COUNT_KEYS, check_layer_range

#: config attributes that give a transformer's hidden size, by model family
HIDDEN_SIZE_KEYS = ("hidden_size", "d_model", "n_embd")
_CONTAINERS = (nn.ModuleList, nn.Sequential)


def find_layer_stack(model: nn.Module) -> str:
    """The path of ``model``'s layer stack: ``""`` for an ``nn.Sequential``, else its one ModuleList or
    Sequential named like Hugging Face's (``layers``, ``h``, ``blocks``, ``layer``: ``encoder.layer``)."""
    if type(model) is nn.Sequential:
        return ""
    found = [
        name
        for name, m in model.named_modules()
        if name and isinstance(m, _CONTAINERS) and name.rsplit(".", 1)[-1] in LAYER_CONTAINERS
    ]
    if len(found) == 1:
        return found[0]
    containers = [name for name, m in model.named_modules() if name and isinstance(m, _CONTAINERS)]
    if found:
        raise StructureError(
            f"{type(model).__name__} has several layer stacks ({', '.join(found)}); pass layers= one of them"
        )
    raise StructureError(
        f"{type(model).__name__} has no layer stack named {', '.join(LAYER_CONTAINERS)}; pass layers= the "
        f"path of its ModuleList or Sequential of blocks (containers: {', '.join(containers) or 'none'})"
    )


def _stack(model: nn.Module, path: str, where: str) -> nn.Module:
    try:
        container = model.get_submodule(path)
    except AttributeError:
        containers = [name for name, m in model.named_modules() if name and isinstance(m, _CONTAINERS)]
        raise StructureError(
            f"{where}: {type(model).__name__} has no module {path!r}; its ModuleLists and Sequentials: "
            f"{', '.join(containers) or 'none'}"
        ) from None
    if not isinstance(container, _CONTAINERS):
        raise StructureError(
            f"{where}: {type(model).__name__}.{path} is a {type(container).__name__}; layers= must name a "
            "ModuleList or Sequential of blocks"
        )
    return container


def _hidden_size(model: nn.Module) -> tuple[str, int] | None:
    config = getattr(model, "config", None)
    for key in HIDDEN_SIZE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return key, value
    return None


def _signature(layer: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of a layer by name: what must agree for one layer to replace another."""
    tensors = list(layer.named_parameters()) + list(layer.named_buffers())
    return {name: tuple(t.shape) for name, t in tensors}


def _difference(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    for name in expected:
        if name not in found:
            return f"lacks {name!r} (expected shape {expected[name]})"
        if found[name] != expected[name]:
            return f"has {name!r} of shape {found[name]} where {expected[name]} is expected"
    extra = [name for name in found if name not in expected]
    return f"has {extra[0]!r}, which the layer it replaces lacks" if extra else None


def _check_joint(
    i: int,
    prev: tuple[nn.Module, int, int],
    prev_layers: nn.Module,
    cur: tuple[nn.Module, int, int],
    layers: nn.Module,
) -> None:
    """Whether layer ``cur`` start can follow layer ``prev`` end - 1, judged by where such layers stood before.

    Compatible when ``cur``'s first layer has the shapes of the layer that followed ``prev``'s last one
    in its model, or ``prev``'s last layer the shapes of the layer that preceded ``cur``'s first one.
    """
    _, _, end = prev
    _, start, _ = cur
    here, there = f"ranges[{i}]'s model", f"ranges[{i - 1}]'s model"
    replaces = "whose place it takes in the stack"
    checks = []
    if end < len(prev_layers):
        checks.append(
            (layers[start], prev_layers[end], f"layer {start} of {here}", f"layer {end} of {there}")
        )
    if start > 0:
        checks.append(
            (
                prev_layers[end - 1],
                layers[start - 1],
                f"layer {end - 1} of {there}",
                f"layer {start - 1} of {here}",
            )
        )
    if not checks:  # whole stacks end to end: the stack must be uniform
        replaces = "which it follows (whole stacks end to end must have uniform layers)"
        checks.append(
            (layers[start], prev_layers[end - 1], f"layer {start} of {here}", f"layer {end - 1} of {there}")
        )
    problems = []
    for found, expected, what, other in checks:
        diff = _difference(_signature(found), _signature(expected))
        if diff is None:
            return
        problems.append(f"{what} {diff}, compared with {other}, {replaces}")
    raise StructureError(
        f"ranges[{i}] cannot follow ranges[{i - 1}]: {'; '.join(problems)}. Layers of different families "
        "(or from positions of different widths) cannot be stacked; take the ranges from models of one "
        "family, at positions whose shapes match"
    )


def _renumber(layer: nn.Module, index: int) -> None:
    """Set ``layer_idx`` (Hugging Face attention's key into the KV cache) on the layer's modules to ``index``."""
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def stack_layers(
    ranges: Sequence[tuple[nn.Module, Sequence[int]]],
    *,
    layers: str | None = None,
    base: nn.Module | None = None,
) -> nn.Module:
    """A new model whose layer stack is layers ``[start, end)`` of each ``(model, (start, end))`` in turn.

    ``layers`` is the path of the stack (an ``nn.ModuleList`` or ``nn.Sequential``): ``""``
    for a model that is an ``nn.Sequential``, ``"encoder.layer"`` for BERT, ``"model.layers"``
    for Llama; by default it is found by name. Everything outside the stack (embeddings,
    final norm, head) comes from ``base`` (default: the first range's model). The result
    holds deep copies, numbers its layers 0..N-1, sets each attention's ``layer_idx`` to its
    new position and, for Hugging Face models, ``config.num_hidden_layers`` (or its family's
    key) to N. Ranges outside a model's depth and layers of different families raise errors.
    """
    items = list(ranges)
    if not items:
        raise ConfigError("stack_layers needs at least one (model, (start, end)) range; found none")
    for i, item in enumerate(items):
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], nn.Module)):
            raise ConfigError(f"ranges[{i}] must be a pair (model, (start, end)); found {item!r}")
    base = items[0][0] if base is None else base
    path = find_layer_stack(base) if layers is None else layers
    stacks = [_stack(model, path, f"ranges[{i}]") for i, (model, _) in enumerate(items)]
    base_stack = _stack(base, path, "base")
    spans = []
    for i, ((model, layer_range), stack) in enumerate(zip(items, stacks)):
        start, end = check_layer_range(
            layer_range, len(stack), f"ranges[{i}]", model=f"{type(model).__name__}.{path or '(the model)'}"
        )
        spans.append((model, start, end))
    reference = _hidden_size(base)
    for i, (model, _, _) in enumerate(spans):
        hidden = _hidden_size(model)
        if reference is not None and hidden is not None and hidden[1] != reference[1]:
            raise StructureError(
                f"ranges[{i}] comes from a {type(model).__name__} with {hidden[0]}={hidden[1]}, but the base "
                f"model has {reference[0]}={reference[1]}: layers of different hidden sizes cannot be stacked; "
                "take every range from models of one family and size"
            )
    for i in range(1, len(spans)):
        _check_joint(i, spans[i - 1], stacks[i - 1], spans[i], stacks[i])
    new_layers = [
        copy.deepcopy(stack[k]) for stack, (_, start, end) in zip(stacks, spans) for k in range(start, end)
    ]
    for index, layer in enumerate(new_layers):
        _renumber(layer, index)
    memo: dict[int, Any] = {id(layer): layer for layer in base_stack}  # not copied: replaced below
    model = copy.deepcopy(base, memo)
    container = model.get_submodule(path)
    container._modules = OrderedDict((str(i), layer) for i, layer in enumerate(new_layers))
    _update_config(model, spans, len(new_layers))
    return model


def _update_config(model: nn.Module, spans: list[tuple[nn.Module, int, int]], count: int) -> None:
    """Set the layer count of a Hugging Face config (and its per-layer ``layer_types``, if any)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for key in LAYER_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, count)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list):
        new_types = []
        for source, start, end in spans:
            source_types = getattr(getattr(source, "config", None), "layer_types", None) or []
            new_types += [source_types[k] for k in range(start, end) if k < len(source_types)]
        if len(new_types) == count:
            config.layer_types = new_types
