"""Running a suite: per seed the pool is built once, then every method runs on it and is measured.

For each (seed, method) the runner times the call (``fusion_s``), counts the fused model's
parameters and times its inference on ``pool.inference_input`` (eval mode, no grad, median
of 5 calls after one warm-up), records the exact recipe and its hash, and catches a failing
method (recorded as failed with ``"Type: message"``; the suite goes on). With an output
folder, ``results.json`` and ``results.csv`` are rewritten atomically after every method, so
that an interrupted run can be resumed (``resume=True``): a method whose record (same recipe
hash, status ok) is in the folder is not run again.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelfuse.bench._api import BenchPool, Outcome, get_bench_method, get_pool_builder, info_of
from modelfuse.bench.results import RESULTS_CSV, RESULTS_JSON, SUITE_YAML, read_results, write_results
from modelfuse.bench.schema import MethodSpec, SuiteSpec, load_builtin, load_suite, recipe_hash
from modelfuse.data._cache import atomic_write
from modelfuse.errors import ConfigError, OutputExistsError

__all__ = ["INFERENCE_REPEATS", "count_parameters", "inference_ms", "run_suite"]

#: timed inference calls per fused model (after one warm-up); the record holds their median
INFERENCE_REPEATS = 5


def count_parameters(model: nn.Module) -> int:
    """The number of parameter elements of ``model`` (a parameter shared by two modules counts once)."""
    return sum(p.numel() for p in model.parameters())


def inference_ms(model: nn.Module, batch: torch.Tensor, repeats: int = INFERENCE_REPEATS) -> float:
    """Median wall time in ms of ``model(batch)`` (eval mode, no grad, on the model's device) over
    ``repeats`` calls after one warm-up. The model's training mode is restored afterwards."""
    first = next(iter(model.parameters()), None)
    if first is not None:
        batch = batch.to(first.device)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            model(batch)
            for _ in range(repeats):
                if batch.is_cuda:
                    torch.cuda.synchronize(batch.device)
                t0 = time.perf_counter()
                model(batch)
                if batch.is_cuda:
                    torch.cuda.synchronize(batch.device)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _number(name: str, x: Any) -> float | None:
    """A metric as a float; NaN and infinities as None (JSON has none)."""
    try:
        x = float(x.item() if isinstance(x, torch.Tensor) else x)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"metric {name!r} is not a number (found {x!r})") from None
    return x if math.isfinite(x) else None


def _run_one(
    suite: SuiteSpec, entry: MethodSpec, pool: BenchPool | None, seed: int, pool_error: str | None
) -> dict[str, Any]:
    """One record: run ``entry`` on ``pool`` and measure it (a failure is recorded, not raised)."""
    method = get_bench_method(entry.method)
    recipe = suite.recipe(entry, seed)
    record: dict[str, Any] = {
        "suite": suite.suite,
        "seed": seed,
        "name": entry.display,
        "method": entry.method,
        "level": method.level,
        "params": info_of(entry.params),
        "pool": dict(pool.info) if pool is not None else {},
        "status": "failed",
        "error": None,
        "metrics": {},
        "parameters": None,
        "inference_ms": None,
        "fusion_s": 0.0,
        "series": {},
        "notes": "",
        "recipe": recipe,
        "recipe_hash": recipe_hash(recipe),
    }
    if pool is None:
        record["error"] = f"the pool could not be built: {pool_error}"
        return record
    torch.manual_seed(seed)  # each method starts from the same RNG state, whatever ran before it
    t0 = time.perf_counter()
    try:
        outcome = method.fn(pool, **entry.params)
        record["fusion_s"] = time.perf_counter() - t0
        if not isinstance(outcome, Outcome):
            raise TypeError(
                f"bench method {entry.method!r} returned {type(outcome).__name__}, expected an Outcome"
            )
        record["metrics"] = {str(k): _number(str(k), v) for k, v in outcome.metrics.items()}
        record["series"] = {str(k): [[float(x), float(y)] for x, y in v] for k, v in outcome.series.items()}
        record["notes"] = str(outcome.notes)
        if outcome.model is not None:
            if not isinstance(outcome.model, nn.Module):
                raise TypeError(
                    f"Outcome.model must be a torch nn.Module; found {type(outcome.model).__name__}"
                )
            record["parameters"] = count_parameters(outcome.model)
            if pool.inference_input is not None:
                record["inference_ms"] = inference_ms(outcome.model, pool.inference_input)
        record["status"] = "ok"
    except Exception as exc:  # a failing method is a result; the suite goes on
        record["fusion_s"] = record["fusion_s"] or time.perf_counter() - t0
        record["error"] = _error(exc)
        record["metrics"], record["parameters"], record["inference_ms"] = {}, None, None
    return record


def _suite_yaml(suite: SuiteSpec, seeds: int) -> str:
    import yaml

    data = suite.model_dump(mode="json", exclude={"small"})
    data["seeds"] = seeds
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _prepare(folder: Path, suite: SuiteSpec, resume: bool, force: bool) -> list[dict[str, Any]]:
    """Check (or clear) the output folder; the records kept from an earlier run of the same suite."""
    ours = (RESULTS_JSON, RESULTS_CSV, SUITE_YAML)
    if force:
        for name in ours:
            (folder / name).unlink(missing_ok=True)
        return []
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise OutputExistsError(f"--out {folder} is a file, not a folder; name another --out")
    if not resume:
        if any(folder.iterdir()):
            raise OutputExistsError(
                f"the results folder {folder} is not empty; pass --resume to continue the same suite there, "
                "--force to start over (results.json, results.csv and suite.yaml are replaced), or name another --out"
            )
        return []
    fix = "name another --out, or pass --force to start over there"
    stored = folder / SUITE_YAML
    if stored.exists():
        from modelfuse.config import read_yaml

        data = read_yaml(stored, "suite")
        name = data.get("suite") if isinstance(data, dict) else None
        if name != suite.suite:
            raise OutputExistsError(
                f"{folder} holds the results of suite {name!r}, not {suite.suite!r}; {fix}"
            )
        try:
            theirs = SuiteSpec.model_validate(data).identity()
        except Exception:
            theirs = None
        if theirs != suite.identity():
            raise OutputExistsError(
                f"{folder} holds results of suite {suite.suite!r} with another recipe (pool or methods differ, "
                f"see {stored}); --resume continues only the same recipe; {fix}"
            )
    records = read_results(folder)
    others = sorted({str(r["suite"]) for r in records} - {suite.suite})
    if others:
        raise OutputExistsError(
            f"{folder} holds the results of suite(s) {', '.join(others)}, not {suite.suite!r}; {fix}"
        )
    return records


def run_suite(
    suite: SuiteSpec | str | os.PathLike,
    *,
    seeds: int | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    force: bool = False,
    small: bool = False,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Run ``suite`` (a :class:`SuiteSpec`, a built-in suite's name or a YAML path) for seeds
    ``0 .. seeds - 1`` (default: the suite's ``seeds``); returns one record per (seed, method),
    in run order (see :mod:`modelfuse.bench.results`).

    ``out``: the results folder (results.json, results.csv, suite.yaml), written after every
    method. An existing non-empty folder is refused unless ``resume`` (same suite and recipe:
    methods already finished there are not rerun) or ``force`` (start over). ``small``: the
    suite's demo version. ``progress``: show a progress bar (None: on a terminal).
    """
    from modelfuse.progress import progress as progress_bar

    if resume and force:
        raise ConfigError(
            "--resume and --force contradict each other: --resume continues a run, --force starts over"
        )
    load_builtin()
    if not isinstance(suite, SuiteSpec):
        suite = load_suite(suite)
    suite = suite.resolved(small)
    n_seeds = suite.seeds if seeds is None else seeds
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ConfigError(f"seeds must be a positive whole number; found {n_seeds!r}")
    folder = Path(out) if out is not None else None
    plan = [(seed, entry) for seed in range(n_seeds) for entry in suite.methods]
    kept: list[dict[str, Any]] = []
    if folder is not None:
        kept = _prepare(folder, suite, resume, force)
        hashes = {(seed, entry.display): recipe_hash(suite.recipe(entry, seed)) for seed, entry in plan}
        for r in kept:
            if hashes.get((r["seed"], r["name"]), r["recipe_hash"]) != r["recipe_hash"]:
                raise OutputExistsError(
                    f"{folder} holds a result of {r['name']!r} (seed {r['seed']}) from another recipe; --resume "
                    "continues only the same recipe; name another --out, or pass --force to start over there"
                )
        folder.mkdir(parents=True, exist_ok=True)
        text = _suite_yaml(suite, n_seeds)
        atomic_write(folder / SUITE_YAML, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    keys = [(seed, entry.display) for seed, entry in plan]
    # finished methods of an earlier run are kept; a failed one stays in the file until it has run again
    earlier = {(r["seed"], r["name"]): r for r in kept}
    records = {k: r for k, r in earlier.items() if r["status"] == "ok" and k in keys}
    extra = [r for k, r in earlier.items() if k not in set(keys)]

    def save() -> None:
        if folder is not None:
            current = [records.get(k, earlier.get(k)) for k in keys]
            write_results(folder, [*(r for r in current if r is not None), *extra])

    builder = get_pool_builder(suite.pool.builder)
    with progress_bar(f"bench {suite.suite}", total=len(plan), unit="methods", show=progress) as bar:
        for seed in range(n_seeds):
            todo = [entry for entry in suite.methods if (seed, entry.display) not in records]
            bar.advance(len(suite.methods) - len(todo))
            if not todo:
                continue
            bar.update(info=f"seed {seed}: building the pool")
            pool, pool_error = None, None
            try:
                pool = builder(seed=seed, **suite.pool.options)
                if not isinstance(pool, BenchPool):
                    raise TypeError(
                        f"pool builder {suite.pool.builder!r} returned {type(pool).__name__}, expected a BenchPool"
                    )
            except Exception as exc:  # every method of this seed is recorded as failed
                pool, pool_error = None, _error(exc)
            for entry in todo:
                bar.update(info=f"seed {seed}: {entry.display}")
                records[(seed, entry.display)] = _run_one(suite, entry, pool, seed, pool_error)
                save()
                bar.advance()
    save()
    return [records[k] for k in keys]
