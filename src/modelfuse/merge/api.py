"""The Python API of parameter fusion: recipe files, in-memory state dicts and modules."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.io import DEFAULT_SHARD_SIZE, open_checkpoint
from modelfuse.merge.executor import run_tasks, write_merge
from modelfuse.merge.plan import MergePlan, build_plan
from modelfuse.merge.recipe import Recipe, load_recipe, parse_recipe


def _recipe_and_text(
    recipe: str | os.PathLike | Mapping[str, Any] | Recipe,
) -> tuple[Recipe, str, Path | None]:
    import yaml

    if isinstance(recipe, Recipe):
        data = recipe.model_dump(exclude_none=True, exclude_defaults=True)
        return recipe, yaml.safe_dump(data, sort_keys=False), None
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe)), yaml.safe_dump(dict(recipe), sort_keys=False), None
    path = Path(recipe)
    parsed = load_recipe(path)
    return parsed, path.read_text(encoding="utf-8"), path.resolve().parent


def plan_merge(
    recipe: str | os.PathLike | Mapping[str, Any] | Recipe,
    *,
    missing: str = "error",
    allow_architecture_mismatch: bool = False,
) -> MergePlan:
    """Validate a recipe against its models and return the per-tensor plan (nothing computed)."""
    parsed, _, folder = _recipe_and_text(recipe)
    return build_plan(
        parsed, recipe_dir=folder, missing=missing, allow_architecture_mismatch=allow_architecture_mismatch
    )


def merge(
    recipe: str | os.PathLike | Mapping[str, Any] | Recipe,
    out: str | os.PathLike,
    *,
    force: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
    out_shard_size: int | str = DEFAULT_SHARD_SIZE,
    missing: str = "error",
    allow_architecture_mismatch: bool = False,
    progress: bool | None = None,
    torch_threads: int | str | None = None,
    freeze_gc: bool = False,
    drop_cache: bool = False,
) -> Path:
    """Merge the models of a recipe (a YAML file in mergekit's format, a dict or a Recipe) into ``out``.

    Writes a Hugging Face folder atomically: safetensors shards + index, config.json,
    tokenizer files and a README.md model card that quotes the recipe. Returns ``out``.

    The process is left as it was unless asked: ``torch_threads`` (None: torch's setting;
    ``"auto"``: one core fewer than the process may use, leaving one to the reader and
    writer threads; or a number) and ``freeze_gc`` (``gc.freeze`` for the run) hold only
    during the call; ``drop_cache`` drops the output's pages from the page cache soon after
    they are written (the output then does not push the inputs out of the cache, but
    loading it right after the merge reads from disk). ``modelfuse merge`` turns on the
    first two and, unless ``--keep-cache``, the third.

    A recipe of a data-driven method (``fisher``, ``regmean``, ``adamerging``,
    ``greedy_soup``, with ``architecture:`` and ``data:`` sections) runs through
    :func:`modelfuse.merge.data_recipes.merge_with_data` instead (``force`` and ``device``
    apply; ``out`` ending in ``.safetensors`` is one file, otherwise a folder).
    """
    from modelfuse.merge.data_recipes import is_data_recipe, merge_with_data

    if not isinstance(recipe, Recipe) and is_data_recipe(recipe):
        # fisher, regmean, adamerging, greedy_soup: whole models run on data, not the streaming executor
        return merge_with_data(recipe, out, force=force, device=device).out
    parsed, text, folder = _recipe_and_text(recipe)
    plan = build_plan(
        parsed, recipe_dir=folder, missing=missing, allow_architecture_mismatch=allow_architecture_mismatch
    )
    try:
        return write_merge(
            plan,
            out,
            recipe_text=text,
            force=force,
            seed=seed,
            device=device,
            out_shard_size=out_shard_size,
            progress=progress,
            torch_threads=torch_threads,
            freeze_gc=freeze_gc,
            drop_cache=drop_cache,
        )
    finally:
        plan.close()


def merge_state_dicts(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor] | nn.Module],
    base: Mapping[str, torch.Tensor] | nn.Module | None = None,
    *,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | torch.device = "cpu",
    missing: str = "error",
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (or modules' weights) with a registered method; returns a state dict.

    ``model_params`` gives each model its own parameters (``[{"weight": 0.7}, ...]``);
    other keyword arguments are the method's shared parameters (``t=0.5``, ``density=0.3``
    applies to every model). Parameter values may be filters and gradients as in recipes.
    As in a recipe's ``base_model``, ``base`` is one more input of the methods without a base
    role (``linear``, ``karcher``; its per-model parameters are the keyword arguments), and
    parameters a method does not use but another does are ignored with an
    :class:`~modelfuse.merge.IgnoredParameterWarning`.
    """
    if not models:
        raise ConfigError("merge_state_dicts needs at least one model")
    if model_params is not None and len(model_params) != len(models):
        raise ConfigError(f"model_params has {len(model_params)} entries for {len(models)} models")
    refs = {f"model_{i}": m for i, m in enumerate(models)}
    if base is not None:
        refs = {"base": base, **refs}
    entries = [
        {"model": ref, "parameters": dict(model_params[i]) if model_params else {}}
        for i, ref in enumerate(r for r in refs if r != "base")
    ]
    recipe = parse_recipe(
        {
            "merge_method": method,
            "base_model": "base" if base is not None else None,
            "models": entries,
            "parameters": params,
            "dtype": dtype,
        },
        source=f"merge_state_dicts({method!r})",
    )
    checkpoints = {ref: open_checkpoint(m) for ref, m in refs.items()}
    plan = build_plan(recipe, models=checkpoints, missing=missing, allow_architecture_mismatch=True)
    out: dict[str, torch.Tensor] = {}
    run_tasks(plan, out.__setitem__, seed=seed, device=device, threads=1, progress=False)
    return out


def merge_modules(
    method: str,
    modules: Sequence[nn.Module],
    base: nn.Module | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Merge same-architecture modules; returns a new module (a copy of the base, else the first) with the result."""
    if not modules:
        raise ConfigError("merge_modules needs at least one module")
    merged = merge_state_dicts(method, list(modules), base, **kwargs)
    template = copy.deepcopy(base if base is not None else modules[0])
    template.load_state_dict(merged)
    return template
