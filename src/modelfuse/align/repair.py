"""REPAIR: undo the variance collapse of interpolated networks (Jordan et al. 2023).

Interpolating two aligned networks shrinks the spread of their hidden units' pre-activations
(averaging two imperfectly correlated units lowers the variance), and the interpolated
network loses accuracy for it. Jordan et al. ("REPAIR: REnormalizing Permuted Activations
for Interpolation Repair", ICLR 2023) correct it with data:

- networks with BatchNorm: :func:`reset_bn_stats` recomputes every BatchNorm layer's running
  mean and variance on data (the interpolated running statistics are wrong, not the weights);
- networks without BatchNorm: :func:`repair_statistics` rescales each hidden channel's
  pre-activation so that its mean and standard deviation over the data equal the
  interpolation ``(1 - t) stat_A + t stat_B`` of the endpoints' statistics, folding the
  per-channel affine correction into the producing layer's weight and bias, so the result is a
  plain model of the same architecture.

:func:`repair` picks between them (``method="auto"``: BatchNorm present -> reset).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from modelfuse.align.matching import _inputs_of, check_same_architecture
from modelfuse.errors import AlignmentError, ConfigError

__all__ = ["repair", "repair_statistics", "reset_bn_stats"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _batches(data: Any, batch_size: int = 256) -> Iterable[Any]:
    """A loader of batches: a Dataset of ``(x, y)`` items is batched; any other iterable is used as is."""
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def _forward_all(model: nn.Module, data: Iterable[Any], device: str | torch.device, what: str) -> int:
    """Run every batch of ``data`` through ``model`` (no gradients); the number of batches."""
    seen = 0
    with torch.no_grad():
        for batch in data:
            x = _inputs_of(batch).to(device)
            try:
                model(x)
            except Exception as exc:
                raise AlignmentError(
                    f"{what}: a batch of shape {tuple(x.shape)} does not fit the model: "
                    f"{type(exc).__name__}: {exc}; give batches of the model's inputs"
                ) from exc
            seen += 1
    if seen == 0:
        raise AlignmentError(f"{what} got no batches; give it a non-empty data loader")
    return seen


class _ChannelStats:
    """Per-channel sums over samples (and positions) of a tensor whose channels are on ``dim``."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def add(self, t: torch.Tensor, dim: int) -> None:
        z = t.detach().movedim(dim, -1).reshape(-1, t.shape[dim]).to(torch.float64)
        s, ss = z.sum(0), (z * z).sum(0)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += z.shape[0]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and population (biased) variance per channel."""
        assert self.s is not None and self.ss is not None
        mean = self.s / self.n
        return mean, (self.ss / self.n - mean**2).clamp_min(0)


def reset_bn_stats(
    model: nn.Module,
    data: Any,
    *,
    device: str | torch.device = "cpu",
    inplace: bool = False,
) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every BatchNorm's running mean and variance recomputed on ``data``.

    One pass in training mode (each BatchNorm normalises with its batch's statistics, as
    during training and in Jordan et al.'s ``reset_bn_stats`` with ``momentum=None``), with the
    exact mean and unbiased variance of every BatchNorm's input over all of ``data``
    accumulated in float64 (not the average of per-batch variances, which depends on the batch
    sizes). ``data`` is a loader of batches (tensors or ``(inputs, labels)``) or a Dataset of
    ``(x, y)`` items. Returned in eval mode; the weights are unchanged.
    """
    out = model if inplace else copy.deepcopy(model)
    bns = [(name, m) for name, m in out.named_modules() if isinstance(m, _BN)]
    if not bns:
        raise ConfigError(
            "reset_bn_stats: the model has no BatchNorm layer; use repair_statistics (or repair) for "
            "networks without BatchNorm"
        )
    stats = {name: _ChannelStats() for name, _ in bns}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: stats[name].add(args[0], 1))
        for name, m in bns
    ]
    out.to(device).train()
    try:
        _forward_all(out, _batches(data), device, "reset_bn_stats")
    finally:
        for h in hooks:
            h.remove()
    for name, m in bns:
        st = stats[name]
        mean, var = st.mean_var()
        if st.n > 1:
            var = var * st.n / (st.n - 1)  # BatchNorm keeps the unbiased variance
        m.reset_running_stats()
        assert m.running_mean is not None and m.running_var is not None
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(1)
    return out.eval()


def _channel_dim(m: nn.Module) -> int:
    return -1 if isinstance(m, nn.Linear) else 1


def _hidden_layers(model: nn.Module, data: Iterable[Any], device: str | torch.device) -> list[str]:
    """Names of the Linear/Conv layers in the order they run on one batch, without the last one (the output)."""
    order: list[str] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, a, o, name=name: order.append(name) if name not in order else None
        )
        for name, m in model.named_modules()
        if isinstance(m, _LAYERS)
    ]
    try:
        batch = next(iter(data), None)
        if batch is None:
            raise AlignmentError("repair got no batches; give it a non-empty data loader")
        _forward_all(model, [batch], device, "repair")
    finally:
        for h in hooks:
            h.remove()
    return order[:-1]


def _layer_stats(
    model: nn.Module, names: Sequence[str], data: Iterable[Any], device: str | torch.device
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean and standard deviation of each named layer's output channels over ``data``."""
    mods = dict(model.named_modules())
    stats = {n: _ChannelStats() for n in names}
    hooks = [
        mods[n].register_forward_hook(
            lambda mod, a, o, name=n: stats[name].add(o, _channel_dim(mod) % o.dim())
        )
        for n in names
    ]
    try:
        _forward_all(model, data, device, "repair")
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n in names:
        mean, var = stats[n].mean_var()
        out[n] = (mean, var.sqrt())
    return out


def repair_statistics(
    merged: nn.Module,
    endpoints: tuple[nn.Module, nn.Module],
    data: Any,
    *,
    t: float = 0.5,
    layers: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A copy of ``merged`` whose hidden channels have the interpolated endpoint statistics.

    For each layer in ``layers`` (default: every Linear and Conv layer except the last one to
    run, i.e. the output layer), in the order they run: the mean ``mu`` and standard
    deviation ``sigma`` of each output channel over ``data`` (all samples and positions) are
    measured in endpoint A, endpoint B and the merged model (with the corrections of earlier
    layers already in place), and the channel is mapped affinely so that
    ``mu' = (1 - t) mu_A + t mu_B`` and ``sigma' = (1 - t) sigma_A + t sigma_B`` (Jordan et al.
    2023, Sec. 4): ``W' = r W``, ``b' = r (b - mu) + mu'`` with ``r = sigma' / sigma``. A layer
    without bias gets one (zeros before the correction). Channels that are constant in the
    merged model (``sigma = 0``) are only shifted. Returned in eval mode.
    """
    a, b = endpoints
    check_same_architecture(a.state_dict(), merged.state_dict())
    check_same_architecture(a.state_dict(), b.state_dict())
    data = _batches(data)
    out = copy.deepcopy(merged).to(device).eval()
    a = copy.deepcopy(a).to(device).eval()
    b = copy.deepcopy(b).to(device).eval()
    names = list(layers) if layers is not None else _hidden_layers(out, data, device)
    mods = dict(out.named_modules())
    for n in names:
        if not isinstance(mods.get(n), _LAYERS):
            found = type(mods[n]).__name__ if n in mods else "no such module"
            raise ConfigError(
                f"repair: layer {n!r} must be a Linear or Conv module of the model; found {found}"
            )
    if not names:
        return out
    stats_a = _layer_stats(a, names, data, device)
    stats_b = _layer_stats(b, names, data, device)
    t = float(t)
    for n in names:
        mu, sigma = _layer_stats(out, [n], data, device)[n]
        mu_t = (1 - t) * stats_a[n][0] + t * stats_b[n][0]
        sigma_t = (1 - t) * stats_a[n][1] + t * stats_b[n][1]
        r = torch.where(sigma > 1e-12, sigma_t / sigma.clamp_min(1e-12), torch.ones_like(sigma))
        m = mods[n]
        with torch.no_grad():
            w = m.weight
            shape = (-1,) + (1,) * (w.dim() - 1)
            w.mul_(r.to(w.dtype).reshape(shape))
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
            bias = m.bias.to(torch.float64)
            m.bias.copy_((r * (bias - mu) + mu_t).to(m.bias.dtype))
    return out


def repair(
    merged: nn.Module,
    *,
    endpoints: tuple[nn.Module, nn.Module] | None = None,
    data: Any,
    t: float = 0.5,
    method: str = "auto",
    layers: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The interpolated model ``merged`` repaired on ``data`` (a copy; ``merged`` is unchanged).

    ``method``: ``"reset_bn"`` (:func:`reset_bn_stats`), ``"rescale"``
    (:func:`repair_statistics`, needs ``endpoints`` and the interpolation weight ``t`` of
    ``merged = (1 - t) A + t B``), or ``"auto"``: reset_bn when the model has BatchNorm
    layers, rescale otherwise.
    """
    if method not in ("auto", "reset_bn", "rescale"):
        raise ConfigError(f"repair: method must be 'auto', 'reset_bn' or 'rescale'; found {method!r}")
    if method == "auto":
        method = "reset_bn" if any(isinstance(m, _BN) for m in merged.modules()) else "rescale"
    if method == "reset_bn":
        return reset_bn_stats(merged, data, device=device)
    if endpoints is None:
        raise ConfigError(
            "repair: rescaling needs the two endpoint models the merged one interpolates; "
            "pass endpoints=(model_a, model_b) and t"
        )
    return repair_statistics(merged, endpoints, data, t=t, layers=layers, device=device)
