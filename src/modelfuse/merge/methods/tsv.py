"""Task Singular Vectors: merge per-layer low-rank task updates after decorrelating their bases."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods._base import merge_method
from modelfuse.merge.methods.linear import accumulation_dtype

#: the SVD methods' scaling of the merged task update (a finite number)
Alpha = Annotated[float, Field(allow_inf_nan=False)]


def task_vectors(method: str, xs: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """tau_i = x_i - base in float32 (float64 for a float64 base); shapes must match the base's."""
    acc = accumulation_dtype(base.dtype)
    for i, x in enumerate(xs):
        if x.shape != base.shape:
            raise ConfigError(
                f"merge method {method!r}: model {i} has shape {tuple(x.shape)} but the base has "
                f"{tuple(base.shape)}; every model must have the base's architecture"
            )
    b = base.to(acc)
    return [x.to(device=base.device, dtype=acc) - b for x in xs]


def apply(base: torch.Tensor, alpha: float, delta: torch.Tensor) -> torch.Tensor:
    """base + alpha * delta, added in ``delta``'s precision and returned in the base's dtype."""
    return (base.to(delta.dtype) + alpha * delta).to(base.dtype)


def orthonormal_polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor P Q^T of a = P S Q^T: the nearest matrix with orthonormal columns (rows if wide)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


@merge_method(
    "tsv_m",
    base="required",
    paper=(
        "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (TSV-Merge): "
        "theta = theta_0 + alpha U_perp S V_perp^T"
    ),
    mergekit=(
        "not in mergekit 0.1.5 (FusionBench's TSV-Merge)"
    ),
)
def tsv_m(xs: list[torch.Tensor], base: torch.Tensor, *, alpha: Alpha = 1.0) -> torch.Tensor:
    """TSV-Merge: concatenate each task's top singular vectors, decorrelate them, sum as one SVD.

    Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà (CVPR 2025), "Task Singular
    Vectors: Reducing Task Interference in Model Merging". For a 2-D weight with task matrices
    Delta_i = U_i S_i V_i^T (i = 1..T, r = min(rows, cols)), keep k = floor(r / T) components per
    task, stack U = [U_1k .. U_Tk], S = diag(S_1k .. S_Tk), V = [V_1k .. V_Tk], replace U and V by
    their orthonormal polar factors (U = P Q^T gives U_perp = P Q^T, likewise V) and return

        theta = theta_0 + alpha * U_perp S V_perp^T.

    As in FusionBench (``TaskSingularVectorMerging``, ``compute_and_sum_svd_mem_reduction``),
    tensors that are not 2-D (biases, norms) get the mean task vector, also scaled by alpha;
    alpha defaults to 1.0. When T > r, k = 0 and the matrix keeps the base's value, as in
    FusionBench. Deviations: k is the integer r // T (FusionBench's int(r * (1 / T)) can round
    down one more for some r = mT); per-model alphas (a FusionBench option) are not offered.
    SVDs run in float32 (float64 for float64 inputs); the result has the base's dtype.
    """
    taus = task_vectors("tsv_m", xs, base)
    if base.ndim != 2:
        return apply(base, alpha, torch.stack(taus).mean(dim=0))
    k = min(base.shape) // len(taus)
    if k == 0:
        return apply(base, alpha, torch.zeros_like(taus[0]))
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k, :])
    u_perp = orthonormal_polar(torch.cat(us, dim=1))
    vh_perp = orthonormal_polar(torch.cat(vhs, dim=0))
    return apply(base, alpha, (u_perp * torch.cat(ss)) @ vh_perp)
