"""``modelfuse demo``: the main job on bundled data, end to end, from an empty cache in minutes.

Trains (or loads from the cache) a pool of small CNNs on scikit-learn's digits from
different seeds and shows each model's test accuracy and NLL next to the fusion
results that modelfuse offers. Later fusion levels add their rows here.
"""

from __future__ import annotations

import argparse
from typing import Any

#: the pool the demo fuses: small CNNs on digits from different seeds
DEMO_ARCH = "cnn"
DEMO_DATA = "digits"
DEMO_MEMBERS = 5
DEMO_EPOCHS = 20


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train (or load from cache) a pool of small CNNs on digits and fuse them",
        description="Train (or load from the cache, MODELFUSE_CACHE or ~/.cache/modelfuse) a pool "
        "of small CNNs on scikit-learn's digits from different seeds, then print each model's "
        "test accuracy and NLL next to the ensemble of their averaged probabilities.",
    )
    p.add_argument("--members", type=int, default=DEMO_MEMBERS, help="pool size (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs per member (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first member (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="retrain even if the pool is cached")
    p.set_defaults(run=run)


def pool_rows(members: int, epochs: int, seed: int, cache: bool = True) -> list[tuple[str, float, float]]:
    """(model, test accuracy, test NLL) for each member, the members' mean and their ensemble."""
    import torch

    from modelfuse.ensemble import Ensemble, metrics
    from modelfuse.errors import ConfigError
    from modelfuse.zoo import build_pool, predict

    if members < 1:
        raise ConfigError(f"--members must be at least 1, got {members}")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    seeds = list(range(seed, seed + members))
    pool = build_pool(DEMO_ARCH, DEMO_DATA, k=members, seeds=seeds, epochs=epochs, cache=cache)
    test = pool.data.test
    labels = torch.stack([test[i][1] for i in range(len(test))])

    def scores(log_probs: torch.Tensor) -> tuple[float, float]:
        return metrics.accuracy(log_probs, labels), metrics.nll(log_probs, labels)

    logits = torch.stack([predict(m, test).double() for m in pool.members])  # (K, N, classes)
    rows = [(f"member seed={s}", *scores(torch.log_softmax(z, dim=1))) for s, z in zip(seeds, logits)]
    rows.append(("members' mean", sum(r[1] for r in rows) / len(rows), sum(r[2] for r in rows) / len(rows)))
    ensemble = Ensemble(pool.members, "mean_prob")  # on the cached member predictions
    rows.append(("ensemble: mean of probabilities", *scores(ensemble.combine_outputs(logits))))
    return rows


def run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    start = time.perf_counter()
    rows = pool_rows(args.members, args.epochs, args.seed, cache=not args.no_cache)
    table = Table(title=f"{args.members} x '{DEMO_ARCH}' on {DEMO_DATA}, test split")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_column("test NLL", justify="right")
    for i, (name, acc, nll) in enumerate(rows):
        if i == args.members:
            table.add_section()
        style = "bold" if name.startswith("ensemble") else ""
        table.add_row(name, f"{100 * acc:.2f}%", f"{nll:.4f}", style=style)
    Console().print(table)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
