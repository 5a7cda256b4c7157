"""AdaMerging (Yang et al. 2024, "AdaMerging: adaptive model merging for multi-task learning").

Task vectors ``tau_k = theta_k - theta_0`` of K fine-tunes of one base are merged as
``theta = theta_0 + sum_k lambda_k tau_k`` with coefficients learned by minimising the
Shannon entropy of the merged model's predictions on unlabelled inputs (the paper's eq. 6-8):

- ``granularity="task"``: one lambda per task (K coefficients);
- ``granularity="layer"``: one lambda per task and per parameter tensor (K x P coefficients,
  as in the authors' code, where every weight and bias tensor is a "layer").

The objective, as in the paper: with one unlabelled input set per task (``data`` a sequence
of K datasets or Splits, one per fine-tune), every step draws a batch of ``batch_size`` inputs
from *each* task and minimises the sum over tasks of each task's mean entropy on its own
inputs, ``sum_k mean_{x in B_k} H(f(x; theta))``. A task with fewer inputs is cycled to the
length of the longest, so an epoch is one pass over the longest task's inputs. With a single
dataset (or Splits) the objective is the mean entropy over that pooled set of inputs, the
reading this module had first (kept for recipes, which name one data split).

The merged weights are built from the coefficients inside the forward pass and run through
``torch.func.functional_call``, so gradients reach the coefficients; the optimisation runs in
:func:`modelfuse.zoo.train` with the entropy as its custom loss (Adam, lr 1e-3 and lambda
initialised to 0.3 by default, as in the paper). Coefficients are clamped to ``clamp``
(default [0, 1], the paper's range) in the forward pass.

Departures from the paper and the authors' code, on purpose:

- Data: the inputs of a split the user names (default ``"val"``); labels are never read. The
  paper adapts on the test inputs; modelfuse refuses ``split="test"`` unless ``allow_test=True``,
  so test figures stay honest by default.
- Steps: the paper runs 500 iterations of 16 inputs per task; here the length is ``epochs``
  passes over the (longest task's) inputs, since the one training loop counts epochs.
- The paper merges CLIP image encoders and keeps each task's zero-shot head outside the merge;
  here every parameter tensor of the model (a shared head included) gets coefficients.
- Buffers (BatchNorm running statistics) are not learned: floating-point buffers are merged
  with the initial coefficients (task arithmetic with lambda = ``init``), integer buffers come
  from the base. The merged network runs in eval mode throughout (no dropout, running statistics).

Limits: entropy minimisation presumes that confident predictions are right. Where the base is
confidently wrong on a task's inputs (a base pretrained on upright digits, shown rotated ones),
the lowest entropy can lie at lambda = 0 for that task, and AdaMerging then removes the task
vector it should keep. In a network whose logits are not normalised (unlike CLIP, whose image
features are normalised and whose logit scale is fixed), the entropy can also fall by scaling
the logits up (raising the coefficients of every layer) rather than by classifying better: on
the digits transformations of ``benchmarks/multitask_merge.py`` the logits' spread grows about
5.5x while test accuracy falls (benchmarks/RESULTS.md). Normalising the logits does not cure
the first limit: with the zoo MLP's cosine head (fixed scale 20) the spread grows only 1.6x,
but AdaMerging then lowers the entropy by raising one task's vector and lowering the others',
and still falls below task arithmetic on one seed of three there. The root of both: on those
pools the entropy does not rank merges by accuracy at all. Over the grid of task-wise
coefficients {0, 0.1, ..., 1}^3, the Spearman correlation between the entropy objective and the
mean accuracy lies between -0.52 and 0.84 (it must be clearly negative for the method to work),
and the least-entropy merge keeps one or two fine-tunes at 1.0 and drops the rest
(``benchmarks/adamerging_landscape.py``, which measures this for any pool of that benchmark).
Check the result against task arithmetic on labelled held-out data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, TensorDataset

from modelfuse.data.splits import Splits
from modelfuse.errors import ConfigError
from modelfuse.merge.soups import check_same_shapes, held_out
from modelfuse.zoo.train import Callback, train

__all__ = ["GRANULARITIES", "AdaMergingResult", "adamerging", "prediction_entropy"]

GRANULARITIES = ("task", "layer")


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the batch: -sum_c p_c log p_c."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


class _Merged(nn.Module):
    """theta_0 + sum_k lambda_k tau_k as a module whose only trainable parameter is the coefficient table."""

    def __init__(
        self,
        base: nn.Module,
        states: list[dict[str, torch.Tensor]],
        granularity: str,
        init: float,
        clamp: tuple[float, float] | None,
    ) -> None:
        super().__init__()
        self.template = copy.deepcopy(base).eval().requires_grad_(False)
        param_names = [n for n, _ in self.template.named_parameters()]
        base_state, tuned = states[0], states[1:]
        self.names = param_names
        self.clamp = clamp
        self._base = [base_state[n].detach().clone() for n in param_names]
        self._taus = [torch.stack([sd[n] - base_state[n] for sd in tuned]) for n in param_names]
        self._buffers_fixed = {
            n: (base_state[n] + init * sum(sd[n] - base_state[n] for sd in tuned))
            if torch.is_floating_point(base_state[n])
            else base_state[n].clone()
            for n, _ in self.template.named_buffers()
        }
        shape = (len(tuned),) if granularity == "task" else (len(tuned), len(param_names))
        self.lambdas = nn.Parameter(torch.full(shape, float(init)))

    def train(self, mode: bool = True) -> _Merged:
        super().train(mode)
        self.template.eval()  # the merged network always runs in eval mode
        return self

    def to(self, *args: Any, **kwargs: Any) -> _Merged:
        super().to(*args, **kwargs)
        self._base = [t.to(*args, **kwargs) for t in self._base]
        self._taus = [t.to(*args, **kwargs) for t in self._taus]
        self._buffers_fixed = {k: v.to(*args, **kwargs) for k, v in self._buffers_fixed.items()}
        return self

    def coefficients(self) -> torch.Tensor:
        lam = self.lambdas
        return lam.clamp(*self.clamp) if self.clamp is not None else lam

    def merged(self) -> dict[str, torch.Tensor]:
        lam = self.coefficients()
        out = {}
        for j, (name, base, taus) in enumerate(zip(self.names, self._base, self._taus)):
            col = lam if lam.dim() == 1 else lam[:, j]
            weights = col.to(taus.dtype).view(-1, *([1] * (taus.dim() - 1)))
            out[name] = base + (weights * taus).sum(0)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, {**self.merged(), **self._buffers_fixed}, (x,))


def _inputs(dataset: Dataset, max_examples: int | None) -> TensorDataset:
    """The inputs of ``dataset`` (first item of each sample) as a one-tensor dataset; labels are dropped."""
    if isinstance(dataset, TensorDataset):
        x = dataset.tensors[0]
    else:
        x = torch.cat([torch.as_tensor(b[0]) for b in DataLoader(dataset, batch_size=512, shuffle=False)])
    if max_examples is not None:
        x = x[: int(max_examples)]
    return TensorDataset(x)


def _per_task_inputs(xs: Sequence[torch.Tensor]) -> TensorDataset:
    """One dataset whose item i holds task k's input i (cycled where task k has fewer): batches hold every task."""
    n = max(len(x) for x in xs)
    return TensorDataset(*(x[torch.arange(n) % len(x)] for x in xs))


def _task_entropy_sum(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The paper's objective: the sum over tasks of each task's mean entropy on its own inputs."""
    return torch.stack([prediction_entropy(model(x)) for x in batch]).sum()


@torch.no_grad()
def _mean_entropy(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> float:
    total = 0.0
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        total += float(prediction_entropy(model(chunk))) * len(chunk)
    return total / max(len(x), 1)


class _Record(Callback):
    """The entropy of every training batch, step by step."""

    def __init__(self) -> None:
        self.steps: list[float] = []

    def on_step(self, state: Any) -> None:
        self.steps.append(state.loss)


@dataclass
class AdaMergingResult:
    """The merged ``model``, its learned ``coefficients`` ((K,) task-wise, (K, P) layer-wise, after clamping),
    the parameter ``names`` of the P columns, the entropy on the adaptation inputs before and after, and
    the per-step entropy ``losses`` of the training batches."""

    model: nn.Module
    coefficients: torch.Tensor
    names: list[str]
    granularity: str
    split: str
    entropy_before: float
    entropy_after: float
    losses: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


def adamerging(
    base: nn.Module,
    models: Sequence[nn.Module],
    data: Splits | Dataset | Sequence[Splits | Dataset],
    *,
    split: str = "val",
    allow_test: bool = False,
    granularity: str = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    epochs: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    max_examples: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> AdaMergingResult:
    """Learn task-wise or layer-wise merge coefficients of ``models`` (fine-tunes of ``base``) by entropy minimisation.

    ``data`` is a :class:`Splits` whose ``split`` supplies the unlabelled inputs (the test
    split only with ``allow_test=True``), or a Dataset whose items' first element is the input:
    then the objective is the mean entropy over those pooled inputs. ``data`` may instead be a
    list or tuple of one Splits or Dataset per model (the paper's setting): then each step draws
    ``batch_size`` inputs of every task and the objective is the sum over tasks of each task's
    mean entropy (``entropy_before`` / ``entropy_after`` are that sum, over all inputs).
    ``max_examples`` keeps the first that many inputs (of each task). With ``lr=0`` (or
    ``epochs=0``) the result is task arithmetic with lambda = ``init``. Neither ``base`` nor
    the models change.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(
            f"adamerging granularity must be one of {', '.join(GRANULARITIES)}; found {granularity!r}"
        )
    models = list(models)
    if not models:
        raise ConfigError("adamerging needs at least one fine-tuned model besides the base")
    if not math.isfinite(float(init)) or float(lr) < 0:
        raise ConfigError(f"adamerging needs a finite init and lr >= 0; found init={init}, lr={lr}")
    if clamp is not None and not float(clamp[0]) <= float(clamp[1]):
        raise ConfigError(f"adamerging clamp must be (low, high) with low <= high; found {clamp}")
    states = check_same_shapes(
        [base, *models], names=["the base", *[f"model {i}" for i in range(len(models))]]
    )
    per_task = isinstance(data, (list, tuple))
    parts = list(data) if per_task else [data]
    if per_task and len(parts) != len(models):
        raise ConfigError(
            f"adamerging got {len(parts)} per-task data sets for {len(models)} fine-tuned models; "
            "give one data set (or Splits) per model, in the models' order, or a single one to pool"
        )
    xs = []
    for k, part in enumerate(parts):
        what = f"adamerging (task {k})" if per_task else "adamerging"
        x = _inputs(held_out(part, split, allow_test=allow_test, what=what), max_examples).tensors[0]
        if len(x) == 0:
            raise ConfigError(f"{what} got no inputs to adapt on (max_examples=0?)")
        xs.append(x)
    merged = _Merged(base, states, granularity, init, clamp).to(device)
    xs = [x.to(device) for x in xs]

    def entropy_now() -> float:
        return sum(_mean_entropy(merged, x) for x in xs)

    try:
        before = entropy_now()
    except RuntimeError as exc:
        shapes = ", ".join(str(tuple(x[0].shape)) for x in xs)
        raise ConfigError(
            f"adamerging: the models cannot run on the {split!r} inputs (one input is {shapes}): {exc}; "
            "give data of the input shape the models were built for"
        ) from exc
    record = _Record()
    result = train(
        merged,
        _per_task_inputs(xs) if per_task else TensorDataset(xs[0]),
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
        loss=lambda model, batch: _task_entropy_sum(model, batch),
        callbacks=[record],
        device=device,
        progress=progress,
    )
    after = entropy_now()
    with torch.no_grad():
        state = {**{k: v.detach().clone() for k, v in merged.merged().items()}, **merged._buffers_fixed}
        coefficients = merged.coefficients().detach().cpu().clone()
    out = copy.deepcopy(base)
    out.load_state_dict({k: state[k] for k in out.state_dict()})
    return AdaMergingResult(
        model=out,
        coefficients=coefficients,
        names=list(merged.names),
        granularity=granularity,
        split=split,
        entropy_before=before,
        entropy_after=after,
        losses=record.steps,
        history=result.history,
    )
