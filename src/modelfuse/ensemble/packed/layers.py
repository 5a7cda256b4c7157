"""Packed layers: K members' parameterised layers (linear, convolutions, norms) as one K-times-wider layer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfuse.ensemble.packed.ops import _expand, _from_member_view, _member_shape, _member_view
from modelfuse.errors import EnsembleError

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
# Feature maps of at most this many pixels run a 2-D convolution in the standard (NCHW) layout on CPU:
# there a channels-last grouped convolution took about twice as long (the zoo CNN's last 2x2 layer).
SMALL_MAP_PIXELS = 4


def _tensor_state(tensors: Sequence[torch.Tensor | None]) -> tuple:
    """What identifies the values of ``tensors`` now: the objects, their in-place versions, storage and dtype."""
    return tuple(
        (None,) if t is None else (t._version, t.data_ptr(), t.dtype, t.device, tuple(t.stride())) for t in tensors
    )


class _PackedConv:
    """Shared by the packed convolutions: K members' convolutions as one with groups times K.

    On CPU, groups of at least ``SPLIT_CHANNELS`` input channels run as K convolutions over the
    members' channel slices, concatenated, which oneDNN computes faster than one grouped call;
    2-D feature maps of at most ``SMALL_MAP_PIXELS`` pixels run in the standard layout.

    A BatchNorm that takes this convolution's output (and nothing else does) can be folded in
    (``fold_batch_norm``): in eval mode without autograd the convolution then runs with the
    BatchNorm's affine map folded into its weight and bias (computed once, again whenever a
    parameter or running statistic changes), one pass instead of two; otherwise the BatchNorm
    runs after the convolution as usual. The module returns the BatchNorm's output either way.
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

    def fold_batch_norm(self, norm: PackedBatchNorm) -> None:
        """Run ``norm`` as part of this convolution (see the class); ``norm`` stays registered where it
        was (its parameters and statistics are its own), this module only refers to it."""
        if norm.running_mean is None or norm.running_var is None:
            raise EnsembleError("a BatchNorm without running statistics cannot be folded into a convolution")
        self.__dict__["_folded_norm"] = norm
        self.__dict__.pop("_fold_cache", None)

    def _folded(self, norm: PackedBatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias of this convolution followed by ``norm`` in eval mode (cached)."""
        sources = (self.weight, self.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        state = _tensor_state(sources)
        cache = self.__dict__.get("_fold_cache")
        if cache is not None and cache[0] == state:
            return cache[1], cache[2]
        with torch.no_grad():
            scale = (norm.running_var.double() + norm.eps).rsqrt()
            if norm.weight is not None:
                scale = scale * norm.weight.double()
            shift = -norm.running_mean.double() * scale
            if norm.bias is not None:
                shift = shift + norm.bias.double()
            if self.bias is not None:
                shift = shift + self.bias.double() * scale
            view = (-1, *([1] * (self.weight.dim() - 1)))
            weight = torch.empty_like(self.weight)  # keeps the weight's (channels-last) strides
            weight.copy_(self.weight.double() * scale.view(view))
            bias = shift.to(self.weight.dtype)
        self.__dict__["_fold_cache"] = (state, weight, bias)
        return weight, bias

    def _standard_layout_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` in the standard (contiguous) layout, cached while it is unchanged."""
        if weight.is_contiguous():
            return weight
        state = _tensor_state((weight,))
        cache = self.__dict__.get("_standard_cache")
        if cache is not None and cache[0] == state and cache[1] is weight:
            return cache[2]
        standard = weight.detach().contiguous() if not torch.is_grad_enabled() else weight.contiguous()
        if not torch.is_grad_enabled():
            self.__dict__["_standard_cache"] = (state, weight, standard)
        return standard

    def forward(self, x: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """``shared``: ``x`` is the same for all members and each member's convolution has groups=1,
        so one ordinary convolution with the K weights stacked gives the packed output."""
        norm = self.__dict__.get("_folded_norm")
        if norm is not None and not norm.training and not torch.is_grad_enabled():
            weight, bias = self._folded(norm)
            return self._convolve(x, shared, weight, bias)
        out = self._convolve(x, shared, self.weight, self.bias)
        return out if norm is None else norm(out)

    def _convolve(
        self, x: torch.Tensor, shared: bool, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        conv = self._conv_fn
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding: Any = 0
        else:
            padding = self.padding
        k = self.num_members
        cpu = x.device.type == "cpu"
        if shared or not cpu or self.in_channels // self.groups < SPLIT_CHANNELS:
            groups = self._member_groups if shared else self.groups
            if cpu and x.dim() == 4 and x.shape[2] * x.shape[3] <= SMALL_MAP_PIXELS:
                x, weight = x.contiguous(), self._standard_layout_weight(weight)
            return conv(x, weight, bias, self.stride, padding, self.dilation, groups)
        xs = [xi.contiguous() for xi in x.chunk(k, dim=1)]  # oneDNN is slow on strided (channels-last) slices
        ws = weight.chunk(k, dim=0)
        bs = bias.chunk(k, dim=0) if bias is not None else [None] * k
        outs = [
            conv(xi, wi, bi, self.stride, padding, self.dilation, self._member_groups)
            for xi, wi, bi in zip(xs, ws, bs)
        ]
        return torch.cat(outs, dim=1)

    def extra_repr(self) -> str:
        folded = ", batch_norm folded in" if "_folded_norm" in self.__dict__ else ""
        return f"num_members={self.num_members}, " + nn.modules.conv._ConvNd.extra_repr(self) + folded


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
