"""Statistics of a model on data, for data-driven merging: diagonal Fisher and Linear input Grams.

``fisher_information(model, loader)`` computes the diagonal empirical Fisher
F = (1/N) sum_n (d/dtheta log p(y_n | x_n; theta))^2 from exact per-example gradients
(``torch.func.functional_call`` + ``vmap(grad(...))``: one gradient per example, squared,
then averaged; not the square of a batch gradient). The label y_n is the example's true
label (``label="true"``), the model's own prediction (``"predicted"``) or drawn from the
model's predictive distribution with a seeded generator (``"sampled"``, the Monte-Carlo
estimate of the true Fisher). Keys are the model's parameter names.

``gram_matrices(model, loader)`` records, with forward pre-hooks on every ``nn.Linear``,
the sum over all input rows of x x^T (X^T X, inputs flattened over leading dimensions),
keyed by the Linear's weight name (``"fc.weight"``), with the number of rows.

Both return a :class:`Statistics`: the tensors plus the kind, the example count and a
fingerprint of the model's state dict (names, shapes, dtypes and bytes) so a merge can
refuse statistics computed on another model. ``save_statistics`` writes them as a
safetensors checkpoint of their own (modelfuse.io's atomic writer, the rest in the
header metadata); ``load_statistics`` opens one lazily, so merging streams statistics
tensor by tensor like weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modelfuse.errors import ConfigError, DataError

Label = Literal["true", "predicted", "sampled"]
KINDS = ("fisher", "gram")
_FORMAT = "modelfuse-statistics/1"


@dataclass
class Statistics:
    """Per-tensor statistics of one model: ``tensors`` (a dict, or a lazily read Checkpoint).

    ``kind``: "fisher" or "gram"; ``count``: examples (Fisher) or input rows (Gram) summed
    over; ``fingerprint``: :func:`state_fingerprint` of the model they were computed on
    (empty: unknown, not checked); ``settings``: how they were computed (label rule, seed).
    """

    kind: str
    tensors: Mapping[str, torch.Tensor]
    count: int
    fingerprint: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"statistics kind {self.kind!r} is not one of {', '.join(KINDS)}")


def state_fingerprint(state: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """SHA-256 over a state dict's names, shapes, dtypes and bytes (sorted by name): which model this is."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- loaders --------------------------------------------------------------------------------------
def _split_batch(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch as (inputs, targets or None): a tensor, or a tuple/list (inputs, targets, ...)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    raise DataError(
        f"batch {index} of the data loader is a {type(batch).__name__}; expected a tensor of inputs "
        "or a tuple (inputs, targets) of tensors"
    )


def _forward(model: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    try:
        return model(x)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DataError(
            f"batch {index} of the data loader (inputs of shape {tuple(x.shape)}, {x.dtype}) does not fit "
            f"{type(model).__name__}: {exc}. Check that the loader yields the inputs this model expects."
        ) from exc


def _empty_loader() -> DataError:
    return DataError("the data loader yielded no examples; statistics need at least one batch of data")


def _device_of(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


# -- Fisher ---------------------------------------------------------------------------------------
def fisher_information(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    label: Label = "true",
    seed: int = 0,
    max_examples: int | None = None,
    chunk_size: int | None = None,
) -> Statistics:
    """Diagonal empirical Fisher of a classifier from exact per-example gradients, averaged over examples.

    ``model`` maps a batch of inputs to logits of shape (batch, classes); ``loader`` yields
    input tensors or (inputs, labels) tuples. ``label``: which y enters log p(y | x):
    ``"true"`` (the loader's labels), ``"predicted"`` (argmax of the model) or ``"sampled"``
    (drawn from softmax(logits) with ``torch.Generator().manual_seed(seed)``). The model runs
    in eval mode (dropout off, BatchNorm on running statistics) and is left unchanged.
    Parameters with ``requires_grad=False`` get no Fisher (a merge then averages them).
    Per-example gradients of a whole batch are held at once (batch x parameters);
    ``chunk_size`` computes them that many examples at a time to bound the memory.
    """
    from torch.func import functional_call, grad, vmap

    if label not in ("true", "predicted", "sampled"):
        raise ConfigError(f"label must be 'true', 'predicted' or 'sampled'; found {label!r}")
    device = _device_of(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters: there is no Fisher to compute"
        )
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        logp = torch.log_softmax(logits, dim=-1).reshape(-1)
        return -torch.gather(logp, 0, y.reshape(1)).sum()

    if chunk_size is not None and chunk_size < 1:
        raise ConfigError(f"chunk_size must be a positive number of examples; found {chunk_size}")
    per_example = vmap(grad(nll), in_dims=(None, 0, 0), chunk_size=chunk_size)
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(loader):
            x, y_true = _split_batch(batch, index)
            if max_examples is not None:
                x = x[: max_examples - count]
                y_true = None if y_true is None else y_true[: max_examples - count]
            if len(x) == 0:
                continue
            x = x.to(device)
            with torch.no_grad():
                logits = _forward(model, x, index)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise DataError(
                    f"fisher_information needs logits of shape (batch, classes); {type(model).__name__} "
                    f"returned {tuple(logits.shape)} for batch {index} of {x.shape[0]} examples"
                )
            if label == "true":
                if y_true is None:
                    raise DataError(
                        f"label='true' needs (inputs, labels) batches; batch {index} has inputs only. "
                        "Use label='predicted' or 'sampled' for unlabelled data."
                    )
                y = y_true.to(device=device, dtype=torch.long).reshape(-1)
                if y.shape[0] != x.shape[0] or (y < 0).any() or (y >= logits.shape[1]).any():
                    raise DataError(
                        f"batch {index}: labels of shape {tuple(y_true.shape)} with values in "
                        f"[{int(y.min())}, {int(y.max())}] do not fit {x.shape[0]} examples and "
                        f"{logits.shape[1]} classes"
                    )
            elif label == "predicted":
                y = logits.argmax(dim=1)
            else:
                probs = torch.softmax(logits.double(), dim=1).cpu()
                y = torch.multinomial(probs, 1, generator=generator).reshape(-1).to(device)
            grads = per_example(params, x, y)
            for n, g in grads.items():
                sums[n] += g.double().square().sum(dim=0)
            count += x.shape[0]
            if max_examples is not None and count >= max_examples:
                break
    finally:
        model.train(was_training)
    if count == 0:
        raise _empty_loader()
    tensors = {n: (s / count).to(params[n].dtype) for n, s in sums.items()}
    settings = {"label": label, "seed": seed if label == "sampled" else None}
    return Statistics("fisher", tensors, count, state_fingerprint(model), settings)


# -- Gram matrices --------------------------------------------------------------------------------
def gram_matrices(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    max_examples: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> Statistics:
    """X^T X of every ``nn.Linear``'s inputs over the loader, keyed by ``"<linear>.weight"``.

    Inputs of shape (..., in_features) count each leading position as one row. Sums run in
    ``dtype`` (float64 by default). ``count`` is the number of examples seen; the per-layer
    row counts are in ``settings["rows"]``.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layers: RegMean's Gram matrices are defined for "
            "Linear layers only"
        )
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def key_of(name: str) -> str:
        return f"{name}.weight" if name else "weight"

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, module.in_features).to(dtype)
            g = x.T @ x
            key = key_of(name)
            if key in sums:
                sums[key] += g
            else:
                sums[key] = g
            rows[key] = rows.get(key, 0) + x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    device = _device_of(model)
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(loader):
                x, _ = _split_batch(batch, index)
                if max_examples is not None:
                    x = x[: max_examples - count]
                if len(x) == 0:
                    continue
                _forward(model, x.to(device), index)
                count += x.shape[0]
                if max_examples is not None and count >= max_examples:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise _empty_loader()
    unused = [key_of(n) for n in linears if key_of(n) not in sums]
    if len(unused) == len(linears):
        raise DataError(f"no nn.Linear layer of {type(model).__name__} was called on the loader's data")
    return Statistics("gram", dict(sums), count, state_fingerprint(model), {"rows": rows, "unused": unused})


# -- storage --------------------------------------------------------------------------------------
def save_statistics(stats: Statistics, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write statistics as one ``.safetensors`` file (atomic; kind, count, fingerprint in the header)."""
    from modelfuse.io import save_state_dict

    metadata = {
        "format": _FORMAT,
        "kind": stats.kind,
        "count": str(stats.count),
        "fingerprint": stats.fingerprint,
        "settings": json.dumps(stats.settings, sort_keys=True),
    }
    tensors = {n: stats.tensors[n] for n in stats.tensors}
    return save_state_dict(tensors, path, metadata=metadata, force=force)


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Open statistics written by :func:`save_statistics`; tensors are read lazily, one at a time."""
    from modelfuse.errors import CheckpointError
    from modelfuse.io import open_checkpoint

    ckpt = open_checkpoint(path)
    meta = ckpt.metadata
    if meta.get("format") != _FORMAT or meta.get("kind") not in KINDS:
        raise CheckpointError(
            f"{path} is not a modelfuse statistics file (its safetensors metadata has format="
            f"{meta.get('format')!r}, kind={meta.get('kind')!r}; expected format={_FORMAT!r}). Write "
            "statistics with modelfuse.merge.save_statistics."
        )
    try:
        count = int(meta["count"])
        settings = json.loads(meta.get("settings", "{}"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: damaged statistics metadata ({exc})") from None
    return Statistics(meta["kind"], ckpt, count, meta.get("fingerprint", ""), settings)
