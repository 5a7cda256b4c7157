"""Loss fusion: one training objective from many task losses (and, later, many teachers).

See :mod:`modelfuse.losses._base` for the interface every method follows.
"""

from modelfuse.losses._base import (
    LossFusion,
    check_task_losses,
    get_loss_fusion,
    list_loss_fusions,
    masked_task_losses,
    register_loss_fusion,
)

__all__ = [
    "LossFusion",
    "check_task_losses",
    "get_loss_fusion",
    "list_loss_fusions",
    "masked_task_losses",
    "register_loss_fusion",
]

# multi-teacher distillation (h-teach)
from modelfuse.losses.distillation import (
    MultiTeacherDistillation,
    distillation_loss,
    get_teacher_weighting,
    list_teacher_weightings,
    register_teacher_weighting,
    teacher_log_weights,
    teacher_mixture,
)

__all__ += [
    "MultiTeacherDistillation",
    "distillation_loss",
    "get_teacher_weighting",
    "list_teacher_weightings",
    "register_teacher_weighting",
    "teacher_log_weights",
    "teacher_mixture",
]
