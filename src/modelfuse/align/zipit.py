"""ZipIt! (Stoica et al. 2024): merge two models trained on different tasks by zipping features.

At every permutation group the features of both models are put side by side (2n of
them), their Pearson correlation over a data loader is computed, and the most correlated
pairs are merged greedily, within a model or across the two, until n merged features
remain. Each merged feature averages its pair: the merge matrix ``M`` (n x 2n) holds 1/2 at
the pair, the unmerge matrix ``U`` (2n x n) holds 1 where a feature belongs to a merged one.
Weights follow: a layer producing the group gets ``M_a W_a U_a' + M_b W_b U_b'`` (``U'``: the
unmerge of its input group), a layer only consuming zipped features (the classifier) gets
``(W_a U_a + W_b U_b) / 2``.

Partial zipping (``stop_at``): the groups from ``stop_at`` on are not zipped; the layers
that produce or consume them stay two separate heads, model A's fed ``U_a`` of the zipped
features and B's fed ``U_b``, and the output is the mean of the two heads' outputs.
This needs models whose forward is ``classifier(features(x))``-like: ``nn.Sequential`` (or
zoo models with ``features`` and ``forward_features``); full zipping works on any traced
model whose units the permutation spec can follow.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfuse.align.matching import check_same_architecture, paired_activations
from modelfuse.align.ot_fusion import _consumer, transport_tensor
from modelfuse.align.spec import PermutationSpec, permutation_spec
from modelfuse.errors import AlignmentError, ConfigError


@dataclass(frozen=True)
class Zip:
    """Per zipped group: the merge matrix (n x 2n) and unmerge matrix (2n x n), A's features first."""

    merge: dict[str, torch.Tensor]
    unmerge: dict[str, torch.Tensor]


def zip_matrices(corr: torch.Tensor, *, within: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy pairing of the 2n features of ``corr`` (A's n then B's n) into n merged ones.

    The most correlated remaining pair is merged first; ``within=False`` allows only pairs
    across the two models (then it is a greedy matching, as in weight averaging).
    Returns (merge ``M`` n x 2n, unmerge ``U`` 2n x n).
    """
    c = corr.detach().to(torch.float64).clone()
    two_n = c.shape[0]
    if c.shape != (two_n, two_n) or two_n % 2:
        raise AlignmentError(f"a zip correlation must be square with an even side; found {tuple(corr.shape)}")
    n = two_n // 2
    c.fill_diagonal_(float("-inf"))
    if not within:
        c[:n, :n] = float("-inf")
        c[n:, n:] = float("-inf")
    merge = torch.zeros(n, two_n, dtype=torch.float64)
    unmerge = torch.zeros(two_n, n, dtype=torch.float64)
    for k in range(n):
        flat = int(torch.argmax(c))
        i, j = divmod(flat, two_n)
        merge[k, i] = merge[k, j] = 0.5
        unmerge[i, k] = unmerge[j, k] = 1.0
        c[[i, j], :] = float("-inf")
        c[:, [i, j]] = float("-inf")
    return merge, unmerge


def _joint_correlations(
    spec: PermutationSpec,
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    max_batches: int | None,
) -> dict[str, torch.Tensor]:
    """Per group: the Pearson correlation (2n x 2n) of A's and B's features side by side."""
    sums: dict[str, list[torch.Tensor]] = {}
    count: dict[str, int] = {}
    for acts in paired_activations(spec, model_a, model_b, data, max_batches=max_batches, what="ZipIt"):
        for tap, (za, zb) in acts.items():
            z = torch.cat([za, zb], dim=1)
            parts = [z.sum(0), z.T @ z]
            old = sums.get(tap)
            sums[tap] = parts if old is None else [o + p for o, p in zip(old, parts, strict=True)]
            count[tap] = count.get(tap, 0) + z.shape[0]
    out: dict[str, torch.Tensor] = {}
    for name, g in spec.groups.items():
        corr = torch.zeros(2 * g.size, 2 * g.size, dtype=torch.float64)
        for tap in g.producers:
            s, ss = sums[tap]
            c = count[tap]
            mean = s / c
            cov = ss / c - mean[:, None] * mean[None, :]
            std = cov.diagonal().clamp_min(0).sqrt()
            corr += cov / (std[:, None] * std[None, :] + 1e-12)
        out[name] = corr
    return out


def zip_state(
    spec: PermutationSpec,
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    zipped: Zip,
    keys: Iterable[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Apply merge/unmerge matrices: (zipped entries, A's unmerged entries, B's unmerged entries).

    An entry with a zipped group on a producing axis is zipped (merged from both models);
    an entry whose zipped groups are all on consuming axes is zipped too when ``keys`` is
    None (averaged), and otherwise, if it is not in ``keys``, kept per model with its input
    unmerged (``W_a U_a``, ``W_b U_b``): a head of a partially zipped model.
    """
    axes = spec.param_axes()
    zip_keys = set(state_a) if keys is None else set(keys)
    merged: dict[str, torch.Tensor] = {}
    head_a: dict[str, torch.Tensor] = {}
    head_b: dict[str, torch.Tensor] = {}
    for key, wa in state_a.items():
        wb = state_b[key]
        refs = [(g, r) for g, r in axes.get(key, []) if g in zipped.merge]
        if not wa.is_floating_point():
            merged[key] = wa.clone()
            continue
        ta, tb = wa.detach().to(torch.float64), wb.detach().to(torch.float64)
        producing = False
        for g, ref in sorted(refs, key=lambda gr: -gr[1].start):
            n = spec.groups[g].size
            mrg, unm = zipped.merge[g], zipped.unmerge[g]
            if _consumer(ref, ta):
                ma, mb = unm[:n].T, unm[n:].T
            else:
                ma, mb = mrg[:, :n], mrg[:, n:]
                producing = True
            ta, tb = transport_tensor(ta, ref, ma), transport_tensor(tb, ref, mb)
        if producing:
            merged[key] = (ta + tb).to(wa.dtype)
        elif key in zip_keys:
            merged[key] = ((ta + tb) / 2).to(wa.dtype)
        else:
            head_a[key], head_b[key] = ta.to(wa.dtype), tb.to(wa.dtype)
    return merged, head_a, head_b


class PartialZip(nn.Module):
    """A zipped trunk and two heads (A's and B's later layers); the output is the heads' mean."""

    def __init__(self, trunk: nn.Module, head_a: nn.Module, head_b: nn.Module) -> None:
        super().__init__()
        self.trunk, self.head_a, self.head_b = trunk, head_a, head_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.trunk(x)
        return (self.head_a(z) + self.head_b(z)) / 2


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """A zoo model (features + pooling + classifier) or an nn.Sequential as one list of (prefix, module)."""
    if isinstance(model, nn.Sequential):
        return [(name, m) for name, m in model.named_children()]
    if (
        hasattr(model, "features")
        and isinstance(model.features, nn.Sequential)
        and hasattr(model, "classifier")
    ):
        out = [(f"features.{n}", m) for n, m in model.features.named_children()]
        for name in ("pool", "flatten", "dropout"):
            if hasattr(model, name):
                out.append((name, getattr(model, name)))
        return [*out, ("classifier", model.classifier)]
    raise AlignmentError(
        f"partial zipping needs an nn.Sequential or a zoo model (features + classifier); found {type(model).__name__}"
    )


def zipit(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Iterable[Any],
    *,
    stop_at: int | None = None,
    within: bool = True,
    max_batches: int | None = None,
    spec: PermutationSpec | None = None,
) -> nn.Module:
    """Zip two models of one architecture into one (``stop_at=None``) or into a trunk with two heads.

    ``stop_at`` is the number of top-level layers (see :func:`_layers`: the zoo models'
    feature blocks, then pooling and classifier) to zip; the layers from there on stay
    two heads. ``within=False`` only pairs features across the two models.
    """
    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    spec = spec if spec is not None else permutation_spec(model_a)
    blocks = [g.name for g in spec.groups.values() if g.inner]
    if blocks:
        raise ConfigError(
            f"ZipIt cannot zip whole-head groups ({blocks[0]}: heads with groups inside them); "
            "give it a spec made without whole_heads=True"
        )
    corr = _joint_correlations(spec, model_a, model_b, data, max_batches)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if stop_at is None:
        pairs = _pairs(corr, within)
        zipped = Zip({g: m for g, (m, _) in pairs.items()}, {g: u for g, (_, u) in pairs.items()})
        merged, _, _ = zip_state(spec, sa, sb, zipped)
        return _resized(model_a, merged)
    layers = _layers(model_a)
    if not 1 <= stop_at < len(layers):
        raise ConfigError(f"stop_at must lie in 1..{len(layers) - 1} (the model has {len(layers)} layers)")
    trunk_keys = {k for k in sa if any(k.startswith(p + ".") for p, _ in layers[:stop_at])}
    groups = {g for k in trunk_keys for g, r in spec.param_axes().get(k, []) if not _consumer(r, sa[k])}
    pairs = {g: mu for g, mu in _pairs(corr, within).items() if g in groups}
    zipped = Zip({g: m for g, (m, _) in pairs.items()}, {g: u for g, (_, u) in pairs.items()})
    merged, head_a, head_b = zip_state(spec, sa, sb, zipped, keys=trunk_keys)
    full_a, full_b = dict(sa), dict(sb)
    full_a.update({k: v for k, v in merged.items() if k not in trunk_keys})
    full_b.update({k: v for k, v in merged.items() if k not in trunk_keys})
    full_a.update(head_a)
    full_b.update(head_b)
    trunk_state = {k: v for k, v in merged.items() if k in trunk_keys}
    ta = copy.deepcopy(model_a)
    heads = []
    for model, state in ((model_a, full_a), (model_b, full_b)):
        m = copy.deepcopy(model)
        _load_resized(m, {k: v for k, v in state.items() if k not in trunk_keys})
        heads.append(nn.Sequential(*[_get(m, p) for p, _ in layers[stop_at:]]))
    _load_resized(ta, trunk_state)
    trunk = nn.Sequential(*[_get(ta, p) for p, _ in layers[:stop_at]])
    return PartialZip(trunk, heads[0], heads[1]).eval()


def _pairs(corr: Mapping[str, torch.Tensor], within: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {g: zip_matrices(c, within=within) for g, c in corr.items()}


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _load_resized(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` (a subset of entries, same shapes) into ``model`` in place."""
    own = model.state_dict()
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise AlignmentError(f"zipped {k!r} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
    model.load_state_dict({**own, **state})


def _resized(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    out = copy.deepcopy(model)
    _load_resized(out, state)
    return out.eval()
