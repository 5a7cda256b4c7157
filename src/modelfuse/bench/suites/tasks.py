"""The ``tasks`` suite: one pretrained zoo MLP fine-tuned on K digits tasks, merged every way.

Pool builder ``digits_tasks`` (the setting of ``benchmarks/multitask_merge.py``): the zoo MLP
pretrained on digits, fine-tuned once per task, plus one model jointly trained on all the
tasks (the base trained on their union for as many epochs as a fine-tune). Two families:

- ``labels``: label subsets 0-3 / 4-6 / 7-9; each task trains on and is evaluated on its own
  labels' samples. Base, fine-tunes and joint model come from :func:`modelfuse.zoo.build_finetune_pool`
  (cached on disk; the joint model is the "task" of all ten labels).
- ``transforms``: the original images, the images rotated 90 degrees, the inverted images
  (1 - x); each task trains and is evaluated on its transformation of the whole data. The base
  is a cached :func:`modelfuse.zoo.build_pool` member trained on the original images; the
  fine-tunes train through :func:`modelfuse.zoo.train` (a few seconds).

Every method is scored by :func:`modelfuse.zoo.evaluate` on each task's test split
(``accuracy/<task>``); ``accuracy`` and ``nll`` are the means over the tasks. Settings a method
selects (task-arithmetic lambda, soup ingredients) are chosen on the tasks' validation splits.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelfuse.bench._api import BenchPool, Outcome, info_of, register_bench_method, register_pool_builder
from modelfuse.data import Splits, load
from modelfuse.ensemble import Ensemble
from modelfuse.errors import ConfigError
from modelfuse.merge import fisher_information, fisher_merge, gram_matrices, merge_state_dicts, regmean_merge
from modelfuse.merge.adamerging import adamerging
from modelfuse.merge.soups import greedy_soup
from modelfuse.zoo import build_finetune_pool, build_pool, evaluate, train

LABEL_TASKS: dict[str, list[int]] = {"0-3": [0, 1, 2, 3], "4-6": [4, 5, 6], "7-9": [7, 8, 9]}


def _original(x: torch.Tensor) -> torch.Tensor:
    return x


def _rotated(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(-2, -1)).contiguous()


def _inverted(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "original": _original,
    "rotated 90": _rotated,
    "inverted": _inverted,
}
FAMILIES = ("labels", "transforms")
#: fine-tuning epochs per family when not given: the transformations need longer (the base has
#: never seen rotated or inverted digits)
FINETUNE_EPOCHS = {"labels": 3, "transforms": 8}
#: the task-arithmetic / TIES / DARE scaling factors swept when no lambda is given
LAMBDAS = [round(0.1 * i, 1) for i in range(0, 11)]


def _concat(parts: Sequence[TensorDataset]) -> TensorDataset:
    return TensorDataset(*(torch.cat(ts) for ts in zip(*(p.tensors for p in parts))))


def _mapped(splits: Splits, fn: Callable[[torch.Tensor], torch.Tensor], name: str) -> Splits:
    def one(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        return TensorDataset(fn(x), y)

    spec = {**splits.spec, "transform": name}
    return dataclasses.replace(
        splits, train=one(splits.train), val=one(splits.val), test=one(splits.test), spec=spec
    )


def _label_task(digits: Splits, labels: Sequence[int]) -> Splits:
    """``digits`` restricted to ``labels`` in every split (Splits.subset keeps the full test set)."""
    task = digits.subset(labels=labels)
    x, y = task.test.tensors
    keep = torch.isin(y, torch.tensor(list(labels)))
    return dataclasses.replace(task, test=TensorDataset(x[keep], y[keep]))


@register_pool_builder("digits_tasks")
def digits_tasks(
    seed: int = 0,
    *,
    family: str = "labels",
    hidden: Sequence[int] = (256, 128),
    pretrain_epochs: int = 1,
    finetune_epochs: int | None = None,
    batch_size: int = 64,
    cache: bool = True,
) -> BenchPool:
    """The pretrained zoo MLP, its fine-tune on each task of ``family`` and a jointly trained model."""
    if family not in FAMILIES:
        raise ConfigError(f"digits_tasks: family must be one of {', '.join(FAMILIES)}; found {family!r}")
    epochs = int(finetune_epochs if finetune_epochs is not None else FINETUNE_EPOCHS[family])
    model_kwargs = {"hidden": tuple(int(h) for h in hidden)}
    train_kwargs = {"batch_size": int(batch_size)}
    digits = load("digits")
    if family == "labels":
        tasks = {name: _label_task(digits, labels) for name, labels in LABEL_TASKS.items()}
        zoo_pool = build_finetune_pool(
            "mlp",
            digits,
            [*LABEL_TASKS.values(), list(range(digits.num_classes))],
            pretrain_epochs=pretrain_epochs,
            finetune_epochs=epochs,
            seed=seed,
            model_kwargs=model_kwargs,
            train_kwargs=train_kwargs,
            cache=cache,
            progress=False,
        )
        base, *finetunes, joint = [zoo_pool.base, *zoo_pool.members]
        data = digits
    else:
        tasks = {name: _mapped(digits, fn, name) for name, fn in TRANSFORMS.items()}
        base = build_pool(
            "mlp",
            digits,
            seeds=[seed],
            epochs=pretrain_epochs,
            model_kwargs=model_kwargs,
            train_kwargs=train_kwargs,
            cache=cache,
            progress=False,
        ).members[0]
        data = dataclasses.replace(
            digits,
            train=_concat([t.train for t in tasks.values()]),
            val=_concat([t.val for t in tasks.values()]),
            test=_concat([t.test for t in tasks.values()]),
            spec={**digits.spec, "transform": list(TRANSFORMS)},
        )
        finetunes = []
        for i, task in enumerate(tasks.values()):
            m = copy.deepcopy(base)
            train(m, task, epochs=epochs, seed=seed + 1 + i, progress=False, **train_kwargs)
            finetunes.append(m)
        joint = copy.deepcopy(base)
        train(joint, data, epochs=epochs, seed=seed + 1 + len(tasks), progress=False, **train_kwargs)
    options = {
        "family": family,
        "hidden": list(model_kwargs["hidden"]),
        "pretrain_epochs": pretrain_epochs,
        "finetune_epochs": epochs,
        "batch_size": batch_size,
    }
    return BenchPool(
        name="digits_tasks",
        seed=seed,
        models={name: m.eval() for name, m in zip(tasks, finetunes)},
        data=data,
        tasks=tasks,
        base=base.eval(),
        inference_input=digits.test.tensors[0][:256],
        info=info_of({**options, "tasks": list(tasks)}),
        extra={"joint": joint.eval()},
    )


def task_metrics(
    model: nn.Module | Mapping[str, nn.Module], pool: BenchPool, split: str = "test"
) -> dict[str, float]:
    """``accuracy/<task>`` of ``model`` (or of each task's own model) on each task's ``split``,
    with ``accuracy`` and ``nll`` the means over the tasks."""
    out: dict[str, float] = {}
    nlls = []
    for name, task in pool.tasks.items():
        m = model[name] if isinstance(model, Mapping) else model
        r = evaluate(m, getattr(task, split))
        out[f"accuracy/{name}"] = float(r["accuracy"])
        nlls.append(float(r["nll"]))
    out["accuracy"] = statistics.fmean(out[f"accuracy/{n}"] for n in pool.tasks)
    out["nll"] = statistics.fmean(nlls)
    return out


def _with(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(template)
    m.load_state_dict(dict(state))
    return m.eval()


def _require_base(pool: BenchPool, method: str) -> nn.Module:
    if pool.base is None or not pool.tasks:
        raise ConfigError(
            f"bench method {method!r} needs a fine-tune pool with a base model and tasks "
            f"(pool builder digits_tasks); pool {pool.name!r} has "
            f"{'no base' if pool.base is None else 'no tasks'}"
        )
    return pool.base


def swept_merge(
    pool: BenchPool,
    method: str,
    *,
    lambda_: float | None,
    lambdas: Sequence[float],
    **params: Any,
) -> Outcome:
    """Merge ``pool.models`` into ``pool.base`` with merge method ``method`` at scaling ``lambda_``,
    or, when ``lambda_`` is None, at each of ``lambdas`` and keep the best on the tasks' mean
    validation accuracy (first on ties); the ``lambda_sweep`` series holds (lambda, mean test accuracy)."""
    base = _require_base(pool, method)
    states = [m.state_dict() for m in pool.models.values()]

    def merged(lam: float) -> nn.Module:
        return _with(base, merge_state_dicts(method, states, base, lambda_=float(lam), **params))

    if lambda_ is not None:
        model = merged(lambda_)
        return Outcome(metrics={**task_metrics(model, pool), "lambda": float(lambda_)}, model=model)
    if not lambdas:
        raise ConfigError(
            f"bench method for {method!r}: give lambda_ or a non-empty list of lambdas to sweep"
        )
    best: tuple[float, float, nn.Module, dict[str, float]] | None = None
    sweep = []
    for lam in lambdas:
        model = merged(lam)
        val = task_metrics(model, pool, "val")["accuracy"]
        test = task_metrics(model, pool)
        sweep.append((float(lam), test["accuracy"]))
        if best is None or val > best[0]:
            best = (val, float(lam), model, test)
    assert best is not None
    val, lam, model, test = best
    return Outcome(
        metrics={**test, "lambda": lam, "val_accuracy": val},
        model=model,
        series={"lambda_sweep": sweep},
        notes=f"lambda {lam} chosen on validation accuracy ({100 * val:.1f}%) among {list(lambdas)}",
    )


@register_bench_method("tasks_pretrained", "baseline")
def pretrained(pool: BenchPool) -> Outcome:
    """The pretrained base on every task (no fine-tuning)."""
    base = _require_base(pool, "tasks_pretrained")
    return Outcome(metrics=task_metrics(base, pool), model=base)


@register_bench_method("tasks_individual", "baseline")
def individual(pool: BenchPool) -> Outcome:
    """Each fine-tune on its own task (K models: the size and speed recorded are one model's)."""
    _require_base(pool, "tasks_individual")
    return Outcome(
        metrics=task_metrics(dict(pool.models), pool),
        model=next(iter(pool.models.values())),
        notes=f"each task scored by its own fine-tune; {len(pool.models)} models in all",
    )


@register_bench_method("tasks_joint", "baseline")
def joint(pool: BenchPool) -> Outcome:
    """The base trained on the union of the tasks (multi-task learning, the merges' upper reference)."""
    _require_base(pool, "tasks_joint")
    model = pool.extra.get("joint")
    if model is None:
        raise ConfigError("bench method 'tasks_joint' needs pool.extra['joint'] (pool builder digits_tasks)")
    return Outcome(metrics=task_metrics(model, pool), model=model)


@register_bench_method("tasks_simple_average", "parameter")
def simple_average(pool: BenchPool) -> Outcome:
    """Uniform average of the fine-tunes' weights (model soup, Wortsman et al. 2022)."""
    base = _require_base(pool, "tasks_simple_average")
    model = _with(base, merge_state_dicts("linear", [m.state_dict() for m in pool.models.values()]))
    return Outcome(metrics=task_metrics(model, pool), model=model)


@register_bench_method("tasks_task_arithmetic", "parameter")
def task_arithmetic(
    pool: BenchPool, *, lambda_: float | None = None, lambdas: Sequence[float] = LAMBDAS
) -> Outcome:
    """Task arithmetic (Ilharco et al. 2023): base + lambda * sum of task vectors, lambda swept on validation."""
    return swept_merge(pool, "task_arithmetic", lambda_=lambda_, lambdas=lambdas)


@register_bench_method("tasks_ties", "parameter")
def ties(
    pool: BenchPool,
    *,
    density: float = 0.2,
    lambda_: float | None = None,
    lambdas: Sequence[float] = LAMBDAS,
    compare: bool = True,
) -> Outcome:
    """TIES-merging (Yadav et al. 2023): trim to ``density``, elect signs, disjoint merge; lambda swept.

    With ``compare`` the notes say whether TIES >= task arithmetic >= simple average holds on this
    pool's mean test accuracy (task arithmetic with the same lambda sweep or value), and where not.
    """
    out = swept_merge(pool, "ties", lambda_=lambda_, lambdas=lambdas, density=float(density))
    if compare:
        acc_ties = out.metrics["accuracy"]
        acc_ta = swept_merge(pool, "task_arithmetic", lambda_=lambda_, lambdas=lambdas).metrics["accuracy"]
        acc_avg = simple_average(pool).metrics["accuracy"]
        note = ordering_note({"TIES": acc_ties, "task arithmetic": acc_ta, "simple average": acc_avg})
        out.notes = f"{out.notes}; {note}" if out.notes else note
    return out


def ordering_note(accuracies: Mapping[str, float]) -> str:
    """Whether mean accuracies decrease (non-strictly) in the given order, and which pairs break it."""
    items = list(accuracies.items())
    shown = " >= ".join(f"{name} ({100 * acc:.1f}%)" for name, acc in items)
    broken = [f"{a} < {b}" for (a, x), (b, y) in itertools.pairwise(items) if x < y]
    if not broken:
        return f"ordering holds: {shown}"
    return f"ordering {shown} does NOT hold on this data: " + ", ".join(broken)


@register_bench_method("tasks_dare", "parameter")
def dare(
    pool: BenchPool,
    *,
    density: float = 0.5,
    seed: int = 0,
    lambda_: float | None = None,
    lambdas: Sequence[float] = LAMBDAS,
) -> Outcome:
    """DARE (Yu et al. 2024): drop task-vector entries at random, rescale, task arithmetic; lambda swept.

    The masks are seeded by ``seed`` plus the pool's seed (each suite seed draws other masks)."""
    return swept_merge(
        pool,
        "dare_linear",
        lambda_=lambda_,
        lambdas=lambdas,
        density=float(density),
        seed=int(seed) + pool.seed,
    )


def _loaders(pool: BenchPool, batch_size: int = 256) -> list[DataLoader]:
    return [DataLoader(t.train, batch_size=batch_size) for t in pool.tasks.values()]


@register_bench_method("tasks_fisher", "parameter")
def fisher(pool: BenchPool, *, max_examples: int | None = None) -> Outcome:
    """Fisher merging (Matena & Raffel 2022): each fine-tune's diagonal Fisher on its task's train split."""
    base = _require_base(pool, "tasks_fisher")
    members = list(pool.models.values())
    fishers = [
        fisher_information(m, dl, label="true", max_examples=max_examples)
        for m, dl in zip(members, _loaders(pool))
    ]
    model = _with(base, fisher_merge([m.state_dict() for m in members], fishers))
    return Outcome(metrics=task_metrics(model, pool), model=model)


@register_bench_method("tasks_regmean", "parameter")
def regmean(pool: BenchPool, *, alpha: float = 0.9, max_examples: int | None = None) -> Outcome:
    """RegMean (Jin et al. 2023): Linear weights from the tasks' input Gram matrices (train splits)."""
    base = _require_base(pool, "tasks_regmean")
    members = list(pool.models.values())
    grams = [gram_matrices(m, dl, max_examples=max_examples) for m, dl in zip(members, _loaders(pool))]
    model = _with(base, regmean_merge([m.state_dict() for m in members], grams, alpha=float(alpha)))
    return Outcome(metrics=task_metrics(model, pool), model=model)


@register_bench_method("tasks_adamerging", "parameter")
def adamerging_method(
    pool: BenchPool,
    *,
    granularity: str = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    epochs: int = 30,
    batch_size: int = 64,
    clamp: Sequence[float] = (0.0, 1.0),
) -> Outcome:
    """AdaMerging (Yang et al. 2024): merge coefficients learned by entropy minimisation on the tasks'
    unlabelled validation inputs (pooled)."""
    base = _require_base(pool, "tasks_adamerging")
    inputs = TensorDataset(_concat([t.val for t in pool.tasks.values()]).tensors[0])
    low, high = (float(c) for c in clamp)
    result = adamerging(
        base,
        list(pool.models.values()),
        inputs,
        granularity=granularity,
        init=float(init),
        lr=float(lr),
        epochs=int(epochs),
        batch_size=int(batch_size),
        seed=pool.seed,
        clamp=(low, high),
        progress=False,
    )
    coef = result.coefficients
    per_task = coef.mean(dim=1) if coef.dim() == 2 else coef
    return Outcome(
        metrics={
            **task_metrics(result.model, pool),
            "entropy_before": float(result.entropy_before),
            "entropy_after": float(result.entropy_after),
        },
        model=result.model,
        notes="coefficients per task (mean over layers): " + ", ".join(f"{float(c):.2f}" for c in per_task),
    )


@register_bench_method("tasks_greedy_soup", "parameter")
def greedy_soup_method(pool: BenchPool) -> Outcome:
    """Greedy soup (Wortsman et al. 2022) of the fine-tunes, held out: the tasks' validation splits."""
    _require_base(pool, "tasks_greedy_soup")
    names = list(pool.models)
    val = _concat([t.val for t in pool.tasks.values()])
    soup = greedy_soup(list(pool.models.values()), val)
    return Outcome(
        metrics=task_metrics(soup.model, pool),
        model=soup.model,
        notes="kept " + ", ".join(names[i] for i in soup.kept),
    )


@register_bench_method("tasks_ensemble", "output")
def ensemble(pool: BenchPool, *, combine: str = "mean_prob") -> Outcome:
    """An output ensemble of the fine-tunes (K forward passes), combined with ``combine``."""
    _require_base(pool, "tasks_ensemble")
    # copies: an Ensemble freezes its members, and the pool's models are shared with later methods
    model = Ensemble([copy.deepcopy(m) for m in pool.models.values()], combine=combine).eval()
    return Outcome(metrics=task_metrics(model, pool), model=model)
