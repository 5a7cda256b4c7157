"""Benchmark suites: many fusion methods on one pool, over seeds, and a report (see _api.py)."""

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
    "register_bench_method",
    "register_pool_builder",
]
