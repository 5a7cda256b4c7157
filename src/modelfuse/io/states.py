"""State dicts of several models of one architecture: one check that they match, shared by
the levels that combine weights (merge's soups and AdaMerging, align's loss barrier)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from modelfuse.errors import ConfigError, FusionError


def _state(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping):
        return dict(model)
    raise ConfigError(f"expected an nn.Module or a state dict; found a {type(model).__name__}")


def check_same_shapes(
    models: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    *,
    names: Sequence[str] | None = None,
    what: str = "",
    dtypes: bool = True,
    error: type[FusionError] = ConfigError,
) -> list[dict[str, torch.Tensor]]:
    """The models' state dicts, after checking they have the same keys and shapes (and dtypes, unless
    ``dtypes=False``).

    The one "same architecture" check of the package (merges, soups, AdaMerging, alignment, the
    loss barrier). On a mismatch it raises ``error`` (a FusionError subclass; ConfigError by default)
    naming the first tensor that differs, in which model, expected versus found; ``what`` prefixes
    the message with the operation ("fisher_merge: ...") and ``names`` labels the models.
    """
    head = f"{what}: " if what else ""
    if not models:
        raise error(f"{head}no models given; at least one is needed")
    labels = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    if len(labels) != len(models):
        raise ConfigError(f"{len(labels)} names given for {len(models)} models")
    states = [_state(m) for m in models]
    ref = states[0]
    fix = "only models of one architecture can be combined: check that every checkpoint comes from the same network"
    for label, sd in zip(labels[1:], states[1:]):
        for k in list(ref) + [k for k in sd if k not in ref]:
            if k not in sd or k not in ref:
                where = label if k not in sd else labels[0]
                raise error(f"{head}models have different architectures: tensor {k!r} is missing from {where}; {fix}")
            a, b = ref[k], sd[k]
            if b.shape != a.shape:
                raise error(
                    f"{head}models have different architectures: tensor {k!r} has shape {tuple(b.shape)} in "
                    f"{label} but {tuple(a.shape)} in {labels[0]}; {fix}"
                )
            if dtypes and b.dtype != a.dtype:
                raise error(
                    f"{head}tensor {k!r} is {b.dtype} in {label} but {a.dtype} in {labels[0]}; "
                    "cast the models to one dtype first (e.g. model.float())"
                )
    return states
