"""Loss fusion: one training objective from many task losses, and from many teachers.

- :mod:`modelfuse.losses._base`: the interface every method follows (:class:`LossFusion`,
  its registry, loss checks, per-sample task masks);
- :mod:`modelfuse.losses.weighting`: loss weightings (equal, fixed, uncertainty, GradNorm,
  DWA, RLW);
- :mod:`modelfuse.losses.gradients`: gradient combinations (PCGrad, MGDA-UB, CAGrad,
  Nash-MTL, IMTL-G);
- :mod:`modelfuse.losses.distillation`: multi-teacher distillation with fixed, per-sample
  or learned teacher weights and an optional feature-matching term.
"""

from modelfuse.losses._base import (
    LossFusion,
    check_task_losses,
    get_loss_fusion,
    list_loss_fusions,
    masked_task_losses,
    register_loss_fusion,
)
from modelfuse.losses.distillation import (
    MultiTeacherDistillation,
    distillation_loss,
    get_teacher_weighting,
    list_teacher_weightings,
    register_teacher_weighting,
    teacher_log_weights,
    teacher_mixture,
)
from modelfuse.losses.gradients import (
    IMTLG,
    MGDA,
    CAGrad,
    GradientFusion,
    NashMTL,
    PCGrad,
)
from modelfuse.losses.weighting import (
    DynamicWeightAverage,
    EqualWeighting,
    FixedWeighting,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)

__all__ = [
    "IMTLG",
    "MGDA",
    "CAGrad",
    "DynamicWeightAverage",
    "EqualWeighting",
    "FixedWeighting",
    "GradNorm",
    "GradientFusion",
    "LossFusion",
    "MultiTeacherDistillation",
    "NashMTL",
    "PCGrad",
    "RandomLossWeighting",
    "UncertaintyWeighting",
    "check_task_losses",
    "distillation_loss",
    "get_loss_fusion",
    "get_teacher_weighting",
    "list_loss_fusions",
    "list_teacher_weightings",
    "masked_task_losses",
    "register_loss_fusion",
    "register_teacher_weighting",
    "teacher_log_weights",
    "teacher_mixture",
]
