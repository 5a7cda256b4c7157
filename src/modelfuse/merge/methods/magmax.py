"""MagMax: keep, per parameter, the task-vector entry of largest magnitude."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.merge.methods._base import merge_method
from modelfuse.merge.methods.tsv import apply, task_vectors


@merge_method(
    "magmax",
    base="required",
    paper=(
        "Marczak et al. 2024, MagMax: Leveraging Model Merging for Seamless Continual Learning: "
        "theta = theta_0 + lambda tau_max, tau_max[j] = tau_{argmax_t |tau_t[j]|}[j]"
    ),
    mergekit=(
        "not in mergekit 0.1.5 (FusionBench's MagMax)"
    ),
)
def magmax(
    xs: list[torch.Tensor], base: torch.Tensor, *, lambda_: Annotated[float, Field(allow_inf_nan=False)] = 0.5
) -> torch.Tensor:
    """MagMax: for every entry j keep the task vector value of largest absolute value.

    Marczak, Twardowski, Trzciński, Cygert (ECCV 2024), "MagMax: Leveraging Model Merging for
    Seamless Continual Learning": with tau_t = x_t - base,

        tau_max[j] = tau_{t*}[j],  t* = argmax_t |tau_t[j]|,   theta = theta_0 + lambda * tau_max.

    As in FusionBench (``MagMaxAlgorithm``) and the authors' code, ties go to the later model
    (selection folds over the models with ``>=``), and lambda defaults to 0.5, the scaling of
    the authors' 8-task script. Any tensor shape; the selection runs in float32 (float64 for
    float64 inputs) and the result has the base's dtype.
    """
    taus = task_vectors("magmax", xs, base)
    selected = taus[0]
    for tau in taus[1:]:
        selected = torch.where(tau.abs() >= selected.abs(), tau, selected)
    return apply(base, lambda_, selected)
