"""``ActivationMix``: a learnable combination of activation functions.

y = sum_i w_i f_i(x), the adaptive blending unit of Sütfeld et al. 2020 ("Adaptive blending
units: trainable activation functions for deep neural networks") and the learned combinations
of Manessi & Rozza 2018 ("Learning combinations of activation functions", ICPR), with

- ``weights="convex"``: w = softmax(theta), so w_i >= 0 and sum_i w_i = 1;
- ``weights="free"``: w = a, unconstrained coefficients (a linear combination).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.parameter import UninitializedParameter

from modelfuse.activations._registry import build_candidates
from modelfuse.errors import ActivationError

GRANULARITIES = ("layer", "channel", "global")
WEIGHTINGS = ("convex", "free")
InitArg = str | Sequence[float] | None


def _straight_through_unit(x: torch.Tensor) -> torch.Tensor:
    """clamp(x, 0, 1) in the forward pass, the identity in the backward pass.

    A plain clamp has no gradient outside [0, 1], so a blend pushed below 0 once would stay
    at the original activation for good; passing the gradient through lets it come back.
    """
    return x + (x.clamp(0.0, 1.0) - x).detach()


class MixingWeights(nn.Module):
    """The mixing weights of one (or, shared, of several) :class:`ActivationMix`.

    Shape ``(K,)``, or ``(K, C)`` with ``num_channels=C``; ``num_channels=-1`` leaves C to be set
    by :meth:`materialize` (the first forward of a channel mixture does it).

    Convex weights are ``w = softmax(logits)``. A one-hot start (``init`` a candidate's index)
    cannot be a softmax of finite logits, and a softmax that rounds to one-hot has no gradient,
    so a convex one-hot start is anchored: ``w = (1 - lam) * e_k + lam * softmax(logits)`` with
    ``lam = clamp(blend, 0, 1)`` (straight-through) and ``blend`` starting at exactly 0. Then
    ``w == e_k`` bit for bit at the start, stays convex throughout, and
    ``dL/dblend = sum_i (softmax(logits)_i - e_k,i) dL/dw_i`` is not zero, so the mixture can
    leave its original activation. Free weights simply start at ``e_k``.
    """

    def __init__(
        self,
        num_candidates: int,
        *,
        weighting: str,
        init: int | Sequence[float] | None,
        num_channels: int | None,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ActivationError(f"weights must be one of {', '.join(WEIGHTINGS)}; found {weighting!r}")
        self.weighting = weighting
        self.num_candidates = k = int(num_candidates)
        self.per_channel = num_channels is not None
        if isinstance(init, int):
            start = torch.zeros(k)
            start[init] = 1.0
            self.anchor_index: int | None = init
        elif init is None:
            start = torch.full((k,), 1.0 / k)
            self.anchor_index = None
        else:
            start = torch.as_tensor([float(v) for v in init], dtype=torch.float32)
            self.anchor_index = None
            if start.shape != (k,) or not torch.isfinite(start).all():
                raise ActivationError(
                    f"init weights must be {k} finite numbers, one per candidate; found {list(init)!r}"
                )
            if weighting == "convex" and (bool((start <= 0).any()) or abs(float(start.sum()) - 1.0) > 1e-6):
                raise ActivationError(
                    f"convex init weights must be positive and sum to 1; found {start.tolist()} (sum "
                    f"{float(start.sum()):.6g}). Start from one activation with init='<name>' instead"
                )
        self.register_buffer("start", start, persistent=False)
        anchored = weighting == "convex" and self.anchor_index is not None
        self.register_buffer("anchor", start.clone() if anchored else None)
        name = "logits" if weighting == "convex" else "coefficients"
        self.param_name = name
        if num_channels is None or num_channels > 0:
            self._create(name, anchored, num_channels)
        else:
            self.register_parameter(name, UninitializedParameter())
            self.register_parameter("blend", UninitializedParameter() if anchored else None)

    def _initial(self, name: str) -> torch.Tensor:
        if name == "blend":
            return torch.zeros(())
        if self.weighting == "free":
            return self.start.clone()
        if self.anchor is not None:
            return torch.zeros(self.num_candidates)  # uniform softmax once the blend moves
        return self.start.log()

    def _create(self, name: str, anchored: bool, num_channels: int | None) -> None:
        def expand(t: torch.Tensor) -> torch.Tensor:
            if num_channels is None:
                return t
            return t.unsqueeze(-1).expand(*t.shape, num_channels).clone()

        self.register_parameter(name, nn.Parameter(expand(self._initial(name))))
        self.register_parameter("blend", nn.Parameter(expand(self._initial("blend"))) if anchored else None)

    @property
    def materialized(self) -> bool:
        return not isinstance(getattr(self, self.param_name), UninitializedParameter)

    @torch.no_grad()
    def materialize(self, num_channels: int) -> None:
        """Give a lazy channel mixture its channel count (in place: optimizers keep their references)."""
        for name in (self.param_name, "blend"):
            p = getattr(self, name)
            if isinstance(p, UninitializedParameter):
                t = self._initial(name)
                p.materialize((*t.shape, num_channels), device=p.device if p.device.type != "meta" else None)
                p.copy_(t.unsqueeze(-1).expand_as(p))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = prefix + self.param_name
        if not self.materialized and key in state_dict:
            self.materialize(int(state_dict[key].shape[-1]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self) -> torch.Tensor:
        """The weights: ``(K,)`` or ``(K, C)``."""
        if not self.materialized:
            raise ActivationError(
                "this channel mixture has not seen an input yet, so its channel count is unknown; "
                "run one forward pass or give num_channels"
            )
        if self.weighting == "free":
            return self.coefficients
        w = torch.softmax(self.logits, dim=0)
        if self.anchor is None:
            return w
        lam = _straight_through_unit(self.blend)
        anchor = self.anchor.view(-1, *([1] * (w.dim() - 1)))
        return (1.0 - lam) * anchor + lam * w


class ActivationMix(nn.Module):
    """y = sum_i w_i f_i(x): a learnable mixture of element-wise activations.

    Adaptive blending units (Sütfeld et al. 2020), y = sum_j alpha_j g_j(x), and the learned
    combinations of activation functions of Manessi & Rozza 2018, y = sum_j alpha_j g_j(x)
    with alpha free (linear) or on the simplex (convex).

    - ``candidates``: registered activation names (see ``list_activations()``) or element-wise
      ``nn.Module`` s (used as given, ``inplace`` switched off).
    - ``granularity``: ``"layer"`` one weight vector ``(K,)``; ``"channel"`` one per channel of
      dim 1, ``(K, C)``, with ``C = num_channels`` or, left out, the size of dim 1 of the first
      input (parameters are created then, in place; build the optimizer after one forward pass
      or give ``num_channels``); ``"global"`` one vector ``(K,)`` shared through ``shared_weights``
      by every mixture of a model (``fuse_activations`` creates it once).
    - ``weights``: ``"convex"`` (softmax of logits) or ``"free"`` (unconstrained coefficients).
    - ``init``: ``None`` (uniform, 1/K each), a candidate name (all weight on it: the output is
      exactly that activation's output, see :class:`MixingWeights`), or K weights.
    """

    def __init__(
        self,
        candidates: Sequence[str | nn.Module] = ("relu", "gelu", "silu", "tanh"),
        *,
        granularity: str = "layer",
        weights: str = "convex",
        init: InitArg = None,
        num_channels: int | None = None,
        shared_weights: MixingWeights | None = None,
    ) -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ActivationError(
                f"granularity must be one of {', '.join(GRANULARITIES)}; found {granularity!r}"
            )
        built = build_candidates(candidates)
        self.names = tuple(n for n, _ in built)
        self.candidates = nn.ModuleList(m for _, m in built)
        self.granularity = granularity
        self.weighting = weights
        if isinstance(init, str):
            if init not in self.names:
                raise ActivationError(
                    f"init={init!r} is not among the candidates ({', '.join(self.names)}); add it or pick one of them"
                )
            init = self.names.index(init)
        if num_channels is not None and (granularity != "channel" or num_channels < 1):
            raise ActivationError(
                f"num_channels={num_channels!r} needs granularity='channel' and a positive count"
            )
        if shared_weights is not None:
            if granularity != "global":
                raise ActivationError("shared_weights is for granularity='global' only")
            if shared_weights.num_candidates != len(self.names) or shared_weights.weighting != weights:
                raise ActivationError(
                    f"shared_weights mix {shared_weights.num_candidates} candidates ({shared_weights.weighting}); "
                    f"this mixture has {len(self.names)} ({weights})"
                )
            self.mix = shared_weights
        else:
            channels = (num_channels or -1) if granularity == "channel" else None
            self.mix = MixingWeights(len(self.names), weighting=weights, init=init, num_channels=channels)

    def mixing_weights(self) -> torch.Tensor:
        """The current weights w, ``(K,)`` or ``(K, C)``."""
        return self.mix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.granularity == "channel":
            if x.dim() < 2:
                raise ActivationError(
                    f"a channel mixture needs inputs with a channel dim 1 (N, C, ...); found shape {tuple(x.shape)}"
                )
            if not self.mix.materialized:
                self.mix.materialize(x.shape[1])
        w = self.mix().to(x.dtype)
        outs = torch.stack([f(x) for f in self.candidates])
        if w.dim() == 2:
            if w.shape[1] != x.shape[1]:
                raise ActivationError(
                    f"this channel mixture has {w.shape[1]} channels; the input has {x.shape[1]} in dim 1 "
                    f"(shape {tuple(x.shape)})"
                )
            w = w.view(w.shape[0], 1, w.shape[1], *([1] * (x.dim() - 2)))
        else:
            w = w.view(-1, *([1] * x.dim()))
        return (w * outs).sum(0)

    def extra_repr(self) -> str:
        return f"{', '.join(self.names)}; granularity={self.granularity}, weights={self.weighting}"


def entropy(w: torch.Tensor) -> float:
    """Shannon entropy (nats) of a weight vector, normalised as |w| / sum |w| (free weights may be negative)."""
    p = w.detach().abs().double()
    total = float(p.sum())
    if total == 0.0:
        return math.nan
    p = p / total
    return float(-(p[p > 0] * p[p > 0].log()).sum())
