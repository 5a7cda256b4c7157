"""The suite YAML: a pool builder, the bench methods run on it (in order, once per seed), its demo version.

::

    suite: seeds                      # the suite's name
    description: one line
    seeds: 3                          # default number of seeds (0..N-1); --seeds N overrides
    pool: {builder: digits_seeds, options: {members: 4, arch: cnn, epochs: 10}}
    methods:
      - {method: mean_prob}
      - {method: weight_average, name: "average (weight matching)", params: {align: weight_matching}}
    small: {options: {members: 3, epochs: 3}, methods: [mean_prob, "average (weight matching)"]}

Validated with pydantic through :func:`modelfuse.config.validate`: every problem names the file
and the field. Method and pool-builder names are checked against their registries (the error
lists the registered ones, close matches first), parameters against the registered function's
signature (the error lists the valid ones). The registries must be filled first:
:func:`load_suite` imports the built-in suites (:func:`load_builtin`) before validating.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import os
import pkgutil
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from modelfuse.bench._api import get_bench_method, get_pool_builder, info_of
from modelfuse.config import read_yaml, validate
from modelfuse.errors import ConfigError, FusionError
from modelfuse.registry import check_options

__all__ = [
    "MethodSpec",
    "PoolSpec",
    "SmallSpec",
    "SuiteSpec",
    "list_suites",
    "load_builtin",
    "load_suite",
    "recipe_hash",
]

SUITES_PACKAGE = "modelfuse.bench.suites"


def load_builtin() -> list[str]:
    """Import every module of :mod:`modelfuse.bench.suites` (each registers its pool builder and
    bench methods on import); returns the module names."""
    package = importlib.import_module(SUITES_PACKAGE)
    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")]
    for name in names:
        importlib.import_module(f"{SUITES_PACKAGE}.{name}")
    return names


def list_suites() -> list[str]:
    """The built-in suites: the names of the YAML files in :mod:`modelfuse.bench.suites`, sorted."""
    folder = resources.files(SUITES_PACKAGE)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def close_to(name: str, names: list[str]) -> str:
    """`` Did you mean 'x'?`` naming the close matches of ``name`` among ``names`` ("" where none)."""
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def _fits(what: str, fn: Any, options: dict[str, Any], fixed: tuple[str, ...]) -> None:
    """``options`` checked against ``fn``'s signature, the error turned into a validation error."""
    try:
        check_options(what, fn, options, fixed=fixed)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


#: what a registered name is, its registry lookup, the callable that takes its options and the
#: parameters the runner fills itself
_KINDS = {
    "pool builder": (get_pool_builder, lambda entry: entry, ("seed",)),
    "bench method": (get_bench_method, lambda entry: entry.fn, ("pool",)),
}


def _known(kind: str, name: str) -> str:
    """``name`` looked up in the registry of ``kind``; an unknown name lists the registered ones."""
    try:
        _KINDS[kind][0](name)
    except FusionError as exc:
        raise ValueError(exc.args[0] if exc.args else str(exc)) from None
    return name


def _options(kind: str, key: str, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    """``value``, the options of the ``kind`` named in field ``key``, checked against its signature."""
    if key in info.data:  # an unknown name was reported already
        get, fn, fixed = _KINDS[kind]
        _fits(f"{kind} {info.data[key]!r}", fn(get(info.data[key])), value, fixed)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PoolSpec(_Strict):
    """The pool builder (a registered name) and its options (checked against its signature)."""

    builder: str
    options: dict[str, Any] = Field(default_factory=dict)

    _known_builder = field_validator("builder")(lambda cls, v: _known("pool builder", v))
    _builder_options = field_validator("options")(
        lambda cls, v, info: _options("pool builder", "builder", v, info)
    )


class MethodSpec(_Strict):
    """One run of a registered bench method: its parameters and its display name (default: ``method``)."""

    method: str
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    _known_method = field_validator("method")(lambda cls, v: _known("bench method", v))
    _method_params = field_validator("params")(
        lambda cls, v, info: _options("bench method", "method", v, info)
    )

    @property
    def display(self) -> str:
        return self.name if self.name is not None else self.method


class SmallSpec(_Strict):
    """The demo's version of a suite: pool option overrides, the display names kept (None: all)."""

    options: dict[str, Any] = Field(default_factory=dict)
    methods: list[str] | None = None


class SuiteSpec(_Strict):
    """A whole suite file."""

    suite: str = Field(min_length=1)
    description: str = ""
    seeds: int = Field(1, ge=1)
    pool: PoolSpec
    methods: list[MethodSpec] = Field(min_length=1)
    small: SmallSpec | None = None
    #: where the suite came from (a file, a built-in suite), for messages
    _source: str = PrivateAttr("")

    @property
    def source(self) -> str:
        return self._source or f"suite {self.suite}"

    @field_validator("methods")
    @classmethod
    def _names_differ(cls, value: list[MethodSpec]) -> list[MethodSpec]:
        names = [m.display for m in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"display names must differ (found {', '.join(map(repr, repeated))} more than once); "
                "give repeated methods a `name`"
            )
        return value

    @field_validator("small")
    @classmethod
    def _small_fits(cls, value: SmallSpec | None, info: ValidationInfo) -> SmallSpec | None:
        if value is None:
            return value
        methods = info.data.get("methods")
        if value.methods is not None and methods is not None:
            names = [m.display for m in methods]
            for name in value.methods:
                if name not in names:
                    hint = close_to(name, names)
                    raise ValueError(
                        f"methods: {name!r} is not a display name of this suite (found {name!r}).{hint} "
                        f"Display names: {', '.join(names)}"
                    )
        pool = info.data.get("pool")
        if pool is not None:
            merged = {**pool.options, **value.options}
            _fits(
                f"options: pool builder {pool.builder!r}", get_pool_builder(pool.builder), merged, ("seed",)
            )
        return value

    def resolved(self, small: bool = False) -> SuiteSpec:
        """The suite as it runs: with ``small``, the pool options overridden and the methods kept
        as its ``small`` section says (a suite without one runs whole); ``small`` dropped."""
        if not small or self.small is None:
            return self.model_copy(update={"small": None})
        keep = self.small.methods
        methods = [m for m in self.methods if keep is None or m.display in keep]
        pool = self.pool.model_copy(update={"options": {**self.pool.options, **self.small.options}})
        return self.model_copy(update={"pool": pool, "methods": methods, "small": None})

    def recipe(self, entry: MethodSpec, seed: int) -> dict[str, Any]:
        """The exact recipe of one record: the suite entry, the pool and the seed (JSON-serialisable)."""
        return {
            "suite": self.suite,
            "method": entry.method,
            "name": entry.display,
            "params": info_of(entry.params),
            "pool": {"builder": self.pool.builder, "options": info_of(self.pool.options)},
            "seed": seed,
        }

    def identity(self) -> dict[str, Any]:
        """What two runs must share to write into one results folder: everything but the seed count."""
        data = self.resolved().model_dump(mode="json", exclude={"seeds", "description", "small"})
        return json.loads(json.dumps(data, default=repr))


def recipe_hash(recipe: dict[str, Any]) -> str:
    """A short stable hash of a recipe (sha256 of its canonical JSON)."""
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_suite(name_or_path: str | os.PathLike) -> SuiteSpec:
    """A suite (its ``source`` says where it came from): a built-in suite's name (``seeds``) or a YAML file's path.

    Imports the built-in suites first, so their methods and pool builders are registered.
    """
    load_builtin()
    text = str(name_or_path)
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file() or os.sep in text or "/" in text:
        return _validated(read_yaml(path, "suite"), str(path))
    builtin = list_suites()
    if text not in builtin:
        hint = close_to(text, builtin)
        raise ConfigError(
            f"unknown suite {text!r}: neither a built-in suite nor a YAML file.{hint} "
            f"Built-in suites: {', '.join(builtin) or '(none)'}; or give the path of a suite YAML"
        )
    source = f"built-in suite {text} ({SUITES_PACKAGE}/{text}.yaml)"
    with resources.as_file(resources.files(SUITES_PACKAGE).joinpath(f"{text}.yaml")) as file:
        data = read_yaml(file, "suite")
    return _validated(data, source)


def _validated(data: Any, source: str) -> SuiteSpec:
    suite = validate(SuiteSpec, data, source, "suite")
    suite._source = source
    return suite
