"""IMTL-G (Liu et al. 2021): the update whose projections on every task's unit gradient are equal.

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021, Section 3.2 (eq. 5-7): find ``g = sum_k alpha_k g_k`` with ``sum_k alpha_k = 1``
and ``g . u_k`` equal for all k, where ``u_k = g_k / ||g_k||``; the closed form is
``alpha_{2:K} = g_1 U^T (D U^T)^{-1}`` with ``D``, ``U`` the differences of gradients and of
unit gradients against task 1. Equivalently ``G alpha = c ||g||`` (``G`` the Gramian), i.e.
``alpha proportional to G^{-1} (||g_1||, ..., ||g_K||)``, normalised to sum 1.

TorchJD's ``IMTLG`` computes exactly that with a pseudo-inverse (which extends it to linearly
dependent gradients and gives weights 0 when they would sum to 0), so it is the engine here
(needs the ``mtl`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelfuse._optional import require
from modelfuse.losses._base import register_loss_fusion
from modelfuse.losses.gradients._base import GradientFusion

__all__ = ["IMTLG"]


@register_loss_fusion("imtl_g")
class IMTLG(GradientFusion):
    """IMTL-G (Liu et al. 2021, eq. 5-7), computed by TorchJD's ``IMTLGWeighting``.

    ``weights_`` sum to 1 over the present tasks; they may be negative (the paper does not
    constrain their sign).
    """

    def __init__(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        super().__init__(num_tasks, task_names)
        self._engine = require("torchjd.aggregation", "IMTL-G loss fusion").IMTLGWeighting()

    def task_weights(self, gramian, jacobian):
        return self._engine(torch.from_numpy(gramian)).numpy()
