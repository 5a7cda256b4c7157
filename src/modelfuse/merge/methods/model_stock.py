"""Model Stock: average fine-tuned models, then pull towards the base by their angle."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.merge.methods import _kernels
from modelfuse.merge.methods._base import merge_method, new_empty
from modelfuse.merge.methods._task_vectors import BLOCK
from modelfuse.merge.methods.linear import accumulation_dtype

#: below this |1 + (N - 1) cos| the ratio is taken as 0 (mergekit 0.1.5's guard)
SINGULAR = 1e-6


@merge_method(
    "model_stock",
    base="required",
    min_models=2,
    paper="Jang, Yun & Han 2024, Model Stock: All we need is just a few fine-tuned models: "
    "t = N cos(theta) / (1 + (N - 1) cos(theta)), w_H = t w_avg + (1 - t) w_0",
    mergekit=(
        "base: required, not an input. Ignores weight (accepted with an IgnoredParameterWarning). "
        "Last-bit differences (<= 4.8e-7 measured)"
    ),
)
def model_stock(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    filter_wise: Annotated[bool, Field(description="one ratio per row (last-dim vector) instead of per tensor")] = False,
) -> torch.Tensor:
    """y = t mean_i(x_i) + (1 - t) base with t = N cos(theta) / (1 + (N - 1) cos(theta)).

    Jang, Yun & Han (2024), "Model Stock: All we need is just a few fine-tuned models"
    (ECCV): the angle theta between the task vectors tau_i = x_i - base fixes the ratio t
    that moves the average of N fine-tuned models towards the pretrained one. The paper
    derives t for equal pairwise angles and applies it per layer.

    mergekit semantics: cos(theta) is the mean over pairs i < j of
    <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), each clamped to [-1, 1], per tensor
    (flattened) or, with ``filter_wise``, per row (vectors along the last dim; a 1-D tensor is
    one row). Needs the base and at least two models. Task vectors that are all zero give
    cos = 0, t = 0: the base. Where |1 + (N - 1) cos| < 1e-6 (task vectors pointing apart so that
    the ratio has no finite value) t = 0, the base, as in mergekit 0.1.5.
    Computed in float32 (float64 for float64 inputs), returned in the base tensor's dtype.
    Runs in blocks of rows (whole tensor: pass 1 sums the pairwise dot products block by
    block in float64, pass 2 writes the output), so no full-size temporaries exist.
    """
    work = accumulation_dtype(base.dtype)
    n = len(xs)
    width = base.shape[-1] if filter_wise and base.dim() >= 2 else base.numel()  # one row
    out = new_empty(base.shape, base.dtype, base.device)
    if base.numel() == 0:
        return out
    flat_base, flat_out = base.reshape(-1), out.view(-1)
    flat_xs = [x.reshape(-1) for x in xs]
    rows = max(1, BLOCK // width) if filter_wise else 1
    size = rows * width if filter_wise else min(BLOCK, base.numel())
    taus = torch.empty((n, size), dtype=work, device=base.device)

    def deltas(a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        w0 = flat_base[a:b].to(work)
        for i, x in enumerate(flat_xs):
            torch.sub(x[a:b].to(work), w0, out=taus[i, : b - a])
        return w0, taus[:, : b - a]

    def ratio(dots: torch.Tensor) -> torch.Tensor:
        """t from the Gram matrices ``dots`` (..., n, n) of the task vectors."""
        norms = dots.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
        pairs = [
            (dots[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            for i in range(n)
            for j in range(i + 1, n)
        ]
        cos = torch.stack(pairs).mean(dim=0)
        den = 1 + (n - 1) * cos
        singular = den.abs() < SINGULAR  # mergekit 0.1.5: no finite ratio there, keep the base
        return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, den))

    def write(a: int, b: int, w0: torch.Tensor, t: torch.Tensor | float) -> None:
        avg = sum(x[a:b].to(work) for x in flat_xs) / n
        flat_out[a:b] = t * avg + (1 - t) * w0

    total = base.numel()
    if not filter_wise:
        gram = torch.zeros((n, n), dtype=torch.float64, device=base.device)
        for a in range(0, total, size):
            _, tau = deltas(a, min(a + size, total))
            gram += (tau @ tau.T).double()
        t = float(ratio(gram))
        arrays = _kernels.float32_arrays([flat_base, *flat_xs])
        if arrays is not None:
            _kernels.stock_blend(arrays[1:], arrays[0], flat_out.numpy(), t)
            return out
        for a in range(0, total, size):
            b = min(a + size, total)
            write(a, b, flat_base[a:b].to(work), t)
        return out
    for a in range(0, total, size):  # whole rows per block: ratio and output in one pass
        b = min(a + size, total)
        w0, tau = deltas(a, b)
        tau = tau.view(n, -1, width)
        gram = torch.einsum("irc,jrc->rij", tau, tau).double()
        write(a, b, w0, ratio(gram).to(work).repeat_interleave(width))
    return out
