"""Multi-task loss fusion on digits: three heads, one task's labels 50% missing, every method.

A shared MLP trunk (64 -> 128 -> 64, ReLU) with three heads: the digit (10 classes), its parity
and whether it is > 4. The parity labels of a seeded half of the training samples are hidden;
each batch's task losses come from ``masked_task_losses`` and the fusion sees which tasks are
present. Every registered loss fusion (``list_loss_fusions()``, so the gradient methods join
when they are registered) trains through ``modelfuse.zoo.train`` with its ``backward=`` hook,
over the seeds; the table prints each task's test accuracy, mean +/- std over the seeds.

Method settings: defaults, except ``fixed`` (weights 1, 0.5, 0.5: an arbitrary hand choice),
``gradnorm`` (gradient norms at the last shared layer) and ``dwa`` (closes epochs as a
callback). Gradient methods get the whole trunk as shared parameters.

    PYTHONPATH=src .venv/bin/python benchmarks/loss_fusion.py [--seeds 0 1 2] [--epochs 30] [--methods equal dwa]

``tests/losses/test_loss_fusion_figures.py`` (slow) runs it and holds the README's floors.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from _machine import machine
from modelfuse.data import load
from modelfuse.losses import get_loss_fusion, list_loss_fusions, masked_task_losses
from modelfuse.zoo import evaluate, train

TASKS = ("digit", "parity", "> 4")
OPTIONS = {"fixed": {"weights": [1.0, 0.5, 0.5]}}


class ThreeHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(64, 10), nn.Linear(64, 2), nn.Linear(64, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.trunk(x)
        return [head(h) for head in self.heads]


def targets(y: torch.Tensor) -> list[torch.Tensor]:
    return [y, y % 2, (y > 4).long()]


def task_losses(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, mask = batch
    per_sample = [F.cross_entropy(o, t, reduction="none") for o, t in zip(model(x), targets(y), strict=True)]
    return masked_task_losses(per_sample, mask)


def run(name: str, seed: int, data: TensorDataset, test: TensorDataset, epochs: int) -> list[float]:
    torch.manual_seed(seed)
    model = ThreeHeads()
    fusion = get_loss_fusion(name)(num_tasks=3, task_names=list(TASKS), **OPTIONS.get(name, {}))
    shared = model.trunk[-2] if name == "gradnorm" else model.trunk

    # gradient methods combine the trunk's per-task gradients; the heads get the plain sum's
    extra = {"task_parameters": list(model.heads.parameters())} if fusion.uses_gradients else {}

    def backward(out):
        losses, present = out
        return fusion.backward(losses, shared_parameters=shared.parameters(), present=present, **extra)

    callbacks = [fusion] if hasattr(fusion, "on_epoch_end") else []
    train(model, data, epochs=epochs, seed=seed, lr=1e-3, loss=task_losses, backward=backward,
          param_groups=[*model.parameters(), *fusion.parameters()], callbacks=callbacks)
    x, y = test.tensors
    return [
        100 * evaluate(nn.Sequential(model.trunk, head), TensorDataset(x, t))["accuracy"]
        for head, t in zip(model.heads, targets(y), strict=True)
    ]


def task_data(missing: float = 0.5) -> tuple[TensorDataset, TensorDataset]:
    """Digits' train split as ``(x, digit, task mask)`` with ``missing`` of the parity labels hidden
    (seeded), and the test split."""
    digits = load("digits")
    x, y = digits.train.tensors
    mask = torch.ones(len(y), 3, dtype=torch.bool)
    mask[:, 1] = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) >= missing
    return TensorDataset(x, y, mask), digits.test


def table(methods: list[str], seeds: list[int], epochs: int, missing: float = 0.5):
    """Yield ``(method, accuracies (seeds, tasks), seconds per run)`` for each method."""
    data, test = task_data(missing)
    for name in methods:
        start = time.perf_counter()
        acc = np.array([run(name, seed, data, test, epochs) for seed in seeds])
        yield name, acc, (time.perf_counter() - start) / len(seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--missing", type=float, default=0.5, help="share of parity labels hidden")
    parser.add_argument("--methods", nargs="+", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data, test = task_data(args.missing)
    mask = data.tensors[2]
    print(machine())
    print(f"digits: {len(mask)} train ({int(mask[:, 1].sum())} with parity labels), {len(test)} test; "
          f"epochs {args.epochs}, seeds {args.seeds}")
    print(f"| method | {' | '.join(TASKS)} | mean | s / run |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    for name, acc, seconds in table(args.methods or list_loss_fusions(), args.seeds, args.epochs, args.missing):
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in zip(acc.mean(0), acc.std(0), strict=True)]
        mean = acc.mean(1)
        print(f"| {name} | {' | '.join(cells)} | {mean.mean():.1f} ± {mean.std():.1f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
