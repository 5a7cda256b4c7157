"""Apply permutations of hidden units to weights, following a :class:`PermutationSpec`.

Convention: a permutation ``perm`` of a group reorders its units so that new unit ``i``
is old unit ``perm[i]`` (``W_new = W[perm]`` on output axes, ``W[:, perm]`` on input axes).
Permutations are applied in the order of the spec's groups, so a group of whole blocks
(attention heads) moves its blocks before its inner groups reorder the units inside the
block now at each position.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from modelfuse.align.spec import AxisRef, PermutationSpec
from modelfuse.errors import AlignmentError


def axis_index(length: int, ref: AxisRef, perm: torch.Tensor) -> torch.Tensor:
    """Index along an axis of ``length`` positions that applies ``perm`` to the block ``ref`` names."""
    idx = torch.arange(length)
    n, r = perm.numel(), ref.repeat
    block = (perm.to(torch.long)[:, None] * r + torch.arange(r)[None, :]).reshape(-1) + ref.start
    idx[ref.start : ref.start + n * r] = block
    return idx


def permute_tensor(t: torch.Tensor, refs: Iterable[tuple[AxisRef, torch.Tensor]]) -> torch.Tensor:
    """``t`` with every (axis block, permutation) in ``refs`` applied."""
    for ref, perm in refs:
        t = t.index_select(ref.axis, axis_index(t.shape[ref.axis], ref, perm).to(t.device))
    return t


def check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``perms`` as long tensors, checked against ``spec``; groups left out keep their order."""
    unknown = sorted(set(perms) - set(spec.groups))
    if unknown:
        raise AlignmentError(
            f"permutations given for {unknown}, which are not permutation groups of {spec.model_name}; "
            f"its groups are {sorted(spec.groups)}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, g in spec.groups.items():
        p = perms.get(name)
        if p is None:
            out[name] = torch.arange(g.size)
            continue
        p = torch.as_tensor(p).to(torch.long).reshape(-1)
        if p.numel() != g.size or not torch.equal(torch.sort(p).values, torch.arange(g.size)):
            raise AlignmentError(
                f"the permutation for group {name} must hold each of 0..{g.size - 1} once; "
                f"found {p.numel()} entries{'' if p.numel() != g.size else ' with repeats'}"
            )
        out[name] = p
    return out


def permute_state_dict(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A new state dict with ``perms`` applied to every axis ``spec`` lists; other entries are shared."""
    full = check_perms(spec, perms)
    out = dict(state)
    for name, refs in spec.param_axes().items():
        if name not in state:
            raise AlignmentError(f"the state dict has no entry {name!r}, which permutation spec lists")
        out[name] = permute_tensor(state[name], [(ref, full[g]) for g, ref in refs])
    return out


def apply_permutation(
    model: nn.Module, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> nn.Module:
    """A copy of ``model`` with its hidden units reordered by ``perms``; it computes the same function."""
    permuted = permute_state_dict(model.state_dict(), spec, perms)
    out = copy.deepcopy(model)
    out.load_state_dict(permuted)
    return out
