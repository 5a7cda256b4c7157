"""Spherical interpolation of weights: slerp between two models, nuslerp, and multislerp for N."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods import _kernels
from modelfuse.merge.methods._base import PerModel, merge_method, new_empty

DOT_THRESHOLD = 0.9995  # mergekit's: above this |cos| the two directions count as colinear
NORM_EPS = 1e-8  # a norm at or below this is taken as 1 (the vector is not normalised)


@merge_method(
    "slerp",
    base="required",
    min_models=1,
    max_models=1,
    paper="Shoemake 1985, Animating rotation with quaternion curves: "
    "slerp(p0, p1; t) = sin((1-t) theta)/sin theta p0 + sin(t theta)/sin theta p1",
    mergekit=(
        "base: required (t = 0 gives it), not an input. Ignores weight. Angles in float64 "
        "(mergekit: the inputs' dtype): last-bit differences (<= 4.8e-7 measured)"
    ),
)
def slerp(
    xs: list[torch.Tensor],
    base: torch.Tensor,
    *,
    t: Annotated[float, Field(ge=0.0, le=1.0, description="0 gives the base model, 1 the other model")],
) -> torch.Tensor:
    """Spherical linear interpolation from the base model (t = 0) to the other model (t = 1).

    Shoemake (1985), "Animating rotation with quaternion curves", SIGGRAPH: with
    cos theta = <a/|a|, b/|b|>, y = sin((1-t) theta)/sin theta a + sin(t theta)/sin theta b.
    The whole tensor is one vector (flattened) and the raw tensors, not their unit vectors,
    are interpolated, so norms are blended too.

    mergekit semantics: a norm <= 1e-8 is replaced by 1, the cosine is clamped to [-1, 1],
    and when |cos| > 0.9995 (``DOT_THRESHOLD``) the result is the linear interpolation
    (1-t) a + t b. Computed in float64 (fine-tunes of one base sit at cos ~ 0.999, where
    float32 angles lose digits) and cast back to the base tensor's dtype.
    """
    a, b = base.reshape(-1), xs[0].reshape(-1)
    # float64 sums over blocks of 2M entries: the digits of a float64 computation, a few MiB
    # of temporaries however large the tensor (on CPU in float32: one C loop, no temporaries)
    blocks = [slice(i, i + (1 << 21)) for i in range(0, max(a.numel(), 1), 1 << 21)]
    arrays = _kernels.float32_arrays([a, b])
    if arrays is not None:
        aa, bb, ab = _kernels.dots(*arrays)
    else:
        aa = bb = ab = 0.0
        for z in blocks:
            a64, b64 = a[z].double(), b[z].double()
            aa += float(torch.dot(a64, a64))
            bb += float(torch.dot(b64, b64))
            ab += float(torch.dot(a64, b64))
    na, nb = math.sqrt(aa), math.sqrt(bb)
    cos = min(1.0, max(-1.0, ab / ((na if na > NORM_EPS else 1.0) * (nb if nb > NORM_EPS else 1.0))))
    if abs(cos) > DOT_THRESHOLD:
        ca, cb = 1.0 - t, t
    else:
        theta = math.acos(cos)
        sin_theta = math.sin(theta)
        ca, cb = math.sin(theta - t * theta) / sin_theta, math.sin(t * theta) / sin_theta
    out = new_empty(base.shape, base.dtype, base.device)
    flat = out.view(-1)
    if arrays is not None:
        _kernels.blend(*arrays, flat.numpy(), ca, cb)
        return out
    for z in blocks:
        flat[z] = (ca * a[z].double() + cb * b[z].double()).to(base.dtype)
    return out


def _slerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Slerp between corresponding vectors along the last dim; colinear pairs (sin theta < 1e-8) lerp."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    theta = torch.acos((u0 * u1).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1.0 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    linear = (1.0 - t) * v0 + t * v1
    return torch.where(sin_theta.abs() < 1e-8, linear, spherical)


@merge_method(
    "nuslerp",
    base="optional",
    min_models=2,
    max_models=2,
    paper="mergekit (Goddard et al. 2024, Arcee's MergeKit) NuSLERP; slerp of Shoemake 1985 "
    "with t = w_2 / (w_1 + w_2)",
    mergekit=(
        "base: optional, not an input (with one, the task vectors are interpolated). mergekit "
        "requires weight, modelfuse defaults it to 1. Computed in float64 (mergekit: the inputs' "
        "dtype): last-bit differences (<= 4.8e-7 measured)"
    ),
)
def nuslerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 1.0,
    nuslerp_flatten: Annotated[bool, Field(description="interpolate the whole tensor as one vector")] = True,
    nuslerp_row_wise: Annotated[
        bool, Field(description="without flatten: vectors along the first dim (True) or the last dim (False)")
    ] = False,
) -> torch.Tensor:
    """Slerp between two models, or between their task vectors when a base is given.

    Shoemake's slerp (see ``slerp``) with t = w_2 / (w_1 + w_2) from the two models'
    weights (t = 0.5 when |w_1 + w_2| < 1e-6); with a base, y = base + slerp(t, x_1 - base,
    x_2 - base) (mergekit's NuSLERP, Goddard et al. 2024, "Arcee's MergeKit: A Toolkit for
    Merging Large Language Models"). ``slerp`` with t is nuslerp without base and weights 1-t, t,
    up to the colinearity rule.

    mergekit semantics: ``nuslerp_flatten`` (default true) treats the tensor as one vector;
    otherwise vectors are taken along the last dim (x[i, :]) or, with ``nuslerp_row_wise``,
    along the first dim (x[:, j]); mergekit's names and docs call the latter "row-wise". Unit
    vectors divide by max(norm, 1e-7); only pairs with |sin theta| < 1e-8 fall back to linear
    interpolation (no 0.9995 threshold as in ``slerp``). mergekit requires ``weight``; here it
    defaults to 1 (t = 0.5). Computed in float64 (float32 norms of large tensors lose ~1e-4 relative), returned in
    the first model's dtype.
    """
    w1, w2 = weight
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    dtype = xs[0].dtype
    work = torch.float64  # norms and angles of millions of entries need the digits
    v0, v1 = xs[0].to(work), xs[1].to(work)
    if base is not None:
        b = base.to(work)
        v0, v1 = v0 - b, v1 - b
    shape = v0.shape
    if nuslerp_flatten or v0.dim() <= 1:
        out = _slerp_vectors(t, v0.reshape(-1), v1.reshape(-1))
    elif nuslerp_row_wise:
        out = _slerp_vectors(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = _slerp_vectors(t, v0, v1)
    out = out.reshape(shape)
    if base is not None:
        out = b + out
    return out.to(dtype)


@merge_method(
    "multislerp",
    base="optional",
    min_models=1,
    paper="Goddard 2025, Multislerp (goddard.blog); spherical averages: Buss & Fillmore 2001, "
    "Spherical averages and applications to spherical splines and interpolation",
    mergekit=(
        "base: optional, not an input (with one, the task vectors are interpolated). mergekit "
        "requires weight, modelfuse defaults it to 1. Where every task vector is zero modelfuse "
        "returns the base (mergekit raises for three or more models). Computed in float64 "
        "(mergekit: the inputs' dtype): last-bit differences (<= 2.4e-7 measured)"
    ),
)
def multislerp(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 1.0,
    normalize_weights: Annotated[bool, Field(description="divide the weights by their sum")] = True,
    eps: Annotated[float, Field(ge=0.0, description="added to norms for numerical stability")] = 1e-8,
) -> torch.Tensor:
    """Barycentric spherical interpolation of N models (or of their task vectors, given a base).

    One tangent-space step of the spherical average (Buss & Fillmore 2001, "Spherical
    averages and applications to spherical splines and interpolation", ACM TOG), as in
    mergekit's multislerp (Goddard 2025, "multislerp" blog post): unit vectors
    u_i = v_i / (|v_i| + eps); m = normalised sum_i w_i u_i; tangent vectors
    g_i = u_i - <u_i, m> m; g = sum_i w_i g_i; y = (cos|g| m + sin|g| g / |g|) * sum_i w_i |v_i|,
    with |g| + eps in place of |g|. With a base, v_i = x_i - base and the base is added back.

    mergekit semantics: weights divided by their sum when ``normalize_weights``; a single
    model is returned as it is; when |sum_i w_i u_i| < eps two models fall back to the
    weighted sum w_1 v_1 + w_2 v_2 and more models are an error. Deviation: where every v_i is
    exactly zero (all models equal the base, as in a tensor no fine-tune changed) the result is
    the weighted sum, zero, i.e. the base, for any number of models (mergekit raises for three
    or more); only genuinely cancelling directions (antipodal inputs) are an error. mergekit requires
    ``weight``; here it defaults to 1. Computed in float64 (float32 norms of large tensors lose ~1e-4 relative),
    returned in the first model's dtype.
    """
    if len(xs) == 1:
        return xs[0].clone()
    dtype = xs[0].dtype
    work = torch.float64  # norms and angles of millions of entries need the digits
    shape = xs[0].shape
    v = torch.stack([x.to(work) for x in xs])
    b = base.to(work) if base is not None else None
    if b is not None:
        v = v - b
    flat = v.reshape(len(xs), -1)
    w = torch.tensor(weight, dtype=work, device=flat.device)
    if normalize_weights:
        if w.sum().item() == 0.0:
            raise ConfigError(
                f"merge method 'multislerp': the weights {weight} sum to 0 and cannot be normalised; "
                "change the weights or set normalize_weights: false"
            )
        w = w / w.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    unit = flat / (norms + eps)
    mean = (w[:, None] * unit).sum(0)
    mean_norm = mean.norm()
    if mean_norm.item() < eps:
        if len(xs) != 2 and bool((norms > 0).any()):
            raise ConfigError(
                "merge method 'multislerp': the weighted sum of the models' directions is zero "
                "(antipodal tensors whose weights cancel out); change the weights"
            )
        out = (w[:, None] * flat).sum(0).reshape(shape)  # all-zero vectors: zero, i.e. the base
    else:
        mean = mean / mean_norm
        tangent = unit - (unit @ mean)[:, None] * mean
        g = (w[:, None] * tangent).sum(0)
        g_norm = g.norm() + eps
        out = mean * torch.cos(g_norm) + g * (torch.sin(g_norm) / g_norm)
        out = (out * (norms[:, 0] * w).sum()).reshape(shape)
    if b is not None:
        out = out + b
    return out.to(dtype)
