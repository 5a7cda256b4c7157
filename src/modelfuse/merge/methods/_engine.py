"""The steps the sparsifying task-vector methods share: trim or drop, rescale, elect signs, sum.

TIES, DARE, Model Breadcrumbs and DELLA are one pipeline with different parts, as in
mergekit's "generalized task arithmetic": task vectors tau_i = x_i - base, each sparsified
(top-k magnitudes, a magnitude window, a global threshold, Bernoulli drops with a flat or
rank-based keep probability) and optionally rescaled, then an optional sign election, a
weighted sum (optionally divided by the weights that took part), times lambda, plus the
base. Every step is written once (``_task_vectors``, ``_select``, ``_sparsifiers``, here); a method module chooses its parts and defaults.

Execution is blockwise (``gta_merge``): a sparsifier first gathers what it needs over the
whole task vector (magnitude histograms for a cut, norms for a rescale) in passes over
blocks of ``BLOCK`` entries, then the merge runs block by block. Task vectors are
recomputed per block into reused buffers, so a tensor of any size costs its inputs and
its output plus a few MiB, and the work stays in cache: no full-size temporaries (a
stacked task-vector tensor, masks, magnitudes) exist. Every step is elementwise or a
reduction over models, so the blocks give the same bytes as whole-tensor code.

The C kernels (``_kernel_engine``) run the same merge for float32 on CPU with the same
bytes; ``gta_merge`` hands them what they cover.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from modelfuse.merge.methods._base import new_empty
from modelfuse.merge.methods._kernel_engine import kernel_merge
from modelfuse.merge.methods._sparsifiers import Sparsifier
from modelfuse.merge.methods._task_vectors import TaskVectors, default_block


def gta_merge(
    xs: Sequence[torch.Tensor],
    base: torch.Tensor,
    parts: Sequence[Sparsifier],
    weight: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    lambda_: float,
    unweighted_vote: bool = False,
    block: int | None = None,
) -> torch.Tensor:
    """y = base + lambda * sum_i m_i w_i s_i [/ D], s_i = ``parts[i]`` applied to tau_i = x_i - base.

    The merge step is ``merge_deltas``' (mergekit's order of operations, in the base dtype);
    ``unweighted_vote`` elects on sum_i s_i instead of sum_i w_i s_i. Runs in blocks of
    ``block`` entries (rounded to the parts' row unit), see the module docstring.
    """
    total = float(weight_total(weight, torch.float32, base.device))
    fast = kernel_merge(xs, base, parts, weight, elect, normalize, lambda_, unweighted_vote, block, total)
    if fast is not None:
        return fast
    base_flat = base.reshape(-1)
    unit = max((p.unit for p in parts), default=1)
    size = default_block(base.device) if block is None else block
    size = max(unit, size // unit * unit)
    tv = TaskVectors(xs, base, size)
    for i, part in enumerate(parts):
        part.fit(tv, i)
        part.norm_pass(tv, i)
        part.begin()
    out = new_empty(base.shape, base.dtype, base.device)
    flat_out = out.view(-1)
    n_models = len(parts)
    deltas = torch.empty((n_models, tv.size), dtype=base.dtype, device=base.device)
    votes = torch.empty_like(deltas) if elect and unweighted_vote else None
    scratch = MergeScratch(weight, tv.size, base.dtype, base.device)
    for a, b in tv.spans():
        d = deltas[:, : b - a]
        for i, part in enumerate(parts):
            part.into(tv, i, a, b, d[i])
        v = None
        if votes is not None:
            v = votes[:, : b - a].copy_(d)
        merge_block(
            flat_out[a:b],
            base_flat[a:b],
            d,
            scratch,
            elect=elect,
            normalize=normalize,
            lambda_=lambda_,
            votes=v,
        )
    return out


def weight_total(weight: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """sum_i w_i in ``dtype`` (a 0-d tensor); 1 where its magnitude is below 1e-8."""
    total = torch.tensor(list(weight), dtype=dtype, device=device).sum()
    if total.abs() < 1e-8:
        return torch.ones((), dtype=dtype, device=device)
    return total


class MergeScratch:
    """Buffers of one blockwise merge: weights as a column, sums, signs, agreement."""

    def __init__(self, weight: Sequence[float], size: int, dtype: torch.dtype, device: torch.device):
        n = len(weight)
        self.w = torch.tensor(list(weight), dtype=dtype, device=device).view(n, 1)
        self.positive = bool((self.w > 0).all())
        self.total = weight_total(weight, dtype, device)
        self.sum = torch.empty(size, dtype=dtype, device=device)
        self.div = torch.empty(size, dtype=dtype, device=device)
        self.sign = torch.empty(size, dtype=dtype, device=device)
        self.ones = torch.ones(size, dtype=dtype, device=device)
        self.agree = torch.empty((n, size), dtype=dtype, device=device)


def merge_block(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    s: MergeScratch,
    *,
    elect: bool,
    normalize: bool,
    lambda_: float,
    votes: torch.Tensor | None = None,
) -> None:
    """out = base + lambda * sum_i m_i w_i delta_i [/ D] on one block; ``deltas`` (n, L) is consumed.

    Without election m_i = 1 and D = sum_i w_i (|D| < 1e-8 becomes 1). With election the
    sign s = +1 where sum_i v_i >= 0 else -1, with v_i the vote inputs (by default the
    weighted deltas u_i = w_i delta_i; ``votes`` stacks others, e.g. the unweighted deltas),
    m_i = [sign(v_i) == s] (zeros never agree), D = sum_i m_i w_i (D == 0 becomes 1).
    ``normalize`` divides by D; lambda multiplies last. mergekit's operations in its order,
    so the values match it bit for bit (up to the sign of a zero).

    Float ops only: m_i = sign(relu(s v_i)); the agreeing sum is s * sum_i relu(s u_i) when
    the vote is on u itself (exact: every agreeing u_i has sign s). ``torch.sum`` starts
    from +0, so votes that are all zeros (even all -0) sum to +0 and elect s = +1; the C
    kernels start their sums from +0 too, so both paths give the same sign of zero.
    """
    n = out.numel()
    deltas.mul_(s.w)  # u_i = w_i delta_i
    mixed = s.sum[:n]
    if elect:
        sign, agree = s.sign[:n], s.agree[:, :n]
        torch.sum(deltas if votes is None else votes, dim=0, out=mixed)
        torch.copysign(s.ones[:n], mixed, out=sign)  # the elected sign
        if votes is None:
            torch.mul(deltas, sign, out=agree).relu_()  # |u_i| where u_i agrees, else 0
            torch.sum(agree, dim=0, out=mixed).mul_(sign)
        else:
            torch.mul(votes, sign, out=agree).relu_()
            torch.sum(deltas.mul_(agree.sign_()), dim=0, out=mixed)
        divisor = torch.sum(agree.sign_().mul_(s.w), dim=0, out=s.div[:n])  # sum_i m_i w_i
        if s.positive:  # D == 0 only where nothing agrees (mixed = 0): any non-zero divisor does
            divisor.clamp_min_(torch.finfo(divisor.dtype).tiny)
        else:
            divisor.masked_fill_(divisor == 0, 1)
    else:
        torch.sum(deltas, dim=0, out=mixed)
        divisor = s.total
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    torch.add(base, mixed, out=out)


def merge_deltas(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weight: Sequence[float],
    *,
    elect: bool,
    normalize: bool,
    lambda_: float,
    votes: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """``merge_block`` over already stacked task vectors ``deltas`` (consumed), block by block.

    The result is contiguous whatever the layout of ``base`` (a transposed view, say)."""
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_deltas = deltas.reshape(deltas.shape[0], -1)
    flat_votes = votes.reshape(votes.shape[0], -1) if votes is not None else None
    size = max(1, min(default_block(base.device) if block is None else block, flat_base.numel()))
    scratch = MergeScratch(weight, size, base.dtype, base.device)
    for a in range(0, flat_base.numel(), size):
        z = slice(a, a + size)
        merge_block(
            flat_out[z],
            flat_base[z],
            flat_deltas[:, z],
            scratch,
            elect=elect,
            normalize=normalize,
            lambda_=lambda_,
            votes=flat_votes[:, z] if flat_votes is not None else None,
        )
    return out
