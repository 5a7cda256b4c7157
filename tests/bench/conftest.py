"""A toy pool builder and toy bench methods for the runner's tests: tiny linear models, fast.

``toy_pool`` builds ``members`` linear classifiers (``features`` -> ``classes``) from the seed and a
fixed labelled batch; the methods count their calls in :data:`CALLS` (the resume tests read it).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import yaml
from torch import nn

from modelfuse.bench import BenchPool, Outcome, register_bench_method, register_pool_builder

#: calls per toy method since the last reset (the ``calls`` fixture resets it)
CALLS: Counter[str] = Counter()


@register_pool_builder("toy_pool")
def toy_pool(seed: int, members: int = 2, features: int = 4, classes: int = 3, n: int = 30) -> BenchPool:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = x[:, :classes].argmax(1)
    models = {}
    for i in range(members):
        m = nn.Linear(features, classes)
        with torch.no_grad():
            m.weight.copy_(torch.randn(classes, features, generator=gen))
            m.bias.zero_()
        models[f"m{i}"] = m
    return BenchPool(
        name="toy", seed=seed, models=models, data=(x, y), inference_input=x[:8],
        info={"members": members, "features": features, "classes": classes},
    )  # fmt: skip


@register_pool_builder("toy_pool_odd_fails")
def toy_pool_odd_fails(seed: int, members: int = 2) -> BenchPool:
    """``toy_pool``, except that odd seeds raise."""
    if seed % 2:
        raise ValueError(f"no pool for odd seed {seed}")
    return toy_pool(seed, members)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


@register_bench_method("toy_average", "parameter")
def toy_average(pool: BenchPool) -> Outcome:
    """Average the members' weights."""
    CALLS["toy_average"] += 1
    x, y = pool.data
    fused = nn.Linear(x.shape[1], pool.models["m0"].out_features)
    with torch.no_grad():
        fused.weight.copy_(torch.stack([m.weight for m in pool.models.values()]).mean(0))
        fused.bias.copy_(torch.stack([m.bias for m in pool.models.values()]).mean(0))
        return Outcome({"accuracy": accuracy(fused(x), y)}, model=fused, notes="mean of weights")


@register_bench_method("toy_mean", "output")
def toy_mean(pool: BenchPool, members: int | None = None) -> Outcome:
    """Mean of the members' logits; the accuracy of the first k members as a series."""
    CALLS["toy_mean"] += 1
    x, y = pool.data
    with torch.no_grad():
        logits = [m(x) for m in pool.models.values()][:members]
        series = [(k, accuracy(torch.stack(logits[:k]).mean(0), y)) for k in range(1, len(logits) + 1)]
    return Outcome({"accuracy": series[-1][1]}, series={"members": series})


@register_bench_method("toy_wide", "baseline")
def toy_wide(pool: BenchPool, hidden: int = 8) -> Outcome:
    """A two-layer network of width ``hidden`` (untrained)."""
    CALLS["toy_wide"] += 1
    x, y = pool.data
    model = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 3))
    with torch.no_grad():
        return Outcome({"accuracy": accuracy(model(x), y), "nll": float("nan")}, model=model)


@register_bench_method("toy_fail", "baseline")
def toy_fail(pool: BenchPool) -> Outcome:
    """Always raises."""
    CALLS["toy_fail"] += 1
    raise RuntimeError("boom on purpose")


@register_bench_method("toy_bad_outcome", "baseline")
def toy_bad_outcome(pool: BenchPool, what: str = "type") -> Outcome:
    """Returns what a bench method must not: another type, a metric that is no number, a model that is no Module."""
    if what == "type":
        return {"accuracy": 1.0}  # type: ignore[return-value]
    if what == "metric":
        return Outcome({"accuracy": "high"})
    return Outcome({"accuracy": 1.0}, model=lambda x: x)  # type: ignore[arg-type]


@pytest.fixture
def calls() -> Counter[str]:
    CALLS.clear()
    return CALLS


TOY_SUITE = {
    "suite": "toy",
    "description": "tiny linear models",
    "seeds": 2,
    "pool": {"builder": "toy_pool", "options": {"members": 3}},
    "methods": [
        {"method": "toy_average"},
        {"method": "toy_fail"},
        {"method": "toy_wide", "name": "wide (16)", "params": {"hidden": 16}},
        {"method": "toy_mean", "name": "mean of 2", "params": {"members": 2}},
    ],
    "small": {"options": {"members": 2}, "methods": ["toy_average", "wide (16)"]},
}


@pytest.fixture
def write_suite(tmp_path):
    """``write_suite(**changes)`` -> path of a toy suite YAML (``TOY_SUITE`` with top-level changes)."""

    def write(name: str = "toy.yaml", **changes) -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump({**TOY_SUITE, **changes}, sort_keys=False))
        return str(path)

    return write
