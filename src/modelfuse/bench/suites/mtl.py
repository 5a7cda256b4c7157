"""The ``mtl`` suite: multi-task training on digits with every loss fusion, ActivationMix on and off.

Pool (``digits_multitask``): the digits data with three tasks per image, the digit (10 classes),
its parity and whether it is > 4 (``gt4``); the labels of one task (default parity) are hidden
for a seeded share (default 50%) of the training samples, through a per-sample task mask. Nothing
is pretrained: every method trains the same network, a shared MLP trunk (64 -> 128 -> 64, ReLU)
with three heads (:class:`ThreeHeads`), from the same seeded initial weights, through the one
training loop :func:`modelfuse.zoo.train` with its ``backward=`` hook; the task losses of a batch
come from :func:`modelfuse.losses.masked_task_losses`, so absent tasks get no weight that step.

Bench methods:

- ``loss_fusion`` (level loss): the network trained with one registered loss fusion (``fusion``);
- ``activation_mix`` (level activation): the same, after the trunk's ReLUs are replaced by
  :class:`~modelfuse.activations.ActivationMix` es of relu/gelu/silu/tanh
  (:func:`~modelfuse.activations.fuse_activations`, layer granularity, convex weights, uniform
  start as in ``benchmarks/activation_mix.py``; ``init="original"`` starts at ReLU) whose mixing
  weights train with the network.

Both report ``accuracy`` (mean over the three tasks of test accuracy), ``accuracy/<task>``,
``nll`` (mean over the tasks) and ``nll/<task>``; notes hold the fusion's last task weights
(``weights_``) and, with ActivationMix, what each mixture learnt.

Method settings: defaults, except ``fixed`` (weights 1, 0.5, 0.5: an arbitrary hand choice, as in
``benchmarks/loss_fusion.py``, which trains through :func:`train_multitask` too), ``gradnorm``
(gradient norms at the trunk's last linear layer) and ``dwa`` (closes epochs as a callback).
Gradient methods get the trunk as shared parameters and the heads as task parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse.activations import DEFAULT_CANDIDATES, fuse_activations, summarize
from modelfuse.bench._api import BenchPool, Outcome, info_of, register_bench_method, register_pool_builder
from modelfuse.data import Splits, load
from modelfuse.errors import ConfigError
from modelfuse.losses import LossFusion, get_loss_fusion, masked_task_losses
from modelfuse.zoo import evaluate, train

__all__ = [
    "FUSION_OPTIONS",
    "TASKS",
    "ThreeHeads",
    "activation_mix",
    "digits_multitask",
    "loss_fusion",
    "targets",
    "task_accuracies",
    "task_data",
    "task_losses",
    "train_multitask",
]

#: the three tasks, in head order: the digit, its parity, whether it is > 4
TASKS = ("digit", "parity", "gt4")
NUM_CLASSES = (10, 2, 2)
#: options a fusion gets unless the suite entry passes its own
FUSION_OPTIONS: dict[str, dict[str, Any]] = {"fixed": {"weights": [1.0, 0.5, 0.5]}}


class ThreeHeads(nn.Module):
    """A shared MLP trunk (flatten, 64 -> 128 -> 64, ReLU) and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(64, k) for k in NUM_CLASSES])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def targets(y: torch.Tensor) -> list[torch.Tensor]:
    """The three tasks' labels of digit labels ``y``: the digit, ``y % 2``, ``y > 4``."""
    return [y, y % 2, (y > 4).long()]


def task_losses(model: nn.Module, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(losses, present)`` of a batch ``(x, digit, task mask)``: each task's mean cross-entropy
    over the samples that carry its label (:func:`~modelfuse.losses.masked_task_losses`)."""
    x, y, mask = batch
    per_sample = [F.cross_entropy(o, t, reduction="none") for o, t in zip(model(x), targets(y), strict=True)]
    return masked_task_losses(per_sample, mask)


def _mask(n: int, missing: float, task: str, seed: int) -> torch.Tensor:
    if task not in TASKS:
        raise ConfigError(f"missing_task must be one of {', '.join(TASKS)}; found {task!r}")
    if isinstance(missing, bool) or not isinstance(missing, (int, float)) or not 0.0 <= float(missing) < 1.0:
        raise ConfigError(
            f"missing (share of {task!r} labels hidden) must be in [0, 1); found {missing!r}: "
            "at 1 that task would have no label at all"
        )
    mask = torch.ones(n, len(TASKS), dtype=torch.bool)
    mask[:, TASKS.index(task)] = torch.rand(n, generator=torch.Generator().manual_seed(int(seed))) >= float(missing)
    return mask


def task_data(
    missing: float = 0.5, *, seed: int = 0, missing_task: str = "parity", digits: Splits | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """Digits' train split as ``(x, digit, task mask)`` with a ``missing`` share of ``missing_task``'s
    labels hidden (the hidden samples drawn with ``seed``), and the test split."""
    digits = digits if digits is not None else load("digits")
    x, y = digits.train.tensors
    return TensorDataset(x, y, _mask(len(y), missing, missing_task, seed)), digits.test


def _build_network(seed: int, fusion: str, options: Mapping[str, Any] | None) -> tuple[ThreeHeads, LossFusion]:
    cls = get_loss_fusion(fusion)  # unknown names: RegistryError listing the registered ones
    opts = dict(FUSION_OPTIONS.get(fusion, {}) if options is None else options)
    with torch.random.fork_rng():  # the same initial weights for every method of a seed
        torch.manual_seed(seed)
        model = ThreeHeads()
        try:
            fuser = cls(num_tasks=len(TASKS), task_names=list(TASKS), **opts)
        except TypeError as exc:
            raise ConfigError(f"loss fusion {fusion!r}: bad options {opts}: {exc}") from None
    return model, fuser


def train_multitask(
    fusion: str,
    data: TensorDataset,
    *,
    seed: int,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    activation_mix: bool = False,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    init: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[ThreeHeads, LossFusion]:
    """A :class:`ThreeHeads` (initial weights from ``seed``) trained on ``(x, digit, task mask)``
    ``data`` with loss fusion ``fusion`` through :func:`modelfuse.zoo.train`; returns the model and
    the fusion (its ``weights_`` are those of the last step).

    ``options``: the fusion's constructor options (default :data:`FUSION_OPTIONS`).
    ``activation_mix``: the trunk's ReLUs become ActivationMix es over ``candidates`` before
    training (``init``: None for a uniform start, ``"original"`` for exactly ReLU, or a candidate
    name; see :func:`~modelfuse.activations.fuse_activations`), trained with the rest.
    """
    model, fuser = _build_network(seed, fusion, options)
    if activation_mix:
        model.trunk = fuse_activations(model.trunk, list(candidates), init=init)
    linears = [m for m in model.trunk.modules() if isinstance(m, nn.Linear)]
    shared = linears[-1] if fusion == "gradnorm" else model.trunk
    # gradient methods combine the trunk's per-task gradients; the heads get the plain sum's
    extra = {"task_parameters": list(model.heads.parameters())} if fuser.uses_gradients else {}

    def backward(out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        losses, present = out
        return fuser.backward(losses, shared_parameters=shared.parameters(), present=present, **extra)

    callbacks = [fuser] if hasattr(fuser, "on_epoch_end") else []
    train(model, data, epochs=epochs, seed=seed, lr=lr, batch_size=batch_size, loss=task_losses,
          backward=backward, param_groups=[*model.parameters(), *fuser.parameters()],
          callbacks=callbacks, progress=False)
    return model, fuser


def task_accuracies(model: ThreeHeads, test: Sequence[TensorDataset]) -> list[dict[str, float]]:
    """:func:`modelfuse.zoo.evaluate` of each head (trunk + head) on its task's ``(x, label)`` test set."""
    return [
        evaluate(nn.Sequential(model.trunk, head), data)
        for head, data in zip(model.heads, test, strict=True)
    ]


def _task_splits(digits: Splits, mask: torch.Tensor) -> dict[str, Splits]:
    out = {}
    parts = {s: getattr(digits, s).tensors for s in ("train", "val", "test")}
    for k, (name, classes) in enumerate(zip(TASKS, NUM_CLASSES, strict=True)):
        keep = mask[:, k]
        x, y = parts["train"]
        sets = {"train": TensorDataset(x[keep], targets(y[keep])[k])}
        for s in ("val", "test"):
            x, y = parts[s]
            sets[s] = TensorDataset(x, targets(y)[k])
        out[name] = Splits(
            f"{digits.name}/{name}", sets["train"], sets["val"], sets["test"], classes, digits.input_shape,
            spec={**digits.spec, "task": name, "train_labelled": int(keep.sum())},
            classes=list(digits.classes) if name == "digit" and digits.classes else None,
        )
    return out


@register_pool_builder("digits_multitask")
def digits_multitask(
    seed: int = 0,
    *,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    missing: float = 0.5,
    missing_task: str = "parity",
    inference_batch: int = 64,
) -> BenchPool:
    """Digits with three heads (digit, parity, > 4), ``missing`` of ``missing_task``'s train labels
    hidden (drawn with ``seed``); ``epochs``/``lr``/``batch_size`` are the training settings every
    method of the suite uses. No models: each method trains its own network."""
    if int(epochs) < 1 or int(batch_size) < 1 or int(inference_batch) < 1:
        raise ConfigError(
            f"digits_multitask: epochs, batch_size and inference_batch must be >= 1; found "
            f"epochs={epochs}, batch_size={batch_size}, inference_batch={inference_batch}"
        )
    digits = load("digits")
    train_set, test = task_data(missing, seed=seed, missing_task=missing_task, digits=digits)
    mask = train_set.tensors[2]
    tasks = _task_splits(digits, mask)
    options = {"epochs": int(epochs), "lr": float(lr), "batch_size": int(batch_size), "missing": float(missing),
               "missing_task": missing_task}
    info = {
        **info_of(options),
        "tasks": list(TASKS),
        "train": len(mask),
        "train_labelled": {t: int(mask[:, k].sum()) for k, t in enumerate(TASKS)},
        "test": len(test),
        "network": "ThreeHeads: MLP trunk 64-128-64 ReLU, heads 10/2/2",
    }
    return BenchPool(
        name="digits_multitask",
        seed=int(seed),
        models={},
        data=digits,
        tasks=tasks,
        inference_input=test.tensors[0][: int(inference_batch)],
        info=info,
        extra={"train": train_set, **options},
    )


def _run(pool: BenchPool, fusion: str, activation_mix: bool, candidates: Sequence[str] | None,
         init: str | None, options: Mapping[str, Any] | None) -> Outcome:
    if "train" not in pool.extra or set(pool.tasks) != set(TASKS):
        raise ConfigError(
            f"the mtl bench methods need a digits_multitask pool (tasks {', '.join(TASKS)}); "
            f"found pool {pool.name!r} with tasks {sorted(pool.tasks)}"
        )
    model, fuser = train_multitask(
        fusion, pool.extra["train"], seed=pool.seed, epochs=pool.extra["epochs"], lr=pool.extra["lr"],
        batch_size=pool.extra["batch_size"], activation_mix=activation_mix,
        candidates=DEFAULT_CANDIDATES if candidates is None else candidates, init=init, options=options,
    )
    scores = task_accuracies(model, [pool.tasks[t].test for t in TASKS])
    metrics = {f"{m}/{t}": float(s[m]) for t, s in zip(TASKS, scores, strict=True) for m in ("accuracy", "nll")}
    metrics["accuracy"] = sum(s["accuracy"] for s in scores) / len(scores)
    metrics["nll"] = sum(s["nll"] for s in scores) / len(scores)
    w = fuser.weights_
    notes = f"{fusion} weights_ at the last step: " + (
        ", ".join(f"{t} {float(v):.3f}" for t, v in zip(TASKS, w.tolist(), strict=True)) if w is not None else "none"
    )
    if activation_mix:
        notes += "; mixtures: " + "; ".join(
            f"{r.name} " + " ".join(f"{c} {v:.2f}" for c, v in zip(r.candidates, r.weights, strict=True))
            for r in summarize(model)
        )
    return Outcome(metrics=metrics, model=model, notes=notes)


@register_bench_method("loss_fusion", "loss")
def loss_fusion(pool: BenchPool, fusion: str = "equal", options: dict[str, Any] | None = None) -> Outcome:
    """Multi-task training of the pool's three heads with loss fusion ``fusion`` (a registered name)."""
    return _run(pool, fusion, False, None, None, options)


@register_bench_method("activation_mix", "activation")
def activation_mix(
    pool: BenchPool,
    fusion: str = "equal",
    candidates: list[str] | None = None,
    init: str | None = None,
    options: dict[str, Any] | None = None,
) -> Outcome:
    """Multi-task training as loss_fusion, the trunk's ReLUs replaced by trained ActivationMix es."""
    return _run(pool, fusion, True, candidates, init, options)

