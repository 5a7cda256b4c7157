"""Finding the permutations that align one network to another, and ``align`` itself."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import fx, nn

from modelfuse.align.permute import apply_permutation, check_perms, permute_tensor
from modelfuse.align.spec import AxisRef, PermutationSpec, permutation_spec, trace
from modelfuse.errors import AlignmentError, ConfigError
from modelfuse.io.states import check_same_shapes
from modelfuse.registry import Registry, check_options


@dataclass(frozen=True)
class Matching:
    """Permutations found for each group (``perms``), the passes taken, and whether they converged."""

    perms: dict[str, torch.Tensor]
    passes: int
    converged: bool


def check_same_architecture(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`AlignmentError` naming the first state-dict entry where ``a`` and ``b`` differ."""
    check_same_shapes(
        [a, b], names=["the reference model (to=)", "the model to align"], dtypes=False, error=AlignmentError
    )


def _block(t: torch.Tensor, ref: AxisRef, size: int) -> torch.Tensor:
    """The ``size`` units of ``ref`` as rows: (size, everything else)."""
    t = t.narrow(ref.axis, ref.start, size * ref.repeat).movedim(ref.axis, 0)
    return t.reshape(size, -1)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def weight_matching(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    *,
    max_passes: int = 100,
    seed: int = 0,
    given: Mapping[str, torch.Tensor] | None = None,
) -> Matching:
    """Permutations of ``state_b``'s units that maximise its inner product with ``state_a``.

    Weight matching of Ainsworth et al. 2023 ("Git Re-Basin", Alg. 1): coordinate descent
    over the groups in a random order, each step solving the linear assignment
    ``max_P sum_i <W_a^(i), P W_b^(i) (other permutations applied)>`` over the group's axes
    with ``scipy.optimize.linear_sum_assignment``, until a whole pass improves no group.

    A group of whole blocks with groups inside them (attention heads, ``inner``) is solved
    jointly with them: for every pair of blocks the inner groups' best assignments give
    the pair's score, the blocks are assigned on those scores, and each inner group takes
    the assignment of the pair it ended up in.

    ``given`` holds permutations of some groups fixed (found otherwise, e.g. from
    activations); only the other groups are searched.
    """
    if max_passes < 1:
        raise ConfigError(f"max_passes must be at least 1; found {max_passes}")
    check_same_architecture(state_a, state_b)
    axes_of = spec.param_axes()
    perms = check_perms(spec, given or {})
    fixed = set(given or {})
    for g in spec.groups.values():
        inside = {n for names in g.inner for n in names} & fixed
        if inside and g.name not in fixed:
            raise ConfigError(
                f"given= holds {sorted(inside)} but not {g.name}, the whole heads they sit in, which are searched "
                "jointly with them; give both or neither"
            )
    names = [n for n in spec.groups if n not in fixed]
    # float32 products (float64 copies of a large model would double its memory), float64 sums
    wa = {k: _as_float(state_a[k]) for k in axes_of}
    wb_all = {k: _as_float(state_b[k]) for k in axes_of}
    rng = np.random.default_rng(seed)
    moved: set[str] = set(fixed)
    converged = False
    passes = 0
    while passes < max_passes and not converged:
        passes += 1
        converged = True
        for gi in rng.permutation(len(names)):
            name = names[gi]
            g = spec.groups[name]
            if g.inner:
                if _block_step(spec, g, perms, moved, wa, wb_all, axes_of):
                    converged = False
                continue
            cost = torch.zeros(g.size, g.size, dtype=torch.float64)
            for ref in g.axes:
                others = [(r, perms[gn]) for gn, r in axes_of[ref.name] if r != ref and gn in moved]
                wb = permute_tensor(wb_all[ref.name], others)
                cost += (_block(wa[ref.name], ref, g.size) @ _block(wb, ref, g.size).T).to(torch.float64)
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)
            old_score = cost[torch.arange(g.size), perms[name]].sum().item()
            new_score = cost[torch.arange(g.size), new].sum().item()
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[name] = new
                moved.add(name)  # identity permutations need not be applied
                converged = False
    return Matching(perms, passes, converged)


def _assign(cost: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` maximising ``sum_i cost[i, p[i]]``."""
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    return torch.as_tensor(cols[np.argsort(rows)], dtype=torch.long)


def _block_step(
    spec: PermutationSpec,
    g: Any,
    perms: dict[str, torch.Tensor],
    moved: set[str],
    wa: Mapping[str, torch.Tensor],
    wb_all: Mapping[str, torch.Tensor],
    axes_of: Mapping[str, list[tuple[str, AxisRef]]],
) -> bool:
    """One joint step for the block group ``g`` and its inner groups; True if it improved the match."""
    own = {g.name} | {n for names in g.inner for n in names}
    wb = {
        e: permute_tensor(
            wb_all[e], [(r, perms[gn]) for gn, r in axes_of[e] if gn not in own and gn in moved]
        )
        for e in {ax.name for n in own for ax in spec.groups[n].axes}
    }
    n_blocks = g.size
    score = torch.zeros(n_blocks, n_blocks, dtype=torch.float64)
    best: dict[tuple[int, int, int], torch.Tensor] = {}
    current = 0.0
    for k in range(len(g.inner[0])):
        for i in range(n_blocks):
            ga = spec.groups[g.inner[i][k]]
            for j in range(n_blocks):
                gb = spec.groups[g.inner[j][k]]
                cost = torch.zeros(ga.size, ga.size, dtype=torch.float64)
                for ra, rb in zip(ga.axes, gb.axes, strict=True):  # block i of A against block j of B
                    cost += (_block(wa[ra.name], ra, ga.size) @ _block(wb[rb.name], rb, ga.size).T).to(
                        torch.float64
                    )
                p = _assign(cost)
                best[k, i, j] = p
                score[i, j] += cost[torch.arange(ga.size), p].sum()
                if j == perms[g.name][i]:  # what the current match scores
                    current += cost[torch.arange(ga.size), perms[ga.name]].sum().item()
    sigma = _assign(score)
    new = score[torch.arange(n_blocks), sigma].sum().item()
    if new <= current + 1e-12 * max(1.0, abs(current)):
        return False
    perms[g.name] = sigma
    for k in range(len(g.inner[0])):
        for i in range(n_blocks):
            perms[g.inner[i][k]] = best[k, i, int(sigma[i])]
    moved.update(own)
    return True


class _Taps(fx.Interpreter):
    """Runs a traced model and keeps the outputs of the nodes named in ``keep``."""

    def __init__(self, gm: fx.GraphModule, keep: set[str]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.seen: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.keep:
            self.seen[n.name] = out
        return out


def _units(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Activations as (samples, units): the feature axis last, everything else flattened."""
    if layout == "channel" and t.dim() > 2:
        t = t.movedim(1, -1)
    return t.reshape(-1, t.shape[-1]).to(torch.float64)


def _inputs_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise AlignmentError(
            f"activation matching needs batches that are tensors or (inputs, labels) pairs; found {type(batch).__name__}"
        )
    return batch


def paired_activations(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    what: str = "activation matching",
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch of ``data``: node -> (A's, B's activations as float64 samples x units) at every
    node that carries a group of ``spec`` (the widths of a and b may differ).

    The models run as copies, in eval mode, without gradients, on ``device``; an empty
    ``data`` raises :class:`AlignmentError`, and so does a batch that does not fit.
    """
    # copies: running them in eval mode on ``device`` must not change the caller's modules
    gms = [trace(copy.deepcopy(m)).to(device).eval() for m in (model_a, model_b)]
    keep = {t for g in spec.groups.values() for t in g.producers}
    seen_batches = 0
    with torch.no_grad():
        for batch in data:
            if max_batches is not None and seen_batches >= max_batches:
                break
            x = _inputs_of(batch).to(device)
            outs = []
            for which, gm in zip(("reference (to=)", "to align"), gms, strict=True):
                runner = _Taps(gm, keep)
                try:
                    runner.run(x)
                except Exception as exc:
                    raise AlignmentError(
                        f"a batch of shape {tuple(x.shape)} does not fit the model {which}: "
                        f"{type(exc).__name__}: {exc}; give {what} batches of the model's inputs"
                    ) from exc
                outs.append(runner.seen)
            seen_batches += 1
            yield {
                tap: (
                    _units(outs[0][tap], spec.tap_layouts[tap][0]),
                    _units(outs[1][tap], spec.tap_layouts[tap][0]),
                )
                for tap in keep
            }
    if seen_batches == 0:
        raise AlignmentError(f"{what} got no batches; give it a non-empty data loader")


def activation_moments(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    what: str = "activation matching",
) -> tuple[dict[str, list[torch.Tensor]], dict[str, int]]:
    """Paired activation moments of two models (see :func:`paired_activations`).

    Per node: ``[sum z_a, sum z_b, z_a^T z_b, sum z_a^2, sum z_b^2]`` over every sample (and
    spatial position) of ``data``, and the count.
    """
    stats: dict[str, list[torch.Tensor]] = {}
    count: dict[str, int] = {}
    for acts in paired_activations(
        spec, model_a, model_b, data, max_batches=max_batches, device=device, what=what
    ):
        for tap, (za, zb) in acts.items():
            parts = [za.sum(0), zb.sum(0), za.T @ zb, (za * za).sum(0), (zb * zb).sum(0)]
            old = stats.get(tap)
            stats[tap] = parts if old is None else [o + p for o, p in zip(old, parts, strict=True)]
            count[tap] = count.get(tap, 0) + za.shape[0]
    return stats, count


def activation_matching(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
) -> Matching:
    """Permutations of ``model_b``'s units that maximise the correlation of its activations with ``model_a``'s.

    Activation matching of Ainsworth et al. 2023 (Sec. 3.1): per group, the Pearson
    correlation ``C[i, j] = corr(z_a[i], z_b[j])`` of the two models' units over every
    sample (and spatial position) of ``data`` at every node that carries the group,
    summed over those nodes, then ``max_P sum_i C[i, P(i)]`` with ``linear_sum_assignment``.
    Groups that no traced node carries (the units inside attention heads, a
    ``TransformerEncoderLayer``'s feed-forward units) are then found by :func:`weight_matching`
    with the activation-matched permutations held fixed.
    """
    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    taps = {name: g.producers for name, g in spec.groups.items()}
    stats, count = activation_moments(
        spec, model_a, model_b, data, max_batches=max_batches, device=device, what="activation matching"
    )
    perms: dict[str, torch.Tensor] = {}
    for name, g in spec.groups.items():
        if not taps[name]:
            continue
        corr = torch.zeros(g.size, g.size, dtype=torch.float64)
        for tap in taps[name]:
            sa, sb, sab, saa, sbb = stats[tap]
            n = count[tap]
            ma, mb = sa / n, sb / n
            cov = sab / n - ma[:, None] * mb[None, :]
            std_a = (saa / n - ma**2).clamp_min(0).sqrt()
            std_b = (sbb / n - mb**2).clamp_min(0).sqrt()
            corr += cov / (std_a[:, None] * std_b[None, :] + 1e-12)
        perms[name] = _assign(corr)
    if all(taps.values()):
        return Matching(perms, 1, True)
    found = {name: p for name, p in perms.items() if taps[name]}
    rest = weight_matching(spec, model_a.state_dict(), model_b.state_dict(), given=found)
    return Matching(rest.perms, 1 + rest.passes, rest.converged)


_ALIGNERS: Registry[Callable[..., Matching]] = Registry("alignment method")


def register_aligner(name: str) -> Callable[[Callable[..., Matching]], Callable[..., Matching]]:
    """Register ``fn(spec, model_a, model_b, **options) -> Matching`` as alignment method ``name``
    (what ``align(..., method=name)`` runs)."""

    def decorator(fn: Callable[..., Matching]) -> Callable[..., Matching]:
        _ALIGNERS.register(name, fn)
        return fn

    return decorator


def get_aligner(name: str) -> Callable[..., Matching]:
    """The alignment method registered as ``name``; an unknown name raises RegistryError listing close names."""
    return _ALIGNERS.get(name)


def list_aligners(pattern: str = "*") -> list[str]:
    """Names of the registered alignment methods (``"weight_matching"``, ``"activation_matching"``)."""
    return _ALIGNERS.names(pattern)


@register_aligner("weight_matching")
def _weight_matching(
    spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, *, max_passes: int = 100, seed: int = 0
) -> Matching:
    """:func:`weight_matching` on two modules' state dicts."""
    return weight_matching(spec, model_a.state_dict(), model_b.state_dict(), max_passes=max_passes, seed=seed)


register_aligner("activation_matching")(activation_matching)


def align(
    model_b: nn.Module,
    *,
    to: nn.Module,
    method: str = "weight_matching",
    spec: PermutationSpec | None = None,
    **options: Any,
) -> nn.Module:
    """A copy of ``model_b`` with its hidden units permuted to line up with ``to``'s.

    The copy computes exactly the same function as ``model_b``; only the order of its
    hidden units changes. ``method`` names a registered method (:func:`list_aligners`):
    ``"weight_matching"`` (options ``max_passes``, ``seed``; see :func:`weight_matching`) or
    ``"activation_matching"`` (options ``data``, a loader of input batches, and
    ``max_batches``, ``device``; see :func:`activation_matching`).
    """
    fn = get_aligner(method)
    check_options(f"alignment method {method!r}", fn, options, fixed=("spec", "model_a", "model_b"))
    check_same_architecture(to.state_dict(), model_b.state_dict())
    spec = spec if spec is not None else permutation_spec(model_b)
    matching = fn(spec, to, model_b, **options)
    return apply_permutation(model_b, spec, matching.perms)
