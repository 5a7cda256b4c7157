"""Feature caching: training a fusion head on cached tap features against recomputing the backbones.

With every branch frozen, ``fit_feature_fusion`` computes each branch's (prepared) tap features
once per dataset and trains the projections, operator and head on them; without caching, every
step runs the frozen backbones again. Both train the same head from the same seed on the same
batches: the script runs them side by side and prints the wall time of each (the cached one split
into building the cache and training), their ratio, the largest difference between the two trained
heads, and the test accuracy of both.

Cases: the zoo's ``vgg_small`` + ``resnet_small`` (trained ``--pretrain-epochs`` on the digits
first, untimed; not at all with ``--quick``, whose accuracies are then at chance) and torchvision's VGG-16 + ResNet-18 (random weights: timing only, their accuracy
means nothing), on scikit-learn digits upsampled to 3x32x32, features concatenated.

Run: ``.venv/bin/python benchmarks/feature_cache.py [--quick] [--epochs 10] [--cases zoo,torchvision]``
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Subset

from _machine import load_average, machine
from modelfuse.data import Splits, load
from modelfuse.features import Branch, FeatureFusion, fit_feature_fusion
from modelfuse.zoo import create_model, evaluate, train

SHAPE = (3, 32, 32)


def zoo_branches(seed: int, data: Splits, pretrain_epochs: int) -> list[Branch]:
    """The zoo backbones, trained briefly on the digits first (frozen random features are near-constant)."""
    torch.manual_seed(seed)
    vgg = create_model("vgg_small", input_shape=SHAPE, num_classes=10)
    resnet = create_model("resnet_small", input_shape=SHAPE, num_classes=10)
    for model in (vgg, resnet):
        if pretrain_epochs > 0:
            train(model, data.train, epochs=pretrain_epochs, seed=seed, lr=3e-3, progress=False)
    return [Branch(vgg, "features", name="vgg"), Branch(resnet, "layers", name="resnet")]


def torchvision_branches(seed: int, data: Splits, pretrain_epochs: int) -> list[Branch]:
    """torchvision's VGG-16 and ResNet-18 with random weights (timing only; accuracy means nothing here)."""
    from torchvision.models import resnet18, vgg16

    torch.manual_seed(seed)
    return [
        Branch(vgg16(weights=None), "features", name="vgg"),
        Branch(resnet18(weights=None), "layer4", name="resnet"),
    ]


CASES: dict[str, tuple[str, Callable[[int, Splits, int], list[Branch]]]] = {
    "zoo": ("zoo vgg_small + resnet_small", zoo_branches),
    "torchvision": ("torchvision VGG-16 + ResNet-18", torchvision_branches),
}


@dataclass
class Row:
    case: str
    train_samples: int
    epochs: int
    steps: int
    recompute_s: float
    cache_build_s: float
    cached_train_s: float
    max_head_diff: float
    test_acc_recompute: float
    test_acc_cached: float

    @property
    def cached_total_s(self) -> float:
        return self.cache_build_s + self.cached_train_s

    @property
    def speedup(self) -> float:
        return self.recompute_s / self.cached_total_s


def fusion_of(branches: list[Branch]) -> FeatureFusion:
    return FeatureFusion(branches, fuse="concat", num_classes=10, input_shape=SHAPE, seed=0)


def measure(key: str, epochs: int, train_fraction: float, batch_size: int, pretrain_epochs: int) -> Row:
    label, make = CASES[key]
    data = load("digits", upsample=True)
    train_set = data.train
    if train_fraction < 1.0:
        train_set = Subset(train_set, list(range(round(len(train_set) * train_fraction))))
    branches = make(0, data, pretrain_epochs)
    fused_r = fusion_of(branches)
    fused_c = fusion_of([replace(b, model=copy.deepcopy(b.model)) for b in branches])
    warm = torch.stack([data.train[i][0] for i in range(2)])
    for fused in (fused_r, fused_c):  # traced and run once, untimed, as a user's module would be
        with torch.no_grad():
            fused.eval()(warm)
    common = {"epochs": epochs, "seed": 0, "batch_size": batch_size, "progress": False}
    start = time.perf_counter()
    fit_feature_fusion(fused_r, train_set, cache=False, **common)
    recompute = time.perf_counter() - start
    start = time.perf_counter()
    fit_c = fit_feature_fusion(fused_c, train_set, cache=True, **common)
    cached_total = time.perf_counter() - start
    heads = [
        {k: v for k, v in m.state_dict().items() if not k.startswith("branches.")} for m in (fused_r, fused_c)
    ]
    diff = max(float((heads[0][k] - heads[1][k]).abs().max()) for k in heads[0])
    return Row(
        case=label,
        train_samples=len(train_set),
        epochs=epochs,
        steps=fit_c.result.steps,
        recompute_s=recompute,
        cache_build_s=fit_c.cache_seconds,
        cached_train_s=cached_total - fit_c.cache_seconds,
        max_head_diff=diff,
        test_acc_recompute=evaluate(fused_r, data.test)["accuracy"],
        test_acc_cached=evaluate(fused_c, data.test)["accuracy"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="zoo,torchvision", help="comma-separated of zoo, torchvision")
    parser.add_argument("--epochs", type=int, default=10, help="head training epochs (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="training batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--train-fraction", type=float, default=1.0, help="share of the digits train split used"
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=3,
        help="epochs the zoo backbones train first, untimed (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: zoo backbones only (not pretrained: timing only), 3 head epochs, a quarter of the train split",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.quick:
        cases, args.epochs, args.train_fraction = ["zoo"], min(args.epochs, 3), min(args.train_fraction, 0.25)
        args.pretrain_epochs = 0
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    print(machine())
    print(
        f"head training, frozen backbones, fuse='concat'; {args.epochs} epochs, batch {args.batch_size}; "
        "recompute: backbones every step; cached: tap features computed once, then the head\n",
        flush=True,
    )
    rows = []
    for key in cases:
        row = measure(key, args.epochs, args.train_fraction, args.batch_size, args.pretrain_epochs)
        rows.append(row)
        print(
            f"measured {row.case}: recompute {row.recompute_s:.2f} s, cached {row.cached_total_s:.2f} s",
            flush=True,
        )
    print(
        "\n| backbones | train samples | epochs | steps | recompute s | cache build s | cached train s "
        "| cached total s | recompute / cached | max head diff | test acc (recompute, cached) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(
            f"| {r.case} | {r.train_samples} | {r.epochs} | {r.steps} | {r.recompute_s:.2f} | {r.cache_build_s:.2f} "
            f"| {r.cached_train_s:.2f} | {r.cached_total_s:.2f} | **{r.speedup:.1f}x** | {r.max_head_diff:.1e} "
            f"| {r.test_acc_recompute:.3f}, {r.test_acc_cached:.3f} |"
        )
    print(f"\nload average now {load_average()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                [{**asdict(r), "cached_total_s": r.cached_total_s, "speedup": r.speedup} for r in rows],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
