"""Gradient-combination methods against their papers' definitions, computed by hand or in NumPy here."""

from __future__ import annotations

import importlib.util
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from modelfuse.errors import ConfigError, LossFusionError, MissingExtraError
from modelfuse.losses import get_loss_fusion, list_loss_fusions
from modelfuse.losses.gradients import GradientFusion, min_norm_weights, nash_weights, pcgrad_weights

METHODS = ["cagrad", "imtl_g", "mgda", "nash_mtl", "pcgrad"]
# CAGrad (cvxpy) and IMTL-G (TorchJD) need the mtl extra; their MissingExtraError is tested below
HAS_MTL = all(importlib.util.find_spec(m) is not None for m in ("torchjd", "cvxpy", "clarabel"))
needs_mtl = pytest.mark.skipif(
    not HAS_MTL, reason="the mtl extra is not installed: pip install 'modelfuse[mtl]'"
)
PARAM_METHODS = [pytest.param(m, marks=needs_mtl) if m in {"cagrad", "imtl_g"} else m for m in METHODS]


def rand_jacobian(k: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_methods_are_registered_gradient_methods():
    assert set(METHODS) <= set(list_loss_fusions())
    papers = {"pcgrad": "Yu et al. 2020", "mgda": "Sener & Koltun 2018", "cagrad": "Liu et al. 2021",
              "nash_mtl": "Navon et al. 2022", "imtl_g": "Liu et al. 2021"}  # fmt: skip
    for name in METHODS:
        cls = get_loss_fusion(name)
        assert issubclass(cls, GradientFusion) and cls.uses_gradients
        doc = cls.__doc__ or ""
        assert papers[name] in doc and ("eq" in doc or "Algorithm" in doc), (name, doc)


# --- MGDA: exact min-norm point -------------------------------------------------------------


@pytest.mark.parametrize(
    ("jac", "weights", "direction"),
    [
        ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.5], [0.5, 0.5]),
        ([[1.0, 0.0], [-1.0, 0.0]], [0.5, 0.5], [0.0, 0.0]),
        # g2 = (2, 2) lies beyond the foot of the perpendicular from 0 on the segment: the min-norm point is g1
        ([[1.0, 0.0], [2.0, 2.0]], [1.0, 0.0], [1.0, 0.0]),
        # 3-D, three unit vectors: the centroid (1/3, 1/3, 1/3)
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], [1 / 3] * 3, [1 / 3] * 3),
        # 3-D: g3 = g1 + g2 is never needed; the min-norm point is that of the segment g1-g2
        ([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 2.0, 0.0]], [0.8, 0.2, 0.0], [0.8, 0.4, 0.0]),
        # 0 is inside the triangle (1,0), (-1,1), (-1,-2) -> min-norm point 0, weights (1/2, 1/3, 1/6)
        ([[1.0, 0.0], [-1.0, 1.0], [-1.0, -2.0]], [0.5, 1 / 3, 1 / 6], [0.0, 0.0]),
    ],
)
def test_mgda_min_norm_point_by_hand(jac, weights, direction):
    j = torch.tensor(jac, dtype=torch.float64)
    fusion = get_loss_fusion("mgda")(len(jac))
    out = fusion.combine_gradients(j)
    assert torch.allclose(out, torch.tensor(direction, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(fusion.last_weights_, torch.tensor(weights, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(
    ("k", "p", "seed"), [(3, 2, 0), (4, 3, 1), (5, 20, 2), (8, 4, 3), (6, 6, 4), (10, 50, 5)]
)
def test_mgda_satisfies_the_optimality_conditions_of_the_qp(k, p, seed):
    # min_{a in simplex} a^T G a is solved iff a >= 0, sum a = 1 and (G a)_j >= a^T G a for every j
    g = rand_jacobian(k, p, seed).numpy()
    gram = g @ g.T
    a = min_norm_weights(gram)
    assert np.all(a >= 0) and abs(a.sum() - 1) < 1e-12
    value = a @ gram @ a
    assert np.all(gram @ a >= value - 1e-10 * np.max(np.diag(gram)))
    # and no vertex or edge of the simplex does better (brute force over pairs, closed form)
    for i, j in itertools.combinations(range(k), 2):
        d = gram[i, i] + gram[j, j] - 2 * gram[i, j]
        t = 0.0 if d <= 0 else min(1.0, max(0.0, (gram[j, j] - gram[i, j]) / d))
        assert value <= t * t * gram[i, i] + (1 - t) ** 2 * gram[j, j] + 2 * t * (1 - t) * gram[i, j] + 1e-12


def test_mgda_gives_zero_at_a_pareto_stationary_point_and_uniform_weights_for_all_zero():
    # 3-D: four gradients whose hull contains 0 (0 = 1/4 of the sum)
    j = torch.tensor(
        [[1.0, 1.0, 1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0]], dtype=torch.float64
    )
    assert get_loss_fusion("mgda")(4).combine_gradients(j).abs().max() < 1e-12
    fusion = get_loss_fusion("mgda")(3)
    assert torch.equal(fusion.combine_gradients(torch.zeros(3, 5)), torch.zeros(5))
    assert torch.allclose(fusion.last_weights_, torch.full((3,), 1 / 3))


# --- PCGrad: projections by hand --------------------------------------------------------------


def test_pcgrad_projection_by_hand_two_tasks():
    # g1=(1,0), g2=(-1,1): g1.g2 = -1 < 0.
    # g1^PC = g1 - (g1.g2)/|g2|^2 g2 = (1,0) + 1/2 (-1,1) = (1/2, 1/2)
    # g2^PC = g2 - (g2.g1)/|g1|^2 g1 = (-1,1) + (1,0) = (0, 1)
    # sum = (1/2, 3/2) = (g1 + g2/2) + (g2 + g1) = 2 g1 + 1.5 g2
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    fusion = get_loss_fusion("pcgrad")(2)
    assert torch.allclose(
        fusion.combine_gradients(j), torch.tensor([0.5, 1.5], dtype=torch.float64), atol=1e-15
    )
    assert torch.allclose(fusion.last_weights_, torch.tensor([2.0, 1.5], dtype=torch.float64))
    # no conflict: plain sum
    j = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(fusion.combine_gradients(j), torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_pcgrad_three_tasks_depends_on_the_order_as_in_the_paper():
    # 3-D: g1=(1,0,0), g2=(-1,1,0), g3=(-1,0,1); every pair conflicts (dot -1 or +1)
    g = np.array([[1.0, 0, 0], [-1.0, 1, 0], [-1.0, 0, 1]])
    gram = g @ g.T

    def by_hand(order):  # Algorithm 1 written directly on vectors
        total = np.zeros(3)
        for i in range(3):
            v = g[i].copy()
            for j in order[i]:
                if j != i and v @ g[j] < 0:
                    v = v - (v @ g[j]) / (g[j] @ g[j]) * g[j]
            total += v
        return total

    for order in [[[0, 1, 2]] * 3, [[2, 1, 0]] * 3, [[1, 2, 0], [0, 2, 1], [2, 0, 1]]]:
        assert np.allclose(pcgrad_weights(gram, order) @ g, by_hand(order), atol=1e-14)
    # one value by hand: order 1 then 2 for task 0: g1 -> (1,0,0)+1/2(-1,1,0) = (1/2,1/2,0); then
    # with g3: (1/2,1/2,0).(-1,0,1) = -1/2 -> + 1/4 (-1,0,1) = (1/4, 1/2, 1/4)
    w = pcgrad_weights(gram, [[1, 2], [], []])
    assert np.allclose(w @ g - g[1] - g[2], [0.25, 0.5, 0.25])


def test_pcgrad_is_seeded_and_leaves_the_global_generator_alone():
    j = rand_jacobian(4, 6, 0)
    j[1] = -j[0] + 0.1 * j[1]  # make conflicts
    state = torch.random.get_rng_state()
    a = get_loss_fusion("pcgrad")(4, seed=3).combine_gradients(j)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, get_loss_fusion("pcgrad")(4, seed=3).combine_gradients(j))


# --- CAGrad: the primal problem as reference ----------------------------------------------------


def cagrad_check(jac: np.ndarray, d: np.ndarray, c: float, dual_value: float) -> None:
    """d is optimal for max_d min_k g_k.d s.t. |d - g0| <= c |g0| iff feasible and it reaches the dual value."""
    g0 = jac.mean(0)
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9) + 1e-12
    assert (jac @ d).min() >= dual_value - 1e-8 * max(1.0, abs(dual_value))


def cagrad_dual_two_tasks(jac: np.ndarray, c: float) -> float:
    """min over w in [0, 1] of g_w.g0 + c|g0||g_w|, on a fine grid refined by golden section."""
    g0 = jac.mean(0)
    s = c * np.linalg.norm(g0)

    def f(a):
        gw = a * jac[0] + (1 - a) * jac[1]
        return gw @ g0 + s * np.linalg.norm(gw)

    grid = np.linspace(0, 1, 20001)
    vals = [f(a) for a in grid]
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        m1, m2 = hi - phi * (hi - lo), lo + phi * (hi - lo)
        lo, hi = (lo, m2) if f(m1) < f(m2) else (m1, hi)
    return min(f(lo), f(0.0), f(1.0))


@needs_mtl
@pytest.mark.parametrize(("seed", "c"), [(0, 0.2), (1, 0.5), (2, 0.5), (3, 0.4), (4, 0.8)])
def test_cagrad_solves_the_primal_random_two_tasks(seed, c):
    j = rand_jacobian(2, 10, seed)
    d = get_loss_fusion("cagrad")(2, c=c).combine_gradients(j).numpy()
    cagrad_check(j.numpy(), d, c, cagrad_dual_two_tasks(j.numpy(), c))


@needs_mtl
@pytest.mark.parametrize(
    ("jac", "expected"),
    [
        # one zero-gradient task: value 0; the mean gradient is a maximiser (the official code's choice)
        ([[1.0, 0.0], [0.0, 0.0]], [0.5, 0.0]),
        # exactly opposite tasks of unequal size: g0=(1/2,0), radius 1/4 -> d=(1/4,0)
        ([[2.0, 0.0], [-1.0, 0.0]], [0.25, 0.0]),
        # exactly opposite pair plus a third task: g0=(0,1/3); value 0, g0 a maximiser
        ([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], [0.0, 1 / 3]),
        # a 1e4 scale ratio: g0=(5000, 1/2), radius c|g0|, d = g0 + radius (0, 1)
        ([[1e4, 0.0], [0.0, 1.0]], [5000.0, 0.5 + 0.5 * math.hypot(5000.0, 0.5)]),
    ],
)
def test_cagrad_cases_where_torchjd_returns_zero(jac, expected):
    j = torch.tensor(jac, dtype=torch.float64)
    fusion = get_loss_fusion("cagrad")(len(jac), c=0.5)
    d = fusion.combine_gradients(j)
    assert torch.allclose(d, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=1e-9)
    assert (fusion.last_weights_ >= 0).all()
    if len(jac) == 2:
        cagrad_check(j.numpy(), d.numpy(), 0.5, cagrad_dual_two_tasks(j.numpy(), 0.5))


@needs_mtl
def test_cagrad_rescale_and_c_zero():
    j = rand_jacobian(3, 5, 0)
    plain = get_loss_fusion("cagrad")(3, c=0.5).combine_gradients(j)
    assert torch.allclose(
        get_loss_fusion("cagrad")(3, c=0.5, rescale=True).combine_gradients(j), plain / 1.25
    )
    assert torch.allclose(get_loss_fusion("cagrad")(3, c=0.0).combine_gradients(j), j.mean(0))
    with pytest.raises(ConfigError, match="c"):
        get_loss_fusion("cagrad")(3, c=-1.0)


# --- Nash-MTL: G alpha = 1/alpha ------------------------------------------------------------------


@pytest.mark.parametrize(("k", "p", "seed"), [(2, 5, 0), (3, 10, 1), (5, 8, 2), (4, 4, 3)])
def test_nash_mtl_solves_the_bargaining_equation(k, p, seed):
    j = rand_jacobian(k, p, seed) * torch.tensor([10.0**i for i in range(k)], dtype=torch.float64)[:, None]
    fusion = get_loss_fusion("nash_mtl")(k)
    d = fusion.combine_gradients(j)
    a = fusion.last_weights_.numpy()
    gram = (j @ j.T).numpy()
    assert np.all(a > 0)
    assert np.allclose(a * (gram @ a), 1.0, rtol=1e-10)  # alpha_i (G alpha)_i = 1
    assert torch.allclose(d, fusion.last_weights_ @ j)


def test_nash_mtl_by_hand():
    # orthogonal gradients: alpha_i = 1/|g_i|, d = sum of unit vectors
    j = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    fusion = get_loss_fusion("nash_mtl")(2)
    assert torch.allclose(fusion.combine_gradients(j), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(fusion.last_weights_, torch.tensor([1 / 3, 2.0], dtype=torch.float64))
    # parallel gradients g1=(1,0), g2=(2,0): a1(a1+2a2)=1, 2a2(a1+2a2)=1 -> a1=2a2, a2=1/sqrt(8)
    j = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    fusion.combine_gradients(j)
    assert torch.allclose(fusion.last_weights_, torch.tensor([2, 1], dtype=torch.float64) / math.sqrt(8))
    # no clipping by default: orthogonal gradients, however small, give the sum of their unit vectors
    j = torch.tensor([[0.01, 0.0], [0.0, 0.01]], dtype=torch.float64)
    assert torch.allclose(fusion.combine_gradients(j), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(fusion.last_weights_, torch.tensor([100.0, 100.0], dtype=torch.float64))
    clipped = get_loss_fusion("nash_mtl")(2, max_norm=1.0).combine_gradients(j)
    assert torch.allclose(clipped.norm(), torch.tensor(1.0, dtype=torch.float64))


def test_nash_mtl_degenerate_jacobians_do_not_crash():
    assert np.array_equal(nash_weights(np.zeros((3, 3))), np.zeros(3))
    fusion = get_loss_fusion("nash_mtl")(3)
    assert torch.equal(fusion.combine_gradients(torch.zeros(3, 4)), torch.zeros(4))
    # exactly opposite tasks: Pareto stationary, no update helps both
    d = fusion.combine_gradients(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(d, torch.zeros(2)) and torch.equal(fusion.last_weights_, torch.zeros(3))
    # a zero-gradient task gets weight 0; the others bargain: alpha = 1/|g|
    fusion.combine_gradients(torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    assert torch.allclose(fusion.last_weights_, torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64))


# --- IMTL-G: equal projections on the unit gradients ----------------------------------------------


def imtl_paper(g: np.ndarray) -> np.ndarray:
    """Liu et al. 2021 eq. 7: alpha_{2:K} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum alpha_{2:K}."""
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    d_mat = g[:1] - g[1:]
    u_mat = u[:1] - u[1:]
    rest = g[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
    return np.concatenate([[1 - rest.sum()], rest])


@needs_mtl
@pytest.mark.parametrize(("k", "p", "seed"), [(2, 3, 0), (3, 5, 1), (4, 10, 2), (5, 5, 3)])
def test_imtl_g_matches_the_paper_closed_form(k, p, seed):
    j = rand_jacobian(k, p, seed)
    fusion = get_loss_fusion("imtl_g")(k)
    d = fusion.combine_gradients(j).numpy()
    alpha = imtl_paper(j.numpy())
    assert np.allclose(fusion.last_weights_.numpy(), alpha, rtol=1e-8, atol=1e-10)
    units = j.numpy() / np.linalg.norm(j.numpy(), axis=1, keepdims=True)
    proj = units @ d
    assert np.allclose(proj, proj[0], rtol=1e-8)  # the defining property: equal projections


# --- properties common to every method --------------------------------------------------------------


@pytest.mark.parametrize("name", PARAM_METHODS)
def test_every_method_constructs_with_num_tasks_alone_and_gives_finite_weights(name):
    for seed, k in [(0, 2), (1, 3), (2, 5)]:
        j = rand_jacobian(k, 7, seed).float()
        fusion = get_loss_fusion(name)(k)
        d = fusion.combine_gradients(j)
        w = fusion.last_weights_
        assert d.shape == (7,) and d.dtype == torch.float32
        assert torch.isfinite(w).all() and torch.allclose(d, w @ j, atol=1e-5)
        if name in {"mgda", "pcgrad", "cagrad", "nash_mtl"}:
            assert (w >= 0).all(), (name, w)
        if name in {"mgda", "imtl_g"}:
            assert torch.allclose(w.sum(), torch.tensor(1.0))
        if name == "cagrad":  # 1/K + sqrt(phi)/|g_w| w*: sums to 1 + sqrt(phi)/|g_w|
            assert w.sum() >= 1 - 1e-6
    assert get_loss_fusion(name)(1).combine_gradients(torch.tensor([[3.0, 4.0]])).shape == (2,)


# --- backward on a tiny two-head model --------------------------------------------------------------


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.head_a = nn.Linear(3, 1)
        self.head_b = nn.Linear(3, 2)

    def losses(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [self.head_a(z).pow(2).mean(), (self.head_b(z) - 1).abs().mean()]


@pytest.mark.parametrize("name", PARAM_METHODS)
def test_backward_writes_the_combined_jacobian(name):
    model = TwoHeads()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    shared = list(model.trunk.parameters())
    heads = [*model.head_a.parameters(), *model.head_b.parameters()]
    # reference: per-task torch.autograd.grad, flattened by hand
    losses = model.losses(x)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]
    jac = torch.stack(rows)
    head_ref = torch.autograd.grad(losses[0] + losses[1], heads)
    expected = get_loss_fusion(name)(2).combine_gradients(jac)  # same seed -> same random order

    fusion = get_loss_fusion(name)(2)
    out = fusion.backward(model.losses(x), shared_parameters=model.trunk, task_parameters=heads)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    for p, g in zip(heads, head_ref, strict=True):
        assert torch.allclose(p.grad, g)
    losses = torch.stack([loss.detach() for loss in model.losses(x)])
    assert torch.allclose(out, (fusion.weights_ * losses).sum())
    # a second backward accumulates like autograd
    fusion2 = get_loss_fusion(name)(2)
    fusion2.backward(model.losses(x), shared_parameters=shared)
    again = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(again, 2 * expected, rtol=1e-5, atol=1e-7)


def test_backward_drops_absent_tasks_and_forward_refuses():
    model = TwoHeads()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    shared = list(model.trunk.parameters())
    loss_a = model.losses(x)[0]
    only_a = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_a, shared)])
    fusion = get_loss_fusion("mgda")(2)
    fusion.backward(model.losses(x), shared_parameters=shared, present=[True, False])
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in shared]), only_a)
    assert fusion.weights_.tolist() == [1.0, 0.0]
    for p in shared:
        p.grad = None
    fusion.backward(model.losses(x), shared_parameters=shared, present=[False, False])
    assert all(p.grad is None for p in shared) and fusion.weights_.tolist() == [0.0, 0.0]
    with pytest.raises(LossFusionError, match="combines gradients"):
        fusion(model.losses(x))


# --- bad inputs --------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model = TwoHeads()
    x = torch.randn(8, 4)
    unused = nn.Parameter(torch.zeros(3))
    fusion = get_loss_fusion("pcgrad")(2)
    with pytest.raises(LossFusionError, match=r"'stray'.*no gradient"):
        fusion.backward(
            model.losses(x), shared_parameters=[*model.trunk.named_parameters(), ("stray", unused)]
        )
    with pytest.raises(LossFusionError, match=r"shared parameter #4 \(shape \(3,\)\).*no gradient"):
        fusion.backward(model.losses(x), shared_parameters=[*model.trunk.parameters(), unused])
    with pytest.raises(LossFusionError, match=r"expected 2 task losses.*found 3"):
        fusion.backward([*model.losses(x), torch.tensor(1.0)], shared_parameters=model.trunk)
    losses = model.losses(x)
    with pytest.raises(LossFusionError, match=r"task 1 \('parity'\) is nan"):
        get_loss_fusion("mgda")(2, task_names=["digit", "parity"]).backward(
            [losses[0], losses[1] * float("nan")], shared_parameters=model.trunk
        )
    with pytest.raises(LossFusionError, match="pass shared_parameters"):
        fusion.backward(model.losses(x))
    with pytest.raises(LossFusionError, match="does not require grad"):
        fusion.backward(model.losses(x), shared_parameters=[torch.zeros(2)])
    with pytest.raises(LossFusionError, match="both as shared and as task"):
        fusion.backward(model.losses(x), shared_parameters=model.trunk, task_parameters=model.trunk)
    with pytest.raises(LossFusionError, match="row 1 of the Jacobian"):
        fusion.combine_gradients(torch.tensor([[1.0, 0.0], [float("inf"), 0.0]]))
    with pytest.raises(LossFusionError, match="matrix"):
        fusion.combine_gradients(torch.zeros(3))
    with pytest.raises(ConfigError, match="max_norm"):
        get_loss_fusion("nash_mtl")(2, max_norm=-1.0)


def test_a_task_with_all_zero_gradient_is_fine():
    model = TwoHeads()
    x = torch.randn(8, 4)
    losses = model.losses(x)
    zero_task = (model.trunk(x) * 0).sum()  # depends on the trunk, zero gradient
    fusion = get_loss_fusion("mgda")(2)
    fusion.backward([losses[0], zero_task], shared_parameters=model.trunk)
    assert fusion.weights_.tolist() == [0.0, 1.0]  # min-norm point: the zero gradient
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.trunk.parameters())


@pytest.mark.parametrize(("name", "module"), [("imtl_g", "torchjd"), ("cagrad", "cvxpy")])
def test_missing_extra_names_the_pip_command(name, module, monkeypatch):
    import sys

    for key in list(sys.modules):
        if key == module or key.startswith(module + "."):
            monkeypatch.setitem(sys.modules, key, None)
    with pytest.raises(MissingExtraError, match=r"pip install 'modelfuse\[mtl\]'"):
        get_loss_fusion(name)(2)


def test_pcgrad_generator_state_travels_with_the_state_dict():
    j = rand_jacobian(4, 5, 0)
    j[1] = -j[0] + 0.2 * j[1]
    j[3] = -j[2] + 0.2 * j[3]
    first = get_loss_fusion("pcgrad")(4, seed=5)
    first.combine_gradients(j)
    saved = first.state_dict()
    expected = first.combine_gradients(j)
    resumed = get_loss_fusion("pcgrad")(4, seed=99)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.combine_gradients(j), expected)


def test_gramian_in_blocks_equals_the_plain_product():
    from modelfuse.losses.gradients import gramian_of

    j = rand_jacobian(3, 1000, 0).float()
    exact = j.double() @ j.double().T
    assert np.allclose(gramian_of(j, chunk=7), exact.numpy(), rtol=1e-12)


def test_mgda_ub_takes_the_weights_from_the_representation():
    # Sener & Koltun Sec. 3.3: alpha from the gradients w.r.t. Z; the parameters get grad of sum alpha_k L_k.
    model = TwoHeads()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    shared = list(model.trunk.parameters())
    z = model.trunk(x)
    losses = [model.head_a(z).pow(2).mean(), (model.head_b(z) - 1).abs().mean()]
    g1, g2 = (torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1) for loss in losses)
    # the paper's closed form for two tasks (Algorithm 1): alpha = [(g2 - g1).g2 / |g1 - g2|^2] clipped to [0, 1]
    a = float(((g2 - g1) @ g2 / (g1 - g2).pow(2).sum()).clamp(0, 1))
    expected = torch.autograd.grad(a * losses[0] + (1 - a) * losses[1], shared, retain_graph=True)
    fusion = get_loss_fusion("mgda")(2)
    out = fusion.backward(losses, shared_parameters=shared, representation=z)
    assert torch.allclose(fusion.weights_, torch.tensor([a, 1 - a]), atol=1e-6)
    for p, g in zip(shared, expected, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)
    assert torch.allclose(out, a * losses[0].detach() + (1 - a) * losses[1].detach(), atol=1e-6)
    # a representation that no loss depends on is named
    z = model.trunk(x)
    losses = [model.head_a(z).pow(2).mean(), (model.head_b(z) - 1).abs().mean()]
    with pytest.raises(
        LossFusionError, match=r"\(s\) 'representation #1 \(shape \(8, 3\)\)' received no gradient"
    ):
        fusion.backward(losses, shared_parameters=shared, representation=[z, model.trunk(x) * 2])


@needs_mtl
def test_cagrad_at_a_pareto_stationary_point_projects_the_mean_onto_the_cone():
    # g1 = 0 puts 0 in the hull, so min_k g_k.d <= 0 for every d. g0 = (-1/3, 1/6) is outside the
    # cone {d1 >= 0, d2 >= 4 d1}; its projection is (0, 1/6), at distance 1/3 from g0.
    j = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-2.0, 0.5]], dtype=torch.float64)
    radius = math.hypot(1 / 3, 1 / 6)
    # c = 0.95: the ball (radius 0.354) reaches the cone, the value is 0, the answer (0, 1/6)
    d = get_loss_fusion("cagrad")(3, c=0.95).combine_gradients(j)
    assert torch.allclose(d, torch.tensor([0.0, 1 / 6], dtype=torch.float64), atol=1e-9)
    # c = 0.5: it does not (radius 0.186 < 1/3), the value is negative; check against the dual on a grid
    c = 0.5
    d = get_loss_fusion("cagrad")(3, c=c).combine_gradients(j).numpy()
    g = j.numpy()
    g0 = g.mean(0)
    assert np.linalg.norm(d - g0) <= c * radius * (1 + 1e-9)
    n = 600
    a, b = np.meshgrid(np.arange(n + 1) / n, np.arange(n + 1) / n)
    keep = a + b <= 1
    w = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1)
    gw = w @ g
    dual = (gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=1)).min()
    assert (g @ d).min() < 0
    assert (g @ d).min() >= dual - 1e-3 * np.abs(g).max() * np.linalg.norm(g0)
    assert (g @ d).min() <= dual + 1e-12  # weak duality: no feasible d beats any dual value


def degenerate_jacobian(seed: int) -> np.ndarray:
    """Random Jacobians of the awkward kinds: duplicated tasks, a zero task, 0 in the hull, 1e4 scale ratios."""
    rng = np.random.default_rng(seed)
    k, p = int(rng.integers(2, 7)), int(rng.integers(1, 10))
    j = rng.standard_normal((k, p))
    kind = seed % 5
    if kind == 1:
        j[1] = j[0]
    elif kind == 2:
        j *= 10.0 ** rng.integers(-2, 3, size=(k, 1))
    elif kind == 3:
        j[0] = 0
    elif kind == 4:
        j[-1] = -j[:-1].sum(0) * rng.uniform(0.5, 2)
    return j


@needs_mtl
@pytest.mark.parametrize("seed", range(15))
def test_cagrad_reaches_the_primal_optimum_on_awkward_jacobians(seed):
    import cvxpy as cp

    j = degenerate_jacobian(seed)
    c = (0.1, 0.4, 0.8)[seed % 3]
    d = get_loss_fusion("cagrad")(len(j), c=c).combine_gradients(torch.from_numpy(j)).numpy()
    g0 = j.mean(0)
    radius = c * np.linalg.norm(g0)
    # the primal solved directly (another problem than the dual we solve): max t, J x >= t, |x - g0| <= r
    x, t = cp.Variable(j.shape[1]), cp.Variable()
    cp.Problem(cp.Maximize(t), [j @ x >= t, cp.norm(x - g0) <= radius]).solve(solver=cp.CLARABEL)
    scale = np.abs(j).max() * np.linalg.norm(g0)
    assert np.linalg.norm(d - g0) <= radius * (1 + 1e-7) + 1e-12
    assert (j @ d).min() >= t.value - 1e-5 * scale  # measured worst 7e-7 over 600 such cases


@pytest.mark.parametrize("seed", range(30))
def test_nash_mtl_on_awkward_jacobians(seed):
    j = degenerate_jacobian(seed)
    gram = j @ j.T
    a = nash_weights(gram)
    live = np.diag(gram) > 1e-12 * np.diag(gram).max()
    assert np.all(a >= 0) and np.all(a[~live] == 0)
    hull = min_norm_weights(gram[np.ix_(live, live)])
    if hull @ gram[np.ix_(live, live)] @ hull <= 1e-10 * np.diag(gram).max():
        assert np.all(a == 0)  # Pareto stationary: no update
    else:
        assert np.allclose(a[live] * (gram @ a)[live], 1.0, rtol=1e-6)


def test_a_non_finite_gradient_names_its_task():
    w = nn.Parameter(torch.tensor([0.0, 1.0]))
    finite_loss_inf_grad = torch.sqrt(w[0].abs())  # loss 0, d/dw sqrt(|w|) at 0 is inf
    fusion = get_loss_fusion("mgda")(2, task_names=["digit", "parity"])
    with pytest.raises(LossFusionError, match=r"gradient of task 1 \('parity'\).*NaN or infinite"):
        fusion.backward([w[1] ** 2, finite_loss_inf_grad], shared_parameters=[w])
    assert w.grad is None
