"""``modelfuse fuse-features RECIPE.yaml -o OUT``: train one head on the fused features of several backbones.

The recipe (``modelfuse.features.recipe``) names the branches (architecture, optional local
weights, tap, training policy), the fusion operator, the head, the data and the training
settings. The fused model is trained through the shared loop (on cached features when every
backbone is frozen) and written atomically to OUT: ``model.safetensors`` (the whole
``FeatureFusion`` state dict), ``recipe.yaml`` (the recipe as validated) and ``metrics.json``.
With ``compare: true`` each branch alone is trained with the same head and budget, the table
sets them against the fused model, and a paired bootstrap over the test samples
(``modelfuse.zoo.compare_predictions``) says whether the fused model's difference from the best
branch is more than noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fuse-features",
        help="train one head on the fused features of several backbones (a YAML recipe)",
        description="Tap several backbones (zoo, torchvision or your own factory; weights from local "
        "files), align and fuse their features (concat, sum, mean, weighted, gated, attention, "
        "bilinear), train one head on a dataset, print test accuracy and NLL (of each branch alone "
        "with the same head budget too, with compare: true) and write the fused model atomically.",
    )
    p.add_argument("recipe", help="the YAML recipe (see modelfuse.features.recipe)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--device", default="cpu", help="where to train (default cpu)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p.set_defaults(run=run)


def build_branches(recipe: Any, splits: Any) -> list[Any]:
    """The recipe's branches with their backbones built (branch i's initial weights from seed
    ``train.seed + i``) and their weights loaded."""
    import torch

    from modelfuse.errors import FusionError
    from modelfuse.features import Branch
    from modelfuse.io import load_into
    from modelfuse.zoo import build_architecture

    branches = []
    for i, spec in enumerate(recipe.branches):
        label = f"branches[{i}]" + (f" ({spec.name})" if spec.name else "")
        try:
            # an untrained backbone's weights follow the recipe's seed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(recipe.train.seed) + i)
                model = build_architecture(
                    spec.model,
                    input_shape=splits.input_shape,
                    num_classes=splits.num_classes,
                    options=spec.options,
                )
            if spec.weights is not None:
                load_into(model, spec.weights)
            branches.append(
                Branch(
                    model,
                    spec.tap,
                    policy=spec.policy,
                    lr=spec.lr,
                    unfreeze_from=spec.unfreeze_from,
                    name=spec.name,
                    layout=spec.layout,
                )
            )
        except FusionError as exc:
            raise type(exc)(f"{label}: {exc}") from None
    return branches


def fuse_and_train(
    recipe: Any, branches: list[Any], splits: Any, test_labels: torch.Tensor, device: str
) -> tuple[Any, dict[str, Any], torch.Tensor]:
    """Build the FeatureFusion of ``branches`` as the recipe says, train it, and return it with its
    test metrics (against ``test_labels``, the labels of ``splits.test``) and its test logits."""
    from modelfuse.features import FeatureFusion, fit_feature_fusion
    from modelfuse.zoo import predict
    from modelfuse.zoo.metrics import accuracy_nll

    model = FeatureFusion(
        branches,
        fuse=recipe.fuse,
        num_classes=splits.num_classes,
        hidden=tuple(recipe.head.hidden),
        dropout=recipe.head.dropout,
        head_norm=recipe.head.norm,
        level=recipe.level,
        spatial=recipe.spatial,
        size=recipe.size,
        channels=recipe.channels,
        fuse_options=recipe.fuse_options,
        input_shape=splits.input_shape,
        seed=recipe.train.seed,
    )
    t = recipe.train
    fit = fit_feature_fusion(
        model,
        splits,
        epochs=t.epochs,
        seed=t.seed,
        cache=t.cache,
        lr=t.lr,
        batch_size=t.batch_size,
        device=device,
        optimizer=t.optimizer,
        weight_decay=t.weight_decay,
        schedule=t.schedule,
    )
    logits = predict(model, splits.test, device=device).float()
    return (
        model,
        {
            **{f"test_{key}": value for key, value in accuracy_nll(logits, test_labels).items()},
            "cached": fit.cached,
            "seconds": fit.result.seconds + fit.cache_seconds,
            "history": fit.history,
        },
        logits,
    )


def run(args: argparse.Namespace) -> int:
    import copy

    import yaml

    from modelfuse import data as mf_data
    from modelfuse.data.splits import labels_of
    from modelfuse.features.recipe import load_feature_recipe
    from modelfuse.io import CheckpointWriter
    from modelfuse.zoo import compare_predictions, room_for_fusion

    recipe = load_feature_recipe(args.recipe)
    inputs = [b.weights for b in recipe.branches if b.weights] + [args.recipe]
    out = Path(args.out)
    writer = CheckpointWriter(out, force=args.force, protect=inputs)
    writer.check()  # before any training: an existing output or an input in the way fails now
    splits = mf_data.load(recipe.data.name, **recipe.data.options)
    branches = build_branches(recipe, splits)
    test_labels = labels_of(splits.test)  # read once: a dataset without targets loads every sample
    rows: dict[str, dict[str, Any]] = {}
    alone_logits: dict[str, torch.Tensor] = {}
    if recipe.compare and len(branches) > 1:
        for branch in branches:
            name = f"{branch.name or branch.tap} alone"
            _, rows[name], alone_logits[name] = fuse_and_train(
                recipe, [copy.deepcopy(branch)], splits, test_labels, args.device
            )
    fused = f"fused ({recipe.fuse})"
    model, rows[fused], fused_logits = fuse_and_train(recipe, branches, splits, test_labels, args.device)
    comparison = room = None
    if alone_logits:
        # against the best branch alone (highest test accuracy, then lowest NLL), and how many of
        # its errors the other branches get right
        room = room_for_fusion(list(alone_logits.values()), test_labels, names=list(alone_logits))
        result = compare_predictions(fused_logits, alone_logits[room.best_name], test_labels)
        comparison = {"fused": fused, "against": room.best_name, **result.as_dict()}
    with writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor.detach().cpu().contiguous())
        writer.write_text("recipe.yaml", yaml.safe_dump(recipe.model_dump(), sort_keys=False))
        metrics: dict[str, Any] = {
            name: {k: v for k, v in m.items() if k != "history"} for name, m in rows.items()
        }
        if comparison is not None:
            metrics["comparison"] = comparison
            metrics["room"] = room.as_dict()
        writer.write_json("metrics.json", metrics)
    if args.json:
        room_dict = room.as_dict() if room is not None else None
        print(
            json.dumps(
                {"output": str(out), "models": rows, "comparison": comparison, "room": room_dict}, indent=1
            )
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"feature fusion on {recipe.data.name}, test split ({len(splits.test)} samples)")
    for column in ("model", "test accuracy", "test NLL", "features cached", "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, m in rows.items():
        style = "bold" if name.startswith("fused") else ""
        table.add_row(
            name,
            f"{100 * m['test_accuracy']:.2f}%",
            f"{m['test_nll']:.4f}",
            "yes" if m["cached"] else "no",
            f"{m['seconds']:.1f}",
            style=style,
        )
    Console().print(table)
    if comparison is not None:
        print(room.describe())
        print(result.describe(fused, comparison["against"]))
    print(f"wrote {out}")
    return 0
