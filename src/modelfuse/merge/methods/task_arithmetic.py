"""Task arithmetic: add scaled task vectors to the base model."""

from __future__ import annotations

import torch

from modelfuse.merge.methods import _kernels
from modelfuse.merge.methods._base import PerModel, merge_method, new_empty
from modelfuse.merge.methods.linear import BLOCK


@merge_method(
    "task_arithmetic",
    base="required",
    paper="Ilharco et al. 2023, Editing models with task arithmetic, eq. 1: theta = theta_0 + lambda sum_i tau_i",
    mergekit=(
        "base: required, not an input. Uses weight, lambda, normalize; ignores density, gamma, "
        "epsilon. Bit-equal (float32 and bfloat16)"
    ),
)
def task_arithmetic(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: PerModel[float] = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """y = base + lambda * sum_i w_i tau_i with task vectors tau_i = x_i - base.

    Computed in the base tensor's dtype, as mergekit does (bf16 models: bf16 deltas and
    sums). ``normalize=True`` divides the sum by sum_i w_i (a divisor below 1e-8 becomes 1).
    """
    dtype = base.dtype
    w = torch.tensor(weight, dtype=dtype, device=base.device)
    div = w.sum()
    if div.abs() < 1e-8:
        div = torch.ones_like(div)
    out = new_empty(base.shape, base.dtype, base.device)
    flat_out, flat_base, flats = out.view(-1), base.reshape(-1), [x.reshape(-1) for x in xs]
    arrays = _kernels.float32_arrays([flat_base, *flats])
    if arrays is not None:
        _kernels.weighted_sum(
            arrays[1:], arrays[0], flat_out.numpy(), weight, normalize=normalize, div=float(div), lam=lambda_
        )
        return out
    size = max(1, min(BLOCK, out.numel()))  # blocks: the same elementwise operations, in cache
    tau = torch.empty(size, dtype=dtype, device=base.device)
    for a in range(0, out.numel(), size):
        b = min(a + size, out.numel())
        total = flat_out[a:b].zero_()
        for wi, x in zip(w, flats):
            torch.sub(x[a:b].to(dtype), flat_base[a:b], out=tau[: b - a])
            total.add_(tau[: b - a].mul_(wi))  # w_i tau_i rounded, then summed: mergekit's order
        if normalize:
            total /= div
        total.mul_(lambda_).add_(flat_base[a:b])
    return out
