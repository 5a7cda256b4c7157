"""Arcee Fusion: take the other model's changes only where they matter most."""

from __future__ import annotations

import torch

from modelfuse.merge.methods._base import merge_method
from modelfuse.merge.methods.linear import accumulation_dtype


def importance(x: torch.Tensor, base: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """|x - base| times the KL divergence KL(softmax(x) || softmax(base)) of each row (last dim)."""
    p = torch.softmax(x, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (x - base).abs() * kl


def quantile_threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 (q3 - q1), each quantile the sorted element at index floor(q (n - 1))."""
    flat = scores.reshape(-1)
    n = flat.numel()
    q1, median, q3 = (flat.kthvalue(int(q * (n - 1)) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    base="required",
    min_models=1,
    max_models=1,
    paper="Arcee AI 2025, MergeKit v0.1 release (Arcee Fusion), no paper: "
    "y = base + [s >= median(s) + 1.5 IQR(s)] (x - base), s = |x - base| KL(softmax x || softmax base)",
    mergekit=(
        "base: required, not an input. mergekit takes quantiles of an unseeded random sample of "
        "1e6 scores on larger tensors; modelfuse's are exact: bit-equal below 1e6 entries"
    ),
)
def arcee_fusion(xs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Keep the other model's value where its importance clears a dynamic threshold, else the base.

    Arcee Fusion (Arcee AI 2025, introduced with MergeKit v0.1; no paper): importance
    s = |x - base| * KL(softmax(x) || softmax(base)), the KL taken per row (softmax over the
    last dim, probabilities + 1e-8; a 1-D tensor is one row); threshold
    tau = median(s) + 1.5 (q3(s) - q1(s)), the outlier fence of Tukey's box plot; mask
    m = [s >= tau]; y = base + m (x - base).

    mergekit semantics: a quantile q is the element at index floor(q (n - 1)) of the sorted
    scores. mergekit sorts a random sample of 1e6 scores (unseeded) when a tensor has more;
    here the quantiles are always exact (``kthvalue``), so the result is deterministic and
    equal to mergekit's below 1e6 elements. Scores are computed in float32 (float64 for
    float64 inputs; mergekit uses the input dtype), the fused tensor in the base's dtype.
    """
    x = xs[0].to(base.dtype)
    work = accumulation_dtype(base.dtype)
    xw, bw = x.to(work), base.to(work)
    if base.dim() == 0:
        xw, bw = xw.reshape(1), bw.reshape(1)
    scores = importance(xw, bw)
    mask = (scores >= quantile_threshold(scores)).reshape(base.shape)
    return base + (x - base) * mask.to(base.dtype)
