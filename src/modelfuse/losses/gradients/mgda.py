"""MGDA-UB (Sener & Koltun 2018): the exact min-norm point of the convex hull of the task gradients.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
eq. (3): ``min_{alpha in simplex} || sum_k alpha_k g_k ||^2``; the update is
``sum_k alpha_k g_k``, a descent direction for every task (or 0 at a Pareto-stationary point).

The paper solves the QP with Frank-Wolfe (its Algorithm 2, closed form for 2 tasks); so does
TorchJD's ``MGDA``, stopped after a step size below ``epsilon`` or 100 iterations, which leaves
it short of the minimum for more than two tasks. Here the QP is solved exactly (to rounding)
with Wolfe's min-norm-point algorithm (Wolfe 1976), an active-set method that ends after
finitely many steps: for two tasks it is the paper's closed form.

"Upper bound" (UB, the paper's Section 3.3) means solving the QP with the gradients with
respect to the shared representation Z instead of the shared parameters, then
back-propagating ``sum_k alpha_k L_k``: pass ``representation=z`` to ``backward`` (every
gradient method here accepts it); without it the QP uses the parameters' gradients (MGDA).
"""

from __future__ import annotations

import numpy as np

from modelfuse.losses._base import register_loss_fusion
from modelfuse.losses.gradients._base import GradientFusion

__all__ = ["MGDA", "min_norm_weights"]


def _affine_min(gram: np.ndarray, support: list[int]) -> np.ndarray:
    """Weights (summing to 1) of the min-norm point of the affine hull of the support's points."""
    n = len(support)
    a = np.zeros((n + 1, n + 1))
    a[:n, :n] = gram[np.ix_(support, support)]
    a[:n, n] = 1.0
    a[n, :n] = 1.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    return np.linalg.lstsq(a, rhs, rcond=None)[0][:n]


def min_norm_weights(gram: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> np.ndarray:
    """The weights ``alpha`` in the simplex minimising ``alpha @ gram @ alpha`` (Wolfe's algorithm).

    ``gram``: the (K, K) Gramian of the points. Exact up to rounding: the optimality condition
    ``(gram @ alpha)_j >= alpha @ gram @ alpha`` holds for every j to ``tol`` times the largest
    squared norm. All-zero points give uniform weights (every point of the hull is 0).
    """
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0]
    scale = float(np.max(np.diag(gram))) if k else 0.0
    if k == 1 or scale <= 0.0:
        return np.full(k, 1.0 / k)
    g = gram / scale
    start = int(np.argmin(np.diag(g)))
    support = [start]
    w = np.zeros(k)
    w[start] = 1.0
    for _ in range(max_iter):
        gw = g @ w
        xx = float(w @ gw)
        j = int(np.argmin(gw))
        if xx - gw[j] <= tol * max(1.0, xx) or j in support:
            break
        support.append(j)
        for _ in range(max_iter):  # minor cycle: move towards the affine minimum, dropping vertices
            v = _affine_min(g, support)
            if np.all(v > tol):
                w[:] = 0.0
                w[support] = v
                break
            ws = w[support]
            neg = v <= tol
            theta = float(np.min(ws[neg] / (ws[neg] - v[neg])))
            ws = ws + theta * (v - ws)
            keep = ws > tol
            if not keep.any():  # rounding; keep the best vertex
                keep[int(np.argmax(ws))] = True
            w[:] = 0.0
            w[[s for s, kp in zip(support, keep, strict=True) if kp]] = ws[keep]
            support = [s for s, kp in zip(support, keep, strict=True) if kp]
    w = np.clip(w, 0.0, None)
    return w / w.sum()


@register_loss_fusion("mgda")
class MGDA(GradientFusion):
    """MGDA-UB (Sener & Koltun 2018, eq. 3): the exact min-norm point of the gradients' convex hull.

    ``weights_`` are the simplex weights ``alpha`` (non-negative, summing to 1 over the
    present tasks). Differs from TorchJD's ``MGDA`` (approximate Frank-Wolfe) for three or
    more tasks: this one is exact. Construct with ``num_tasks`` alone.
    """

    weights_sum = "one"

    def task_weights(self, gramian, jacobian):
        return min_norm_weights(gramian)
