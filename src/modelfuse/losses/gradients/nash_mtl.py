"""Nash-MTL (Navon et al. 2022): the Nash bargaining solution of the tasks over the update.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022, Theorem 3.1 / eq. (1)-(2): the update ``d = sum_k alpha_k g_k``
with ``alpha > 0`` solving ``G alpha = 1 / alpha`` (elementwise, ``G`` the Gramian).

That equation is the stationarity condition of the strictly convex
``f(alpha) = 1/2 alpha^T G alpha - sum_k log alpha_k`` on ``alpha > 0``, so it is solved here
by damped Newton's method in float64 to rounding (the paper and TorchJD approximate it with
20 steps of a sequential convex program, stopping at ``||G alpha - 1/alpha|| < 1e-3``).

Differences from TorchJD's ``NashMTL``, following the paper's Algorithm 1: no clipping of the
update norm (TorchJD clips it to 1 by default; ``max_norm`` here is off unless set), no state
carried between steps (the solution is unique). Where the bargaining problem has no solution
the paper's assumption (linearly independent gradients) fails; then: tasks whose gradient is
zero get weight 0 (they gain nothing from any update), and when 0 lies in the convex hull of
the other gradients (a Pareto-stationary point, e.g. exactly opposite tasks, or an all-zero
Jacobian, where TorchJD raises) no update helps every task: the update is 0, all weights 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from modelfuse.errors import ConfigError
from modelfuse.losses._base import register_loss_fusion
from modelfuse.losses.gradients._base import GradientFusion
from modelfuse.losses.gradients.mgda import min_norm_weights

__all__ = ["NashMTL", "nash_weights"]

#: squared norms below this (relative to the largest) count as zero
_ZERO = 1e-12


def _bargain(g: np.ndarray, tol: float = 1e-13, max_iter: int = 200) -> np.ndarray:
    """``alpha > 0`` with ``g @ alpha = 1 / alpha`` for a Gramian with no zero in its hull."""
    alpha = 1.0 / np.sqrt(np.diag(g))  # the solution when the gradients are orthogonal

    def f(a):
        return 0.5 * a @ g @ a - np.log(a).sum()

    for _ in range(max_iter):
        grad = g @ alpha - 1.0 / alpha
        if np.max(np.abs(alpha * (g @ alpha) - 1.0)) <= tol:
            break
        hess = g + np.diag(1.0 / alpha**2)
        step = np.linalg.solve(hess, -grad)
        t = 1.0
        neg = step < 0
        if neg.any():  # stay inside alpha > 0
            t = min(1.0, 0.99 * float(np.min(-alpha[neg] / step[neg])))
        f0, slope = f(alpha), float(grad @ step)
        while f(alpha + t * step) > f0 + 1e-4 * t * slope and t > 1e-12:
            t *= 0.5
        alpha = alpha + t * step
    return alpha


def nash_weights(gram: np.ndarray, max_norm: float = 0.0) -> np.ndarray:
    """Nash-MTL's ``alpha`` from the (K, K) Gramian (see the module docstring for degenerate cases)."""
    gram = np.asarray(gram, dtype=np.float64)
    k = gram.shape[0]
    alpha = np.zeros(k)
    diag = np.diag(gram)
    top = float(np.max(diag)) if k else 0.0
    if top <= 0.0:
        return alpha
    live = np.flatnonzero(diag > _ZERO * top)
    sub = gram[np.ix_(live, live)] / top
    hull = min_norm_weights(sub)
    if float(hull @ sub @ hull) <= 1e-10:  # Pareto stationary: no direction improves every task
        return alpha
    alpha[live] = _bargain(sub) / np.sqrt(top)  # G = top * sub  =>  alpha = alpha_sub / sqrt(top)
    if max_norm > 0.0:
        norm = float(np.sqrt(max(alpha @ gram @ alpha, 0.0)))
        if norm > max_norm:
            alpha *= max_norm / norm
    return alpha


@register_loss_fusion("nash_mtl")
class NashMTL(GradientFusion):
    """Nash-MTL (Navon et al. 2022, eq. 2 / Algorithm 1): ``alpha`` with ``G alpha = 1/alpha``.

    ``weights_`` are ``alpha``: positive for tasks with a gradient, 0 otherwise. ``max_norm``
    (default 0: off, as in the paper) clips the update norm like TorchJD's default of 1.
    """

    def __init__(
        self, num_tasks: int, task_names: Sequence[str] | None = None, *, max_norm: float = 0.0
    ) -> None:
        super().__init__(num_tasks, task_names)
        if not max_norm >= 0.0:
            raise ConfigError(f"Nash-MTL's max_norm must be >= 0 (0 turns clipping off), found {max_norm!r}")
        self.max_norm = float(max_norm)

    def task_weights(self, gramian, jacobian):
        return nash_weights(gramian, self.max_norm)
