"""Interpolation-style merge methods against NumPy references written from their definitions.

slerp, nuslerp, multislerp, karcher, nearswap, passthrough, model_stock and arcee_fusion.
Each reference below is a direct NumPy transcription of the paper's equation with
mergekit 0.1.5's choices (thresholds, eps, which norm, which quantile), computed in
float64 from the same inputs, so float64 results must agree to ~1e-10 and float32 ones to
float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods import (  # noqa: F401  (registration)
    arcee_fusion,
    karcher,
    model_stock,
    nearswap,
    passthrough,
    slerp,
)
from modelfuse.merge.methods._base import get_method

from .kernel_support import require_kernels

SHAPES = [(7,), (4, 6), (3, 2, 5)]
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 2e-5, "atol": 2e-6}}


# ----------------------------------------------------------------------------- references


def ref_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Shoemake's slerp of the flattened tensors; |cos| > 0.9995 -> lerp; norms <= 1e-8 -> 1."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = np.clip(np.sum((a / (na if na > 1e-8 else 1.0)) * (b / (nb if nb > 1e-8 else 1.0))), -1, 1)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def ref_slerp_vector(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """nuslerp's per-vector rule: unit vectors over max(norm, 1e-7), lerp only when sin(theta) < 1e-8."""
    u0 = v0 / max(np.linalg.norm(v0), 1e-7)
    u1 = v1 / max(np.linalg.norm(v1), 1e-7)
    theta = np.arccos(np.clip(u0 @ u1, -1, 1))
    if abs(np.sin(theta)) < 1e-8:
        return (1 - t) * v0 + t * v1
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


def ref_nuslerp(weights, x0, x1, base=None, flatten=True, row_wise=False) -> np.ndarray:
    w0, w1 = weights
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = (x0, x1) if base is None else (x0 - base, x1 - base)
    if flatten:
        out = ref_slerp_vector(t, v0.ravel(), v1.ravel()).reshape(v0.shape)
    else:
        # vectors along the last axis, or along the first with row_wise (mergekit swaps axes 0 and -1)
        a, b = (np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)) if row_wise else (v0, v1)
        n = a.shape[-1]
        rows = [ref_slerp_vector(t, r0, r1) for r0, r1 in zip(a.reshape(-1, n), b.reshape(-1, n))]
        out = np.stack(rows).reshape(a.shape)
        out = np.swapaxes(out, 0, -1) if row_wise else out
    return out if base is None else base + out


def ref_multislerp(xs, weights, base=None, normalize=True, eps=1e-8) -> np.ndarray:
    """Tangent-space barycentre at the normalised weighted mean, mapped back by the exponential map."""
    v = [x if base is None else x - base for x in xs]
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum() if normalize else w
    norms = np.array([np.linalg.norm(vi) for vi in v])
    units = [vi.ravel() / (n + eps) for vi, n in zip(v, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    m = m / np.linalg.norm(m)
    g = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, units))
    gn = np.linalg.norm(g) + eps
    y = (np.cos(gn) * m + np.sin(gn) * g / gn) * (norms @ w)
    y = y.reshape(xs[0].shape)
    return y if base is None else base + y


def ref_karcher(xs, alphas=None, max_iter=10, tol=1e-5) -> np.ndarray:
    """Riemannian centre of mass of the unit vectors by m <- Exp_m(sum a_i Log_m(u_i)), times sum a_i |x_i|."""
    a = np.full(len(xs), 1 / len(xs)) if alphas is None else np.asarray(alphas, dtype=np.float64)
    norms = np.array([np.linalg.norm(x) for x in xs])
    keep = norms > tol
    units = [x.ravel() / n for x, n, k in zip(xs, norms, keep) if k]
    ak = a[keep] / a[keep].sum()
    m = sum(ai * u for ai, u in zip(ak, units))
    m = m / np.linalg.norm(m)
    for _ in range(max_iter):
        step = np.zeros_like(m)
        for ai, u in zip(ak, units):
            c = np.clip(m @ u, -1, 1)
            th = np.arccos(c)
            if th >= tol:
                step += ai * th / np.sin(th) * (u - c * m)  # Log_m(u)
        sn = np.linalg.norm(step)
        if sn < tol:
            break
        m = np.cos(sn) * m + np.sin(sn) * step / sn  # Exp_m(step)
        m = m / np.linalg.norm(m)
    return (a @ norms * m).reshape(xs[0].shape)


def ref_nearswap(t: float, base: np.ndarray, x: np.ndarray) -> np.ndarray:
    w = np.clip(t / np.maximum(np.abs(base - x), 1e-6), 0, 1)
    return w * x + (1 - w) * base


def ref_model_stock(xs, base, filter_wise=False) -> np.ndarray:
    """t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the task vectors (per row if filter_wise)."""
    n = len(xs)
    if filter_wise:
        rows = base.reshape(-1, base.shape[-1]) if base.ndim >= 2 else base.reshape(1, -1)
        taus = [(x.reshape(rows.shape) - rows) for x in xs]
    else:
        rows = base.reshape(1, -1)
        taus = [x.reshape(1, -1) - rows for x in xs]
    out = np.empty_like(rows)
    for r in range(rows.shape[0]):
        cs = []
        for i in range(n):
            for j in range(i + 1, n):
                a, b = taus[i][r], taus[j][r]
                cs.append(np.clip(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6), -1, 1))
        c = np.mean(cs)
        t = n * c / (1 + (n - 1) * c)
        out[r] = t * np.mean([x.reshape(rows.shape)[r] for x in xs], axis=0) + (1 - t) * rows[r]
    return out.reshape(base.shape)


def ref_arcee_fusion(base: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Importance |x - b| KL(softmax x || softmax b) per row; mask s >= median + 1.5 IQR (floor-index quantiles)."""

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(x) + 1e-8, softmax(base) + 1e-8
    s = np.abs(x - base) * np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    srt = np.sort(s.ravel())
    quant = {f: srt[math.floor(f * (srt.size - 1))] for f in (0.25, 0.5, 0.75)}
    mask = s >= quant[0.5] + 1.5 * (quant[0.75] - quant[0.25])
    return np.where(mask, x, base), mask


# ----------------------------------------------------------------------------- helpers


def models(shape, n, *, seed, spread=0.3, with_base=True):
    """A base and n models around it (cos ~ 0.95 for spread 0.3), as float64 NumPy arrays."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    xs = [base + spread * rng.standard_normal(shape) for _ in range(n)]
    return (base, xs) if with_base else xs


def as_torch(arrays, dtype):
    return [torch.from_numpy(a).to(dtype) for a in arrays]


def as_ref(tensors):
    """What the method sees, back in float64 for the reference."""
    return [t.to(torch.float64).numpy() for t in tensors]


def check(out: torch.Tensor, expected: np.ndarray, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and tuple(out.shape) == expected.shape
    np.testing.assert_allclose(out.to(torch.float64).numpy(), expected, **TOL[dtype])


def run(name, xs, base=None, models_=None, **shared):
    return get_method(name)(xs, base, models=models_, **shared)


# ----------------------------------------------------------------------------- against references


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_reference(shape, dtype, t):
    base_np, (x_np,) = models(shape, 1, seed=1)
    base, x = as_torch([base_np, x_np], dtype)
    b_ref, x_ref = as_ref([base, x])
    check(run("slerp", [x], base, t=t), ref_slerp(t, b_ref, x_ref), dtype)


@pytest.mark.usefixtures("merge_path")
def test_slerp_close_fine_tunes_take_the_spherical_path_in_float64():
    # cos ~ 0.999: below mergekit's 0.9995 threshold, so the angle matters and float64 keeps it
    base_np, (x_np,) = models((64, 32), 1, seed=2, spread=0.045)
    b, x = as_torch([base_np, x_np], torch.float64)
    cos = float(torch.dot(b.ravel(), x.ravel()) / (b.norm() * x.norm()))
    assert 0.998 < cos < 0.9995
    out = run("slerp", [x], b, t=0.3)
    np.testing.assert_allclose(out.numpy(), ref_slerp(0.3, base_np, x_np), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(out, 0.7 * b + 0.3 * x, rtol=0, atol=1e-9)  # not the linear path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("use_base", [False, True])
def test_nuslerp_matches_reference(shape, dtype, flatten, row_wise, use_base):
    base_np, xs_np = models(shape, 2, seed=3, spread=0.8)
    base, x0, x1 = as_torch([base_np, *xs_np], dtype)
    b_ref, x0_ref, x1_ref = as_ref([base, x0, x1])
    weights = [0.7, 1.6]
    out = run(
        "nuslerp",
        [x0, x1],
        base if use_base else None,
        [{"weight": w} for w in weights],
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    expected = ref_nuslerp(weights, x0_ref, x1_ref, b_ref if use_base else None, flatten, row_wise)
    check(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(shape, dtype, use_base, normalize):
    base_np, xs_np = models(shape, 3, seed=4, spread=0.7)
    base, *xs = as_torch([base_np, *xs_np], dtype)
    b_ref, *xs_ref = as_ref([base, *xs])
    weights = [0.5, 0.3, 0.2] if normalize else [1.0, 0.6, 0.4]
    out = run(
        "multislerp",
        xs,
        base if use_base else None,
        [{"weight": w} for w in weights],
        normalize_weights=normalize,
    )
    expected = ref_multislerp(xs_ref, weights, b_ref if use_base else None, normalize)
    check(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3, 5])
def test_karcher_matches_reference(shape, dtype, n):
    xs_np = models(shape, n, seed=5 + n, spread=0.9, with_base=False)
    xs = as_torch(xs_np, dtype)
    weights = [{"weight": 1.0 + i} for i in range(n)]  # ignored, as in mergekit
    check(run("karcher", xs, models_=weights), ref_karcher(as_ref(xs)), dtype)
    weighted = run("karcher", xs, models_=weights, weighted=True)
    alphas = np.arange(1.0, n + 1) / np.arange(1.0, n + 1).sum()
    check(weighted, ref_karcher(as_ref(xs), alphas), dtype)


@pytest.mark.parametrize("max_iter", [0, 1, 3])
def test_karcher_iteration_count_and_tolerance(max_iter):
    xs_np = models((40,), 4, seed=9, spread=1.5, with_base=False)
    xs = as_torch(xs_np, torch.float64)
    out = run("karcher", xs, max_iter=max_iter, tol=1e-12)
    np.testing.assert_allclose(out.numpy(), ref_karcher(xs_np, max_iter=max_iter, tol=1e-12), rtol=1e-10)


def test_karcher_of_two_is_the_geodesic_midpoint_times_the_mean_norm():
    a_np, b_np = models((5, 8), 2, seed=10, spread=2.0, with_base=False)
    ua, ub = a_np / np.linalg.norm(a_np), b_np / np.linalg.norm(b_np)
    mid = (ua + ub) / np.linalg.norm(ua + ub)
    expected = (np.linalg.norm(a_np) + np.linalg.norm(b_np)) / 2 * mid
    out = run("karcher", as_torch([a_np, b_np], torch.float64))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_karcher_zero_norm_models_count_only_in_the_scale():
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = run("karcher", [x, torch.zeros_like(x)])
    torch.testing.assert_close(out, x / 2, rtol=1e-12, atol=1e-12)
    assert torch.equal(run("karcher", [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t", [1e-3, 0.05, 0.3, 5.0])
def test_nearswap_matches_reference(shape, dtype, t):
    base_np, (x_np,) = models(shape, 1, seed=11)
    x_np[..., 0] = base_np[..., 0]  # equal elements: difference floored at 1e-6, w = 1
    base, x = as_torch([base_np, x_np], dtype)
    check(run("nearswap", [x], base, t=t), ref_nearswap(t, *as_ref([base, x])), dtype)


def test_nearswap_takes_the_other_model_where_the_models_are_near():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    x = torch.tensor([0.05, 0.2, -1.0, 1.0], dtype=torch.float64)
    out = run("nearswap", [x], base, t=0.1)
    # |d| <= t: x itself; |d| = 0.2: half way (w = 0.1/0.2); |d| = 1: a tenth of the way
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, -0.1, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_passthrough_copies_or_scales(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = run("passthrough", [x])
    assert torch.equal(out, x) and out.dtype == dtype and out.data_ptr() != x.data_ptr()
    scaled = run("passthrough", [x], models_=[{"scale": 0.5}])
    assert scaled.dtype == dtype and torch.equal(scaled, x * 0.5)


@pytest.mark.usefixtures("merge_path")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(shape, dtype, n, filter_wise):
    base_np, xs_np = models(shape, n, seed=12 + n)
    # correlated task vectors (a shared direction plus noise), so cos and t are not near 0
    shared = 0.3 * np.random.default_rng(99).standard_normal(shape)
    xs_np = [x + shared for x in xs_np]
    base, *xs = as_torch([base_np, *xs_np], dtype)
    b_ref, *xs_ref = as_ref([base, *xs])
    out = run("model_stock", xs, base, filter_wise=filter_wise)
    check(out, ref_model_stock(xs_ref, b_ref, filter_wise), dtype)


def test_model_stock_filter_wise_is_model_stock_of_each_row():
    base_np, xs_np = models((5, 9), 3, seed=20)
    base, *xs = as_torch([base_np, *xs_np], torch.float64)
    rows = torch.stack([run("model_stock", [x[r] for x in xs], base[r]) for r in range(5)])
    torch.testing.assert_close(run("model_stock", xs, base, filter_wise=True), rows, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("merge_path")
def test_model_stock_two_models_use_their_exact_angle():
    base = torch.zeros(2, dtype=torch.float64)
    xs = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)]
    c = 0.5 / math.sqrt(0.5)  # cos 45 degrees
    t = 2 * c / (1 + c)
    out = run("model_stock", xs, base)
    torch.testing.assert_close(out, t * torch.tensor([0.75, 0.25], dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_arcee_fusion_matches_reference(shape, dtype):
    rng = np.random.default_rng(21)
    base_np = rng.standard_normal(shape)
    x_np = base_np + 0.01 * rng.standard_normal(shape)
    x_np.ravel()[::4] += 2.0 * rng.standard_normal(x_np.size)[::4]  # a few large changes
    base, x = as_torch([base_np, x_np], dtype)
    expected, mask = ref_arcee_fusion(*as_ref([base, x]))
    assert 0 < mask.sum() < mask.size  # the threshold separates something
    out = run("arcee_fusion", [x], base)
    check(out, expected, dtype)
    # bit for bit mergekit's arithmetic: base + (x - base) * mask, in the input dtype
    assert torch.equal(out, base + (x - base) * torch.from_numpy(mask).to(dtype))


# ----------------------------------------------------------------------------- equivalences and edge cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp_endpoints_are_the_models(dtype):
    base_np, (x_np,) = models((6, 5), 1, seed=30)
    base, x = as_torch([base_np, x_np], dtype)
    assert torch.equal(run("slerp", [x], base, t=0.0), base)
    assert torch.equal(run("slerp", [x], base, t=1.0), x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_of_colinear_tensors_is_linear(dtype, t):
    base = torch.randn(4, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    for other in (2 * base, -base):  # parallel and antiparallel: |cos| = 1
        out = run("slerp", [other], base, t=t)
        torch.testing.assert_close(out, (1 - t) * base + t * other, **TOL[dtype])


def test_nuslerp_without_base_with_weights_one_minus_t_and_t_is_slerp():
    base_np, (x_np,) = models((8, 3), 1, seed=31)
    a, b = as_torch([base_np, x_np], torch.float64)
    for t in (0.2, 0.5, 0.85):
        nu = run("nuslerp", [a, b], None, [{"weight": 1 - t}, {"weight": t}])
        torch.testing.assert_close(nu, run("slerp", [b], a, t=t), rtol=1e-12, atol=1e-12)


def test_nuslerp_colinear_and_zero_weight_sum():
    a = torch.randn(10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = run("nuslerp", [a, 3 * a], None, [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(out, 2 * a)  # colinear: lerp at t = 0.5
    b = torch.randn(10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cancel = run("nuslerp", [a, b], None, [{"weight": 1.0}, {"weight": -1.0}])
    torch.testing.assert_close(cancel, torch.from_numpy(ref_slerp_vector(0.5, a.numpy(), b.numpy())))


def test_multislerp_antipodal_pair_falls_back_to_the_weighted_sum():
    a = torch.randn(9, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = run("multislerp", [a, -a])
    torch.testing.assert_close(out, torch.zeros_like(a), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_identical_models_give_the_model_back(dtype, n):
    base_np, (x_np,) = models((5, 6), 1, seed=40)
    base, x = as_torch([base_np, x_np], dtype)
    xs = [x.clone() for _ in range(n)]
    tol = TOL[dtype]
    torch.testing.assert_close(run("multislerp", xs), x, **tol)
    torch.testing.assert_close(run("multislerp", xs, base), x, **tol)
    torch.testing.assert_close(run("karcher", xs), x, **tol)
    if n >= 2:
        torch.testing.assert_close(run("model_stock", xs, base), x, **tol)  # equal task vectors: t = 1
        torch.testing.assert_close(run("model_stock", xs, base, filter_wise=True), x, **tol)
    if n == 2:
        torch.testing.assert_close(run("nuslerp", xs), x, **tol)
        torch.testing.assert_close(run("nuslerp", xs, base), x, **tol)
    torch.testing.assert_close(run("slerp", [x], x.clone(), t=0.4), x, **tol)
    torch.testing.assert_close(run("nearswap", [x], x.clone(), t=0.1), x, **tol)
    torch.testing.assert_close(run("arcee_fusion", [x], x.clone()), x, **tol)


@pytest.mark.usefixtures("merge_path")
def test_model_stock_with_models_equal_to_the_base_gives_the_base():
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(7))
    out = run("model_stock", [base.clone(), base.clone()], base)
    assert torch.equal(out, base)


CALLS = {
    "slerp": lambda xs, b: run("slerp", xs[:1], b, t=0.3),
    "nuslerp": lambda xs, b: run("nuslerp", xs[:2], b),
    "multislerp": lambda xs, b: run("multislerp", xs, b),
    "karcher": lambda xs, b: run("karcher", xs),
    "nearswap": lambda xs, b: run("nearswap", xs[:1], b, t=0.05),
    "passthrough": lambda xs, b: run("passthrough", xs[:1], models_=[{"scale": 2.0}]),
    "model_stock": lambda xs, b: run("model_stock", xs, b),
    "arcee_fusion": lambda xs, b: run("arcee_fusion", xs[:1], b),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_half_precision_out(name, dtype):
    base_np, xs_np = models((6, 8), 3, seed=50)
    base, *xs = as_torch([base_np, *xs_np], dtype)
    out = CALLS[name](xs, base)
    assert out.dtype == dtype and out.shape == base.shape and torch.isfinite(out).all()
    full = CALLS[name](as_torch(xs_np, torch.float32), torch.from_numpy(base_np).float())
    torch.testing.assert_close(out.float(), full, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- bad parameters


X = torch.ones(3)
B = torch.zeros(3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: run("slerp", [X], B, t=1.5), r"'slerp' parameters: t: .*less than or equal to 1"),
        (lambda: run("slerp", [X], B, t=-0.1), r"'slerp' parameters: t: .*greater than or equal to 0"),
        (lambda: run("slerp", [X], B), r"'slerp' parameters: t: Field required"),
        (lambda: run("slerp", [X, X], B, t=0.5), r"'slerp' needs at least 1 and at most 1 models"),
        (lambda: run("slerp", [X], None, t=0.5), r"'slerp' needs a base model"),
        (lambda: run("slerp", [X], B, t=0.5, lambda_=1), r"'slerp' parameters: lambda_: Extra inputs"),
        (lambda: run("slerp", [X], B, [{"weight": 1.0}], t=0.5), r"model 0 parameters: weight: Extra"),
        (lambda: run("nuslerp", [X], B), r"'nuslerp' needs at least 2 and at most 2 models"),
        (lambda: run("nuslerp", [X, X, X]), r"'nuslerp' needs at least 2 and at most 2 models"),
        (lambda: run("nuslerp", [X, X], None, [{"weight": "a lot"}, {}]), r"model 0 parameters: weight"),
        (lambda: run("multislerp", [X, X], eps=-1.0), r"'multislerp' parameters: eps"),
        (
            lambda: run("multislerp", [X, 2 * X], None, [{"weight": 1.0}, {"weight": -1.0}]),
            r"sum to 0 .*normalize_weights: false",
        ),
        (
            lambda: run("multislerp", [X, -X, X, -X]),
            r"weighted sum of the models' directions is zero",
        ),
        (lambda: run("karcher", [X, X], max_iter=-1), r"'karcher' parameters: max_iter"),
        (
            lambda: run("karcher", [X, X], None, [{"weight": 1.0}, {"weight": -1.0}], weighted=True),
            r"sum to 0",
        ),
        (lambda: run("karcher", []), r"'karcher' needs at least 1 models"),
        (lambda: run("nearswap", [X], B, t=0.0), r"'nearswap' parameters: t: .*greater than 0"),
        (lambda: run("nearswap", [X], None, t=0.1), r"'nearswap' needs a base model"),
        (lambda: run("passthrough", [X, X]), r"'passthrough' needs at least 1 and at most 1 models"),
        (lambda: run("passthrough", [X], None, [{"scale": "big"}]), r"model 0 parameters: scale"),
        (lambda: run("model_stock", [X], B), r"'model_stock' needs at least 2 models"),
        (lambda: run("model_stock", [X, X], None), r"'model_stock' needs a base model"),
        (lambda: run("model_stock", [X, X], B, filter_wise="rows"), r"'model_stock' parameters: filter_wise"),
        (lambda: run("arcee_fusion", [X], None), r"'arcee_fusion' needs a base model"),
        (lambda: run("arcee_fusion", [X, X], B), r"'arcee_fusion' needs at least 1 and at most 1"),
        (lambda: run("arcee_fusion", [X], B, t=0.5), r"'arcee_fusion' parameters: t: Extra inputs"),
    ],
)
def test_bad_parameters_are_config_errors(call, message):
    with pytest.raises(ConfigError, match=message):
        call()


def test_registered_requirements_and_defaults():
    expect = {
        "slerp": ("required", 1, 1, {"t": None}),
        "nuslerp": ("optional", 2, 2, {"nuslerp_flatten": True, "nuslerp_row_wise": False}),
        "multislerp": ("optional", 1, None, {"normalize_weights": True, "eps": 1e-8}),
        "karcher": ("none", 1, None, {"max_iter": 10, "tol": 1e-5, "weighted": False}),
        "nearswap": ("required", 1, 1, {"t": None}),
        "passthrough": ("none", 1, 1, {}),
        "model_stock": ("required", 2, None, {"filter_wise": False}),
        "arcee_fusion": ("required", 1, 1, {}),
    }
    for name, (base, lo, hi, shared) in expect.items():
        m = get_method(name)
        assert (m.base, m.min_models, m.max_models, m.randomized) == (base, lo, hi, False), name
        defaults = {k: (None if f.is_required() else f.default) for k, f in m.shared.model_fields.items()}
        assert defaults == shared, name
        assert m.paper and "mergekit" in m.doc, name
    assert get_method("passthrough").per_model_defaults() == {"scale": None}
    assert get_method("multislerp").per_model_defaults() == {"weight": 1.0}


@pytest.mark.parametrize("scale", [0.0, 1e-3, 1.0])
def test_slerp_kernels_agree_with_the_torch_path(scale, monkeypatch):
    """The C loops blend in float64 and round once, as the torch code; only the float64
    dot products are summed in another order, so the weights (and at most the last bit of
    a result) may differ; identical inputs (the linear fallback) give the same bytes."""
    require_kernels()
    from modelfuse.merge.methods import _kernels

    monkeypatch.setattr(_kernels, "cores", lambda: 3)  # the blend split over threads
    g = torch.Generator().manual_seed(7)
    a = torch.randn(1000, 700, generator=g)
    b = a + scale * torch.randn(1000, 700, generator=g)
    outs = []
    for enabled in (True, False):
        before = _kernels.set_enabled(enabled)
        try:
            outs.append(get_method("slerp")([b], a, t=0.3))
        finally:
            _kernels.set_enabled(before)
    if scale == 0.0:
        assert torch.equal(outs[0], outs[1])
    else:
        torch.testing.assert_close(outs[0], outs[1], rtol=2.4e-7, atol=1e-30)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_kernels_give_the_bytes_of_the_torch_path(n, monkeypatch):
    """The C output pass sums the models in order and blends in float32 as the torch code."""
    require_kernels()
    from modelfuse.merge.methods import _kernels

    monkeypatch.setattr(_kernels, "cores", lambda: 3)  # split over threads
    g = torch.Generator().manual_seed(n)
    base = torch.randn(900, 700, generator=g)
    xs = [base + 0.01 * torch.randn(900, 700, generator=g) for _ in range(n)]
    outs = []
    for enabled in (True, False):
        before = _kernels.set_enabled(enabled)
        try:
            outs.append(get_method("model_stock")(xs, base))
        finally:
            _kernels.set_enabled(before)
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))
