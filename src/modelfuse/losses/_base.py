"""The one interface of loss fusion: K task losses in, one objective (or one set of gradients) out.

A :class:`LossFusion` works inside any training loop, on any device::

    fusion = get_loss_fusion("uncertainty")(num_tasks=3)
    optimizer = torch.optim.Adam([*model.parameters(), *fusion.parameters()])
    ...
    losses = [loss_digit, loss_parity, loss_big]          # scalars, one per task
    fusion.backward(losses, shared_parameters=model.trunk.parameters())
    optimizer.step()
    fusion.weights_                                        # the task weights this step used

Two kinds share it:

- loss weightings (``uses_gradients = False``) compute a combined loss in ``forward``;
  ``backward`` back-propagates it (``shared_parameters`` is used only by methods that
  look at gradient norms, such as GradNorm);
- gradient methods (``uses_gradients = True``) take each task's gradient with respect to
  the shared parameters, combine the K gradients into one and write it to ``.grad``;
  task-specific parameters receive the gradient of the plain sum of the losses.

A per-sample task mask (tasks with missing labels) enters through
:func:`masked_task_losses`, which gives each task's mean over its labelled samples and
which tasks are ``present`` in the batch; absent tasks get no weight that step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from modelfuse.errors import ConfigError, LossFusionError
from modelfuse.registry import Registry

__all__ = [
    "LossFusion",
    "check_task_losses",
    "get_loss_fusion",
    "list_loss_fusions",
    "masked_task_losses",
    "register_loss_fusion",
]

_REGISTRY: Registry[type[LossFusion]] = Registry("loss fusion method")
C = TypeVar("C", bound="type[LossFusion]")


def register_loss_fusion(name: str):
    """Register a :class:`LossFusion` subclass under ``name`` (its ``name`` attribute is set)."""

    def deco(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, LossFusion)):
            raise ConfigError(f"loss fusion {name!r} must be a LossFusion subclass, found {cls!r}")
        cls.name = name
        _REGISTRY.register(name, cls)
        return cls

    return deco


def get_loss_fusion(name: str) -> type[LossFusion]:
    """The loss fusion class registered as ``name`` (unknown names list the registered ones)."""
    return _REGISTRY.get(name)


def list_loss_fusions(pattern: str = "*") -> list[str]:
    """Registered loss fusion names matching a shell-style ``pattern``, sorted."""
    return _REGISTRY.names(pattern)


def _task_label(names: Sequence[str] | None, k: int) -> str:
    return f"task {k} ({names[k]!r})" if names else f"task {k}"


def check_task_losses(
    losses: Sequence[torch.Tensor] | torch.Tensor, num_tasks: int, task_names: Sequence[str] | None = None
) -> torch.Tensor:
    """The K task losses stacked into one vector, after checking their count, shape and finiteness.

    Raises LossFusionError naming the task whose loss is NaN or infinite (a non-finite loss
    would poison every learned weight), and when the count differs from ``num_tasks``.
    """
    if isinstance(losses, torch.Tensor):
        if losses.dim() != 1:
            raise LossFusionError(
                f"task losses as one tensor must be a vector of {num_tasks} scalars, found shape {tuple(losses.shape)}"
            )
        items = list(losses.unbind(0))
    else:
        items = list(losses)
    if len(items) != num_tasks:
        raise LossFusionError(
            f"expected {num_tasks} task losses (one per task), found {len(items)}; "
            "pass one scalar loss per task in the order the fusion was built with"
        )
    for k, loss in enumerate(items):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise LossFusionError(
                f"the loss of {_task_label(task_names, k)} must be a scalar tensor, found {shape}; "
                "reduce it (e.g. .mean()) before fusing"
            )
    stacked = torch.stack([loss.reshape(()) for loss in items])
    finite = torch.isfinite(stacked.detach())
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0, 0])
        raise LossFusionError(
            f"the loss of {_task_label(task_names, k)} is {float(stacked[k].detach())}; "
            "a non-finite loss would poison the task weights: check that task's inputs, labels and learning rate"
        )
    return stacked


def masked_task_losses(
    per_sample: Sequence[torch.Tensor] | torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task's mean loss over the samples that carry its label, and which tasks are present.

    ``per_sample``: K tensors of shape (N,) or one (N, K) tensor of per-sample losses (computed
    with ``reduction="none"``; entries of unlabelled samples may hold anything finite or not, they
    are never read). ``mask``: (N, K) booleans, True where sample n has a label for task k.
    Returns ``(losses, present)``: (K,) losses (0 for a task with no labelled sample, still part of
    the graph) and (K,) booleans.
    """
    cols = list(per_sample.unbind(1)) if isinstance(per_sample, torch.Tensor) else list(per_sample)
    if mask.dim() != 2 or mask.shape[1] != len(cols):
        raise LossFusionError(
            f"the task mask must have shape (samples, {len(cols)}), found {tuple(mask.shape)}"
        )
    mask = mask.to(torch.bool)
    out = []
    for k, col in enumerate(cols):
        if col.shape != mask[:, k].shape:
            raise LossFusionError(
                f"per-sample losses of task {k} have shape {tuple(col.shape)}, the mask has {mask.shape[0]} samples"
            )
        m = mask[:, k]
        n = int(m.sum())
        picked = torch.where(m, col, torch.zeros((), dtype=col.dtype, device=col.device))
        out.append(picked.sum() / max(n, 1))
    return torch.stack(out), mask.any(0)


class LossFusion(nn.Module):
    """One training objective from K task losses; see the module docstring for the two kinds.

    Subclasses set ``uses_gradients`` and implement ``forward`` (weightings: combined loss)
    or ``combine_gradients`` (gradient methods: (K, P) Jacobian -> (P,) update direction).
    ``weights_`` holds the (K,) task weights of the last step where the method defines them
    (0 for tasks absent that step). ``weights_sum`` says how the method normalises them:
    ``"tasks"`` (the present tasks' weights sum to the number of present tasks, K when all
    are present), ``"one"`` (they sum to 1) or None (no normalisation, e.g. fixed weights).
    """

    name: ClassVar[str] = ""
    uses_gradients: ClassVar[bool] = False
    weights_sum: ClassVar[str | None] = None

    def __init__(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ConfigError(f"num_tasks must be a positive integer, found {num_tasks!r}")
        if task_names is not None and len(task_names) != num_tasks:
            raise ConfigError(f"{len(task_names)} task names given for {num_tasks} tasks")
        self.num_tasks = num_tasks
        self.task_names = list(task_names) if task_names is not None else None
        self.weights_: torch.Tensor | None = None

    def check(self, losses: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return check_task_losses(losses, self.num_tasks, self.task_names)

    def _present(self, present: torch.Tensor | Sequence[bool] | None, like: torch.Tensor) -> torch.Tensor:
        if present is None:
            return torch.ones(self.num_tasks, dtype=torch.bool, device=like.device)
        p = torch.as_tensor(present, dtype=torch.bool, device=like.device)
        if p.shape != (self.num_tasks,):
            raise LossFusionError(f"present must hold {self.num_tasks} booleans, found shape {tuple(p.shape)}")
        return p

    def forward(self, losses: Sequence[torch.Tensor] | torch.Tensor, *, present: Any = None) -> torch.Tensor:
        raise LossFusionError(
            f"{self.name or type(self).__name__} combines gradients, not losses: call "
            ".backward(losses, shared_parameters=...) instead of using its output as a loss"
        )

    def backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        *,
        shared_parameters: Iterable[torch.Tensor] | None = None,
        present: Any = None,
    ) -> torch.Tensor:
        """Back-propagate the fused objective; returns the combined loss (detached) for logging."""
        total = self(losses, present=present)
        total.backward()
        return total.detach()
