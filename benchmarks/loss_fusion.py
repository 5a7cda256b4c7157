"""Multi-task loss fusion on digits: three heads, one task's labels 50% missing, every method.

A shared MLP trunk (64 -> 128 -> 64, ReLU) with three heads: the digit (10 classes), its parity
and whether it is > 4. The parity labels of a seeded half of the training samples are hidden;
each batch's task losses come from ``masked_task_losses`` and the fusion sees which tasks are
present. Every registered loss fusion (``list_loss_fusions()``, so the gradient methods join
when they are registered) trains through ``modelfuse.zoo.train`` with its ``backward=`` hook,
over the seeds; the table prints each task's test accuracy, mean +/- std over the seeds.

Method settings: defaults, except ``fixed`` (weights 1, 0.5, 0.5: an arbitrary hand choice),
``gradnorm`` (gradient norms at the last shared layer) and ``dwa`` (closes epochs as a
callback). Gradient methods get the whole trunk as shared parameters. The network, the data and
the training are those of the ``mtl`` bench suite (``modelfuse.bench.suites.mtl``), seed 0's
hidden parity labels for every seed.

    PYTHONPATH=src .venv/bin/python benchmarks/loss_fusion.py [--seeds 0 1 2] [--epochs 30] [--methods equal dwa]

``tests/losses/test_loss_fusion_figures.py`` (slow) runs it and holds the README's floors.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

from _machine import machine
from modelfuse.bench.suites.mtl import targets, task_accuracies, task_data, train_multitask
from modelfuse.losses import list_loss_fusions

TASKS = ("digit", "parity", "> 4")  # column labels of modelfuse.bench.suites.mtl.TASKS


def run(name: str, seed: int, data, test, epochs: int) -> list[float]:
    """Test accuracies (%) of the three heads trained with loss fusion ``name`` from ``seed``."""
    model, _ = train_multitask(name, data, seed=seed, epochs=epochs, lr=1e-3)
    x, y = test.tensors
    return [100 * s["accuracy"] for s in task_accuracies(model, [TensorDataset(x, t) for t in targets(y)])]


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
