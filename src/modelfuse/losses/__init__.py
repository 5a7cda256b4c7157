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

# gradient-combination methods (h-lossg)
from modelfuse.losses.gradients import (
    IMTLG,
    MGDA,
    CAGrad,
    GradientFusion,
    NashMTL,
    PCGrad,
)

__all__ += ["IMTLG", "MGDA", "CAGrad", "GradientFusion", "NashMTL", "PCGrad"]
