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
DEMO_EPOCHS = 15


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


def run(args: argparse.Namespace) -> int:
    import time

    import torch
    from rich.console import Console
    from rich.table import Table

    from modelfuse.errors import ConfigError
    from modelfuse.zoo import build_pool, predict

    if args.members < 1:
        raise ConfigError(f"--members must be at least 1, got {args.members}")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    console = Console()
    start = time.perf_counter()
    seeds = list(range(args.seed, args.seed + args.members))
    pool = build_pool(
        DEMO_ARCH, DEMO_DATA, k=args.members, seeds=seeds, epochs=args.epochs, cache=not args.no_cache
    )
    test = pool.data.test
    labels = torch.stack([test[i][1] for i in range(len(test))])
    logits = [predict(m, test) for m in pool.members]

    def scores(log_probs: torch.Tensor) -> tuple[float, float]:
        acc = (log_probs.argmax(1) == labels).double().mean().item()
        nll = torch.nn.functional.nll_loss(log_probs.double(), labels).item()
        return acc, nll

    table = Table(title=f"{args.members} x '{DEMO_ARCH}' on {DEMO_DATA} (test split, n={len(labels)})")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_column("test NLL", justify="right")
    member_scores = []
    for seed, z in zip(seeds, logits):
        acc, nll = scores(torch.log_softmax(z.double(), dim=1))
        member_scores.append((acc, nll))
        table.add_row(f"member seed={seed}", f"{100 * acc:.2f}%", f"{nll:.4f}")
    table.add_section()
    mean_acc = sum(a for a, _ in member_scores) / len(member_scores)
    mean_nll = sum(n for _, n in member_scores) / len(member_scores)
    table.add_row("[italic]members' mean[/italic]", f"{100 * mean_acc:.2f}%", f"{mean_nll:.4f}")
    probs = torch.stack([torch.softmax(z.double(), dim=1) for z in logits]).mean(0)
    acc, nll = scores(probs.clamp_min(1e-300).log())
    table.add_row(
        "[bold]ensemble: mean of probabilities[/bold]", f"[bold]{100 * acc:.2f}%", f"[bold]{nll:.4f}"
    )
    console.print(table)
    console.print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
