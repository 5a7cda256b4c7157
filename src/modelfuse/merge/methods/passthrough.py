"""Passthrough: one model's tensor, unchanged or scaled; the building block of layer stacking."""

from __future__ import annotations

import torch

from modelfuse.merge.methods._base import PerModel, merge_method


@merge_method(
    "passthrough",
    base="none",
    min_models=1,
    max_models=1,
    paper="no paper (frankenmerges); depth up-scaling: Kim et al. 2023, SOLAR 10.7B, "
    "Scaling large language models with simple yet effective depth up-scaling",
    mergekit=(
        "base: no role; a named base_model would be a second input, which mergekit and modelfuse "
        "refuse. Bit-equal"
    ),
)
def passthrough(
    xs: list[torch.Tensor], base: torch.Tensor | None, *, scale: PerModel[float | None] = None
) -> torch.Tensor:
    """A copy of the single model's tensor, times its ``scale`` when one is given (y = s x).

    Layer stacking ("frankenmerging", or depth up-scaling as in Kim et al. 2023, "SOLAR
    10.7B: Scaling large language models with simple yet effective depth up-scaling") is
    passthrough over slices of layer ranges; the executor assembles the slices.

    mergekit semantics: exactly one input tensor; ``scale`` is a per-model parameter whose
    default is none (no multiplication; ``scale: 1`` gives the same values); the product is
    taken in the tensor's dtype.
    """
    (x,), (s,) = xs, scale
    return x.clone() if s is None else x * s
