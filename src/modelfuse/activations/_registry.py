"""The activation registry and the tables that recognise activations inside a model.

``register_activation(name, factory)`` / ``get_activation(name)`` / ``list_activations("*lu")``:
a factory is called with keyword options only (``get_activation("leaky_relu")(negative_slope=0.2)``)
and returns an element-wise ``nn.Module``. The built-in entries are torch's own modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfuse.errors import ActivationError
from modelfuse.registry import Registry

ActivationFactory = Callable[..., nn.Module]

_ACTIVATIONS: Registry[ActivationFactory] = Registry("activation")


def register_activation(name: str, factory: ActivationFactory) -> ActivationFactory:
    """Register ``factory`` (``factory(**options) -> nn.Module``, element-wise) under ``name``."""
    return _ACTIVATIONS.register(name, factory)


def get_activation(name: str) -> ActivationFactory:
    """The factory registered under ``name`` (RegistryError, listing the registered names, if none)."""
    return _ACTIVATIONS.get(name)


def list_activations(pattern: str = "*") -> list[str]:
    """Registered activation names matching the shell-style ``pattern``, sorted."""
    return _ACTIVATIONS.names(pattern)


_BUILTIN: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "hardtanh": nn.Hardtanh,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "identity": nn.Identity,
}
for _name, _cls in _BUILTIN.items():
    register_activation(_name, _cls)

# nn.Module activations fuse_activations replaces (exact types: ReLU6 is a Hardtanh subclass;
# nn.Identity is not an activation a model "has", so it is a candidate only)
MODULE_NAMES: dict[type[nn.Module], str] = {cls: n for n, cls in _BUILTIN.items() if n != "identity"}

# functional activations: target -> (name, option names after the input, in positional order)
FUNCTION_NAMES: dict[Callable[..., Any], tuple[str, tuple[str, ...]]] = {
    F.relu: ("relu", ("inplace",)),
    F.relu_: ("relu", ()),
    torch.relu: ("relu", ()),
    torch.relu_: ("relu", ()),
    F.relu6: ("relu6", ("inplace",)),
    F.gelu: ("gelu", ("approximate",)),
    F.silu: ("silu", ("inplace",)),
    F.tanh: ("tanh", ()),
    torch.tanh: ("tanh", ()),
    F.sigmoid: ("sigmoid", ()),
    torch.sigmoid: ("sigmoid", ()),
    F.elu: ("elu", ("alpha", "inplace")),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.softplus: ("softplus", ("beta", "threshold")),
    F.mish: ("mish", ("inplace",)),
    F.hardswish: ("hardswish", ("inplace",)),
    F.hardsigmoid: ("hardsigmoid", ("inplace",)),
    F.hardtanh: ("hardtanh", ("min_val", "max_val", "inplace")),
    F.selu: ("selu", ("inplace",)),
    F.celu: ("celu", ("alpha", "inplace")),
}
# tensor methods (x.relu(), x.tanh_(), ...): name -> activation
METHOD_NAMES: dict[str, str] = {
    "relu": "relu",
    "relu_": "relu",
    "tanh": "tanh",
    "tanh_": "tanh",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
}
INPLACE_TARGETS = {F.relu_, torch.relu_, "relu_", "tanh_", "sigmoid_"}


def activation_name(module: nn.Module) -> str:
    """The registry name of ``module``'s class (its lower-cased class name for unregistered ones)."""
    for name in list_activations():
        if get_activation(name) is type(module):
            return name
    return type(module).__name__.lower()


def out_of_place(module: nn.Module) -> nn.Module:
    """``module`` with ``inplace`` off: mixture candidates share their input and must not write it."""
    if getattr(module, "inplace", False):
        module.inplace = False
    return module


def build_candidates(names: Sequence[str | nn.Module]) -> list[tuple[str, nn.Module]]:
    """(name, module) for each candidate: a registered name, or an element-wise module used as given."""
    if isinstance(names, str | nn.Module) or not len(names):
        raise ActivationError(
            f"candidates must be a non-empty sequence of activation names or modules; found {names!r}. "
            f"Registered names: {', '.join(list_activations())}"
        )
    out: list[tuple[str, nn.Module]] = []
    unknown = [n for n in names if isinstance(n, str) and n not in _ACTIVATIONS]
    if unknown:
        raise ActivationError(
            f"unknown activation name(s) {', '.join(map(repr, unknown))}. "
            f"Valid names: {', '.join(list_activations())} (or pass an nn.Module)"
        )
    for c in names:
        if isinstance(c, str):
            out.append((c, out_of_place(get_activation(c)())))
        elif isinstance(c, nn.Module):
            out.append((activation_name(c), out_of_place(c)))
        else:
            raise ActivationError(
                f"a candidate must be an activation name or an nn.Module; found {type(c).__name__} {c!r}"
            )
    seen = [n for n, _ in out]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise ActivationError(f"candidates name {', '.join(map(repr, dup))} more than once; list each once")
    return out
