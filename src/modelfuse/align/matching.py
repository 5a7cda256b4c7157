"""Finding the permutations that align one network to another, and ``align`` itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from modelfuse.align.permute import apply_permutation, permute_tensor
from modelfuse.align.spec import AxisRef, PermutationSpec, permutation_spec
from modelfuse.errors import AlignmentError, ConfigError


@dataclass(frozen=True)
class Matching:
    """Permutations found for each group (``perms``), the passes taken, and whether they converged."""

    perms: dict[str, torch.Tensor]
    passes: int
    converged: bool


def check_same_architecture(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`AlignmentError` naming the first state-dict entry where ``a`` and ``b`` differ."""
    for key in list(a) + [k for k in b if k not in a]:
        ta, tb = a.get(key), b.get(key)
        if ta is None or tb is None:
            which = "the reference model (to=)" if ta is None else "the model to align"
            raise AlignmentError(
                f"models have different architectures: {key!r} is missing from {which}; "
                "only networks of one architecture can be aligned"
            )
        if ta.shape != tb.shape:
            raise AlignmentError(
                f"models have different architectures: {key!r} has shape {tuple(tb.shape)} in the model to "
                f"align but {tuple(ta.shape)} in the reference model (to=); only networks of one "
                "architecture can be aligned"
            )


def _block(t: torch.Tensor, ref: AxisRef, size: int) -> torch.Tensor:
    """The ``size`` units of ``ref`` as rows: (size, everything else)."""
    t = t.narrow(ref.axis, ref.start, size * ref.repeat).movedim(ref.axis, 0)
    return t.reshape(size, -1)


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    max_passes: int = 100,
    seed: int = 0,
) -> Matching:
    """Permutations of ``state_b``'s units that maximise its inner product with ``state_a``.

    Weight matching of Ainsworth et al. 2023 ("Git Re-Basin", Alg. 1): coordinate descent
    over the groups in a random order, each step solving the linear assignment
    ``max_P sum_i <W_a^(i), P W_b^(i) (other permutations applied)>`` over the group's axes
    with ``scipy.optimize.linear_sum_assignment``, until a whole pass improves no group.
    """
    if max_passes < 1:
        raise ConfigError(f"max_passes must be at least 1; found {max_passes}")
    check_same_architecture(state_a, state_b)
    axes_of = spec.param_axes()
    perms = {name: torch.arange(g.size) for name, g in spec.groups.items()}
    names = list(spec.groups)
    a64 = {k: state_a[k].detach().to(torch.float64) for k in axes_of}
    b64 = {k: state_b[k].detach().to(torch.float64) for k in axes_of}
    rng = np.random.default_rng(seed)
    converged = False
    passes = 0
    while passes < max_passes and not converged:
        passes += 1
        converged = True
        for gi in rng.permutation(len(names)):
            name = names[gi]
            g = spec.groups[name]
            cost = torch.zeros(g.size, g.size, dtype=torch.float64)
            for ref in g.axes:
                others = [(r, perms[gn]) for gn, r in axes_of[ref.name] if r != ref]
                wb = permute_tensor(b64[ref.name], others)
                cost += _block(a64[ref.name], ref, g.size) @ _block(wb, ref, g.size).T
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
            old_score = cost[torch.arange(g.size), perms[name]].sum().item()
            new_score = cost[torch.arange(g.size), new].sum().item()
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[name] = new
                converged = False
    return Matching(perms, passes, converged)


_METHODS = ("weight_matching",)


def align(
    model_b: nn.Module,
    *,
    to: nn.Module,
    method: str = "weight_matching",
    max_passes: int = 100,
    seed: int = 0,
    spec: PermutationSpec | None = None,
) -> nn.Module:
    """A copy of ``model_b`` with its hidden units permuted to line up with ``to``'s.

    The copy computes exactly the same function as ``model_b``; only the order of its
    hidden units changes (see :func:`weight_matching`).
    """
    if method not in _METHODS:
        raise ConfigError(f"unknown alignment method {method!r}; choose one of {list(_METHODS)}")
    state_a, state_b = to.state_dict(), model_b.state_dict()
    check_same_architecture(state_a, state_b)
    spec = spec if spec is not None else permutation_spec(model_b)
    matching = weight_matching(spec, state_a, state_b, max_passes=max_passes, seed=seed)
    return apply_permutation(model_b, spec, matching.perms)
