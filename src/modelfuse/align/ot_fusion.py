"""OT fusion (Singh & Jaggi 2020, "Model Fusion via Optimal Transport"), layer by layer.

For every permutation group of the reference model A (in the order the groups appear in
the traced graph) a transport map ``T`` (n_A x m_B, uniform marginals ``1/n`` and ``1/m``)
is found between B's units and A's units, by exact optimal transport (POT's ``ot.emd``)
or entropic transport (``ot.sinkhorn`` with ``reg``). The ground cost between A's unit
``i`` and B's unit ``j`` is

- ``"weights"``: the squared distance between the unit's incoming weights (and bias),
  B's already transported onto A's previous layers;
- ``"activations"``: computed from the units' activations on a data loader, either the
  squared Euclidean distance over samples (``ground_metric="sqeuclidean"``, the paper's)
  or ``1 - Pearson correlation`` (``ground_metric="correlation"``, the default here).
  A group that no traced node carries (the units inside attention heads, a
  ``TransformerEncoderLayer``'s feed-forward units) takes the weights' cost.

Only the producing layer's own entries (its weight's output axis, per-unit vectors such
as biases and norms) enter the weight cost; an embedding table, whose unit axis is axis 1,
is treated as a consumer there.

``T`` normalised by A's marginal, ``T_hat = n T`` (rows sum to one), maps every weight
axis of the group in B onto A's units: ``new[i] = sum_j T_hat[i, j] old[j]`` along that
axis, for the producing layer's output axis and the next layer's input axis alike. The
fused model is ``(1 - t) W_A + t * W_B(aligned)`` with A's architecture, so B may be
narrower or wider than A. With equal widths and exact transport ``T_hat`` is a
permutation matrix and OT fusion is permutation alignment followed by averaging.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from modelfuse._optional import require
from modelfuse.align.matching import activation_moments
from modelfuse.align.spec import AxisRef, PermutationSpec, permutation_spec
from modelfuse.errors import AlignmentError, ConfigError

_MODES = ("weights", "activations")
_METRICS = ("sqeuclidean", "correlation")


@dataclass(frozen=True)
class OTFusion:
    """The fused model and, per permutation group, the transport map ``T`` (n_A x m_B, sums to 1)."""

    model: nn.Module
    transports: dict[str, torch.Tensor]


def transport_map(
    cost: np.ndarray | torch.Tensor, *, reg: float | None = None, max_iter: int = 1000
) -> torch.Tensor:
    """Optimal transport plan (n x m) with uniform marginals ``1/n``, ``1/m`` for ``cost`` (n x m).

    ``reg=None``: exact transport (``ot.emd``); otherwise entropic transport with
    regularisation ``reg`` (``ot.sinkhorn``, at most ``max_iter`` iterations; POT warns when
    it stops before converging) on the cost divided by its largest entry.
    """
    ot = require("ot", "OT fusion")
    m = np.asarray(cost.detach().cpu().numpy() if isinstance(cost, torch.Tensor) else cost, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape:
        raise AlignmentError(f"a transport cost must be a non-empty matrix; found shape {m.shape}")
    if not np.isfinite(m).all():
        raise AlignmentError(
            "the transport cost holds NaN or infinite entries; check the models' weights/activations"
        )
    a = np.full(m.shape[0], 1.0 / m.shape[0])
    b = np.full(m.shape[1], 1.0 / m.shape[1])
    if reg is None:
        plan = ot.emd(a, b, m)
    else:
        if reg <= 0:
            raise ConfigError(
                f"reg (entropic regularisation) must be positive, or None for exact transport; found {reg}"
            )
        scale = float(np.abs(m).max()) or 1.0
        plan = ot.sinkhorn(a, b, m / scale, reg, numItermax=max_iter)
        if not np.isfinite(plan).all():
            raise AlignmentError(
                f"entropic transport with reg={reg} did not converge (NaN plan); use a larger reg or reg=None"
            )
    return torch.as_tensor(plan, dtype=torch.float64)


def transport_tensor(t: torch.Tensor, ref: AxisRef, t_hat: torch.Tensor) -> torch.Tensor:
    """``t`` with the block ``ref`` names mapped by ``t_hat`` (n x m): ``new[i] = sum_j t_hat[i, j] old[j]``.

    Each unit's ``ref.repeat`` consecutive positions move together; positions outside the
    block are kept. The axis grows or shrinks from ``m * repeat`` to ``n * repeat`` positions.
    """
    n, m = t_hat.shape
    r = ref.repeat
    size = t.shape[ref.axis]
    if ref.start + m * r > size:
        raise AlignmentError(
            f"{ref.name} axis {ref.axis} has {size} positions, fewer than the {m} units x {r} the group names"
        )
    before = t.narrow(ref.axis, 0, ref.start)
    after = t.narrow(ref.axis, ref.start + m * r, size - ref.start - m * r)
    block = t.narrow(ref.axis, ref.start, m * r).movedim(ref.axis, 0)
    rest = block.shape[1:]
    block = block.reshape(m, r, -1).to(torch.float64)
    moved = torch.einsum("ij,jrk->irk", t_hat.to(block.device), block).reshape(n * r, *rest)
    moved = moved.movedim(0, ref.axis).to(t.dtype)
    return torch.cat([before, moved, after], dim=ref.axis)


def _check_specs(
    spec_a: PermutationSpec, spec_b: PermutationSpec, sa: Mapping[str, Any], sb: Mapping[str, Any]
) -> None:
    blocks = [g.name for g in spec_a.groups.values() if g.inner]
    if blocks:
        raise ConfigError(
            f"OT fusion cannot transport whole-head groups ({blocks[0]}: heads with groups inside them); "
            "give it a spec made without whole_heads=True"
        )
    if set(spec_a.groups) != set(spec_b.groups):
        raise AlignmentError(
            "OT fusion needs models of one architecture family (only widths may differ): the permutation "
            f"groups differ (reference: {sorted(spec_a.groups)}, other: {sorted(spec_b.groups)})"
        )
    missing = [k for k in sa if k not in sb] + [k for k in sb if k not in sa]
    if missing:
        raise AlignmentError(
            f"OT fusion needs models of one architecture family: {missing[0]!r} is in only one of the two state dicts"
        )
    axes_a, axes_b = spec_a.param_axes(), spec_b.param_axes()
    for key in sa:
        ta, tb = sa[key], sb[key]
        if ta.dim() != tb.dim():
            raise AlignmentError(
                f"{key!r} has {tb.dim()} axes in one model and {ta.dim()} in the reference model"
            )
        moving = {r.axis for _, r in axes_a.get(key, [])}
        if sorted((g, r.axis) for g, r in axes_a.get(key, [])) != sorted(
            (g, r.axis) for g, r in axes_b.get(key, [])
        ):
            raise AlignmentError(
                f"{key!r} is permuted by different groups in the two models; they are not one family"
            )
        for ax in range(ta.dim()):
            if ax not in moving and ta.shape[ax] != tb.shape[ax]:
                raise AlignmentError(
                    f"{key!r} axis {ax} has {tb.shape[ax]} positions in one model but {ta.shape[ax]} in the "
                    "reference model, and that axis cannot be transported (it is fixed: the model's input or "
                    "output, or an axis the permutation spec could not follow)"
                )


def ot_fusion(
    model_a: nn.Module,
    model_b: nn.Module,
    *,
    t: float = 0.5,
    mode: str = "weights",
    data: Iterable[Any] | None = None,
    reg: float | None = None,
    ground_metric: str | None = None,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    spec: PermutationSpec | None = None,
    spec_b: PermutationSpec | None = None,
    incoming: str = "average",
    sinkhorn_max_iter: int = 1000,
) -> OTFusion:
    """Fuse ``model_b`` into ``model_a`` by optimal transport of its units; the result has A's widths.

    ``t`` is B's weight in the fused model (0: A, 1: B transported onto A). ``mode`` is
    ``"weights"`` (ground cost from incoming weights) or ``"activations"`` (from the
    activations on ``data``, a loader of input batches or (inputs, labels) pairs, at most
    ``max_batches``). ``ground_metric`` (activations only) is ``"correlation"`` (default:
    ``1 - Pearson correlation``, which beat the paper's ``"sqeuclidean"`` on digits MLPs) or
    ``"sqeuclidean"``; weights always use squared distances. ``reg=None`` uses exact
    transport, a positive ``reg`` entropic transport (``sinkhorn_max_iter`` iterations at
    most). ``spec``/``spec_b`` are the models' permutation specs (derived by tracing
    when left out); both models must be of one family, differing only in hidden widths.

    ``incoming`` says how the next layer's input axis (axis >= 1 of a weight of 2 or more
    axes) is transported: ``"average"`` (the paper: ``T`` normalised by A's marginal, as
    on the output axis) or ``"sum"`` (normalised by B's marginal, ``m T``), which keeps
    the total weight B's units send on, so that B transported alone computes the same
    function where its units are copies spread over A's wider layer. They agree when the
    widths are equal.
    """
    if incoming not in ("average", "sum"):
        raise ConfigError(f"incoming must be 'average' or 'sum'; found {incoming!r}")
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {_MODES}; found {mode!r}")
    if ground_metric is None:
        ground_metric = "sqeuclidean" if mode == "weights" else "correlation"
    if ground_metric not in _METRICS:
        raise ConfigError(f"ground_metric must be one of {_METRICS}; found {ground_metric!r}")
    if mode == "weights" and ground_metric != "sqeuclidean":
        raise ConfigError("ground_metric='correlation' needs mode='activations'")
    if mode == "activations" and data is None:
        raise ConfigError("mode='activations' needs data=, a loader of input batches")
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"t (the weight of model_b) must lie in [0, 1]; found {t}")
    require("ot", "OT fusion")
    spec_a = spec if spec is not None else permutation_spec(model_a)
    spec_b = spec_b if spec_b is not None else permutation_spec(model_b)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    _check_specs(spec_a, spec_b, sa, sb)
    if mode == "activations":
        stats, count = activation_moments(
            spec_a,
            model_a,
            model_b,
            data,
            max_batches=max_batches,
            device=device,
            what="activation-based OT fusion",
        )

    axes_b = spec_b.param_axes()
    aligned = {k: v.detach() for k, v in sb.items()}
    done: dict[str, torch.Tensor] = {}
    transports: dict[str, torch.Tensor] = {}
    for name, ga in spec_a.groups.items():
        gb = spec_b.groups[name]
        n, m = ga.size, gb.size
        if mode == "weights" or not ga.producers:  # no node carries the group (units inside attention heads)
            cost = torch.zeros(n, m, dtype=torch.float64)
            used = 0
            for ref_a, ref_b in zip(ga.axes, gb.axes, strict=True):
                # the producing layer's own entries (unit axis first, or per-unit vectors), whose other
                # moving axes are already transported; the consumers' input axes do not enter the cost
                # (other blocks of the same axis, such as the other heads' rows, do not enter these rows)
                others = [g for g, r in axes_b[ref_b.name] if r.axis != ref_b.axis]
                if _consumer(ref_b, aligned[ref_b.name]) or any(g not in done for g in others):
                    continue
                xa = _rows(sa[ref_a.name], ref_a, n)
                xb = _rows(aligned[ref_b.name], ref_b, m)
                if xa.shape[1] != xb.shape[1]:
                    raise AlignmentError(
                        f"{ref_a.name!r}: incoming sizes differ after transport ({xa.shape} vs {xb.shape})"
                    )
                cost += torch.cdist(xa, xb) ** 2
                used += 1
            if used == 0:
                raise AlignmentError(
                    f"group {name}: no weight feeds it whose other axes are already aligned; use mode='activations'"
                )
        else:
            cost = torch.zeros(n, m, dtype=torch.float64)
            for tap in ga.producers:
                s_a, s_b, s_ab, s_aa, s_bb = stats[tap]
                c = count[tap]
                if ground_metric == "sqeuclidean":
                    cost += (s_aa[:, None] + s_bb[None, :] - 2 * s_ab).clamp_min(0) / c
                else:
                    ma, mb = s_a / c, s_b / c
                    cov = s_ab / c - ma[:, None] * mb[None, :]
                    std_a = (s_aa / c - ma**2).clamp_min(0).sqrt()
                    std_b = (s_bb / c - mb**2).clamp_min(0).sqrt()
                    cost += 1 - cov / (std_a[:, None] * std_b[None, :] + 1e-12)
        plan = transport_map(cost, reg=reg, max_iter=sinkhorn_max_iter)
        transports[name] = plan
        t_hat = plan * n  # normalised by A's marginal 1/n: rows sum to one
        t_sum = plan * m  # normalised by B's marginal: B's total outgoing weight is kept
        for ref_b in sorted(gb.axes, key=lambda r: -r.start):  # later blocks first: starts stay valid
            use = t_sum if (incoming == "sum" and _consumer(ref_b, aligned[ref_b.name])) else t_hat
            aligned[ref_b.name] = transport_tensor(aligned[ref_b.name], ref_b, use)
        done[name] = t_hat

    fused: dict[str, torch.Tensor] = {}
    for key, wa in sa.items():
        wb = aligned[key]
        if wb.shape != wa.shape:
            raise AlignmentError(
                f"{key!r}: transported shape {tuple(wb.shape)} differs from the reference's {tuple(wa.shape)}"
            )
        fused[key] = ((1 - t) * wa + t * wb.to(wa.dtype)) if wa.is_floating_point() else wa.clone()
    out = copy.deepcopy(model_a)
    out.load_state_dict(fused)
    return OTFusion(out, transports)


def _consumer(ref: AxisRef, t: torch.Tensor) -> bool:
    """Whether ``ref`` is a consumer's input axis (axis >= 1 of a weight of two or more axes)."""
    return ref.axis > 0 and t.dim() > 1


def _rows(t: torch.Tensor, ref: AxisRef, size: int) -> torch.Tensor:
    """The ``size`` units of ``ref`` as float64 rows (units x everything else, repeats included)."""
    block = t.detach().narrow(ref.axis, ref.start, size * ref.repeat).movedim(ref.axis, 0)
    return block.reshape(size, -1).to(torch.float64)
