"""Model Stock: average fine-tuned models, then pull towards the base by their angle."""

from __future__ import annotations

import torch
from pydantic import Field

from modelfuse.merge.methods._base import Params, merge_method
from modelfuse.merge.methods.linear import accumulation_dtype


class ModelStockShared(Params):
    filter_wise: bool = Field(False, description="one ratio per row (last-dim vector) instead of per tensor")


@merge_method(
    "model_stock",
    shared=ModelStockShared,
    base="required",
    min_models=2,
    paper="Jang, Yun & Han 2024, Model Stock: All we need is just a few fine-tuned models: "
    "t = N cos(theta) / (1 + (N - 1) cos(theta)), w_H = t w_avg + (1 - t) w_0",
)
def model_stock(xs: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """y = t mean_i(x_i) + (1 - t) base with t = N cos(theta) / (1 + (N - 1) cos(theta)).

    Jang, Yun & Han (2024), "Model Stock: All we need is just a few fine-tuned models"
    (ECCV): the angle theta between the task vectors tau_i = x_i - base fixes the ratio t
    that moves the average of N fine-tuned models towards the pretrained one. The paper
    derives t for equal pairwise angles and applies it per layer.

    mergekit semantics: cos(theta) is the mean over pairs i < j of
    <tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), each clamped to [-1, 1], per tensor
    (flattened) or, with ``filter_wise``, per row (vectors along the last dim; a 1-D tensor is
    one row). Needs the base and at least two models. Task vectors that are all zero give
    cos = 0, t = 0: the base. No guard where 1 + (N - 1) cos = 0 (antiparallel task vectors).
    Computed in float32 (float64 for float64 inputs), returned in the base tensor's dtype.
    """
    work = accumulation_dtype(base.dtype)
    w0 = base.to(work)
    ws = [x.to(work) for x in xs]
    if filter_wise and w0.dim() >= 2:
        rows = [w0, *ws]
    elif filter_wise:
        rows = [v.reshape(1, -1) for v in (w0, *ws)]
    else:
        rows = [v.reshape(-1) for v in (w0, *ws)]
    taus = [r - rows[0] for r in rows[1:]]
    cosines = []
    for i, a in enumerate(taus):
        for b in taus[i + 1 :]:
            norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = n * cos / (1 + (n - 1) * cos)
    avg = sum(rows[1:]) / n
    out = t * avg + (1 - t) * rows[0]
    return out.reshape(base.shape).to(base.dtype)
