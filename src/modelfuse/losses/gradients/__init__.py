"""Gradient-combination methods of loss fusion: K task gradients -> one update of the shared parameters.

Each module implements one paper (named with its equation in the docstring) and registers
itself with :func:`modelfuse.losses.register_loss_fusion`: ``pcgrad``, ``mgda``, ``cagrad``,
``nash_mtl``, ``imtl_g``. CAGrad and IMTL-G need the ``mtl`` extra
(``pip install 'modelfuse[mtl]'``); the others need only NumPy.
"""

from modelfuse.losses.gradients._base import GradientFusion, gramian_of, named_parameters_of
from modelfuse.losses.gradients.cagrad import CAGrad, cagrad_weights
from modelfuse.losses.gradients.imtl_g import IMTLG
from modelfuse.losses.gradients.mgda import MGDA, min_norm_weights
from modelfuse.losses.gradients.nash_mtl import NashMTL, nash_weights
from modelfuse.losses.gradients.pcgrad import PCGrad, pcgrad_weights

__all__ = [
    "IMTLG",
    "MGDA",
    "CAGrad",
    "GradientFusion",
    "NashMTL",
    "PCGrad",
    "cagrad_weights",
    "gramian_of",
    "min_norm_weights",
    "named_parameters_of",
    "nash_weights",
    "pcgrad_weights",
]
