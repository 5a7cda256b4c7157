"""Permutation alignment: make independently trained networks mergeable (Git Re-Basin and kin).

- ``permutation_spec(model)``: the groups of weight axes that share one permutation,
  derived by tracing the model with torch.fx; ``explain(model)`` prints them. Attention
  heads get groups inside them (query/key units, value units) and, with
  ``whole_heads=True``, a group that moves whole heads.
- ``apply_permutation(model, spec, perms)``: the same function with hidden units reordered.
- ``align(model_b, to=model_a, method="weight_matching")``: model_b permuted to match model_a.
- ``ot_fusion(a, b)``: b fused into a by optimal transport of units (widths may differ).
- ``zipit(a, b, data)``: models of different tasks zipped feature by feature (ZipIt!).
- ``repair(merged, endpoints=(a, b), t=0.5, data=loader)``: REPAIR the interpolated model's statistics.
- ``loss_barrier(a, b, data)``: loss and accuracy along the straight line between two models.
"""

from __future__ import annotations

from modelfuse.align.barrier import BarrierResult, interpolate, loss_barrier
from modelfuse.align.matching import (
    Matching,
    activation_matching,
    align,
    get_aligner,
    list_aligners,
    register_aligner,
    weight_matching,
)
from modelfuse.align.ot_fusion import OTFusion, ot_fusion, transport_map
from modelfuse.align.permute import apply_permutation, permute_state_dict
from modelfuse.align.repair import repair, repair_statistics, reset_bn_stats
from modelfuse.align.spec import (
    AxisRef,
    FixedGroup,
    PermutationGroup,
    PermutationSpec,
    explain,
    permutation_spec,
)
from modelfuse.align.zipit import PartialZip, zip_matrices, zipit

__all__ = [
    "AxisRef",
    "BarrierResult",
    "FixedGroup",
    "Matching",
    "OTFusion",
    "PartialZip",
    "PermutationGroup",
    "PermutationSpec",
    "activation_matching",
    "align",
    "apply_permutation",
    "explain",
    "get_aligner",
    "interpolate",
    "list_aligners",
    "loss_barrier",
    "ot_fusion",
    "permutation_spec",
    "permute_state_dict",
    "register_aligner",
    "repair",
    "repair_statistics",
    "reset_bn_stats",
    "transport_map",
    "weight_matching",
    "zip_matrices",
    "zipit",
]
