"""Feature caching: with frozen backbones, compute the taps once per dataset and train the head on them.

A frozen branch runs in eval mode without gradients, so its tap output for a sample is the same
every epoch. :func:`cache_features` computes every branch's *prepared* features (tap output after
the parameter-free part of the alignment: layout, pooling or interpolation) once, with
``predict``'s no-grad, in-order passes, and stores them as a ``TensorDataset``
``(prepared_1, ..., prepared_K, labels)``. :class:`CachedHead` is the trainable rest of the
fusion (projections, operator, head) over such batches; it shares its layers with the fusion,
so training it trains the fusion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from modelfuse.data.splits import labels_of
from modelfuse.errors import ConfigError
from modelfuse.features.model import FeatureFusion
from modelfuse.zoo.metrics import accuracy_nll
from modelfuse.zoo.train import predict


class _PreparedFlat(nn.Module):
    """Every branch's prepared features of a batch, flattened and concatenated: (B, sum of sizes)."""

    def __init__(self, fusion: FeatureFusion) -> None:
        super().__init__()
        self.fusion = fusion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prepared = self.fusion.prepare(self.fusion.tap_outputs(x))
        return torch.cat([p.flatten(1) for p in prepared], dim=1)


def cache_features(
    model: FeatureFusion,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> TensorDataset:
    """``TensorDataset(prepared_1, ..., prepared_K, labels)`` for every item of ``dataset``, in order.

    Needs every branch frozen (otherwise the features change while training) and the module built.
    """
    if not model.all_frozen:
        moving = [n for n, b in model.branch_specs.items() if b.policy != "frozen"]
        raise ConfigError(
            f"caching features needs every branch frozen; {', '.join(map(repr, moving))} "
            "train(s), so their features change every step. Use cache=False (recompute) or freeze them"
        )
    model._require_built("cache_features")
    shapes = [a.out_shape for a in model.alignments.values()]
    flat = predict(_PreparedFlat(model), dataset, batch_size=batch_size, device=device)
    n = len(dataset)
    sizes = [math.prod(s) for s in shapes]
    if flat.numel() == 0:
        flat = torch.zeros(0, sum(sizes))
    parts = torch.split(flat, sizes, dim=1)
    feats = [p.reshape(n, *s).clone() for p, s in zip(parts, shapes)]
    del flat, parts
    return TensorDataset(*feats, labels_of(dataset))


class CachedRows(Dataset):
    """Cached features served item by item, so that :func:`train` batches them with a seeded DataLoader,
    exactly as it batches the dataset they were computed from when that is no ``TensorDataset``
    (the loader draws from the generator before shuffling, so its order differs from a plain permutation)."""

    def __init__(self, features: TensorDataset) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.features.tensors)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, ...]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list(zip(*(t[idx] for t in self.features.tensors)))


class CachedHead(nn.Module):
    """The trainable part of a :class:`FeatureFusion` (projections, operator, head), shared with it:
    ``forward(*prepared) -> logits`` over a cached batch's features."""

    def __init__(self, fusion: FeatureFusion) -> None:
        super().__init__()
        fusion._require_built("CachedHead")
        self.align, self.fuse, self.head = fusion.align, fusion.fuse, fusion.head
        self._fusion = (fusion,)  # a tuple: not registered, so the backbones are not part of this module

    def forward(self, *prepared: torch.Tensor) -> torch.Tensor:
        return self._fusion[0].forward_prepared(prepared)


def cached_cross_entropy(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """The loss for cached batches ``(prepared_1, ..., prepared_K, labels)``."""
    return F.cross_entropy(model(*batch[:-1]), batch[-1])


@torch.no_grad()
def evaluate_cached(
    head: nn.Module,
    dataset: TensorDataset,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Accuracy, mean NLL and count of ``head`` (a :class:`CachedHead`) on cached features, like ``evaluate``."""
    n = len(dataset)
    if n == 0:
        return {"accuracy": math.nan, "nll": math.nan, "n": 0}
    if device is None:
        first = next(iter(head.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = head.training
    head.eval()
    try:
        logits = torch.cat(
            [
                head(*(t[i : i + batch_size].to(device) for t in dataset.tensors[:-1])).cpu()
                for i in range(0, n, batch_size)
            ]
        )
    finally:
        head.train(was_training)
    return {**accuracy_nll(logits, dataset.tensors[-1].long()), "n": n}
