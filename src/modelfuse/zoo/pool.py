"""Pools of trained models to fuse: K seeds of one architecture, or K fine-tunes of one base.

Each member is cached under ``cache_dir()/pools`` as a safetensors file plus a JSON of
its spec and metrics. The file name holds a hash of everything that determines the
weights (architecture and options, data spec, training settings, seed, torch version,
and the source code of ``modelfuse.zoo`` and ``modelfuse.data``), so a second call with
the same arguments loads instead of training, and any change trains afresh.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import modelfuse.data as mf_data
from modelfuse.data import Splits, cache_dir, load
from modelfuse.data._cache import atomic_write
from modelfuse.errors import ConfigError
from modelfuse.io import save_state_dict
from modelfuse.progress import progress as progress_bar
from modelfuse.zoo.registry import create_model, get_model
from modelfuse.zoo.train import evaluate, train

#: bump when the layout of cached files changes
CACHE_FORMAT = 1
#: train() options that cannot change the weights, left out of cache keys
_NOT_IN_KEY = ("progress", "num_workers")
#: train()'s signature, whose keyword defaults complete the settings in a cache key
_TRAIN_PARAMS = inspect.signature(train).parameters


@dataclass
class Pool:
    """Trained ``members`` with the ``specs`` that determined them, their cache ``paths`` and test ``metrics``.

    ``base`` is the shared pretrained model of a fine-tune pool (None for a seed pool),
    with its ``base_spec`` and ``base_metrics``;
    ``data`` is the full dataset every member was evaluated on.
    """

    arch: str
    members: list[nn.Module]
    specs: list[dict[str, Any]]
    paths: list[Path | None]
    metrics: list[dict[str, float]]
    data: Splits
    base: nn.Module | None = None
    base_spec: dict[str, Any] | None = None
    base_metrics: dict[str, float] | None = None

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.members)

    def __getitem__(self, i: int) -> nn.Module:
        return self.members[i]


@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """A hash of the source files of ``modelfuse.zoo`` and ``modelfuse.data`` (code changes invalidate caches)."""
    h = hashlib.sha256()
    for pkg in (Path(__file__).parent, Path(mf_data.__file__).parent):
        for file in sorted(pkg.rglob("*.py")):
            h.update(f"{pkg.name}/{file.relative_to(pkg).as_posix()}\0".encode())
            h.update(file.read_bytes())
    return h.hexdigest()[:16]


def _jsonable(what: str, value: Any, strict: bool = True) -> Any:
    """``value`` as plain JSON (tuples become lists), or ConfigError saying how to avoid the cache.

    With ``strict=False`` values JSON cannot hold are recorded by their ``repr`` instead.
    """
    try:
        return json.loads(json.dumps(value, sort_keys=True, default=None if strict else repr))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{what} cannot be part of a cache key ({exc}); pass JSON-serialisable values "
            "(no callables, modules or tensors) or build the pool with cache=False"
        ) from None


def _train_settings(train_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """train()'s keyword defaults overlaid with ``train_kwargs``; unknown keys raise ConfigError."""
    params = _TRAIN_PARAMS
    allowed = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"epochs", "seed"}
    unknown = sorted(set(train_kwargs) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown train_kwargs {unknown} (epochs and seed are given separately); valid: {', '.join(sorted(allowed))}"
        )
    settings = {n: params[n].default for n in sorted(allowed)}
    settings.update(train_kwargs)
    return settings


def _model_settings(arch: str, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The factory's option defaults overlaid with ``model_kwargs``."""
    params = inspect.signature(get_model(arch).factory).parameters
    settings = {
        n: p.default
        for n, p in params.items()
        if n not in ("input_shape", "num_classes") and p.default is not inspect.Parameter.empty
    }
    settings.update(model_kwargs)
    return settings


def member_spec(
    arch: str,
    data: Splits,
    *,
    seed: int,
    epochs: int,
    model_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    kind: str = "seed",
    extra: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Everything that determines one trained member, as JSON; its hash is the cache key.

    ``strict=False`` (pools built without cache) records callables by ``repr`` instead of failing.
    """
    if strict and not data.spec:
        raise ConfigError(
            f"Splits {data.name!r} has an empty spec, so cached models could not be told apart; "
            "give the Splits a spec describing the data or build the pool with cache=False"
        )
    settings = _train_settings(train_kwargs or {})
    for name in _NOT_IN_KEY:
        settings.pop(name, None)
    spec = {
        "format": CACHE_FORMAT,
        "kind": kind,
        "arch": arch,
        "model_kwargs": _jsonable("model_kwargs", _model_settings(arch, model_kwargs or {}), strict),
        "input_shape": list(data.input_shape),
        "num_classes": int(data.num_classes),
        "data": _jsonable("data spec", data.spec, strict),
        "train": _jsonable("train_kwargs", {**settings, "epochs": int(epochs), "seed": int(seed)}, strict),
        "torch": torch.__version__,
        "code": code_hash(),
    }
    if extra:
        spec.update(_jsonable("spec extras", dict(extra), strict))
    return spec


def member_key(spec: Mapping[str, Any]) -> str:
    """The cache key of a member spec: a hash of its canonical JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _member_paths(spec: Mapping[str, Any]) -> tuple[Path, Path]:
    stem = cache_dir() / "pools" / f"{spec['arch']}-{spec['kind']}-{member_key(spec)}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _load_member(
    spec: Mapping[str, Any], build: Callable[[], nn.Module]
) -> tuple[nn.Module, dict[str, Any]] | None:
    """The cached model and metadata for ``spec``, or None when absent or unreadable."""
    from safetensors.torch import load_file

    weights, meta_path = _member_paths(spec)
    if not (weights.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") != _jsonable("spec", dict(spec)):
            return None
        model = build()
        model.load_state_dict(load_file(str(weights)))
    except Exception:  # a damaged or foreign cache entry is retrained and overwritten
        return None
    return model, meta


def _save_member(spec: Mapping[str, Any], model: nn.Module, meta: dict[str, Any]) -> Path:
    weights, meta_path = _member_paths(spec)
    save_state_dict(model, weights, metadata={"key": member_key(spec)}, force=True)
    text = json.dumps(meta, indent=1, sort_keys=True)
    atomic_write(meta_path, lambda tmp: tmp.write_text(text))  # written last: marks the entry complete
    return weights


def _member(
    spec: dict[str, Any],
    data: Splits,
    *,
    build: Callable[[], nn.Module],
    fit: Callable[[nn.Module], Any],
    device: Any,
    cache: bool,
) -> tuple[nn.Module, dict[str, float], Path | None]:
    """Load the member for ``spec`` from the cache, or build, train, evaluate and cache it."""
    if cache:
        loaded = _load_member(spec, build)
        if loaded is not None:
            model, meta = loaded
            return model.to(device), meta["metrics"], _member_paths(spec)[0]
    model = build()
    result = fit(model)
    test, val = evaluate(model, data.test), evaluate(model, data.val)
    metrics = {
        "test_accuracy": test["accuracy"],
        "test_nll": test["nll"],
        "val_accuracy": val["accuracy"],
        "val_nll": val["nll"],
        "train_seconds": result.seconds,
    }
    path = None
    if cache:
        path = _save_member(spec, model, {"spec": spec, "metrics": metrics, "history": result.history})
    return model, metrics, path


def _splits(data: str | Splits, data_kwargs: Mapping[str, Any] | None) -> Splits:
    if isinstance(data, Splits):
        if data_kwargs:
            raise ConfigError("data_kwargs apply only when data is a dataset name, not a Splits")
        return data
    return load(data, **(data_kwargs or {}))


def _init_model(arch: str, data: Splits, model_kwargs: Mapping[str, Any], seed: int) -> nn.Module:
    """A fresh model whose initial weights depend only on ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        return create_model(arch, input_shape=data.input_shape, num_classes=data.num_classes, **model_kwargs)


def build_pool(
    arch: str,
    data: str | Splits,
    *,
    k: int | None = None,
    seeds: Sequence[int] | None = None,
    epochs: int,
    data_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    cache: bool = True,
    progress: bool | None = None,
) -> Pool:
    """Train ``k`` models of ``arch`` on ``data``, member i from ``seeds[i]`` (default ``0..k-1``).

    A seed fixes both the initial weights and the training order. ``data`` is a dataset
    name (options in ``data_kwargs``) or a :class:`Splits`; ``train_kwargs`` go to
    :func:`train`, ``model_kwargs`` to the architecture. Members come from the cache when
    an identical one was trained before; ``cache=False`` neither reads nor writes it.
    """
    splits = _splits(data, data_kwargs)
    if seeds is None:
        if k is None or int(k) < 1:
            raise ConfigError(f"build_pool needs k >= 1 or a list of seeds; found k={k}")
        seeds = list(range(int(k)))
    seeds = [int(s) for s in seeds]
    if k is not None and int(k) != len(seeds):
        raise ConfigError(f"build_pool got k={k} but {len(seeds)} seeds; give one or make them agree")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"build_pool seeds must differ; found {seeds}")
    model_kwargs, train_kwargs = dict(model_kwargs or {}), dict(train_kwargs or {})
    _train_settings(train_kwargs)
    train_kwargs.pop("progress", None)
    device = train_kwargs.get("device", "cpu")
    pool = Pool(arch=arch, members=[], specs=[], paths=[], metrics=[], data=splits)
    with progress_bar(f"pool {arch}", total=len(seeds), unit="models", show=progress) as bar:
        for seed in seeds:
            spec = member_spec(
                arch,
                splits,
                seed=seed,
                epochs=epochs,
                model_kwargs=model_kwargs,
                train_kwargs=train_kwargs,
                strict=cache,
            )
            model, metrics, path = _member(
                spec,
                splits,
                build=functools.partial(_init_model, arch, splits, model_kwargs, seed),
                fit=functools.partial(_fit, data=splits, epochs=epochs, seed=seed, train_kwargs=train_kwargs),
                device=device,
                cache=cache,
            )
            _append(pool, model, spec, path, metrics)
            bar.advance()
            bar.update(info=f"test acc {metrics['test_accuracy']:.3f}")
    return pool


def _fit(model: nn.Module, *, data: Splits, epochs: int, seed: int, train_kwargs: Mapping[str, Any]) -> Any:
    return train(model, data, epochs=epochs, seed=seed, progress=False, **train_kwargs)


def _append(
    pool: Pool, model: nn.Module, spec: dict[str, Any], path: Path | None, metrics: dict[str, float]
) -> None:
    pool.members.append(model)
    pool.specs.append(spec)
    pool.paths.append(path)
    pool.metrics.append(metrics)


def _task(task: Any, index: int) -> dict[str, Any]:
    """Normalise a task: a mapping with ``labels``/``fraction``/``seed``, or just a list of labels."""
    if isinstance(task, Mapping):
        unknown = sorted(set(task) - {"labels", "fraction", "seed"})
        if unknown or not ({"labels", "fraction"} & set(task)):
            raise ConfigError(
                f"task {index} ({dict(task)}) needs 'labels' and/or 'fraction' (and optionally 'seed'); unknown keys: {unknown}"
            )
        labels = task.get("labels")
        fraction = task.get("fraction")
        seed = task.get("seed", index)
    elif isinstance(task, Sequence) and not isinstance(task, str):
        labels, fraction, seed = task, None, index
    else:
        raise ConfigError(
            f"task {index} must be a mapping (labels/fraction/seed) or a list of labels; found {task!r}"
        )
    return {
        "labels": sorted(int(c) for c in labels) if labels is not None else None,
        "fraction": float(fraction) if fraction is not None else None,
        "seed": int(seed),
    }


def build_finetune_pool(
    arch: str,
    data: str | Splits,
    tasks: Sequence[Any],
    *,
    pretrain_epochs: int,
    finetune_epochs: int,
    seed: int = 0,
    pretrain_task: Any = None,
    data_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    finetune_kwargs: Mapping[str, Any] | None = None,
    cache: bool = True,
    progress: bool | None = None,
) -> Pool:
    """Pretrain one ``arch`` model, then fine-tune one copy of it per task (the setting of task arithmetic).

    A task is ``{"labels": [...], "fraction": f, "seed": s}`` (see :meth:`Splits.subset`;
    ``seed`` defaults to the task's index) or just a list of labels. The base trains on the
    full data, or on ``pretrain_task`` if given, with ``train_kwargs``; fine-tunes use
    ``finetune_kwargs`` (default: ``train_kwargs``) and seed ``seed + 1 + i``. Every member
    keeps the full classifier and is evaluated on the full test set; ``Pool.base`` is the
    pretrained model.
    """
    splits = _splits(data, data_kwargs)
    norm_tasks = [_task(t, i) for i, t in enumerate(tasks)]
    if not norm_tasks:
        raise ConfigError("build_finetune_pool needs at least one task")
    model_kwargs = dict(model_kwargs or {})
    train_kwargs = dict(train_kwargs or {})
    finetune_kwargs = dict(finetune_kwargs) if finetune_kwargs is not None else dict(train_kwargs)
    for kw in (train_kwargs, finetune_kwargs):
        _train_settings(kw)
        kw.pop("progress", None)
    device = train_kwargs.get("device", "cpu")
    pre_splits = splits.subset(**_task(pretrain_task, 0)) if pretrain_task is not None else splits
    pool = Pool(arch=arch, members=[], specs=[], paths=[], metrics=[], data=splits)

    def spec_of(
        kind: str, d: Splits, s: int, epochs: int, kw: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        return member_spec(
            arch,
            d,
            seed=s,
            epochs=epochs,
            model_kwargs=model_kwargs,
            train_kwargs=kw,
            kind=kind,
            extra=extra,
            strict=cache,
        )

    with progress_bar(f"pool {arch}", total=len(norm_tasks) + 1, unit="models", show=progress) as bar:
        base_spec = spec_of("base", pre_splits, seed, pretrain_epochs, train_kwargs)
        base, base_metrics, _ = _member(
            base_spec,
            splits,
            build=functools.partial(_init_model, arch, splits, model_kwargs, seed),
            fit=functools.partial(
                _fit, data=pre_splits, epochs=pretrain_epochs, seed=seed, train_kwargs=train_kwargs
            ),
            device=device,
            cache=cache,
        )
        pool.base, pool.base_spec, pool.base_metrics = base, base_spec, base_metrics
        bar.advance()
        base_key = member_key(base_spec)
        for i, task in enumerate(norm_tasks):
            task_splits = splits.subset(**task)
            ft_seed = seed + 1 + i
            spec = spec_of(
                "finetune", task_splits, ft_seed, finetune_epochs, finetune_kwargs, base=base_key, task=task
            )
            model, metrics, path = _member(
                spec,
                splits,
                build=functools.partial(copy.deepcopy, base),
                fit=functools.partial(
                    _fit, data=task_splits, epochs=finetune_epochs, seed=ft_seed, train_kwargs=finetune_kwargs
                ),
                device=device,
                cache=cache,
            )
            _append(pool, model, spec, path, metrics)
            bar.advance()
            bar.update(info=f"task {i} test acc {metrics['test_accuracy']:.3f}")
    return pool
