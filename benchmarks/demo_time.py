"""Wall seconds of ``modelfuse demo``: from an empty cache (trains the pools) and from a warm one.

Runs the command as a user does, in a fresh interpreter each time (``python -m modelfuse demo
--out TMP/out``, so interpreter start and imports count), with ``MODELFUSE_CACHE`` pointed at a
new temporary folder: the first run trains every pool the demo's small suites need and fills
that cache, the next ``--warm`` runs load them from it (the methods run again each time: the
demo starts over in its folder). Prints the machine (with its load average before and after,
since a loaded machine stretches every wall figure) and the wall and CPU seconds of each run.
``make demo`` is this command; it also creates the venv on a fresh clone, which is not timed here.

``--threads 1 2``: then, on the filled cache and in this interpreter, the demo's suites run (as
``run_demo`` runs them, minus the table) with torch at each thread count, twice each, interleaved:
the demo sets 1 thread; this shows what that costs or gains on the machine at hand.

Run: ``.venv/bin/python benchmarks/demo_time.py [--warm 2] [--threads 1 2]``
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


def run_demo(cache: Path, folder: Path) -> tuple[float, float]:
    """One ``modelfuse demo --out folder`` in a fresh interpreter with ``cache`` as its cache: its wall
    seconds and its CPU seconds (user + system, all threads; less sensitive to other load than the wall)."""
    env = {**os.environ, "MODELFUSE_CACHE": str(cache)}
    start, cpu = time.perf_counter(), children_cpu()
    out = subprocess.run(
        [sys.executable, "-m", "modelfuse", "demo", "--out", str(folder)],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds, cpu = time.perf_counter() - start, children_cpu() - cpu
    if out.returncode != 0:
        raise SystemExit(f"modelfuse demo failed (exit {out.returncode}):\n{out.stderr}")
    return seconds, cpu


def suites_in_process(cache: Path, folder: Path, threads: int) -> float:
    """Wall seconds of the demo's suites (small, seed 0, forced) in this interpreter at ``threads``."""
    import torch

    from modelfuse.bench.runner import run_suite
    from modelfuse.cli.demo import DEMO_SEEDS, DEMO_SUITES

    os.environ["MODELFUSE_CACHE"] = str(cache)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        for suite in DEMO_SUITES:
            run_suite(suite, seeds=DEMO_SEEDS, out=folder / suite, force=True, small=True, progress=False)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", type=int, default=2, help="runs on the filled cache (default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, nargs="*", default=[], help="torch thread counts to compare warm"
    )
    args = parser.parse_args()
    if args.warm < 0:
        parser.error(f"--warm must be 0 or more, got {args.warm}")
    print(machine())
    print(f"command: {sys.executable} -m modelfuse demo --out TMP/out (MODELFUSE_CACHE=TMP/cache)")
    tmp = Path(tempfile.mkdtemp(prefix="modelfuse-demo-time-"))
    cache, folder = tmp / "cache", tmp / "out"
    try:
        cold, cold_cpu = run_demo(cache, folder)
        print(f"cold (empty cache): {cold:.1f} s wall, {cold_cpu:.1f} s CPU")
        warm = []
        for i in range(args.warm):
            warm.append(run_demo(cache, folder))
            print(f"warm run {i + 1}: {warm[-1][0]:.1f} s wall, {warm[-1][1]:.1f} s CPU")
        for i in range(2 if args.threads else 0):
            for n in args.threads:
                seconds = suites_in_process(cache, tmp / "threads", n)
                print(f"in-process, warm, torch {n} thread(s), round {i + 1}: {seconds:.1f} s wall")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = f"cold {cold:.1f} s wall ({cold_cpu:.1f} s CPU)"
    if warm:
        best = min(warm)
        summary += f", warm {best[0]:.1f} s wall ({best[1]:.1f} s CPU; best of {len(warm)})"
    print(f"{summary}; load average after: {load_average()}")


if __name__ == "__main__":
    main()
