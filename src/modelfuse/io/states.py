"""State dicts of several models of one architecture: one check that they match, shared by
the levels that combine weights (merge's soups and AdaMerging, align's loss barrier)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from modelfuse.errors import ConfigError


def _state(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if isinstance(model, Mapping):
        return dict(model)
    raise ConfigError(f"expected an nn.Module or a state dict; found a {type(model).__name__}")


def check_same_shapes(
    models: Sequence[nn.Module | Mapping[str, torch.Tensor]], *, names: Sequence[str] | None = None
) -> list[dict[str, torch.Tensor]]:
    """The models' state dicts, after checking they have the same keys, shapes and dtypes (else a ConfigError
    naming the first model and tensor that differ)."""
    if not models:
        raise ConfigError("no models given; at least one is needed")
    labels = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    states = [_state(m) for m in models]
    ref = states[0]
    for label, sd in zip(labels[1:], states[1:]):
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing or extra:
            raise ConfigError(
                f"{label} does not have the architecture of {labels[0]}: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}; merge only models of one architecture"
            )
        for k, v in ref.items():
            if sd[k].shape != v.shape or sd[k].dtype != v.dtype:
                raise ConfigError(
                    f"tensor {k!r} of {label} is {tuple(sd[k].shape)} {sd[k].dtype}, but "
                    f"{tuple(v.shape)} {v.dtype} in {labels[0]}; merge only models of one architecture"
                )
    return states
