"""Plain ReLU against learnable activation mixtures on digits (zoo MLP and CNN, 3 seeds).

For each architecture and seed: one model built from that seed and trained as it is (ReLU), and
the same initial weights with every ReLU turned into an ``ActivationMix`` of relu/gelu/silu/tanh
(``fuse_activations``, layer granularity, convex weights, uniform start 1/4 each unless
``--init original``), trained the same way through ``modelfuse.zoo.train`` (the mixture weights
are ordinary parameters, same optimizer and learning rate). Prints mean +/- std (over seeds,
sample std) of test accuracy and NLL, the mean learnt weights per layer, and the wall time.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/activation_mix.py`` (``--seeds 0 1 2``,
``--epochs 30``, ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from _machine import machine
from modelfuse.activations import fuse_activations, summarize
from modelfuse.data import load
from modelfuse.zoo import create_model, evaluate, train

CANDIDATES = ("relu", "gelu", "silu", "tanh")


def run_one(arch: str, seed: int, *, mixed: bool, epochs: int, init: str | None, splits) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(arch, input_shape=splits.input_shape, num_classes=splits.num_classes)
    if mixed:
        model = fuse_activations(model, CANDIDATES, granularity="layer", weights="convex", init=init)
    train(model, splits, epochs=epochs, seed=seed, lr=1e-3, progress=False, eval_every_epoch=False)
    res = evaluate(model, splits.test)
    return {"accuracy": res["accuracy"], "nll": res["nll"], "mixtures": summarize(model) if mixed else []}


def mean_std(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--init", choices=["uniform", "original"], default="uniform")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 epochs, seeds 0 1")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, [0, 1]
    torch.set_num_threads(args.threads)
    init = None if args.init == "uniform" else "original"
    splits = load("digits")
    print(machine())
    print(f"digits, epochs {args.epochs}, adam lr 1e-3, batch 64, seeds {args.seeds}, mixture init {args.init}")
    results: dict = {}
    t0 = time.perf_counter()
    for arch in args.archs:
        for mixed in (False, True):
            runs = [run_one(arch, s, mixed=mixed, epochs=args.epochs, init=init, splits=splits) for s in args.seeds]
            results[(arch, mixed)] = runs
    print("\n| model | activation | test accuracy % | test NLL |\n|---|---|---|---|")
    for (arch, mixed), runs in results.items():
        nll = [r["nll"] for r in runs]
        nll_s = f"{statistics.fmean(nll):.3f} ± {statistics.stdev(nll) if len(nll) > 1 else 0.0:.3f}"
        label = "ActivationMix (relu/gelu/silu/tanh)" if mixed else "ReLU"
        print(f"| {arch} | {label} | {mean_std([r['accuracy'] for r in runs])} | {nll_s} |")
    print("\nlearnt weights (mean over seeds) per layer, relu/gelu/silu/tanh:")
    for (arch, mixed), runs in results.items():
        if not mixed:
            continue
        for i, row in enumerate(runs[0]["mixtures"]):
            w = [statistics.fmean(r["mixtures"][i].weights[j] for r in runs) for j in range(len(row.weights))]
            print(f"  {arch} {row.name}: " + " ".join(f"{n}={v:.3f}" for n, v in zip(row.candidates, w, strict=True)))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    return results


if __name__ == "__main__":
    main()
