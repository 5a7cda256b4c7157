"""``Ensemble``: one ``nn.Module`` over already-trained members and a combiner."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from modelfuse.ensemble.combiners import Combiner, get_combiner, list_combiners
from modelfuse.errors import ConfigError, EnsembleError


def check_weights(
    weights: Sequence[float] | torch.Tensor | None, count: int, what: str = "member", normalize: bool = True
) -> torch.Tensor:
    """One weight per ``what`` (member, teacher, model) as a float64 tensor: finite, non-negative,
    not all zero; normalised to sum to one unless ``normalize=False`` (equal when None)."""
    if weights is None:
        return torch.full((count,), 1.0 / count if normalize else 1.0, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
    if w.numel() != count:
        raise ConfigError(
            f"{w.numel()} weights for {count} {what}s: give one weight per {what}, in order "
            "(or none for equal weights)"
        )
    if not torch.isfinite(w).all():
        raise ConfigError(f"{what} weights must be finite numbers, found {w.tolist()}")
    if (w < 0).any():
        bad = [i for i, v in enumerate(w.tolist()) if v < 0]
        raise ConfigError(
            f"{what} weights must be non-negative; {what}(s) {bad} have {w[bad].tolist()} (use 0 to leave one out)"
        )
    if w.sum() <= 0:
        raise ConfigError(
            f"{what} weights are all 0 (they sum to 0); at least one {what} needs a positive weight"
        )
    return w / w.sum() if normalize else w


def check_models(
    models: Sequence[nn.Module], what: str = "member", purpose: str = "an ensemble"
) -> list[nn.Module]:
    """``models`` as a list of at least one ``nn.Module``; errors name the ``what`` at fault."""
    models = list(models) if models is not None else []
    if not models:
        raise ConfigError(f"{purpose} needs at least one {what}; the {what} list is empty")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise ConfigError(f"{what} {i} is a {type(m).__name__}, not a torch.nn.Module")
    return models


class MemberSet(nn.Module):
    """Trained members held frozen and always in eval mode, also when the owner is put in
    training mode: they are trained already, and their BatchNorm statistics must not move.
    The base of every module that combines members' outputs (``Ensemble``, ``StackedEnsemble``)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(check_models(members))
        for m in self.members:
            m.requires_grad_(False)
            m.eval()

    def train(self, mode: bool = True) -> MemberSet:
        """Sets this module's own mode; the members stay in eval mode."""
        super().train(mode)
        for m in self.members:
            m.eval()
        return self

    def member_outputs(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        """The members' outputs for one input batch, stacked: (K, N, ...)."""
        outs = []
        for i, m in enumerate(self.members):
            out = m(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise EnsembleError(
                    f"member {i} ({type(m).__name__}) returned a {type(out).__name__}, not a tensor; "
                    "wrap it so that it returns its logits (or values) as one tensor"
                )
            if outs and out.shape != outs[0].shape:
                raise EnsembleError(
                    f"member {i} ({type(m).__name__}) gives outputs of shape {tuple(out.shape)}, member 0 "
                    f"({type(self.members[0]).__name__}) {tuple(outs[0].shape)}: members must predict the "
                    "same outputs (e.g. the same number of classes)"
                )
            outs.append(out)
        return torch.stack(outs)

    def _check_stacked(self, outputs: torch.Tensor, what: str, classes: bool) -> None:
        if outputs.dim() < 2 or outputs.shape[0] != len(self.members):
            raise EnsembleError(
                f"expected the outputs of {len(self.members)} members stacked as (K, N, ...), "
                f"found shape {tuple(outputs.shape)}"
            )
        if classes and outputs.dim() < 3:
            raise EnsembleError(
                f"{what} needs class scores (K, N, classes), found shape {tuple(outputs.shape)}"
            )


class Ensemble(MemberSet):
    """An ensemble of trained models (architectures may differ) as one module.

    ``combine`` names a combiner (``list_combiners()``: mean_prob, mean_logits, geometric_mean,
    vote, max_confidence for classification, whose members give logits and whose output is
    log-probabilities; mean, median for regression). ``weights``: one non-negative weight
    per member, normalised to sum to one (equal by default). ``temperature`` (classification
    only) divides the combined log-probabilities before renormalising them, as fitted by
    ``TemperatureScaling`` (Guo et al. 2017); 1 leaves them as they are.

    The members are frozen (no gradients) and always run in eval mode (``MemberSet``).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        combine: str = "mean_prob",
        weights: Sequence[float] | torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(members)
        self.combiner: Combiner = get_combiner(combine)
        if weights is not None and not self.combiner.weighted:
            raise ConfigError(
                f"the {combine!r} combiner does not use member weights; leave weights out or pick "
                f"one of {', '.join(n for n in list_combiners() if get_combiner(n).weighted)}"
            )
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature must be a positive finite number, found {temperature}")
        if temperature != 1.0 and self.combiner.task != "classification":
            raise ConfigError(
                f"temperature scaling applies to class probabilities; the {combine!r} combiner is for "
                f"{self.combiner.task}"
            )
        self.temperature = temperature
        self.register_buffer("weights", check_weights(weights, len(self.members)))

    @property
    def combine(self) -> str:
        return self.combiner.name

    @property
    def task(self) -> str:
        return self.combiner.task

    def combine_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """The combiner applied to stacked member outputs (K, N, ...), e.g. cached predictions."""
        self._check_stacked(outputs, f"the {self.combine!r} combiner", self.task == "classification")
        if not outputs.is_floating_point():
            outputs = outputs.float()
        combined = self.combiner.fn(outputs, self.weights.to(outputs.device))
        if self.temperature != 1.0:
            combined = torch.log_softmax(combined / self.temperature, dim=-1)
        return combined

    def extra_repr(self) -> str:
        temp = f", temperature={self.temperature:g}" if self.temperature != 1.0 else ""
        return f"combine={self.combine!r}{temp}"

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.combine_outputs(self.member_outputs(*args, **kwargs))
