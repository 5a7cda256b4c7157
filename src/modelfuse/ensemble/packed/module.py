"""The packed module: ``PackedEnsemble``, ``pack`` and ``unpack``, and the checks that members can be packed."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from modelfuse.ensemble.module import check_models
from modelfuse.ensemble.packed.layers import SPLIT_CHANNELS, PackedConv2d, _cat
from modelfuse.ensemble.packed.rewrite import _Rewriter
from modelfuse.errors import ConfigError, EnsembleError

# ------------------------------------------------------------------------------------ checks


def _entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not) by qualified name, in registration order."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.named_parameters(remove_duplicate=False):
        out[name] = t
    for name, t in module.named_buffers(remove_duplicate=False):
        out[name] = t
    return out


def _trace(member: nn.Module, index: int) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(member)
    except Exception as exc:  # torch.fx raises many kinds of errors on untraceable code
        raise EnsembleError(
            f"member {index} ({type(member).__qualname__}) cannot be traced with torch.fx.symbolic_trace, "
            f"which pack needs to rewrite its forward: {type(exc).__name__}: {exc}"
        ) from exc


def _signature(gm: fx.GraphModule) -> list[tuple[str, str, str, str, str]]:
    return [(n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in gm.graph.nodes]


def _check_members(members: Sequence[nn.Module]) -> list[nn.Module]:
    """The members as a list, refused unless they share one architecture, device and per-tensor dtypes."""
    if isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList):
        raise ConfigError("pack takes a sequence of models, not one model; pass [model1, model2, ...]")
    members = check_models(members, purpose="pack")
    ref = members[0]
    ref_entries = _entries(ref)
    seen: dict[int, str] = {}
    for name, t in ref_entries.items():
        key = id(t)
        if key in seen:
            raise EnsembleError(
                f"member 0 uses one tensor under two names ({seen[key]!r} and {name!r}): tied parameters "
                "cannot be packed"
            )
        seen[key] = name
    devices = {t.device for t in ref_entries.values()}
    if len(devices) > 1:
        raise EnsembleError(
            f"member 0 has parameters and buffers on several devices ({sorted(map(str, devices))}); "
            "move each member to one device"
        )
    for i, m in enumerate(members[1:], start=1):
        if type(m) is not type(ref):
            raise EnsembleError(
                f"member {i} is a {type(m).__qualname__}, member 0 a {type(ref).__qualname__}: packed members "
                "must share one architecture"
            )
        entries = _entries(m)
        for name, t0 in ref_entries.items():
            t = entries.get(name)
            if t is None:
                raise EnsembleError(
                    f"members differ at parameter {name!r}: shape {tuple(t0.shape)} in member 0, absent in "
                    f"member {i}; packed members must share one architecture"
                )
            if t.shape != t0.shape:
                raise EnsembleError(
                    f"members differ at parameter {name!r}: shape {tuple(t0.shape)} in member 0 but "
                    f"{tuple(t.shape)} in member {i}; packed members must share one architecture"
                )
        extra = [name for name in entries if name not in ref_entries]
        if extra:
            raise EnsembleError(
                f"members differ at parameter {extra[0]!r}: absent in member 0, shape "
                f"{tuple(entries[extra[0]].shape)} in member {i}; packed members must share one architecture"
            )
        for name, t0 in ref_entries.items():
            t = entries[name]
            if t.dtype != t0.dtype or t.device != t0.device:
                raise EnsembleError(
                    f"member {i}'s {name!r} is {t.dtype} on {t.device}, member 0's {t0.dtype} on {t0.device}: "
                    "move all members to one device and dtype first (model.to(device, dtype))"
                )
        ref_modules, modules = dict(ref.named_modules()), dict(m.named_modules())
        for name, mod0 in ref_modules.items():
            mod = modules.get(name)
            label = name or "(the model itself)"
            if mod is None or type(mod) is not type(mod0):
                found = "absent" if mod is None else type(mod).__qualname__
                raise EnsembleError(
                    f"members differ at module {label!r}: {type(mod0).__qualname__} in member 0, {found} in "
                    f"member {i}"
                )
            if mod.extra_repr() != mod0.extra_repr():
                raise EnsembleError(
                    f"members differ at module {label!r}: {type(mod0).__qualname__}({mod0.extra_repr()}) in "
                    f"member 0, ({mod.extra_repr()}) in member {i}"
                )
        extra = [name for name in modules if name not in ref_modules]
        if extra:
            raise EnsembleError(
                f"members differ at module {extra[0]!r}: absent in member 0, present in member {i}"
            )
    return members


# ------------------------------------------------------------------------------------ the module


class PackedEnsemble(nn.Module):
    """K trained models of one architecture run as one module; ``forward`` returns (K, N, ...).

    Build it with ``pack(members)`` (or ``PackedEnsemble(members)``). It computes exactly the
    members' outputs, stacked as ``Ensemble.member_outputs`` stacks them, in one pass with
    K-times-wider layers. Train/eval mode applies as in the members (BatchNorm statistics per
    member, dropout masks drawn independently); it starts in member 0's mode. ``state_dict``:
    the members' keys, each tensor the members' concatenated along dim 0. ``unpack()`` returns
    the K members as ordinary modules.
    """

    def __init__(
        self, members: Sequence[nn.Module], *, channels_last: bool | None = None, chunk_size: int | None = None
    ) -> None:
        super().__init__()
        members = _check_members(members)
        traced = _trace(members[0], 0)
        reference = _signature(traced)
        for i, m in enumerate(members[1:], start=1):
            other = _signature(_trace(m, i))
            if other != reference:
                diff = next(
                    (j for j, (a, b) in enumerate(zip(reference, other)) if a != b),
                    min(len(reference), len(other)),
                )
                where = reference[diff][0] if diff < len(reference) else other[diff][0]
                raise EnsembleError(
                    f"members differ in their forward at graph node {where!r} (member 0 vs member {i}): packed "
                    "members must compute the same graph"
                )
        rewriter = _Rewriter(members, traced)
        graph = rewriter.run()
        root: dict[str, Any] = dict(rewriter.modules)
        gm = fx.GraphModule(root, graph, class_name="PackedForward")
        self.num_members = len(members)
        for target in rewriter.folded:  # a folded BatchNorm is not called by the graph: keep it registered
            _set_submodule(gm, target, rewriter.packed_modules[target])
        self._add_unused_entries(gm, members, rewriter.packed_modules)
        # the generated forward (a GraphModule, not registered) calls the same submodule objects
        # that are registered here, so state_dict, .to(), .train() and parameters() see them
        for name, child in gm.named_children():
            if hasattr(self, name):
                raise EnsembleError(
                    f"member 0 has a top-level submodule named {name!r}, a PackedEnsemble attribute"
                )
            self.add_module(name, child)
        self.__dict__["_forward_module"] = gm
        self.per_sample = rewriter.per_sample
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0):
            raise ConfigError(f"chunk_size must be a whole number >= 0 (0: never split the batch), found {chunk_size!r}")
        self.chunk_size = max(1, CHUNK_SAMPLES // len(members)) if chunk_size is None else chunk_size
        convs2d = [
            m
            for m in rewriter.packed_modules.values()
            if isinstance(m, PackedConv2d) and m.in_channels // m.groups < SPLIT_CHANNELS  # not split ones
        ]
        if channels_last is None:
            channels_last = bool(convs2d) and all(m.weight.device.type == "cpu" for m in convs2d)
        if channels_last:
            for conv in convs2d:  # a channels-last weight makes the convolution's output channels-last
                # (empty_like + copy_: .contiguous() keeps the strides of weights with one input channel,
                # which count as channels-last already but make the convolution pick NCHW)
                weight = conv.weight.data
                conv.weight.data = torch.empty_like(weight, memory_format=torch.channels_last).copy_(weight)
        self.__dict__["_template"] = _meta_copy(members[0])
        self.train(members[0].training)

    def _add_unused_entries(
        self, gm: fx.GraphModule, members: Sequence[nn.Module], packed: dict[str, nn.Module]
    ) -> None:
        """Parameters and buffers the forward never reaches, kept (concatenated) so that ``unpack`` is exact."""
        covered = {f"{prefix}.{name}" for prefix, mod in packed.items() for name in _entries(mod)}
        ref = members[0]
        non_persistent = {
            f"{prefix}.{name}" if prefix else name
            for prefix, mod in ref.named_modules()
            for name in mod._non_persistent_buffers_set
        }
        params = dict(ref.named_parameters())
        all_entries = [_entries(m) for m in members]
        for name, t0 in all_entries[0].items():
            if name in covered:
                continue
            owner_path, _, leaf = name.rpartition(".")
            owner: nn.Module = gm if owner_path else self  # top-level entries go on the ensemble itself
            for part in owner_path.split(".") if owner_path else []:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            value = _cat(e[name] for e in all_entries)
            if name in params:
                owner.register_parameter(leaf, nn.Parameter(value, requires_grad=t0.requires_grad))
            else:
                owner.register_buffer(leaf, value, persistent=name not in non_persistent)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        fn = self._forward_module
        rows = self.chunk_size
        if (
            rows
            and self.per_sample
            and args
            and not kwargs
            and all(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == args[0].shape[0] for a in args)
            and args[0].shape[0] > rows
            and args[0].device.type == "cpu"
            and not any(m.training for m in self.modules())
        ):
            # eval mode, every sample on its own: chunks of the batch keep the K-times-wider
            # activations in cache (measured: see CHUNK_SAMPLES); the outputs are the same rows
            return torch.cat([fn(*chunk) for chunk in zip(*(a.split(rows) for a in args))], dim=1)
        return fn(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # the generated forward does not pickle (torch.fx would retrace it through the runtime
        # checks); it is rebuilt from the architecture template and this module's own layers
        state = self.__dict__.copy()
        state.pop("_forward_module", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        template = self._template
        rewriter = _Rewriter([template] * self.num_members, _trace(template, 0), existing=self)
        self.__dict__["_forward_module"] = fx.GraphModule(self, rewriter.run(), class_name="PackedForward")

    @property
    def code(self) -> str:
        """The Python code of the packed forward (for reading what pack made of the model)."""
        return self._forward_module.code

    def unpack(self) -> list[nn.Module]:
        """The K members as ordinary modules (see :func:`unpack`)."""
        return unpack(self)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}"


# On CPU in eval mode a batch runs in chunks of CHUNK_SAMPLES // K samples (K members): for the zoo CNN at
# K = 8 a batch of 512 ran 1.6x faster in chunks of 128 than whole (the 8-times-wider activations of a
# whole batch outgrow the CPU caches); see benchmarks/packed_ensemble.py. pack(..., chunk_size=0) turns it off.
CHUNK_SAMPLES = 1024


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    """Register ``module`` at the dotted path ``target`` below ``root``, creating empty parents as needed."""
    *parents, leaf = target.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    owner.add_module(leaf, module)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for t in _entries(module).values():
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
        )
    return copy.deepcopy(module, memo)


def pack(
    members: Sequence[nn.Module], *, channels_last: bool | None = None, chunk_size: int | None = None
) -> PackedEnsemble:
    """Fuse K models of one architecture into a :class:`PackedEnsemble` that returns their outputs (K, N, ...).

    Members must share architecture, device and dtypes; their modules must be of the types in
    :func:`supported_modules` and their forward traceable with ``torch.fx`` and made of
    operations that keep each member's channel block apart. Errors name the first
    differing parameter, or the unsupported module or graph node. The members are not changed.

    ``channels_last``: store 2-D convolution weights channels-last, so that activations flow
    in that memory format (values are the same; on CPU, grouped convolutions and pooling run
    faster so). Default: on where the members have ``Conv2d`` layers and live on the CPU.

    ``chunk_size``: on CPU in eval mode, batches of more samples run in chunks of this many
    (the outputs are the same; the smaller activations stay in cache), where the packed graph
    is known to treat every sample on its own (no operation on the input itself, no reduction
    over the batch). Default ``CHUNK_SAMPLES // K`` (128 for K = 8); 0: never split.
    """
    return PackedEnsemble(members, channels_last=channels_last, chunk_size=chunk_size)


def unpack(packed: PackedEnsemble) -> list[nn.Module]:
    """The K members of ``packed`` as ordinary modules of the original architecture.

    Each is a copy of member 0's architecture holding its own slice of every packed parameter
    and buffer (BatchNorm running statistics and batch counts included), with the packed
    tensors' device and dtype (after ``packed.to(...)``, the members follow), in the packed
    module's train/eval mode; ``pack`` followed by ``unpack`` gives the members' tensors back
    exactly.
    """
    if not isinstance(packed, PackedEnsemble):
        raise ConfigError(f"unpack takes a PackedEnsemble (from pack), not a {type(packed).__name__}")
    k = packed.num_members
    packed_entries = _entries(packed)
    out = []
    for i in range(k):
        member = copy.deepcopy(packed._template)
        with torch.no_grad():
            for name, t in _entries(member).items():
                whole = packed_entries[name]
                piece = whole[i] if t.dim() == 0 else whole.chunk(k, dim=0)[i].reshape(t.shape)
                value = piece.clone(memory_format=torch.contiguous_format)
                prefix, _, leaf = name.rpartition(".")
                owner = member.get_submodule(prefix)
                if isinstance(t, nn.Parameter):
                    owner._parameters[leaf] = nn.Parameter(value, requires_grad=t.requires_grad)
                else:
                    owner._buffers[leaf] = value
        member.train(packed.training)
        out.append(member)
    return out
