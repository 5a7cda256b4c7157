"""Wall seconds of ``modelfuse demo``: from an empty cache (trains the pools) and from a warm one.

Runs the command as a user does, in a fresh interpreter each time (``python -m modelfuse demo``,
so interpreter start and imports count), with ``MODELFUSE_CACHE`` pointed at a new temporary
folder: the first run trains every pool the demo needs and fills that cache, the next
``--warm`` runs load them from it. Prints the machine (with its load average before and after,
since a loaded machine stretches every wall figure) and the wall and CPU seconds of each run. ``make demo`` is
this command on the default pool (5 members); it also creates the venv on a fresh clone, which
is not timed here.

Run: ``.venv/bin/python benchmarks/demo_time.py [--warm 2] [--members 5] [--epochs E]``
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import load_average, machine


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo(cache: Path, extra: list[str]) -> tuple[float, float]:
    """One ``modelfuse demo`` in a fresh interpreter with ``cache`` as its cache: its wall seconds
    and its CPU seconds (user + system, all threads; less sensitive to other load than the wall)."""
    env = {**os.environ, "MODELFUSE_CACHE": str(cache)}
    start, cpu = time.perf_counter(), children_cpu()
    out = subprocess.run(
        [sys.executable, "-m", "modelfuse", "demo", *extra], capture_output=True, text=True, env=env
    )
    seconds, cpu = time.perf_counter() - start, children_cpu() - cpu
    if out.returncode != 0:
        raise SystemExit(f"modelfuse demo failed (exit {out.returncode}):\n{out.stderr}")
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=2, help="runs on the filled cache (default: %(default)s)")
    parser.add_argument("--members", type=int, help="--members of the demo (default: the demo's, 5)")
    parser.add_argument("--epochs", type=int, help="--epochs of the demo (default: the demo's)")
    args = parser.parse_args()
    if args.warm < 0:
        parser.error(f"--warm must be 0 or more, got {args.warm}")
    extra = []
    if args.members is not None:
        extra += ["--members", str(args.members)]
    if args.epochs is not None:
        extra += ["--epochs", str(args.epochs)]
    print(machine())
    print(f"command: {sys.executable} -m modelfuse demo {' '.join(extra)}".rstrip())
    cache = Path(tempfile.mkdtemp(prefix="modelfuse-demo-time-"))
    try:
        cold, cold_cpu = run_demo(cache, extra)
        print(f"cold (empty cache): {cold:.1f} s wall, {cold_cpu:.1f} s CPU")
        warm = []
        for i in range(args.warm):
            warm.append(run_demo(cache, extra))
            print(f"warm run {i + 1}: {warm[-1][0]:.1f} s wall, {warm[-1][1]:.1f} s CPU")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    summary = f"cold {cold:.1f} s wall ({cold_cpu:.1f} s CPU)"
    if warm:
        best = min(warm)
        summary += f", warm {best[0]:.1f} s wall ({best[1]:.1f} s CPU; best of {len(warm)})"
    print(f"{summary}; load average after: {load_average()}")


if __name__ == "__main__":
    main()
