"""Permutation specifications derived from a model by tracing it with torch.fx.

Reordering the hidden units of a layer changes nothing a network computes as long as
every weight axis that indexes those units is reordered the same way: the output axis
of the producing Linear/Conv weight and bias, the BatchNorm/LayerNorm parameters and
running statistics that follow, and the input axis of every consumer (Ainsworth et al.
2023, "Git Re-Basin", Sec. 3). A :class:`PermutationSpec` lists those axes per group.

The spec is found by propagating, node by node through the traced graph, which groups
the feature axis of each value carries:

- Linear/Conv outputs start a new group; their inputs tie the consumer's input axis to
  the groups of the incoming value;
- elementwise ops (activations, dropout, pooling over space) pass groups through;
- additions and other elementwise binary ops of two tensors merge their groups (residual
  connections: both branches must share one permutation);
- concatenations along the feature axis put groups side by side;
- flattening a conv feature map into a Linear repeats each channel over the spatial
  positions (the repeat factor is read from the Linear's ``in_features``).
- moving axes (``permute``/``transpose``, channels-last and back) keeps the groups as long
  as the features land on axis 1 or the last axis; a ``view``/``reshape`` keeps them when it
  leaves batch and channels (or the last axis) whole, which needs ``example_input`` for
  the shapes (ViT's patch tokens);
- parameters combined with permuted features (a learned positional embedding, a class
  token concatenated along the tokens, ConvNeXt's layer scale, ``F.layer_norm``'s
  weight and bias) join the groups on the axis that broadcasts against the features;
- multi-head attention (``nn.MultiheadAttention``, alone or inside a
  ``TransformerEncoderLayer``) ties its inputs to the in-projection's input axis, starts
  a group at ``out_proj``'s output, and inside each head gives the query/key units one
  group and the value units (with ``out_proj``'s matching input columns) another: these
  axes are blocks of one weight, an :class:`AxisRef` with a ``start``; with
  ``whole_heads=True`` a group of whole heads (blocks of ``head_dim`` positions, an
  :class:`AxisRef` with a ``repeat``) moves the heads before the groups inside them act.

The model's input and output axes are fixed, and so is every group that reaches an op
this module does not understand; :meth:`PermutationSpec.explain` says which node fixed
which group and why.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from modelfuse.errors import AlignmentError


@dataclass(frozen=True)
class AxisRef:
    """One weight axis (or a block of it) permuted by a group.

    The block starts at ``start`` on ``axis`` of the state-dict entry ``name`` and holds
    ``size * repeat`` positions; unit ``i`` of the group owns positions
    ``start + i * repeat ... start + i * repeat + repeat - 1`` (``repeat`` > 1 where a conv
    feature map was flattened into a Linear; ``start`` > 0 after a concatenation).
    """

    name: str
    axis: int
    start: int = 0
    repeat: int = 1


@dataclass(frozen=True)
class PermutationGroup:
    """Weight axes that share one permutation of ``size`` units.

    ``inner`` (whole attention heads): unit ``i`` is a block of positions (``repeat`` > 1)
    whose own units the groups ``inner[i]`` reorder. Blocks move first; ``inner[i]`` then
    reorders the block that has arrived at position ``i`` (the spec lists this group
    before its inner groups, the order in which permutations are applied).
    """

    name: str
    size: int
    axes: tuple[AxisRef, ...]
    producers: tuple[str, ...] = ()  # fx nodes whose output carries exactly this group on its feature axis
    inner: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class FixedGroup:
    """Axes that cannot be permuted, with the node that fixed them and why."""

    name: str
    size: int
    axes: tuple[AxisRef, ...]
    node: str
    reason: str


@dataclass(frozen=True)
class PermutationSpec:
    """Groups of weight axes that share a permutation (``groups``), and those that cannot move (``fixed``)."""

    groups: dict[str, PermutationGroup]
    fixed: tuple[FixedGroup, ...] = ()
    model_name: str = "model"
    tap_layouts: dict[str, tuple[str, int, int]] = field(
        default_factory=dict
    )  # node -> (layout, offset, group size)
    fixed_inputs: tuple[
        tuple[AxisRef, str], ...
    ] = ()  # input axes fed by values that cannot be permuted, and why

    def axes_of(self, name: str) -> list[tuple[str, AxisRef]]:
        """(group name, axis) pairs that permute the state-dict entry ``name``."""
        return [(g.name, ax) for g in self.groups.values() for ax in g.axes if ax.name == name]

    def param_axes(self) -> dict[str, list[tuple[str, AxisRef]]]:
        """State-dict entry -> every (group name, axis) that permutes it."""
        out: dict[str, list[tuple[str, AxisRef]]] = {}
        for g in self.groups.values():
            for ax in g.axes:
                out.setdefault(ax.name, []).append((g.name, ax))
        return out

    def explain(self) -> str:
        """A readable listing of the permutable groups and of the fixed axes with their reasons."""
        lines = [f"{self.model_name}: {len(self.groups)} permutation group(s), {len(self.fixed)} fixed"]
        for g in self.groups.values():
            blocks = f", unit i a block reordered inside by {', '.join(g.inner[0])}, ..." if g.inner else ""
            lines.append(f"  group {g.name} ({g.size} units{blocks})")
            lines += [f"    {_fmt_axis(a)}" for a in g.axes]
        for f in self.fixed:
            lines.append(f"  fixed {f.name} ({f.size} units) at node {f.node!r}: {f.reason}")
            lines += [f"    {_fmt_axis(a)}" for a in f.axes]
        for a, why in self.fixed_inputs:
            lines.append(f"  fixed input {_fmt_axis(a)}: fed by {why}")
        return "\n".join(lines)


def _fmt_axis(a: AxisRef) -> str:
    extra = "".join(
        [f", from {a.start}" if a.start else "", f", each unit repeated {a.repeat}x" if a.repeat > 1 else ""]
    )
    return f"{a.name} axis {a.axis}{extra}"


# ---------------------------------------------------------------------------------------------
# tracing


class _RecordingTracer(fx.Tracer):
    """A tracer that remembers which module it is inside, to name it when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self.stack.append(f"{name or '<root>'} ({type(m).__name__})")
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module, as the error unwinds
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced with torch.fx, or an :class:`AlignmentError` naming where tracing failed."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
        where = tracer.failed_in or f"<root> ({type(model).__name__})"
        raise AlignmentError(
            f"cannot trace {type(model).__name__} with torch.fx: failed inside module {where}: "
            f"{type(exc).__name__}: {exc}. Permutation alignment needs a traceable forward (no "
            "data-dependent Python control flow); rewrite that forward without branching on tensor "
            "values, or mark the module as a leaf (its weights then stay fixed)."
        ) from exc
    return fx.GraphModule(model, graph, type(model).__name__)


# ---------------------------------------------------------------------------------------------
# propagation


@dataclass(frozen=True)
class _Feat:
    """The permutation groups carried by a value's feature axis.

    ``layout`` is "channel" (axis 1 of an N x C x ... map) or "last" (the last axis);
    ``segments`` are (group id, units) side by side; ``repeat`` is how often each unit
    repeats (None: flattened from a map of unknown spatial size).
    """

    segments: tuple[tuple[int, int], ...]
    layout: str
    repeat: int | None = 1

    @property
    def total(self) -> int:
        return sum(n for _, n in self.segments)


_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.sigmoid, torch.nn.functional.tanh,
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_PASS_NAMES = {  # elementwise functions of optional libraries, known by name so as not to import them
    "torchvision.ops.stochastic_depth.stochastic_depth",  # per-example scaling (identity in eval)
}
_PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "relu_", "float", "to"}
_BINARY = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
}  # fmt: skip
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_SHAPE_METHODS = {"size", "dim"}
_NORM_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Builder:
    """Union-find over groups plus the axes attached to them while walking the graph."""

    def __init__(self, gm: fx.GraphModule, whole_heads: bool = False) -> None:
        self.gm = gm
        self.whole_heads = whole_heads
        self.inner: dict[int, list[list[int]]] = {}  # whole-head group -> per head, its within-head groups
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.size: list[int] = []
        self.label: list[str] = []
        self.axes: list[list[AxisRef]] = []
        self.fixed: dict[int, tuple[str, str]] = {}
        self.axis_owner: dict[AxisRef, int] = {}
        self.feat: dict[str, _Feat | None] = {}
        self.ndim: dict[str, int | None] = {}
        self.tensor: dict[str, bool] = {}
        self.tuples: dict[str, tuple[_Feat | None, ...]] = {}  # modules returning tuples (attention)
        # values that are a parameter (or its expand) -> its state-dict name
        self.param_of: dict[str, str] = {}
        self.why: dict[str, str] = {}  # values that cannot be permuted -> why
        self.fixed_inputs: list[tuple[AxisRef, str]] = []

    # -- union-find --------------------------------------------------------------------------
    def new_group(self, size: int, label: str) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.label.append(label)
        self.axes.append([])
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, node: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.fix_group(ra, node, f"joins groups of {self.size[ra]} and {self.size[rb]} units")
            self.fix_group(rb, node, f"joins groups of {self.size[ra]} and {self.size[rb]} units")
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.axes[lo] += self.axes[hi]
        self.axes[hi] = []
        if hi in self.fixed and lo not in self.fixed:
            self.fixed[lo] = self.fixed[hi]
        self.fixed.pop(hi, None)

    def add_axis(self, g: int, ref: AxisRef) -> None:
        if ref in self.axis_owner:  # a module called twice: both calls share one permutation
            self.union(self.axis_owner[ref], g, ref.name)
            return
        self.axis_owner[ref] = g
        self.axes[self.find(g)].append(ref)

    def fix_group(self, g: int, node: str, reason: str) -> None:
        r = self.find(g)
        self.fixed.setdefault(r, (node, reason))

    def fix(self, feat: _Feat | None, node: str, reason: str) -> None:
        if feat is not None:
            for g, _ in feat.segments:
                self.fix_group(g, node, reason)

    # -- walking -----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                for arg in _node_args(node):
                    self.fix(self.feat.get(arg.name), node.name, "reaches the model's output")
                continue
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape"):  # known from an example input
                self.ndim[node.name] = len(meta.shape)
            feat, ndim, is_tensor = self.visit(node)
            if meta is not None and hasattr(meta, "shape"):
                ndim = len(meta.shape)
            if feat is None and is_tensor:  # remember why this value cannot be permuted
                args = _node_args(node)  # a value that is not a parameter explains better (a class token is)
                first = next((a for a in args if a.name not in self.param_of), next(iter(args), None))
                self.why[node.name] = self.why.get(node.name) or (
                    f"the model's input {node.name!r}"
                    if node.op == "placeholder"
                    else f"the constant {node.target!r}"
                    if node.op == "get_attr"
                    else self.why.get(first.name, f"node {node.name!r}")
                    if first is not None
                    else f"node {node.name!r}"
                )
            self.feat[node.name], self.ndim[node.name], self.tensor[node.name] = feat, ndim, is_tensor

    def visit(self, node: fx.Node) -> tuple[_Feat | None, int | None, bool]:
        if node.op == "placeholder":
            return None, self.ndim.get(node.name), True  # the model's input: fixed by construction
        if node.op == "get_attr":
            self.param_of[node.name] = str(node.target)
            return None, self.ndim.get(node.name), True
        x = node.args[0] if node.args else None
        xf = self.feat.get(x.name) if isinstance(x, fx.Node) else None
        xd = self.ndim.get(x.name) if isinstance(x, fx.Node) else None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)], xf, xd)
        if node.op == "call_function":
            fn = node.target
            if fn in _PASS_FUNCTIONS or _qualname(fn) in _PASS_NAMES:
                return self.only_first(node, xf, xd)
            if fn in _POOL_FUNCTIONS:
                return self.pool(node, xf, xd)
            if fn in _BINARY:
                return self.binary(node)
            if fn is torch.flatten:
                return self.flatten(node, xf, xd, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
            if fn is torch.cat or fn is torch.concat:
                return self.cat(node)
            if fn is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim"):
                return None, None, False
            if fn is operator.getitem and isinstance(x, fx.Node) and x.name in self.tuples:
                parts = self.tuples[x.name]
                i = node.args[1]
                return (
                    (parts[i], xd, True)
                    if isinstance(i, int) and -len(parts) <= i < len(parts)
                    else (None, None, True)
                )
            if fn is operator.getitem and isinstance(x, fx.Node) and not self.tensor.get(x.name, True):
                return None, None, False  # indexing a shape
            if fn is operator.getitem:
                return self.index(node, xf, xd, node.args[1])
            if fn in (torch.mean, torch.sum, torch.amax, torch.amin):
                return self.reduce(node, xf, xd)
            if fn is torch.permute:
                return self.permute(node, xf, xd, _arg(node, 1, "dims", None))
            if fn is torch.transpose:
                return self.transpose(node, xf, xd)
            if fn is F.layer_norm:
                return self.layer_norm(node, xf, xd)
        if node.op == "call_method":
            m = str(node.target)
            if m in _SHAPE_METHODS:
                return None, None, False
            if m in _PASS_METHODS:
                return self.only_first(node, xf, xd)
            if m in _BINARY_METHODS:
                return self.binary(node)
            if m in ("mean", "sum", "amax", "amin"):
                return self.reduce(node, xf, xd)
            if m == "flatten":
                return self.flatten(node, xf, xd, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
            if m in ("view", "reshape"):
                shape = node.args[1:]
                if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                    shape = tuple(shape[0])
                if len(shape) == 2 and shape[1] == -1:
                    return self.flatten(node, xf, xd, 1, -1)
                return self.reshape(node, xf)
            if m == "permute":
                dims = node.args[1:]
                return self.permute(node, xf, xd, dims[0] if len(dims) == 1 else dims)
            if m == "transpose":
                return self.transpose(node, xf, xd)
            if m == "expand" and isinstance(x, fx.Node) and x.name in self.param_of:
                self.param_of[node.name] = self.param_of[x.name]  # a class token repeated over the batch
                return None, None, True
        return self.unknown(node, f"{node.op} {_target_name(node)} is not understood by permutation tracing")

    def reshape(self, node: fx.Node, xf: _Feat | None) -> tuple[_Feat | None, int | None, bool]:
        """A view/reshape that keeps the feature axis whole: batch and channels kept (spatial dims merged or
        split), or the last axis kept (leading dims merged or split). Shapes come from ``example_input``."""
        x = node.args[0]
        src, dst = _shape(x) if isinstance(x, fx.Node) else None, _shape(node)
        if xf is None:
            return None, None if dst is None else len(dst), True
        if src is None or dst is None:
            return self.unknown(
                node, "a reshape whose shapes are unknown (pass example_input= to permutation_spec)"
            )
        if xf.repeat == 1 and xf.layout == "channel" and len(dst) >= 3 and src[:2] == dst[:2]:
            return xf, len(dst), True
        if xf.repeat == 1 and xf.layout == "last" and src[-1:] == dst[-1:]:
            return xf, len(dst), True
        return self.unknown(
            node, f"a reshape from {tuple(src)} to {tuple(dst)} that splits or moves the features"
        )

    def permute(
        self, node: fx.Node, xf: _Feat | None, xd: int | None, dims: Any
    ) -> tuple[_Feat | None, int | None, bool]:
        """Moving axes (channels-last and back, tokens x features): the features must land on axis 1 or last."""
        if xf is None:
            return None, xd, True
        if xd is None or not isinstance(dims, (tuple, list)) or len(dims) != xd or xf.repeat != 1:
            return self.unknown(node, "moves axes of unknown rank (pass example_input= to permutation_spec)")
        dims = [int(d) % xd for d in dims]
        feature = 1 if xf.layout == "channel" else xd - 1
        new = dims.index(feature)
        if new == xd - 1:
            return _Feat(xf.segments, "last"), xd, True
        if new == 1:
            return _Feat(xf.segments, "channel"), xd, True
        return self.unknown(node, f"moves the features to axis {new}, neither axis 1 nor the last")

    def transpose(
        self, node: fx.Node, xf: _Feat | None, xd: int | None
    ) -> tuple[_Feat | None, int | None, bool]:
        a, b = _arg(node, 1, "dim0", None), _arg(node, 2, "dim1", None)
        if xd is None or not isinstance(a, int) or not isinstance(b, int):
            return self.permute(node, xf, xd, None)
        dims = list(range(xd))
        dims[a % xd], dims[b % xd] = dims[b % xd], dims[a % xd]
        return self.permute(node, xf, xd, dims)

    def layer_norm(
        self, node: fx.Node, xf: _Feat | None, xd: int | None
    ) -> tuple[_Feat | None, int | None, bool]:
        """``F.layer_norm`` over the last axis (torchvision's LayerNorm2d): its weight and bias join the features."""
        if xf is None:
            return None, xd, True
        shape = _arg(node, 1, "normalized_shape", None)
        affine = [_arg(node, i, k, None) for i, k in ((2, "weight"), (3, "bias"))]
        affine = [a for a in affine if a is not None]
        ok = xf.layout == "last" and xf.repeat == 1 and isinstance(shape, (tuple, list)) and len(shape) == 1
        if not ok or not all(isinstance(a, fx.Node) and a.name in self.param_of for a in affine):
            return self.unknown(node, "layer_norm over more than the permuted feature axis")
        self.stream_axes(xf, [(self.param_of[a.name], 0) for a in affine])
        return xf, xd, True

    def unknown(self, node: fx.Node, reason: str) -> tuple[_Feat | None, int | None, bool]:
        args = _node_args(node)
        upstream = [self.why[a.name] for a in args if a.name in self.why]
        if upstream and all(self.feat.get(a.name) is None for a in args):  # the cause lies further up
            self.why[node.name] = upstream[0]
        else:
            self.why[node.name] = f"the output of node {node.name!r}, where {reason}"
        for arg in _node_args(node):
            self.fix(self.feat.get(arg.name), node.name, reason)
        return None, None, True

    def only_first(
        self, node: fx.Node, xf: _Feat | None, xd: int | None
    ) -> tuple[_Feat | None, int | None, bool]:
        others = [a for a in _node_args(node)[1:] if self.tensor.get(a.name, True)]
        if others:
            return self.unknown(node, f"{_target_name(node)} takes more than one tensor")
        return xf, xd, True

    def pool(self, node: fx.Node, xf: _Feat | None, xd: int | None) -> tuple[_Feat | None, int | None, bool]:
        if xf is not None and xf.layout != "channel":
            return self.unknown(node, "pools over the feature axis of a Linear output")
        return self.only_first(node, xf, xd)

    def visit_module(
        self, node: fx.Node, mod: nn.Module, xf: _Feat | None, xd: int | None
    ) -> tuple[_Feat | None, int | None, bool]:
        name = str(node.target)
        if isinstance(mod, _PASS_MODULES):
            return self.only_first(node, xf, xd)
        if isinstance(mod, _POOL_MODULES):
            return self.pool(node, xf, xd)
        if isinstance(mod, nn.Flatten):
            return self.flatten(node, xf, xd, mod.start_dim, mod.end_dim)
        if isinstance(mod, nn.Linear):
            repeat = 1
            if xf is not None:
                if xf.layout != "last":
                    return self.unknown(node, "a Linear applied to the last axis of a conv feature map")
                repeat = xf.repeat
                if repeat is None:
                    repeat = mod.in_features // xf.total if xf.total else 0
                if xf.total * repeat != mod.in_features:
                    return self.unknown(
                        node, f"in_features {mod.in_features} do not match {xf.total} units in"
                    )
            self.note_fixed_input(node, name, xf)
            return self.layer(name, mod, xf, mod.out_features, "last", xd, repeat)
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[type(mod)]
            if mod.groups != 1 and mod.groups == mod.in_channels == mod.out_channels:
                return self.depthwise(node, name, mod, xf, dims)
            if mod.groups != 1:
                return self.unknown(node, f"a grouped convolution (groups={mod.groups})")
            if xf is not None and (xf.layout != "channel" or xf.repeat != 1 or xf.total != mod.in_channels):
                return self.unknown(node, "a convolution over an input that is not a channel-first map")
            self.note_fixed_input(node, name, xf)
            return self.layer(name, mod, xf, mod.out_channels, "channel", dims, 1)
        if isinstance(mod, _NORM_BN):
            if xf is None:
                return None, xd, True
            ok = xf.repeat == 1 and (xf.layout == "channel" or xd == 2)
            if not ok or xf.total != mod.num_features:
                return self.unknown(node, "BatchNorm over an axis other than the permuted features")
            self.norm_axes(name, mod, xf, ("weight", "bias", "running_mean", "running_var"))
            return xf, xd, True
        if isinstance(mod, nn.LayerNorm):
            if xf is None:
                return None, xd, True
            if xf.layout != "last" or xf.repeat != 1 or len(mod.normalized_shape) != 1:
                return self.unknown(node, "LayerNorm over more than the permuted feature axis")
            self.norm_axes(name, mod, xf, ("weight", "bias"))
            return xf, xd, True
        if isinstance(mod, nn.Embedding):
            g = self.new_group(mod.embedding_dim, name)
            self.add_axis(g, AxisRef(f"{name}.weight", 1))
            return _Feat(((g, mod.embedding_dim),), "last"), None if xd is None else xd + 1, True
        if isinstance(mod, nn.MultiheadAttention):
            return self.attention(node, name, mod)
        if isinstance(mod, nn.TransformerEncoderLayer):
            return self.encoder_layer(node, name, mod, xf, xd)
        if isinstance(mod, nn.TransformerEncoder):
            for i, layer in enumerate(mod.layers):
                xf, xd, _ = self.encoder_layer(node, f"{name}.layers.{i}", layer, xf, xd)
            if mod.norm is not None and xf is not None:
                if not isinstance(mod.norm, nn.LayerNorm):
                    return self.unknown(node, f"a final norm {type(mod.norm).__name__}")
                self.norm_axes(f"{name}.norm", mod.norm, xf, ("weight", "bias"))
            return xf, xd, True
        return self.unknown(node, f"module {type(mod).__name__} is not understood by permutation tracing")

    def depthwise(
        self, node: fx.Node, name: str, mod: nn.Module, xf: _Feat | None, ndim: int
    ) -> tuple[_Feat | None, int | None, bool]:
        """A depthwise convolution maps channel c to channel c: its output keeps the input's groups."""
        if xf is None:
            return None, ndim, True
        if xf.layout != "channel" or xf.repeat != 1:
            return self.unknown(node, "a depthwise convolution over an input that is not a channel-first map")
        entries = [(f"{name}.weight", 0)] + (
            [(f"{name}.bias", 0)] if getattr(mod, "bias", None) is not None else []
        )
        self.stream_axes(xf, entries)
        return xf, ndim, True

    def stream_axes(self, xf: _Feat, refs: Iterable[tuple[str, int]]) -> None:
        """Tie (entry, axis) pairs to the groups of a residual stream ``xf``, segment by segment."""
        for entry, axis in refs:
            off = 0
            for g, n in xf.segments:
                self.add_axis(g, AxisRef(entry, axis, off))
                off += n

    def attention(
        self, node: fx.Node, name: str, mod: nn.MultiheadAttention
    ) -> tuple[_Feat | None, int | None, bool]:
        """Multi-head attention: its inputs tie the projections' input axes; its output starts a group.

        Inside each head, the query/key units and the value units get groups of their own
        (see :meth:`head_groups`).
        """
        q, k, v = (_arg(node, i, key, None) for i, key in enumerate(("query", "key", "value")))
        feats = [self.feat.get(t.name) if isinstance(t, fx.Node) else None for t in (q, k, v)]
        if any(f is not None and (f.layout != "last" or f.repeat != 1) for f in feats):
            self.unknown(node, "attention over inputs whose features are not on the last axis")
            self.tuples[node.name] = (None, None)
            return None, None, False
        packed = mod._qkv_same_embed_dim
        entries = [f"{name}.in_proj_weight"] * 3 if packed else [f"{name}.{c}_proj_weight" for c in "qkv"]
        if packed and any(f is None for f in feats):  # one weight reads all three inputs
            for f in feats:
                self.fix(f, node.name, "the packed in-projection also reads an input that cannot be permuted")
        for t, f, entry in zip((q, k, v), feats, entries, strict=True):
            if f is not None:
                self.stream_axes(f, [(entry, 1)])
            elif isinstance(t, fx.Node) and AxisRef(entry, 1) not in {a for a, _ in self.fixed_inputs}:
                self.fixed_inputs.append((AxisRef(entry, 1), self.why.get(t.name, f"node {t.name!r}")))
        self.head_groups(name, mod)
        g = self.new_group(mod.embed_dim, name)
        self.add_axis(g, AxisRef(f"{name}.out_proj.weight", 0))
        if mod.out_proj.bias is not None:
            self.add_axis(g, AxisRef(f"{name}.out_proj.bias", 0))
        self.tuples[node.name] = (_Feat(((g, mod.embed_dim),), "last"), None)
        return None, None, False

    def head_groups(self, name: str, mod: nn.MultiheadAttention) -> None:
        """Two groups per head ``h`` of ``head_dim`` units each: ``{name}.head{h}.qk`` and ``{name}.head{h}.v``.

        Attention scores ``q_h . k_h`` do not change when the query and key units of head
        ``h`` are reordered alike, so one group holds head ``h``'s query and key rows of the
        in-projection (packed ``in_proj_weight`` / ``in_proj_bias`` blocks at ``h * head_dim``
        and ``embed_dim + h * head_dim``, or the separate ``q_proj_weight`` / ``k_proj_weight``
        rows) and its slice of ``bias_k``. The head's output is its attention-weighted values,
        read by ``out_proj``'s input columns ``h * head_dim ...``: a second group holds the
        value rows, ``bias_v``'s slice and those columns.

        With ``whole_heads`` a group ``{name}.heads`` of ``num_heads`` units also moves whole
        heads (blocks of ``head_dim`` positions in the q, k and v rows, their biases, and
        ``out_proj``'s input columns) before the within-head groups act; see
        :class:`PermutationGroup` ``inner``.
        """
        e, hd = mod.embed_dim, mod.head_dim
        packed = mod._qkv_same_embed_dim
        w = {
            c: (f"{name}.in_proj_weight", i * e) if packed else (f"{name}.{c}_proj_weight", 0)
            for i, c in enumerate("qkv")
        }
        if self.whole_heads and mod.num_heads > 1:
            heads = self.new_group(mod.num_heads, f"{name}.heads")
            for i, c in enumerate("qkv"):
                self.add_axis(heads, AxisRef(w[c][0], 0, w[c][1], hd))
                if mod.in_proj_bias is not None:
                    self.add_axis(heads, AxisRef(f"{name}.in_proj_bias", 0, i * e, hd))
            for c, extra in (("k", mod.bias_k), ("v", mod.bias_v)):
                if extra is not None:
                    self.add_axis(heads, AxisRef(f"{name}.bias_{c}", 2, 0, hd))
            self.add_axis(heads, AxisRef(f"{name}.out_proj.weight", 1, 0, hd))
            self.inner[heads] = []
        for h in range(mod.num_heads):
            if self.whole_heads and mod.num_heads > 1:
                self.inner[heads].append([len(self.parent), len(self.parent) + 1])  # the next two groups
            for part in ("qk", "v"):
                g = self.new_group(hd, f"{name}.head{h}.{part}")
                for c in part:
                    entry, start = w[c]
                    self.add_axis(g, AxisRef(entry, 0, start + h * hd))
                    if mod.in_proj_bias is not None:
                        self.add_axis(g, AxisRef(f"{name}.in_proj_bias", 0, "qkv".index(c) * e + h * hd))
                    extra = mod.bias_k if c == "k" else mod.bias_v if c == "v" else None
                    if extra is not None:
                        self.add_axis(g, AxisRef(f"{name}.bias_{c}", 2, h * hd))
                if part == "v":
                    self.add_axis(g, AxisRef(f"{name}.out_proj.weight", 1, h * hd))

    def encoder_layer(
        self, node: fx.Node, name: str, mod: nn.Module, xf: _Feat | None, xd: int | None
    ) -> tuple[_Feat | None, int | None, bool]:
        """A TransformerEncoderLayer: the residual stream keeps its groups through both sublayers.

        The stream's groups gain the attention's input and output axes, both LayerNorms and
        the feed-forward's input and output axes; the feed-forward's hidden units form a group.
        """
        if not isinstance(mod, nn.TransformerEncoderLayer) or not mod.self_attn._qkv_same_embed_dim:
            return self.unknown(node, "an encoder layer with separate query/key/value projections")
        d = mod.self_attn.embed_dim
        if xf is None:  # the stream comes from an unpermutable input: the stream stays fixed
            xf = _Feat(((self.new_group(d, name), d),), "last")
            self.fix(xf, node.name, "the encoder's input cannot be permuted")
        if xf.layout != "last" or xf.repeat != 1 or xf.total != d:
            return self.unknown(node, "an encoder layer over an axis other than the permuted features")
        self.head_groups(f"{name}.self_attn", mod.self_attn)
        refs = [(f"{name}.self_attn.in_proj_weight", 1), (f"{name}.self_attn.out_proj.weight", 0)]
        refs += [(f"{name}.linear1.weight", 1), (f"{name}.linear2.weight", 0)]
        refs += [(f"{name}.self_attn.out_proj.bias", 0), (f"{name}.linear2.bias", 0)]
        refs += [(f"{name}.{n}.{a}", 0) for n in ("norm1", "norm2") for a in ("weight", "bias")]
        state = dict(mod.named_parameters())
        prefix = f"{name}."
        self.stream_axes(xf, [(e, a) for e, a in refs if e.removeprefix(prefix) in state])
        hidden = self.new_group(mod.linear1.out_features, f"{name}.linear1")
        self.add_axis(hidden, AxisRef(f"{name}.linear1.weight", 0))
        if mod.linear1.bias is not None:
            self.add_axis(hidden, AxisRef(f"{name}.linear1.bias", 0))
        self.add_axis(hidden, AxisRef(f"{name}.linear2.weight", 1))
        return xf, xd, True

    def reduce(
        self, node: fx.Node, xf: _Feat | None, xd: int | None
    ) -> tuple[_Feat | None, int | None, bool]:
        """A mean/sum/max over axes other than the features keeps them (pooling over tokens or space)."""
        dim = _arg(node, 1, "dim", None)
        keep = bool(_arg(node, 2, "keepdim", False))
        if xf is None:
            return None, None, True
        if dim is None or xd is None:
            return self.unknown(
                node,
                "a reduction whose axes cannot be told apart from the features "
                "(pass example_input= to permutation_spec so that ranks are known)",
            )
        dims = {d % xd for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
        feature = 1 if xf.layout == "channel" else xd - 1
        if feature in dims or (0 in dims and xf.layout == "channel"):  # channels must stay at axis 1
            return self.unknown(node, f"reduces over the feature axis or the batch of a map (dim={dim})")
        nd = xd if keep else xd - len(dims)
        layout = "last" if xf.layout == "last" or nd == 2 else "channel"  # channels stay at axis 1
        return _Feat(xf.segments, layout, xf.repeat), nd, True

    def index(
        self, node: fx.Node, xf: _Feat | None, xd: int | None, idx: Any
    ) -> tuple[_Feat | None, int | None, bool]:
        """``x[:, 0]`` (a class token) and the like: integer or full-slice indices before the features."""
        if xf is None:
            return None, None, True
        idx = idx if isinstance(idx, tuple) else (idx,)
        plain = all(isinstance(i, int) or i == slice(None) for i in idx)
        if not plain or xd is None or xf.layout != "last" or len(idx) >= xd or isinstance(idx[0], int):
            return self.unknown(node, "indexes into the features, or with indices it cannot follow")
        return xf, xd - sum(isinstance(i, int) for i in idx), True

    def note_fixed_input(self, node: fx.Node, name: str, xf: _Feat | None) -> None:
        x = node.args[0] if node.args else None
        if xf is None and isinstance(x, fx.Node):
            self.fixed_inputs.append((AxisRef(f"{name}.weight", 1), self.why.get(x.name, f"node {x.name!r}")))

    def layer(
        self,
        name: str,
        mod: nn.Module,
        xf: _Feat | None,
        out: int,
        layout: str,
        ndim: int | None,
        repeat: int,
    ) -> tuple[_Feat | None, int | None, bool]:
        """A Linear/Conv: its input axis joins the incoming groups, its output axis starts a new one."""
        if xf is not None:
            off = 0
            for g, n in xf.segments:
                self.add_axis(g, AxisRef(f"{name}.weight", 1, off * repeat, repeat))
                off += n
        g = self.new_group(out, name)
        self.add_axis(g, AxisRef(f"{name}.weight", 0))
        if getattr(mod, "bias", None) is not None:
            self.add_axis(g, AxisRef(f"{name}.bias", 0))
        return _Feat(((g, out),), layout), ndim, True

    def norm_axes(self, name: str, mod: nn.Module, xf: _Feat, attrs: Iterable[str]) -> None:
        for attr in attrs:
            if getattr(mod, attr, None) is None:
                continue
            off = 0
            for g, n in xf.segments:
                self.add_axis(g, AxisRef(f"{name}.{attr}", 0, off))
                off += n

    def flatten(
        self, node: fx.Node, xf: _Feat | None, xd: int | None, start: Any, end: Any
    ) -> tuple[_Feat | None, int | None, bool]:
        if start != 1 or end != -1:
            return self.unknown(
                node, f"flattens dims {start}..{end} (only flattening from dim 1 is understood)"
            )
        if xf is None:
            return None, 2, True
        if xf.layout == "channel":
            if xf.repeat != 1:
                return self.unknown(node, "flattens a map twice")
            return _Feat(xf.segments, "last", None), 2, True
        if xd == 2:
            return xf, 2, True
        return self.unknown(node, "flattens a Linear output of unknown rank")

    def binary(self, node: fx.Node) -> tuple[_Feat | None, int | None, bool]:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and self.tensor.get(a.name, True)]
        if len(tensors) <= 1:
            x = tensors[0] if tensors else None
            return (
                (self.feat.get(x.name), self.ndim.get(x.name), True) if x is not None else (None, None, False)
            )
        feats = [self.feat.get(a.name) for a in tensors]
        ndims = [self.ndim.get(a.name) for a in tensors]
        known = [f for f in feats if f is not None]
        params = [a for a, f in zip(tensors, feats, strict=True) if f is None and a.name in self.param_of]
        fd = next((d for f, d in zip(feats, ndims, strict=True) if f is not None and d is not None), None)
        if known and len(params) + len(known) == len(tensors) and self.tie_params(params, known[0], fd):
            tensors = [a for a in tensors if a.name not in self.param_of]
            feats, ndims = [self.feat.get(a.name) for a in tensors], [self.ndim.get(a.name) for a in tensors]
        ndim = next((d for d in ndims if d is not None), None)
        if any(f is None for f in feats):
            return self.unknown(node, "combines permuted features with a tensor that cannot be permuted")
        first = feats[0]
        assert first is not None
        for other in feats[1:]:
            assert other is not None
            same = (
                other.layout == first.layout
                and other.repeat == first.repeat
                and [n for _, n in other.segments] == [n for _, n in first.segments]
            )
            if not same:
                return self.unknown(node, "combines feature axes laid out differently")
            for (ga, _), (gb, _) in zip(first.segments, other.segments, strict=True):
                self.union(ga, gb, node.name)
        return first, ndim, True

    def tie_params(self, params: list[fx.Node], xf: _Feat, ndim: int | None) -> bool:
        """Parameters combined with permuted features (a learned positional embedding, a class token, a
        layer scale) join their groups on the axis that broadcasts against the features."""
        state = self.gm.state_dict()
        if xf.repeat != 1 or (xf.layout == "channel" and ndim is None):
            return False
        ties: list[tuple[str, int]] = []
        for p in params:
            name = self.param_of[p.name]
            t = state.get(name)
            if t is None or t.dim() == 0:
                return False
            axis = t.dim() - 1 if xf.layout == "last" else t.dim() - (ndim or 0) + 1
            if axis < 0 or t.shape[axis] not in (1, xf.total):
                return False
            if t.shape[axis] == xf.total:  # a size-1 axis broadcasts alike over every unit: nothing to move
                ties.append((name, axis))
        for name, axis in ties:
            self.stream_axes(xf, [(name, axis)])
        return True

    def cat(self, node: fx.Node) -> tuple[_Feat | None, int | None, bool]:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = _arg(node, 1, "dim", 0)
        if not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
            return self.unknown(node, "concatenates values it cannot follow")
        feats = [self.feat.get(p.name) for p in parts]
        ndim = next((self.ndim.get(p.name) for p in parts if self.ndim.get(p.name) is not None), None)
        known = [f for f in feats if f is not None]
        params = [p for p, f in zip(parts, feats, strict=True) if f is None and p.name in self.param_of]
        if not known:
            return None, ndim, True
        layouts = {f.layout for f in known}
        repeats = {f.repeat for f in known}
        if len(layouts) != 1 or repeats != {1}:
            return self.unknown(node, "concatenates feature axes laid out differently")
        layout = layouts.pop()
        feature_dim = 1 if layout == "channel" or ndim == 2 else -1
        on_features = dim == feature_dim or (
            ndim is not None and dim in (feature_dim + ndim, feature_dim - ndim)
        )
        if on_features and len(known) == len(feats):
            segments = tuple(s for f in known for s in f.segments)
            return _Feat(segments, layout), ndim, True
        # along the batch or the tokens: every part keeps its features, so they share permutations;
        # a parameter among them (a class token) joins them
        along_other = not on_features and (dim == 0 or ndim is not None)
        if along_other and len(known) + len(params) == len(feats) and self.tie_params(params, known[0], ndim):
            return self.binary_like(node, known, ndim)
        if any(f is None for f in feats):
            return self.unknown(node, "concatenates permuted features with a tensor that cannot be permuted")
        return self.unknown(node, f"concatenates along dim {dim}, not the feature axis")

    def binary_like(
        self, node: fx.Node, feats: list[_Feat | None], ndim: int | None
    ) -> tuple[_Feat | None, int | None, bool]:
        first = feats[0]
        assert first is not None
        for other in feats[1:]:
            assert other is not None
            if [n for _, n in other.segments] != [n for _, n in first.segments]:
                return self.unknown(node, "concatenates feature axes laid out differently")
            for (ga, _), (gb, _) in zip(first.segments, other.segments, strict=True):
                self.union(ga, gb, node.name)
        return first, ndim, True

    def tie_aliases(self, model: nn.Module) -> None:
        """Entries that are one tensor under two names (tied weights) must move together."""
        by_tensor: dict[int, list[str]] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            by_tensor.setdefault(id(t), []).append(name)
        for names in (n for n in by_tensor.values() if len(n) > 1):
            placed = {
                n: {(r.axis, r.start, r.repeat): g for r, g in self.axis_owner.items() if r.name == n}
                for n in names
            }
            keys = set().union(*(set(p) for p in placed.values()))
            for key in keys:
                owners = [p.get(key) for p in placed.values()]
                if any(o is None for o in owners):
                    for o in owners:
                        if o is not None:
                            self.fix_group(
                                o, names[0], f"tied to {' and '.join(names)}, which move differently"
                            )
                    continue
                for o in owners[1:]:
                    self.union(owners[0], o, names[0])

    # -- result ------------------------------------------------------------------------------
    def spec(self, model_name: str) -> PermutationSpec:
        roots = sorted({self.find(g) for g in range(len(self.parent))})
        producers: dict[int, list[str]] = {}
        taps: dict[str, tuple[str, int, int]] = {}
        for node_name, f in self.feat.items():
            if f is not None and len(f.segments) == 1 and f.repeat == 1:
                r = self.find(f.segments[0][0])
                producers.setdefault(r, []).append(node_name)
                taps[node_name] = (f.layout, 0, f.segments[0][1])
        groups: dict[str, PermutationGroup] = {}
        fixed: list[FixedGroup] = []
        used: set[str] = set()
        names: dict[int, str] = {}
        for r in roots:
            name = self.label[r]
            while name in used:
                name += "'"
            used.add(name)
            names[r] = name
        for r in roots:
            name = names[r]
            axes = tuple(self.axes[r])
            if r in self.fixed:
                node, reason = self.fixed[r]
                fixed.append(FixedGroup(name, self.size[r], axes, node, reason))
            else:
                inner = tuple(tuple(names[self.find(i)] for i in ids) for ids in self.inner.get(r, ()))
                groups[name] = PermutationGroup(name, self.size[r], axes, tuple(producers.get(r, ())), inner)
        return PermutationSpec(groups, tuple(fixed), model_name, taps, tuple(self.fixed_inputs))


def _node_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) or n)  # type: ignore[func-returns-value]
    return out


def _arg(node: fx.Node, index: int, key: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ``example_input`` gave ``node``, if any."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"


def _target_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def permutation_spec(
    model: nn.Module, example_input: torch.Tensor | None = None, *, whole_heads: bool = False
) -> PermutationSpec:
    """The permutation groups of ``model``'s weights, derived by tracing it with torch.fx.

    ``whole_heads`` adds, per multi-head attention, a group that moves whole heads
    (``{attention}.heads``) on top of the groups inside each head.

    ``example_input`` (a batch) lets the walk know every value's rank, which reductions
    and indexing over tokens need (``x.mean(1)``, ``x[:, 0]``). Raises
    :class:`AlignmentError` naming the module where tracing failed if ``model`` cannot be
    traced.
    """
    gm = trace(model)
    if example_input is not None:
        modes = [(m, m.training) for m in gm.modules()]
        gm.eval()  # the traced modules are model's own: running BatchNorm in train mode would move its statistics
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input)
        except Exception as exc:
            raise AlignmentError(
                f"example_input of shape {tuple(example_input.shape)} does not fit {type(model).__name__}: "
                f"{type(exc).__name__}: {exc}; give a batch of the model's inputs"
            ) from exc
        finally:
            for m, mode in modes:
                m.training = mode
    builder = _Builder(gm, whole_heads)
    builder.run()
    builder.tie_aliases(model)
    spec = builder.spec(type(model).__name__)
    state = model.state_dict()
    for g in spec.groups.values():  # a check of the walk against the real tensors
        for ax in g.axes:
            t = state.get(ax.name)
            if t is None or t.dim() <= ax.axis or t.shape[ax.axis] < ax.start + g.size * ax.repeat:
                raise AlignmentError(
                    f"permutation group {g.name} names {_fmt_axis(ax)} of {g.size} units, but the model's state "
                    f"dict has {'no such entry' if t is None else tuple(t.shape)} there (a parametrized or "
                    "re-registered weight?); give permutation_spec a model whose state dict holds its weights as "
                    "the modules name them"
                )
    return spec


def explain(model: nn.Module) -> str:
    """Which weight axes of ``model`` share a permutation, and which are fixed (by which node, why)."""
    return permutation_spec(model).explain()


def iter_group_axes(spec: PermutationSpec) -> Iterator[tuple[PermutationGroup, AxisRef]]:
    for g in spec.groups.values():
        for ax in g.axes:
            yield g, ax
