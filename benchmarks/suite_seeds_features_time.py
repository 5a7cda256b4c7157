"""Wall and CPU seconds of the built-in ``seeds`` and ``features`` suites, pool by pool and method by method.

Until the suite runner lands this calls what it will call: the suite YAML's pool builder (with a
fresh ``MODELFUSE_CACHE``, so pools are trained, not loaded, unless ``--warm``) and each bench
method with its YAML parameters, once per seed; ``--small`` runs the demo's version (the
``small`` pool options and methods, one seed). Prints the machine, then per seed the pool's and
each method's wall and CPU seconds (CPU: this process, all threads; less sensitive to other load
than the wall) and its test accuracy and NLL, and the totals.

Run: ``.venv/bin/python benchmarks/suite_seeds_features_time.py seeds [--small] [--seeds N] [--warm]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from importlib import resources

import torch
import yaml

from _machine import load_average, machine


def timed(fn, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite", choices=["seeds", "features"])
    p.add_argument(
        "--small", action="store_true", help="the demo's version: small options and methods, one seed"
    )
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds 0..N-1 (default: the YAML's; 1 with --small)"
    )
    p.add_argument(
        "--warm", action="store_true", help="keep MODELFUSE_CACHE as it is (pools may load from it)"
    )
    args = p.parse_args()
    if not args.warm:
        os.environ["MODELFUSE_CACHE"] = tempfile.mkdtemp(prefix="modelfuse-suite-time-")
    from modelfuse.bench import get_bench_method, get_pool_builder
    from modelfuse.bench.suites import features, seeds  # noqa: F401  (registrations)

    spec = yaml.safe_load(
        resources.files("modelfuse.bench.suites").joinpath(f"{args.suite}.yaml").read_text()
    )
    options = dict(spec["pool"].get("options", {}))
    entries = spec["methods"]
    n_seeds = args.seeds if args.seeds is not None else (1 if args.small else int(spec.get("seeds", 1)))
    if args.small:
        options.update(spec.get("small", {}).get("options", {}))
        keep = spec.get("small", {}).get("methods")
        if keep is not None:
            entries = [e for e in entries if e.get("name", e["method"]) in keep]
    print(machine())
    print(f"suite {args.suite}{' (small)' if args.small else ''}, {n_seeds} seed(s), pool options {options}")
    total_wall = total_cpu = 0.0
    for seed in range(n_seeds):
        torch.manual_seed(seed)
        pool, wall, cpu = timed(get_pool_builder(spec["pool"]["builder"]), seed=seed, **options)
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        print(f"seed {seed}: pool {wall:7.1f} s wall {cpu:7.1f} s CPU  {pool.info}")
        for e in entries:
            name = e.get("name", e["method"])
            try:
                out, wall, cpu = timed(get_bench_method(e["method"]).fn, pool, **e.get("params", {}))
                figures = f"acc {out.metrics['accuracy']:.4f} nll {out.metrics['nll']:.4f}"
            except Exception as exc:  # a failing method is reported, the suite goes on (as in the runner)
                wall = cpu = 0.0
                figures = f"FAILED {type(exc).__name__}: {exc}"
            total_wall, total_cpu = total_wall + wall, total_cpu + cpu
            print(f"  {name:48s} {wall:7.2f} s wall {cpu:7.2f} s CPU  {figures}")
    print(f"total {total_wall:.1f} s wall, {total_cpu:.1f} s CPU; load average after {load_average()}")


if __name__ == "__main__":
    main()
