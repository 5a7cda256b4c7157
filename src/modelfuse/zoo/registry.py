"""Architectures by name, like timm's: ``register_model``, ``create_model``, ``list_models``."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.registry import Registry, check_options

F = TypeVar("F", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture: its factory and the input shapes it is meant for (tests build each)."""

    name: str
    factory: Callable[..., nn.Module]
    input_shapes: tuple[tuple[int, ...], ...]

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.factory) or ""


_MODELS: Registry[ModelInfo] = Registry("model")


def register_model(
    name: str, *, input_shapes: Sequence[Sequence[int]] = ((1, 8, 8), (3, 32, 32))
) -> Callable[[F], F]:
    """Register a factory ``(*, input_shape, num_classes, **options) -> nn.Module`` under ``name``.

    ``input_shapes`` lists example inputs (without batch) the architecture is meant for;
    the shared test battery builds and runs the model on each.
    """

    def decorator(fn: F) -> F:
        params = inspect.signature(fn).parameters
        if "input_shape" not in params or "num_classes" not in params:
            raise TypeError(f"model factory {fn.__qualname__} must take input_shape and num_classes")
        info = ModelInfo(name, fn, tuple(tuple(int(d) for d in s) for s in input_shapes))
        _MODELS.register(name, info, same=lambda old, new: old.factory is new.factory)
        return fn

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a shell-style ``pattern`` (``"cnn*"``), sorted."""
    return _MODELS.names(pattern)


def get_model(name: str) -> ModelInfo:
    """The registry entry for ``name``; an unknown name raises RegistryError listing close names."""
    return _MODELS.get(name)


def create_model(name: str, *, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the architecture ``name`` for inputs of ``input_shape`` (no batch) and ``num_classes``."""
    info = get_model(name)
    check_options(f"model {name!r}", info.factory, kwargs, fixed=("input_shape", "num_classes"))
    return info.factory(
        input_shape=tuple(int(d) for d in input_shape), num_classes=int(num_classes), **kwargs
    )


def build_architecture(
    arch: str, *, input_shape: Sequence[int], num_classes: int, options: Mapping[str, Any] | None = None
) -> nn.Module:
    """A fresh (untrained) model from a name, as the CLI and recipes give architectures:

    - a zoo name (``cnn``, ``vgg_small``, ...), built for ``input_shape`` and ``num_classes``;
    - ``torchvision:NAME`` (``torchvision:resnet18``), ``torchvision.models.get_model(NAME,
      weights=None, **options)``: no download, load weights from a local file afterwards;
    - ``package.module:function``, a user's factory, called with ``input_shape=`` and
      ``num_classes=`` where its signature takes them, plus ``options``.
    """
    import importlib

    options = dict(options or {})
    if ":" not in arch:
        return create_model(arch, input_shape=input_shape, num_classes=num_classes, **options)
    module_name, _, attr = arch.partition(":")
    if module_name == "torchvision":
        from modelfuse._optional import require

        models = require("torchvision.models", "torchvision architectures")
        try:
            return models.get_model(attr, weights=None, **options)
        except ValueError as exc:
            close = difflib.get_close_matches(attr, models.list_models(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"architecture {arch!r}: {exc}.{hint}") from None
        except TypeError as exc:
            raise ConfigError(f"architecture {arch!r}: bad options {sorted(options)} ({exc})") from None
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"architecture {arch!r}: cannot import {attr!r} from {module_name!r} ({exc}); give "
            "'package.module:function' with the module on the Python path"
        ) from None
    if not callable(factory):
        raise ConfigError(f"architecture {arch!r} is a {type(factory).__name__}, not a callable factory")
    params = inspect.signature(factory).parameters
    given = {
        k: v
        for k, v in (("input_shape", tuple(int(d) for d in input_shape)), ("num_classes", int(num_classes)))
        if k in params and k not in options
    }
    check_options(f"factory {arch!r}", factory, options, fixed=given)
    model = factory(**given, **options)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"factory {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
