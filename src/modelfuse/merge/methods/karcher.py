"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from modelfuse.errors import ConfigError
from modelfuse.merge.methods._base import PerModel, merge_method


@merge_method(
    "karcher",
    base="none",
    min_models=1,
    paper="Karcher 1977, Riemannian center of mass and mollifier smoothing; spherical algorithm: "
    "Buss & Fillmore 2001: m <- Exp_m(sum_i a_i Log_m(u_i))",
    mergekit=(
        "base: no role; a named base_model is one more input of the mean, after the listed models "
        "(as mergekit 0.1.5 appends it). Ignores weight (weighted: true is modelfuse's, not "
        "mergekit's). Computed in float64 where mergekit iterates in float32: up to 8.6e-6 apart "
        "(measured), and mergekit's float32 arccos moves even identical inputs by ~1e-3"
    ),
)
def karcher(
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    weight: PerModel[float] = 1.0,
    max_iter: Annotated[int, Field(ge=0, description="most fixed-point iterations")] = 10,
    tol: Annotated[float, Field(ge=0.0, description="stop when the tangent step is shorter than this")] = 1e-5,
    weighted: Annotated[
        bool, Field(description="use the models' weights (the weighted Karcher mean); mergekit ignores them")
    ] = False,
) -> torch.Tensor:
    """Karcher (Frechet) mean of the unit vectors u_i = x_i / |x_i|, times the mean norm.

    Karcher (1977), "Riemannian center of mass and mollifier smoothing", CPAM: the point m of
    the sphere minimising sum_i a_i d(m, u_i)^2, found by the fixed-point iteration of Buss &
    Fillmore (2001): with theta_i = arccos <m, u_i>, the tangent step
    T = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m) and m <- cos|T| m + sin|T| T/|T|,
    renormalised. Starts from the normalised arithmetic mean of the u_i; y = (sum_i a_i |x_i|) m.

    mergekit semantics: a_i = 1/N, ``weight`` is ignored (``weighted: true`` uses
    a_i = w_i / sum w; not in mergekit); models with |x_i| <= tol take no part in the direction
    (their zero norm still counts in the scale); all such models give zeros; a start whose norm
    is below tol is replaced by the first unit vector; terms with theta_i < tol are skipped; the
    iteration stops after ``max_iter`` steps or when |T| < tol. ``base`` is never passed: a
    recipe's ``base_model`` is one more input of the mean (after the listed models), as in
    mergekit. Computed in float64 and returned in the first model's dtype: mergekit 0.1.5
    iterates in float32, where arccos of a dot product one ulp below 1 is ~3e-4 rad, so its
    mean of identical models moves them by up to ~1e-3; here they come back unchanged (results
    differ from mergekit's by up to 8.6e-6 on benchmarks/mergekit_parity.py's family).
    """
    if len(xs) == 1:
        return xs[0].clone()
    dtype = xs[0].dtype
    work = torch.float64  # norms and angles of millions of entries need the digits
    if weighted:
        total = sum(weight)
        if total == 0:
            raise ConfigError(
                f"merge method 'karcher': the weights {weight} sum to 0; change them or set weighted: false"
            )
        alphas = [w / total for w in weight]
    else:
        alphas = [1.0 / len(xs)] * len(xs)
    vs = [x.to(work).reshape(-1) for x in xs]
    norms = [v.norm().item() for v in vs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    units = [vs[i] / norms[i] for i in valid]
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]

    mean = sum(ai * ui for ai, ui in zip(a, units))
    mean_norm = mean.norm().item()
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for ai, ui in zip(a, units):
            cos = torch.dot(mean, ui).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            step += ai * (theta / torch.sin(theta)) * (ui - cos * mean)
        step_norm = step.norm()
        if step_norm.item() < tol:
            break
        mean = torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)
        unit_norm = mean.norm().item()
        if unit_norm > tol:
            mean = mean / unit_norm
    scale = sum(ai * n for ai, n in zip(alphas, norms))
    return (scale * mean).reshape(xs[0].shape).to(dtype)
