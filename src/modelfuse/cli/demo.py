"""``modelfuse demo``: the main job on bundled data, end to end, from an empty cache in minutes.

Trains (or loads from the cache) a pool of small CNNs on scikit-learn's digits from
different seeds and shows each model's test accuracy and NLL next to what every available
fusion level makes of them: output fusion (the ensemble, fitted weights and temperature, a
distilled student), feature fusion (the members' features under one new head), structure
fusion (two members stitched) and parameter fusion (a model soup of fine-tunes of one
base). Fusion levels still to come add their rows here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

#: the pool the demo fuses: small CNNs on digits from different seeds
DEMO_ARCH = "cnn"
DEMO_DATA = "digits"
DEMO_MEMBERS = 5
DEMO_EPOCHS = 20
#: where the stitched model joins member 0's front to member 1's back
DEMO_STITCH_AT = "features.conv2"
#: share of the training split each fine-tune of the parameter-fusion base sees
DEMO_FINETUNE_FRACTION = 0.5


@dataclass
class DemoRow:
    """One table row: the fusion ``level``, the model's ``name`` and its test figures."""

    level: str
    name: str
    accuracy: float
    nll: float


@dataclass
class DemoResult:
    """The rows, and what they were computed from (for inspection and tests): the seed pool
    (its test predictions come from ``predict``), the fitted ensemble weights and temperature, and the
    fused models by row key (``student``, ``features``, ``stitched``, ``soup``), with the
    fine-tuned pool the soup averages, and the seed pool's :class:`~modelfuse.zoo.FusionRoom`
    (None for one member)."""

    rows: list[DemoRow]
    pool: Any
    fitted_weights: list[float]
    fitted_temperature: float
    models: dict[str, Any] = field(default_factory=dict)
    finetune_pool: Any = None
    room: Any = None


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="train (or load from cache) a pool of small CNNs on digits and fuse them at every level",
        description="Train (or load from the cache, MODELFUSE_CACHE or ~/.cache/modelfuse) a pool "
        "of small CNNs on scikit-learn's digits from different seeds, then print each model's "
        "test accuracy and NLL next to their fusions: the ensemble (plain, and with weights and a "
        "temperature fitted on validation), a student distilled from it, their features under one "
        "new head, two members stitched, and a model soup of fine-tunes of one base.",
    )
    p.add_argument("--members", type=int, default=DEMO_MEMBERS, help="pool size (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs per member (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first member (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="retrain even if the pool is cached")
    p.set_defaults(run=run)


def demo_rows(members: int, epochs: int, seed: int, cache: bool = True) -> DemoResult:
    """Train (or load) the pool and fuse it at every available level; see :class:`DemoResult`.

    Budgets follow ``epochs``: the distilled student and the fused features' head train as
    long as a member, the fine-tunes for a quarter of it (at least one epoch), the stitching
    adapter for an eighth.
    """
    import torch

    from modelfuse.data import labels_of
    from modelfuse.ensemble import Ensemble, LearnedWeights, distill, metrics
    from modelfuse.errors import ConfigError
    from modelfuse.features import Branch, FeatureFusion, fit_feature_fusion
    from modelfuse.merge import merge_state_dicts
    from modelfuse.structure import stitch_models
    from modelfuse.zoo import build_finetune_pool, build_pool, create_model, predict, room_for_fusion

    if members < 1:
        raise ConfigError(f"--members must be at least 1, got {members}")
    if epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}")
    seeds = list(range(seed, seed + members))
    pool = build_pool(DEMO_ARCH, DEMO_DATA, k=members, seeds=seeds, epochs=epochs, cache=cache)
    data = pool.data
    labels = labels_of(data.test).long()
    short = max(1, epochs // 4)

    def row(level: str, name: str, log_probs: torch.Tensor) -> DemoRow:
        return DemoRow(level, name, metrics.accuracy(log_probs, labels), metrics.nll(log_probs, labels))

    def model_row(level: str, name: str, model: torch.nn.Module) -> DemoRow:
        return row(level, name, torch.log_softmax(predict(model, data.test).double(), dim=1))

    def mean_row(level: str, name: str, of: list[DemoRow]) -> DemoRow:
        return DemoRow(level, name, sum(r.accuracy for r in of) / len(of), sum(r.nll for r in of) / len(of))

    logits = torch.stack([predict(m, data.test).double() for m in pool.members])  # (K, N, classes)
    rows = [row("members", f"member seed={s}", torch.log_softmax(z, dim=1)) for s, z in zip(seeds, logits)]
    rows.append(mean_row("members", "members' mean", rows))
    # output fusion: on the cached member predictions
    rows.append(
        row("output", "ensemble: mean of probabilities", Ensemble(pool.members).combine_outputs(logits))
    )
    val_logits = torch.stack([predict(m, data.val).double() for m in pool.members])
    fit = LearnedWeights(temperature=True).fit(val_logits, labels_of(data.val).long())
    rows.append(
        row(
            "output",
            "ensemble: weights + T fitted on val",
            fit.ensemble(pool.members).combine_outputs(logits),
        )
    )
    student = distill(DEMO_ARCH, pool.members, data, epochs=epochs, seed=seed + members).student
    rows.append(model_row("output", f"distilled into one {DEMO_ARCH}", student))
    # feature fusion: the members frozen, their features concatenated under one new head
    features = FeatureFusion(
        [Branch(m, "features", name=f"seed{s}") for s, m in zip(seeds, pool.members)],
        fuse="concat",
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        seed=seed,
    )
    fit_feature_fusion(features, data, epochs=epochs, seed=seed, progress=False)
    rows.append(model_row("feature", f"{members} members' features, one new head", features))
    models: dict[str, Any] = {"student": student, "features": features}
    # structure fusion: member 0's front, a least-squares adapter, member 1's back
    if members > 1:
        stitched, _ = stitch_models(
            pool.members[0], pool.members[1], DEMO_STITCH_AT, data, epochs=max(1, epochs // 8), seed=seed
        )
        models["stitched"] = stitched
        rows.append(
            model_row(
                "structure",
                f"stitched: seed={seeds[0]} front, seed={seeds[1]} back",
                stitched,
            )
        )
    # parameter fusion: independent seeds do not average; fine-tunes of one base do (a model soup)
    tasks = [{"fraction": DEMO_FINETUNE_FRACTION, "seed": s} for s in seeds]
    finetuned = build_finetune_pool(
        DEMO_ARCH, data, tasks, pretrain_epochs=epochs, finetune_epochs=short, seed=seed, cache=cache
    )
    tuned = [model_row("parameter", "", m) for m in finetuned.members]
    rows.append(mean_row("parameter", f"{members} fine-tunes of one base: mean", tuned))
    soup = create_model(DEMO_ARCH, input_shape=data.input_shape, num_classes=data.num_classes)
    soup.load_state_dict(merge_state_dicts("linear", finetuned.members))
    models["soup"] = soup
    rows.append(model_row("parameter", f"model soup of the {members} fine-tunes", soup))
    room = room_for_fusion(logits, labels, names=[f"seed={s}" for s in seeds]) if members > 1 else None
    return DemoResult(
        room=room,
        rows=rows,
        pool=pool,
        fitted_weights=fit.weights_.tolist(),
        fitted_temperature=float(fit.temperature_),
        models=models,
        finetune_pool=finetuned,
    )


def run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    start = time.perf_counter()
    result = demo_rows(args.members, args.epochs, args.seed, cache=not args.no_cache)
    table = Table(title=f"{args.members} x '{DEMO_ARCH}' on {DEMO_DATA}, test split, fused at every level")
    table.add_column("level")
    table.add_column("model")
    table.add_column("test accuracy", justify="right")
    table.add_column("test NLL", justify="right")
    level = None
    for row in result.rows:
        if level is not None and row.level != level:
            table.add_section()
        style = "" if row.level == "members" or row.name.endswith("base: mean") else "bold"
        table.add_row(
            row.level if row.level != level else "",
            row.name,
            f"{100 * row.accuracy:.2f}%",
            f"{row.nll:.4f}",
            style=style,
        )
        level = row.level
    Console().print(table)
    if result.room is not None:
        print(result.room.describe())
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
