"""Sparsifying task-vector methods (TIES, DARE, breadcrumbs, DELLA, SCE, RAM) against NumPy references.

The references below are written from the definitions (mergekit 0.1.5's measured semantics,
see shared/reference/mergekit-semantics.md), not from the implementation. Which of several
equal magnitudes a cut keeps: by default (``tie_break="index"``) a stable sort's choice,
referenced with NumPy's stable argsort. With ``tie_break="sort"`` mergekit's CPU choice,
the order ``torch.argsort`` / ``torch.sort`` puts them in; on CPU that sort is an introsort
that is stable only up to 16 entries, so those references use NumPy's stable order on at
most 16 entries and ``torch.argsort`` itself (the definition) on larger ones. Randomised
methods are checked given their masks (drawn in the test from the documented seeding),
and their masks statistically, with tolerances derived from the sample size.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods import breadcrumbs as breadcrumbs_mod  # noqa: F401  (registers)
from modelfuse.merge.methods import dare as dare_mod  # noqa: F401
from modelfuse.merge.methods import della as della_mod
from modelfuse.merge.methods import ram as ram_mod  # noqa: F401
from modelfuse.merge.methods import sce as sce_mod  # noqa: F401
from modelfuse.merge.methods import ties as ties_mod  # noqa: F401
from modelfuse.merge.methods._base import get_method
from modelfuse.merge.methods._sparsifiers import (
    drop_by_rank,
    drop_random,
    largest_magnitudes,
    magnitude_window,
    rank_keep_probabilities,
)

from .kernel_support import require_kernels

# ---------------------------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------------------------


def order_desc(w32: np.ndarray, tie_break: str = "index") -> np.ndarray:
    """Positions of float32 magnitudes in descending order, equal ones per ``tie_break`` (module docstring)."""
    if w32.size <= 16 or tie_break == "index":
        return np.argsort(-w32, kind="stable")
    return torch.argsort(torch.from_numpy(w32), descending=True).numpy()


def order_asc(w32: np.ndarray, tie_break: str = "index") -> np.ndarray:
    if w32.size <= 16 or tie_break == "index":
        return np.argsort(w32, kind="stable")
    return torch.sort(torch.from_numpy(w32)).indices.numpy()


def np_task_vectors(xs, base):
    return [x.astype(base.dtype) - base for x in xs]


def np_rescale(tau, kept, mode, keep_prob):
    """kept is tau * mask; the rescale modes of the method docstrings."""
    if mode == "none":
        return kept
    if mode == "inverse_density":
        return kept / keep_prob
    before, after = np.abs(tau).sum(dtype=np.float64), np.abs(kept).sum(dtype=np.float64)
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def np_trim_top_k(tau, density, rescale="none", tie_break="index"):
    if density >= 1:
        return tau
    flat = tau.ravel()
    k = max(1, math.floor(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[order_desc(np.abs(flat).astype(np.float32), tie_break)[:k]] = True
    return np_rescale(tau, np.where(keep, flat, 0).reshape(tau.shape), rescale, density)


def np_breadcrumb(tau, density, gamma, tie_break="index"):
    if density >= 1:
        return tau
    flat = tau.ravel()
    n = flat.size
    target, n_top = math.floor(density * n), math.floor(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = np.zeros(n, bool)
    keep[order_asc(np.abs(flat).astype(np.float32), tie_break)[n_bot : n_bot + target]] = True
    return np.where(keep, flat, 0).reshape(tau.shape)


def np_merge(base, deltas, weights, *, elect, normalize, lam, votes=None):
    """base + lam * sum_i m_i w_i d_i [/ D] in float64 (m_i = 1, D = sum w_i without election)."""
    d = np.stack(deltas).astype(np.float64)
    w = np.asarray(weights, np.float64).reshape(-1, *([1] * base.ndim))
    u = d * w
    if elect:
        v = u if votes is None else np.stack(votes).astype(np.float64)
        s = np.where(v.sum(0) >= 0, 1.0, -1.0)
        m = np.sign(v) == s
        mixed, div = (u * m).sum(0), (w * m).sum(0)
        div = np.where(div == 0, 1.0, div)
    else:
        mixed, div = u.sum(0), w.sum(0)
        div = np.where(np.abs(div) < 1e-8, 1.0, div)
    if normalize:
        mixed = mixed / div
    return base.astype(np.float64) + lam * mixed


def np_ties(xs, base, weights, densities, *, lam=1.0, normalize=True, vote="weighted", tie_break="index"):
    trimmed = [np_trim_top_k(t, d, tie_break=tie_break) for t, d in zip(np_task_vectors(xs, base), densities)]
    votes = trimmed if vote == "unweighted" else None
    return np_merge(base, trimmed, weights, elect=True, normalize=normalize, lam=lam, votes=votes)


def np_sce(xs, base, select_topk):
    d = np.stack(np_task_vectors(xs, base)).astype(np.float64)
    if select_topk < 1:
        var = d.var(axis=0)
        k = math.floor(select_topk * np.count_nonzero(var))
        keep = np.zeros(var.size, bool)
        keep[np.argsort(-var.ravel(), kind="stable")[:k]] = True
        d = d * keep.reshape(var.shape)
    energy = np.array([(di**2).mean() for di in d])
    eta = energy / energy.sum() if abs(energy.sum()) >= 1e-6 else np.full(len(d), 1 / len(d))  # mergekit 0.1.5
    return np_merge(base, list(d), eta, elect=True, normalize=True, lam=1.0, votes=list(d))


def np_ram(xs, base, eps, plus=None):
    tv = np.stack(np_task_vectors(xs, base)).reshape(len(xs), -1).astype(np.float64)
    changed = np.abs(tv) > eps
    count = changed.sum(0)
    shared, unique = count > 1, count == 1
    scale = np.ones(len(xs))
    if plus is not None:  # mergekit's scale is float32: integer counts over a float clamp
        r, alpha = plus
        f32 = np.float32
        n_shared = (changed & shared).sum(1).astype(f32)
        n_unique = np.maximum((changed & unique).sum(1).astype(f32), f32(eps))
        scale = f32(1) + f32(r) * np.clip(n_shared / n_unique, f32(0), f32(alpha))
    tv = tv * changed
    merged = (tv * unique * scale[:, None] + tv * shared / np.maximum(count, 1)).sum(0)
    return base.astype(np.float64) + merged.reshape(base.shape)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def models(n, seed, shape, dtype=np.float32, scale=0.1):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(dtype)
    xs = [(base + scale * rng.standard_normal(shape)).astype(dtype) for _ in range(n)]
    return xs, base


def run(name, xs, base, per_model=None, seed=None, **shared):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = get_method(name)(
        [torch.from_numpy(np.ascontiguousarray(x)) for x in xs],
        torch.from_numpy(np.ascontiguousarray(base)),
        models=per_model,
        generator=gen,
        **shared,
    )
    return out.numpy()


def assert_close(got, ref, dtype):
    np.testing.assert_allclose(got, ref, **TOL[dtype])


SHAPES = [(37,), (6, 9)]
DTYPES = [np.float32, np.float64]

# ---------------------------------------------------------------------------------------------
# TIES
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(dtype, shape, normalize):
    xs, base = models(3, 1, shape, dtype)
    weights, densities = [1.0, 0.7, 1.6], [0.5, 0.25, 1.0]
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    got = run("ties", xs, base, per_model, normalize=normalize, **{"lambda": 0.8})
    ref = np_ties(xs, base, weights, densities, lam=0.8, normalize=normalize)
    assert got.dtype == dtype
    assert_close(got, ref, dtype)


@pytest.mark.usefixtures("merge_path")
def test_ties_trim_keeps_at_least_one_entry():
    # floor(0.01 * 37) = 0, mergekit keeps max(1, .) = 1: the largest
    xs, base = models(1, 2, (37,))
    got = run("ties", xs, base, [{"density": 0.01}])
    tau = xs[0] - base
    changed = np.flatnonzero(got != base)
    assert changed.tolist() == [int(np.argmax(np.abs(tau)))]


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize("density", [0.25, 0.5, 0.75])
def test_ties_tie_breaking_on_small_tensor_is_index_order(density):
    # 16 entries, magnitudes 1 or 2 only: the cut falls inside a group of equal magnitudes
    base = np.zeros(16, np.float32)
    x1 = np.array([1, -2, 1, -1, 2, 1, -1, 1, 2, -2, 1, 1, -1, 2, -1, 1], np.float32)
    x2 = np.array([-1, 1, 2, 1, -1, -2, 1, 1, -1, 1, 2, -1, 1, 1, -2, 1], np.float32)
    per_model = [{"weight": 1.0, "density": density}, {"weight": 2.0, "density": density}]
    got = run("ties", [x1, x2], base, per_model)
    ref = np_ties([x1, x2], base, [1.0, 2.0], [density, density])
    np.testing.assert_array_equal(got, ref.astype(np.float32))


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize("tie_break", ["index", "sort"])
def test_ties_tie_breaking_on_large_tensor(tie_break):
    # beyond 16 entries torch's CPU sort is not stable: the "sort" reference uses torch.argsort
    # itself, the default ("index") NumPy's stable argsort
    rng = np.random.default_rng(3)
    n = 600
    base = np.zeros(n, np.float32)
    xs = [(rng.integers(1, 4, n) * rng.choice([-1, 1], n)).astype(np.float32) for _ in range(3)]
    w32 = np.abs(xs[0])
    k = math.floor(0.5 * n)
    assert not np.array_equal(  # the test means something: the two orders keep other entries
        np.sort(order_desc(w32, "sort")[:k]), np.sort(np.argsort(-w32, kind="stable")[:k])
    )
    per_model = [{"weight": w, "density": 0.5} for w in (1.0, 0.5, 2.0)]
    got = run("ties", xs, base, per_model, tie_break=tie_break)
    ref = np_ties(xs, base, [1.0, 0.5, 2.0], [0.5] * 3, tie_break=tie_break)
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    if tie_break == "index":  # also the default
        np.testing.assert_array_equal(run("ties", xs, base, per_model), got)


@pytest.mark.parametrize("tie_break", ["index", "sort"])
def test_ties_in_bfloat16_is_computed_in_bfloat16(tie_break):
    """The reference's bf16 rule, restated in torch ops: deltas, weights, vote and sums all in bf16."""
    g = torch.Generator().manual_seed(27)
    base = torch.randn(64, 33, generator=g).bfloat16()
    xs = [(base.float() + 0.05 * torch.randn(64, 33, generator=g)).bfloat16() for _ in range(3)]
    weights, densities = [1.0, 0.3, 0.7], [0.5, 0.2, 0.9]
    trimmed = []
    for x, d in zip(xs, densities):
        tau = x - base
        w32 = tau.abs().reshape(-1).float()
        keep = torch.zeros(tau.numel(), dtype=tau.dtype)
        order = torch.argsort(w32, descending=True, stable=tie_break == "index")
        keep[order[: int(d * tau.numel())]] = 1
        trimmed.append(tau * keep.view(tau.shape))
    u = torch.stack(trimmed) * torch.tensor(weights, dtype=torch.bfloat16).view(-1, 1, 1)
    agree = u.sign() == (u.sum(0) >= 0).bfloat16() * 2 - 1
    mixed = (u * agree).sum(0)
    div = (torch.tensor(weights, dtype=torch.bfloat16).view(-1, 1, 1) * agree).sum(0)
    div[div == 0] = 1
    ref = base + (mixed / div) * 0.5
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    got = get_method("ties")(xs, base, models=per_model, tie_break=tie_break, **{"lambda": 0.5})
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)


def test_trim_masks_equal_the_sort_on_tie_heavy_data():
    """The radix-select fast path and the sort fallback both give exactly the sort's choice."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 400, (1,), generator=g))
        levels = [2, 5, 1000][trial % 3]
        w = torch.randint(0, levels, (n,), generator=g).float() * 0.3
        tau = w * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[torch.argsort(w, descending=True)[:k]] = True
        assert torch.equal(largest_magnitudes(tau, k, "sort"), ref)
        lo = int(torch.randint(0, n, (1,), generator=g))
        hi = int(torch.randint(lo, n + 1, (1,), generator=g))
        ref = torch.zeros(n, dtype=torch.bool)
        ref[torch.sort(w).indices[lo:hi]] = True
        assert torch.equal(magnitude_window(tau, lo, hi, "sort"), ref)


def test_ties_unweighted_vote_is_the_papers():
    # entry 0: weighted sum 1*3 + 4*(-1) < 0 elects -, unweighted 3 - 1 > 0 elects +
    base = np.zeros(2, np.float64)
    xs = [np.array([3.0, 1.0]), np.array([-1.0, 1.0])]
    per_model = [{"weight": 1.0}, {"weight": 4.0}]
    weighted = run("ties", xs, base, per_model)
    unweighted = run("ties", xs, base, per_model, vote="unweighted")
    assert weighted[0] == -1.0 and unweighted[0] == 3.0
    np.testing.assert_allclose(weighted, np_ties(xs, base, [1, 4], [1, 1]))
    np.testing.assert_allclose(unweighted, np_ties(xs, base, [1, 4], [1, 1], vote="unweighted"))


def test_ties_unweighted_vote_matches_reference_with_trimming():
    xs, base = models(3, 4, (8, 5), np.float64)
    per_model = [{"weight": w, "density": 0.4} for w in (0.3, 1.0, 2.5)]
    got = run("ties", xs, base, per_model, vote="unweighted", **{"lambda": 1.5})
    ref = np_ties(xs, base, [0.3, 1.0, 2.5], [0.4] * 3, lam=1.5, vote="unweighted")
    assert_close(got, ref, np.float64)


@pytest.mark.usefixtures("merge_path")
def test_ties_divisor_zero_becomes_one():
    # weights 1 and -1, both weighted deltas positive: both agree, D = 1 - 1 = 0 -> 1
    base = np.zeros(1)
    got = run("ties", [np.array([2.0]), np.array([-3.0])], base, [{"weight": 1.0}, {"weight": -1.0}])
    np.testing.assert_array_equal(got, [5.0])


@pytest.mark.usefixtures("merge_path")
def test_ties_global_trim_keeps_entries_above_the_given_threshold():
    xs, base = models(2, 5, (40,), np.float64)
    taus = np_task_vectors(xs, base)
    thresholds = [float(np.quantile(np.abs(t), 0.6)) for t in taus]
    per_model = [{"density": 0.4, "threshold": th} for th in thresholds]
    got = run("ties", xs, base, per_model, trim="global")
    trimmed = [np.where(np.abs(t).astype(np.float32) >= th, t, 0) for t, th in zip(taus, thresholds)]
    ref = np_merge(base, trimmed, [1, 1], elect=True, normalize=True, lam=1.0)
    assert_close(got, ref, np.float64)
    with pytest.raises(ConfigError, match="threshold"):
        run("ties", xs, base, [{"density": 0.4}] * 2, trim="global")
    with pytest.raises(ConfigError, match="threshold"):
        run("ties", xs, base, per_model)  # threshold without trim: global


@pytest.mark.usefixtures("merge_path")
def test_ties_with_density_one_and_agreeing_signs_is_normalised_task_arithmetic():
    rng = np.random.default_rng(6)
    base = rng.standard_normal((5, 7)).astype(np.float32)
    sign = rng.choice([-1.0, 1.0], base.shape).astype(np.float32)
    xs = [base + sign * rng.uniform(0.1, 1.0, base.shape).astype(np.float32) for _ in range(3)]
    per_model = [{"weight": w} for w in (0.5, 1.0, 2.0)]
    got = run("ties", xs, base, per_model, **{"lambda": 0.9})
    ta = run("task_arithmetic", xs, base, per_model, normalize=True, **{"lambda": 0.9})
    ref = base + 0.9 * sum(w * (x - base) for w, x in zip((0.5, 1.0, 2.0), xs)) / 3.5
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, ta, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# invariants shared by several methods
# ---------------------------------------------------------------------------------------------

AVERAGING = [  # (method, per-model params, shared params): N identical fine-tunes give the fine-tune
    ("ties", {"weight": 0.7}, {}),
    ("ties", {"weight": 0.7}, {"vote": "unweighted"}),
    ("dare_linear", {"weight": 0.7}, {"normalize": True}),
    ("dare_ties", {"weight": 0.7}, {"normalize": True}),
    ("breadcrumbs", {"weight": 0.7}, {"normalize": True}),
    ("breadcrumbs_ties", {"weight": 0.7}, {"normalize": True}),
    ("della", {"weight": 0.7}, {}),
    ("della_linear", {"weight": 0.7}, {"normalize": True}),
    ("sce", None, {}),
    ("ram", None, {}),
    ("ramplus_tl", None, {}),
]


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize(("name", "per_model", "shared"), AVERAGING)
def test_identical_fine_tunes_give_the_fine_tune(name, per_model, shared):
    xs, base = models(1, 7, (6, 5), np.float64)
    xs = xs * 3
    got = run(name, xs, base, None if per_model is None else [per_model] * 3, seed=0, **shared)
    np.testing.assert_allclose(got, xs[0], rtol=1e-12, atol=1e-12)


WITH_LAMBDA = ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize("name", WITH_LAMBDA)
def test_lambda_zero_gives_the_base(name):
    xs, base = models(3, 8, (4, 6), np.float32)
    per_model = [{"weight": 1.0, "density": 0.5}] * 3
    got = run(name, xs, base, per_model, seed=1, **{"lambda": 0.0})
    np.testing.assert_array_equal(got, base)


ALL = [*WITH_LAMBDA, "sce", "ram", "ramplus_tl"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (3, 2, 4), (0,), (3, 0)])
def test_output_has_the_base_shape_and_dtype(name, dtype, shape):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.float() + torch.randn(shape, generator=g)).to(dtype) for _ in range(2)]
    per_model = None if name in ("sce", "ram", "ramplus_tl") else [{"density": 0.5}] * 2
    out = get_method(name)(xs, base, models=per_model, generator=torch.Generator().manual_seed(0))
    assert out.shape == base.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------------------------------
# DARE
# ---------------------------------------------------------------------------------------------


def splitmix_uniforms(seed: int, n: int) -> np.ndarray:
    """SplitMix64 seeded ``seed``, outputs 0..n-1, top 24 bits / 2^24 (Steele, Lea & Flood
    2014; the constants of Vigna's reference implementation), in NumPy's wrapping uint64."""
    state = np.uint64(seed % 2**64) + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    z = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float32) / np.float32(2**24)


def test_splitmix_reference_matches_the_published_sequence():
    """The reference itself: SplitMix64 seeded 1234567 (Vigna's splitmix64.c) starts with
    6457827717110365317, 3203168211198807973 (its top 24 bits here)."""
    want = np.array([6457827717110365317, 3203168211198807973], dtype=np.uint64) >> np.uint64(40)
    np.testing.assert_array_equal(splitmix_uniforms(1234567, 2), want.astype(np.float32) / 2**24)


def test_draws_are_splitmix_blocks_on_any_device_path():
    from modelfuse.merge.methods._random import uniforms

    want = splitmix_uniforms(2**62 + 12345, 1000)
    np.testing.assert_array_equal(uniforms(2**62 + 12345, 0, 1000).numpy(), want)
    np.testing.assert_array_equal(uniforms(2**62 + 12345, 300, 77).numpy(), want[300:377])


def model_uniforms(seed, densities, shape, dtype=np.float32):
    """The documented draws: each model with d < 1 takes a seed s_i = randint(0, 2**62) from the
    tensor's generator in model order, then u = SplitMix64 seeded s_i (flat order)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in densities:
        if d >= 1:
            out.append(None)
            continue
        s_i = int(torch.randint(0, 2**62, (1,), generator=g))
        u = splitmix_uniforms(s_i, math.prod(shape)).astype(np.float64 if dtype == np.float64 else np.float32)
        out.append(u.reshape(shape))
    return out


def dare_masks(xs, base, densities, seed):
    """Keep where u < d, compared in u's dtype."""
    us = model_uniforms(seed, densities, base.shape, base.dtype)
    return [np.ones(base.shape, bool) if u is None else u < u.dtype.type(d) for u, d in zip(us, densities)]


def test_dare_masks_are_the_documented_draws():
    xs, base = models(2, 30, (40, 30), np.float32)
    g = torch.Generator().manual_seed(8)
    got = [
        (drop_random(torch.from_numpy(t), d, "none", g) != 0).numpy()
        for t, d in zip(np_task_vectors(xs, base), (0.3, 0.8))
    ]
    ref = dare_masks(xs, base, (0.3, 0.8), 8)
    for m, r, d in zip(got, ref, (0.3, 0.8)):
        np.testing.assert_array_equal(m, r)
        assert abs(m.mean() - d) < 5 * math.sqrt(d * (1 - d) / m.size)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rescale", ["l1", "inverse_density", "none"])
def test_dare_matches_reference_given_its_masks(name, dtype, shape, rescale):
    xs, base = models(3, 9, shape, dtype)
    weights, densities = [1.0, 0.5, 1.5], [0.3, 0.6, 0.9]
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    got = run(name, xs, base, per_model, seed=11, rescale=rescale, **{"lambda": 1.2})
    masks = dare_masks(xs, base, densities, 11)
    taus = np_task_vectors(xs, base)
    dropped = [np_rescale(t, t * m, rescale, d) for t, m, d in zip(taus, masks, densities)]
    ref = np_merge(base, dropped, weights, elect=name == "dare_ties", normalize=False, lam=1.2)
    assert_close(got, ref, dtype)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_with_density_one_is_task_arithmetic_and_draws_nothing(name):
    xs, base = models(3, 10, (5, 4), np.float64)
    sign = np.sign(xs[0] - base)
    xs = [base + sign * np.abs(x - base) for x in xs]  # agreeing signs, so the vote keeps all
    per_model = [{"weight": w} for w in (0.5, 1.0, 2.0)]
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    got = get_method(name)(
        [torch.from_numpy(x) for x in xs], torch.from_numpy(base), models=per_model, generator=g
    ).numpy()
    ta = run("task_arithmetic", xs, base, per_model)
    np.testing.assert_allclose(got, ta, rtol=1e-12, atol=1e-12)
    assert torch.equal(g.get_state(), state)


def test_normalize_without_vote_treats_a_vanishing_weight_sum_as_one():
    base = np.zeros(2)
    xs = [np.array([2.0, 1.0]), np.array([-3.0, 1.0])]
    got = run("dare_linear", xs, base, [{"weight": 1.0}, {"weight": -1.0}], seed=0, normalize=True)
    np.testing.assert_array_equal(got, [5.0, 0.0])


def test_dare_inverse_density_rescale_is_unbiased():
    # rows are independent draws of one task vector: each entry's mean over n rows must be
    # within 5 sigma/sqrt(n) of tau, sigma = |tau| sqrt((1 - p) / p) the std of one draw
    p, n = 0.3, 4000
    tau = np.linspace(-2.0, 2.0, 33)
    rows = np.tile(tau, (n, 1))
    got = run("dare_linear", [rows], np.zeros_like(rows), [{"density": p}], seed=3, rescale="inverse_density")
    sigma = np.abs(tau) * math.sqrt((1 - p) / p)
    assert np.all(np.abs(got.mean(axis=0) - tau) <= 5 * sigma / math.sqrt(n) + 1e-12)
    assert set(np.unique(np.round(got / np.where(tau == 0, 1, tau), 9))) <= {0.0, round(1 / p, 9)}
    kept = (got != 0).mean(axis=0)[tau != 0]  # the keep rate is the density, within 5 binomial sigmas
    assert np.all(np.abs(kept - p) <= 5 * math.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dare_l1_rescale_keeps_the_l1_norm(seed):
    xs, base = models(1, 12, (50,), np.float64)
    base = np.zeros_like(base)
    got = run("dare_linear", xs, base, [{"density": 0.2}], seed=seed)
    assert np.count_nonzero(got) < 25
    np.testing.assert_allclose(np.abs(got).sum(), np.abs(xs[0]).sum(), rtol=1e-12)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_same_seed_same_bytes_other_seed_other_bytes(name):
    xs, base = models(2, 13, (16, 16), np.float32)
    per_model = [{"density": 0.5, "weight": 1.0}] * 2
    a = run(name, xs, base, per_model, seed=42)
    b = run(name, xs, base, per_model, seed=42)
    c = run(name, xs, base, per_model, seed=43)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


def test_rescale_accepts_mergekit_booleans():
    xs, base = models(1, 14, (30,), np.float64)
    per_model = [{"density": 0.5}]
    for flag, mode in [(True, "l1"), (False, "none")]:
        a = run("dare_linear", xs, base, per_model, seed=1, rescale=flag)
        b = run("dare_linear", xs, base, per_model, seed=1, rescale=mode)
        assert a.tobytes() == b.tobytes()
    assert get_method("dare_ties").check_shared({"rescale": True}).rescale == "l1"


# ---------------------------------------------------------------------------------------------
# Breadcrumbs
# ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37,), (6, 9), (200,)])
def test_breadcrumbs_matches_reference(name, dtype, shape):
    xs, base = models(3, 15, shape, dtype)
    weights, densities, gammas = [1.0, 0.6, 1.4], [0.5, 0.9, 0.3], [0.1, 0.2, 0.01]
    per_model = [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(weights, densities, gammas)]
    got = run(name, xs, base, per_model, **{"lambda": 0.7})
    crumbs = [np_breadcrumb(t, d, g) for t, d, g in zip(np_task_vectors(xs, base), densities, gammas)]
    ref = np_merge(base, crumbs, weights, elect=name == "breadcrumbs_ties", normalize=False, lam=0.7)
    assert_close(got, ref, dtype)


@pytest.mark.usefixtures("merge_path")
def test_breadcrumbs_window_with_ties_and_clipped_top():
    # 16 entries, magnitudes 1..4 repeated; d = 0.5, gamma = 0.25: drop 4 top, 4 bottom, keep 8
    base = np.zeros(16, np.float32)
    x = np.array([1, 2, 3, 4, 4, 3, 2, 1, 1, 2, 3, 4, 4, 3, 2, 1], np.float32)
    got = run("breadcrumbs", [x], base, [{"density": 0.5, "gamma": 0.25}])
    np.testing.assert_array_equal(got, np_breadcrumb(x, 0.5, 0.25))
    np.testing.assert_array_equal(got, np.where((x == 2) | (x == 3), x, 0))
    # gamma + density > 1: only the top 1 - density goes, nothing at the bottom; the cut
    # falls inside the 3s, and (16 entries: insertion sort, stable) the first three stay
    got = run("breadcrumbs", [x], base, [{"density": 11 / 16, "gamma": 0.5}])
    np.testing.assert_array_equal(got, np_breadcrumb(x, 11 / 16, 0.5))
    assert np.count_nonzero(got) == 11 and np.flatnonzero(got == 3).tolist() == [2, 5, 10]
    # density 1 keeps everything, outliers included
    np.testing.assert_array_equal(run("breadcrumbs", [x], base, [{"density": 1.0, "gamma": 0.5}]), x)


# ---------------------------------------------------------------------------------------------
# DELLA
# ---------------------------------------------------------------------------------------------


def np_della_probs(tau, density, eps):
    rows = tau.reshape(1, -1) if tau.ndim < 2 else tau
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    return ((density - eps) + 2 * eps * ranks / (n - 1)).reshape(tau.shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_della_keep_probabilities_follow_the_magnitude_rank_per_row(shape):
    xs, base = models(1, 16, shape, np.float64)
    tau = xs[0] - base
    got = rank_keep_probabilities(torch.from_numpy(tau), 0.5, 0.2).numpy()
    np.testing.assert_allclose(got, np_della_probs(tau, 0.5, 0.2), rtol=1e-6)
    rows = got.reshape(1, -1) if got.ndim < 2 else got
    np.testing.assert_allclose(rows.min(axis=1), 0.3, rtol=1e-6)
    np.testing.assert_allclose(rows.max(axis=1), 0.7, rtol=1e-6)


def test_della_keep_rate_per_rank_matches_its_probability():
    p, eps, n = 0.5, 0.3, 4000
    tau = np.arange(1.0, 12.0)  # ranks 1..11, probabilities 0.2 .. 0.8
    rows = np.tile(tau, (n, 1))  # one row per draw
    got = run(
        "della_linear", [rows], np.zeros_like(rows), [{"density": p, "epsilon": eps}], seed=4, rescale="none"
    )
    probs = (p - eps) + 2 * eps * np.arange(11) / 10
    kept = (got != 0).mean(axis=0)
    assert np.all(np.abs(kept - probs) <= 5 * np.sqrt(probs * (1 - probs) / n))


def test_della_inverse_probability_rescale_is_unbiased():
    p, eps, n = 0.4, 0.25, 4000
    tau = np.linspace(0.5, 3.0, 9) * np.array([1, -1] * 4 + [1])
    rows = np.tile(tau, (n, 1))
    got = run(
        "della_linear",
        [rows],
        np.zeros_like(rows),
        [{"density": p, "epsilon": eps}],
        seed=5,
        rescale="inverse_density",
    )
    probs = np_della_probs(tau, p, eps)
    sigma = np.abs(tau) * np.sqrt((1 - probs) / probs)
    assert np.all(np.abs(got.mean(axis=0) - tau) <= 5 * sigma / math.sqrt(n))


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_della_matches_reference_given_its_masks(name, dtype, shape):
    xs, base = models(3, 17, shape, dtype)
    weights, densities, epsilons = [1.0, 0.5, 2.0], [0.5, 0.4, 0.7], [0.2, 0.1, 0.15]
    per_model = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)]
    got = run(name, xs, base, per_model, seed=21, **{"lambda": 0.9})
    taus = np_task_vectors(xs, base)
    us = model_uniforms(21, densities, base.shape, dtype)  # the documented draws, as for DARE
    masks = [u < np_della_probs(t, d, e).astype(u.dtype) for u, t, d, e in zip(us, taus, densities, epsilons)]
    g = torch.Generator().manual_seed(21)  # the one-tensor helper draws the same
    for t, d, e, m in zip(taus, densities, epsilons, masks):
        np.testing.assert_array_equal((drop_by_rank(torch.from_numpy(t), d, e, "none", g) != 0).numpy(), m)
    pruned = [np_rescale(t, t * m, "l1", None) for t, m in zip(taus, masks)]
    ref = np_merge(base, pruned, weights, elect=name == "della", normalize=name == "della", lam=0.9)
    assert_close(got, ref, dtype)


# ---------------------------------------------------------------------------------------------
# SCE and RAM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1])
def test_sce_matches_reference(dtype, shape, topk):
    xs, base = models(3, 18, shape, dtype)
    got = run("sce", xs, base, select_topk=topk)
    assert_close(got, np_sce(xs, base, topk), dtype)


def test_sce_selection_on_identical_models_selects_nothing():
    # mergekit counts k among the entries of non-zero variance: identical task vectors have
    # none, so with select_topk < 1 every entry is zeroed and the base comes back
    xs, base = models(1, 26, (6, 5), np.float64)
    np.testing.assert_array_equal(run("sce", xs * 3, base, select_topk=0.5), base)
    np.testing.assert_allclose(run("sce", xs * 3, base), xs[0], rtol=1e-12, atol=1e-12)


def sparse_models(n, seed, shape, dtype=np.float64):
    """RL-style task vectors: most entries unchanged, some below epsilon, some shared."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(dtype)
    xs = []
    for _ in range(n):
        delta = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
        delta += 1e-7 * (rng.random(shape) < 0.2)  # within epsilon: counts as unchanged
        xs.append((base + delta).astype(dtype))
    return xs, base


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ram_matches_reference(dtype, shape):
    xs, base = sparse_models(3, 19, shape, dtype)
    assert_close(run("ram", xs, base), np_ram(xs, base, 1e-5), dtype)
    assert_close(run("ram", xs, base, epsilon=0.5), np_ram(xs, base, 0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ramplus_tl_matches_reference(dtype, shape):
    xs, base = sparse_models(3, 20, shape, dtype)
    assert_close(run("ramplus_tl", xs, base), np_ram(xs, base, 1e-5, plus=(0.1, 0.2)), dtype)
    got = run("ramplus_tl", xs, base, r=0.5, alpha=2.0, epsilon=1e-3)
    assert_close(got, np_ram(xs, base, 1e-3, plus=(0.5, 2.0)), dtype)


def test_ram_keeps_unique_updates_and_averages_shared_ones():
    base = np.zeros(4)
    xs = [np.array([2.0, 4.0, 0.0, 1e-9]), np.array([0.0, 2.0, 0.0, 0.0])]
    np.testing.assert_array_equal(run("ram", xs, base), [2.0, 3.0, 0.0, 0.0])
    # model 0 changed 2 entries: 1 shared, 1 unique, rho = 1, clipped to alpha: scale 1 + 0.1 * 0.2
    np.testing.assert_allclose(run("ramplus_tl", xs, base), [2.0 * 1.02, 3.0, 0.0, 0.0])
    # a change of exactly epsilon counts as unchanged
    np.testing.assert_array_equal(run("ram", [np.array([0.5, 0.75])], np.zeros(2), epsilon=0.5), [0.0, 0.75])


# ---------------------------------------------------------------------------------------------
# defaults and bad parameters
# ---------------------------------------------------------------------------------------------


def test_defaults_are_mergekits():
    shared = {  # the lambda field is lambda_ in Python, lambda in recipes
        name: {k.rstrip("_"): v for k, v in get_method(name).shared_defaults().items()} for name in ALL
    }
    per_model = {name: get_method(name).per_model_defaults() for name in ALL}
    assert shared["ties"] == {
        "lambda": 1.0,
        "normalize": True,
        "rescale": "none",
        "vote": "weighted",
        "trim": "tensor",
        "tie_break": "index",
    }
    for name in ("dare_linear", "dare_ties"):
        assert shared[name] == {"lambda": 1.0, "normalize": False, "rescale": "l1"}
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        assert shared[name] == {"lambda": 1.0, "normalize": False, "rescale": "none", "tie_break": "index"}
        assert per_model[name] == {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    assert shared["della"] == {"lambda": 1.0, "normalize": True, "rescale": "l1"}
    assert shared["della_linear"] == {"lambda": 1.0, "normalize": False, "rescale": "l1"}
    assert per_model["della"] == {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    assert shared["sce"] == {"select_topk": 1.0} and per_model["sce"] == {}
    assert shared["ram"] == {"epsilon": 1e-5}
    assert shared["ramplus_tl"] == {"epsilon": 1e-5, "r": 0.1, "alpha": 0.2}
    assert all(get_method(n).base == "required" for n in ALL)
    assert {n for n in ALL if get_method(n).randomized} == {
        "dare_linear",
        "dare_ties",
        "della",
        "della_linear",
    }


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs", "della"])
@pytest.mark.parametrize("density", [0, 1.5, -0.2])
def test_density_outside_0_1_is_refused(name, density):
    xs, base = models(2, 22, (4,))
    with pytest.raises(ConfigError, match=r"model 1 parameters: density"):
        run(name, xs, base, [{"density": 0.5}, {"density": density}], seed=0)


@pytest.mark.parametrize(("density", "epsilon"), [(0.2, 0.3), (0.9, 0.1), (0.5, 0.5)])
def test_della_epsilon_must_keep_probabilities_in_0_1(density, epsilon):
    xs, base = models(1, 23, (4,))
    with pytest.raises(ConfigError, match=rf"density={density}, epsilon={epsilon}"):
        run("della", xs, base, [{"density": density, "epsilon": epsilon}], seed=0)
    tau = torch.from_numpy(xs[0] - base)
    with pytest.raises(ConfigError, match="epsilon"):  # the plain function checks too
        della_mod.della(
            [tau],
            torch.zeros_like(tau),
            weight=[1.0],
            density=[density],
            epsilon=[epsilon],
            lambda_=1.0,
            normalize=True,
            rescale="l1",
            generator=None,
        )


@pytest.mark.parametrize(
    ("name", "per_model", "shared", "field"),
    [
        ("ties", {"densty": 0.5}, {}, "densty"),
        ("ties", {}, {"vote": "majority"}, "vote"),
        ("ties", {}, {"trim": "layer"}, "trim"),
        ("dare_linear", {}, {"rescale": "l3"}, "rescale"),
        ("dare_linear", {"gamma": 0.1}, {}, "gamma"),
        ("breadcrumbs", {"gamma": 1.5}, {}, "gamma"),
        ("della", {"epsilon": -0.1}, {}, "epsilon"),
        ("sce", None, {"select_topk": 0.0}, "select_topk"),
        ("sce", {"weight": 1.0}, {}, "weight"),
        ("ram", None, {"lambda": 1.0}, "lambda"),
        ("ramplus_tl", None, {"alpha": -1.0}, "alpha"),
    ],
)
def test_bad_parameters_name_the_field(name, per_model, shared, field):
    xs, base = models(1, 24, (4,))
    with pytest.raises(ConfigError, match=field):
        run(name, xs, base, None if per_model is None else [per_model], seed=0, **shared)


def test_shape_mismatch_is_a_config_error():
    _, base = models(1, 25, (4,))
    with pytest.raises(ConfigError, match=r"shape \(5,\).*\(4,\)"):
        run("ties", [np.zeros(5, np.float32)], base)


@pytest.mark.parametrize("block", [1, 7, 64, None])
@pytest.mark.parametrize("seed", range(40))
def test_index_tie_break_is_a_stable_sort(seed, block, monkeypatch):
    """tie_break="index" keeps what NumPy's stable argsort keeps, on tie-heavy magnitudes,
    whatever the block size (equal entries at a cut are counted across blocks)."""
    from modelfuse.merge.methods import _task_vectors

    if block is not None:
        monkeypatch.setattr(_task_vectors, "BLOCK", block)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    mags = rng.integers(0, 5, size=n).astype(np.float32) * 0.25
    tau = torch.tensor(mags * np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32))
    k = int(rng.integers(0, n + 1))
    want = np.zeros(n, bool)
    want[np.argsort(-mags, kind="stable")[:k]] = True
    np.testing.assert_array_equal(largest_magnitudes(tau, k, "index").numpy(), want)
    lo = int(rng.integers(0, n))
    hi = int(rng.integers(lo, n + 1))
    want = np.zeros(n, bool)
    want[np.argsort(mags, kind="stable")[lo:hi]] = True
    np.testing.assert_array_equal(magnitude_window(tau, lo, hi, "index").numpy(), want)


def test_index_tie_break_changes_only_equal_magnitudes_at_the_cut():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 64, generator=g)
    xs = [base + torch.randint(-3, 4, (64, 64), generator=g).float() * 0.125 for _ in range(3)]
    a = get_method("ties")(xs, base, models=[{"density": 0.3}] * 3, tie_break="sort")
    b = get_method("ties")(xs, base, models=[{"density": 0.3}] * 3, tie_break="index")
    differ = a != b
    assert differ.any()  # the magnitudes are on a grid: the k-th value is shared by many entries
    cuts = []
    for x in xs:
        mags = (x - base).abs().flatten()
        cuts.append(mags.sort(descending=True).values[int(0.3 * mags.numel()) - 1])
    at_cut = torch.zeros_like(differ)
    for x, cut in zip(xs, cuts):
        at_cut |= (x - base).abs() == cut
    assert not (differ & ~at_cut).any()


@pytest.mark.parametrize("elect", [True, False])
def test_blockwise_merge_equals_whole_tensor_merge(elect):
    from modelfuse.merge.methods._engine import merge_deltas

    g = torch.Generator().manual_seed(3)
    base = torch.randn(13, 11, generator=g)
    deltas = torch.randn(3, 13, 11, generator=g) * (torch.rand(3, 13, 11, generator=g) < 0.5)
    kw = dict(elect=elect, normalize=True, lambda_=0.7)
    whole = merge_deltas(base, deltas.clone(), [0.5, 1.0, 2.0], block=10**9, **kw)
    blocks = merge_deltas(base, deltas.clone(), [0.5, 1.0, 2.0], block=7, **kw)
    assert torch.equal(whole, blocks)


@pytest.mark.parametrize(
    "name, per_model, shared",
    [
        ("ties", {"density": 0.3}, {}),
        ("ties", {"density": 0.3}, {"tie_break": "sort"}),
        ("ties", {"density": 0.5}, {"rescale": "l2", "vote": "unweighted"}),
        ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.1}, {}),
        ("breadcrumbs", {"density": 0.4, "gamma": 0.1}, {"tie_break": "sort", "rescale": "linf"}),
        ("dare_ties", {"density": 0.4}, {}),
        ("dare_linear", {"density": 0.6}, {"rescale": "inverse_density"}),
        ("della", {"density": 0.5, "epsilon": 0.2}, {}),
        ("della_linear", {"density": 0.5, "epsilon": 0.2}, {"rescale": "inverse_density"}),
    ],
)
@pytest.mark.parametrize("shape", [(37,), (9, 13), (4, 5, 3)])
def test_blocks_give_the_bytes_of_one_whole_tensor_pass(name, per_model, shared, shape, monkeypatch):
    """Statistics and merge run in blocks: any block size gives the same result, bit for bit
    (random streams continue across blocks, tie counts too; DELLA's blocks hold whole rows)."""
    from modelfuse.merge.methods import _task_vectors

    g = torch.Generator().manual_seed(4)
    base = torch.randn(shape, generator=g)
    xs = [base + torch.randint(-3, 4, shape, generator=g).float() * 0.25 for _ in range(3)]
    outs = []
    for block in (1 << 30, 1, 5, 16):
        monkeypatch.setattr(_task_vectors, "BLOCK", block)
        method = get_method(name)
        outs.append(
            method(xs, base, models=[per_model] * 3, generator=torch.Generator().manual_seed(9), **shared)
        )
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


# ---------------------------------------------------------------------------------------------
# The compiled kernels against the torch blocks
# ---------------------------------------------------------------------------------------------

KERNEL_CASES = [
    ("ties", {"density": 0.3}, {}),
    ("ties", {"density": 0.05}, {"normalize": False, "lambda": 0.7}),
    ("ties", {"density": 0.9}, {"rescale": "inverse_density"}),
    ("ties", {"density": 1.0}, {}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}, {}),
    ("breadcrumbs", {"density": 0.97, "gamma": 0.01}, {"normalize": True, "lambda": 1.5}),
    ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.2}, {"rescale": "inverse_density"}),
    ("breadcrumbs_ties", {"density": 0.0001, "gamma": 0.0}, {}),
    ("dare_ties", {"density": 0.3}, {"rescale": "inverse_density"}),
    ("dare_linear", {"density": 0.7}, {"rescale": "none", "lambda": 0.5}),
    ("dare_ties", {"density": 0.5}, {}),  # L1 rescale: the factor's float64 sum may round apart
    ("ties", {"density": 0.4}, {"rescale": "l2"}),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, {"rescale": "linf"}),
    ("della", {"density": 0.5, "epsilon": 0.2}, {}),
    ("della", {"density": 0.4, "epsilon": 0.3}, {"rescale": "inverse_density"}),
    ("della_linear", {"density": 0.6, "epsilon": 0.1}, {"rescale": "none"}),
]


@pytest.mark.parametrize(("name", "per_model", "shared"), KERNEL_CASES)
@pytest.mark.parametrize("n_models", [1, 2, 4])
@pytest.mark.parametrize("shape", [(1,), (5000,), (37, 151)])
@pytest.mark.parametrize("grid", [True, False])
@pytest.mark.parametrize("store", [True, False])
def test_kernels_give_the_bytes_of_the_torch_blocks(
    name, per_model, shared, n_models, shape, grid, store, monkeypatch
):
    """The C kernels do the torch path's float32 operations in its order: the same bytes,
    on tie-heavy deltas (a grid: equal magnitudes straddle the cuts, across kernel blocks)
    and on continuous ones, with positive, negative and cancelling weights; with the
    magnitudes' high halves kept between the passes and recomputed (large tensors)."""
    require_kernels()
    from modelfuse.merge.methods import _kernel_engine, _kernels

    if not store:
        monkeypatch.setattr(_kernel_engine, "_KERNEL_HIGH_STORE", 0)

    # a stable seed per case (Python's hash() of a str changes with every process)
    rng = np.random.default_rng(zlib.crc32(repr((name, n_models, shape, grid)).encode()))
    base = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    if grid:
        xs = [
            base + torch.from_numpy(rng.integers(-4, 5, shape).astype(np.float32) * 0.125)
            for _ in range(n_models)
        ]
    else:
        xs = [
            base + torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.01)
            for _ in range(n_models)
        ]
    for weights in ([1.0] * n_models, [0.5, -1.25, 2.0, 0.75][:n_models], [1.0, -1.0, 0.5, -0.5][:n_models]):
        models = [{**per_model, "weight": w} for w in weights]
        before = _kernels.set_enabled(True)
        try:
            fast = get_method(name)(
                xs, base, models=models, generator=torch.Generator().manual_seed(5), **shared
            )
            _kernels.set_enabled(False)
            slow = get_method(name)(
                xs, base, models=models, generator=torch.Generator().manual_seed(5), **shared
            )
        finally:
            _kernels.set_enabled(before)
        assert fast.dtype == slow.dtype == torch.float32 and fast.shape == slow.shape
        if shared.get("rescale", "l1" if name.startswith(("dare", "della")) else "none") in ("l1", "l2"):
            # the norms are float64 sums in another order: the float32 factor may differ in its last bit
            torch.testing.assert_close(fast, slow, rtol=2.4e-7, atol=0)
        else:
            assert torch.equal(fast.view(torch.int32), slow.view(torch.int32)), (
                weights,
                (fast != slow).sum(),
            )


def test_kernels_apply_to_float32_cpu_and_leave_the_rest_to_torch():
    require_kernels()
    from modelfuse.merge.methods import _kernels

    calls = []
    real = _kernels.cut_merge

    def spy(*args, **kwargs):
        calls.append(args[0][0].dtype)
        return real(*args, **kwargs)

    base = torch.randn(300)
    xs = [base + torch.randn(300) * 0.1 for _ in range(2)]
    before = _kernels.set_enabled(True)
    try:
        _kernels.cut_merge = spy
        get_method("ties")(xs, base, models=[{"density": 0.5}] * 2)
        get_method("ties")([x.double() for x in xs], base.double(), models=[{"density": 0.5}] * 2)
        get_method("ties")(xs, base, models=[{"density": 0.5}] * 2, tie_break="sort")
        get_method("ties")(xs, base, models=[{"density": 0.5}] * 2, vote="unweighted")
        get_method("ties")(xs, base, models=[{"density": 0.5}] * 2, rescale="l1")
        get_method("dare_ties")(xs, base, models=[{"density": 0.5}] * 2, generator=torch.Generator())
        get_method("della")(xs, base, models=[{"density": 0.5}] * 2, generator=torch.Generator())
    finally:
        _kernels.cut_merge = real
        _kernels.set_enabled(before)
    # float64, the sort tie-break, the unweighted vote: torch
    assert calls == [np.float32] * 4


@pytest.mark.parametrize(
    ("name", "per_model", "shared"),
    [
        ("ties", {"density": 0.3}, {}),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}, {}),
        ("dare_ties", {"density": 0.4}, {"rescale": "inverse_density"}),
        ("della", {"density": 0.5, "epsilon": 0.2}, {"rescale": "inverse_density"}),
    ],
)
def test_kernels_split_over_threads_give_the_same_bytes(name, per_model, shared, monkeypatch):
    """Large tensors are merged in ranges of whole blocks on several threads (here 3, whatever
    the machine): equal magnitudes kept by position are found across the range borders."""
    require_kernels()
    from modelfuse.merge.methods import _kernels

    monkeypatch.setattr(_kernels, "cores", lambda: 3)
    g = torch.Generator().manual_seed(11)
    base = torch.randn(700, 1000, generator=g)
    xs = [base + torch.randint(-4, 5, (700, 1000), generator=g).float() * 0.125 for _ in range(3)]
    outs = []
    for enabled in (True, False):
        before = _kernels.set_enabled(enabled)
        try:
            outs.append(
                get_method(name)(
                    xs, base, models=[per_model] * 3, generator=torch.Generator().manual_seed(2), **shared
                )
            )
        finally:
            _kernels.set_enabled(before)
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))


def _della_rows(rng, cols):
    """Task-vector rows for each way the kernels settle DELLA's keep decisions: all zero; one
    value among zeros; continuous (few open decisions, each ranked alone); a third exact
    zeros (many open ones in one bucket: its members sorted); two values on 40% each (most
    of the row open: all ranked); one value on 60% (a crowded bucket: all ranked); a few
    outliers that stretch the buckets; a short row."""
    rows = np.zeros((8, cols), np.float32)
    rows[1, cols // 3] = 0.5
    rows[2] = rng.standard_normal(cols) * 0.01
    rows[3] = rng.standard_normal(cols) * 0.01 * (rng.random(cols) > 1 / 3)
    rows[4] = np.where(rng.random(cols) < 0.4, 0.02, np.where(rng.random(cols) < 0.67, -0.03, 0.0))
    rows[4] += (rows[4] == 0) * rng.standard_normal(cols).astype(np.float32) * 0.01
    rows[5] = np.where(rng.random(cols) < 0.6, 0.25, rng.standard_normal(cols) * 0.1)
    rows[6] = rng.standard_normal(cols) * 1e-4
    rows[6, rng.integers(0, cols, 5)] = 30.0
    rows[7, :3] = [0.1, -0.1, 0.2][:cols]
    return rows


def _on_both_paths(call):
    """call() with the C kernels, then with the torch path."""
    from modelfuse.merge.methods import _kernels

    outs = []
    for enabled in (True, False):
        before = _kernels.set_enabled(enabled)
        try:
            outs.append(call())
        finally:
            _kernels.set_enabled(before)
    return outs


@pytest.mark.parametrize("rescale", ["l1", "none", "inverse_density"])
def test_della_kernels_decide_like_the_full_ranking_on_every_kind_of_row(rescale):
    """The C kernels settle most DELLA decisions from coarse buckets and rank only the open
    ones; on rows built to take each of their routes, they keep exactly the entries that the
    torch path's full ranking keeps."""
    require_kernels()
    rng = np.random.default_rng(3)
    models = [{"density": 0.5, "epsilon": 0.4, "weight": w} for w in (1.0, 0.5, -0.25)]
    for cols in (3000, 1):  # rows of one entry keep it with probability density
        base = torch.from_numpy(rng.standard_normal((8, cols)).astype(np.float32))
        xs = [base + torch.from_numpy(_della_rows(rng, cols)) for _ in range(3)]
        fast, slow = _on_both_paths(
            lambda base=base, xs=xs: get_method("della")(
                xs, base, models=models, generator=torch.Generator().manual_seed(4), rescale=rescale
            )
        )
        if rescale == "l1":  # the factor's float64 sum runs in another order: its last bit may differ
            torch.testing.assert_close(fast, slow, rtol=2.4e-7, atol=0)
        else:
            assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


@pytest.mark.parametrize(
    ("name", "per_model"),
    [
        ("della", {"density": 0.5, "epsilon": 0.2}),
        ("dare_ties", {"density": 0.4}),
        ("ties", {"density": 0.3}),
    ],
)
def test_norm_passes_give_the_same_bytes_on_any_number_of_threads(name, per_model, monkeypatch):
    """The norm passes run in ranges on any threads; their partial sums are added in range
    order, so a norm rescale gives the same bytes on 1 core as on 3."""
    from modelfuse.merge.methods import _kernels

    monkeypatch.setattr(_kernels, "NORM_RANGE", 1)  # the least: ranges of 8 blocks
    g = torch.Generator().manual_seed(12)
    base = torch.randn(300, 1000, generator=g)
    xs = [base + torch.randn(300, 1000, generator=g) * 0.01 for _ in range(3)]
    outs = []
    for cores in (1, 3):
        monkeypatch.setattr(_kernels, "cores", lambda cores=cores: cores)
        outs.append(
            get_method(name)(
                xs, base, models=[per_model] * 3, generator=torch.Generator().manual_seed(2), rescale="l1"
            )
        )
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))


# ---------------------------------------------------------------------------------------------
# linear and task arithmetic (the weighted sums the sparsifying methods build on)
# ---------------------------------------------------------------------------------------------


def np_linear(xs, weights, normalize):
    """Model soup / weighted average (Wortsman et al. 2022, eq. 1): sum_i w_i x_i [/ sum_i w_i],
    accumulated in model order (each product rounded) in float32, float64 for float64 inputs,
    with the weights given as float32, as mergekit does."""
    acc = np.float64 if xs[0].dtype == np.float64 else np.float32
    w = np.asarray(weights, np.float32).astype(acc)
    s = xs[0].astype(acc) * w[0]
    for x, wi in zip(xs[1:], w[1:]):
        s = s + x.astype(acc) * wi
    if normalize:
        s = s / w.sum(dtype=acc)
    return s


def np_task_arithmetic(xs, base, weights, lam, normalize):
    """Ilharco et al. 2023: base + lambda * sum_i w_i (x_i - base) [/ sum_i w_i], in the base dtype."""
    w = np.asarray(weights, base.dtype)
    s = np.zeros_like(base)
    for x, wi in zip(xs, w):
        s = s + (x.astype(base.dtype) - base) * wi
    if normalize:
        div = w.sum(dtype=base.dtype)
        s = s / (div if abs(div) >= 1e-8 else base.dtype.type(1))
    return s * base.dtype.type(lam) + base


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (7,), (300, 1000)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, -0.25, 2.0)])
def test_linear_and_task_arithmetic_match_reference(dtype, shape, normalize, weights):
    xs, base = models(3, 31, shape, dtype)
    per_model = [{"weight": w} for w in weights]
    got = get_method("linear")(
        [torch.from_numpy(np.asarray(x)) for x in xs], None, models=per_model, normalize=normalize
    )
    np.testing.assert_array_equal(got.numpy(), np_linear(xs, weights, normalize).astype(dtype))
    got = run("task_arithmetic", xs, base, per_model, normalize=normalize, **{"lambda": 0.8})
    np.testing.assert_array_equal(got, np_task_arithmetic(xs, base, weights, 0.8, normalize))
