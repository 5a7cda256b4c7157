"""The loss barrier along the straight line between two models (linear mode connectivity).

:func:`loss_barrier` evaluates ``theta(t) = (1 - t) theta_A + t theta_B`` at ``points`` evenly
spaced ``t`` in [0, 1] (default 25, both ends included) and reports loss (mean cross-entropy
in nats) and accuracy at each, through :func:`modelfuse.zoo.evaluate`. The barrier is
``max_t loss(t) - (loss(0) + loss(1)) / 2`` (Frankle et al. 2020; Ainsworth et al. 2023), so
it is 0 for identical models and may be negative when the path dips below both ends.

BatchNorm: the running mean and variance are interpolated like the weights (integer
``num_batches_tracked`` comes from A). This is the plain interpolation whose variance
collapse REPAIR (Jordan et al. 2023) corrects; the barrier reported here is that of the
naive interpolated network, without any statistics reset.

:class:`BarrierResult` prints a table (rich) and plots loss and accuracy against ``t`` to a
PNG (matplotlib, Agg canvas: no display needed).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from modelfuse._durable import atomic_file
from modelfuse.data.splits import SPLITS, Splits
from modelfuse.errors import ConfigError
from modelfuse.io.states import check_same_shapes
from modelfuse.zoo.train import evaluate

__all__ = ["BarrierResult", "interpolate", "loss_barrier"]


def interpolate(model_a: nn.Module, model_b: nn.Module, t: float) -> nn.Module:
    """A copy of ``model_a`` holding ``torch.lerp(A, B, t)`` = A + t (B - A) for every floating-point tensor
    (weights and BatchNorm running statistics); integer buffers come from A. ``t = 0`` gives A exactly."""
    sa, sb = check_same_shapes([model_a, model_b], names=["model A", "model B"])
    state = {
        k: torch.lerp(v, sb[k], float(t)) if torch.is_floating_point(v) else v.clone() for k, v in sa.items()
    }
    out = copy.deepcopy(model_a)
    out.load_state_dict(state)
    return out


@dataclass
class BarrierResult:
    """Loss and accuracy at each interpolation weight ``t`` (0 = model A, 1 = model B) on ``split``."""

    ts: list[float]
    losses: list[float]
    accuracies: list[float]
    split: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        """The path and the summary figures, JSON-ready."""
        return {
            "split": self.split,
            "samples": self.n,
            "barrier": self.barrier,
            "accuracy_barrier": self.accuracy_barrier,
            "midpoint": self.midpoint,
            "path": [
                {"t": t, "loss": lo, "accuracy": a} for t, lo, a in zip(self.ts, self.losses, self.accuracies)
            ],
        }

    @property
    def barrier(self) -> float:
        """max over the path of the loss minus the mean of the two endpoint losses."""
        return max(self.losses) - (self.losses[0] + self.losses[-1]) / 2

    @property
    def accuracy_barrier(self) -> float:
        """The mean of the endpoint accuracies minus the lowest accuracy on the path."""
        return (self.accuracies[0] + self.accuracies[-1]) / 2 - min(self.accuracies)

    @property
    def midpoint(self) -> dict[str, float]:
        """Loss and accuracy at the point nearest t = 0.5."""
        i = min(range(len(self.ts)), key=lambda j: abs(self.ts[j] - 0.5))
        return {"t": self.ts[i], "loss": self.losses[i], "accuracy": self.accuracies[i]}

    def table(self, title: str | None = None) -> Any:
        """A rich Table of t, loss and accuracy, with the barrier in its caption."""
        from rich.table import Table

        table = Table(
            title=title or f"loss along the path A -> B ({self.split}, {self.n} samples)",
            caption=f"loss barrier {self.barrier:.4f}  accuracy barrier {100 * self.accuracy_barrier:.2f} points",
        )
        table.add_column("t", justify="right")
        table.add_column("loss", justify="right")
        table.add_column("accuracy %", justify="right")
        for t, loss, acc in zip(self.ts, self.losses, self.accuracies):
            table.add_row(f"{t:.3f}", f"{loss:.4f}", f"{100 * acc:.2f}")
        return table

    def print(self, console: Any = None, title: str | None = None) -> None:
        """Print :meth:`table` to ``console`` (a rich Console; default: stdout)."""
        from rich.console import Console

        (console or Console()).print(self.table(title))

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Loss and accuracy against t, as a PNG at ``path`` (its folder is created, an existing file replaced
        atomically); returns the path."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ConfigError(
                f"the barrier plot is written as PNG; give a path ending in .png, not {str(path)!r}"
            )
        fig = Figure(figsize=(8, 3.2))
        FigureCanvasAgg(fig)
        ax_loss, ax_acc = fig.subplots(1, 2)
        ax_loss.plot(self.ts, self.losses, marker="o", markersize=3)
        ax_loss.set_xlabel("t (0 = A, 1 = B)")
        ax_loss.set_ylabel(f"{self.split} loss (nats)")
        ax_loss.set_title(f"barrier {self.barrier:.4f}")
        ax_acc.plot(self.ts, [100 * a for a in self.accuracies], marker="o", markersize=3, color="tab:orange")
        ax_acc.set_xlabel("t (0 = A, 1 = B)")
        ax_acc.set_ylabel(f"{self.split} accuracy (%)")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        with atomic_file(path) as tmp:  # a whole PNG or none, never a truncated one
            fig.savefig(tmp, format="png", dpi=100)
        return path


def loss_barrier(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Splits | Dataset,
    *,
    split: str = "test",
    points: int = 25,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    ts: Sequence[float] | None = None,
) -> BarrierResult:
    """Loss and accuracy of the interpolated models at ``points`` evenly spaced t in [0, 1] on ``split``.

    ``data`` is a :class:`Splits` (``split`` picks train, val or test; an evaluation only, so
    the test split is the default) or a Dataset of ``(x, y)`` items. ``ts`` replaces the
    even grid (values in [0, 1], increasing, at least 2). Neither model is changed.
    """
    if ts is None:
        if int(points) < 2:
            raise ConfigError(f"loss_barrier needs points >= 2 (both endpoints); found {points}")
        ts = torch.linspace(0, 1, int(points), dtype=torch.float64).tolist()
    ts = [float(t) for t in ts]
    if len(ts) < 2 or any(not 0.0 <= t <= 1.0 for t in ts) or any(b <= a for a, b in itertools.pairwise(ts)):
        raise ConfigError(f"ts must be at least 2 increasing values in [0, 1]; found {ts}")
    if split not in SPLITS:
        raise ConfigError(f"loss_barrier: split must be one of {', '.join(SPLITS)}; found {split!r}")
    dataset = getattr(data, split) if isinstance(data, Splits) else data
    if len(dataset) == 0:
        raise ConfigError(f"loss_barrier: the {split!r} split is empty; name a split with data")
    check_same_shapes([model_a, model_b], names=["model A", "model B"])
    losses, accs = [], []
    for t in ts:
        try:
            metrics = evaluate(
                interpolate(model_a, model_b, t), dataset, batch_size=batch_size, device=device
            )
        except RuntimeError as exc:
            shape = tuple(dataset[0][0].shape)
            raise ConfigError(
                f"loss_barrier: the models cannot run on the {split!r} data (one input is {shape}): {exc}; "
                "give data of the input shape the models were built for"
            ) from exc
        losses.append(float(metrics["nll"]))
        accs.append(float(metrics["accuracy"]))
    return BarrierResult(ts=ts, losses=losses, accuracies=accs, split=split, n=len(dataset))
