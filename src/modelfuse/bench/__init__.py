"""Benchmark suites: many fusion methods on one pool, over seeds, and a report.

- :mod:`modelfuse.bench._api`: the contract between the runner and the methods it runs
  (:class:`BenchPool`, :class:`Outcome`, the bench-method and pool-builder registries);
- :mod:`modelfuse.bench.schema`: suite YAML files (``load_suite``, ``list_suites``);
- :mod:`modelfuse.bench.runner`: ``run_suite`` (seeds, resumable results.json / results.csv);
- :mod:`modelfuse.bench.report`: ``write_report`` (self-contained report.html and report.md);
- :mod:`modelfuse.bench.suites`: the built-in suites, one module and one YAML each.
"""

from modelfuse.bench._api import (
    LEVELS,
    SERIES,
    BenchMethod,
    BenchPool,
    Outcome,
    get_bench_method,
    get_pool_builder,
    list_bench_methods,
    list_pool_builders,
    register_bench_method,
    register_pool_builder,
)
from modelfuse.bench.runner import run_suite
from modelfuse.bench.schema import list_suites, load_suite

__all__ = [
    "LEVELS",
    "SERIES",
    "BenchMethod",
    "BenchPool",
    "Outcome",
    "get_bench_method",
    "get_pool_builder",
    "list_bench_methods",
    "list_pool_builders",
    "list_suites",
    "load_suite",
    "register_bench_method",
    "register_pool_builder",
    "run_suite",
]
