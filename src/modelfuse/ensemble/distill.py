"""Knowledge distillation of an ensemble (or any set of teachers) into one student network.

The teachers (architectures may differ; they must predict the same classes) run once over
the training split in eval mode without gradients; their logits are cached next to the
inputs in a ``TensorDataset(x, y, teacher_logits)`` and the student trains on it through
the one loop, :func:`modelfuse.zoo.train.train`, with :class:`KDLoss` as its ``loss=``.
:class:`DistillReport` puts the student next to the best single teacher, the ensemble and
a student-sized model trained from scratch with the same budget and seed.

The KD formula and the teacher weightings are :mod:`modelfuse.losses.distillation`'s (one
formula in the package); this level is built on that one, which also offers
:class:`~modelfuse.losses.MultiTeacherDistillation` for teachers run on every batch, learned
teacher weights and feature hints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from modelfuse.data.splits import Splits
from modelfuse.ensemble.combiners import mean_prob
from modelfuse.ensemble.module import check_models, check_weights
from modelfuse.ensemble.training import ModelArg, _check_kwargs, build_model
from modelfuse.errors import ConfigError
from modelfuse.losses.distillation import (
    check_alpha,
    check_temperature,
    distillation_loss,
    teacher_log_weights,
    weights_spec,
)
from modelfuse.losses.distillation import teacher_mixture as _teacher_mixture
from modelfuse.zoo.metrics import accuracy_nll, check_logits_labels
from modelfuse.zoo.train import OptimizerArg, TrainResult, predict, train

#: per-sample teacher weightings by name (anything else is a list of fixed weights or None)
WEIGHTINGS = ("confidence", "true_label")
TeacherWeights = Sequence[float] | torch.Tensor | str | None


def teacher_logits(
    teachers: Sequence[nn.Module],
    dataset: Dataset,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The teachers' logits on every item of ``dataset``, stacked (K, N, classes) on the CPU.

    Each teacher runs in eval mode without gradients (its mode is restored afterwards).
    Raises ConfigError when there are no teachers or their numbers of classes differ.
    """
    teachers = _check_teachers(teachers)
    outs = []
    for i, t in enumerate(teachers):
        out = predict(t, dataset, batch_size=batch_size, device=device)
        if out.dim() != 2:
            raise ConfigError(
                f"teacher {i} ({type(t).__name__}) gives outputs of shape {tuple(out.shape)}; "
                "distillation needs class logits of shape (N, classes)"
            )
        if outs and out.shape != outs[0].shape:
            raise ConfigError(
                f"teacher {i} ({type(t).__name__}) gives {out.shape[1]} class scores, teacher 0 "
                f"({type(teachers[0]).__name__}) {outs[0].shape[1]}: teachers must predict the same classes"
            )
        outs.append(out.float())
    return torch.stack(outs)


def teacher_weights(
    logits: torch.Tensor, labels: torch.Tensor | None = None, *, weights: TeacherWeights = None
) -> torch.Tensor:
    """Per-sample mixture weights (K, N) of K teachers' ``logits`` (K, N, C), each column summing to one.

    - None: equal weights; a sequence of K non-negative numbers (not all zero): those, normalised.
    - ``"confidence"``: proportional to each teacher's maximum probability (softmax at
      temperature 1) on that sample: trust the teacher that is surest.
    - ``"true_label"``: proportional to each teacher's probability (temperature 1) of the
      sample's true label (needs ``labels``): trust the teacher that is right.

    The other per-sample weightings of :mod:`modelfuse.losses.distillation` (``entropy``,
    ``ca_mkd``) are accepted too.
    """
    _check_logits(logits, labels)
    return teacher_log_weights(logits, _labels(labels), _weights_spec(weights, logits.shape[0])).exp()


def teacher_mixture(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    weights: TeacherWeights = None,
) -> torch.Tensor:
    """Log of the teachers' mixture distribution at ``temperature``: ``log sum_k w_k softmax(z_k / T)``,
    (N, C), with the weights of :func:`teacher_weights`."""
    _check_logits(logits, labels)
    spec = _weights_spec(weights, logits.shape[0])
    return _teacher_mixture(logits, _labels(labels), temperature=temperature, weights=spec)


def kd_loss(
    student_logits: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 4.0,
    alpha: float = 0.9,
    weights: TeacherWeights = None,
) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton et al. 2015, sec. 2), averaged over the batch:
    ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, y)``.

    ``student_logits`` (N, C); ``logits`` the teachers' (K, N, C), mixed into
    ``p_teacher^T = sum_k w_k softmax(z_k / T)`` by :func:`teacher_weights`;
    ``p_student^T = softmax(s / T)``. The ``T^2`` keeps the soft term's gradients on the
    scale of the hard term's as ``T`` changes. ``alpha = 0`` is plain cross-entropy. The
    formula is :func:`modelfuse.losses.distillation_loss`'s (the package has one).
    """
    _check_logits(logits, labels)
    spec = _weights_spec(weights, logits.shape[0])
    return distillation_loss(
        student_logits, logits, _labels(labels), temperature=temperature, alpha=alpha, weights=spec
    )


class KDLoss:
    """``loss(model, batch)`` for :func:`train` over ``(x, y, teacher_logits)`` batches, the cached
    teacher logits of each sample stored as (K, C); see :func:`kd_loss`."""

    def __init__(self, *, temperature: float, alpha: float, weights: TeacherWeights, teachers: int) -> None:
        self.temperature = check_temperature(temperature)
        self.alpha = check_alpha(alpha)
        self.weights = _weights_spec(weights, teachers)

    def __call__(self, model: nn.Module, batch: tuple[Any, ...]) -> torch.Tensor:
        x, y, z = batch[0], batch[1], batch[2]
        return distillation_loss(
            model(x),
            z.transpose(0, 1),
            y,
            temperature=self.temperature,
            alpha=self.alpha,
            weights=self.weights,
        )


@dataclass
class DistillReport:
    """Test metrics (``accuracy``, ``nll``) of the student, the best single teacher (by
    validation accuracy, then NLL), the teachers' ensemble and, if trained, the scratch model.

    ``gap_closed[m] = (student - best) / (ensemble - best)`` for ``m`` in accuracy and nll:
    0 is no better than the best teacher, 1 as good as the ensemble (NaN, printed n/a, where
    the ensemble is not better than the best teacher: there is no gap to close);
    ``scratch_gap_closed`` is the same for the scratch model.
    """

    student: dict[str, float]
    best_teacher: dict[str, float]
    best_index: int
    ensemble: dict[str, float]
    teachers: list[dict[str, float]]
    gap_closed: dict[str, float]
    scratch: dict[str, float] | None = None
    scratch_gap_closed: dict[str, float] | None = None

    def table(self) -> str:
        """The figures as aligned text lines."""
        rows = [("student", self.student, self.gap_closed)]
        if self.scratch is not None:
            rows.append(("scratch", self.scratch, self.scratch_gap_closed or {}))
        rows.append((f"best teacher ({self.best_index})", self.best_teacher, {}))
        rows.append(("ensemble", self.ensemble, {}))
        lines = [f"{'':<20}{'accuracy':>10}{'nll':>10}{'acc gap':>10}{'nll gap':>10}"]
        for name, m, gap in rows:
            gaps = "".join(_gap_cell(gap.get(k)) for k in ("accuracy", "nll"))
            lines.append(f"{name:<20}{m['accuracy']:>10.4f}{m['nll']:>10.4f}{gaps}")
        return "\n".join(lines)


@dataclass
class Distillation:
    """The trained ``student`` and its :class:`TrainResult`, the cached training-set
    ``teacher_logits`` (K, N, C), the optional ``scratch`` baseline and the ``report``
    (None unless ``data`` was a Splits)."""

    student: nn.Module
    result: TrainResult
    teacher_logits: torch.Tensor
    scratch: nn.Module | None = None
    scratch_result: TrainResult | None = None
    report: DistillReport | None = None


def distill(
    student: ModelArg,
    teachers: Sequence[nn.Module],
    data: Splits | Dataset,
    *,
    epochs: int,
    seed: int = 0,
    temperature: float = 4.0,
    alpha: float = 0.9,
    weights: TeacherWeights = None,
    scratch: bool = False,
    lr: float = 1e-3,
    optimizer: OptimizerArg = "adam",
    model_kwargs: Mapping[str, Any] | None = None,
    teacher_batch_size: int = 512,
    **train_kwargs: Any,
) -> Distillation:
    """Distil ``teachers`` into ``student`` with :func:`kd_loss` (Hinton et al. 2015) for ``epochs``.

    ``student``: a zoo name, factory or module (copied), built with ``seed``. The training
    split is held in memory with the teachers' logits, computed once, next to each sample.
    ``scratch=True`` also trains the same student from the same initial weights with plain
    cross-entropy and identical settings (the equal-budget baseline). With a Splits, the
    result carries a :class:`DistillReport`. ``train_kwargs`` (``batch_size``, ``schedule``,
    ``device``, ``callbacks``...) go to :func:`train` for the student (callbacks only there).
    """
    teachers = _check_teachers(teachers)
    _check_kwargs(train_kwargs, "distill", reserved=("epochs", "seed", "loss"))
    loss = KDLoss(temperature=temperature, alpha=alpha, weights=weights, teachers=len(teachers))
    train_set = data.train if isinstance(data, Splits) else data
    x, y = _materialise(train_set)
    cached = teacher_logits(teachers, TensorDataset(x, y), batch_size=teacher_batch_size)
    net = build_model(student, data, seed=seed, model_kwargs=model_kwargs)
    _check_student(net, x[:1], cached.shape[-1], data)
    kd_set = TensorDataset(x, y, cached.transpose(0, 1).contiguous())
    kd_data = replace(data, train=kd_set) if isinstance(data, Splits) else kd_set
    result = train(
        net, kd_data, epochs=epochs, seed=seed, lr=lr, optimizer=optimizer, loss=loss, **train_kwargs
    )
    out = Distillation(student=net.eval(), result=result, teacher_logits=cached)
    if scratch:
        base = build_model(student, data, seed=seed, model_kwargs=model_kwargs)
        others = {k: v for k, v in train_kwargs.items() if k != "callbacks"}
        plain = TensorDataset(x, y)  # the same samples in the same batches as the student's
        plain_data = replace(data, train=plain) if isinstance(data, Splits) else plain
        out.scratch_result = train(
            base, plain_data, epochs=epochs, seed=seed, lr=lr, optimizer=optimizer, **others
        )
        out.scratch = base.eval()
    if isinstance(data, Splits):
        fixed = weights if not isinstance(weights, str) else None
        out.report = distill_report(out.student, teachers, data, scratch=out.scratch, weights=fixed)
    return out


def distill_report(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    data: Splits,
    *,
    scratch: nn.Module | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    batch_size: int = 512,
) -> DistillReport:
    """Test accuracy and NLL of ``student`` (and ``scratch``) against the best teacher (chosen
    by validation accuracy, ties by validation NLL) and the ensemble: the mean of the teachers'
    probabilities, with fixed ``weights`` if given (per-sample weightings need labels, so the
    ensemble uses equal weights for them)."""
    teachers = _check_teachers(teachers)
    w = check_weights(weights, len(teachers), what="teacher")
    x_test, y_test = _materialise(data.test)
    x_val, y_val = _materialise(data.val)
    test_logits = teacher_logits(teachers, TensorDataset(x_test, y_test), batch_size=batch_size)
    val_logits = teacher_logits(teachers, TensorDataset(x_val, y_val), batch_size=batch_size)
    rows = []
    for k in range(len(teachers)):
        row = _scores(torch.log_softmax(test_logits[k], -1), y_test)
        val = _scores(torch.log_softmax(val_logits[k], -1), y_val)
        row.update(val_accuracy=val["accuracy"], val_nll=val["nll"])
        rows.append(row)
    best = min(range(len(rows)), key=lambda k: (-rows[k]["val_accuracy"], rows[k]["val_nll"], k))
    ensemble = _scores(mean_prob(test_logits, w), y_test)
    best_row = {"accuracy": rows[best]["accuracy"], "nll": rows[best]["nll"]}

    def score(model: nn.Module) -> dict[str, float]:
        return _scores(
            torch.log_softmax(predict(model, TensorDataset(x_test), batch_size=batch_size), -1), y_test
        )

    def closed(m: dict[str, float]) -> dict[str, float]:
        return {
            k: _fraction(m[k], best_row[k], ensemble[k], higher=k == "accuracy") for k in ("accuracy", "nll")
        }

    student_row = score(student)
    scratch_row = score(scratch) if scratch is not None else None
    return DistillReport(
        student=student_row,
        best_teacher=best_row,
        best_index=best,
        ensemble=ensemble,
        teachers=rows,
        gap_closed=closed(student_row),
        scratch=scratch_row,
        scratch_gap_closed=closed(scratch_row) if scratch_row is not None else None,
    )


def _labels(labels: torch.Tensor | None) -> torch.Tensor | None:
    return torch.as_tensor(labels).long() if labels is not None else None


def _weights_spec(weights: TeacherWeights, count: int) -> torch.Tensor | str | None:
    """None, a weighting name, or fixed weights validated and normalised (float64, K)."""
    return weights_spec(weights, count)


def _check_teachers(teachers: Sequence[nn.Module]) -> list[nn.Module]:
    return check_models(teachers, what="teacher", purpose="distillation")


def _check_logits(logits: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    check_logits_labels(logits, labels, what="the teachers' logits", stacked=True)


def _check_student(student: nn.Module, x: torch.Tensor, classes: int, data: Splits | Dataset) -> None:
    """ConfigError unless the student's outputs (one sample, eval mode) have the teachers' number of classes."""
    if isinstance(data, Splits) and data.num_classes != classes:
        raise ConfigError(
            f"the teachers give {classes} class scores but {data.name!r} has {data.num_classes} classes"
        )
    out = predict(student, TensorDataset(x))
    if out.dim() != 2 or out.shape[1] != classes:
        raise ConfigError(
            f"the student ({type(student).__name__}) gives outputs of shape {tuple(out.shape[1:])} per sample, "
            f"the teachers {classes} class scores: build the student for {classes} classes"
        )


def _materialise(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(x, y)`` of ``dataset`` as two tensors, in order."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[0], dataset.tensors[1]
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=512, shuffle=False):
        if len(batch) < 2:
            raise ConfigError("distillation needs (x, y) samples; the dataset gives no labels")
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise ConfigError("distillation got an empty dataset")
    return torch.cat(xs), torch.cat(ys)


def _scores(log_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return accuracy_nll(log_probs, labels)


def _gap_cell(value: float | None) -> str:
    """A gap fraction as a table cell: blank where it does not apply, n/a where the ensemble is not better."""
    if value is None:
        return f"{'':>10}"
    return f"{'n/a':>10}" if math.isnan(value) else f"{value:>10.1%}"


def _fraction(value: float, best: float, ensemble: float, *, higher: bool) -> float:
    """Share of the best-to-ensemble gap that ``value`` closes; NaN where the ensemble is not
    better than the best teacher (``higher``: larger is better), since there is no gap to close."""
    better = ensemble > best if higher else ensemble < best
    return (value - best) / (ensemble - best) if better else math.nan


__all__ = [
    "WEIGHTINGS",
    "DistillReport",
    "Distillation",
    "KDLoss",
    "distill",
    "distill_report",
    "kd_loss",
    "teacher_logits",
    "teacher_mixture",
    "teacher_weights",
]
