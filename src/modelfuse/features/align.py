"""Aligning branch outputs so that one operator can fuse them.

Branches give feature maps (B, C, *spatial), channels-last maps (B, *spatial, C), token
sequences (B, N, C) from transformers, or vectors (B, C). Alignment brings every branch to
channels-first at one *level*:

- ``"map"``: (B, C_k, *size), one spatial size for all: adaptive average pooling
  (``spatial="pool"``) or linear interpolation (``spatial="interpolate"``, ``align_corners=False``)
  to ``size`` (default: the smallest size per dimension for pooling, the largest for
  interpolation). Tokens are laid back on their square grid, after dropping prefix tokens
  (a class token; ViT, Dosovitskiy et al. 2021).
- ``"vector"``: (B, C_k): maps averaged over space, tokens averaged (or their first, class, token).

That part has no parameters (so cached features can be stored after it). Channel widths are
then optionally projected to one width by a 1x1 projection (:class:`Projection`, a linear map
over the channel dimension at every position, as a 1x1 convolution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modelfuse.errors import ConfigError, FeatureError

LAYOUTS = ("auto", "channels_first", "channels_last", "tokens")
LEVELS = ("auto", "map", "vector")
SPATIAL = ("pool", "interpolate")
TOKEN_POOLS = ("mean", "first")
_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, N, C) with N = prod(spatial), positions in row-major order."""
    return x.flatten(2).transpose(1, 2)


def token_grid(n: int, prefix_tokens: int | None = None) -> tuple[int, int]:
    """(prefix tokens, grid side) for ``n`` tokens: the rest after the prefix must be a square.

    With ``prefix_tokens=None``: 0 when ``n`` is a square, 1 (a class token) when ``n - 1`` is.
    """
    candidates = [prefix_tokens] if prefix_tokens is not None else [0, 1]
    for p in candidates:
        side = math.isqrt(max(n - p, 0))
        if p >= 0 and n - p > 0 and side * side == n - p:
            return p, side
    given = f"after {prefix_tokens} prefix token(s) " if prefix_tokens is not None else ""
    raise FeatureError(
        f"{n} tokens {given}do not lie on a square grid; set the branch's prefix_tokens= (class and "
        "register tokens before the patch tokens) or fuse pooled vectors: level='vector'"
    )


def tokens_to_map(x: torch.Tensor, prefix_tokens: int | None = None) -> torch.Tensor:
    """(B, N, C) -> (B, C, s, s): drop the prefix tokens, lay the rest on their s x s grid row by row."""
    p, side = token_grid(x.shape[1], prefix_tokens)
    return x[:, p:].transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def resize(x: torch.Tensor, size: Sequence[int], mode: str = "pool") -> torch.Tensor:
    """(B, C, *spatial) -> (B, C, *size) by adaptive average pooling or linear interpolation."""
    size = tuple(int(s) for s in size)
    rank = x.dim() - 2
    if len(size) != rank or rank not in _INTERPOLATION:
        raise FeatureError(f"cannot resize a map of shape {tuple(x.shape)} to spatial size {size}")
    if tuple(x.shape[2:]) == size:
        return x
    if mode == "pool":
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[rank - 1]
        return pool(x, size)
    if mode == "interpolate":
        return F.interpolate(x, size=size, mode=_INTERPOLATION[rank], align_corners=False)
    raise ConfigError(f"unknown spatial alignment {mode!r}; expected one of {', '.join(SPATIAL)}")


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B, C): the mean over every spatial position; vectors pass through."""
    return x.flatten(2).mean(-1) if x.dim() > 2 else x


def pointwise(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` applied over the channel dimension (dim 1) at every position: a 1x1 convolution."""
    if x.dim() == 2:
        return linear(x)
    return linear(x.movedim(1, -1)).movedim(-1, 1)


class Projection(nn.Module):
    """1x1 projection of (B, C_in, *spatial) or (B, C_in) to ``out_channels`` (a linear map per position)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(self.linear, x)


@dataclass(frozen=True)
class Alignment:
    """How one branch's tap output becomes channels-first at the fusion level (no parameters).

    ``layout``: how the raw output is laid out (``channels_first``, ``channels_last``, ``tokens``);
    ``in_shape``/``out_shape`` exclude the batch dimension.
    """

    layout: str
    level: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    spatial: str = "pool"
    prefix_tokens: int | None = None
    token_pool: str = "mean"

    @property
    def channels(self) -> int:
        return self.out_shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "channels_last" and x.dim() > 2:
            x = x.movedim(-1, 1)
        elif self.layout == "tokens":
            if self.level == "map":
                x = tokens_to_map(x, self.prefix_tokens)
            elif self.token_pool == "first":
                x = x[:, 0]
            else:
                x = x[:, self.prefix_tokens or 0 :].mean(1)
        if self.level == "vector":
            return global_pool(x)
        return resize(x, self.out_shape[1:], self.spatial)


def resolve_layout(shape: Sequence[int], layout: str, *, conv1d: bool) -> str:
    """The layout of a tap output of ``shape`` (no batch dimension); ``"auto"``: vectors and maps are
    channels-first, a 2-D (N, C) output is a token sequence unless the model has 1-D convolutions."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    rank = len(shape)
    if rank == 0:
        raise FeatureError("the tap gives one number per sample (shape (B,)); tap a layer with features")
    if layout == "auto":
        return "channels_first" if rank != 2 or conv1d else "tokens"
    if layout == "tokens" and rank != 2:
        raise FeatureError(f"layout='tokens' needs (B, N, C) outputs; the tap gives (B, *{tuple(shape)})")
    if layout == "channels_last" and rank < 2:
        raise FeatureError(
            f"layout='channels_last' needs (B, *spatial, C); the tap gives (B, *{tuple(shape)})"
        )
    return layout


def plan_alignment(
    shapes: dict[str, tuple[int, ...]],
    layouts: dict[str, str],
    *,
    level: str = "auto",
    spatial: str = "pool",
    size: int | Sequence[int] | None = None,
    prefix_tokens: dict[str, int | None] | None = None,
    token_pool: dict[str, str] | None = None,
) -> dict[str, Alignment]:
    """One :class:`Alignment` per branch (by name) from raw tap shapes (no batch) and resolved layouts.

    ``level="auto"``: ``"map"`` when every branch gives channels-first or channels-last maps with
    the same number of spatial dimensions, else ``"vector"``.
    """
    if level not in LEVELS:
        raise ConfigError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    if spatial not in SPATIAL:
        raise ConfigError(f"unknown spatial alignment {spatial!r}; expected one of {', '.join(SPATIAL)}")
    prefix_tokens, token_pool = prefix_tokens or {}, token_pool or {}
    # each branch channels-first: (C,) vector, (C, *S) map, or a token sequence (N, C)
    kinds: dict[str, str] = {}
    cf: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        layout = layouts[name]
        if layout == "tokens":
            kinds[name], cf[name] = "tokens", tuple(shape)
        elif len(shape) == 1:
            kinds[name], cf[name] = "vector", tuple(shape)
        elif layout == "channels_last":
            kinds[name], cf[name] = "map", (shape[-1], *shape[:-1])
        else:
            kinds[name], cf[name] = "map", tuple(shape)
    ranks = {len(cf[n]) - 1 for n in shapes if kinds[n] == "map"}
    if level == "auto":
        level = "map" if all(k == "map" for k in kinds.values()) and len(ranks) == 1 else "vector"
    out: dict[str, tuple[int, ...]] = {}
    grids: dict[str, int | None] = {}
    if level == "vector":
        for name in shapes:
            c = cf[name][-1] if kinds[name] == "tokens" else cf[name][0]
            out[name] = (c,)
            grids[name] = prefix_tokens.get(name)
    else:
        spatial_shapes: dict[str, tuple[int, ...]] = {}
        for name in shapes:
            if kinds[name] == "vector":
                raise FeatureError(
                    f"branch {name!r} gives vectors of shape (B, {cf[name][0]}), which have no spatial "
                    "extent to fuse as maps; fuse pooled vectors: level='vector'"
                )
            if kinds[name] == "tokens":
                n, c = cf[name]
                p, side = token_grid(n, prefix_tokens.get(name))
                grids[name] = p
                spatial_shapes[name], out[name] = (side, side), (c,)
            else:
                spatial_shapes[name], out[name] = cf[name][1:], (cf[name][0],)
                grids[name] = None
        ranks = {len(s) for s in spatial_shapes.values()}
        if len(ranks) > 1:
            listing = ", ".join(f"{n}: {shapes[n]}" for n in shapes)
            raise FeatureError(
                f"branch maps differ in their number of spatial dimensions ({listing}); they cannot be "
                "laid on one grid: fuse pooled vectors with level='vector'"
            )
        rank = ranks.pop()
        if size is not None:
            target = (int(size),) * rank if isinstance(size, int) else tuple(int(s) for s in size)
            if len(target) != rank or any(s < 1 for s in target):
                raise ConfigError(f"size={size!r} does not fit maps with {rank} spatial dimension(s)")
        else:
            pick = min if spatial == "pool" else max
            target = tuple(pick(s[d] for s in spatial_shapes.values()) for d in range(rank))
        for name in shapes:
            out[name] = (out[name][0], *target)
    return {
        name: Alignment(
            layout=layouts[name],
            level=level,
            in_shape=tuple(shapes[name]),
            out_shape=out[name],
            spatial=spatial,
            prefix_tokens=grids.get(name),
            token_pool=token_pool.get(name, "mean"),
        )
        for name in shapes
    }
