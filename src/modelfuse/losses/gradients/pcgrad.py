"""PCGrad (Yu et al. 2020): project each task gradient off the gradients it conflicts with, then sum.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020, Algorithm 1: for each task i, ``g_i^PC = g_i``; for each other task j in a
random order, if ``g_i^PC . g_j < 0`` then ``g_i^PC -= (g_i^PC . g_j) / ||g_j||^2 g_j``;
the update is ``sum_i g_i^PC``.

Same definition as TorchJD's ``PCGrad`` (computed the same way, on the Gramian); the one
difference is the random order: TorchJD draws it from torch's global generator (and so
consumes the caller's random stream), this one from its own generator seeded by ``seed``.
With ``torch.manual_seed(seed)`` before TorchJD's call the two draw the same orders.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modelfuse.losses._base import register_loss_fusion
from modelfuse.losses.gradients._base import GradientFusion

__all__ = ["PCGrad", "pcgrad_weights"]


def pcgrad_weights(gram: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """Coefficients ``w`` with ``sum_i g_i^PC = w @ J``; ``orders[i]``: the order task i visits the others."""
    k = gram.shape[0]
    total = np.zeros(k)
    for i in range(k):
        current = np.zeros(k)
        current[i] = 1.0
        for j in orders[i]:
            if j == i:
                continue
            inner = float(gram[j] @ current)  # g_i^PC . g_j
            if inner < 0.0:
                current[j] -= inner / gram[j, j]  # gram[j, j] > 0 when the inner product is negative
        total += current
    return total


@register_loss_fusion("pcgrad")
class PCGrad(GradientFusion):
    """PCGrad (Yu et al. 2020, Algorithm 1): projected conflicting gradients, summed.

    ``seed`` seeds the generator of the random task orders (one permutation per task and
    step). ``weights_``: the coefficients of the update in the task gradients (not a convex
    combination: the update is a sum, and a projection adds weight to the other task).
    """

    def __init__(self, num_tasks: int, task_names: Sequence[str] | None = None, *, seed: int = 0) -> None:
        super().__init__(num_tasks, task_names)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> torch.Tensor:
        """The generator's state, so that a checkpointed run resumes with the same task orders."""
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def task_weights(self, gramian, jacobian):
        k = gramian.shape[0]
        orders = [torch.randperm(k, generator=self.generator).tolist() for _ in range(k)]
        return pcgrad_weights(gramian, orders)
