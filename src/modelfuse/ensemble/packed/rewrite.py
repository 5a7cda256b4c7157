"""The graph rewrite: member 0's ``torch.fx`` graph turned into the packed forward, node by node."""

from __future__ import annotations

import builtins
import collections
import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from modelfuse.ensemble.packed.layers import PackedBatchNorm, _PackedConv
from modelfuse.ensemble.packed.ops import (
    _BINARY_BY_NAME,
    _BINARY_FUNCTIONS,
    _INPLACE_BINARY,
    _binary,
    _check_pool_input,
    _dim_op,
    _expand,
    _flatten,
    _member_numel,
    _member_shape,
    _member_size,
    _pad,
    _relu,
    _reshape,
    _stacked,
)
from modelfuse.ensemble.packed.support import (
    _BINARY_METHODS,
    _DIM_FUNCTIONS,
    _DIM_METHODS,
    _DROPOUT_FUNCTIONS,
    _DROPOUT_MODULES,
    _ELEMENTWISE_FUNCTIONS,
    _ELEMENTWISE_METHODS,
    _ELEMENTWISE_MODULES,
    _PACKED_MODULES,
    _PLAIN_MODULES,
    _POOL_FUNCTIONS,
    _POOL_MODULES,
    _RANDOM_FUNCTIONS,
    _RANDOM_METHODS,
    _SOFTMAX_MODULES,
    _TENSOR_ATTRIBUTES,
    supported_modules,
)
from modelfuse.errors import EnsembleError

# ------------------------------------------------------------------------------------ the graph rewrite

PACKED, SHARED, META = "packed", "shared", "meta"  # what a value of the rewritten graph is


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _describe(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_function":
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
        module = getattr(target, "__module__", None)
        return f"call_function {module + '.' if module else ''}{name}"
    if node.op == "call_method":
        return f"call_method Tensor.{target}"
    return f"{node.op} {target}"


class _Rewriter:
    """Builds the packed graph from member 0's traced graph, node by node.

    Every value of the new graph has a kind: PACKED (a tensor carrying the K member blocks
    along dim 1), SHARED (a tensor all members see alike: the inputs and what is computed
    from them alone, which runs once, unpacked) or META (sizes, numbers, dtypes). A SHARED
    tensor is expanded into K blocks where it meets a member's parameters or a PACKED value.
    """

    def __init__(
        self, members: Sequence[nn.Module], traced: fx.GraphModule, existing: nn.Module | None = None
    ) -> None:
        """``existing``: a PackedEnsemble whose layers to reuse (rebuilding its forward after unpickling)."""
        self.members = list(members)
        self.k = len(self.members)
        self.traced = traced
        self.existing = existing
        self.graph = fx.Graph()
        self.env: dict[fx.Node, tuple[Any, str]] = {}
        self.expanded: dict[fx.Node, fx.Node] = {}
        self.modules: dict[str, nn.Module] = {}
        self.packed_modules: dict[str, nn.Module] = {}
        self.fresh: set[fx.Node] = set()  # old nodes whose new value is a tensor made by the node itself
        self.calls = collections.Counter(str(n.target) for n in traced.graph.nodes if n.op == "call_module")
        self.folded: dict[str, str] = {}  # BatchNorm target -> the convolution target it runs inside
        # whether each sample's output depends on that sample alone in eval mode (then batches may be
        # split into chunks); False as soon as an operation may mix the rows
        self.per_sample = True

    # -- helpers
    def own_module(self, target: str) -> nn.Module | None:
        """When rebuilding, the ensemble's module at ``target`` (None where it has none)."""
        if self.existing is None:
            return None
        try:
            return self.existing.get_submodule(target)
        except AttributeError:  # a layer the forward ran as a function (ReLU, Flatten)
            return None

    def folds_into(self, node: fx.Node, arg: Any) -> fx.Node | None:
        """The new graph's convolution node that BatchNorm ``node`` folds into, or None.

        Folds when ``arg`` is the only call of a packed convolution, this BatchNorm its only
        user and the BatchNorm's only call, with running statistics (eval mode uses them)."""
        if not isinstance(arg, fx.Node) or arg.op != "call_module" or len(arg.users) != 1:
            return None
        norm = self.packed_modules.get(str(node.target))
        conv = self.packed_modules.get(str(arg.target))
        if not isinstance(norm, PackedBatchNorm) or not isinstance(conv, _PackedConv):
            return None
        if norm.running_mean is None or self.calls[str(node.target)] != 1 or self.calls[str(arg.target)] != 1:
            return None
        if norm.num_features != conv.out_channels:
            return None
        return self.env[arg][0]

    def refuse(self, node: fx.Node, why: str) -> EnsembleError:
        return EnsembleError(f"cannot pack graph node {node.name!r} ({_describe(node)}): {why}")

    def value(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: self.env[n][0])

    def kinds(self, *args: Any) -> set[str]:
        return {self.env[n][1] for a in args for n in _nodes_in(a)}

    def packed(self, arg: fx.Node) -> fx.Node:
        """``arg`` as a PACKED value of the new graph (a SHARED one is expanded, once)."""
        new, kind = self.env[arg]
        if kind == PACKED:
            return new
        if kind != SHARED:
            raise EnsembleError(f"graph node {arg.name!r} is not a tensor of activations")
        if arg not in self.expanded:
            self.expanded[arg] = self.graph.call_function(_expand, (new, self.k, arg.name))
        return self.expanded[arg]

    def emit(self, node: fx.Node, new: Any, kind: str) -> None:
        if isinstance(new, fx.Node):
            new.meta.update(node.meta)
        self.env[node] = (new, kind)

    def passthrough(self, node: fx.Node) -> bool:
        """Copy ``node`` unchanged when it sees no PACKED value (SHARED/META inputs only); True if done."""
        kinds = self.kinds(node.args, node.kwargs)
        if PACKED in kinds:
            return False
        new = self.graph.node_copy(node, lambda n: self.env[n][0])
        if SHARED in kinds:
            self.per_sample = False  # any function of the input itself may mix its rows (x - x.mean(0))
        self.emit(node, new, SHARED if SHARED in kinds else META)
        return True

    def first_tensor_only(self, node: fx.Node) -> None:
        """Refuse when an argument other than the first is an activation (only constants may follow)."""
        rest = (node.args[1:], node.kwargs)
        if self.kinds(*rest) - {META}:
            raise self.refuse(node, "only its first argument may be an activation")

    def call(self, fn: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs or {})

    # -- the rewrite
    def run(self) -> fx.Graph:
        for node in self.traced.graph.nodes:
            getattr(self, f"do_{node.op}")(node)
        return self.graph

    def do_placeholder(self, node: fx.Node) -> None:
        default = node.args[0] if node.args else inspect.Signature.empty
        new = self.graph.placeholder(str(node.target), type_expr=node.type, default_value=default)
        self.emit(node, new, SHARED)

    def do_get_attr(self, node: fx.Node) -> None:
        raise self.refuse(
            node,
            "the forward reads a parameter, buffer or constant tensor directly; only modules that pack "
            "(see supported_modules()) may hold a member's tensors",
        )

    def do_output(self, node: fx.Node) -> None:
        (result,) = node.args
        if not isinstance(result, fx.Node):
            raise self.refuse(
                node,
                f"the model returns a {type(result).__name__}; pack needs a model that returns one tensor",
            )
        self.graph.output(self.call(_stacked, (self.packed(result), self.k, node.name)))

    def relu(self, node: fx.Node, arg: fx.Node, inplace: bool) -> None:
        """A ReLU of a PACKED value, in place at run time where that is safe (see ``_relu``)."""
        fresh = arg in self.fresh and len(arg.users) == 1
        self.emit(node, self.call(_relu, (self.packed(arg), inplace, fresh)), PACKED)
        if fresh:
            self.fresh.add(node)

    def do_call_module(self, node: fx.Node) -> None:
        target = str(node.target)
        module = self.traced.get_submodule(target)
        cls = type(module)
        supported = (
            cls in _PACKED_MODULES
            or cls in _ELEMENTWISE_MODULES
            or cls in _DROPOUT_MODULES
            or cls in _POOL_MODULES
            or cls in _SOFTMAX_MODULES
            or cls is nn.Flatten
        )
        if not supported:
            raise EnsembleError(
                f"cannot pack module {target!r} of type {cls.__module__}.{cls.__qualname__}: pack supports "
                f"{', '.join(supported_modules())} (exact types)"
            )
        if len(node.args) != 1 or node.kwargs:
            raise self.refuse(node, "a module called with more than one argument cannot be packed")
        (arg,) = node.args
        kind = self.env[arg][1] if isinstance(arg, fx.Node) else META
        if kind == META:
            raise self.refuse(node, "its input is not an activation tensor")
        if cls is nn.Flatten:
            if kind == SHARED:
                new = self.call(torch.flatten, (self.env[arg][0], module.start_dim, module.end_dim))
            else:
                new = self.call(_flatten, (self.packed(arg), node.name, module.start_dim, module.end_dim))
            return self.emit(node, new, kind)
        if cls in _SOFTMAX_MODULES:
            op = _SOFTMAX_MODULES[cls]
            if kind == SHARED:
                if not (isinstance(module.dim, int) and module.dim > 0):
                    self.per_sample = False
                new = self.call(getattr(torch, op), (self.env[arg][0], module.dim))
            else:
                new = self.call(_dim_op, (self.packed(arg), self.k, node.name, op, module.dim))
            return self.emit(node, new, kind)
        if cls in _PACKED_MODULES:
            if target not in self.packed_modules:
                own = self.own_module(target)
                self.packed_modules[target] = (
                    own
                    if own is not None
                    else _PACKED_MODULES[cls]([m.get_submodule(target) for m in self.members])
                )
            self.modules[target] = self.packed_modules[target]
            producer = self.folds_into(node, arg)
            if producer is not None:  # conv -> BatchNorm: the convolution runs the BatchNorm (see _PackedConv)
                self.packed_modules[str(arg.target)].fold_batch_norm(self.packed_modules[target])
                self.folded[target] = str(arg.target)
                if arg in self.fresh:
                    self.fresh.add(node)
                return self.emit(node, producer, PACKED)
            # an input all members share meets the stacked weights once, without being repeated; not for
            # convolutions of one input channel, which run faster as grouped (depthwise-like) ones
            # over the repeated input
            conv = cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            if kind == SHARED and (
                cls is nn.Linear or (conv and module.groups == 1 and module.in_channels > 1)
            ):
                new = self.graph.call_module(target, (self.env[arg][0],), {"shared": True})
            else:
                new = self.graph.call_module(target, (self.packed(arg),))
            self.fresh.add(node)
            return self.emit(node, new, PACKED)
        # parameter-free layers: an own copy (a module may be called more than once)
        if target not in self.modules:
            if any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                raise self.refuse(node, "this layer type is expected to hold no parameters or buffers")
            if cls in _POOL_MODULES and getattr(module, "return_indices", False):
                raise self.refuse(
                    node, "pooling with return_indices=True returns a tuple and cannot be packed"
                )
            own = self.own_module(target)
            self.modules[target] = own if own is not None else copy.deepcopy(module)
        if kind == SHARED and cls not in _DROPOUT_MODULES:
            new = self.graph.call_module(target, (self.env[arg][0],))
            return self.emit(node, new, SHARED)
        if cls is nn.ReLU:
            return self.relu(node, arg, module.inplace)
        x = self.packed(arg)
        if cls in _POOL_MODULES:
            x = self.call(_check_pool_input, (x, _POOL_MODULES[cls], node.name))
        return self.emit(node, self.graph.call_module(target, (x,)), PACKED)

    def do_call_function(self, node: fx.Node) -> None:
        fn = node.target
        if fn in _RANDOM_FUNCTIONS:
            raise self.refuse(
                node, "random tensors would be drawn once for all members or in a different order"
            )
        if self.passthrough(node):
            return
        args, kwargs = node.args, node.kwargs
        if fn in _BINARY_FUNCTIONS:
            return self.binary(node, fn)
        if fn in (torch.relu, F.relu) and len(args) == 1 and not kwargs.get("inplace", False):
            return self.relu(node, args[0], False)
        if fn in _ELEMENTWISE_FUNCTIONS or fn in _DROPOUT_FUNCTIONS:
            self.first_tensor_only(node)
            return self.emit(
                node,
                self.call(fn, (self.packed(args[0]), *self.value(args[1:])), self.value(kwargs)),
                PACKED,
            )
        if fn in _POOL_FUNCTIONS:
            self.first_tensor_only(node)
            if self.value(kwargs).get("return_indices") or (len(args) > 5 and args[5] is True):
                raise self.refuse(
                    node, "pooling with return_indices=True returns a tuple and cannot be packed"
                )
            x = self.call(_check_pool_input, (self.packed(args[0]), _POOL_FUNCTIONS[fn], node.name))
            return self.emit(node, self.call(fn, (x, *self.value(args[1:])), self.value(kwargs)), PACKED)
        if fn is torch.flatten:
            self.first_tensor_only(node)
            x = self.packed(args[0])
            return self.emit(
                node,
                self.call(_flatten, (x, node.name, *self.value(args[1:])), self.value(kwargs)),
                PACKED,
            )
        if fn is torch.reshape:
            self.first_tensor_only(node)
            x = self.packed(args[0])
            shape = self.value(args[1] if len(args) > 1 else kwargs["shape"])
            return self.emit(node, self.call(_reshape, (x, self.k, node.name, shape)), PACKED)
        if fn is F.pad:
            self.first_tensor_only(node)
            x = self.packed(args[0])
            return self.emit(
                node, self.call(_pad, (x, node.name, *self.value(args[1:])), self.value(kwargs)), PACKED
            )
        if fn in _DIM_FUNCTIONS:
            return self.dim_op(node, *_DIM_FUNCTIONS[fn])
        if fn is builtins.getattr:
            return self.attribute(node)
        raise self.refuse(node, self.unsupported_hint(node))

    def do_call_method(self, node: fx.Node) -> None:
        name = str(node.target)
        if name in _RANDOM_METHODS:
            raise self.refuse(
                node, "random tensors would be drawn once for all members or in a different order"
            )
        if self.passthrough(node):
            return
        args, kwargs = node.args, node.kwargs
        self_kind = self.env[args[0]][1] if isinstance(args[0], fx.Node) else META
        if self_kind == META:
            raise self.refuse(node, "a method of a constant tensor applied to an activation cannot be packed")
        if name in _BINARY_METHODS:
            return self.binary(node, name)
        if name == "relu" and len(args) == 1 and not kwargs:
            return self.relu(node, args[0], False)
        if name in _ELEMENTWISE_METHODS:
            self.first_tensor_only(node)
            new = self.graph.call_method(
                name, (self.packed(args[0]), *self.value(args[1:])), self.value(kwargs)
            )
            return self.emit(node, new, PACKED)
        if name == "flatten":
            self.first_tensor_only(node)
            x = self.packed(args[0])
            return self.emit(
                node,
                self.call(_flatten, (x, node.name, *self.value(args[1:])), self.value(kwargs)),
                PACKED,
            )
        if name in ("view", "reshape"):
            self.first_tensor_only(node)
            if kwargs:
                raise self.refuse(node, "give the shape positionally")
            x = self.packed(args[0])
            return self.emit(node, self.call(_reshape, (x, self.k, node.name, *self.value(args[1:]))), PACKED)
        if name == "size":
            x = self.packed(args[0])
            return self.emit(
                node,
                self.call(_member_size, (x, self.k, *self.value(args[1:])), self.value(kwargs)),
                META,
            )
        if name == "numel":
            return self.emit(node, self.call(_member_numel, (self.packed(args[0]), self.k)), META)
        if name == "dim":
            return self.emit(node, self.graph.call_method("dim", (self.packed(args[0]),)), META)
        if name in _DIM_METHODS:
            return self.dim_op(node, *_DIM_METHODS[name])
        raise self.refuse(node, self.unsupported_hint(node))

    def binary(self, node: fx.Node, op: Any) -> None:
        if not isinstance(op, str):
            op = f"{op.__module__}.{op.__name__}"
            assert op in _BINARY_BY_NAME
        if len(node.args) != 2:
            raise self.refuse(node, "expected two operands")
        a, b = node.args
        operands, flags = [], []
        for arg in (a, b):
            kind = self.env[arg][1] if isinstance(arg, fx.Node) else META
            if kind == META:
                if not isinstance(arg, (fx.Node, int, float, bool)):
                    raise self.refuse(node, f"an operand of type {type(arg).__name__} cannot be packed")
                operands.append(self.value(arg))
                flags.append(False)
            else:
                operands.append(self.packed(arg))
                flags.append(True)
        new = self.call(_binary, (op, self.k, node.name, *operands, *flags), self.value(node.kwargs))
        self.emit(node, new, PACKED)
        if op not in _INPLACE_BINARY and not op.endswith("_"):  # out of place: a new tensor
            self.fresh.add(node)

    def dim_op(self, node: fx.Node, op: str, names: tuple[str, ...]) -> None:
        self.first_tensor_only(node)
        given = dict(zip(names, node.args[1:]))
        given.update(node.kwargs)
        unknown = set(given) - set(names)
        if unknown:
            raise self.refuse(node, f"unexpected arguments {sorted(unknown)}")
        given.pop("_stacklevel", None)
        given = {key: val for key, val in self.value(given).items() if not (key == "dtype" and val is None)}
        dims = given.get("dim")
        # a packed tensor has >= 2 dims, so -1 is never the batch dim; other negative dims may be
        if not all(isinstance(d, int) and (d > 0 or d == -1) for d in (dims if isinstance(dims, (tuple, list)) else [dims])):
            self.per_sample = False
        x = self.packed(node.args[0])
        self.emit(node, self.call(_dim_op, (x, self.k, node.name, op), given), PACKED)

    def attribute(self, node: fx.Node) -> None:
        x, name = node.args[0], node.args[1]
        if name == "shape":
            return self.emit(node, self.call(_member_shape, (self.packed(x), self.k)), META)
        if name in _TENSOR_ATTRIBUTES:
            return self.emit(node, self.call(builtins.getattr, (self.packed(x), name)), META)
        raise self.refuse(node, f"the tensor attribute {name!r} is not known to be per member")

    def unsupported_hint(self, node: fx.Node) -> str:
        target = node.target
        if node.op == "call_function" and getattr(target, "__module__", None) in _PLAIN_MODULES:
            return "a Python operation on an activation tensor (indexing, slicing, ...) is not known to keep the members apart"
        return (
            "this operation is not known to keep each member's channel block apart (concatenation, "
            "transposes, indexing and matrix products across channels mix the members)"
        )
