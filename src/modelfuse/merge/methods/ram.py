"""RAM (Reinforced Agent Merging): average shared updates, keep (and rescale) unique ones."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.merge.methods._base import merge_method
from modelfuse.merge.methods._task_vectors import task_vectors

PAPER = (
    "Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models, RAM: shared entries averaged "
    "over their contributors, unique entries kept (RAM+: scaled by 1 + r clip(rho_i, 0, alpha))"
)


#: RAM's threshold below which a task-vector entry counts as unchanged
ChangeThreshold = Annotated[float, Field(ge=0)]


def _split(
    xs: list[torch.Tensor], base: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat task vectors with entries |tau| <= epsilon zeroed, which entries changed, contributor counts,
    and the shared (count > 1) and unique (count == 1) masks."""
    tv = torch.stack(task_vectors(xs, base)).reshape(len(xs), -1)
    changed = tv.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return tv * changed, changed, counts, counts > 1, counts == 1


@merge_method(
    "ram", base="required", paper=PAPER,
    mergekit=(
        "base: required, not an input. Same formula; bit-equal"
    ),
)
def ram(xs: list[torch.Tensor], base: torch.Tensor, *, epsilon: ChangeThreshold = 1e-5) -> torch.Tensor:
    """RAM: y = base + sum_i (tau_i [unique] + tau_i [shared] / c), c = #{j : |tau_j| > epsilon}.

    Paper (Yuan, Shi, Zhang, Liu, Yao, Vosoughi, Lee 2026): RL fine-tunes change sparse,
    different sets of parameters; averaging everything dilutes updates only one agent
    made. An entry changed by one model (|tau_i| > epsilon) takes that model's change,
    one changed by several takes the mean over the models that changed it, and entries
    within epsilon of the base are treated as unchanged. Same as mergekit's ``ram``.
    """
    tv, _, counts, shared, unique = _split(xs, base, epsilon)
    merged = (tv * unique + tv * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return (base + merged.reshape_as(base)).to(base.dtype)


@merge_method(
    "ramplus_tl", base="required", paper=PAPER,
    mergekit=(
        "base: required, not an input. Same formula (lambda_i in float32); bit-equal"
    ),
)
def ramplus_tl(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    epsilon: ChangeThreshold = 1e-5,
    r: float = 0.1,
    alpha: Annotated[float, Field(ge=0)] = 0.2,
) -> torch.Tensor:
    """RAM+ computed per tensor: unique changes of model i scaled by lambda_i = 1 + r clip(rho_i, 0, alpha).

    rho_i = (entries model i shares with others) / (entries only model i changed) counts
    how much of a model's update would be diluted by averaging; the paper's RAM+ rescales
    its unique part by lambda_i. mergekit's ``ramplus_tl`` ("tensor-local", these
    semantics) counts rho_i within each tensor rather than over the whole model, with a
    zero unique count replaced by epsilon; shared entries are averaged as in ``ram``.
    As in mergekit, lambda_i comes out in float32 (integer counts over a float clamp).
    """
    tv, changed, counts, shared, unique = _split(xs, base, epsilon)
    n_shared = (changed & shared).sum(dim=1)
    n_unique = (changed & unique).sum(dim=1)
    rho = n_shared.float() / n_unique.float().clamp(min=epsilon)
    scale = 1 + r * rho.clamp(min=0, max=alpha)
    merged = (tv * unique * scale.unsqueeze(-1) + tv * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return (base + merged.reshape_as(base)).to(base.dtype)
