"""Task vectors tau_i = x_i - base: whole, stacked, or block by block into reused buffers.

Execution of the sparsifying merges is blockwise: task vectors are recomputed per block of
``BLOCK`` entries (on CPU) into reused buffers, so a tensor of any size costs its inputs
and its output plus a few MiB, and the work stays in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from modelfuse.errors import ConfigError
from modelfuse.merge.methods._base import new_empty
from modelfuse.merge.methods._select import MagnitudeSource

#: entries per block on CPU: the block's buffers (a few per model) stay in L2 and under
#: glibc's mmap threshold, so they are reused instead of faulted in afresh
BLOCK = 1 << 16


def default_block(device: torch.device) -> int:
    """Blocks on CPU keep the work in cache; a GPU wants whole tensors."""
    return BLOCK if device.type == "cpu" else 1 << 62


def _check_shape(i: int, x: torch.Tensor, base: torch.Tensor) -> None:
    if x.shape != base.shape:
        raise ConfigError(
            f"model {i}: tensor of shape {tuple(x.shape)} cannot be merged into the base's "
            f"{tuple(base.shape)}; task vectors need equal shapes"
        )


def task_vectors(xs: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """tau_i = x_i - base, each x_i cast to the base dtype first (mergekit's order)."""
    for i, x in enumerate(xs):
        _check_shape(i, x, base)
    return [x.to(base.dtype) - base for x in xs]


def sparsified_stack(
    xs: Sequence[torch.Tensor], base: torch.Tensor, sparsify: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``torch.stack([sparsify(i, tau_i) ...])`` with one task vector alive at a time (memory)."""
    for i, x in enumerate(xs):
        _check_shape(i, x, base)
    out = torch.empty((len(xs), *base.shape), dtype=base.dtype, device=base.device)
    for i, x in enumerate(xs):
        out[i] = sparsify(i, x.to(base.dtype) - base)
    return out


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for random masks and their rescale: float64 stays, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TaskVectors:
    """tau_i = x_i - base over flat blocks ``[a, b)``, computed into reused buffers.

    ``block(i, a, b)`` and ``magnitudes(tau)`` return views of one buffer each: valid until
    the next call. Spans are ``block`` entries long (the last one shorter).
    """

    def __init__(self, xs: Sequence[torch.Tensor], base: torch.Tensor, block: int):
        for i, x in enumerate(xs):
            _check_shape(i, x, base)
        self.base = base.reshape(-1)
        self.xs = [x.reshape(-1) for x in xs]
        self.n = self.base.numel()
        self.size = max(1, min(block, self.n))
        self._tau = torch.empty(self.size, dtype=base.dtype, device=base.device)
        self._mag = torch.empty(self.size, dtype=torch.float32, device=base.device)
        self._high: torch.Tensor | None = None

    def spans(self) -> Iterator[tuple[int, int]]:
        for a in range(0, self.n, self.size):
            yield a, min(a + self.size, self.n)

    def block(self, i: int, a: int, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
        x = self.xs[i][a:b]
        if x.dtype != self.base.dtype:
            x = x.to(self.base.dtype)
        return torch.sub(x, self.base[a:b], out=self._tau[: b - a] if out is None else out)

    def magnitudes(self, tau: torch.Tensor) -> torch.Tensor:
        w = self._mag[: tau.numel()]
        if tau.dtype == torch.float32:
            return torch.abs(tau, out=w)
        return w.copy_(tau).abs_()  # rounding to float32 commutes with abs

    def magnitude_blocks(self, i: int) -> Callable[[], Iterator[torch.Tensor]]:
        """A re-iterable source of model i's float32 magnitudes, block by block."""
        return lambda: (self.magnitudes(self.block(i, a, b)) for a, b in self.spans())

    def magnitudes_at(self, i: int, where: torch.Tensor) -> torch.Tensor:
        """Model i's float32 magnitudes at flat positions ``where``."""
        return (self.xs[i][where].to(self.base.dtype) - self.base[where]).abs().float()

    def source(self, i: int) -> MagnitudeSource:
        if self._high is None:  # shared by the models: their statistics run one after another
            self._high = new_empty((self.n,), torch.int16, self.base.device)
        return MagnitudeSource(
            self.magnitude_blocks(i), lambda where: self.magnitudes_at(i, where), self.n, self._high
        )
