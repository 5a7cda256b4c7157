"""Merge recipes: mergekit's YAML format, validated by one pydantic schema.

A recipe names a ``merge_method``, the models (``models:``) or layer ranges
(``slices:``), an optional ``base_model``, parameters at the top, slice and model
levels, and output settings (``dtype``, ``out_dtype``, ``tokenizer_source``). mergekit's
files are read unchanged; errors name the file, the field path and what would be valid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from modelfuse.config import describe, location, read_yaml, shown
from modelfuse.errors import ConfigError

Scalar = Union[bool, int, float, str]  # noqa: UP007  (pydantic reads the union in this order)
Gradient = list[float]


class Condition(BaseModel):
    """One ``{filter, value}`` entry: applies where ``filter`` is a substring of the tensor name."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Union[Scalar, Gradient]  # noqa: UP007


#: a parameter's setting: a scalar, a gradient over layer depth, or filtered conditions
ParamValue = Union[Scalar, Gradient, list[Condition]]  # noqa: UP007


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end, found {list(value)}")
        return value


class Slice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    base_model: str | None = None
    merge_method: str | None = None


class TokenizerSettings(_Strict):
    source: str | None = None
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class Recipe(_Strict):
    """A merge recipe (mergekit's format). Exactly one of ``models`` and ``slices``."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    modules: dict[str, Any] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> Recipe:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a recipe needs exactly one of 'models', 'slices' or 'modules'; found "
                f"{', '.join(given) if given else 'none of them'}"
            )
        if self.modules is not None:
            raise ValueError(
                "'modules' (mergekit's multi-module recipes) is not supported yet; "
                "write one recipe per module with 'models' or 'slices'"
            )
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty: list at least one model")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty: list at least one slice")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer.source', not both")
        return self

    @property
    def tokenizer_from(self) -> str | None:
        """Where tokenizer files come from: ``base``, a model, or None (the base, else the first model)."""
        if self.tokenizer is not None and self.tokenizer.source is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def model_names(self) -> list[str]:
        """Every model the recipe reads, base first, in order of first mention."""
        seen: list[str] = []
        if self.base_model:
            seen.append(self.base_model)
        if self.models is not None:
            seen += [m.model for m in self.models]
        for s in self.slices or []:
            seen += [src.model for src in s.sources]
            if s.base_model:
                seen.append(s.base_model)
        return list(dict.fromkeys(seen))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict; errors name ``source``, the field path and what is valid."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a recipe is a mapping with merge_method, models or slices, ...; "
            f"found {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid recipe: {describe(exc, Recipe, message=_parameter_value)}") from None


def _parameter_value(err: Any) -> tuple[str, str] | None:
    """A bad parameter value gets one message at the parameter (not one per member of the union)."""
    loc = err["loc"]
    if "parameters" not in loc[:-1] or err["type"] == "extra_forbidden":
        return None
    return location(loc[: loc.index("parameters") + 2]), (
        "a parameter value is a number, a boolean, a gradient (a list of numbers) or a list "
        f"of {{filter, value}} conditions; found {shown(err['input'])}"
    )


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe file; YAML syntax errors give the line and column."""
    return parse_recipe(read_yaml(path), str(Path(path)))
