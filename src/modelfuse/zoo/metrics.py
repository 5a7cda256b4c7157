"""The one place for classification figures and the checks of their inputs.

- ``check_logits_labels(logits, labels)``: logits (N, C) (or the members' stacked (K, N, C)
  with ``stacked=True``) and integer labels (N,) in [0, C), with errors that say which input
  is wrong, what was expected and what was found;
- ``accuracy``, ``nll`` (mean negative log-likelihood in nats, from a float64 log-softmax) and
  ``accuracy_nll`` (both, one check).

The figures take logits or log-probabilities alike: the log-softmax of log-probabilities is
themselves, so a combiner's output (log-probabilities, -inf allowed) scores the same way as a
model's logits. Every part of modelfuse that reports accuracy or NLL goes through here.
"""

from __future__ import annotations

from typing import Any

import torch

from modelfuse.errors import ConfigError

__all__ = ["accuracy", "accuracy_nll", "check_logits_labels", "nll"]


def check_logits_labels(
    logits: Any,
    labels: Any,
    *,
    what: str = "logits",
    stacked: bool = False,
    min_samples: int = 0,
    finite: bool = False,
) -> tuple[torch.Tensor, Any]:
    """``logits`` and ``labels`` as tensors (the logits as given, the labels int64), or a ``ConfigError``.

    ``logits``: floating point, (N, C), or (K, N, C) with ``stacked=True`` (K members' outputs).
    ``labels``: integer, (N,), each in [0, C); None checks the logits alone (and is returned).
    ``what`` names the logits in messages; ``min_samples``: the least N accepted; ``finite``:
    refuse NaN and infinite logits.
    """
    if not isinstance(logits, torch.Tensor):
        try:
            logits = torch.as_tensor(logits)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{what} must be a tensor of logits; found a {type(logits).__name__}") from exc
    expected = "(members, samples, classes)" if stacked else "(samples, classes)"
    if logits.dim() != (3 if stacked else 2) or (stacked and logits.shape[0] < 1):
        raise ConfigError(f"{what} must be {expected} logits; found shape {tuple(logits.shape)}")
    if not torch.is_floating_point(logits):
        raise ConfigError(f"{what} must be floating-point logits; found {logits.dtype}")
    n, classes = logits.shape[-2], logits.shape[-1]
    if n < min_samples:
        raise ConfigError(f"{what} has {n} samples; at least {min_samples} are needed")
    if finite and not bool(torch.isfinite(logits).all()):
        raise ConfigError(f"{what} contain NaN or infinite values")
    if labels is None:
        return logits, None
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"labels must be a 1-D integer tensor; found a {type(labels).__name__}") from exc
    if y.dim() != 1 or torch.is_floating_point(y) or torch.is_complex(y) or y.dtype == torch.bool:
        raise ConfigError(
            f"labels must be a 1-D integer tensor (one class index per sample); found shape "
            f"{tuple(y.shape)}, {y.dtype}"
        )
    if y.shape[0] != n:
        raise ConfigError(
            f"{y.shape[0]} labels for {n} samples of {what} (shape {tuple(logits.shape)}): give one label per sample"
        )
    if n and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ConfigError(
            f"labels must lie in [0, {classes}) for the {classes} classes of {what}; "
            f"found {int(y.min())}..{int(y.max())}"
        )
    return logits, y.long()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).double().mean().item()


def _nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -log_probs.gather(1, labels.unsqueeze(1)).mean().item()


def accuracy(logits: Any, labels: Any) -> float:
    """Share of samples whose highest-scoring class is the label (nan for no samples)."""
    z, y = check_logits_labels(logits, labels)
    return _accuracy(z, y)


def nll(logits: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the labels in nats, from a float64 log-softmax of ``logits``
    (inf where a label has probability 0; nan for no samples)."""
    z, y = check_logits_labels(logits, labels)
    return _nll(z, y)


def accuracy_nll(logits: Any, labels: Any) -> dict[str, float]:
    """``{"accuracy": ..., "nll": ...}`` of one prediction (one check for both)."""
    z, y = check_logits_labels(logits, labels)
    return {"accuracy": _accuracy(z, y), "nll": _nll(z, y)}
