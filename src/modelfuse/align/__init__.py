"""Alignment of models before fusion (``modelfuse.align``), and the loss-barrier tool."""

from modelfuse.align.barrier import BarrierResult, interpolate, loss_barrier

__all__ = ["BarrierResult", "interpolate", "loss_barrier"]
