"""``modelfuse ensemble CKPT...``: evaluate trained checkpoints as an ensemble on a dataset.

Each checkpoint is loaded into an architecture from the zoo registry (``--arch cnn``) or a
user's factory (``--arch package.module:function``), every member predicts the chosen split
once, and a table shows each member and the ensemble with accuracy, NLL, Brier score and
ECE. ``--fit`` first fits member weights, a temperature, a stacker or a greedy selection
on the validation split. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

FITS = ("weights", "temperature", "stacking", "stacking-mlp", "greedy")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ensemble",
        help="evaluate checkpoints as an ensemble (members vs ensemble: accuracy, NLL, Brier, ECE)",
        description="Load trained checkpoints (safetensors or PyTorch files) into their architecture, "
        "predict a dataset split with each, and print each member next to their ensemble with "
        "accuracy, NLL, Brier score and ECE. With --fit, member weights / a temperature / a "
        "stacking meta-learner / a greedy selection are fitted on the validation split first.",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="one trained model per file")
    p.add_argument(
        "--arch",
        action="append",
        required=True,
        metavar="NAME|MODULE:FUNCTION",
        help="architecture: a zoo name (cnn, mlp, ...) or a factory 'package.module:function' called "
        "with input_shape= and num_classes= when it takes them; once for all checkpoints or once per "
        "checkpoint, in order",
    )
    p.add_argument(
        "--arch-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of the architecture (YAML value), e.g. width=32; repeatable",
    )
    p.add_argument("--data", default="digits", help="dataset name (default %(default)s)")
    p.add_argument(
        "--data-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of the dataset (YAML value), e.g. upsample=true or root=./images; repeatable",
    )
    p.add_argument("--combine", default="mean_prob", help="combiner (default %(default)s)")
    p.add_argument("--weights", type=float, nargs="+", metavar="W", help="one weight per checkpoint")
    p.add_argument("--fit", choices=FITS, help="fit on the validation split first, then evaluate")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split to evaluate on")
    p.add_argument("--batch-size", type=int, default=512, help="prediction batch size (default 512)")
    p.add_argument("--device", default="cpu", help="where to run the members (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")
    p.set_defaults(run=run)


def evaluate_checkpoints(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command prints, as a JSON-ready dict."""
    from pathlib import Path

    import torch

    from modelfuse import data as mf_data
    from modelfuse.cli._args import key_values
    from modelfuse.ensemble import (
        Ensemble,
        GreedySelection,
        LearnedWeights,
        Stacking,
        get_combiner,
        metrics,
    )
    from modelfuse.errors import ConfigError
    from modelfuse.io import load_into
    from modelfuse.zoo import build_architecture, compare_predictions, predict, room_for_fusion

    paths = [Path(p) for p in args.checkpoints]
    archs = list(args.arch)
    if len(archs) == 1:
        archs = archs * len(paths)
    if len(archs) != len(paths):
        raise ConfigError(
            f"{len(archs)} --arch for {len(paths)} checkpoints: give one --arch for all, or one per checkpoint"
        )
    combiner = get_combiner(args.combine)
    if combiner.task != "classification":
        raise ConfigError(
            f"the ensemble command evaluates classifiers; the {args.combine!r} combiner is for {combiner.task}"
        )
    if args.fit and args.combine != "mean_prob":
        raise ConfigError(f"--fit {args.fit} fits its own combination; leave out --combine {args.combine}")
    if args.fit and args.weights:
        raise ConfigError(f"--fit {args.fit} fits the weights; leave out --weights")
    if args.fit and args.split == "val":
        raise ConfigError(
            f"--fit {args.fit} fits on the validation split, so evaluating it there (--split val) would "
            "measure the fit on its own data; leave out --split val to evaluate on the test split"
        )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    arch_options = key_values(args.arch_option, "--arch-option", "width=32")
    splits = mf_data.load(args.data, **key_values(args.data_option, "--data-option", "upsample=true"))
    members = []
    for path, arch in zip(paths, archs):
        model = build_architecture(
            arch, input_shape=splits.input_shape, num_classes=splits.num_classes, options=arch_options
        )
        members.append(load_into(model, path).to(args.device).eval())
    ensemble = Ensemble(members, args.combine, args.weights)  # checks the weights before any prediction

    def stacked(dataset: Any) -> torch.Tensor:
        outs = [predict(m, dataset, batch_size=args.batch_size, device=args.device) for m in members]
        for i, out in enumerate(outs):
            if out.dim() != 2 or out.shape != outs[0].shape:
                raise ConfigError(
                    f"{paths[i]} ({archs[i]}) predicts outputs of shape {tuple(out.shape)}, {paths[0]} "
                    f"{tuple(outs[0].shape)}: members must give logits over the same classes"
                )
        return torch.stack(outs).double()

    dataset = splits.test if args.split == "test" else splits.val
    labels = mf_data.labels_of(dataset).long()
    logits = stacked(dataset)
    ensemble_log_probs = ensemble.combine_outputs(logits)
    member_rows = [
        {"name": p.name, "path": str(p), "arch": a, **metrics.prediction_metrics(torch.log_softmax(z, -1), labels)}
        for p, a, z in zip(paths, archs, logits)
    ]
    result: dict[str, Any] = {
        "data": args.data,
        "split": args.split,
        "samples": len(labels),
        "members": member_rows,
        "members_mean": {
            key: sum(r[key] for r in member_rows) / len(member_rows)
            for key in ("accuracy", "nll", "brier", "ece")
        },
        "disagreement": metrics.disagreement(logits.argmax(-1)),
        "ensemble": {"combine": args.combine, **metrics.prediction_metrics(ensemble_log_probs, labels)},
    }
    # is the ensemble really better than its best member (highest accuracy, then lowest NLL), and
    # how many of that member's errors do the others get right?
    names = [r["name"] for r in member_rows]
    if len(set(names)) < len(names):  # the same file name in two folders, or one file twice
        names = [f"{i}: {r['path']}" for i, r in enumerate(member_rows)]
    if len(member_rows) > 1:
        room = room_for_fusion(logits, labels, names=names)
        result["room"] = room.as_dict()
        best = room.best
    else:
        best = 0
    comparison = compare_predictions(ensemble_log_probs, logits[best], labels)
    result["comparison"] = {"against": member_rows[best]["name"], **comparison.as_dict()}
    for row, w in zip(member_rows, ensemble.weights.tolist()):
        row["weight"] = w
    if args.fit:
        val_logits = stacked(splits.val)
        val_labels = mf_data.labels_of(splits.val).long()
        fitted: dict[str, Any] = {"method": args.fit}
        if args.fit in ("weights", "temperature"):
            fit = LearnedWeights(temperature=args.fit == "temperature").fit(val_logits, val_labels)
            module = fit.ensemble(members)
            log_probs = module.combine_outputs(logits)
            fitted.update(weights=fit.weights_.tolist(), temperature=fit.temperature_, val_nll=fit.nll_)
        elif args.fit == "greedy":
            fit = GreedySelection().fit(val_logits, val_labels)
            log_probs = fit.ensemble(members).combine_outputs(logits)
            fitted.update(weights=fit.weights_.tolist(), picks=fit.picks_, val_nll=fit.trajectory_[-1])
        else:
            fit = Stacking("mlp" if args.fit == "stacking-mlp" else "logistic").fit(val_logits, val_labels)
            log_probs = fit.predict_log_proba(logits)
            fitted.update(val_nll_out_of_fold=fit.oof_nll_, val_nll_mean=fit.mean_nll_)
        fitted.update(metrics.prediction_metrics(log_probs, labels))
        fitted["comparison"] = {
            "against": member_rows[best]["name"],
            **compare_predictions(log_probs, logits[best], labels).as_dict(),
        }
        result["fitted"] = fitted
    return result


def _finite_or_null(value: Any) -> Any:
    """Infinite or NaN metrics (a vote's NLL when a label got no vote) as JSON null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def _number(value: float, fmt: str) -> str:
    return format(value, fmt) if math.isfinite(value) else str(value)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from modelfuse.zoo import FusionRoom, PairedComparison

    result = evaluate_checkpoints(args)
    if args.json:
        print(json.dumps(_finite_or_null(result), indent=1, allow_nan=False))
        return 0
    table = Table(title=f"{len(result['members'])} members on {result['data']}, {result['split']} split")
    for column, justify in (("model", "left"), ("weight", "right"), ("accuracy", "right"), ("NLL", "right")):
        table.add_column(column, justify=justify)
    table.add_column("Brier", justify="right")
    table.add_column("ECE", justify="right")
    fitted_weights = result.get("fitted", {}).get("weights")

    def cells(row: dict[str, Any]) -> list[str]:
        return [
            f"{100 * row['accuracy']:.2f}%",
            _number(row["nll"], ".4f"),
            _number(row["brier"], ".4f"),
            _number(row["ece"], ".4f"),
        ]

    for i, row in enumerate(result["members"]):
        weight = fitted_weights[i] if fitted_weights else row["weight"]
        table.add_row(f"{row['name']} ({row['arch']})", f"{weight:.3f}", *cells(row))
    table.add_section()
    table.add_row("members' mean", "", *cells(result["members_mean"]))
    table.add_row(f"ensemble: {result['ensemble']['combine']}", "", *cells(result["ensemble"]), style="bold")
    if "fitted" in result:
        fitted = result["fitted"]
        extra = f", T={fitted['temperature']:.3f}" if fitted.get("temperature", 1.0) != 1.0 else ""
        table.add_row(f"fitted on val: {fitted['method']}{extra}", "", *cells(fitted), style="bold")
    Console().print(table)
    print(f"pairwise disagreement of the members: {result['disagreement']:.4f} ({result['samples']} samples)")
    if "room" in result:
        print(FusionRoom.from_dict(result["room"]).describe())
    comparison = PairedComparison.from_dict(result["comparison"])
    print(comparison.describe("ensemble", result["comparison"]["against"]))
    if "fitted" in result:
        fitted_comparison = result["fitted"]["comparison"]
        print(
            PairedComparison.from_dict(fitted_comparison).describe(
                f"fitted ({result['fitted']['method']})", fitted_comparison["against"]
            )
        )
    return 0
