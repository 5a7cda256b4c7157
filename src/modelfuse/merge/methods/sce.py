"""SCE (FuseChat): select high-variance entries, weight task vectors by their energy, erase minority signs."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.merge.methods._base import merge_method
from modelfuse.merge.methods._engine import merge_deltas
from modelfuse.merge.methods._task_vectors import sparsified_stack


def variance_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Mask of the top ``select_topk`` fraction of the entries whose variance across models is non-zero.

    k = floor(select_topk * (number of entries with non-zero variance)), chosen by
    ``torch.topk`` over the population variance (as mergekit); k = 0 selects nothing.
    """
    variance = torch.var(deltas, dim=0, unbiased=False)
    k = int(abs(select_topk) * torch.count_nonzero(variance))
    mask = torch.zeros(variance.numel(), dtype=torch.bool, device=deltas.device)
    if k > 0:
        mask[torch.topk(variance.abs().reshape(-1), k=k, largest=True).indices] = True
    return mask.view(variance.shape)


#: below this total energy the SCE coefficients are uniform (mergekit 0.1.5's threshold)
UNIFORM_BELOW = 1e-6


def energy_weights(deltas: torch.Tensor) -> list[float]:
    """Matrix-level coefficients: mean of squares of each task vector, normalised to sum 1.

    Uniform when the means of squares sum to less than 1e-6 (mergekit 0.1.5), so tensors that
    barely moved (|delta| ~ 1e-3 and below) are averaged rather than weighted by their energy.
    """
    n = deltas.shape[0]
    if deltas.numel() == 0:
        return [1.0 / n] * n
    energy = deltas.square().reshape(n, -1).mean(dim=1)  # in the deltas' dtype, as mergekit
    total = torch.sum(energy).item()
    if abs(total) < UNIFORM_BELOW:
        return [1.0 / n] * n
    return (energy / total).tolist()


@merge_method(
    "sce",
    base="required",
    paper="Wan et al. 2024, FuseChat: Knowledge Fusion of Chat Models, SCE (select, calculate, erase)",
    mergekit=(
        "base: required, not an input. Ignores weight and density (mergekit's sce has no per-model "
        "parameters; a recipe's are accepted with an IgnoredParameterWarning). Coefficients computed "
        "as mergekit's (in the deltas' dtype, uniform below a total energy of 1e-6): bit-equal"
    ),
)
def sce(
    xs: list[torch.Tensor], base: torch.Tensor, *, select_topk: Annotated[float, Field(gt=0, le=1)] = 1.0
) -> torch.Tensor:
    """SCE: y = base + sum_i m_i eta_i delta_i / sum_i m_i eta_i over selected, sign-agreeing entries.

    Paper (Wan, Zhong, Yang, Chen, Quan 2024, FuseChat): per parameter matrix, Select the
    top tau% entries by variance of the task vectors across models, Calculate coefficients
    eta_i from the squared magnitudes of each (selected) task vector, Erase the entries
    whose sign disagrees with the sum (TIES' vote), then fuse.
    mergekit's semantics (these): with ``select_topk`` < 1 keep the floor(select_topk n_v)
    entries of largest population variance, n_v the entries with non-zero variance
    (``torch.topk`` order), zero the rest in every task vector; eta_i = mean(delta_i^2) /
    sum_j mean(delta_j^2) (uniform when that sum is below 1e-6); s = +1 where sum_i delta_i >= 0 else -1
    (unweighted vote), m_i = [sign(delta_i) == s]; divide by sum_i m_i eta_i (0 becomes 1).
    No per-model parameters and no lambda: mergekit's sce ignores ``weight``.
    """
    deltas = sparsified_stack(xs, base, lambda i, tau: tau)
    if select_topk < 1:
        deltas.mul_(variance_mask(deltas, select_topk))
    eta = energy_weights(deltas)
    return merge_deltas(base, deltas.clone(), eta, elect=True, normalize=True, lambda_=1.0, votes=deltas)
