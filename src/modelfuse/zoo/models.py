"""Small reference architectures sized for digits (1x8x8 or 3x32x32) and MNIST-1D (1x40).

Every model is a plain, FX-traceable ``nn.Module`` with the same outline: ``forward_features``
maps a batch to pooled feature vectors of size ``num_features``, and ``classifier`` (one
``nn.Linear``; for the MLP, opt-in, a :class:`CosineClassifier`) maps those to logits. Convolutional models end in adaptive pooling and pool
with ``ceil_mode=True``, so they run on any input size, however small.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.zoo.registry import register_model


def _check(input_shape: Sequence[int], ndim: int, arch: str) -> None:
    if len(input_shape) != ndim:
        raise ConfigError(
            f"{arch} expects input_shape of {ndim} dimensions (channels first, no batch); found {tuple(input_shape)}"
        )


class CosineClassifier(nn.Module):
    """A bias-free cosine-similarity head: ``logits = scale * normalize(h) @ normalize(W)^T``.

    The logits of CLIP-style zero-shot heads: L2-normalised features against L2-normalised
    class embeddings (the rows of ``weight``), times a fixed ``scale`` (CLIP uses 100). Every
    logit lies in ``[-scale, scale]`` whatever the weights, so no change of the weights can
    inflate the logits beyond that. ``scale`` is a fixed number, not a parameter or a buffer
    (it is not in the state dict, so merges never touch it); build every model of a merge with
    the same ``scale``. ``weight`` is an ``nn.Parameter`` of shape (num_classes, in_features),
    but the module is not an ``nn.Linear``: statistics defined for Linear layers (RegMean's Gram
    matrices) skip it, and RegMean averages it like any other non-Linear tensor.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float, eps: float = 1e-12) -> None:
        super().__init__()
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ConfigError(f"CosineClassifier: scale must be a finite number > 0; found {scale!r}")
        self.in_features, self.out_features = int(in_features), int(num_classes)
        self.scale, self.eps = float(scale), float(eps)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = nn.functional.normalize(h, dim=-1, eps=self.eps)
        w = nn.functional.normalize(self.weight, dim=-1, eps=self.eps)
        return self.scale * h @ w.T

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}, bias=False"


HEADS = ("linear", "cosine")


class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU (-> Dropout)`` per hidden width, then a classifier.

    ``head="linear"`` (the default) ends in an ``nn.Linear``; ``head="cosine"`` in a
    :class:`CosineClassifier` with the fixed ``logit_scale`` (CLIP-style normalised logits).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        head: str = "linear",
        logit_scale: float = 20.0,
    ) -> None:
        super().__init__()
        width = math.prod(input_shape)
        self.flatten = nn.Flatten()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            layers[f"relu{i}"] = nn.ReLU()
            if dropout:
                layers[f"dropout{i}"] = nn.Dropout(dropout)
            width = h
        self.features = nn.Sequential(layers)
        self.num_features = width
        if head == "linear":
            self.classifier: nn.Module = nn.Linear(width, num_classes)
        elif head == "cosine":
            self.classifier = CosineClassifier(width, num_classes, logit_scale)
        else:
            raise ConfigError(f"mlp: head must be one of {', '.join(HEADS)}; found {head!r}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.flatten(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


class ConvBlock(nn.Sequential):
    """``conv -> (BatchNorm) -> ReLU (-> max-pool by 2)`` in 1-D or 2-D."""

    def __init__(
        self, dims: int, in_ch: int, out_ch: int, kernel_size: int, *, batch_norm: bool, pool: bool
    ) -> None:
        conv_cls, bn_cls, pool_cls = (
            (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
            if dims == 1
            else (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)
        )
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = conv_cls(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
        if batch_norm:
            layers["bn"] = bn_cls(out_ch)
        layers["relu"] = nn.ReLU()
        if pool:
            layers["pool"] = pool_cls(2, ceil_mode=True)
        super().__init__(layers)


class ConvNet(nn.Module):
    """Stacked :class:`ConvBlock` s, global pooling, dropout and a linear classifier (1-D or 2-D).

    ``stages`` lists, per stage, the widths of its convolutions; each stage ends in a
    max-pool by 2 except the last, which feeds the global average pool.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        stages: Sequence[Sequence[int]],
        *,
        dims: int,
        kernel_size: int,
        batch_norm: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = int(input_shape[0])
        for s, widths in enumerate(stages, start=1):
            for b, width in enumerate(widths, start=1):
                last_of_stage = b == len(widths)
                name = f"conv{s}" if len(widths) == 1 else f"conv{s}_{b}"
                blocks[name] = ConvBlock(
                    dims,
                    in_ch,
                    width,
                    kernel_size,
                    batch_norm=batch_norm,
                    pool=last_of_stage and s < len(stages),
                )
                in_ch = width
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.num_features = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.flatten(self.pool(self.features(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block; a 1x1 conv + BN projects the shortcut when shapes change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_ch),
                )
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem, stages of :class:`BasicBlock` s (stride 2 from the second), global pooling."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_ch = int(input_shape[0])
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_ch, widths[0], 3, padding=1, bias=False),
                bn=nn.BatchNorm2d(widths[0]),
                relu=nn.ReLU(),
            )
        )
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        ch = widths[0]
        for s, width in enumerate(widths, start=1):
            stage = [BasicBlock(ch, width, stride=1 if s == 1 else 2)]
            stage += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages[f"layer{s}"] = nn.Sequential(*stage)
            ch = width
        self.layers = nn.Sequential(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.num_features = ch
        self.classifier = nn.Linear(ch, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.flatten(self.pool(self.layers(self.stem(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@register_model("mlp", input_shapes=((1, 8, 8), (3, 32, 32), (1, 40)))
def mlp(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    hidden: Sequence[int] = (256, 128),
    dropout: float = 0.0,
    head: str = "linear",
    logit_scale: float = 20.0,
) -> MLP:
    """Multi-layer perceptron on the flattened input; ``hidden`` lists the hidden widths.

    ``head="cosine"`` replaces the linear classifier by a bias-free :class:`CosineClassifier`
    with the fixed ``logit_scale`` (ignored for the default ``head="linear"``).
    """
    return MLP(
        input_shape, num_classes, hidden=tuple(hidden), dropout=dropout, head=head, logit_scale=logit_scale
    )


@register_model("cnn")
def cnn(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (32, 64, 128),
    kernel_size: int = 3,
    batch_norm: bool = False,
    dropout: float = 0.0,
) -> ConvNet:
    """Small 2-D CNN: one ``conv -> ReLU`` per width, max-pool between them, global average pool."""
    _check(input_shape, 3, "cnn")
    return ConvNet(
        input_shape,
        num_classes,
        [[w] for w in widths],
        dims=2,
        kernel_size=kernel_size,
        batch_norm=batch_norm,
        dropout=dropout,
    )


@register_model("cnn1d", input_shapes=((1, 40),))
def cnn1d(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (32, 64, 64),
    kernel_size: int = 5,
    batch_norm: bool = True,
    dropout: float = 0.0,
) -> ConvNet:
    """1-D CNN for signals such as MNIST-1D: ``conv -> BN -> ReLU`` per width, max-pool between, global average pool."""
    _check(input_shape, 2, "cnn1d")
    return ConvNet(
        input_shape,
        num_classes,
        [[w] for w in widths],
        dims=1,
        kernel_size=kernel_size,
        batch_norm=batch_norm,
        dropout=dropout,
    )


@register_model("vgg_small")
def vgg_small(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (32, 64, 128),
    depth: int = 2,
    dropout: float = 0.0,
) -> ConvNet:
    """VGG-style: per width a stage of ``depth`` ``conv3x3 -> BN -> ReLU`` layers, max-pool between stages."""
    _check(input_shape, 3, "vgg_small")
    return ConvNet(
        input_shape,
        num_classes,
        [[w] * depth for w in widths],
        dims=2,
        kernel_size=3,
        batch_norm=True,
        dropout=dropout,
    )


@register_model("resnet_small")
def resnet_small(
    *,
    input_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
    blocks: int = 1,
    dropout: float = 0.0,
) -> ResNet:
    """Small ResNet with BasicBlocks (BatchNorm, residual connections, projection shortcuts)."""
    _check(input_shape, 3, "resnet_small")
    return ResNet(input_shape, num_classes, widths=tuple(widths), blocks=blocks, dropout=dropout)
