"""What a merge method is: a plain function over one tensor's inputs, registered with its schemas.

A method is ``fn(xs, base, *, <per-model lists>, <shared scalars>, [generator]) -> Tensor``:
``xs`` are the models' versions of one tensor (the base excluded), ``base`` the base
model's (or None), per-model parameters arrive as lists aligned with ``xs`` (``weight``,
``density``...), shared parameters as scalars (``t``, ``lambda_``, ``normalize``...).
The annotated signature is the method's only parameter declaration: ``weight: PerModel[float]
= 1.0`` is a per-model parameter, ``t: Annotated[float, Field(ge=0, le=1)]`` a required shared
one, and :func:`merge_method` derives the pydantic schemas from it (``pydantic.create_model``).
Methods never do I/O and never see tensor names; the executor resolves parameters per
tensor (filters, gradients) and calls them. Randomised methods take a seeded
``generator``. Each method's docstring names its paper and the equation it implements,
and says where mergekit's semantics differ from the paper.
"""

from __future__ import annotations

import contextlib
import inspect
import keyword
import threading
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from modelfuse.errors import ConfigError
from modelfuse.registry import Registry

BaseUse = Literal["required", "optional", "none"]


_workspace = threading.local()

#: allocator of uint8 CPU memory (a number of bytes -> a 1-d uint8 tensor of that size)
Allocator = Callable[[int], torch.Tensor]


def new_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uninitialised memory for a method's output or a large scratch array.

    Inside ``with workspace(alloc)`` CPU memory comes from ``alloc`` (the executor's pool of
    reused buffers: memory the process already holds costs no page faults and no zeroing by
    the kernel, which on some machines costs as much as the merge arithmetic); elsewhere,
    and on other devices, it is ``torch.empty``.
    """
    alloc: Allocator | None = getattr(_workspace, "alloc", None)
    device = torch.device(device)
    nbytes = dtype.itemsize
    for size in shape:
        nbytes *= int(size)
    if alloc is None or device.type != "cpu" or nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return alloc(nbytes).view(dtype).view(tuple(shape))


@contextlib.contextmanager
def workspace(alloc: Allocator) -> Iterator[None]:
    """Let ``new_empty`` on this thread take memory from ``alloc`` (see there)."""
    before = getattr(_workspace, "alloc", None)
    _workspace.alloc = alloc
    try:
        yield
    finally:
        _workspace.alloc = before


class Params(BaseModel):
    """Base of every method's parameter schema: unknown fields are errors, ``lambda`` may be spelled so."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class NoParams(Params):
    """A method without parameters of this kind."""


class _PerModelMarker:
    def __repr__(self) -> str:
        return "PER_MODEL"


#: the metadata that marks a keyword parameter as per-model (see ``PerModel``)
PER_MODEL = _PerModelMarker()

T = TypeVar("T")

#: ``PerModel[T]``: a per-model parameter whose values have type ``T`` (the function receives a
#: list, one value per model); its default in the signature is one model's value, as in mergekit
PerModel = Annotated[list[T], PER_MODEL]

#: a kept fraction (TIES', DARE's... ``density``): 0 < d <= 1
Density = Annotated[float, Field(gt=0, le=1)]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its function, parameter schemas and input requirements.

    - ``shared``: parameters that take one value per tensor (``t``, ``lambda``, ``normalize``).
    - ``per_model``: parameters each model sets for itself (``weight``, ``density``).
    - ``base``: whether a base model is required, optional or not used.
    - ``min_models`` / ``max_models``: how many models besides the base it accepts.
    - ``randomized``: takes a ``generator`` (seeded per tensor by the executor).
    - ``mergekit``: how mergekit 0.1.5's method of this name differs, or ``not in mergekit``
      (whether its base is an input, which parameters it ignores, numerical differences);
      ``modelfuse merge --list-methods`` prints it and the model card quotes it.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    shared: type[Params]
    per_model: type[Params]
    base: BaseUse
    min_models: int
    max_models: int | None
    randomized: bool
    paper: str
    mergekit: str = ""

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.fn) or ""

    def shared_defaults(self) -> dict[str, Any]:
        """Defaults of the shared parameters (required ones, like slerp's ``t``, are left out)."""
        return _defaults(self.shared)

    def per_model_defaults(self) -> dict[str, Any]:
        """Defaults of the per-model parameters (required ones are left out)."""
        return _defaults(self.per_model)

    def check_count(self, n: int, where: str = "") -> None:
        """Raise ConfigError unless ``n`` models besides the base is a number this method takes."""
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            most = "" if self.max_models is None else f" and at most {self.max_models}"
            raise ConfigError(
                f"{where + ': ' if where else ''}merge method {self.name!r} needs at least "
                f"{self.min_models}{most} models besides the base; found {n}"
            )

    def check_shared(self, values: dict[str, Any], where: str = "parameters") -> Params:
        return _validate(self, self.shared, values, where)

    def check_per_model(self, values: dict[str, Any], where: str = "model parameters") -> Params:
        return _validate(self, self.per_model, values, where)

    def __call__(
        self,
        xs: Sequence[torch.Tensor],
        base: torch.Tensor | None = None,
        *,
        models: Sequence[dict[str, Any]] | None = None,
        generator: torch.Generator | None = None,
        **shared: Any,
    ) -> torch.Tensor:
        """Validate parameters and run: ``models`` holds each model's own parameters (dicts)."""
        if self.base == "required" and base is None:
            raise ConfigError(f"merge method {self.name!r} needs a base model (base_model in a recipe)")
        n = len(xs)
        self.check_count(n)
        models = list(models) if models is not None else [{} for _ in xs]
        if len(models) != n:
            raise ConfigError(
                f"merge method {self.name!r}: {n} tensors but {len(models)} per-model parameter sets"
            )
        checked = [self.check_per_model(m, f"model {i} parameters") for i, m in enumerate(models)]
        kwargs: dict[str, Any] = {
            field: [getattr(m, field) for m in checked] for field in self.per_model.model_fields
        }
        kwargs.update(self.check_shared(shared).model_dump())
        if self.randomized:
            kwargs["generator"] = generator
        return self.fn(list(xs), base, **kwargs)


def _defaults(schema: type[Params]) -> dict[str, Any]:
    return {f.alias or n: f.default for n, f in schema.model_fields.items() if not f.is_required()}


def _validate(method: MergeMethod, schema: type[Params], values: dict[str, Any], where: str) -> Params:
    from pydantic import ValidationError

    from modelfuse.config import describe

    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        problems = describe(exc)
        valid = ", ".join(f.alias or n for n, f in schema.model_fields.items()) or "(none)"
        raise ConfigError(
            f"merge method {method.name!r} {where}: {problems}. Valid parameters here: {valid}"
        ) from None


METHODS: Registry[MergeMethod] = Registry("merge method")


def schemas(
    name: str, fn: Callable[..., torch.Tensor], check_model: Callable[[Any], None] | None = None
) -> tuple[type[Params], type[Params], bool]:
    """The (shared, per-model) pydantic schemas that ``fn``'s keyword-only parameters declare, and
    whether it takes a ``generator``.

    ``PerModel[T]`` parameters are per-model fields of type ``T``, the others shared fields;
    a signature default is the field's default (none: required); ``Annotated[T, Field(...)]``
    carries constraints and descriptions; ``lambda_`` (a Python keyword with ``_``) is
    written ``lambda`` in recipes. ``check_model`` validates one model's parameters together
    (raising ValueError with a message naming the fields).
    """
    hints = typing.get_type_hints(fn, include_extras=True)
    shared: dict[str, Any] = {}
    per_model: dict[str, Any] = {}
    randomized = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        if p.name == "generator":
            randomized = True
            continue
        if p.name not in hints:
            raise TypeError(f"merge method {name!r}: keyword parameter {p.name!r} has no type annotation")
        ann = hints[p.name]
        target = shared
        if typing.get_origin(ann) is Annotated and any(m is PER_MODEL for m in ann.__metadata__):
            (ann,) = typing.get_args(typing.get_args(ann)[0])  # PerModel[X] = Annotated[list[X], ...]
            target = per_model
        alias = p.name[:-1] if p.name.endswith("_") and keyword.iskeyword(p.name[:-1]) else None
        default = ... if p.default is inspect.Parameter.empty else p.default
        target[p.name] = (ann, Field(default, alias=alias) if alias else default)
    title = "".join(part.title() for part in name.split("_"))
    validators = {}
    if check_model is not None:

        def _check(self: Any) -> Any:
            check_model(self)
            return self

        validators["_check"] = model_validator(mode="after")(_check)
    shared_schema = create_model(f"{title}Shared", __base__=Params, **shared)
    per_model_schema = create_model(
        f"{title}PerModel", __base__=Params, __validators__=validators or None, **per_model
    )
    return shared_schema, per_model_schema, randomized


def merge_method(
    name: str,
    *,
    base: BaseUse = "optional",
    min_models: int = 1,
    max_models: int | None = None,
    paper: str = "",
    mergekit: str = "",
    check_model: Callable[[Any], None] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn`` as merge method ``name``; the function itself is returned unchanged.

    Its parameter schemas come from its annotated keyword-only parameters (see
    :func:`schemas`); ``generator`` marks a randomised method.
    """

    def decorator(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        shared, per_model, randomized = schemas(name, fn, check_model)
        METHODS.register(
            name,
            MergeMethod(
                name, fn, shared, per_model, base, min_models, max_models, randomized, paper, mergekit
            ),
            same=lambda old, new: old.fn is new.fn,
        )
        return fn

    return decorator


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; an unknown name lists the close ones."""
    return METHODS.get(name)


def list_methods(pattern: str = "*") -> list[str]:
    return METHODS.names(pattern)
