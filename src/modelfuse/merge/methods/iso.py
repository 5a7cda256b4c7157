"""Isotropic merging: flatten the spectrum of the merged task matrix (Iso-C, Iso-CTS)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.merge.methods._base import merge_method
from modelfuse.merge.methods.tsv import Alpha, apply, orthonormal_polar, task_vectors

ISO_PAPER = (
    "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces"
)


@merge_method(
    "iso_c",
    base="required",
    paper=f"{ISO_PAPER} (Iso-C): theta = theta_0 + alpha U mean(sigma) V^T, U S V^T = sum_i tau_i",
    mergekit=(
        "not in mergekit 0.1.5 (FusionBench's Iso-C)"
    ),
)
def iso_c(xs: list[torch.Tensor], base: torch.Tensor, *, alpha: Alpha = 1.0) -> torch.Tensor:
    """Iso-C: task arithmetic's sum with every singular value replaced by their mean.

    Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer (ICML 2025), "No Task Left
    Behind: Isotropic Model Merging with Common and Task-Specific Subspaces". For a 2-D weight,
    Delta = sum_i tau_i = U diag(sigma) V^T and

        theta = theta_0 + alpha * mean(sigma) U V^T,

    so every direction of the common subspace is scaled alike. As in FusionBench
    (``IsotropicMergingInCommonSubspace``, ``iso_c``) tensors that are not 2-D get the *mean*
    task vector (not the sum) scaled by alpha, and alpha defaults to 1.0. SVDs run in float32
    (float64 for float64 inputs); the result has the base's dtype.
    """
    taus = task_vectors("iso_c", xs, base)
    if base.ndim != 2:
        return apply(base, alpha, torch.stack(taus).mean(dim=0))
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    return apply(base, alpha, s.mean() * (u @ vh))


def iso_cts_sizes(r: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common dimensions c, dimensions per task k) with c + n_tasks * k = r, FusionBench's rule.

    c starts at int(r * fraction); the rest is split evenly, k = round((r - c) / T) (Python's
    half-to-even rounding) and c takes up what is left. Where FusionBench's rounding would hand
    the tasks more than r dimensions (c < 0, an error there), k is lowered to r // T.
    """
    c = int(r * common_space_fraction)
    k = min(round((r - c) / n_tasks), r // n_tasks)
    return r - n_tasks * k, k


@merge_method(
    "iso_cts",
    base="required",
    paper=(
        f"{ISO_PAPER} (Iso-CTS): theta = theta_0 + alpha mean(sigma) U_perp V_perp^T over the common "
        "and task-specific subspaces"
    ),
    mergekit=(
        "not in mergekit 0.1.5 (FusionBench's Iso-CTS)"
    ),
)
def iso_cts(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    alpha: Alpha = 1.0,
    common_space_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.8,
) -> torch.Tensor:
    """Iso-CTS: common subspace of the summed task matrix plus each task's own directions, isotropic.

    Same paper as Iso-C. For a 2-D weight with r = min(rows, cols): the top c singular triplets
    (U_c, S_c, V_c) of Delta = sum_i tau_i span the common subspace; each task adds the top k
    singular triplets of its residual (I - U_c U_c^T) tau_i, with c + T k = r
    (:func:`iso_cts_sizes`, c about ``common_space_fraction`` * r). The stacked bases
    U = [U_c, U_1 .. U_T] and V = [V_c, V_1 .. V_T] are replaced by their orthonormal polar
    factors U_perp, V_perp, and with sigma the stacked singular values (S_c and the residuals')

        theta = theta_0 + alpha * mean(sigma) U_perp V_perp^T.

    FusionBench (``IsotropicMergingInCommonAndTaskSubspace``, ``iso_cts``) defaults:
    alpha 1.0, common_space_fraction 0.8; tensors that are not 2-D get the mean task vector
    scaled by alpha. SVDs run in float32 (float64 for float64 inputs); the result has the base's dtype.
    """
    taus = task_vectors("iso_cts", xs, base)
    if base.ndim != 2:
        return apply(base, alpha, torch.stack(taus).mean(dim=0))
    c, k = iso_cts_sizes(min(base.shape), len(taus), common_space_fraction)
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    us, ss, vhs = [u[:, :c]], [s[:c]], [vh[:c, :]]
    for tau in taus if k > 0 else []:
        residual = tau - us[0] @ (us[0].T @ tau)
        u_t, s_t, vh_t = torch.linalg.svd(residual, full_matrices=False)
        us.append(u_t[:, :k])
        ss.append(s_t[:k])
        vhs.append(vh_t[:k, :])
    u_perp = orthonormal_polar(torch.cat(us, dim=1))
    vh_perp = orthonormal_polar(torch.cat(vhs, dim=0))
    return apply(base, alpha, torch.cat(ss).mean() * (u_perp @ vh_perp))
