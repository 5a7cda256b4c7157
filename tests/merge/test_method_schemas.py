"""A method's parameters are declared once, by its annotated signature; the schemas follow it.

The expected schemas below are read from the signatures with ``inspect`` alone (the
function's defaults, and whether a parameter's annotation is a list: per-model), and the
expected error texts are pydantic's own words for the constraint, the field and the value.
"""

from __future__ import annotations

import inspect
import typing
from typing import Annotated

import pytest
import torch
from pydantic import Field, ValidationError

from modelfuse.config import describe, problems
from modelfuse.errors import ConfigError
from modelfuse.merge import get_method, list_methods
from modelfuse.merge.methods._base import PerModel, schemas


def declared(fn) -> tuple[dict, dict]:
    """(shared, per-model) name -> default (None when required), as the signature states them."""
    hints = typing.get_type_hints(fn, include_extras=False)  # PerModel[T] reads as list[T]
    shared, per_model = {}, {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.name == "generator":
            continue
        default = None if p.default is p.empty else p.default
        (per_model if typing.get_origin(hints[p.name]) is list else shared)[p.name] = default
    return shared, per_model


def fields(schema) -> dict:
    return {name: (None if f.is_required() else f.default) for name, f in schema.model_fields.items()}


@pytest.mark.parametrize("name", list_methods())
def test_schema_is_what_the_signature_says(name):
    m = get_method(name)
    shared, per_model = declared(m.fn)
    assert fields(m.shared) == shared
    assert fields(m.per_model) == per_model
    assert m.randomized == ("generator" in inspect.signature(m.fn).parameters)
    aliases = {f.alias for f in m.shared.model_fields.values() if f.alias}
    assert aliases == ({"lambda"} if "lambda_" in shared else set())


def test_a_few_schemas_by_hand():
    assert fields(get_method("ties").per_model) == {"weight": 1.0, "density": 1.0, "threshold": None}
    assert get_method("ties").shared_defaults() == {
        "lambda": 1.0, "normalize": True, "rescale": "none", "vote": "weighted", "trim": "tensor", "tie_break": "index"
    }
    assert get_method("slerp").shared_defaults() == {} and fields(get_method("slerp").shared) == {"t": None}
    assert get_method("della").per_model_defaults() == {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    assert get_method("magmax").shared_defaults() == {"lambda": 0.5}
    assert fields(get_method("sce").per_model) == {} and get_method("sce").shared_defaults() == {"select_topk": 1.0}


X, B = torch.ones(3), torch.zeros(3)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: get_method("ties")([X], B, models=[{"density": 1.5}]), "density: Input should be less than or equal to 1 (found 1.5)"),
        (lambda: get_method("ties")([X], B, models=[{"density": 0}]), "density: Input should be greater than 0 (found 0)"),
        (lambda: get_method("ties")([X], B, tie_break="random"), "tie_break: Input should be 'index' or 'sort' (found 'random')"),
        (lambda: get_method("ties")([X], B, rescale="l3"), "rescale: Input should be 'l1', 'l2', 'linf', 'inverse_density' or 'none' (found 'l3')"),
        (lambda: get_method("task_arithmetic")([X], B, **{"lambda": "big"}), "lambda: Input should be a valid number, unable to parse string as a number (found 'big')"),
        (lambda: get_method("slerp")([X], B, t=2), "t: Input should be less than or equal to 1 (found 2)"),
        (lambda: get_method("slerp")([X], B), "t: Field required"),
        (lambda: get_method("karcher")([X, X], max_iter=1.5), "max_iter: Input should be a valid integer, got a number with a fractional part (found 1.5)"),
        (lambda: get_method("magmax")([X], B, **{"lambda": float("inf")}), "lambda: Input should be a finite number (found inf)"),
        (lambda: get_method("ties")([X], B, models=[{"threshold": -1.0}]), "threshold: Input should be greater than or equal to 0 (found -1.0)"),
    ],
)
def test_bad_values_name_the_field_the_expectation_and_the_value(call, expected):
    with pytest.raises(ConfigError) as info:
        call()
    assert expected in str(info.value)
    assert "Valid parameters here:" in str(info.value)


def test_a_per_model_check_sees_the_fields_together():
    with pytest.raises(ConfigError, match=r"'della' model 0 parameters: .*density.*epsilon"):
        get_method("della")([X], B, models=[{"density": 0.1, "epsilon": 0.2}])


def toy(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 2.0,
    gain: PerModel[Annotated[float, Field(gt=0)]] = 1.0,
    lambda_: float = 0.5,
    mode: typing.Literal["a", "b"] = "a",
    t: Annotated[float, Field(ge=0, le=1)],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    return xs[0]


def test_schemas_come_from_the_annotations():
    shared, per_model, randomized = schemas("toy_method", toy)
    assert randomized
    assert fields(per_model) == {"weight": 2.0, "gain": 1.0}
    assert fields(shared) == {"lambda_": 0.5, "mode": "a", "t": None}
    assert shared.model_fields["lambda_"].alias == "lambda"
    assert shared.model_validate({"lambda": 2, "t": 0.5}).lambda_ == 2.0
    with pytest.raises(ValidationError):
        per_model.model_validate({"gain": 0})
    with pytest.raises(ValidationError):
        shared.model_validate({"t": 0.5, "extra": 1})


def test_an_unannotated_keyword_is_refused_at_registration():
    def bad(xs, base, *, t):
        return xs[0]

    with pytest.raises(TypeError, match="'t' has no type annotation"):
        schemas("bad", bad)


def test_one_formatter_names_path_expectation_and_found_value():
    shared, _, _ = schemas("toy_method", toy)
    with pytest.raises(ValidationError) as info:
        shared.model_validate({"t": 3, "mode": "c", "other": 1})
    found = problems(info.value)
    assert found["t"] == "Input should be less than or equal to 1 (found 3)"
    assert found["mode"] == "Input should be 'a' or 'b' (found 'c')"
    assert found["other"] == "Extra inputs are not permitted (found 1)"
    with_schema = problems(info.value, shared)
    assert with_schema["other"].startswith("unknown field (valid here: lambda_, mode, t")
    assert describe(info.value) == "; ".join(f"{k}: {v}" for k, v in found.items())
    with pytest.raises(ValidationError) as missing:
        shared.model_validate({})
    assert problems(missing.value) == {"t": "Field required"}
