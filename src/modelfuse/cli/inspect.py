"""``modelfuse inspect PATH``: what a checkpoint holds, grouped by layer, without loading it."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="list a checkpoint's tensors, shapes, dtypes and sizes",
        description="List a checkpoint's tensors (safetensors file, Hugging Face folder, "
        "sharded or not, PyTorch .pt/.pth/.bin) grouped by layer prefix, with parameter "
        "counts and size on disk. Reads headers only, never the weights.",
    )
    p.add_argument("path", help="checkpoint file or folder")
    p.add_argument("--json", action="store_true", help="print JSON for machines instead of a table")
    p.add_argument("--summary", action="store_true", help="one row per group instead of per tensor")
    p.add_argument(
        "--depth",
        type=int,
        default=None,
        metavar="N",
        help="group by the first N name components (default: up to the layer number)",
    )
    p.set_defaults(run=run)


def layer_group(name: str, depth: int | None = None) -> str:
    """The layer a tensor belongs to: 'encoder.layer.3.attn.q.weight' -> 'encoder.layer.3'.

    Without ``depth``: everything up to the first numeric component, else the first component.
    """
    parts = name.split(".")
    if depth is not None:
        return ".".join(parts[: max(1, min(depth, len(parts) - 1))]) or name
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else name


def summarize(ckpt: Any, depth: int | None = None) -> dict[str, Any]:
    """A JSON-ready description of a checkpoint (the ``--json`` output)."""
    import math

    groups: dict[str, dict[str, Any]] = {}
    dtypes: Counter[str] = Counter()
    for name in ckpt:
        shape = list(ckpt.shape(name))
        dtype = str(ckpt.dtype(name)).removeprefix("torch.")
        numel = math.prod(shape)
        nbytes = ckpt.nbytes(name)
        dtypes[dtype] += numel
        g = groups.setdefault(
            layer_group(name, depth),
            {"num_tensors": 0, "num_parameters": 0, "nbytes": 0, "tensors": []},
        )
        g["num_tensors"] += 1
        g["num_parameters"] += numel
        g["nbytes"] += nbytes
        g["tensors"].append({"name": name, "shape": shape, "dtype": dtype, "numel": numel, "nbytes": nbytes})
    config = ckpt.config or {}
    return {
        "path": str(ckpt.path) if ckpt.path is not None else None,
        "format": ckpt.format,
        "files": [str(f) for f in ckpt.files],
        "ignored": [str(f) for f in ckpt.ignored],
        "size_on_disk": ckpt.size_on_disk,
        "num_tensors": len(ckpt),
        "num_parameters": sum(g["num_parameters"] for g in groups.values()),
        "nbytes": sum(g["nbytes"] for g in groups.values()),
        "dtypes": dict(dtypes),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "metadata": dict(ckpt.metadata),
        "groups": [{"name": k, **v} for k, v in groups.items()],
    }


def _print_table(info: dict[str, Any], summary_only: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from modelfuse.cli._format import human_bytes, human_count

    console = Console()
    files = info["files"]
    console.print(f"[bold]{info['path']}[/bold]  format: {info['format']}, {len(files)} file(s)")
    if info["ignored"]:
        console.print(f"[yellow]ignored (another weight format): {', '.join(info['ignored'])}[/yellow]")
    if info["model_type"] or info["architectures"]:
        arch = ", ".join(info["architectures"] or [])
        console.print(f"model_type: {info['model_type']}  architectures: {arch}")
    table = Table(show_lines=False, header_style="bold")
    table.add_column("tensor" if not summary_only else "group", overflow="fold")
    if not summary_only:
        table.add_column("shape")
        table.add_column("dtype")
    else:
        table.add_column("tensors", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("size", justify="right")
    for g in info["groups"]:
        if summary_only:
            table.add_row(
                g["name"], str(g["num_tensors"]), human_count(g["num_parameters"]), human_bytes(g["nbytes"])
            )
            continue
        table.add_row(
            f"[bold cyan]{g['name']}[/bold cyan] ({g['num_tensors']} tensors)",
            "",
            "",
            f"[bold]{human_count(g['num_parameters'])}[/bold]",
            f"[bold]{human_bytes(g['nbytes'])}[/bold]",
        )
        for t in g["tensors"]:
            name = t["name"]
            short = name[len(g["name"]) :] if name.startswith(g["name"] + ".") else name
            table.add_row(
                "  " + short,
                str(tuple(t["shape"])),
                t["dtype"],
                f"{t['numel']:,}",
                human_bytes(t["nbytes"]),
            )
    console.print(table)
    dtypes = ", ".join(f"{k}: {human_count(v)}" for k, v in info["dtypes"].items())
    console.print(
        f"[bold]{info['num_tensors']}[/bold] tensors, [bold]{info['num_parameters']:,}[/bold] parameters "
        f"({human_count(info['num_parameters'])}; {dtypes}), tensor data {human_bytes(info['nbytes'])}, "
        f"size on disk {human_bytes(info['size_on_disk'])}"
    )


def run(args: argparse.Namespace) -> int:
    from modelfuse.io import open_checkpoint

    with open_checkpoint(args.path) as ckpt:
        info = summarize(ckpt, args.depth)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_table(info, args.summary)
    return 0
