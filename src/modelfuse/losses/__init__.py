"""Loss fusion: one training objective from many task losses (and, later, many teachers).

See :mod:`modelfuse.losses._base` for the interface every method follows and
:mod:`modelfuse.losses.weighting` for the loss-weighting methods.
"""

from modelfuse.losses._base import (
    LossFusion,
    check_task_losses,
    get_loss_fusion,
    list_loss_fusions,
    masked_task_losses,
    register_loss_fusion,
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
    "DynamicWeightAverage",
    "EqualWeighting",
    "FixedWeighting",
    "GradNorm",
    "LossFusion",
    "RandomLossWeighting",
    "UncertaintyWeighting",
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
