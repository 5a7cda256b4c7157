"""Loss-weighting methods: the combined objective is a weighted sum of the K task losses.

Registered names (``get_loss_fusion(name)(num_tasks=K, ...)``):

- ``"equal"``: every task weight 1, the plain sum (weights sum to K);
- ``"fixed"``: weights given by the user, used as given;
- ``"uncertainty"``: homoscedastic uncertainty weighting (Kendall et al. 2018), learned log-variances;
- ``"gradnorm"``: GradNorm (Chen et al. 2018), weights learned to balance gradient norms;
- ``"dwa"``: dynamic weight average (Liu et al. 2019), weights from the losses' rate of descent;
- ``"rlw"``: random loss weighting (Lin et al. 2021), softmax of normal samples each step.

Every method sets ``weights_`` (a detached (K,) tensor) at each step. With ``present`` (tasks
that carry no label in a batch, see :func:`~modelfuse.losses.masked_task_losses`) the absent
tasks get weight 0 and are left out of the method's bookkeeping; where a method normalises its
weights (``weights_sum``), the present tasks' weights are normalised among themselves (to the
number of present tasks, or to 1).

Worked example: a two-head MLP on digits (the digit, its parity) trained with ``"uncertainty"``
through the one training loop, the parity labels 50% missing (this exact code runs in
tests/losses/test_weighting.py)::

    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import TensorDataset
    from modelfuse.data import load
    from modelfuse.losses import get_loss_fusion, masked_task_losses
    from modelfuse.zoo import train

    digits = load("digits")
    x, y = digits.train.tensors
    has_parity = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < 0.5
    data = TensorDataset(x, y, y % 2, has_parity)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU())
            self.digit, self.parity = nn.Linear(64, 10), nn.Linear(64, 2)

        def forward(self, x):
            h = self.trunk(x)
            return self.digit(h), self.parity(h)

    def task_losses(model, batch):
        x, digit, parity, has_parity = batch
        out_digit, out_parity = model(x)
        per_sample = [F.cross_entropy(out_digit, digit, reduction="none"),
                      F.cross_entropy(out_parity, parity, reduction="none")]
        mask = torch.stack([torch.ones_like(has_parity), has_parity], 1)
        return masked_task_losses(per_sample, mask)            # (losses, present)

    torch.manual_seed(0)
    model = TwoHeads()
    fusion = get_loss_fusion("uncertainty")(num_tasks=2, task_types="classification")
    result = train(
        model, data, epochs=20, seed=0, lr=3e-3, loss=task_losses,
        backward=lambda out: fusion.backward(out[0], present=out[1]),
        param_groups=[*model.parameters(), *fusion.parameters()],
    )
    print(result.history[-1]["train_loss"], fusion.weights_)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from modelfuse.errors import ConfigError, LossFusionError
from modelfuse.losses._base import LossFusion, register_loss_fusion

__all__ = [
    "DynamicWeightAverage",
    "EqualWeighting",
    "FixedWeighting",
    "GradNorm",
    "RandomLossWeighting",
    "UncertaintyWeighting",
]

TASK_TYPES = ("regression", "classification")


def _normalise(raw: torch.Tensor, present: torch.Tensor, total: str) -> torch.Tensor:
    """``raw`` (K,) non-negative scores -> weights: 0 off ``present``, summing over it to its count or 1."""
    w = torch.where(present, raw, torch.zeros_like(raw))
    n = int(present.sum())
    if n == 0:
        return w
    target = float(n) if total == "tasks" else 1.0
    return w * (target / w.sum())


def _present_softmax(scores: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores`` over the present tasks only (0 for the absent ones)."""
    masked = scores.masked_fill(~present, -math.inf)
    if not bool(present.any()):
        return torch.zeros_like(scores)
    return torch.softmax(masked, 0)


class _Weighting(LossFusion):
    """A weighted sum ``sum_k w_k L_k`` (+ a method's own extra terms) over the present tasks."""

    def forward(self, losses: Sequence[torch.Tensor] | torch.Tensor, *, present: Any = None) -> torch.Tensor:
        stacked = self.check(losses)
        p = self._present(present, stacked)
        total, weights = self._combine(stacked, p)
        self.weights_ = weights.detach()
        return total

    def _combine(self, losses: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self._weights(losses.detach(), present).to(losses.dtype)
        return _weighted_sum(weights, losses, present), weights

    def _weights(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _weighted_sum(weights: torch.Tensor, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``sum_k w_k L_k`` over the present tasks (absent losses never enter, even as 0 * L)."""
    return (weights * torch.where(present, losses, torch.zeros_like(losses))).sum()


@register_loss_fusion("equal")
class EqualWeighting(_Weighting):
    """Equal weights: the plain sum ``sum_k L_k`` (weight 1 per task, so the weights sum to K).

    The sum, not the mean, so that every normalised method here shares one scale: weights
    summing to the number of tasks (GradNorm's renormalisation, DWA's ``K * softmax``).
    Divide the learning rate by K to reproduce a mean.
    """

    weights_sum = "tasks"

    def _weights(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return present.to(losses.dtype)


@register_loss_fusion("fixed")
class FixedWeighting(_Weighting):
    """Fixed, user-given weights: ``sum_k w_k L_k``; absent tasks get 0, the rest are used as given."""

    def __init__(self, num_tasks: int, weights: Sequence[float] | torch.Tensor, task_names: Sequence[str] | None = None):
        super().__init__(num_tasks, task_names)
        w = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if w.numel() != num_tasks:
            raise ConfigError(f"fixed loss weights: expected {num_tasks} weights (one per task), found {w.numel()}")
        bad = (~torch.isfinite(w)) | (w < 0)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            raise ConfigError(
                f"fixed loss weights must be finite and non-negative; weight {k} is {float(w[k])}"
            )
        if float(w.sum()) == 0.0:
            raise ConfigError("fixed loss weights are all 0: at least one task must count")
        self.register_buffer("fixed_weights", w)

    def _weights(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        w = self.fixed_weights.to(losses.device, losses.dtype)
        return torch.where(present, w, torch.zeros_like(w))


@register_loss_fusion("uncertainty")
class UncertaintyWeighting(_Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), learned log-variances.

    Each task k has a learned ``s_k = log sigma_k^2`` (``log_vars``, initialised to 0). Following
    the paper, the term depends on the task's likelihood:

    - regression (Gaussian likelihood, eq. 5/7): ``1 / (2 sigma^2) L + log sigma = 0.5 exp(-s) L + 0.5 s``;
    - classification (scaled softmax, eq. 10 with its approximation): ``1 / sigma^2 L + log sigma
      = exp(-s) L + 0.5 s``.

    ``task_types``: one of those for all tasks, or one per task (default regression). The
    reported ``weights_`` are the loss multipliers, ``0.5 exp(-s_k)`` or ``exp(-s_k)``; they are
    not normalised. An absent task's ``s_k`` gets a zero gradient that step. For a regression loss that is a mean squared error, the optimum is
    ``exp(s_k) = L_k``, the noise variance. Put ``fusion.parameters()`` in the optimizer.
    Absent tasks contribute neither their loss nor their ``s_k`` term.
    """

    def __init__(
        self,
        num_tasks: int,
        task_types: str | Sequence[str] = "regression",
        task_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_tasks, task_names)
        types = [task_types] * num_tasks if isinstance(task_types, str) else list(task_types)
        if len(types) != num_tasks:
            raise ConfigError(f"uncertainty weighting: {len(types)} task_types given for {num_tasks} tasks")
        for k, t in enumerate(types):
            if t not in TASK_TYPES:
                raise ConfigError(f"uncertainty weighting: task {k} has type {t!r}; expected one of {', '.join(TASK_TYPES)}")
        self.task_types = types
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))
        self.register_buffer("scale", torch.tensor([0.5 if t == "regression" else 1.0 for t in types]))

    def _combine(self, losses: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.log_vars.to(losses.device, losses.dtype)
        weights = torch.where(present, self.scale.to(s) * torch.exp(-s), torch.zeros_like(s))
        reg = torch.where(present, 0.5 * s, torch.zeros_like(s)).sum()
        return _weighted_sum(weights, losses, present) + reg, weights


@register_loss_fusion("gradnorm")
class GradNorm(_Weighting):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018): weights that balance gradient norms.

    With weights ``w_k`` (a buffer, initialised to 1, sum K), the network is trained on
    ``sum_k w_k L_k``. At each :meth:`backward`, with ``W`` the ``shared_parameters`` (the paper
    uses the last shared layer: pass that layer's parameters; required):

    - ``G_k = || grad_W w_k L_k ||_2`` and their mean ``G_bar`` (eq. 1-2 of the paper);
    - ``r_k = Ltilde_k / mean(Ltilde)``, ``Ltilde_k = L_k(t) / L_k(0)`` with ``L_k(0)`` the
      task's loss at its first training step;
    - ``L_grad = sum_k | G_k - G_bar * r_k ** alpha |`` (eq. 2), the target held constant;
    - the weights take one step of their own Adam (``lr``) on ``grad_w L_grad`` alone (the task
      loss does not move them), are clamped to at least ``min_weight`` and renormalised to sum K.

    ``weights_`` are the weights the network's loss used this step (the stored weights of the
    present tasks, rescaled to sum to their count when some are absent). Only :meth:`backward`
    updates the weights; calling the module (``forward``) gives the weighted sum with the
    current weights. ``alpha`` (paper: 0.12 to 3, 1.5 on NYUv2) is the asymmetry: 0 pulls
    all gradient norms to the same value. With ``present``, absent tasks keep their weight,
    get 0 this step and are left out of ``G_bar``, ``mean(Ltilde)`` and the renormalisation
    (the present weights keep their sum).
    """

    weights_sum = "tasks"

    def __init__(
        self,
        num_tasks: int,
        alpha: float = 1.5,
        lr: float = 0.025,
        min_weight: float = 1e-3,
        task_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_tasks, task_names)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ConfigError(f"gradnorm: alpha must be a finite number >= 0, found {alpha}")
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"gradnorm: lr must be positive, found {lr}")
        if not (0 < min_weight < 1):
            raise ConfigError(f"gradnorm: min_weight must lie in (0, 1), found {min_weight}")
        self.alpha, self.lr, self.min_weight = float(alpha), float(lr), float(min_weight)
        self.register_buffer("task_weights", torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.full((num_tasks,), math.nan))
        self.register_buffer("adam_m", torch.zeros(num_tasks))
        self.register_buffer("adam_v", torch.zeros(num_tasks))
        self.register_buffer("adam_t", torch.zeros(num_tasks))
        self.grad_norms_: torch.Tensor | None = None

    def _weights(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return _normalise(self.task_weights.to(losses.device, losses.dtype), present, "tasks")

    def backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        *,
        shared_parameters: Iterable[torch.Tensor] | None = None,
        present: Any = None,
    ) -> torch.Tensor:
        """Update the weights by GradNorm's rule, back-propagate ``sum_k w_k L_k``; returns it (detached)."""
        stacked = self.check(losses)
        p = self._present(present, stacked)
        shared = [q for q in (shared_parameters or ()) if q.requires_grad]
        if not shared:
            raise LossFusionError(
                "gradnorm needs shared_parameters: the parameters of the last shared layer (e.g. "
                "model.trunk[-1].parameters()), where the task gradient norms are measured"
            )
        norms = torch.zeros(self.num_tasks, dtype=stacked.dtype, device=stacked.device)
        for k in range(self.num_tasks):
            if not bool(p[k]):
                continue
            grads = torch.autograd.grad(stacked[k], shared, retain_graph=True, allow_unused=True)
            squares = [(g.detach().to(norms.dtype) ** 2).sum() for g in grads if g is not None]
            norms[k] = torch.stack(squares).sum().sqrt() if squares else 0.0
        total, weights = self._combine(stacked, p)
        total.backward()
        self.weights_ = weights.detach()
        self.grad_norms_ = (weights.detach() * norms).detach()
        if self.training:
            self._update(stacked.detach(), p, norms)
        return total.detach()

    @torch.no_grad()
    def _update(self, losses: torch.Tensor, present: torch.Tensor, norms: torch.Tensor) -> None:
        dev = self.task_weights.device
        losses, present, norms = losses.to(dev, torch.float32), present.to(dev), norms.to(dev, torch.float32)
        first = present & torch.isnan(self.initial_losses)
        self.initial_losses[first] = losses[first]
        if int(present.sum()) < 2:
            return  # one task alone has nothing to balance against
        w = self.task_weights
        g = w * norms
        ratio = losses / self.initial_losses.clamp_min(1e-12)
        rel = ratio / ratio[present].mean().clamp_min(1e-12)
        target = g[present].mean() * rel**self.alpha
        grad = torch.sign(g - target) * norms  # d/dw_k |w_k n_k - target_k|, target constant
        grad = torch.where(present, grad, torch.zeros_like(grad))
        # Adam, one step per present task (absent tasks keep their moments and their step count)
        b1, b2 = 0.9, 0.999
        self.adam_t += present.float()
        self.adam_m.copy_(torch.where(present, b1 * self.adam_m + (1 - b1) * grad, self.adam_m))
        self.adam_v.copy_(torch.where(present, b2 * self.adam_v + (1 - b2) * grad**2, self.adam_v))
        t = self.adam_t.clamp_min(1)
        step = self.lr * (self.adam_m / (1 - b1**t)) / (torch.sqrt(self.adam_v / (1 - b2**t)) + 1e-8)
        new = torch.where(present, (w - step).clamp_min(self.min_weight), w)
        new[present] *= w[present].sum() / new[present].sum()
        self.task_weights.copy_(new)


@register_loss_fusion("dwa")
class DynamicWeightAverage(_Weighting):
    """Dynamic weight average (Liu, Johns & Davison, CVPR 2019, "End-to-end multi-task learning with attention", eq. 7).

    ``lambda_k(t) = K exp(w_k(t-1) / T) / sum_i exp(w_i(t-1) / T)`` with ``w_k(t-1) = L_k(t-1) /
    L_k(t-2)``, where ``L_k(t)`` is task k's loss averaged over epoch t; ``w_k = 1`` (equal
    weights) until two epochs are complete. ``temperature`` T = 2 in the paper.

    An epoch here is closed by :meth:`end_epoch` (call it at each epoch end; in
    :func:`modelfuse.zoo.train` pass the fusion itself among the ``callbacks``: its
    ``on_epoch_end`` hook calls it) or, with ``steps_per_epoch``, automatically after that many
    training steps. Losses are recorded at each call in training
    mode (``fusion.train()``, the default). With ``present``: a task's epoch average is over
    the steps where it was present (an epoch where it never was leaves its history unchanged),
    and the softmax runs over the present tasks, scaled by their count.
    """

    weights_sum = "tasks"

    def __init__(
        self,
        num_tasks: int,
        temperature: float = 2.0,
        steps_per_epoch: int | None = None,
        task_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(num_tasks, task_names)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"dwa: temperature must be positive, found {temperature}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ConfigError(f"dwa: steps_per_epoch must be a positive integer or None, found {steps_per_epoch!r}")
        self.temperature, self.steps_per_epoch = float(temperature), steps_per_epoch
        self.register_buffer("epoch_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("epoch_count", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("last", torch.full((num_tasks,), math.nan, dtype=torch.float64))
        self.register_buffer("before_last", torch.full((num_tasks,), math.nan, dtype=torch.float64))
        self.steps_in_epoch = 0

    def _weights(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(self.before_last)
        ratio = torch.where(known, self.last / self.before_last.clamp_min(1e-300), torch.ones_like(self.last))
        weights = _present_softmax(ratio / self.temperature, present.to(ratio.device))
        weights = weights * int(present.sum())
        if self.training:
            pr = present.to(self.epoch_sum.device)
            self.epoch_sum += torch.where(pr, losses.to(self.epoch_sum), torch.zeros_like(self.epoch_sum))
            self.epoch_count += pr.to(self.epoch_count.dtype)
            self.steps_in_epoch += 1
            if self.steps_per_epoch is not None and self.steps_in_epoch >= self.steps_per_epoch:
                self.end_epoch()
        return weights.to(losses.device, losses.dtype)

    @torch.no_grad()
    def end_epoch(self) -> None:
        """Close the current epoch: each task's average loss over it enters the ratio of the next."""
        seen = self.epoch_count > 0
        avg = self.epoch_sum / self.epoch_count.clamp_min(1)
        self.before_last.copy_(torch.where(seen, self.last, self.before_last))
        self.last.copy_(torch.where(seen, avg, self.last))
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        self.steps_in_epoch = 0

    def on_epoch_end(self, state: Any) -> None:
        """The :func:`modelfuse.zoo.train` callback hook: ``callbacks=[fusion]`` closes each epoch."""
        self.end_epoch()


@register_loss_fusion("rlw")
class RandomLossWeighting(_Weighting):
    """Random loss weighting (Lin, Ye, Zhang & Tsang, "Reasonable effectiveness of random weighting:
    a litmus test for multi-task learning", arXiv 2111.10603 (2021), TMLR 2022).

    At every step ``lambda = softmax(eps)`` with ``eps ~ N(0, I_K)`` (the paper's default; it
    also studies other sampling distributions) drawn from the module's own generator seeded
    with ``seed`` (the global RNG is untouched); the weights sum to 1, as in the paper (the
    softmax over the present tasks only, when some are absent).
    """

    weights_sum = "one"

    def __init__(self, num_tasks: int, seed: int = 0, task_names: Sequence[str] | None = None) -> None:
        super().__init__(num_tasks, task_names)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def _weights(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
        return _present_softmax(eps, present.cpu()).to(losses.device, losses.dtype)
