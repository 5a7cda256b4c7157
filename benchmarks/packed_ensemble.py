"""Packed ensemble inference: ``pack`` against a Python loop over members and against ``torch.func.vmap``.

For K members of one architecture (seeded differently, BatchNorm running statistics
randomised, eval mode, ``torch.no_grad()``) computes the stacked member outputs (K, N, ...)
three ways on the same input batch:

- loop: ``torch.stack([m(x) for m in members])``, what ``Ensemble.member_outputs`` does;
- vmap: ``torch.func.stack_module_state`` + ``torch.func.vmap`` over ``functional_call``;
- packed: ``modelfuse.ensemble.packed.pack(members)``, one module with K-times-wider layers.

Architectures: the zoo CNN (``cnn``) at its digits input 1x8x8 and at 3x32x32, and
torchvision's ResNet-18 (10 classes) at 3x32x32. Throughput is samples per second (a
sample: one input through all K members), from the median of ``--repeat`` timed calls
after ``--warmup`` untimed ones; the three ways run round-robin within each repeat, so
that load from other processes spreads over all of them. The outputs of the three are
checked against each other. Threads: torch's default unless ``--threads``. Other
processes on the CPUs slow the loop most (its many small parallel regions each wait for
every thread), so compare figures from a quiet machine; ``--threads 1`` is less sensitive.

Run: ``.venv/bin/python benchmarks/packed_ensemble.py [--quick] [--members 4,8,16] [--repeat 9]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from _machine import load_average, machine
from modelfuse.ensemble.packed import pack
from modelfuse.zoo import create_model

GOAL_RATIO = 2.5  # packed / loop throughput for the zoo CNN at K = 8 (digits input)
GOAL_ARCH, GOAL_K = "cnn 1x8x8", 8


@dataclass(frozen=True)
class Case:
    label: str
    build: Callable[[int], nn.Module]  # seed -> model
    input_shape: tuple[int, ...]
    batch: int


def zoo_cnn(shape: tuple[int, ...]) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return create_model("cnn", input_shape=shape, num_classes=10)

    return build


def resnet18(seed: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18

    torch.manual_seed(seed)
    return tv_resnet18(num_classes=10)


def cases(batch_cnn: int, batch_resnet: int) -> dict[str, Case]:
    return {
        "cnn8": Case("cnn 1x8x8", zoo_cnn((1, 8, 8)), (1, 8, 8), batch_cnn),
        "cnn32": Case("cnn 3x32x32", zoo_cnn((3, 32, 32)), (3, 32, 32), batch_cnn),
        "resnet18": Case("resnet18 3x32x32", resnet18, (3, 32, 32), batch_resnet),
    }


def members_for(case: Case, k: int) -> list[nn.Module]:
    out = []
    for i in range(k):
        m = case.build(i)
        gen = torch.Generator().manual_seed(1000 + i)
        for mod in m.modules():  # running statistics that matter, as after training
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
        out.append(m.eval())
    return out


def loop_fn(members: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.stack([m(x) for m in members])


def vmap_fn(members: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.func import functional_call, stack_module_state, vmap

    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    batched = vmap(one, in_dims=(0, 0, None))
    return lambda x: batched(params, buffers, x)


@dataclass
class Row:
    label: str
    k: int
    batch: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    max_diff: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def throughput(self, way: str) -> float:
        times = self.seconds.get(way)
        return self.batch / statistics.median(times) if times else float("nan")


def measure(case: Case, k: int, warmup: int, repeat: int) -> Row:
    row = Row(case.label, k, case.batch)
    members = members_for(case, k)
    x = torch.randn(case.batch, *case.input_shape, generator=torch.Generator().manual_seed(0))
    ways: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"loop": loop_fn(members)}
    try:
        ways["vmap"] = vmap_fn(members)
    except Exception as exc:  # report, keep measuring the others
        row.note += f"vmap unavailable: {type(exc).__name__}: {exc}; "
    ways["packed"] = pack(members)
    with torch.no_grad():
        reference = ways["loop"](x)
        for name, fn in list(ways.items()):
            try:
                out = fn(x)
            except Exception as exc:
                row.note += f"{name} failed: {type(exc).__name__}: {exc}; "
                del ways[name]
                continue
            row.max_diff[name] = float((out - reference).abs().max())
        for _ in range(warmup):
            for fn in ways.values():
                fn(x)
        row.seconds = {name: [] for name in ways}
        for _ in range(repeat):
            for name, fn in ways.items():
                start = time.perf_counter()
                fn(x)
                row.seconds[name].append(time.perf_counter() - start)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="4,8,16", help="comma-separated K values (default: %(default)s)")
    parser.add_argument(
        "--models",
        default="cnn8,cnn32,resnet18",
        help="comma-separated of cnn8, cnn32, resnet18 (default: all)",
    )
    parser.add_argument(
        "--batch-cnn", type=int, default=256, help="batch size for the CNN (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-resnet", type=int, default=64, help="batch size for ResNet-18 (default: %(default)s)"
    )
    parser.add_argument("--repeat", type=int, default=9, help="timed calls per way; the median counts")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per way first")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: K = 4, 8; CNN batch 64, ResNet batch 16; 3 repeats"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(v) for v in args.members.split(",") if v.strip()]
    if args.quick:
        ks = [k for k in ks if k <= 8] or [4]
        args.batch_cnn, args.batch_resnet = min(args.batch_cnn, 64), min(args.batch_resnet, 16)
        args.repeat, args.warmup = min(args.repeat, 3), min(args.warmup, 1)
    all_cases = cases(args.batch_cnn, args.batch_resnet)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in all_cases]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(all_cases)}")

    print(machine())
    print(
        f"eval mode, torch.no_grad(); median of {args.repeat} after {args.warmup} warm-up call(s); samples/s\n"
    )
    rows = []
    for name in chosen:
        for k in ks:
            row = measure(all_cases[name], k, args.warmup, args.repeat)
            rows.append(row)
            print(
                f"measured {row.label} K={k}: "
                + ", ".join(f"{w} {row.throughput(w):.0f}/s" for w in row.seconds)
                + (f"  ({row.note.strip('; ')})" if row.note else ""),
                flush=True,
            )

    print(f"\nload average now {load_average()}\n")
    print(
        "| model | K | batch | loop samples/s | vmap samples/s | packed samples/s | vmap/loop | packed/loop | max abs diff vs loop (vmap, packed) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        loop, vmap, packed = (row.throughput(w) for w in ("loop", "vmap", "packed"))
        diffs = ", ".join(f"{row.max_diff.get(w, float('nan')):.1e}" for w in ("vmap", "packed"))
        print(
            f"| {row.label} | {row.k} | {row.batch} | {loop:.0f} | {vmap:.0f} | {packed:.0f} "
            f"| {vmap / loop:.2f} | {packed / loop:.2f} | {diffs} |"
        )
    goal = [r for r in rows if r.label == GOAL_ARCH and r.k == GOAL_K]
    if goal:
        ratio = goal[0].throughput("packed") / goal[0].throughput("loop")
        verdict = "PASS" if ratio >= GOAL_RATIO else "FAIL"
        print(
            f"\ntarget: {verdict}  packed >= {GOAL_RATIO}x loop for {GOAL_ARCH} at K={GOAL_K}: {ratio:.2f}x"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "model": r.label,
                        "members": r.k,
                        "batch": r.batch,
                        "seconds": r.seconds,
                        "max_abs_diff": r.max_diff,
                        "note": r.note,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
