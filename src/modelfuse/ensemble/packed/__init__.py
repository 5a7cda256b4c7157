"""Packed ensembles: K models of one architecture fused into one module that runs them in one pass.

``pack(members)`` traces member 0 with ``torch.fx`` and rewrites its graph so that every
activation carries all K members side by side along the channel dimension: member k's
tensor of shape (N, C, ...) is the slice ``[:, k*C:(k+1)*C]`` of the packed (N, K*C, ...).
Convolutions become grouped convolutions (groups times K), linear layers block-diagonal
batched matmuls, BatchNorm/GroupNorm/LayerNorm one layer over the K channel blocks, and
parameter-free layers run unchanged on the packed tensor. Each member's arithmetic is
exactly its own, so the outputs equal running the members one by one, in eval and in
train mode, and gradients reach each member's block as if trained separately. The point
is speed: one large kernel instead of K small ones (Laurent et al. 2023, "Packed-Ensembles
for Efficient Uncertainty Estimation", with alpha = 1, gamma = 1). Inputs that all members
share run once until they meet a member's weights; on CPU, 2-D convolution weights are kept
channels-last (maps of at most ``SMALL_MAP_PIXELS`` pixels excepted), ReLUs of fresh
activations run in place when no gradient is needed, wide groups run per member (see
``SPLIT_CHANNELS``), in eval mode a BatchNorm after a convolution is folded into it, and
large eval batches run in chunks (``CHUNK_SAMPLES``): measured choices
(``benchmarks/packed_ensemble.py``), none changes a value beyond float rounding.

The packed module returns the members' outputs stacked as (K, N, ...), the layout of
``Ensemble.member_outputs``, so ``Ensemble.combine_outputs`` and the registered combiners
apply as they are. Its ``state_dict`` has the members' keys, each tensor the members'
tensors concatenated along dim 0 (stacked for 0-dim ones), and ``unpack`` gives the K
ordinary modules back. Layers and graph operations whose effect on the channel blocks is
not known to be per member are refused, naming the module or graph node.

Modules: ``ops`` (the functions the packed graph calls), ``layers`` (the packed layers),
``support`` (what is supported), ``rewrite`` (the graph rewrite), ``module``
(``PackedEnsemble``, ``pack``, ``unpack``).
"""

from modelfuse.ensemble.packed.layers import (
    SMALL_MAP_PIXELS,
    SPLIT_CHANNELS,
    PackedBatchNorm,
    PackedConv1d,
    PackedConv2d,
    PackedConv3d,
    PackedLayerNorm,
    PackedLinear,
)
from modelfuse.ensemble.packed.module import CHUNK_SAMPLES, PackedEnsemble, pack, unpack
from modelfuse.ensemble.packed.support import supported_modules

__all__ = [
    "CHUNK_SAMPLES",
    "SMALL_MAP_PIXELS",
    "SPLIT_CHANNELS",
    "PackedBatchNorm",
    "PackedConv1d",
    "PackedConv2d",
    "PackedConv3d",
    "PackedEnsemble",
    "PackedLayerNorm",
    "PackedLinear",
    "pack",
    "supported_modules",
    "unpack",
]
