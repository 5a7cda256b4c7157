"""MagMax, TSV-Merge, Iso-C and Iso-CTS against NumPy references written from the papers.

The references below use only ``numpy.linalg`` and the papers' definitions (with
FusionBench's choices for rank splits and non-matrix tensors). SVD factors are defined only
up to sign, so every comparison is between reconstructed matrices, never between factors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods import iso, magmax, tsv  # noqa: F401  (registration)
from modelfuse.merge.methods._base import get_method, list_methods
from modelfuse.merge.methods.iso import iso_cts_sizes
from modelfuse.merge.methods.tsv import orthonormal_polar

SVD_METHODS = ["magmax", "tsv_m", "iso_c", "iso_cts"]


# ----------------------------------------------------------------------------- references


def ref_magmax(taus: list[np.ndarray], lam: float) -> np.ndarray:
    """tau_max[j] = tau_{t*}[j], t* = argmax_t |tau_t[j]|; ties go to the latest task."""
    stack = np.stack(taus)
    latest_first = np.abs(stack[::-1])
    winner = len(taus) - 1 - np.argmax(latest_first, axis=0)  # argmax picks the first maximum
    return lam * np.take_along_axis(stack, winner[None], axis=0)[0]


def ref_polar(a: np.ndarray) -> np.ndarray:
    """Whitening a (a^T a)^{-1/2} for tall a, (a a^T)^{-1/2} a for wide a, via an eigendecomposition."""
    if a.shape[0] >= a.shape[1]:
        w, q = np.linalg.eigh(a.T @ a)
        return a @ (q @ np.diag(w**-0.5) @ q.T)
    w, q = np.linalg.eigh(a @ a.T)
    return (q @ np.diag(w**-0.5) @ q.T) @ a


def top(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vt[:k]


def ref_tsv_m(taus: list[np.ndarray], alpha: float) -> np.ndarray:
    """TSV-M: top r/T triplets per task, concatenated, U and V^T whitened, S kept."""
    if taus[0].ndim != 2:
        return alpha * np.mean(taus, axis=0)
    k = min(taus[0].shape) // len(taus)
    parts = [top(t, k) for t in taus]
    u = np.concatenate([p[0] for p in parts], axis=1)
    s = np.concatenate([p[1] for p in parts])
    vt = np.concatenate([p[2] for p in parts], axis=0)
    return alpha * ref_polar(u) @ np.diag(s) @ ref_polar(vt)


def ref_iso_c(taus: list[np.ndarray], alpha: float) -> np.ndarray:
    """Iso-C: the sum's singular values all replaced by their mean."""
    if taus[0].ndim != 2:
        return alpha * np.mean(taus, axis=0)
    u, s, vt = np.linalg.svd(np.sum(taus, axis=0), full_matrices=False)
    return alpha * u @ np.diag(np.full_like(s, s.mean())) @ vt


def fusionbench_split(r: int, n: int, fraction: float) -> tuple[int, int]:
    """FusionBench's iso_cts sizes, written out: c0 = int(r f), task total round((r - c0) / T) T."""
    c0 = int(r * fraction)
    c = r - round((r - c0) / n) * n
    return c, (r - c) // n


def ref_iso_cts(taus: list[np.ndarray], alpha: float, fraction: float) -> np.ndarray:
    """Iso-CTS: task-specific blocks (as FusionBench orders them) then the common block, whitened, flat spectrum."""
    if taus[0].ndim != 2:
        return alpha * np.mean(taus, axis=0)
    c, k = fusionbench_split(min(taus[0].shape), len(taus), fraction)
    uc, sc, vtc = top(np.sum(taus, axis=0), c)
    blocks = [top(t - uc @ uc.T @ t, k) for t in taus] + [(uc, sc, vtc)]
    u = np.concatenate([b[0] for b in blocks], axis=1)
    s = np.concatenate([b[1] for b in blocks])
    vt = np.concatenate([b[2] for b in blocks], axis=0)
    return alpha * s.mean() * ref_polar(u) @ ref_polar(vt)


# ----------------------------------------------------------------------------- helpers


def pool(shape: tuple[int, ...], n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    return base, [base + rng.standard_normal(shape) for _ in range(n)]


def run(name: str, base: np.ndarray, xs: list[np.ndarray], dtype=torch.float64, **shared) -> np.ndarray:
    out = get_method(name)(
        [torch.tensor(x, dtype=dtype) for x in xs], torch.tensor(base, dtype=dtype), **shared
    )
    assert out.dtype == dtype and out.shape == base.shape
    return out.double().numpy()


def reference(name: str, taus: list[np.ndarray], **shared) -> np.ndarray:
    if name == "magmax":
        return ref_magmax(taus, shared.get("lambda", 0.5))
    if name == "tsv_m":
        return ref_tsv_m(taus, shared.get("alpha", 1.0))
    if name == "iso_c":
        return ref_iso_c(taus, shared.get("alpha", 1.0))
    return ref_iso_cts(taus, shared.get("alpha", 1.0), shared.get("common_space_fraction", 0.8))


# ----------------------------------------------------------------------------- against the references


@pytest.mark.parametrize("name", SVD_METHODS)
@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10,)])
@pytest.mark.parametrize("n", [2, 3])
def test_matches_numpy_reference_float64(name, shape, n):
    base, xs = pool(shape, n, seed=sum(shape) + n)
    shared = {"lambda": 0.7} if name == "magmax" else {"alpha": 0.9}
    got = run(name, base, xs, **shared)
    want = base + reference(name, [x - base for x in xs], **shared)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SVD_METHODS)
def test_defaults_match_fusionbench_and_reference(name):
    method = get_method(name)
    expected = {
        "magmax": {"lambda": 0.5},
        "tsv_m": {"alpha": 1.0},
        "iso_c": {"alpha": 1.0},
        "iso_cts": {"alpha": 1.0, "common_space_fraction": 0.8},
    }[name]
    assert method.shared_defaults() == expected
    assert method.base == "required" and method.paper
    base, xs = pool((16, 10), 4, seed=7)
    np.testing.assert_allclose(
        run(name, base, xs), base + reference(name, [x - base for x in xs]), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("name", SVD_METHODS)
def test_float32_inputs_compute_in_float32_and_stay_close(name):
    base, xs = pool((12, 8), 3, seed=11)
    got = run(name, base, xs, dtype=torch.float32)
    want = base + reference(name, [x - base for x in xs])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SVD_METHODS)
def test_half_precision_base_dtype_is_kept(name):
    base, xs = pool((8, 6), 2, seed=3)
    got = run(name, base, xs, dtype=torch.bfloat16)
    rounded = [torch.tensor(a, dtype=torch.bfloat16).double().numpy() for a in [base, *xs]]
    want = rounded[0] + reference(name, [x - rounded[0] for x in rounded[1:]])
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_iso_cts_fractions(fraction, n):
    base, xs = pool((14, 9), n, seed=int(fraction * 10) + n)
    got = run("iso_cts", base, xs, common_space_fraction=fraction, alpha=1.3)
    want = base + ref_iso_cts([x - base for x in xs], 1.3, fraction)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("r", "n", "fraction"),
    [(8, 3, 0.8), (9, 2, 0.8), (768, 8, 0.8), (10, 4, 0.5), (10, 4, 0.0), (20, 3, 0.3)],
)
def test_iso_cts_sizes_follow_fusionbench(r, n, fraction):
    assert iso_cts_sizes(r, n, fraction) == fusionbench_split(r, n, fraction)


def test_iso_cts_sizes_where_fusionbench_would_overflow():
    # r = 8, T = 3, fraction 0.1: FusionBench's split gives c = 8 - 3 * 3 = -1 (and fails);
    # here each task gets r // T = 2 dimensions and the common space the remaining 2.
    assert fusionbench_split(8, 3, 0.1)[0] == -1
    assert iso_cts_sizes(8, 3, 0.1) == (2, 2)
    base, xs = pool((12, 8), 3, seed=5)
    got = run("iso_cts", base, xs, common_space_fraction=0.1)
    taus = [x - base for x in xs]
    uc, sc, vtc = top(np.sum(taus, axis=0), 2)
    blocks = [(uc, sc, vtc)] + [top(t - uc @ uc.T @ t, 2) for t in taus]
    u = np.concatenate([b[0] for b in blocks], axis=1)
    vt = np.concatenate([b[2] for b in blocks], axis=0)
    mean_s = np.concatenate([b[1] for b in blocks]).mean()
    np.testing.assert_allclose(got, base + mean_s * ref_polar(u) @ ref_polar(vt), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_iso_c_single_task_flattens_its_spectrum(shape):
    base, (x,) = pool(shape, 1, seed=2)
    u, s, vt = np.linalg.svd(x - base, full_matrices=False)
    closed_form = u @ np.diag(np.full_like(s, s.mean())) @ vt
    np.testing.assert_allclose(run("iso_c", base, [x], alpha=2.0), base + 2.0 * closed_form, atol=1e-10)
    # Iso-CTS with one task spans the same full subspace, so it reduces to Iso-C
    np.testing.assert_allclose(run("iso_cts", base, [x], alpha=2.0), base + 2.0 * closed_form, atol=1e-10)
    # the result's singular values are all equal to the mean
    np.testing.assert_allclose(np.linalg.svd(closed_form, compute_uv=False), s.mean(), rtol=1e-10)


def test_tsv_m_single_task_keeps_the_task_vector():
    base, (x,) = pool((12, 8), 1, seed=4)
    np.testing.assert_allclose(run("tsv_m", base, [x], alpha=0.5), base + 0.5 * (x - base), atol=1e-10)


def test_tsv_m_with_more_tasks_than_rank_leaves_the_matrix_alone():
    # k = min(3, 5) // 4 = 0 singular components per task: FusionBench adds nothing
    base, xs = pool((3, 5), 4, seed=8)
    np.testing.assert_array_equal(run("tsv_m", base, xs), base)


def test_magmax_identical_task_vectors():
    base, (x,) = pool((6, 5), 1, seed=9)
    got = run("magmax", base, [x, x, x], **{"lambda": 0.3})
    np.testing.assert_allclose(got, base + 0.3 * (x - base), atol=1e-12)


def test_magmax_picks_largest_magnitude_and_later_model_on_ties():
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([1.0, -3.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.tensor([-2.0, 1.0, -2.0, 0.25], dtype=torch.float64)
    got = get_method("magmax")([a, b], base, **{"lambda": 1.0})
    torch.testing.assert_close(got, torch.tensor([-2.0, -3.0, -2.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("name", SVD_METHODS)
def test_zero_scaling_returns_base(name):
    base, xs = pool((12, 8), 3, seed=12)
    key = "lambda" if name == "magmax" else "alpha"
    b = torch.tensor(base, dtype=torch.float32)
    got = get_method(name)([torch.tensor(x, dtype=torch.float32) for x in xs], b, **{key: 0.0})
    assert torch.equal(got, b)


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_non_matrix_tensors_get_the_mean_task_vector(name):
    base, xs = pool((3, 2, 2), 3, seed=13)  # 3-D (e.g. a conv kernel): not a 2-D matrix either
    got = run(name, base, xs, alpha=0.6)
    np.testing.assert_allclose(got, base + 0.6 * np.mean([x - base for x in xs], axis=0), atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_tsv_bases_are_orthonormal_after_whitening(shape):
    _, xs = pool(shape, 3, seed=14)
    k = min(shape) // 3
    parts = [torch.linalg.svd(torch.tensor(x), full_matrices=False) for x in xs]
    u_cat = torch.cat([u[:, :k] for u, _, _ in parts], dim=1)
    vt_cat = torch.cat([vt[:k] for _, _, vt in parts], dim=0)
    overlap = u_cat.T @ u_cat - torch.eye(3 * k, dtype=torch.float64)
    assert overlap.abs().max() > 1e-2  # the raw bases of different tasks interfere
    u_perp, vt_perp = orthonormal_polar(u_cat), orthonormal_polar(vt_cat)
    torch.testing.assert_close(u_perp.T @ u_perp, torch.eye(3 * k, dtype=torch.float64))
    torch.testing.assert_close(vt_perp @ vt_perp.T, torch.eye(3 * k, dtype=torch.float64))
    np.testing.assert_allclose(u_perp.numpy(), ref_polar(u_cat.numpy()), atol=1e-10)
    np.testing.assert_allclose(vt_perp.numpy(), ref_polar(vt_cat.numpy()), atol=1e-10)


# ----------------------------------------------------------------------------- bad inputs


def test_registered():
    assert set(SVD_METHODS) <= set(list_methods())
    for name in SVD_METHODS:
        assert "20" in get_method(name).paper and get_method(name).doc


@pytest.mark.parametrize("name", SVD_METHODS)
def test_no_models_is_a_config_error(name):
    with pytest.raises(ConfigError, match="at least 1"):
        get_method(name)([], torch.zeros(3, 2))


@pytest.mark.parametrize("name", SVD_METHODS)
def test_no_base_is_a_config_error(name):
    with pytest.raises(ConfigError, match="needs a base model"):
        get_method(name)([torch.ones(3, 2)], None)


@pytest.mark.parametrize("name", SVD_METHODS)
@pytest.mark.parametrize("bad", ["big", float("nan"), float("inf"), None])
def test_bad_scaling_is_a_config_error(name, bad):
    key = "lambda" if name == "magmax" else "alpha"
    with pytest.raises(ConfigError, match=key):
        get_method(name)([torch.ones(3, 2)], torch.zeros(3, 2), **{key: bad})


@pytest.mark.parametrize("name", SVD_METHODS)
def test_unknown_parameter_is_a_config_error(name):
    wrong = "alpha" if name == "magmax" else "lambda"
    with pytest.raises(ConfigError, match="Valid parameters here"):
        get_method(name)([torch.ones(3, 2)], torch.zeros(3, 2), **{wrong: 1.0})


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_bad_common_space_fraction_is_a_config_error(fraction):
    with pytest.raises(ConfigError, match="common_space_fraction"):
        get_method("iso_cts")([torch.ones(3, 2)], torch.zeros(3, 2), common_space_fraction=fraction)


@pytest.mark.parametrize("name", SVD_METHODS)
def test_shape_mismatch_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"model 1 has shape \(2, 3\) but the base has \(3, 2\)"):
        get_method(name)([torch.ones(3, 2), torch.ones(2, 3)], torch.zeros(3, 2))
