"""Data-driven merging over state dicts and their statistics: Fisher merging and RegMean.

These are functions over whole state dicts, not registered per-tensor methods: a registered
method sees one tensor's versions and scalar parameters from a recipe, while these need a
statistics tensor per model and per weight (and RegMean a matrix solve per Linear layer),
looked up by the tensor's name. The statistics come from :mod:`modelfuse.merge.statistics`
(computed once, saved, reloaded lazily) and carry a fingerprint of the model they were
computed on, which is checked against the state dict being merged.

- :func:`fisher_merge` (Matena & Raffel 2022, eq. 2): theta = sum_i w_i F_i theta_i /
  sum_i w_i F_i elementwise, with each F_i floored at ``epsilon``; tensors no model has a
  Fisher for (buffers, frozen parameters) are averaged with the weights w_i.
- :func:`regmean_merge` (Jin et al. 2023, eq. 4 with their off-diagonal scaling alpha):
  for each Linear weight W_i (out x in) with input Gram G_i, G_i' = alpha G_i +
  (1 - alpha) diag(G_i) and W = (sum_i W_i G_i')(sum_i G_i')^-1, computed in float64 as a
  linear solve; every other tensor is averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.io.states import check_same_shapes
from modelfuse.merge.methods.linear import linear
from modelfuse.merge.statistics import Statistics, state_fingerprint

StateLike = Mapping[str, torch.Tensor] | nn.Module
StatsLike = Statistics | Mapping[str, torch.Tensor]


def _states(models: Sequence[StateLike], what: str) -> list[Mapping[str, torch.Tensor]]:
    return check_same_shapes(models, what=what, dtypes=False)


def _stats(
    stats: Sequence[StatsLike],
    states: Sequence[Mapping[str, torch.Tensor]],
    kind: str,
    what: str,
    check_fingerprint: bool,
) -> list[Statistics]:
    if len(stats) != len(states):
        raise ConfigError(f"{what}: {len(states)} models but {len(stats)} sets of {kind} statistics")
    out = []
    for i, (st, state) in enumerate(zip(stats, states)):
        if not isinstance(st, Statistics):
            st = Statistics(kind, st, 0)
        if st.kind != kind:
            raise ConfigError(f"{what}: statistics {i} are {st.kind!r} statistics; expected {kind!r}")
        if check_fingerprint and st.fingerprint and st.fingerprint != state_fingerprint(state):
            raise ConfigError(
                f"{what}: the {kind} statistics given for model {i} were computed on another model "
                f"(fingerprint {st.fingerprint[:12]}..., model {i} is {state_fingerprint(state)[:12]}...). "
                "Pass the statistics in the order of the models, recompute them for this model, or "
                "pass check_fingerprint=False if the model was only re-saved in another way."
            )
        for name in st.tensors:
            if name not in state:
                raise ConfigError(
                    f"{what}: {kind} statistics {i} have tensor {name!r}, which model {i} does not have; "
                    "the statistics belong to another architecture"
                )
        out.append(st)
    return out


def _weights(weights: Sequence[float] | None, n: int, what: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ConfigError(f"{what}: {len(w)} weights for {n} models")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ConfigError(f"{what}: weights must be >= 0 with a positive sum; found {w}")
    return w


def _average(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    if not xs[0].is_floating_point():
        return xs[0].clone()
    return linear(xs, None, weight=weights, normalize=True)


def _stat(
    st: Statistics, i: int, name: str, shape: tuple[int, ...], kind: str, what: str, device: torch.device
) -> torch.Tensor:
    t = st.tensors[name]
    if tuple(t.shape) != shape:
        raise ConfigError(
            f"{what}: {kind} statistics {i} for {name!r} have shape {tuple(t.shape)}; expected {shape}"
        )
    return t.to(device=device, dtype=torch.float64)


def fisher_merge(
    models: Sequence[StateLike],
    fishers: Sequence[StatsLike],
    *,
    weights: Sequence[float] | None = None,
    epsilon: float = 1e-6,
    check_fingerprint: bool = True,
) -> dict[str, torch.Tensor]:
    """Fisher-weighted average of state dicts (Matena & Raffel 2022, eq. 2): a new state dict.

    ``fishers[i]`` holds model i's diagonal Fisher (:func:`fisher_information`, or any map
    from parameter names to tensors of the parameters' shapes). Each F_i is floored at
    ``epsilon`` (as the paper's code does: where every model's Fisher is ~0 the result is the
    weighted average); with ``epsilon=0`` an element whose weighted Fishers sum to 0 is
    averaged too. Tensors no model has a Fisher for are averaged with ``weights`` (default
    equal); a tensor that some models have a Fisher for and others not is an error.
    """
    what = "fisher_merge"
    if epsilon < 0:
        raise ConfigError(f"{what}: epsilon must be >= 0; found {epsilon}")
    states = _states(models, what)
    stats = _stats(fishers, states, "fisher", what, check_fingerprint)
    w = _weights(weights, len(states), what)
    out: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        xs = [s[name] for s in states]
        have = [name in st.tensors for st in stats]
        if not any(have) or not ref.is_floating_point():
            out[name] = _average(xs, w)
            continue
        if not all(have):
            missing = [i for i, h in enumerate(have) if not h]
            raise ConfigError(
                f"{what}: tensor {name!r} has a Fisher in some models' statistics but not in those of "
                f"model(s) {missing}; compute all statistics with the same trainable parameters"
            )
        num = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        den = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for i, (st, x) in enumerate(zip(stats, xs)):
            f = _stat(st, i, name, tuple(ref.shape), "fisher", what, ref.device).clamp_min(epsilon) * w[i]
            num += f * x.to(torch.float64)
            den += f
        avg = _average(xs, w).to(torch.float64)
        out[name] = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), avg).to(ref.dtype)
    return out


def regmean_merge(
    models: Sequence[StateLike],
    grams: Sequence[StatsLike],
    *,
    alpha: float = 0.9,
    check_fingerprint: bool = True,
) -> dict[str, torch.Tensor]:
    """RegMean (Jin et al. 2023): Linear weights by regression on the inputs' Gram matrices; a new state dict.

    ``grams[i]`` maps each Linear weight name of model i to its input Gram X_i^T X_i
    (:func:`gram_matrices`). For those weights, G_i' = alpha G_i + (1 - alpha) diag(G_i) and
    W = (sum_i W_i G_i')(sum_i G_i')^-1 (solved in float64). Where the sum is singular (an
    input feature that is zero in every model's data: dead pixels, dead ReLUs) the data do not
    determine W along those directions, and W there is the plain average (the minimiser
    closest to the average: average + pinv(sum G') (rhs - sum G' average)). alpha = 1 gives the exact minimiser of sum_i ||X_i W^T - X_i W_i^T||^2; the
    paper reports alpha around 0.9 working best (the default). Every other tensor (biases,
    embeddings, norms) is the plain average.
    """
    what = "regmean_merge"
    if not 0 <= alpha <= 1:
        raise ConfigError(f"{what}: alpha must be in [0, 1]; found {alpha}")
    states = _states(models, what)
    stats = _stats(grams, states, "gram", what, check_fingerprint)
    names = list(stats[0].tensors)
    if not names:
        raise ConfigError(
            f"{what}: the Gram statistics are empty; RegMean needs models with nn.Linear layers "
            "(gram_matrices refuses a model without them)"
        )
    for i, st in enumerate(stats[1:], start=1):
        if set(st.tensors) != set(names):
            diff = sorted(set(st.tensors) ^ set(names))
            raise ConfigError(
                f"{what}: Gram statistics {i} and 0 cover different Linear layers (first difference: "
                f"{diff[0]!r}); compute them on models of one architecture"
            )
    out: dict[str, torch.Tensor] = {}
    w = [1.0] * len(states)
    for name, ref in states[0].items():
        xs = [s[name] for s in states]
        if name not in names:
            out[name] = _average(xs, w)
            continue
        if ref.ndim != 2:
            raise ConfigError(
                f"{what}: {name!r} has a Gram matrix but is not a 2-d Linear weight ({tuple(ref.shape)})"
            )
        n_in = ref.shape[1]
        total = torch.zeros(n_in, n_in, dtype=torch.float64, device=ref.device)
        rhs = torch.zeros(n_in, ref.shape[0], dtype=torch.float64, device=ref.device)
        for i, (st, x) in enumerate(zip(stats, xs)):
            g = _stat(st, i, name, (n_in, n_in), "gram", what, ref.device)
            if alpha != 1:
                g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
            total += g
            rhs += g @ x.to(torch.float64).T
        average = _average(xs, w).to(torch.float64).T
        out[name] = _solve(total, rhs, average).T.to(ref.dtype).contiguous()
    return out


def _solve(a: torch.Tensor, b: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
    """X solving a X = b; where ``a`` is singular, the solution closest to ``average`` (least-norm in X - average)."""
    solution, info = torch.linalg.solve_ex(a, b)
    if int(info) == 0 and torch.isfinite(solution).all():
        return solution
    return average + torch.linalg.pinv(a, hermitian=True) @ (b - a @ average)
