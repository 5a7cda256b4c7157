"""Runtime helpers of packed ensembles: the functions the rewritten (packed) graph calls.

Each takes the packed activation (N, K*C, ...) and does what the member's operation did to
its own (N, C, ...), refusing (with the graph node's name) what would mix the members.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from modelfuse.errors import EnsembleError

_BINARY_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
# the rewritten graph names a binary function by a string (generated code cannot spell a function value)
_BINARY_BY_NAME: dict[str, Any] = {f"{fn.__module__}.{fn.__name__}": fn for fn in _BINARY_FUNCTIONS}
_INPLACE_BINARY = {
    f"{fn.__module__}.{fn.__name__}"
    for fn in (operator.iadd, operator.isub, operator.imul, operator.itruediv)
}


# ------------------------------------------------------------------------------------ runtime helpers
# The rewritten graph calls these functions; ``members`` is K, ``where`` the graph node they stand for.


def _member_view(x: torch.Tensor, members: int, where: str) -> torch.Tensor:
    """(N, K*C, ...) seen as (N, K, C, ...): member k's tensor is ``[:, k]``."""
    if x.dim() < 2 or x.shape[1] % members:
        raise EnsembleError(
            f"graph node {where!r}: a packed tensor of shape {tuple(x.shape)} does not split into "
            f"{members} member blocks along dim 1"
        )
    return x.view(x.shape[0], members, x.shape[1] // members, *x.shape[2:])


def _from_member_view(v: torch.Tensor, where: str) -> torch.Tensor:
    """(N, K, C, ...) back to the packed (N, K*C, ...); refuses member tensors without a dim 1."""
    if v.dim() < 3:
        raise EnsembleError(
            f"graph node {where!r} gives each member a tensor of shape {(v.shape[0], *v.shape[2:])}, "
            "without a dimension after the batch one: a packed ensemble keeps every activation's dim 1 "
            "(use keepdim=True, or end the model in a tensor of shape (N, outputs))"
        )
    return v.reshape(v.shape[0], v.shape[1] * v.shape[2], *v.shape[3:])


def _expand(x: torch.Tensor, members: int, where: str) -> torch.Tensor:
    """A tensor all members see alike (the input), repeated into the K channel blocks."""
    if x.dim() < 2:
        raise EnsembleError(
            f"graph node {where!r}: a tensor of shape {tuple(x.shape)} has no channel dimension to pack "
            "the members along; the input must be batched, (N, C, ...) or (N, features)"
        )
    return x.repeat(1, members, *([1] * (x.dim() - 2)))


def _stacked(x: torch.Tensor, members: int, where: str) -> torch.Tensor:
    """The packed output (N, K*C, ...) as the stacked members' outputs (K, N, C, ...)."""
    return _member_view(x, members, where).movedim(1, 0).contiguous()


def _binary(
    op: str,
    members: int,
    where: str,
    a: Any,
    b: Any,
    a_packed: bool,
    b_packed: bool,
    **kwargs: Any,
) -> Any:
    """``op(a, b)`` where at least one operand is packed; broadcasting is done per member.

    Equal shapes run as they are. Otherwise both packed operands must have the same number
    of dimensions (broadcasting aligns from the right, so (N, C) against (N, C, H, W) would
    pair the wrong dimensions) and are broadcast in their member views; an operand that is
    not packed must be a number or a one-element tensor.
    """
    fn = _BINARY_BY_NAME.get(op)
    call: Callable[..., Any] = fn if fn is not None else (lambda x, y, **kw: getattr(x, op)(y, **kw))
    for operand, packed in ((a, a_packed), (b, b_packed)):
        if not packed and isinstance(operand, torch.Tensor) and operand.numel() != 1:
            raise EnsembleError(
                f"graph node {where!r} combines a packed activation with a tensor of shape "
                f"{tuple(operand.shape)} that is the same for every member; only numbers and one-element "
                "tensors can be broadcast over the packed channel blocks"
            )
    if not (a_packed and b_packed) or a.shape == b.shape:
        return call(a, b, **kwargs)
    if a.dim() != b.dim():
        raise EnsembleError(
            f"graph node {where!r} broadcasts tensors of shapes {tuple(a.shape)} and {tuple(b.shape)} "
            "(packed); broadcasting between different numbers of dimensions cannot be packed"
        )
    out = call(_member_view(a, members, where), _member_view(b, members, where), **kwargs)
    return _from_member_view(out, where)


def _flatten(x: torch.Tensor, where: str, start_dim: int = 0, end_dim: int = -1) -> torch.Tensor:
    """``torch.flatten`` from a dim after the batch one: each member's block stays contiguous."""
    if start_dim % max(x.dim(), 1) == 0 and x.dim() > 0:
        raise EnsembleError(
            f"graph node {where!r} flattens from dim {start_dim}, the batch dimension, which would mix "
            "the members; flatten from dim 1 (torch.flatten(x, 1), nn.Flatten())"
        )
    return torch.flatten(x, start_dim, end_dim)


def _reshape(x: torch.Tensor, members: int, where: str, *shape: Any) -> torch.Tensor:
    """``x.reshape(shape)`` as written for one member, applied to each member's block.

    The member's target shape (after resolving -1) must keep the batch dimension and have
    a dim 1; its dim 1 then carries the K blocks, which stay contiguous.
    """
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    n = x.shape[0]
    per_member = x.numel() // members
    sizes = [int(s) for s in shape]
    if sizes.count(-1) == 1:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = per_member // known if known else 0
    if math.prod(sizes) != per_member or len(sizes) < 2 or sizes[0] != n:
        raise EnsembleError(
            f"graph node {where!r} reshapes a member's tensor of shape {tuple(_member_shape(x, members))} to "
            f"{tuple(shape)}: only reshapes that keep the batch dimension (size {n}) first and leave a "
            "dim 1, such as x.view(x.size(0), -1), can be packed"
        )
    return x.reshape(n, members * sizes[1], *sizes[2:])


def _member_shape(x: torch.Tensor, members: int) -> torch.Size:
    """The shape one member's tensor has: dim 1 divided by K."""
    return torch.Size((x.shape[0], x.shape[1] // members, *x.shape[2:]))


def _member_size(x: torch.Tensor, members: int, dim: int | None = None) -> Any:
    """``x.size(dim)`` as one member sees it."""
    shape = _member_shape(x, members)
    return shape if dim is None else shape[dim]


def _member_numel(x: torch.Tensor, members: int) -> int:
    return x.numel() // members


def _dim_op(
    x: torch.Tensor, members: int, where: str, op: str, dim: Any = None, **kwargs: Any
) -> torch.Tensor:
    """softmax / log_softmax / mean / sum / amax / amin over member dims, computed in the member view."""
    ndim = x.dim()
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):
        raise EnsembleError(
            f"graph node {where!r} applies {op} over all dimensions (no dim given); it mixes the batch and "
            "the members: give the dims explicitly"
        )
    dims = [int(d) % ndim for d in (dim if isinstance(dim, (tuple, list)) else (dim,))]
    if op not in ("softmax", "log_softmax") and 0 in dims and not kwargs.get("keepdim", False):
        raise EnsembleError(
            f"graph node {where!r} reduces ({op}) over the batch dimension without keepdim; this cannot be packed"
        )
    moved = [d + 1 if d > 0 else 0 for d in dims]
    v = _member_view(x, members, where)
    out = getattr(torch, op)(v, dim=moved if isinstance(dim, (tuple, list)) else moved[0], **kwargs)
    return _from_member_view(out, where)


def _relu(x: torch.Tensor, inplace: bool, fresh: bool) -> torch.Tensor:
    """ReLU, in place where the member asked for it or where ``x`` is a fresh activation used only
    here and no gradient will flow (in-place saves allocating, and page-faulting, a K-times larger tensor)."""
    if inplace or (fresh and not (torch.is_grad_enabled() and x.requires_grad)):
        return torch.relu_(x)
    return torch.relu(x)


def _check_pool_input(x: torch.Tensor, spatial: int, where: str) -> torch.Tensor:
    """Pooling over ``spatial`` dims must see a batched input (N, C, *spatial) to be per channel."""
    if x.dim() != spatial + 2:
        raise EnsembleError(
            f"graph node {where!r} pools a tensor of shape {tuple(x.shape)} ({x.dim()} dims) with a "
            f"{spatial}-d pooling; only batched inputs (N, C, {spatial} spatial dims) keep the members apart"
        )
    return x


def _pad(x: torch.Tensor, where: str, pad: Sequence[int], *args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.pad`` that pads only dims after dim 1 (padding channels would shift member blocks)."""
    if len(pad) // 2 > x.dim() - 2:
        raise EnsembleError(
            f"graph node {where!r} pads {len(pad) // 2} trailing dims of a {x.dim()}-d tensor, including "
            "the channel dim; only padding after dim 1 can be packed"
        )
    return F.pad(x, pad, *args, **kwargs)
