"""Merge recipes for the data-driven methods: ``fisher``, ``regmean``, ``adamerging``, ``greedy_soup``.

These methods run the models on data, so a recipe names, besides the models, the zoo
architecture the checkpoints instantiate and the data::

    merge_method: regmean
    models:
      - model: task_a.safetensors
      - model: task_b.safetensors
    architecture: {name: mlp, options: {hidden: [64]}}
    data: {dataset: digits, split: val, examples: 512}
    parameters: {alpha: 0.9}

They run in Python over whole models (not the streaming executor of the per-tensor
methods): the checkpoints are loaded into the architecture, statistics are computed with
:mod:`modelfuse.merge.statistics` (or read from a cache, checked by the fingerprint of the
model they were computed on), the models are merged by :func:`fisher_merge`,
:func:`regmean_merge`, :func:`adamerging` or :func:`greedy_soup`, and the result is written
atomically. Statistics are cached in ``statistics:`` (a folder; relative to the working
directory), by default beside the output
(``OUT.statistics/``); they are written only once the merge has succeeded.

The methods that learn or select on the data (``adamerging``, ``greedy_soup``) refuse the
split ``test`` unless ``data.allow_test: true``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from modelfuse.config import read_yaml, validate
from modelfuse.data.splits import SplitName
from modelfuse.errors import ConfigError, DataError

#: the merge methods a data recipe runs
DATA_METHODS = ("fisher", "regmean", "adamerging", "greedy_soup")

#: parameters of each method (name -> the value's type, its default); shared at the recipe's top
_PARAMETERS: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "fisher": {"label": (str, "true"), "seed": (int, 0), "epsilon": ((int, float), 1e-6)},
    "regmean": {"alpha": ((int, float), 0.9)},
    "adamerging": {
        "granularity": (str, "layer"),
        "init": ((int, float), 0.3),
        "lr": ((int, float), 1e-3),
        "epochs": (int, 50),
        "seed": (int, 0),
    },
    "greedy_soup": {},
}
#: per-model parameters of each method
_PER_MODEL: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "fisher": {"weight": ((int, float), 1.0)},
    "regmean": {},
    "adamerging": {},
    "greedy_soup": {},
}
#: what each method is and does with its data (for --list-methods and plans)
_ABOUT: dict[str, tuple[str, str]] = {
    "fisher": (
        "Matena & Raffel 2022, Merging models with Fisher-weighted averaging (eq. 3)",
        "diagonal empirical Fisher of each model, from exact per-example gradients on the data",
    ),
    "regmean": (
        "Jin et al. 2023, Dataless knowledge fusion by merging weights of language models (eq. 4; alpha scales "
        "the off-diagonal Gram entries)",
        "input Gram matrices of each Linear layer on the data",
    ),
    "adamerging": (
        "Yang et al. 2024, AdaMerging: adaptive model merging for multi-task learning (eq. 6-8)",
        "coefficients of the task vectors learned by entropy minimisation on the data's inputs (labels unused)",
    ),
    "greedy_soup": (
        "Wortsman et al. 2022, Model soups (greedy soup, algorithm 1)",
        "held-out accuracy of each ingredient and of each candidate soup on the data (labels used)",
    ),
}
#: the methods that learn or select on the data: the test split needs data.allow_test
_FITS_ON_DATA = ("adamerging", "greedy_soup")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(_Strict):
    """Which data the method runs on: a dataset of :mod:`modelfuse.data`, a split, how many examples."""

    dataset: str
    split: SplitName
    examples: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=64, ge=1)
    allow_test: bool = False


class ArchitectureSection(_Strict):
    """What the checkpoints instantiate: a zoo name or ``package.module:function``, with options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class DataModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)


def _check_parameters(
    problems: dict[str, str],
    where: str,
    given: Mapping[str, Any],
    allowed: Mapping[str, tuple[Any, Any]],
    method: str,
) -> None:
    for key, value in given.items():
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            problems[f"{where}.{key}"] = f"{method} has no parameter {key!r} (valid: {valid})"
            continue
        kind = allowed[key][0]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            problems[f"{where}.{key}"] = f"{method} expects {names} (found {value!r})"


class DataRecipe(_Strict):
    """A data-driven merge recipe (the one schema of ``fisher``/``regmean``/``adamerging``/``greedy_soup``)."""

    merge_method: Literal["fisher", "regmean", "adamerging", "greedy_soup"]
    models: list[DataModelEntry] = Field(min_length=1)
    base_model: str | None = None
    architecture: ArchitectureSection
    data: DataSection
    parameters: dict[str, Any] = Field(default_factory=dict)
    statistics: str | None = None
    name: str | None = None

    def parameter(self, key: str) -> Any:
        """A shared parameter's value, or its default."""
        return self.parameters.get(key, _PARAMETERS[self.merge_method][key][1])


def check_data_recipe(recipe: DataRecipe, source: str = "recipe") -> DataRecipe:
    """What one field cannot say alone: the method's parameters, base_model, the split; a
    ConfigError naming ``source`` and the field, as the schema's own errors do."""
    m = recipe.merge_method
    problems: dict[str, str] = {}
    _check_parameters(problems, "parameters", recipe.parameters, _PARAMETERS[m], m)
    for i, entry in enumerate(recipe.models):
        _check_parameters(problems, f"models.{i}.parameters", entry.parameters, _PER_MODEL[m], m)
    if m == "adamerging" and recipe.base_model is None:
        problems["base_model"] = (
            "adamerging learns coefficients of task vectors: give base_model (the checkpoint the models "
            "were fine-tuned from)"
        )
    if m != "adamerging" and recipe.base_model is not None:
        problems["base_model"] = f"{m} takes no base_model; list every model to merge under models"
    if m in _FITS_ON_DATA and recipe.data.split == "test" and not recipe.data.allow_test:
        problems["data.split"] = (
            f"{m} learns or selects on its data, so it is refused on the test split (test figures "
            "afterwards would not be honest); use split: val, or set data.allow_test: true if this is "
            "really meant"
        )
    label = recipe.parameters.get("label", "true")
    if m == "fisher" and label not in ("true", "predicted", "sampled"):
        problems.setdefault(
            "parameters.label", f"fisher's label is true, predicted or sampled (found {label!r})"
        )
    if problems:
        raise ConfigError(f"{source}: invalid recipe: " + "; ".join(f"{k}: {v}" for k, v in problems.items()))
    return recipe


def describe_data_method(name: str) -> str:
    """One data-driven method's entry of ``modelfuse merge --list-methods``."""
    paper, uses = _ABOUT[name]

    def fields(table: Mapping[str, tuple[Any, Any]]) -> str:
        return ", ".join(f"{k}={v[1]!r}" for k, v in table.items()) or "(none)"

    base = "required (base_model: the checkpoint the models were fine-tuned from)" if name == "adamerging" else "none"
    return "\n".join(
        [
            name,
            f"  base: {base}; runs the models on data: the recipe needs architecture: and data: sections",
            f"  data: {uses}" + ("; the test split needs data.allow_test: true" if name in _FITS_ON_DATA else ""),
            f"  per-model parameters: {fields(_PER_MODEL[name])}",
            f"  shared parameters: {fields(_PARAMETERS[name])}",
            f"  paper: {paper}",
            "  mergekit: (no such method in mergekit)",
        ]
    )


def _statistics_dir(recipe: DataRecipe, out: str | os.PathLike | None) -> Path | None:
    if recipe.statistics is not None:
        return Path(recipe.statistics).expanduser()
    if out is not None:
        return Path(out).parent / f"{Path(out).name}.statistics"
    return None


def plan_data_recipe(
    recipe: str | os.PathLike | Mapping[str, Any] | DataRecipe, out: str | os.PathLike | None = None
) -> str:
    """What a data recipe would do, without loading a model or the data: the method and its
    parameters, the models, architecture and data, and which statistics are cached already."""
    if isinstance(recipe, DataRecipe):
        parsed = check_data_recipe(recipe)
    elif isinstance(recipe, Mapping):
        parsed = parse_data_recipe(dict(recipe))
    else:
        parsed = parse_data_recipe(read_yaml(Path(recipe)), str(recipe))
    m = parsed.merge_method
    params = {k: parsed.parameter(k) for k in _PARAMETERS[m]}
    shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
    d = parsed.data
    examples = "every example" if d.examples is None else f"at most {d.examples} examples"
    options = f" {d.options}" if d.options else ""
    lines = [
        f"data merge plan: {m}" + (f" ({shown})" if shown else "") + f" over {len(parsed.models)} model(s)",
        f"  paper: {_ABOUT[m][0]}",
        f"  data: {d.dataset}{options}, split {d.split}, {examples}, batches of {d.batch_size}: {_ABOUT[m][1]}",
        f"  architecture: {parsed.architecture.name} {parsed.architecture.options or ''}".rstrip(),
    ]
    if parsed.base_model is not None:
        lines.append(f"  base model: {parsed.base_model}")
    folder = _statistics_dir(parsed, out)
    kind = {"fisher": "fisher", "regmean": "gram"}.get(m)
    for entry in parsed.models:
        line = f"  model: {entry.model}"
        if entry.parameters:
            line += f" {entry.parameters}"
        if kind is not None:
            path = folder / _statistics_key(parsed, entry.model, kind) if folder is not None else None
            if path is not None and path.exists():
                line += f"; {kind} statistics cached in {path} (fingerprint checked when merging)"
            else:
                line += f"; {kind} statistics to compute" + (f", then cached in {folder}" if folder else "")
        lines.append(line)
    if out is not None:
        exists = Path(out).exists()
        lines.append(f"  output: {out}" + (" (exists: refused without --force)" if exists else ""))
    return "\n".join(lines)


def is_data_recipe(recipe: Any) -> bool:
    """Whether a recipe (a :class:`DataRecipe`, a dict as read from YAML, or a YAML file's path)
    names one of :data:`DATA_METHODS`."""
    if isinstance(recipe, DataRecipe):
        return True
    if isinstance(recipe, (str, os.PathLike)):
        recipe = read_yaml(recipe)
    return isinstance(recipe, Mapping) and recipe.get("merge_method") in DATA_METHODS


def parse_data_recipe(data: Any, source: str = "recipe") -> DataRecipe:
    """Validate a data recipe; errors name ``source``, the field and what is valid there."""
    return check_data_recipe(validate(DataRecipe, data, source), source)


@dataclass
class DataMergeResult:
    """What a data recipe produced: the merged ``state``, where it was written, and a ``report``."""

    state: dict[str, torch.Tensor]
    out: Path | None
    report: dict[str, Any] = field(default_factory=dict)


def check_inputs_fit(
    model: torch.nn.Module, dataset: Any, where: str, device: str | torch.device = "cpu"
) -> None:
    """Run ``model`` on the first example of ``dataset``; a DataError naming ``where`` if it cannot."""
    if len(dataset) == 0:
        raise DataError(f"{where} is empty; name another split or dataset")
    batch = torch.utils.data.default_collate([dataset[0]])
    x = batch[0] if isinstance(batch, (list, tuple)) else batch  # (inputs, labels) items or inputs alone
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x.to(device))
    except Exception as exc:
        raise DataError(
            f"{where}: its inputs of shape {tuple(x.shape[1:])} do not fit the {type(model).__name__} "
            f"({type(exc).__name__}: {exc}); give the dataset the checkpoints were trained on, or its options"
        ) from None
    finally:
        model.train(was_training)


def _load_models(
    recipe: DataRecipe, refs: list[str], splits: Any, recipe_dir: Path | None, device: Any
) -> list:
    from modelfuse.io import load_into
    from modelfuse.merge.plan import open_model
    from modelfuse.zoo import build_architecture

    models = []
    for ref in refs:
        model = build_architecture(
            recipe.architecture.name,
            input_shape=splits.input_shape,
            num_classes=splits.num_classes,
            options=recipe.architecture.options,
        )
        ckpt = open_model(ref, recipe_dir)
        try:
            load_into(model, ckpt)
        finally:
            ckpt.close()
        models.append(model.to(device).eval())
    return models


def _statistics_key(recipe: DataRecipe, ref: str, kind: str) -> str:
    """File name of one model's cached statistics: the model and every setting that determines them."""
    settings = {
        "kind": kind,
        "model": ref,
        "dataset": recipe.data.dataset,
        "options": recipe.data.options,
        "split": recipe.data.split,
        "examples": recipe.data.examples,
        "label": recipe.parameters.get("label", "true") if kind == "fisher" else None,
        "seed": recipe.parameters.get("seed", 0) if kind == "fisher" else None,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{Path(ref).name.split('.')[0]}.{kind}.{digest}.safetensors"


def _statistics(
    recipe: DataRecipe, refs: list[str], models: list, dataset: Any, folder: Path | None
) -> tuple[list[Any], list[tuple[Any, Path]]]:
    """Each model's statistics, read from ``folder`` where cached there (the fingerprint checked),
    else computed; returns them and the ones to save (none without a folder) once the merge has
    succeeded."""
    from modelfuse.merge.statistics import (
        fisher_information,
        gram_matrices,
        load_statistics,
        state_fingerprint,
    )

    kind = "fisher" if recipe.merge_method == "fisher" else "gram"
    stats, to_save = [], []
    for ref, model in zip(refs, models, strict=True):
        path = folder / _statistics_key(recipe, ref, kind) if folder is not None else None
        if path is not None and path.exists():
            st = load_statistics(path)
            have = state_fingerprint(model)
            if st.fingerprint != have:
                raise ConfigError(
                    f"statistics {path} were computed on another model than {ref} (fingerprint "
                    f"{st.fingerprint[:12] or 'missing'}..., the model is {have[:12]}...); delete the file "
                    "to recompute them, or name another statistics folder"
                )
            stats.append(st)
            continue
        loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.data.batch_size)
        if kind == "fisher":
            st = fisher_information(
                model,
                loader,
                label=recipe.parameter("label"),
                seed=recipe.parameter("seed"),
                max_examples=recipe.data.examples,
            )
        else:
            st = gram_matrices(model, loader, max_examples=recipe.data.examples)
        stats.append(st)
        if path is not None:
            to_save.append((st, path))
    return stats, to_save


def merge_with_data(
    recipe: str | os.PathLike | Mapping[str, Any] | DataRecipe,
    out: str | os.PathLike | None,
    *,
    force: bool = False,
    device: str | torch.device = "cpu",
    recipe_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
) -> DataMergeResult:
    """Run a data recipe (a YAML file, a dict or a :class:`DataRecipe`) and write the result to ``out``.

    ``out`` ending in ``.safetensors`` is one file, anything else a folder (modelfuse.io's
    atomic writer); None computes without writing. An existing output is refused unless
    ``force``. On any error nothing is written: neither the output nor statistics.
    ``dry_run`` checks the recipe, the output, the models and the data, and stops.
    """
    from modelfuse import data as mf_data
    from modelfuse.io import CheckpointWriter, write_checkpoint
    from modelfuse.merge.adamerging import adamerging
    from modelfuse.merge.data_merge import fisher_merge, regmean_merge
    from modelfuse.merge.soups import greedy_soup
    from modelfuse.merge.statistics import save_statistics

    text = None
    if isinstance(recipe, DataRecipe):
        parsed = check_data_recipe(recipe)
    elif isinstance(recipe, Mapping):
        parsed = parse_data_recipe(dict(recipe))
    else:
        path = Path(recipe)
        parsed = parse_data_recipe(read_yaml(path), str(path))
        text = path.read_text(encoding="utf-8")
        recipe_dir = path.resolve().parent if recipe_dir is None else recipe_dir
    folder = Path(recipe_dir) if recipe_dir is not None else None
    if text is None:
        import yaml

        text = yaml.safe_dump(parsed.model_dump(exclude_none=True), sort_keys=False)
    refs = [m.model for m in parsed.models]
    inputs = [r for r in [*refs, parsed.base_model] if r is not None]
    protect = [p for r in inputs for p in (Path(r), *([folder / r] if folder else [])) if p.exists()]
    if out is not None:
        CheckpointWriter(out, force=force, protect=protect).check()
    splits = mf_data.load(parsed.data.dataset, **parsed.data.options)
    dataset = getattr(splits, parsed.data.split)
    if parsed.data.examples is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(parsed.data.examples, len(dataset))))
    models = _load_models(parsed, refs, splits, folder, device)
    where = f"data {parsed.data.dataset!r} split {parsed.data.split!r}"
    check_inputs_fit(models[0], dataset, where, device)
    stats_dir = _statistics_dir(parsed, out)
    m = parsed.merge_method
    report: dict[str, Any] = {"method": m, "models": refs, "examples": len(dataset)}
    to_save: list[tuple[Any, Path]] = []
    if dry_run:
        return DataMergeResult({}, None, report)
    if m in ("fisher", "regmean"):
        stats, to_save = _statistics(parsed, refs, models, dataset, stats_dir)
        if m == "fisher":
            weights = [e.parameters.get("weight", 1.0) for e in parsed.models]
            state = fisher_merge(models, stats, weights=weights, epsilon=parsed.parameter("epsilon"))
        else:
            state = regmean_merge(models, stats, alpha=parsed.parameter("alpha"))
        report["statistics"] = [str(p) for _, p in to_save] or None
    elif m == "greedy_soup":
        result = greedy_soup(
            models,
            dataset,
            split=parsed.data.split,
            allow_test=parsed.data.allow_test,
            batch_size=parsed.data.batch_size,
            device=device,
        )
        state = result.model.state_dict()
        report.update(kept=[refs[i] for i in result.kept], accuracies=dict(zip(refs, result.accuracies)))
    else:
        base = _load_models(parsed, [parsed.base_model], splits, folder, device)[0]
        result = adamerging(
            base,
            models,
            dataset,
            split=parsed.data.split,
            allow_test=parsed.data.allow_test,
            granularity=parsed.parameter("granularity"),
            init=parsed.parameter("init"),
            lr=parsed.parameter("lr"),
            epochs=parsed.parameter("epochs"),
            batch_size=parsed.data.batch_size,
            seed=parsed.parameter("seed"),
            device=device,
        )
        state = result.model.state_dict()
        report.update(entropy_before=result.entropy_before, entropy_after=result.entropy_after)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    written = None
    if out is not None:
        metadata = {"modelfuse.recipe": text}
        written = write_checkpoint(state, out, metadata=metadata, force=force, protect=protect)
        for st, path in to_save:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_statistics(st, path, force=True)
    return DataMergeResult(state, written, report)
