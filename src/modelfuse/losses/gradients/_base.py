"""The base of gradient methods: K task gradients w.r.t. the shared parameters -> one update.

:class:`GradientFusion.backward` takes each present task's gradient with respect to the
shared parameters (one ``torch.autograd.grad`` per task, the graph retained), flattens them
into a (K, P) Jacobian ``J``, asks :meth:`GradientFusion.combine_gradients` for the (P,)
update direction and adds it to the parameters' ``.grad`` (accumulating like autograd).

Every method here is a *weighting of the rows of J*: ``combine_gradients(J)`` is
``task_weights(J) @ J``, and ``weights_`` holds those combination coefficients (K,), with 0
for tasks absent from the batch. The weights are computed in float64 from the Gramian
``J @ J.T`` (K x K, on the CPU), which is all these methods look at.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from modelfuse.errors import LossFusionError
from modelfuse.losses._base import LossFusion, _task_label

__all__ = ["GradientFusion", "gramian_of", "named_parameters_of"]


def named_parameters_of(
    parameters: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None, role: str
) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a module, of ``named_parameters()`` or of plain tensors (named by position)."""
    if parameters is None:
        return []
    if isinstance(parameters, nn.Module):
        return list(parameters.named_parameters())
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    out = []
    for i, item in enumerate(parameters):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            name, tensor = str(item[0]), item[1]
        elif isinstance(item, torch.Tensor):
            name, tensor = f"{role} parameter #{i} (shape {tuple(item.shape)})", item
        else:
            raise LossFusionError(
                f"{role} parameters must be tensors, (name, tensor) pairs or a module; item {i} is {type(item).__name__}"
            )
        if not tensor.requires_grad:
            raise LossFusionError(
                f"{role} parameter {name!r} does not require grad; pass only trainable parameters"
            )
        out.append((name, tensor))
    return out


def gramian_of(jacobian: torch.Tensor, chunk: int = 1 << 22) -> np.ndarray:
    """``J @ J.T`` in float64 on J's device, a block of columns at a time (bounded extra memory), as NumPy."""
    k, p = jacobian.shape
    gram = torch.zeros(k, k, dtype=torch.float64, device=jacobian.device)
    for start in range(0, p, chunk):
        block = jacobian[:, start : start + chunk].to(torch.float64)
        gram += block @ block.T
    return gram.cpu().numpy()


def _check_reached(
    named: list[tuple[str, torch.Tensor]], reached: list[bool], role: str, source: str
) -> None:
    missing = [name for (name, _), ok in zip(named, reached, strict=True) if not ok]
    if missing:
        raise LossFusionError(
            f"{role}(s) {', '.join(repr(m) for m in missing)} received no gradient from {source}; "
            "pass only tensors the losses depend on"
        )


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(dtype=param.dtype).view_as(param)
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


class GradientFusion(LossFusion):
    """Base of the gradient-combination methods (``uses_gradients = True``).

    Subclasses implement :meth:`task_weights` ((K, K) float64 Gramian and the (K, P) Jacobian
    -> (K,) float64 weights); :meth:`combine_gradients` is then ``weights @ J``.
    """

    uses_gradients = True

    def __init__(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        super().__init__(num_tasks, task_names)
        #: the coefficients of the last ``combine_gradients`` call, one per Jacobian row
        self.last_weights_: torch.Tensor | None = None

    def task_weights(self, gramian: np.ndarray, jacobian: torch.Tensor) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def combine_gradients(self, jacobian: torch.Tensor) -> torch.Tensor:
        """The (P,) update direction from the (K, P) Jacobian of the present tasks' losses.

        Pure apart from the method's random generator (PCGrad) and ``last_weights_``, which
        holds the (K,) coefficients with ``direction = last_weights_ @ jacobian``.
        """
        if not isinstance(jacobian, torch.Tensor) or jacobian.dim() != 2 or jacobian.shape[0] < 1:
            shape = tuple(jacobian.shape) if isinstance(jacobian, torch.Tensor) else type(jacobian).__name__
            raise LossFusionError(
                f"the Jacobian must be a (tasks, parameters) matrix with at least one row, found {shape}"
            )
        finite = torch.isfinite(jacobian).all(dim=1)
        if not bool(finite.all()):
            k = int((~finite).nonzero()[0, 0])
            raise LossFusionError(
                f"row {k} of the Jacobian (a task's gradient) holds NaN or infinite values; "
                "check that task's loss for overflow and lower the learning rate"
            )
        gramian = gramian_of(jacobian.detach())
        weights = np.asarray(self.task_weights(gramian, jacobian.detach()), dtype=np.float64)
        if weights.shape != (jacobian.shape[0],) or not np.all(np.isfinite(weights)):
            raise LossFusionError(  # a bug in a method, never the user's input
                f"{self.name or type(self).__name__} produced weights {weights!r} for {jacobian.shape[0]} tasks"
            )
        w = torch.from_numpy(weights).to(device=jacobian.device, dtype=jacobian.dtype)
        self.last_weights_ = w
        return w @ jacobian.detach()

    def _jacobian(
        self, items: list[torch.Tensor], tasks: list[int], named: list[tuple[str, torch.Tensor]], role: str
    ) -> torch.Tensor:
        """(K', P) gradients of the present tasks' losses w.r.t. ``named``; unreached tensors raise."""
        tensors = [t for _, t in named]
        rows = []
        reached = [False] * len(tensors)
        for k in tasks:
            grads = torch.autograd.grad(items[k], tensors, retain_graph=True, allow_unused=True)
            row = []
            for i, (t, g) in enumerate(zip(tensors, grads, strict=True)):
                if g is None:
                    g = torch.zeros_like(t)
                else:
                    reached[i] = True
                row.append(g.reshape(-1))
            rows.append(torch.cat(row))
            if not bool(torch.isfinite(rows[-1]).all()):
                raise LossFusionError(
                    f"the gradient of {_task_label(self.task_names, k)} w.r.t. the {role}s holds NaN or "
                    "infinite values although its loss is finite; check that task's head for overflow "
                    "(e.g. log of 0) and lower the learning rate"
                )
        _check_reached(named, reached, role, f"any present task ({len(tasks)} of {self.num_tasks})")
        return torch.stack(rows)

    def backward(
        self,
        losses: Sequence[torch.Tensor] | torch.Tensor,
        *,
        shared_parameters: Any = None,
        task_parameters: Any = None,
        present: Any = None,
        representation: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Write the combined gradient of the shared parameters into their ``.grad``.

        ``shared_parameters``: a module, ``named_parameters()`` or tensors (required).
        ``task_parameters``: task-specific parameters (heads); they receive the gradient of
        the plain sum of the present tasks' losses. When left out they receive nothing: pass
        them, or back-propagate the heads yourself. ``present``: (K,) booleans, tasks absent
        from this batch (no labelled sample) are dropped from the Jacobian and get weight 0.
        ``representation``: the shared representation (the trunk's output tensor(s) in this
        step's graph). When given, the weights come from the tasks' gradients with respect to
        it -- Sener & Koltun's "upper bound" (MGDA-UB), one backward pass through the trunk
        instead of K -- and the shared parameters receive the gradient of
        ``sum_k weights_k loss_k``. Returns that weighted sum (detached), for logging.
        """
        stacked = self.check(losses)
        # differentiate each task's own loss tensor, not an entry of the stacked vector: through
        # the stack, every task's backward would run for every row (with zeros, which turn an
        # infinite local derivative of another task into NaN)
        items = [t.reshape(()) for t in (losses.unbind(0) if isinstance(losses, torch.Tensor) else losses)]
        shared = named_parameters_of(shared_parameters, "shared")
        if not shared:
            raise LossFusionError(
                f"{self.name or type(self).__name__} combines gradients w.r.t. the shared parameters: "
                "pass shared_parameters=model.trunk.parameters() (or the module) to backward()"
            )
        heads = named_parameters_of(task_parameters, "task")
        shared_ids = {id(t) for _, t in shared}
        for name, t in heads:
            if id(t) in shared_ids:
                raise LossFusionError(
                    f"parameter {name!r} is passed both as shared and as task-specific; pick one"
                )
        reps = None
        if representation is not None:
            given = [representation] if isinstance(representation, torch.Tensor) else list(representation)
            reps = named_parameters_of(
                [(f"representation #{i} (shape {tuple(t.shape)})", t) for i, t in enumerate(given)],
                "representation",
            )
        present_mask = self._present(present, stacked)
        tasks = [int(k) for k in present_mask.nonzero().flatten()]
        params = [t for _, t in shared]
        weights = torch.zeros(self.num_tasks, dtype=stacked.dtype, device=stacked.device)
        if tasks:
            if reps is None:
                direction = self.combine_gradients(self._jacobian(items, tasks, shared, "shared parameter"))
                weights[tasks] = self.last_weights_.to(dtype=weights.dtype, device=weights.device)
                grads = []
                start = 0
                for p in params:
                    grads.append(direction[start : start + p.numel()])
                    start += p.numel()
            else:
                self.combine_gradients(self._jacobian(items, tasks, reps, "representation"))
                weights[tasks] = self.last_weights_.to(dtype=weights.dtype, device=weights.device)
                objective = sum(weights[k] * items[k] for k in tasks)
                grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
                _check_reached(
                    shared, [g is not None for g in grads], "shared parameter", "the weighted losses"
                )
            for p, g in zip(params, grads, strict=True):
                _accumulate(p, g)
            if heads:
                head_params = [t for _, t in heads]
                grads = torch.autograd.grad(sum(items[k] for k in tasks), head_params, allow_unused=True)
                for p, g in zip(head_params, grads, strict=True):
                    if g is not None:
                        _accumulate(p, g)
        self.weights_ = weights.detach()
        return (weights * stacked.detach()).sum()
