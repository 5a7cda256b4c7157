"""What ``pack`` supports: the module types, functions and tensor methods it knows to act per member."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelfuse.ensemble.packed.layers import (
    PackedBatchNorm,
    PackedConv1d,
    PackedConv2d,
    PackedConv3d,
    PackedLayerNorm,
    PackedLinear,
    _group_norm,
)

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
