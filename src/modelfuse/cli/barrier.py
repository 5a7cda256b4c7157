"""``modelfuse barrier A B``: loss and accuracy along the straight line between two checkpoints.

Both checkpoints are loaded into one architecture (``--arch``, a zoo name or a factory
``package.module:function``), the interpolated models ``(1 - t) A + t B`` are evaluated at
``--points`` values of t on a dataset split, and the command prints a table with the loss
barrier (max loss on the path minus the mean of the endpoint losses) and writes a PNG plot.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from modelfuse.cli._models import add_pair_arguments


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "barrier",
        help="loss barrier between two checkpoints (table + PNG plot)",
        description="Evaluate loss and accuracy of (1 - t) A + t B at evenly spaced t in [0, 1] on a "
        "dataset split; print a table with the loss barrier and plot the path to a PNG. BatchNorm "
        "running statistics are interpolated too (no REPAIR).",
    )
    add_pair_arguments(p, split_default="test")
    p.add_argument("--points", type=int, default=25, help="number of t values, ends included (default 25)")
    p.add_argument("-o", "--output", default="barrier.png", help="PNG to write (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing PNG")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from modelfuse.align.barrier import loss_barrier
    from modelfuse.cli._models import load_pair
    from modelfuse.errors import ConfigError, OutputExistsError

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"-o {args.output}: the plot is written as PNG; give a path ending in .png")
    if out.exists() and not args.force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it or name another -o")
    splits, model_a, model_b = load_pair(args)
    result = loss_barrier(
        model_a,
        model_b,
        splits,
        split=args.split,
        points=args.points,
        batch_size=args.batch_size,
        device=args.device,
    )
    title = f"{Path(args.checkpoint_a).name} -> {Path(args.checkpoint_b).name} on {args.data} ({args.split})"
    result.plot(out, title=title)
    if args.json:
        print(json.dumps({**result.to_dict(), "plot": str(out)}, indent=1))
        return 0
    result.print(title=title)
    print(f"loss barrier {result.barrier:.4f}; plot written to {out}")
    return 0
