"""Fusion operators: K aligned branch features in, one feature out.

Every operator is an ``nn.Module`` whose ``forward(xs)`` takes a list of K tensors that are all
(B, C_k, *spatial), with the same spatial size (maps) or none (vectors), and returns
(B, out_channels, *spatial); it works position by position, so the same operator fuses maps
and pooled vectors. Operators are registered by name (``list_feature_fusions()``) with a builder
``build(widths, **options)`` and whether they need equal widths; ``register_feature_fusion`` adds one.

| name | formula (x_k: branch k at one position) | widths |
|---|---|---|
| ``concat`` | [x_1; ...; x_K] | any |
| ``sum`` | sum_k x_k | equal |
| ``mean`` | (1/K) sum_k x_k | equal |
| ``weighted`` | sum_k softmax(w)_k x_k, w learned (ELMo's scalar mix) | equal |
| ``gated`` | sum_k a_k * x_k, a = softmax over k per channel (Selective Kernel) | equal |
| ``attention`` | attention pooling over the K branch tokens with a learned query | equal |
| ``bilinear`` | P((U_1 x_1) * ... * (U_K x_K)) + b, rank r (MLB) | any |
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfuse.errors import FeatureError
from modelfuse.features.align import global_pool, pointwise
from modelfuse.registry import Registry, check_options

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class FusionOp:
    """A registered operator: ``build(widths, **options)`` makes the module; ``equal_widths`` says
    whether every branch must have the same number of channels."""

    name: str
    build: Builder
    equal_widths: bool

    @property
    def summary(self) -> str:
        doc = (self.build.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else self.name


_FEATURE_FUSIONS: Registry[FusionOp] = Registry("fusion operator")


def register_feature_fusion(name: str, *, equal_widths: bool) -> Callable[[Builder], Builder]:
    """Register ``build(widths: list[int], **options) -> nn.Module`` (with an ``out_channels`` attribute)."""

    def decorator(build: Builder) -> Builder:
        _FEATURE_FUSIONS.register(name, FusionOp(name, build, equal_widths))
        return build

    return decorator


def get_feature_fusion(name: str) -> FusionOp:
    """The fusion operator registered as ``name``; an unknown name raises RegistryError listing close names."""
    return _FEATURE_FUSIONS.get(name)


def list_feature_fusions(pattern: str = "*") -> list[str]:
    """Registered fusion operator names matching a shell-style ``pattern``, sorted."""
    return _FEATURE_FUSIONS.names(pattern)


def build_fusion(name: str, widths: Sequence[int], options: dict[str, Any] | None = None) -> nn.Module:
    """The operator ``name`` for branches of ``widths`` channels; errors say which widths or options fit."""
    op = get_feature_fusion(name)
    options = dict(options or {})
    check_options(f"fusion operator {name!r}", op.build, options, fixed=("widths",))
    widths = [int(w) for w in widths]
    if not widths:
        raise FeatureError("a fusion needs at least one branch")
    if op.equal_widths and len(set(widths)) > 1:
        raise FeatureError(f"{name!r} needs equal widths; found {widths}")
    return op.build(widths, **options)


def _stack(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(xs))  # (K, B, C, *spatial)


class Concat(nn.Module):
    """[x_1; ...; x_K] along the channels, in branch order."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = sum(widths)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(xs), dim=1)


class Sum(nn.Module):
    """sum_k x_k (``mean=True``: divided by K)."""

    def __init__(self, widths: Sequence[int], mean: bool = False) -> None:
        super().__init__()
        self.out_channels = widths[0]
        self.mean = mean

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = _stack(xs)
        return stacked.mean(0) if self.mean else stacked.sum(0)

    def extra_repr(self) -> str:
        return "mean=True" if self.mean else ""


class WeightedSum(nn.Module):
    """sum_k softmax(w)_k x_k with K learned scalars w (initially 0: the mean). The scalar mix of
    ELMo (Peters et al. 2018, "Deep contextualized word representations", eq. 1) without its scale."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = widths[0]
        self.logits = nn.Parameter(torch.zeros(len(widths)))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, 0)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = _stack(xs)
        w = self.weights().to(stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
        return (stacked * w).sum(0)


class Gated(nn.Module):
    """Per-channel attention across branches, as Selective Kernel units fuse their paths (Li et al.
    2019, "Selective Kernel Networks", eqs. 1-6): s = global mean of sum_k x_k; z = ReLU(W s + b);
    a_k = softmax over k of (A_k z + c_k), one gate per channel; output sum_k a_k * x_k. The gates
    depend on the sample, not the position. ``reduction`` and ``min_hidden`` size z:
    max(C // reduction, min_hidden) (SKNet: r = 16, L = 32)."""

    def __init__(self, widths: Sequence[int], reduction: int = 4, min_hidden: int = 32) -> None:
        super().__init__()
        c, k = widths[0], len(widths)
        hidden = max(c // max(int(reduction), 1), int(min_hidden))
        self.out_channels = c
        self.squeeze = nn.Linear(c, hidden)
        self.excite = nn.Linear(hidden, k * c)

    def gates(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The gates a (B, K, C), summing to one over K for every channel."""
        stacked = _stack(xs)
        s = global_pool(stacked.sum(0))  # (B, C)
        z = torch.relu(self.squeeze(s))
        logits = self.excite(z).reshape(s.shape[0], len(xs), s.shape[1])
        return torch.softmax(logits, dim=1)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = _stack(xs)  # (K, B, C, *S)
        a = self.gates(xs).transpose(0, 1)  # (K, B, C)
        a = a.reshape(*a.shape, *([1] * (stacked.dim() - 3)))
        return (a * stacked).sum(0)


class BranchAttention(nn.Module):
    """Attention over branches, each branch a token: at each position the K branch features (plus a
    learned embedding per branch) are keys and values for one learned query, with ``heads`` heads of
    scaled dot-product attention (Vaswani et al. 2017), then an output projection. This is pooling by
    multi-head attention, PMA with one seed (Lee et al. 2019, "Set Transformer", eq. 11, without the
    feed-forward block)::

        t_k = x_k + e_k;  q_h . (W_K t_k)_h / sqrt(d) -> softmax over k -> alpha_hk
        out = W_O [sum_k alpha_hk (W_V t_k)_h]_h
    """

    def __init__(self, widths: Sequence[int], heads: int = 1) -> None:
        super().__init__()
        c, k = widths[0], len(widths)
        heads = int(heads)
        if heads < 1 or c % heads:
            raise FeatureError(
                f"attention with {heads} heads needs a width divisible by it; the width is {c}"
            )
        self.out_channels, self.heads = c, heads
        self.query = nn.Parameter(torch.randn(c) / math.sqrt(c))
        self.branch_embedding = nn.Parameter(torch.randn(k, c) * 0.02)
        self.key = nn.Linear(c, c)
        self.value = nn.Linear(c, c)
        self.out = nn.Linear(c, c)

    def attention(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weights alpha (B, *spatial, heads, K), summing to one over the branches."""
        return self._alpha(self._tokens(xs))

    def _alpha(self, t: torch.Tensor) -> torch.Tensor:
        keys = self.key(t).unflatten(-1, (self.heads, -1))  # (B, *S, K, H, d)
        q = self.query.reshape(self.heads, -1)
        scores = (keys * q).sum(-1) / math.sqrt(q.shape[-1])  # (B, *S, K, H)
        return torch.softmax(scores, dim=-2).transpose(-1, -2)

    def _tokens(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        t = torch.stack([x.movedim(1, -1) for x in xs], dim=-2)  # (B, *S, K, C)
        return t + self.branch_embedding

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        t = self._tokens(xs)
        alpha = self._alpha(t)  # (B, *S, H, K)
        values = self.value(t).unflatten(-1, (self.heads, -1))  # (B, *S, K, H, d)
        pooled = torch.einsum("...hk,...khd->...hd", alpha, values).flatten(-2)  # (B, *S, C)
        return self.out(pooled).movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.out_channels}, heads={self.heads}"


class LowRankBilinear(nn.Module):
    """Low-rank bilinear pooling (MLB; Kim et al. 2017, "Hadamard Product for Low-rank Bilinear
    Pooling", eq. 3, without the tanh): out = P((U_1 x_1) * ... * (U_K x_K)) + b, where U_k maps
    branch k to ``rank`` dimensions and * is the elementwise product; for two branches a rank-r
    factorisation of the bilinear form x_1^T W_o x_2 per output o. ``out_channels`` defaults to the
    largest branch width."""

    def __init__(self, widths: Sequence[int], rank: int = 256, out_channels: int | None = None) -> None:
        super().__init__()
        rank = int(rank)
        if rank < 1:
            raise FeatureError(f"bilinear rank must be a positive integer, found {rank}")
        self.rank = rank
        self.out_channels = int(out_channels) if out_channels is not None else max(widths)
        self.factors = nn.ModuleList(nn.Linear(w, rank) for w in widths)
        self.project = nn.Linear(rank, self.out_channels)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        product = pointwise(self.factors[0], xs[0])
        for factor, x in zip(self.factors[1:], xs[1:]):
            product = product * pointwise(factor, x)
        return pointwise(self.project, product)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, out_channels={self.out_channels}"


@register_feature_fusion("concat", equal_widths=False)
def concat(widths: Sequence[int]) -> nn.Module:
    """Concatenation along the channels, in branch order (widths add up)."""
    return Concat(widths)


@register_feature_fusion("sum", equal_widths=True)
def sum_(widths: Sequence[int]) -> nn.Module:
    """Elementwise sum of the branches."""
    return Sum(widths)


@register_feature_fusion("mean", equal_widths=True)
def mean(widths: Sequence[int]) -> nn.Module:
    """Elementwise mean of the branches."""
    return Sum(widths, mean=True)


@register_feature_fusion("weighted", equal_widths=True)
def weighted(widths: Sequence[int]) -> nn.Module:
    """Learned scalar weight per branch, softmax-normalised (ELMo's scalar mix)."""
    return WeightedSum(widths)


@register_feature_fusion("gated", equal_widths=True)
def gated(widths: Sequence[int], reduction: int = 4, min_hidden: int = 32) -> nn.Module:
    """Per-channel gates across branches from a squeeze-excite of their sum (Selective Kernel)."""
    return Gated(widths, reduction=reduction, min_hidden=min_hidden)


@register_feature_fusion("attention", equal_widths=True)
def attention(widths: Sequence[int], heads: int = 1) -> nn.Module:
    """Attention over the branches, each branch a token, with a learned query (PMA)."""
    return BranchAttention(widths, heads=heads)


@register_feature_fusion("bilinear", equal_widths=False)
def bilinear(widths: Sequence[int], rank: int = 256, out_channels: int | None = None) -> nn.Module:
    """Low-rank bilinear pooling: projected elementwise product of rank-r branch projections (MLB)."""
    return LowRankBilinear(widths, rank=rank, out_channels=out_channels)
