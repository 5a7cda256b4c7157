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
channels-last, ReLUs of fresh activations run in place when no gradient is needed, and
wide groups run per member (see ``SPLIT_CHANNELS``): measured choices, none changes a value.

The packed module returns the members' outputs stacked as (K, N, ...), the layout of
``Ensemble.member_outputs``, so ``Ensemble.combine_outputs`` and the registered combiners
apply as they are. Its ``state_dict`` has the members' keys, each tensor the members'
tensors concatenated along dim 0 (stacked for 0-dim ones), and ``unpack`` gives the K
ordinary modules back. Layers and graph operations whose effect on the channel blocks is
not known to be per member are refused, naming the module or graph node.
"""

from __future__ import annotations

import builtins
import copy
import inspect
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from modelfuse.ensemble.module import check_models
from modelfuse.errors import ConfigError, EnsembleError

__all__ = [
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


# ------------------------------------------------------------------------------------ runtime helpers
# The rewritten graph calls these functions; ``members`` is K, ``where`` the graph node they stand for.


def _member_view(x: torch.Tensor, members: int, where: str) -> torch.Tensor:
    """(N, K*C, ...) seen as (N, K, C, ...): member k's tensor is ``[:, k]``."""
    if x.dim() < 2 or x.shape[1] % members:
        raise EnsembleError(
            f"graph node {where!r}: a packed tensor of shape {tuple(x.shape)} does not split into "
            f"{members} member blocks along dim 1"
        )
    return x.view(x.shape[0], members, x.shape[1] // members, *x.shape[2:])


def _from_member_view(v: torch.Tensor, where: str) -> torch.Tensor:
    """(N, K, C, ...) back to the packed (N, K*C, ...); refuses member tensors without a dim 1."""
    if v.dim() < 3:
        raise EnsembleError(
            f"graph node {where!r} gives each member a tensor of shape {(v.shape[0], *v.shape[2:])}, "
            "without a dimension after the batch one: a packed ensemble keeps every activation's dim 1 "
            "(use keepdim=True, or end the model in a tensor of shape (N, outputs))"
        )
    return v.reshape(v.shape[0], v.shape[1] * v.shape[2], *v.shape[3:])


def _expand(x: torch.Tensor, members: int, where: str) -> torch.Tensor:
    """A tensor all members see alike (the input), repeated into the K channel blocks."""
    if x.dim() < 2:
        raise EnsembleError(
            f"graph node {where!r}: a tensor of shape {tuple(x.shape)} has no channel dimension to pack "
            "the members along; the input must be batched, (N, C, ...) or (N, features)"
        )
    return x.repeat(1, members, *([1] * (x.dim() - 2)))


def _stacked(x: torch.Tensor, members: int, where: str) -> torch.Tensor:
    """The packed output (N, K*C, ...) as the stacked members' outputs (K, N, C, ...)."""
    return _member_view(x, members, where).movedim(1, 0).contiguous()


def _binary(
    op: str,
    members: int,
    where: str,
    a: Any,
    b: Any,
    a_packed: bool,
    b_packed: bool,
    **kwargs: Any,
) -> Any:
    """``op(a, b)`` where at least one operand is packed; broadcasting is done per member.

    Equal shapes run as they are. Otherwise both packed operands must have the same number
    of dimensions (broadcasting aligns from the right, so (N, C) against (N, C, H, W) would
    pair the wrong dimensions) and are broadcast in their member views; an operand that is
    not packed must be a number or a one-element tensor.
    """
    fn = _BINARY_BY_NAME.get(op)
    call: Callable[..., Any] = fn if fn is not None else (lambda x, y, **kw: getattr(x, op)(y, **kw))
    for operand, packed in ((a, a_packed), (b, b_packed)):
        if not packed and isinstance(operand, torch.Tensor) and operand.numel() != 1:
            raise EnsembleError(
                f"graph node {where!r} combines a packed activation with a tensor of shape "
                f"{tuple(operand.shape)} that is the same for every member; only numbers and one-element "
                "tensors can be broadcast over the packed channel blocks"
            )
    if not (a_packed and b_packed) or a.shape == b.shape:
        return call(a, b, **kwargs)
    if a.dim() != b.dim():
        raise EnsembleError(
            f"graph node {where!r} broadcasts tensors of shapes {tuple(a.shape)} and {tuple(b.shape)} "
            "(packed); broadcasting between different numbers of dimensions cannot be packed"
        )
    out = call(_member_view(a, members, where), _member_view(b, members, where), **kwargs)
    return _from_member_view(out, where)


def _flatten(x: torch.Tensor, where: str, start_dim: int = 0, end_dim: int = -1) -> torch.Tensor:
    """``torch.flatten`` from a dim after the batch one: each member's block stays contiguous."""
    if start_dim % max(x.dim(), 1) == 0 and x.dim() > 0:
        raise EnsembleError(
            f"graph node {where!r} flattens from dim {start_dim}, the batch dimension, which would mix "
            "the members; flatten from dim 1 (torch.flatten(x, 1), nn.Flatten())"
        )
    return torch.flatten(x, start_dim, end_dim)


def _reshape(x: torch.Tensor, members: int, where: str, *shape: Any) -> torch.Tensor:
    """``x.reshape(shape)`` as written for one member, applied to each member's block.

    The member's target shape (after resolving -1) must keep the batch dimension and have
    a dim 1; its dim 1 then carries the K blocks, which stay contiguous.
    """
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    n = x.shape[0]
    per_member = x.numel() // members
    sizes = [int(s) for s in shape]
    if sizes.count(-1) == 1:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = per_member // known if known else 0
    if math.prod(sizes) != per_member or len(sizes) < 2 or sizes[0] != n:
        raise EnsembleError(
            f"graph node {where!r} reshapes a member's tensor of shape {tuple(_member_shape(x, members))} to "
            f"{tuple(shape)}: only reshapes that keep the batch dimension (size {n}) first and leave a "
            "dim 1, such as x.view(x.size(0), -1), can be packed"
        )
    return x.reshape(n, members * sizes[1], *sizes[2:])


def _member_shape(x: torch.Tensor, members: int) -> torch.Size:
    """The shape one member's tensor has: dim 1 divided by K."""
    return torch.Size((x.shape[0], x.shape[1] // members, *x.shape[2:]))


def _member_size(x: torch.Tensor, members: int, dim: int | None = None) -> Any:
    """``x.size(dim)`` as one member sees it."""
    shape = _member_shape(x, members)
    return shape if dim is None else shape[dim]


def _member_numel(x: torch.Tensor, members: int) -> int:
    return x.numel() // members


def _dim_op(
    x: torch.Tensor, members: int, where: str, op: str, dim: Any = None, **kwargs: Any
) -> torch.Tensor:
    """softmax / log_softmax / mean / sum / amax / amin over member dims, computed in the member view."""
    ndim = x.dim()
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):
        raise EnsembleError(
            f"graph node {where!r} applies {op} over all dimensions (no dim given); it mixes the batch and "
            "the members: give the dims explicitly"
        )
    dims = [int(d) % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
    if op not in ("softmax", "log_softmax") and 0 in dims and not kwargs.get("keepdim", False):
        raise EnsembleError(
            f"graph node {where!r} reduces ({op}) over the batch dimension without keepdim; this cannot be packed"
        )
    moved = [d + 1 if d > 0 else 0 for d in dims]
    v = _member_view(x, members, where)
    out = getattr(torch, op)(v, dim=moved if isinstance(dim, (tuple, list)) else moved[0], **kwargs)
    return _from_member_view(out, where)


def _relu(x: torch.Tensor, inplace: bool, fresh: bool) -> torch.Tensor:
    """ReLU, in place where the member asked for it or where ``x`` is a fresh activation used only
    here and no gradient will flow (in-place saves allocating, and page-faulting, a K-times larger tensor)."""
    if inplace or (fresh and not (torch.is_grad_enabled() and x.requires_grad)):
        return torch.relu_(x)
    return torch.relu(x)


def _check_pool_input(x: torch.Tensor, spatial: int, where: str) -> torch.Tensor:
    """Pooling over ``spatial`` dims must see a batched input (N, C, *spatial) to be per channel."""
    if x.dim() != spatial + 2:
        raise EnsembleError(
            f"graph node {where!r} pools a tensor of shape {tuple(x.shape)} ({x.dim()} dims) with a "
            f"{spatial}-d pooling; only batched inputs (N, C, {spatial} spatial dims) keep the members apart"
        )
    return x


def _pad(x: torch.Tensor, where: str, pad: Sequence[int], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.pad`` that pads only dims after dim 1 (padding channels would shift member blocks)."""
    if len(pad) // 2 > x.dim() - 2:
        raise EnsembleError(
            f"graph node {where!r} pads {len(pad) // 2} trailing dims of a {x.dim()}-d tensor, including "
            "the channel dim; only padding after dim 1 can be packed"
        )
    return F.pad(x, pad, *args, **kwargs)


# ------------------------------------------------------------------------------------ packed layers


def _cat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The members' tensors concatenated along dim 0 (stacked when 0-dim): the packed layout of every entry."""
    tensors = [t.detach() for t in tensors]
    return torch.stack(tensors) if tensors[0].dim() == 0 else torch.cat(tensors)


def _param(tensors: Sequence[torch.Tensor | None]) -> nn.Parameter | None:
    if tensors[0] is None:
        return None
    first = tensors[0]
    return nn.Parameter(_cat(tensors), requires_grad=first.requires_grad)


class PackedLinear(nn.Module):
    """K ``nn.Linear`` as one block-diagonal layer: ``weight`` (K*out, in), viewed as (K, out, in).

    On a 2-D packed input (N, K*in) each member's block goes through its own weight in one
    ``torch.baddbmm``; on an input all members share (the model's input), a plain
    ``F.linear`` with the stacked weight gives (N, K*out) directly. On inputs with more
    dims (N, K*C, ..., in) the weights act on the last dim, per member block.
    """

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        first = linears[0]
        self.num_members = len(linears)
        self.in_features, self.out_features = first.in_features, first.out_features
        self.weight = _param([m.weight for m in linears])
        self.bias = _param([m.bias for m in linears])

    def forward(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        k, i, o = self.num_members, self.in_features, self.out_features
        if shared:
            if x.dim() == 2:
                return F.linear(x, self.weight, self.bias)
            x = _expand(x, k, "linear")
        n = x.shape[0]
        w = self.weight.view(k, o, i).transpose(1, 2)  # (K, in, out)
        if x.dim() == 2:
            xs = x.view(n, k, i).transpose(0, 1)  # (K, N, in)
        else:
            xs = _member_view(x, k, "linear").movedim(1, 0).reshape(k, -1, i)  # (K, N*C*..., in)
        y = torch.bmm(xs, w) if self.bias is None else torch.baddbmm(self.bias.view(k, 1, o), xs, w)
        if x.dim() == 2:
            return y.transpose(0, 1).reshape(n, k * o)
        member = _member_shape(x, k)
        y = y.view(k, n, *member[1:-1], o).movedim(0, 1)
        return y.reshape(n, k * member[1], *member[2:-1], o)

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


# From this many input channels per group on, oneDNN's grouped convolution runs 2-3x slower on CPU than
# the K members' convolutions one by one (ResNet-18's last stages); such layers run per member there.
SPLIT_CHANNELS = 256


class _PackedConv:
    """Shared by the packed convolutions: K members' convolutions as one with groups times K.

    On CPU, groups of at least ``SPLIT_CHANNELS`` input channels run as K convolutions over the
    members' channel slices, concatenated, which oneDNN computes faster than one grouped call.
    """

    num_members: int
    _member_groups: int

    @classmethod
    def from_members(cls, convs: Sequence[nn.modules.conv._ConvNd]) -> Any:
        first = convs[0]
        k = len(convs)
        packed = cls(
            k * first.in_channels,
            k * first.out_channels,
            first.kernel_size,
            stride=first.stride,
            padding=first.padding,
            dilation=first.dilation,
            groups=k * first.groups,
            bias=first.bias is not None,
            padding_mode=first.padding_mode,
            device="meta",
        )
        packed.num_members = k
        packed._member_groups = first.groups
        packed.weight = _param([m.weight for m in convs])
        packed.bias = _param([m.bias for m in convs])
        return packed

    def forward(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """``shared``: ``x`` is the same for all members and each member's convolution has groups=1,
        so one ordinary convolution with the K weights stacked gives the packed output."""
        conv = self._conv_fn
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding: Any = 0
        else:
            padding = self.padding
        k = self.num_members
        if shared or x.device.type != "cpu" or self.in_channels // self.groups < SPLIT_CHANNELS:
            groups = self._member_groups if shared else self.groups
            return conv(x, self.weight, self.bias, self.stride, padding, self.dilation, groups)
        xs = [xi.contiguous() for xi in x.chunk(k, dim=1)]  # oneDNN is slow on strided (channels-last) slices
        ws = self.weight.chunk(k, dim=0)
        bs = self.bias.chunk(k, dim=0) if self.bias is not None else [None] * k
        outs = [
            conv(xi, wi, bi, self.stride, padding, self.dilation, self._member_groups)
            for xi, wi, bi in zip(xs, ws, bs)
        ]
        return torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, " + nn.modules.conv._ConvNd.extra_repr(self)


class PackedConv1d(_PackedConv, nn.Conv1d):
    """K ``nn.Conv1d`` as one grouped ``nn.Conv1d`` (channels and groups times K)."""

    _conv_fn = staticmethod(F.conv1d)


class PackedConv2d(_PackedConv, nn.Conv2d):
    """K ``nn.Conv2d`` as one grouped ``nn.Conv2d`` (channels and groups times K)."""

    _conv_fn = staticmethod(F.conv2d)


class PackedConv3d(_PackedConv, nn.Conv3d):
    """K ``nn.Conv3d`` as one grouped ``nn.Conv3d`` (channels and groups times K)."""

    _conv_fn = staticmethod(F.conv3d)


class PackedBatchNorm(nn.Module):
    """K BatchNorms (1d/2d/3d) over C channels as one over K*C channels.

    BatchNorm is per channel, so batch statistics, running statistics and the affine map of
    channel block k are member k's own, in train and eval mode. ``num_batches_tracked``
    keeps one count per member (shape (K,)), so that ``unpack`` restores each exactly; with
    ``momentum=None`` (cumulative averages) each member's block uses its own count.
    """

    def __init__(self, norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        first = norms[0]
        self.num_members = len(norms)
        self.num_features = len(norms) * first.num_features
        self.eps, self.momentum = first.eps, first.momentum
        self.affine, self.track_running_stats = first.affine, first.track_running_stats
        self.weight = _param([m.weight for m in norms])
        self.bias = _param([m.bias for m in norms])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            values = [getattr(m, name) for m in norms]
            self.register_buffer(name, None if values[0] is None else _cat(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        per_member: torch.Tensor | None = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                counts = self.num_batches_tracked
                if bool((counts == counts[0]).all()):
                    factor = 1.0 / float(counts[0])
                else:
                    per_member = 1.0 / counts.to(torch.float64)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        if per_member is None:
            return F.batch_norm(
                x,
                self.running_mean if track else None,
                self.running_var if track else None,
                self.weight,
                self.bias,
                bn_training,
                factor,
                self.eps,
            )
        # cumulative averages with members at different counts: update each block with its own factor
        out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        with torch.no_grad():
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dims)
            var = x.var(dims, correction=1)
            f = per_member.repeat_interleave(self.num_features // self.num_members).to(mean.dtype)
            self.running_mean.mul_(1 - f).add_(f * mean)
            self.running_var.mul_(1 - f).add_(f * var)
        return out

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, {self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


def _group_norm(norms: Sequence[nn.GroupNorm]) -> nn.GroupNorm:
    """K GroupNorms as one with K times the groups: each group lies inside one member's channel block."""
    first, k = norms[0], len(norms)
    packed = nn.GroupNorm(
        k * first.num_groups, k * first.num_channels, first.eps, first.affine, device="meta"
    )
    packed.weight = _param([m.weight for m in norms])
    packed.bias = _param([m.bias for m in norms])
    return packed


class PackedLayerNorm(nn.Module):
    """K LayerNorms: normalised in the member view (N, K, C, ...), then each block's own affine map.

    ``weight`` and ``bias`` are the members' concatenated along dim 0, viewed as (K, *shape).
    Normalising over the channel dim is per member because the view separates the blocks.
    """

    def __init__(self, norms: Sequence[nn.LayerNorm]) -> None:
        super().__init__()
        first = norms[0]
        self.num_members = len(norms)
        self.normalized_shape = tuple(first.normalized_shape)
        self.eps = first.eps
        self.weight = _param([m.weight for m in norms])
        self.bias = _param([m.bias for m in norms])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, shape = self.num_members, self.normalized_shape
        if x.dim() - len(shape) < 1:
            raise EnsembleError(
                f"LayerNorm over {shape} of a {x.dim()}-d input normalises across the batch dimension; "
                "this cannot be packed"
            )
        v = F.layer_norm(_member_view(x, k, "layer_norm"), shape, None, None, self.eps)
        lead = (1, k, *([1] * (v.dim() - 2 - len(shape))))
        if self.weight is not None:
            v = v * self.weight.view(*lead, *shape)
        if self.bias is not None:
            v = v + self.bias.view(*lead, *shape)
        return _from_member_view(v, "layer_norm")

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, {self.normalized_shape}, eps={self.eps}"


# ------------------------------------------------------------------------------------ what is supported

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
)
_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_POOL_MODULES: dict[type[nn.Module], int] = {
    nn.MaxPool1d: 1,
    nn.MaxPool2d: 2,
    nn.MaxPool3d: 3,
    nn.AvgPool1d: 1,
    nn.AvgPool2d: 2,
    nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveMaxPool3d: 3,
    nn.LPPool1d: 1,
    nn.LPPool2d: 2,
}
_PACKED_MODULES: dict[type[nn.Module], Callable[[Sequence[Any]], nn.Module]] = {
    nn.Linear: PackedLinear,
    nn.Conv1d: PackedConv1d.from_members,
    nn.Conv2d: PackedConv2d.from_members,
    nn.Conv3d: PackedConv3d.from_members,
    nn.BatchNorm1d: PackedBatchNorm,
    nn.BatchNorm2d: PackedBatchNorm,
    nn.BatchNorm3d: PackedBatchNorm,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: PackedLayerNorm,
}
_SOFTMAX_MODULES = {nn.Softmax: "softmax", nn.LogSoftmax: "log_softmax"}

_ELEMENTWISE_FUNCTIONS: set[Any] = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu_,
    F.relu6,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.leaky_relu,
    F.softplus,
    F.softsign,
    F.tanhshrink,
    F.logsigmoid,
    F.sigmoid,
    F.tanh,
    torch.sigmoid,
    torch.tanh,
    torch.exp,
    torch.log,
    torch.abs,
    torch.neg,
    torch.sqrt,
    torch.rsqrt,
    torch.square,
    torch.clamp,
    torch.clip,
    torch.erf,
    operator.neg,
    operator.pos,
    operator.abs,
    F.interpolate,
}
_DROPOUT_FUNCTIONS: set[Any] = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
_POOL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
    F.lp_pool1d: 1,
    F.lp_pool2d: 2,
}
_BINARY_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
# the rewritten graph names a binary function by a string (generated code cannot spell a function value)
_BINARY_BY_NAME: dict[str, Any] = {f"{fn.__module__}.{fn.__name__}": fn for fn in _BINARY_FUNCTIONS}
_INPLACE_BINARY = {
    f"{fn.__module__}.{fn.__name__}"
    for fn in (operator.iadd, operator.isub, operator.imul, operator.itruediv)
}
_ELEMENTWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "exp_",
    "log",
    "abs",
    "neg",
    "sqrt",
    "rsqrt",
    "square",
    "erf",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "contiguous",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "detach",
    "clone",
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
# op -> (runtime name, parameter names after the input, in positional order)
_DIM_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.softmax: ("softmax", ("dim", "_stacklevel", "dtype")),
    F.log_softmax: ("log_softmax", ("dim", "_stacklevel", "dtype")),
    torch.softmax: ("softmax", ("dim", "dtype")),
    torch.log_softmax: ("log_softmax", ("dim", "dtype")),
    torch.mean: ("mean", ("dim", "keepdim", "dtype")),
    torch.sum: ("sum", ("dim", "keepdim", "dtype")),
    torch.amax: ("amax", ("dim", "keepdim")),
    torch.amin: ("amin", ("dim", "keepdim")),
}
_DIM_METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "softmax": ("softmax", ("dim", "dtype")),
    "log_softmax": ("log_softmax", ("dim", "dtype")),
    "mean": ("mean", ("dim", "keepdim", "dtype")),
    "sum": ("sum", ("dim", "keepdim", "dtype")),
    "amax": ("amax", ("dim", "keepdim")),
    "amin": ("amin", ("dim", "keepdim")),
}
_TENSOR_ATTRIBUTES = {"dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}
_RANDOM_FUNCTIONS: set[Any] = {
    torch.rand,
    torch.randn,
    torch.randint,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.randperm,
    torch.bernoulli,
    torch.normal,
    torch.multinomial,
    torch.poisson,
}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_", "multinomial"}
_PLAIN_MODULES = {"_operator", "operator", "math", "builtins"}  # functions of Python values (sizes, ints)


def supported_modules() -> list[str]:
    """Names of the module types ``pack`` accepts (exact types: subclasses may change ``forward``)."""
    types = [*_PACKED_MODULES, *_ELEMENTWISE_MODULES, *_DROPOUT_MODULES, *_POOL_MODULES, *_SOFTMAX_MODULES]
    return sorted({t.__name__ for t in types} | {"Flatten"})


# ------------------------------------------------------------------------------------ the graph rewrite

PACKED, SHARED, META = "packed", "shared", "meta"  # what a value of the rewritten graph is


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
        module = getattr(target, "__module__", None)
        return f"call_function {module + '.' if module else ''}{name}"
    if node.op == "call_method":
        return f"call_method Tensor.{target}"
    return f"{node.op} {target}"


class _Rewriter:
    """Builds the packed graph from member 0's traced graph, node by node.

    Every value of the new graph has a kind: PACKED (a tensor carrying the K member blocks
    along dim 1), SHARED (a tensor all members see alike: the inputs and what is computed
    from them alone, which runs once, unpacked) or META (sizes, numbers, dtypes). A SHARED
    tensor is expanded into K blocks where it meets a member's parameters or a PACKED value.
    """

    def __init__(
        self, members: Sequence[nn.Module], traced: fx.GraphModule, existing: nn.Module | None = None
    ) -> None:
        """``existing``: a PackedEnsemble whose layers to reuse (rebuilding its forward after unpickling)."""
        self.members = list(members)
        self.k = len(self.members)
        self.traced = traced
        self.existing = existing
        self.graph = fx.Graph()
        self.env: dict[fx.Node, tuple[Any, str]] = {}
        self.expanded: dict[fx.Node, fx.Node] = {}
        self.modules: dict[str, nn.Module] = {}
        self.packed_modules: dict[str, nn.Module] = {}
        self.fresh: set[fx.Node] = set()  # old nodes whose new value is a tensor made by the node itself

    # -- helpers
    def own_module(self, target: str) -> nn.Module | None:
        """When rebuilding, the ensemble's module at ``target`` (None where it has none)."""
        if self.existing is None:
            return None
        try:
            return self.existing.get_submodule(target)
        except AttributeError:  # a layer the forward ran as a function (ReLU, Flatten)
            return None

    def refuse(self, node: fx.Node, why: str) -> EnsembleError:
        return EnsembleError(f"cannot pack graph node {node.name!r} ({_describe(node)}): {why}")

    def value(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: self.env[n][0])

    def kinds(self, *args: Any) -> set[str]:
        return {self.env[n][1] for a in args for n in _nodes_in(a)}

    def packed(self, arg: fx.Node) -> fx.Node:
        """``arg`` as a PACKED value of the new graph (a SHARED one is expanded, once)."""
        new, kind = self.env[arg]
        if kind == PACKED:
            return new
        if kind != SHARED:
            raise EnsembleError(f"graph node {arg.name!r} is not a tensor of activations")
        if arg not in self.expanded:
            self.expanded[arg] = self.graph.call_function(_expand, (new, self.k, arg.name))
        return self.expanded[arg]

    def emit(self, node: fx.Node, new: Any, kind: str) -> None:
        if isinstance(new, fx.Node):
            new.meta.update(node.meta)
        self.env[node] = (new, kind)

    def passthrough(self, node: fx.Node) -> bool:
        """Copy ``node`` unchanged when it sees no PACKED value (SHARED/META inputs only); True if done."""
        kinds = self.kinds(node.args, node.kwargs)
        if PACKED in kinds:
            return False
        new = self.graph.node_copy(node, lambda n: self.env[n][0])
        self.emit(node, new, SHARED if SHARED in kinds else META)
        return True

    def first_tensor_only(self, node: fx.Node) -> None:
        """Refuse when an argument other than the first is an activation (only constants may follow)."""
        rest = (node.args[1:], node.kwargs)
        if self.kinds(*rest) - {META}:
            raise self.refuse(node, "only its first argument may be an activation")

    def call(self, fn: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs or {})

    # -- the rewrite
    def run(self) -> fx.Graph:
        for node in self.traced.graph.nodes:
            getattr(self, f"do_{node.op}")(node)
        return self.graph

    def do_placeholder(self, node: fx.Node) -> None:
        default = node.args[0] if node.args else inspect.Signature.empty
        new = self.graph.placeholder(str(node.target), type_expr=node.type, default_value=default)
        self.emit(node, new, SHARED)

    def do_get_attr(self, node: fx.Node) -> None:
        raise self.refuse(
            node,
            "the forward reads a parameter, buffer or constant tensor directly; only modules that pack "
            "(see supported_modules()) may hold a member's tensors",
        )

    def do_output(self, node: fx.Node) -> None:
        (result,) = node.args
        if not isinstance(result, fx.Node):
            raise self.refuse(
                node,
                f"the model returns a {type(result).__name__}; pack needs a model that returns one tensor",
            )
        self.graph.output(self.call(_stacked, (self.packed(result), self.k, node.name)))

    def relu(self, node: fx.Node, arg: fx.Node, inplace: bool) -> None:
        """A ReLU of a PACKED value, in place at run time where that is safe (see ``_relu``)."""
        fresh = arg in self.fresh and len(arg.users) == 1
        self.emit(node, self.call(_relu, (self.packed(arg), inplace, fresh)), PACKED)
        if fresh:
            self.fresh.add(node)

    def do_call_module(self, node: fx.Node) -> None:
        target = str(node.target)
        module = self.traced.get_submodule(target)
        cls = type(module)
        supported = (
            cls in _PACKED_MODULES
            or cls in _ELEMENTWISE_MODULES
            or cls in _DROPOUT_MODULES
            or cls in _POOL_MODULES
            or cls in _SOFTMAX_MODULES
            or cls is nn.Flatten
        )
        if not supported:
            raise EnsembleError(
                f"cannot pack module {target!r} of type {cls.__module__}.{cls.__qualname__}: pack supports "
                f"{', '.join(supported_modules())} (exact types)"
            )
        if len(node.args) != 1 or node.kwargs:
            raise self.refuse(node, "a module called with more than one argument cannot be packed")
        (arg,) = node.args
        kind = self.env[arg][1] if isinstance(arg, fx.Node) else META
        if kind == META:
            raise self.refuse(node, "its input is not an activation tensor")
        if cls is nn.Flatten:
            if kind == SHARED:
                new = self.call(torch.flatten, (self.env[arg][0], module.start_dim, module.end_dim))
            else:
                new = self.call(_flatten, (self.packed(arg), node.name, module.start_dim, module.end_dim))
            return self.emit(node, new, kind)
        if cls in _SOFTMAX_MODULES:
            op = _SOFTMAX_MODULES[cls]
            if kind == SHARED:
                new = self.call(getattr(torch, op), (self.env[arg][0], module.dim))
            else:
                new = self.call(_dim_op, (self.packed(arg), self.k, node.name, op, module.dim))
            return self.emit(node, new, kind)
        if cls in _PACKED_MODULES:
            if target not in self.packed_modules:
                own = self.own_module(target)
                self.packed_modules[target] = (
                    own
                    if own is not None
                    else _PACKED_MODULES[cls]([m.get_submodule(target) for m in self.members])
                )
            self.modules[target] = self.packed_modules[target]
            # an input all members share meets the stacked weights once, without being repeated; not for
            # convolutions of one input channel, which run faster as grouped (depthwise-like) ones
            # over the repeated input
            conv = cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            if kind == SHARED and (
                cls is nn.Linear or (conv and module.groups == 1 and module.in_channels > 1)
            ):
                new = self.graph.call_module(target, (self.env[arg][0],), {"shared": True})
            else:
                new = self.graph.call_module(target, (self.packed(arg),))
            self.fresh.add(node)
            return self.emit(node, new, PACKED)
        # parameter-free layers: an own copy (a module may be called more than once)
        if target not in self.modules:
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                raise self.refuse(node, "this layer type is expected to hold no parameters or buffers")
            if cls in _POOL_MODULES and getattr(module, "return_indices", False):
                raise self.refuse(
                    node, "pooling with return_indices=True returns a tuple and cannot be packed"
                )
            own = self.own_module(target)
            self.modules[target] = own if own is not None else copy.deepcopy(module)
        if kind == SHARED and cls not in _DROPOUT_MODULES:
            new = self.graph.call_module(target, (self.env[arg][0],))
            return self.emit(node, new, SHARED)
        if cls is nn.ReLU:
            return self.relu(node, arg, module.inplace)
        x = self.packed(arg)
        if cls in _POOL_MODULES:
            x = self.call(_check_pool_input, (x, _POOL_MODULES[cls], node.name))
        return self.emit(node, self.graph.call_module(target, (x,)), PACKED)

    def do_call_function(self, node: fx.Node) -> None:
        fn = node.target
        if fn in _RANDOM_FUNCTIONS:
            raise self.refuse(
                node, "random tensors would be drawn once for all members or in a different order"
            )
        if self.passthrough(node):
            return
        args, kwargs = node.args, node.kwargs
        if fn in _BINARY_FUNCTIONS:
            return self.binary(node, fn)
        if fn in (torch.relu, F.relu) and len(args) == 1 and not kwargs.get("inplace", False):
            return self.relu(node, args[0], False)
        if fn in _ELEMENTWISE_FUNCTIONS or fn in _DROPOUT_FUNCTIONS:
            self.first_tensor_only(node)
            return self.emit(
                node,
                self.call(fn, (self.packed(args[0]), *self.value(args[1:])), self.value(kwargs)),
                PACKED,
            )
        if fn in _POOL_FUNCTIONS:
            self.first_tensor_only(node)
            if self.value(kwargs).get("return_indices") or (len(args) > 5 and args[5] is True):
                raise self.refuse(
                    node, "pooling with return_indices=True returns a tuple and cannot be packed"
                )
            x = self.call(_check_pool_input, (self.packed(args[0]), _POOL_FUNCTIONS[fn], node.name))
            return self.emit(node, self.call(fn, (x, *self.value(args[1:])), self.value(kwargs)), PACKED)
        if fn is torch.flatten:
            self.first_tensor_only(node)
            x = self.packed(args[0])
            return self.emit(
                node,
                self.call(_flatten, (x, node.name, *self.value(args[1:])), self.value(kwargs)),
                PACKED,
            )
        if fn is torch.reshape:
            self.first_tensor_only(node)
            x = self.packed(args[0])
            shape = self.value(args[1] if len(args) > 1 else kwargs["shape"])
            return self.emit(node, self.call(_reshape, (x, self.k, node.name, shape)), PACKED)
        if fn is F.pad:
            self.first_tensor_only(node)
            x = self.packed(args[0])
            return self.emit(
                node, self.call(_pad, (x, node.name, *self.value(args[1:])), self.value(kwargs)), PACKED
            )
        if fn in _DIM_FUNCTIONS:
            return self.dim_op(node, *_DIM_FUNCTIONS[fn])
        if fn is builtins.getattr:
            return self.attribute(node)
        raise self.refuse(node, self.unsupported_hint(node))

    def do_call_method(self, node: fx.Node) -> None:
        name = str(node.target)
        if name in _RANDOM_METHODS:
            raise self.refuse(
                node, "random tensors would be drawn once for all members or in a different order"
            )
        if self.passthrough(node):
            return
        args, kwargs = node.args, node.kwargs
        self_kind = self.env[args[0]][1] if isinstance(args[0], fx.Node) else META
        if self_kind == META:
            raise self.refuse(node, "a method of a constant tensor applied to an activation cannot be packed")
        if name in _BINARY_METHODS:
            return self.binary(node, name)
        if name == "relu" and len(args) == 1 and not kwargs:
            return self.relu(node, args[0], False)
        if name in _ELEMENTWISE_METHODS:
            self.first_tensor_only(node)
            new = self.graph.call_method(
                name, (self.packed(args[0]), *self.value(args[1:])), self.value(kwargs)
            )
            return self.emit(node, new, PACKED)
        if name == "flatten":
            self.first_tensor_only(node)
            x = self.packed(args[0])
            return self.emit(
                node,
                self.call(_flatten, (x, node.name, *self.value(args[1:])), self.value(kwargs)),
                PACKED,
            )
        if name in ("view", "reshape"):
            self.first_tensor_only(node)
            if kwargs:
                raise self.refuse(node, "give the shape positionally")
            x = self.packed(args[0])
            return self.emit(node, self.call(_reshape, (x, self.k, node.name, *self.value(args[1:]))), PACKED)
        if name == "size":
            x = self.packed(args[0])
            return self.emit(
                node,
                self.call(_member_size, (x, self.k, *self.value(args[1:])), self.value(kwargs)),
                META,
            )
        if name == "numel":
            return self.emit(node, self.call(_member_numel, (self.packed(args[0]), self.k)), META)
        if name == "dim":
            return self.emit(node, self.graph.call_method("dim", (self.packed(args[0]),)), META)
        if name in _DIM_METHODS:
            return self.dim_op(node, *_DIM_METHODS[name])
        raise self.refuse(node, self.unsupported_hint(node))

    def binary(self, node: fx.Node, op: Any) -> None:
        if not isinstance(op, str):
            op = f"{op.__module__}.{op.__name__}"
            assert op in _BINARY_BY_NAME
        if len(node.args) != 2:
            raise self.refuse(node, "expected two operands")
        a, b = node.args
        operands, flags = [], []
        for arg in (a, b):
            kind = self.env[arg][1] if isinstance(arg, fx.Node) else META
            if kind == META:
                if not isinstance(arg, (fx.Node, int, float, bool)):
                    raise self.refuse(node, f"an operand of type {type(arg).__name__} cannot be packed")
                operands.append(self.value(arg))
                flags.append(False)
            else:
                operands.append(self.packed(arg))
                flags.append(True)
        new = self.call(_binary, (op, self.k, node.name, *operands, *flags), self.value(node.kwargs))
        self.emit(node, new, PACKED)
        if op not in _INPLACE_BINARY and not op.endswith("_"):  # out of place: a new tensor
            self.fresh.add(node)

    def dim_op(self, node: fx.Node, op: str, names: tuple[str, ...]) -> None:
        self.first_tensor_only(node)
        given = dict(zip(names, node.args[1:]))
        given.update(node.kwargs)
        unknown = set(given) - set(names)
        if unknown:
            raise self.refuse(node, f"unexpected arguments {sorted(unknown)}")
        given.pop("_stacklevel", None)
        given = {key: val for key, val in self.value(given).items() if not (key == "dtype" and val is None)}
        x = self.packed(node.args[0])
        self.emit(node, self.call(_dim_op, (x, self.k, node.name, op), given), PACKED)

    def attribute(self, node: fx.Node) -> None:
        x, name = node.args[0], node.args[1]
        if name == "shape":
            return self.emit(node, self.call(_member_shape, (self.packed(x), self.k)), META)
        if name in _TENSOR_ATTRIBUTES:
            return self.emit(node, self.call(builtins.getattr, (self.packed(x), name)), META)
        raise self.refuse(node, f"the tensor attribute {name!r} is not known to be per member")

    def unsupported_hint(self, node: fx.Node) -> str:
        target = node.target
        if node.op == "call_function" and getattr(target, "__module__", None) in _PLAIN_MODULES:
            return "a Python operation on an activation tensor (indexing, slicing, ...) is not known to keep the members apart"
        return (
            "this operation is not known to keep each member's channel block apart (concatenation, "
            "transposes, indexing and matrix products across channels mix the members)"
        )


# ------------------------------------------------------------------------------------ checks


def _entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by qualified name, in registration order."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.named_parameters(remove_duplicate=False):
        out[name] = t
    for name, t in module.named_buffers(remove_duplicate=False):
        out[name] = t
    return out


def _trace(member: nn.Module, index: int) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(member)
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        raise EnsembleError(
            f"member {index} ({type(member).__qualname__}) cannot be traced with torch.fx.symbolic_trace, "
            f"which pack needs to rewrite its forward: {type(exc).__name__}: {exc}"
        ) from exc


def _signature(gm: fx.GraphModule) -> list[tuple[str, str, str, str, str]]:
    return [(n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in gm.graph.nodes]


def _check_members(members: Sequence[nn.Module]) -> list[nn.Module]:
    """The members as a list, refused unless they share one architecture, device and per-tensor dtypes."""
    if isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList):
        raise ConfigError("pack takes a sequence of models, not one model; pass [model1, model2, ...]")
    members = check_models(members, purpose="pack")
    ref = members[0]
    ref_entries = _entries(ref)
    seen: dict[int, str] = {}
    for name, t in ref_entries.items():
        key = id(t)
        if key in seen:
            raise EnsembleError(
                f"member 0 uses one tensor under two names ({seen[key]!r} and {name!r}): tied parameters "
                "cannot be packed"
            )
        seen[key] = name
    devices = {t.device for t in ref_entries.values()}
    if len(devices) > 1:
        raise EnsembleError(
            f"member 0 has parameters and buffers on several devices ({sorted(map(str, devices))}); "
            "move each member to one device"
        )
    for i, m in enumerate(members[1:], start=1):
        if type(m) is not type(ref):
            raise EnsembleError(
                f"member {i} is a {type(m).__qualname__}, member 0 a {type(ref).__qualname__}: packed members "
                "must share one architecture"
            )
        entries = _entries(m)
        for name, t0 in ref_entries.items():
            t = entries.get(name)
            if t is None:
                raise EnsembleError(
                    f"members differ at parameter {name!r}: shape {tuple(t0.shape)} in member 0, absent in "
                    f"member {i}; packed members must share one architecture"
                )
            if t.shape != t0.shape:
                raise EnsembleError(
                    f"members differ at parameter {name!r}: shape {tuple(t0.shape)} in member 0 but "
                    f"{tuple(t.shape)} in member {i}; packed members must share one architecture"
                )
        extra = [name for name in entries if name not in ref_entries]
        if extra:
            raise EnsembleError(
                f"members differ at parameter {extra[0]!r}: absent in member 0, shape "
                f"{tuple(entries[extra[0]].shape)} in member {i}; packed members must share one architecture"
            )
        for name, t0 in ref_entries.items():
            t = entries[name]
            if t.dtype != t0.dtype or t.device != t0.device:
                raise EnsembleError(
                    f"member {i}'s {name!r} is {t.dtype} on {t.device}, member 0's {t0.dtype} on {t0.device}: "
                    "move all members to one device and dtype first (model.to(device, dtype))"
                )
        ref_modules, modules = dict(ref.named_modules()), dict(m.named_modules())
        for name, mod0 in ref_modules.items():
            mod = modules.get(name)
            label = name or "(the model itself)"
            if mod is None or type(mod) is not type(mod0):
                found = "absent" if mod is None else type(mod).__qualname__
                raise EnsembleError(
                    f"members differ at module {label!r}: {type(mod0).__qualname__} in member 0, {found} in "
                    f"member {i}"
                )
            if mod.extra_repr() != mod0.extra_repr():
                raise EnsembleError(
                    f"members differ at module {label!r}: {type(mod0).__qualname__}({mod0.extra_repr()}) in "
                    f"member 0, ({mod.extra_repr()}) in member {i}"
                )
        extra = [name for name in modules if name not in ref_modules]
        if extra:
            raise EnsembleError(
                f"members differ at module {extra[0]!r}: absent in member 0, present in member {i}"
            )
    return members


# ------------------------------------------------------------------------------------ the module


class PackedEnsemble(nn.Module):
    """K trained models of one architecture run as one module; ``forward`` returns (K, N, ...).

    Build it with ``pack(members)`` (or ``PackedEnsemble(members)``). It computes exactly the
    members' outputs, stacked as ``Ensemble.member_outputs`` stacks them, in one pass with
    K-times-wider layers. Train/eval mode applies as in the members (BatchNorm statistics per
    member, dropout masks drawn independently); it starts in member 0's mode. ``state_dict``:
    the members' keys, each tensor the members' concatenated along dim 0. ``unpack()`` returns
    the K members as ordinary modules.
    """

    def __init__(self, members: Sequence[nn.Module], *, channels_last: bool | None = None) -> None:
        super().__init__()
        members = _check_members(members)
        traced = _trace(members[0], 0)
        reference = _signature(traced)
        for i, m in enumerate(members[1:], start=1):
            other = _signature(_trace(m, i))
            if other != reference:
                diff = next(
                    (j for j, (a, b) in enumerate(zip(reference, other)) if a != b),
                    min(len(reference), len(other)),
                )
                where = reference[diff][0] if diff < len(reference) else other[diff][0]
                raise EnsembleError(
                    f"members differ in their forward at graph node {where!r} (member 0 vs member {i}): packed "
                    "members must compute the same graph"
                )
        rewriter = _Rewriter(members, traced)
        graph = rewriter.run()
        root: dict[str, Any] = dict(rewriter.modules)
        gm = fx.GraphModule(root, graph, class_name="PackedForward")
        self.num_members = len(members)
        self._add_unused_entries(gm, members, rewriter.packed_modules)
        # the generated forward (a GraphModule, not registered) calls the same submodule objects
        # that are registered here, so state_dict, .to(), .train() and parameters() see them
        for name, child in gm.named_children():
            if hasattr(self, name):
                raise EnsembleError(
                    f"member 0 has a top-level submodule named {name!r}, a PackedEnsemble attribute"
                )
            self.add_module(name, child)
        self.__dict__["_forward_module"] = gm
        convs2d = [
            m
            for m in rewriter.packed_modules.values()
            if isinstance(m, PackedConv2d) and m.in_channels // m.groups < SPLIT_CHANNELS  # not split ones
        ]
        if channels_last is None:
            channels_last = bool(convs2d) and all(m.weight.device.type == "cpu" for m in convs2d)
        if channels_last:
            for conv in convs2d:  # a channels-last weight makes the convolution's output channels-last
                # (empty_like + copy_: .contiguous() keeps the strides of weights with one input channel,
                # which count as channels-last already but make the convolution pick NCHW)
                weight = conv.weight.data
                conv.weight.data = torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)
        self.__dict__["_template"] = _meta_copy(members[0])
        self.train(members[0].training)

    def _add_unused_entries(
        self, gm: fx.GraphModule, members: Sequence[nn.Module], packed: dict[str, nn.Module]
    ) -> None:
        """Parameters and buffers the forward never reaches, kept (concatenated) so that ``unpack`` is exact."""
        covered = {f"{prefix}.{name}" for prefix, mod in packed.items() for name in _entries(mod)}
        ref = members[0]
        non_persistent = {
            f"{prefix}.{name}" if prefix else name
            for prefix, mod in ref.named_modules()
            for name in mod._non_persistent_buffers_set
        }
        params = dict(ref.named_parameters())
        all_entries = [_entries(m) for m in members]
        for name, t0 in all_entries[0].items():
            if name in covered:
                continue
            owner_path, _, leaf = name.rpartition(".")
            owner: nn.Module = gm if owner_path else self  # top-level entries go on the ensemble itself
            for part in owner_path.split(".") if owner_path else []:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            value = _cat(e[name] for e in all_entries)
            if name in params:
                owner.register_parameter(leaf, nn.Parameter(value, requires_grad=t0.requires_grad))
            else:
                owner.register_buffer(leaf, value, persistent=name not in non_persistent)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._forward_module(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # the generated forward does not pickle (torch.fx would retrace it through the runtime
        # checks); it is rebuilt from the architecture template and this module's own layers
        state = self.__dict__.copy()
        state.pop("_forward_module", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        template = self._template
        rewriter = _Rewriter([template] * self.num_members, _trace(template, 0), existing=self)
        self.__dict__["_forward_module"] = fx.GraphModule(self, rewriter.run(), class_name="PackedForward")

    @property
    def code(self) -> str:
        """The Python code of the packed forward (for reading what pack made of the model)."""
        return self._forward_module.code

    def unpack(self) -> list[nn.Module]:
        """The K members as ordinary modules (see :func:`unpack`)."""
        return unpack(self)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}"


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for t in _entries(module).values():
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
        )
    return copy.deepcopy(module, memo)


def pack(members: Sequence[nn.Module], *, channels_last: bool | None = None) -> PackedEnsemble:
    """Fuse K models of one architecture into a :class:`PackedEnsemble` that returns their outputs (K, N, ...).

    Members must share architecture, device and dtypes; their modules must be of the types in
    :func:`supported_modules` and their forward traceable with ``torch.fx`` and made of
    operations that keep each member's channel block apart. Errors name the first
    differing parameter, or the unsupported module or graph node. The members are not changed.

    ``channels_last``: store 2-D convolution weights channels-last, so that activations flow
    in that memory format (values are the same; on CPU, grouped convolutions and pooling run
    faster so). Default: on where the members have ``Conv2d`` layers and live on the CPU.
    """
    return PackedEnsemble(members, channels_last=channels_last)


def unpack(packed: PackedEnsemble) -> list[nn.Module]:
    """The K members of ``packed`` as ordinary modules of the original architecture.

    Each is a copy of member 0's architecture holding its own slice of every packed parameter
    and buffer (BatchNorm running statistics and batch counts included), with the packed
    tensors' device and dtype (after ``packed.to(...)``, the members follow), in the packed
    module's train/eval mode; ``pack`` followed by ``unpack`` gives the members' tensors back
    exactly.
    """
    if not isinstance(packed, PackedEnsemble):
        raise ConfigError(f"unpack takes a PackedEnsemble (from pack), not a {type(packed).__name__}")
    k = packed.num_members
    packed_entries = _entries(packed)
    out = []
    for i in range(k):
        member = copy.deepcopy(packed._template)
        with torch.no_grad():
            for name, t in _entries(member).items():
                whole = packed_entries[name]
                piece = whole[i] if t.dim() == 0 else whole.chunk(k, dim=0)[i].reshape(t.shape)
                value = piece.clone(memory_format=torch.contiguous_format)
                prefix, _, leaf = name.rpartition(".")
                owner = member.get_submodule(prefix)
                if isinstance(t, nn.Parameter):
                    owner._parameters[leaf] = nn.Parameter(value, requires_grad=t.requires_grad)
                else:
                    owner._buffers[leaf] = value
        member.train(packed.training)
        out.append(member)
    return out
