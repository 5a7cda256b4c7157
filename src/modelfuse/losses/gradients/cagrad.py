"""CAGrad (Liu et al. 2021): the update in a ball around the mean gradient that helps the worst task most.

Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021, eq. (2)-(4) and Algorithm 1. Primal: ``max_d min_k g_k . d`` subject to
``||d - g_0|| <= c ||g_0||`` with ``g_0`` the mean gradient. Dual over the simplex:
``w* = argmin_w g_w . g_0 + sqrt(phi) ||g_w||`` with ``g_w = sum_k w_k g_k`` and
``phi = c^2 ||g_0||^2``; the update is ``d = g_0 + sqrt(phi) / ||g_w*|| g_w*`` (Algorithm 1;
with ``rescale=True`` divided by ``1 + c^2``, the official code's ``rescale=1``).

The dual is solved as TorchJD's ``CAGrad`` does (cvxpy with Clarabel on a K x K factor of the
Gramian; needs the ``mtl`` extra), and on random Jacobians the two agree. The difference:
TorchJD returns exactly zero when ``||g_w*||`` of its trace-normalised Gramian falls below
``norm_eps = 1e-4`` -- which happens with one task whose gradient is zero, with exactly
opposite tasks, and with a 1e4 scale ratio between tasks -- although the primal solution is
not zero there. Here, following the primal: when 0 is in the convex hull of the gradients
(found exactly with MGDA's min-norm solver) and the ball meets the cone ``{d : J d >= 0}``,
the primal value is 0, ``g_w* = 0``, and the update is the optimal ``d`` closest to ``g_0``,
the projection of ``g_0`` onto that cone (an NNLS problem; it is ``g_0`` itself, the official
code's answer, whenever ``g_0`` is in the cone); otherwise ``g_w* != 0`` and the update is
Algorithm 1's. Accuracy: the dual is solved to rounding after Newton polishing for scale
ratios between tasks up to 1e4 (tested); beyond about 1e6 Clarabel's tolerance limits it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.optimize

from modelfuse._optional import require
from modelfuse.errors import ConfigError
from modelfuse.losses._base import register_loss_fusion
from modelfuse.losses.gradients._base import GradientFusion
from modelfuse.losses.gradients.mgda import min_norm_weights

__all__ = ["CAGrad", "cagrad_weights"]

#: squared min-norm point (the Gramian scaled to mean diagonal 1) below which 0 is in the hull
_STATIONARY = 1e-14


def _polish(w: np.ndarray, g: np.ndarray, linear: np.ndarray, sqrt_phi: float, dual) -> np.ndarray:
    """Newton steps on the face of the simplex that the interior-point solution ``w`` lies on.

    The solver's ``w`` is accurate to about 1e-4 only (the objective is flat near the optimum
    and the update divides by ``||g_w||``); Newton's method on the face, with the constraint
    ``sum w = 1``, takes it to rounding. A step is kept only where it lowers the dual.
    """
    best = np.where(w > 1e-6, w, 0.0)
    best /= best.sum()
    if dual(w) < dual(best):
        best = w
    support = np.flatnonzero(best > 0)
    n = len(support)
    if n < 2:
        return best
    gs = g[np.ix_(support, support)]
    for _ in range(50):
        ws = best[support]
        gw = g[support] @ best  # (G w) on the support
        norm = float(np.sqrt(max(best @ g @ best, 0.0)))
        if norm <= 0.0:
            break
        grad = linear[support] + sqrt_phi * gw / norm
        hess = sqrt_phi * (gs / norm - np.outer(gw, gw) / norm**3)
        kkt = np.zeros((n + 1, n + 1))
        kkt[:n, :n] = hess
        kkt[:n, n] = 1.0
        kkt[n, :n] = 1.0
        step = np.linalg.lstsq(kkt, np.concatenate([-grad, [0.0]]), rcond=None)[0][:n]
        t = 1.0
        neg = step < 0
        if neg.any():
            t = min(1.0, float(np.min(-ws[neg] / step[neg])))
        trial = best.copy()
        trial[support] = np.clip(ws + t * step, 0.0, None)
        trial /= trial.sum()
        if not dual(trial) < dual(best):
            break
        best = trial
    return best


def cagrad_weights(gram: np.ndarray, c: float, rescale: bool = False) -> np.ndarray:
    """Coefficients ``w`` of CAGrad's update ``d = w @ J`` from the (K, K) Gramian (float64)."""
    cp = require("cvxpy", "CAGrad loss fusion")
    require("clarabel", "CAGrad loss fusion")
    k = gram.shape[0]
    mean = np.full(k, 1.0 / k)
    scale = float(np.trace(gram)) / k
    if scale <= 0.0:  # every gradient is zero: d = g_0 = 0
        return mean
    g = gram / scale
    vals, vecs = np.linalg.eigh(g)
    factor = vecs * np.sqrt(np.clip(vals, 0.0, None))  # g = factor @ factor.T
    g0 = factor.T @ mean  # reduced mean gradient
    sqrt_phi = c * float(np.linalg.norm(g0))
    if sqrt_phi == 0.0:  # c = 0 or a zero mean gradient: the ball is the point g_0
        return mean
    scaled = (lambda v: v / (1.0 + c * c)) if rescale else (lambda v: v)
    hull = min_norm_weights(g)
    if float(hull @ g @ hull) <= _STATIONARY:
        # 0 is in the gradients' hull: the primal value is at most 0, and it is 0 exactly when
        # the ball meets the cone {d : J d >= 0}; the optimal d closest to g_0 is then the
        # projection of g_0 onto that cone, g_0 + J^T lam with lam = argmin_{lam >= 0}
        # |g_0 + J^T lam| (Moreau), an NNLS problem in the K x K factor. Here the dual optimum
        # has g_w = 0, which is where TorchJD returns 0 and the official code returns g_0.
        lam = scipy.optimize.nnls(factor.T, -g0)[0]
        if float(np.sqrt(max(lam @ g @ lam, 0.0))) <= sqrt_phi * (1.0 + 1e-9):
            return scaled(mean + lam)
    w = cp.Variable(k)
    cost = (factor @ g0) @ w + sqrt_phi * cp.norm(factor.T @ w, 2)
    problem = cp.Problem(cp.Minimize(cost), [w >= 0, cp.sum(w) == 1])
    problem.solve(solver=cp.CLARABEL)
    linear = factor @ g0

    def dual(v: np.ndarray) -> float:
        return float(linear @ v + sqrt_phi * np.linalg.norm(factor.T @ v))

    raw = np.clip(np.asarray(w.value, dtype=np.float64), 0.0, None)
    raw /= raw.sum()
    w_opt = _polish(raw, g, linear, sqrt_phi, dual)
    gw_norm = float(np.linalg.norm(factor.T @ w_opt))
    weights = mean.copy()
    if gw_norm > 0.0:  # g_w* = 0 was handled above; this guards rounding only
        weights += (sqrt_phi / gw_norm) * w_opt
    return scaled(weights)


@register_loss_fusion("cagrad")
class CAGrad(GradientFusion):
    """CAGrad (Liu et al. 2021, Algorithm 1) with radius ``c`` (default 0.4, the paper's choice).

    ``weights_`` are ``1/K + sqrt(phi)/||g_w|| w*``: non-negative. ``rescale=True`` divides by
    ``1 + c^2`` like the official code. Needs the ``mtl`` extra (cvxpy, Clarabel).
    """

    def __init__(
        self,
        num_tasks: int,
        task_names: Sequence[str] | None = None,
        *,
        c: float = 0.4,
        rescale: bool = False,
    ) -> None:
        super().__init__(num_tasks, task_names)
        if not c >= 0.0:
            raise ConfigError(
                f"CAGrad's c (radius of the ball around the mean gradient) must be >= 0, found {c!r}"
            )
        require("cvxpy", "CAGrad loss fusion")
        require("clarabel", "CAGrad loss fusion")
        self.c = float(c)
        self.rescale = bool(rescale)

    def task_weights(self, gramian, jacobian):
        return cagrad_weights(gramian, self.c, self.rescale)
