"""From a recipe to a per-tensor plan: which inputs, which method, which parameter values.

Nothing is computed here and no tensor data is read (shapes and dtypes come from the
checkpoints' headers), so ``--plan`` and ``--dry-run`` are instant and every mismatch
(keys, shapes, architectures, parameters) is reported before the first byte is written.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelfuse.errors import ConfigError
from modelfuse.io import Checkpoint, open_checkpoint
from modelfuse.io.writer import parse_dtype
from modelfuse.layers import check_layer_range
from modelfuse.merge.methods import MergeMethod, get_method
from modelfuse.merge.params import (
    LAYER_COUNT_KEYS,
    candidate_values,
    count_layers,
    depth,
    is_pre_layer,
    layer_index,
    lookup,
    with_layer,
)
from modelfuse.merge.recipe import ModelEntry, Recipe

#: mergekit parameters accepted for compatibility that cannot change the result (memory only)
NO_EFFECT = frozenset({"int8_mask"})
MISSING_POLICIES = ("error", "copy-base", "skip")


@dataclass
class TensorTask:
    """One output tensor: its method, input tensors (model id, name), resolved parameters, form."""

    out: str
    method: MergeMethod
    xs: list[tuple[str, str]]
    base: tuple[str, str] | None
    per_model: list[dict[str, Any]]
    shared: dict[str, Any]
    shape: tuple[int, ...]
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    t: float
    copy_from: tuple[str, str] | None = None  # copied unchanged instead of merged

    @property
    def inputs(self) -> list[tuple[str, str]]:
        """Every (model, tensor) this task reads."""
        if self.copy_from is not None:
            return [self.copy_from]
        return [*self.xs, *([self.base] if self.base else [])]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.out_dtype.itemsize


@dataclass
class MergePlan:
    """Every output tensor's task, the opened input checkpoints and what to write beside the weights."""

    recipe: Recipe
    models: dict[str, Checkpoint]
    base: str | None
    tasks: list[TensorTask]
    config: dict[str, Any] | None
    config_from: str | None
    tokenizer_from: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tasks)

    def input_paths(self) -> list[Path]:
        out: list[Path] = []
        for ck in self.models.values():
            out += [p for p in (ck.path, ck.folder) if p is not None]
        return out

    def close(self) -> None:
        for ck in self.models.values():
            ck.close()


def open_model(ref: str, recipe_dir: Path | None = None) -> Checkpoint:
    """Open a recipe's model reference: a local path (relative to the working directory or the recipe)."""
    candidates = [Path(ref).expanduser()]
    if recipe_dir is not None and not Path(ref).is_absolute():
        candidates.append(recipe_dir / ref)
    for path in candidates:
        if path.exists():
            return open_checkpoint(path)
    if "/" in ref and not ref.startswith((".", "/", "~")) and ref.count("/") == 1:
        return open_checkpoint(_from_hub(ref))
    tried = " or ".join(str(p) for p in candidates)
    raise ConfigError(f"model {ref!r} not found: no file or folder at {tried}")


def _from_hub(repo_id: str) -> str:
    """Download a Hugging Face hub model's weights and config files (needs huggingface_hub and a network)."""
    from modelfuse._optional import require

    hub = require("huggingface_hub", f"downloading {repo_id!r} from the Hugging Face hub")
    patterns = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
    return hub.snapshot_download(repo_id, allow_patterns=patterns)


class IgnoredParameterWarning(UserWarning):
    """A recipe sets a parameter the merge method does not use; it is ignored, as mergekit ignores it."""


def known_parameters() -> dict[str, list[str]]:
    """Every parameter name some registered method takes (aliases as written in recipes) -> those methods."""
    from modelfuse.merge.methods import METHODS

    known: dict[str, list[str]] = {key: [] for key in NO_EFFECT}
    for name in METHODS.names():
        m = METHODS.get(name)
        for schema in (m.shared, m.per_model):
            for field_name, f in schema.model_fields.items():
                known.setdefault(f.alias or field_name, []).append(name)
    return known


def _check_names(method: MergeMethod, params: Mapping[str, Any], where: str, model_level: bool) -> list[str]:
    """Validate a parameter block's names and every value it can produce; returns notes.

    A name this method does not take but another registered method does (``weight`` under
    ``sce``) is ignored with an :class:`IgnoredParameterWarning`, as mergekit ignores it; a
    name no method knows is an error listing the valid ones and the close matches.
    """
    notes = []
    shared, per_model = set(method.shared.model_fields), set(method.per_model.model_fields)
    aliases = {f.alias: n for n, f in method.shared.model_fields.items() if f.alias}
    aliases.update({f.alias: n for n, f in method.per_model.model_fields.items() if f.alias})
    for key, value in params.items():
        name = aliases.get(key, key)
        if key in NO_EFFECT:
            continue
        if name in per_model:
            for v in candidate_values(value):
                method.check_per_model({key: v}, f"{where}.{key}")
        elif name in shared:
            if model_level:
                notes.append(
                    f"{where}.{key} is a shared parameter of {method.name!r}; under a model it is ignored "
                    "(as in mergekit): put it under the top-level 'parameters'"
                )
                continue
            for v in candidate_values(value):
                method.check_shared({key: v}, f"{where}.{key}")
        else:
            known = known_parameters()
            if key in known:
                users = ", ".join(known[key][:4]) + (" ..." if len(known[key]) > 4 else "")
                warnings.warn(
                    IgnoredParameterWarning(
                        f"{where}.{key}: merge method {method.name!r} does not use parameter {key!r} "
                        f"(a parameter of {users}); it is ignored, as mergekit ignores it"
                    ),
                    stacklevel=2,
                )
                continue
            valid = sorted(
                [method.shared.model_fields[n].alias or n for n in shared]
                + [method.per_model.model_fields[n].alias or n for n in per_model]
            )
            close = difflib.get_close_matches(str(key), [*valid, *known], n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, dict.fromkeys(close)))}?" if close else ""
            raise ConfigError(
                f"{where}.{key}: merge method {method.name!r} has no parameter {key!r} and no registered "
                f"method knows it; valid: {', '.join(valid) or '(none)'}.{hint}"
            )
    return notes


def _resolve(schema: Any, levels: list[Mapping[str, Any]], name: str, t: float) -> dict[str, Any]:
    """The values a parameter schema's fields take for tensor ``name`` at depth ``t`` (unset ones left out)."""
    out = {}
    for key, f in schema.model_fields.items():
        label = f.alias or key
        value = lookup(label, levels, name, t, _UNSET)
        if value is _UNSET and label != key:
            value = lookup(key, levels, name, t, _UNSET)
        if value is not _UNSET:
            out[label] = value
    return out


def _per_model(method: MergeMethod, levels: list[Mapping[str, Any]], name: str, t: float) -> dict[str, Any]:
    return _resolve(method.per_model, levels, name, t)


def _shared(method: MergeMethod, levels: list[Mapping[str, Any]], name: str, t: float) -> dict[str, Any]:
    return _resolve(method.shared, levels, name, t)


_UNSET = object()


def _architecture(ck: Checkpoint) -> tuple[Any, Any]:
    config = ck.config or {}
    return config.get("model_type"), tuple(config.get("architectures") or ())


def _dtypes(
    models: Mapping[str, Checkpoint], inputs: list[tuple[str, str]], recipe: Recipe, ref: tuple[str, str]
):
    forced = parse_dtype(recipe.dtype)
    found = {models[m].dtype(n) for m, n in inputs}
    ref_dtype = models[ref[0]].dtype(ref[1])
    if not ref_dtype.is_floating_point:
        return ref_dtype, ref_dtype
    if forced is not None:
        compute = forced
    elif len(found) == 1:
        compute = found.pop()
    else:
        compute = torch.float32
    out = parse_dtype(recipe.out_dtype) or forced or ref_dtype
    return compute, out


def _shape_error(
    models: Mapping[str, Checkpoint], name_of: dict[str, str], shapes: dict[str, tuple]
) -> ConfigError:
    listing = ", ".join(f"{m}: {name_of[m]} {tuple(s)}" for m, s in shapes.items())
    distinct = list({tuple(s) for s in shapes.values()})
    vocab = {m: (models[m].config or {}).get("vocab_size") for m in shapes}
    if (
        len(distinct) == 2
        and all(len(s) == len(distinct[0]) for s in distinct)
        and distinct[0][1:] == distinct[1][1:]
        and any(s[0] in vocab.values() for s in distinct)
    ):
        return ConfigError(
            f"tensor shapes differ in the vocabulary dimension ({listing}): the models have different "
            "vocabulary sizes. Merge models that share one tokenizer, or resize the embeddings first "
            "(transformers: model.resize_token_embeddings(n)) so every model has the same vocabulary"
        )
    return ConfigError(f"tensor shapes differ: {listing}; only same-shaped tensors can be merged")


def build_plan(
    recipe: Recipe,
    *,
    models: Mapping[str, Checkpoint] | None = None,
    recipe_dir: str | os.PathLike | None = None,
    missing: str = "error",
    allow_architecture_mismatch: bool = False,
) -> MergePlan:
    """Resolve ``recipe`` against its models into one :class:`TensorTask` per output tensor.

    ``models`` maps the recipe's model references to already opened checkpoints (the
    Python API passes in-memory ones); others are opened from disk. ``missing`` says what
    to do with tensors some models lack: ``error``, ``copy-base`` (copy the base's or the
    first model's) or ``skip`` (leave them out).
    """
    if missing not in MISSING_POLICIES:
        raise ConfigError(f"missing must be one of {', '.join(MISSING_POLICIES)}; found {missing!r}")
    method = get_method(recipe.merge_method)
    folder = Path(recipe_dir) if recipe_dir is not None else None
    opened = dict(models or {})
    try:
        for ref in recipe.model_names():
            if ref not in opened:
                opened[ref] = open_model(ref, folder)
        plan = _plan(recipe, method, opened, missing, allow_architecture_mismatch)
    except BaseException:
        for ref, ck in opened.items():
            if models is None or ref not in models:
                ck.close()
        raise
    return plan


def _plan(
    recipe: Recipe,
    method: MergeMethod,
    models: dict[str, Checkpoint],
    missing: str,
    allow_mismatch: bool,
) -> MergePlan:
    notes: list[str] = []
    notes += _check_names(method, recipe.parameters, "parameters", model_level=False)
    for i, entry in enumerate(recipe.models or []):
        notes += _check_names(method, entry.parameters, f"models[{i}].parameters", model_level=True)
    for i, sl in enumerate(recipe.slices or []):
        if sl.merge_method not in (None, recipe.merge_method):
            raise ConfigError(
                f"slices[{i}].merge_method: {sl.merge_method!r} differs from the recipe's "
                f"{recipe.merge_method!r}; one method per recipe is supported"
            )
        notes += _check_names(method, sl.parameters, f"slices[{i}].parameters", model_level=False)
        for j, src in enumerate(sl.sources):
            notes += _check_names(
                method, src.parameters, f"slices[{i}].sources[{j}].parameters", model_level=True
            )

    base = recipe.base_model
    if method.base == "required" and base is None:
        raise ConfigError(
            f"merge method {method.name!r} needs a base model: add 'base_model: PATH' to the recipe "
            "(the model the others were fine-tuned from)"
        )
    if method.base == "none" and base is not None and recipe.models is not None:
        if base not in [m.model for m in recipe.models]:
            notes.append(
                f"merge method {method.name!r} has no base role: base_model {base!r} is one more input "
                "model, as in mergekit (remove base_model to leave it out)"
            )
    elif method.base == "none" and base is not None:
        notes.append(
            f"merge method {method.name!r} has no base role: with slices, base_model {base!r} is merged "
            "only where a slice lists it among its sources (as in mergekit)"
        )

    if not allow_mismatch:
        archs = {ref: _architecture(ck) for ref, ck in models.items() if ck.config}
        if len(set(archs.values())) > 1:
            listing = "; ".join(
                f"{ref}: model_type={a[0]!r}, architectures={list(a[1])}" for ref, a in archs.items()
            )
            raise ConfigError(
                f"the models' config.json files name different architectures ({listing}); pass "
                "--allow-architecture-mismatch (allow_architecture_mismatch=True) if that is intended"
            )

    config_from = base if base is not None else recipe.model_names()[0]
    tokenizer_from = recipe.tokenizer_from
    if tokenizer_from in (None, "base"):
        tokenizer_from = config_from
    elif tokenizer_from == "union":
        raise ConfigError(
            "tokenizer_source 'union' (building a merged vocabulary) is not supported; use 'base' or "
            "the path of one of the models"
        )
    elif tokenizer_from not in models:
        raise ConfigError(
            f"tokenizer_source {tokenizer_from!r} is not one of the recipe's models "
            f"({', '.join(models)}); use 'base' or one of them"
        )
    config = dict(models[config_from].config) if models[config_from].config else None

    if recipe.models is not None:
        tasks = _plan_models(recipe, method, models, base, missing, notes)
    else:
        tasks, total = _plan_slices(recipe, method, models, base, missing, notes)
        if config is not None:
            keys = [k for k in LAYER_COUNT_KEYS if k in config]
            for key in keys:
                config[key] = total
            if not keys:
                notes.append("config.json has no layer-count field to rewrite for the stacked layers")
    return MergePlan(recipe, models, base, tasks, config, config_from, tokenizer_from, notes)


def _plan_models(
    recipe: Recipe,
    method: MergeMethod,
    models: dict[str, Checkpoint],
    base: str | None,
    missing: str,
    notes: list[str],
) -> list[TensorTask]:
    assert recipe.models is not None
    entries = [m for m in recipe.models if method.base == "none" or m.model != base]
    if method.base == "none" and base is not None:
        entries = _with_base_input(method, entries, base)
    if not entries:
        raise ConfigError(
            f"merge method {method.name!r} needs models besides the base; 'models' lists only the base"
        )
    use_base = base if method.base != "none" else None
    ref = base if base is not None else entries[0].model
    names = models[ref].keys()
    layers = count_layers(names, models[ref].config)
    involved = list(dict.fromkeys([*([use_base] if use_base else []), *(m.model for m in entries)]))
    _check_key_sets(models, involved, ref, missing, notes)
    method.check_count(len(entries), "models")
    tasks = []
    for name in names:
        if not all(name in models[m] for m in involved):
            if missing == "skip":
                continue
            tasks.append(_copy_task(models, ref, name, recipe, method))
            continue
        t = depth(layer_index(name), layers)
        xs = [(m.model, name) for m in entries]
        per_model = [_per_model(method, [m.parameters, recipe.parameters], name, t) for m in entries]
        shared = _shared(method, [recipe.parameters], name, t)
        tasks.append(
            _task(
                models,
                name,
                method,
                xs,
                (use_base, name) if use_base else None,
                per_model,
                shared,
                t,
                recipe,
                ref,
            )
        )
    return tasks


def _with_base_input(method: MergeMethod, entries: list[ModelEntry], base: str) -> list[ModelEntry]:
    """The inputs of a method without a base role when the recipe names a base model: mergekit 0.1.5
    merges the base as one more input, appended after the models unless listed among them. Its
    per-model parameters come from the levels above the models (the top-level ``parameters``)."""
    others = [m for m in entries if m.model != base]
    if method.max_models is not None and len(others) + 1 > method.max_models:
        raise ConfigError(
            f"merge method {method.name!r} takes at most {method.max_models} model(s), and with "
            f"base_model {base!r} the base is one more input ({len(others) + 1} in all; mergekit refuses "
            "this recipe as well): remove base_model, or list only the base under models"
        )
    if len(others) < len(entries):
        return entries
    return [*entries, ModelEntry(model=base)]


def _plan_slices(
    recipe: Recipe,
    method: MergeMethod,
    models: dict[str, Checkpoint],
    base: str | None,
    missing: str,
    notes: list[str],
) -> tuple[list[TensorTask], int]:
    assert recipe.slices is not None
    tasks: list[TensorTask] = []
    offset = 0
    plans: list[tuple[Any, list[Any], Any, str]] = []
    for i, sl in enumerate(recipe.slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            ranges = ", ".join(f"{s.model}: {list(s.layer_range)}" for s in sl.sources)
            raise ConfigError(f"slices[{i}]: the sources' layer ranges differ in length ({ranges})")
        for j, src in enumerate(sl.sources):
            ck = models[src.model]
            n = count_layers(ck.keys(), ck.config)
            check_layer_range(
                src.layer_range, n, f"slices[{i}].sources[{j}].layer_range", model=f"model {src.model!r}"
            )
        slice_base = sl.base_model or base
        base_src = (
            next((s for s in sl.sources if s.model == slice_base), None) if method.base != "none" else None
        )
        if method.base == "required" and base_src is None:
            raise ConfigError(
                f"slices[{i}]: merge method {method.name!r} needs the base model {slice_base!r} among "
                "the slice's sources (with its layer range)"
            )
        others = [s for s in sl.sources if s is not base_src]
        if not others:
            others = [base_src]
            base_src = None
        method.check_count(len(others), f"slices[{i}]")
        plans.append((sl, others, base_src, sl.sources[0].model))
    for sl, others, base_src, first in plans:
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        ck = models[first]
        start = sl.sources[0].layer_range[0]
        templates = [n for n in ck if layer_index(n) == start]
        for k in range(length):
            t = depth(k, length)
            for template in templates:
                out = with_layer(template, offset + k)

                def name_in(src, _template=template, _k=k):
                    return with_layer(_template, src.layer_range[0] + _k)

                xs = [(s.model, name_in(s)) for s in others]
                for m, n in xs + ([(base_src.model, name_in(base_src))] if base_src else []):
                    if n not in models[m]:
                        raise ConfigError(
                            f"model {m!r} has no tensor {n!r}, which the slice's layer range needs "
                            f"(for output tensor {out!r})"
                        )
                per_model = [
                    _per_model(method, [s.parameters, sl.parameters, recipe.parameters], xs[q][1], t)
                    for q, s in enumerate(others)
                ]
                shared = _shared(method, [sl.parameters, recipe.parameters], out, t)
                b = (base_src.model, name_in(base_src)) if base_src else None
                ref = b or xs[0]
                tasks.append(
                    _task(models, out, method, xs, b, per_model, shared, t, recipe, ref, ref_name=ref[1])
                )
        offset += length
    # tensors outside the layers: embeddings from the first slice's sources, the rest from the last's
    first, last = plans[0], plans[-1]
    ref_model = first[3]
    for name in models[ref_model]:
        if layer_index(name) is not None:
            continue
        sl, others, base_src, _ = first if is_pre_layer(name) else last
        xs = [(s.model, name) for s in others]
        involved = [m for m, _ in xs] + ([base_src.model] if base_src else [])
        if not all(name in models[m] for m in involved):
            if missing == "error":
                lacking = [m for m in involved if name not in models[m]]
                raise ConfigError(
                    f"tensor {name!r} is missing from {', '.join(lacking)}; pass --missing copy-base "
                    "or --missing skip to merge anyway"
                )
            if missing == "skip":
                continue
            tasks.append(_copy_task(models, ref_model, name, recipe, method))
            continue
        per_model = [
            _per_model(method, [s.parameters, sl.parameters, recipe.parameters], name, 0.0) for s in others
        ]
        shared = _shared(method, [sl.parameters, recipe.parameters], name, 0.0)
        b = (base_src.model, name) if base_src else None
        tasks.append(_task(models, name, method, xs, b, per_model, shared, 0.0, recipe, b or xs[0]))
    return tasks, offset


def _check_key_sets(
    models: dict[str, Checkpoint], involved: list[str], ref: str, missing: str, notes: list[str]
) -> None:
    keys = {m: set(models[m].keys()) for m in involved}
    union = set().union(*keys.values())
    lacking = {m: sorted(union - k) for m, k in keys.items() if union - k}
    if not lacking:
        return
    listing = "; ".join(
        f"{m} lacks {len(v)}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for m, v in lacking.items()
    )
    if missing == "error":
        raise ConfigError(
            f"the models hold different tensors ({listing}); pass --missing copy-base (copy those "
            "from the base or first model) or --missing skip (leave them out)"
        )
    extra = sorted(union - keys[ref])
    notes.append(f"tensors not in every model, handled by --missing {missing}: {listing}")
    if extra:
        notes.append(f"{len(extra)} tensor(s) absent from {ref} are left out: {', '.join(extra[:5])}")


def _task(
    models: dict[str, Checkpoint],
    out: str,
    method: MergeMethod,
    xs: list[tuple[str, str]],
    base: tuple[str, str] | None,
    per_model: list[dict[str, Any]],
    shared: dict[str, Any],
    t: float,
    recipe: Recipe,
    ref: Any,
    ref_name: str | None = None,
) -> TensorTask:
    ref_pair = ref if isinstance(ref, tuple) else (ref, ref_name or out)
    inputs = xs + ([base] if base else [])
    shapes = {f"{m}": models[m].shape(n) for m, n in inputs}
    if len(set(shapes.values())) > 1:
        raise _shape_error(models, dict(inputs), shapes)
    compute, out_dtype = _dtypes(models, inputs, recipe, ref_pair)
    shape = tuple(models[ref_pair[0]].shape(ref_pair[1]))
    task = TensorTask(out, method, xs, base, per_model, shared, shape, compute, out_dtype, t)
    if not compute.is_floating_point:
        task.copy_from = ref_pair  # integer buffers (position ids, counters) are copied, not averaged
    return task


def _copy_task(
    models: dict[str, Checkpoint], ref: str, name: str, recipe: Recipe, method: MergeMethod
) -> TensorTask:
    dtype = models[ref].dtype(name)
    out = (
        (parse_dtype(recipe.out_dtype) or parse_dtype(recipe.dtype) or dtype)
        if dtype.is_floating_point
        else dtype
    )
    return TensorTask(
        name, method, [], None, [], {}, tuple(models[ref].shape(name)), dtype, out, 0.0, copy_from=(ref, name)
    )
