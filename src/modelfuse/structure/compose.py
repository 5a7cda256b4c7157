"""Compositions of whole networks that keep their names: ``Parallel`` branches and ``Serial`` stages.

Multi-branch networks (Inception's parallel paths, Szegedy et al. 2015, "Going deeper with
convolutions"; the two-stream networks of Simonyan & Zisserman 2014) and sequences of
separately trained networks both need the parts' parameters under names a person can
read: ``branches.rgb.conv1.weight``, ``stages.encoder.layer1.0.bn1.running_mean``. So
``state_dict`` and ``load_state_dict`` of the composition work with the parts' own keys
behind one prefix per part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelfuse.errors import ConfigError, StructureError
from modelfuse.registry import Registry

Combine = Callable[[list[torch.Tensor], int], torch.Tensor]

_BRANCH_COMBINES: Registry[Combine] = Registry("branch combine")


def register_branch_combine(name: str) -> Callable[[Combine], Combine]:
    """Register ``fn(outputs: list[Tensor], dim: int) -> Tensor`` under ``name``, a way for
    :class:`Parallel` to join its branches' outputs (``combine=name``)."""

    def decorator(fn: Combine) -> Combine:
        _BRANCH_COMBINES.register(name, fn)
        return fn

    return decorator


def get_branch_combine(name: str) -> Combine:
    """The branch combine registered as ``name``; an unknown name raises RegistryError listing close names."""
    return _BRANCH_COMBINES.get(name)


def list_branch_combines(pattern: str = "*") -> list[str]:
    """Registered branch combine names matching a shell-style ``pattern``, sorted."""
    return _BRANCH_COMBINES.names(pattern)


register_branch_combine("stack")(lambda outs, dim: torch.stack(outs, dim=dim))
register_branch_combine("concat")(lambda outs, dim: torch.cat(outs, dim=dim))
register_branch_combine("sum")(lambda outs, dim: torch.stack(outs).sum(0))
register_branch_combine("mean")(lambda outs, dim: torch.stack(outs).mean(0))


def _named(models: Mapping[str, nn.Module] | Sequence[nn.Module], what: str) -> dict[str, nn.Module]:
    """``models`` by name: a mapping as given, a list as ``"0"``, ``"1"``, ...; names are checked."""
    if isinstance(models, nn.Module):
        raise ConfigError(f"{what} takes a list or dict of modules, found a single {type(models).__name__}")
    items = (
        list(models.items()) if isinstance(models, Mapping) else [(str(i), m) for i, m in enumerate(models)]
    )
    if not items:
        raise ConfigError(f"{what} needs at least one module; found none")
    for name, module in items:
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigError(
                f"{what}: names must be non-empty strings without '.' (they prefix state_dict keys); found {name!r}"
            )
        if not isinstance(module, nn.Module):
            raise ConfigError(f"{what}: {name!r} is a {type(module).__name__}, not a torch.nn.Module")
    return dict(items)


class Parallel(nn.Module):
    """Every branch runs on the same input; ``combine`` joins their outputs.

    ``combine`` is ``"stack"`` (a new dimension ``dim``), ``"concat"`` (along ``dim``, e.g.
    channels or features), ``"sum"``, ``"mean"`` (elementwise, shapes must agree) or a callable
    ``f(outputs) -> tensor`` over the list of branch outputs in branch order. Branches given
    as a dict keep their names (``branches.<name>.``); a list names them ``0``, ``1``, ...
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module] | Sequence[nn.Module],
        combine: str | Callable[[list[Any]], Any] = "stack",
        *,
        dim: int = 1,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleDict(_named(models, "Parallel"))
        if not callable(combine):
            get_branch_combine(combine)  # unknown names fail here, listing the valid ones
        self.combine = combine
        self.dim = int(dim)

    def extra_repr(self) -> str:
        name = (
            self.combine if isinstance(self.combine, str) else getattr(self.combine, "__name__", "callable")
        )
        return f"combine={name!r}, dim={self.dim}"

    def branch_outputs(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Each branch's output on the input, by branch name."""
        return {name: branch(*args, **kwargs) for name, branch in self.branches.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outs = self.branch_outputs(*args, **kwargs)
        if callable(self.combine):
            return self.combine(list(outs.values()))
        self._check(outs, self.combine)
        return get_branch_combine(self.combine)(list(outs.values()), self.dim)

    def _check(self, outs: dict[str, Any], combine: str) -> None:
        names = list(outs)
        for name, out in outs.items():
            if not isinstance(out, torch.Tensor):
                raise StructureError(
                    f"branch {name!r} returns a {type(out).__name__}, not a tensor; combine={combine!r} "
                    "joins tensors: wrap the branch so that it returns one tensor, or pass a callable combine"
                )
        first = outs[names[0]]
        for name in names[1:]:
            out = outs[name]
            if combine == "concat":
                axis = self.dim % max(first.dim(), 1)
                ok = out.dim() == first.dim() and all(
                    a == b for d, (a, b) in enumerate(zip(out.shape, first.shape)) if d != axis
                )
                need, fix = (
                    f"equal shapes except along dim {self.dim}",
                    "set dim to the dimension that differs",
                )
            else:
                ok = out.shape == first.shape
                need, fix = "equal shapes", "use combine='concat' along the dimension that differs"
            if not ok:
                raise StructureError(
                    f"branch {name!r} gives outputs of shape {tuple(out.shape)}, branch {names[0]!r} "
                    f"{tuple(first.shape)}: combine={combine!r} needs {need}; {fix}"
                )

    def __getitem__(self, name: str) -> nn.Module:
        return self.branches[name]

    def __len__(self) -> int:
        return len(self.branches)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.branches.values())


class Serial(nn.Module):
    """The stages run one after the other, each on the previous one's output (``stages.<name>.``)."""

    def __init__(self, models: Mapping[str, nn.Module] | Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleDict(_named(models, "Serial"))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        stages = iter(self.stages.values())
        out = next(stages)(*args, **kwargs)
        for stage in stages:
            out = stage(out)
        return out

    def __getitem__(self, name: str) -> nn.Module:
        return self.stages[name]

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.stages.values())
