"""YAML configuration files: reading them with positioned syntax errors, and turning pydantic's
validation errors into one message that names the file, the field path and what is valid.

Every command that takes a YAML file (``merge``, ``fuse-features``) validates it with one
pydantic schema and reports problems through these helpers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from modelfuse.errors import ConfigError


def read_yaml(path: str | os.PathLike, what: str = "recipe") -> Any:
    """The parsed YAML of ``path``; a missing file or a syntax error (with line and column) is a ConfigError."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist (or is not a file)")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{file}: YAML syntax error{where}: {exc.problem}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read the {what} ({exc})") from None


_TYPE_TAGS = frozenset({"bool", "int", "float", "str", "dict", "list", "tuple", "none"})


def location(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as a field path: ``("branches", 0, "tap")`` -> ``branches[0].tap``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in str(part) or str(part).startswith("function-"):
            continue  # pydantic's labels of union members ("float", "list[float]") say nothing to a user
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def shown(value: Any) -> str:
    """A value as it appears in an error message, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def valid_fields(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The fields allowed where an unknown field was found (``loc`` ends with the unknown one)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = schema.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        nested += [
            b
            for a in inner
            for b in getattr(a, "__args__", ())
            if isinstance(b, type) and issubclass(b, BaseModel)
        ]
        if not nested:
            return []
        schema = nested[0]
    return list(schema.model_fields)


def problems(
    exc: ValidationError,
    schema: type[BaseModel] | None = None,
    *,
    message: Callable[[Any], tuple[str, str] | None] | None = None,
) -> dict[str, str]:
    """Field path -> message for each of pydantic's errors (the first per path): what was expected
    and ``(found X)``. The one formatter of validation errors in modelfuse.

    With ``schema``, an unknown field says so and lists the fields valid at its place. ``message``
    may replace the (path, message) of an error (given pydantic's error dict; None keeps the default).
    """
    seen: dict[str, str] = {}
    for err in exc.errors():
        custom = message(err) if message is not None else None
        if custom is not None:
            seen.setdefault(*custom)
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and schema is not None:
            msg = "unknown field"
            valid = valid_fields(schema, err["loc"])
            if valid:
                msg += f" (valid here: {', '.join(valid)})"
        elif err["type"] != "missing" and not (err["type"] == "value_error" and "found" in msg):
            msg += f" (found {shown(err['input'])})"  # a validator's own message may say it already
        seen.setdefault(location(err["loc"]), msg)
    return seen


def describe(exc: ValidationError, schema: type[BaseModel] | None = None, **kwargs: Any) -> str:
    """:func:`problems` as one line: ``path: message; path: message``."""
    return "; ".join(f"{where}: {msg}" for where, msg in problems(exc, schema, **kwargs).items())


def validate(schema: type[BaseModel], data: Any, source: str, what: str = "recipe") -> Any:
    """``schema`` validated from ``data``; every problem in one ConfigError naming ``source`` and the fields."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a {what} is a mapping of fields; found {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid {what}: {describe(exc, schema)}") from None
