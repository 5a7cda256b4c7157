"""Packed ensemble inference as a user sees it: ``pack`` against a Python loop over the members.

For K members of one architecture (seeded differently; with BatchNorm, its running statistics
and affine parameters randomised as after training; eval mode, ``torch.no_grad()``) computes
the stacked member outputs (K, N, ...) on the same input batch:

- loop: ``torch.stack([m(x) for m in members])``, what ``Ensemble.member_outputs`` does;
- packed: ``modelfuse.ensemble.pack(members)``, one module with K-times-wider layers;
- vmap (``--vmap``): ``torch.func.stack_module_state`` + ``torch.func.vmap`` over ``functional_call``.

Each case (model, BatchNorm or not, K, batch size, thread count) runs ``--rounds`` rounds; a
round times ``--calls`` calls of each way back to back, the ways in an order that rotates
from round to round (so neither always runs first, right after the other, or last), after
``--warmup`` untimed calls of each. Throughput is samples per second (a sample: one input
through all K members) from the median round. The outputs are checked against the loop's.

The machine's load is read before and after each case: a case during which the 1-minute load
average exceeded the number of CPUs is marked NOT COUNTED, and a loud note says so. Other
processes slow the loop far more than the packed module at torch's default thread count (the
loop's many small parallel regions each wait for every thread); one thread is less sensitive.

Run: ``.venv/bin/python benchmarks/packed_ensemble.py`` (the zoo CNN at 1x8x8 with and without
BatchNorm, K = 8, batches 64/256/512, threads 1 and torch's default); ``--models cnn32,resnet18``
for the larger cases, ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from _machine import load_average, machine
from modelfuse.ensemble import pack
from modelfuse.zoo import create_model

GOAL_RATIO = 2.5  # packed / loop throughput for the zoo CNN at K = 8 (digits input)
GOAL_MODEL, GOAL_K = "cnn 1x8x8", 8
CPUS = os.cpu_count() or 1


@dataclass(frozen=True)
class Case:
    label: str
    build: Callable[[int], nn.Module]  # seed -> model
    input_shape: tuple[int, ...]
    batch_norm: bool


def zoo_cnn(shape: tuple[int, ...], batch_norm: bool) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return create_model("cnn", input_shape=shape, num_classes=10, batch_norm=batch_norm)

    return build


def resnet18(seed: int) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18

    torch.manual_seed(seed)
    return tv_resnet18(num_classes=10)


CASES = {
    "cnn8": Case("cnn 1x8x8", zoo_cnn((1, 8, 8), False), (1, 8, 8), False),
    "cnn8bn": Case("cnn 1x8x8", zoo_cnn((1, 8, 8), True), (1, 8, 8), True),
    "cnn32": Case("cnn 3x32x32", zoo_cnn((3, 32, 32), False), (3, 32, 32), False),
    "cnn32bn": Case("cnn 3x32x32", zoo_cnn((3, 32, 32), True), (3, 32, 32), True),
    "resnet18": Case("resnet18 3x32x32", resnet18, (3, 32, 32), True),
}


def members_for(case: Case, k: int) -> list[nn.Module]:
    out = []
    for i in range(k):
        m = case.build(i)
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for mod in m.modules():  # statistics and affine maps that differ per member, as after training
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                    mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=gen) - 0.5)
                    mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                    mod.bias.copy_(torch.rand(mod.bias.shape, generator=gen) - 0.5)
        out.append(m.eval())
    return out


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
    model: str
    batch_norm: bool
    k: int
    batch: int
    threads: int
    seconds: dict[str, list[float]] = field(default_factory=dict)  # per-call seconds, one per round
    max_diff: dict[str, float] = field(default_factory=dict)
    load_before: float = 0.0
    load_after: float = 0.0
    note: str = ""

    @property
    def counted(self) -> bool:
        return max(self.load_before, self.load_after) <= CPUS

    def throughput(self, way: str) -> float:
        times = self.seconds.get(way)
        return self.batch / statistics.median(times) if times else float("nan")


def measure(case: Case, k: int, batch: int, threads: int, args: argparse.Namespace) -> Row:
    row = Row(case.label, case.batch_norm, k, batch, threads, load_before=os.getloadavg()[0])
    members = members_for(case, k)
    x = torch.randn(batch, *case.input_shape, generator=torch.Generator().manual_seed(0))
    ways: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "loop": lambda x: torch.stack([m(x) for m in members]),
        "packed": pack(members),
    }
    if args.vmap:
        try:
            ways["vmap"] = vmap_fn(members)
        except Exception as exc:  # report, keep measuring the others
            row.note += f"vmap unavailable: {type(exc).__name__}: {exc}; "
    with torch.no_grad():
        reference = ways["loop"](x)
        for name, fn in list(ways.items()):
            row.max_diff[name] = float((fn(x) - reference).abs().max())
        for _ in range(args.warmup):
            for fn in ways.values():
                fn(x)
        names = list(ways)
        row.seconds = {name: [] for name in names}
        for r in range(args.rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                fn = ways[name]
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn(x)
                row.seconds[name].append((time.perf_counter() - start) / args.calls)
    row.load_after = os.getloadavg()[0]
    return row


def table(rows: list[Row], vmap: bool) -> str:
    head = "| model | BN | K | batch | threads | loop samples/s | packed samples/s | packed/loop |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if vmap:
        head += " vmap samples/s |"
        rule += "---:|"
    head += " max abs diff vs loop | load before, after | counted |"
    rule += "---|---|---|"
    lines = [head, rule]
    for r in rows:
        loop, packed = r.throughput("loop"), r.throughput("packed")
        cells = [
            r.model,
            "yes" if r.batch_norm else "no",
            str(r.k),
            str(r.batch),
            str(r.threads),
            f"{loop:.0f}",
            f"{packed:.0f}",
            f"**{packed / loop:.2f}**",
        ]
        if vmap:
            cells.append(f"{r.throughput('vmap'):.0f}")
        cells += [
            f"{r.max_diff.get('packed', float('nan')):.1e}",
            f"{r.load_before:.1f}, {r.load_after:.1f}",
            "yes" if r.counted else "NOT COUNTED",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="cnn8,cnn8bn", help=f"comma-separated of {', '.join(CASES)} (default: %(default)s)"
    )
    parser.add_argument("--members", default="8", help="comma-separated K values (default: %(default)s)")
    parser.add_argument("--batches", default="64,256,512", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument(
        "--threads",
        default=f"1,{torch.get_num_threads()}",
        help="comma-separated torch thread counts (default: 1 and torch's default, %(default)s)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the median round counts (default: 7)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls of each way per round (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each way first (default: 3)")
    parser.add_argument("--vmap", action="store_true", help="also time torch.func.vmap over the members")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 3 calls, batch 64 only")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls, args.warmup, args.batches = 3, 3, 1, "64"
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in CASES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(CASES)}")
    ks = [int(v) for v in args.members.split(",") if v.strip()]
    batches = [int(v) for v in args.batches.split(",") if v.strip()]
    threads = list(dict.fromkeys(int(v) for v in args.threads.split(",") if v.strip()))

    print(machine())
    print(
        f"eval mode, torch.no_grad(); median of {args.rounds} rounds of {args.calls} calls per way, order "
        f"rotating, after {args.warmup} warm-up calls; samples/s\n"
    )
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for name in chosen:
            for k in ks:
                for b in batches:
                    row = measure(CASES[name], k, b, t, args)
                    rows.append(row)
                    print(
                        f"measured {row.model} BN={row.batch_norm} K={k} batch={b} threads={t}: "
                        + ", ".join(f"{w} {row.throughput(w):.0f}/s" for w in row.seconds)
                        + f"  packed/loop {row.throughput('packed') / row.throughput('loop'):.2f}"
                        + ("" if row.counted else "  NOT COUNTED (load above the CPU count)")
                        + (f"  ({row.note.strip('; ')})" if row.note else ""),
                        flush=True,
                    )

    print(f"\nload average now {load_average()}\n")
    print(table(rows, args.vmap))
    goal = [r for r in rows if r.model == GOAL_MODEL and r.k == GOAL_K]
    if goal:
        ratios = [r.throughput("packed") / r.throughput("loop") for r in goal]
        counted = [q for q, r in zip(ratios, goal) if r.counted]
        print(
            f"\ngoal: packed >= {GOAL_RATIO}x loop for {GOAL_MODEL} at K={GOAL_K}: "
            f"{min(ratios):.2f}x to {max(ratios):.2f}x over {len(goal)} cases "
            f"(batch, threads, BatchNorm); {sum(q >= GOAL_RATIO for q in ratios)} reach it"
        )
        if counted:
            print(f"counted cases only: {min(counted):.2f}x to {max(counted):.2f}x")
    not_counted = [r for r in rows if not r.counted]
    if not_counted:
        banner = "!" * 100
        print(
            f"\n{banner}\nNOT COUNTED: {len(not_counted)} of {len(rows)} cases ran while the load average exceeded "
            f"the {CPUS} CPUs.\nOther processes distort the loop/packed ratio (most at the default thread "
            f"count). Rerun on a quiet machine before quoting these figures.\n{banner}"
        )
    if args.json:
        args.json.write_text(
            json.dumps([{**asdict(r), "counted": r.counted} for r in rows], indent=2)
        )


if __name__ == "__main__":
    main()
