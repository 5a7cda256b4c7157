"""Cut a network in two at a node of its FX graph: ``front`` then ``back`` compose to the model.

A cut point is a node where one tensor carries the whole state of the computation: no
other value computed before it (the input, a skip connection's source) is still needed
after it. Cutting there gives the two halves that model stitching (Lenc & Vedaldi 2015,
"Understanding image representations by measuring their equivariance and equivalence";
Bansal, Nakkiran & Barak 2021, "Revisiting model stitching to compare neural
representations") joins across two networks. Cuts follow torch.fx's symbolic trace, as
torchvision's ``create_feature_extractor`` does.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import fx, nn

from modelfuse.errors import StructureError


@dataclass(frozen=True)
class CutPoint:
    """A node where the model can be cut.

    ``name`` is the FX node name (what :func:`cut` takes), ``op``/``target`` what the node
    computes (a module path for ``call_module``), ``index`` its position in the graph,
    ``ends`` the (non-leaf) modules whose output it is, and ``shape`` the tensor's shape
    per example (without the batch dimension) for the example input, or None without one.
    """

    name: str
    op: str
    target: str
    index: int
    ends: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None

    def __str__(self) -> str:
        shape = f" {tuple(self.shape)}" if self.shape is not None else ""
        ends = f" (ends {', '.join(self.ends)})" if self.ends else ""
        return f"{self.name}{shape}{ends}"


class Cut(NamedTuple):
    """The two halves of a cut model: ``back(front(x))`` computes ``model(x)``.

    Both are ``fx.GraphModule`` s that share their submodules (and so their parameters)
    with the model that was cut; deep-copy the model first for independent halves.
    """

    front: fx.GraphModule
    back: fx.GraphModule


class _Tracer(fx.Tracer):
    """torch.fx's tracer, treating the modules at ``leaves`` (qualified names) as leaves too."""

    def __init__(self, leaves: Sequence[str] = ()) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, leaves: Sequence[str] = ()) -> fx.GraphModule:
    """``model`` as an ``fx.GraphModule`` (a GraphModule is returned as it is); StructureError if untraceable."""
    if isinstance(model, fx.GraphModule) and not leaves:
        return model
    if not isinstance(model, nn.Module):
        raise StructureError(f"expected a torch.nn.Module to cut, found a {type(model).__name__}")
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except (
        Exception
    ) as exc:  # torch.fx raises TraceError, TypeError, RuntimeError, ... on dynamic control flow
        raise StructureError(
            f"{type(model).__name__} is not traceable by torch.fx ({type(exc).__name__}: {exc}); cutting "
            "needs a model whose forward has no data-dependent control flow: make it static, or trace "
            "it yourself (e.g. transformers.utils.fx.symbolic_trace) and pass the GraphModule"
        ) from None
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _target_name(node: fx.Node) -> str:
    if isinstance(node.target, str):
        return node.target
    return getattr(node.target, "__name__", str(node.target))


def _constants(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes that depend on no input (attributes, functions of attributes): the back half recomputes them."""
    found: set[fx.Node] = set()
    for n in nodes:
        if n.op == "get_attr" or (
            n.op in ("call_function", "call_method") and all(a in found for a in n.all_input_nodes)
        ):
            found.add(n)
    return found


def _crossing(nodes: list[fx.Node], constants: set[fx.Node]) -> list[list[fx.Node]]:
    """For each position i, the values computed at or before i that are still used after i."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=-1) for n in nodes}
    return [[n for n in nodes[: i + 1] if n not in constants and last_use[n] > i] for i in range(len(nodes))]


def _valid(nodes: list[fx.Node], crossing: list[list[fx.Node]], constants: set[fx.Node]) -> list[bool]:
    return [
        n.op not in ("placeholder", "output") and n not in constants and crossing[i] == [n]
        for i, n in enumerate(nodes)
    ]


def _ends(nodes: list[fx.Node]) -> dict[fx.Node, tuple[str, ...]]:
    """Per node, the non-leaf modules (called once) whose last node it is, from FX's ``nn_module_stack``."""
    last: dict[str, fx.Node] = {}
    calls: dict[str, set[str]] = {}
    for n in nodes:
        for key, value in (n.meta.get("nn_module_stack") or {}).items():
            path = value[0] if isinstance(value, tuple) else str(value)
            if not path or (n.op == "call_module" and path == n.target):
                continue
            last[path] = n
            calls.setdefault(path, set()).add(key)
    out: dict[fx.Node, tuple[str, ...]] = {}
    for path, n in last.items():
        if len(calls[path]) == 1:
            out[n] = (*out.get(n, ()), path)
    return out


@torch.no_grad()
def _shapes(gm: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, tuple[int, ...] | None]:
    """Per node, the per-example shape of its tensor on ``example`` (eval mode, no grad); None if not a tensor."""
    shapes: dict[fx.Node, tuple[int, ...] | None] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            out = super().run_node(n)
            shapes[n] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) and out.dim() > 0 else None
            return out

    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        Recorder(gm).run(example)
    except Exception as exc:
        raise StructureError(
            f"the model fails on the example input of shape {tuple(example.shape)} ({type(exc).__name__}: "
            f"{exc}); give an input of the shape the model takes, with a batch dimension"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
    return shapes


def _example(example: torch.Tensor | Sequence[int] | None) -> torch.Tensor | None:
    if example is None or isinstance(example, torch.Tensor):
        return example
    shape = tuple(int(d) for d in example)
    return torch.zeros(2, *shape)  # a batch of two, so that BatchNorm-like layers see a batch


def cut_points(model: nn.Module, example: torch.Tensor | Sequence[int] | None = None) -> list[CutPoint]:
    """Every node of ``model``'s FX graph where a single tensor carries the whole state, in graph order.

    ``example`` (a batch, or one example's shape such as ``(3, 32, 32)``) fills in each
    point's ``shape``; with it, points whose value is not a tensor are left out.
    """
    gm = trace(model)
    nodes = list(gm.graph.nodes)
    constants = _constants(nodes)
    valid = _valid(nodes, _crossing(nodes, constants), constants)
    ends = _ends(nodes)
    x = _example(example)
    shapes = _shapes(gm, x) if x is not None else {}
    points = []
    for i, n in enumerate(nodes):
        if not valid[i] or (x is not None and shapes.get(n) is None):
            continue
        points.append(CutPoint(n.name, n.op, _target_name(n), i, ends.get(n, ()), shapes.get(n)))
    return points


def _resolve(model: nn.Module, at: str) -> tuple[fx.GraphModule, fx.Node]:
    """The traced graph and the node ``at`` names: a node name, a called module's path, or any submodule's path."""
    gm = trace(model)
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    if at in by_name:
        return gm, by_name[at]
    calls = [n for n in nodes if n.op == "call_module" and n.target == at]
    if len(calls) > 1:
        raise StructureError(
            f"module {at!r} is called {len(calls)} times (nodes {', '.join(n.name for n in calls)}); "
            "cut at one of these node names instead"
        )
    if calls:
        return gm, calls[0]
    try:
        submodule: nn.Module | None = model.get_submodule(at)
    except AttributeError:
        submodule = None
    if submodule is not None and isinstance(model, fx.GraphModule):
        raise StructureError(
            f"{at!r} is a module inside the traced graph, not one node of it; cut the original model "
            "at this module path, or the GraphModule at a node name (see cut_points(model))"
        )
    if submodule is not None:
        gm = trace(model, leaves=[at])
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == at]
        if len(calls) == 1:
            return gm, calls[0]
        raise StructureError(
            f"module {at!r} is called {len(calls)} times in the forward pass, so its output is not one "
            f"node; cut at a node name instead (see cut_points(model))"
        )
    modules = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(at, list(by_name) + modules, n=5, cutoff=0.4)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise StructureError(
        f"{type(model).__name__} has no node or module named {at!r}.{hint} Cut at a node name or module "
        "path; cut_points(model) lists the valid cut points"
    )


def cut(model: nn.Module, at: str) -> Cut:
    """Split ``model`` at ``at`` into ``front`` and ``back`` with ``back(front(x)) == model(x)`` exactly.

    ``at`` is a node name of the FX graph (``cut_points(model)`` lists them) or the path of
    a module called once (``"features.conv2"``, ``"layer2.1"``: the cut is after that
    module). The halves share the model's submodules. A point where more than one tensor
    crosses (inside a residual block) raises StructureError naming the nearest valid points.
    """
    if not isinstance(at, str) or not at:
        raise StructureError(f"a cut point is a node name or module path (a non-empty string); found {at!r}")
    gm, node = _resolve(model, at)
    nodes = list(gm.graph.nodes)
    pos = nodes.index(node)
    constants = _constants(nodes)
    crossing = _crossing(nodes, constants)
    valid = _valid(nodes, crossing, constants)
    if not valid[pos]:
        raise StructureError(_invalid_message(model, at, node, pos, nodes, crossing[pos], valid))
    return Cut(_front(gm, nodes, pos), _back(gm, nodes, pos))


def _invalid_message(
    model: nn.Module,
    at: str,
    node: fx.Node,
    pos: int,
    nodes: list[fx.Node],
    crossing: list[fx.Node],
    valid: list[bool],
) -> str:
    what = f"{at!r}" if at == node.name else f"{at!r} (node {node.name})"
    if node.op in ("placeholder", "output"):
        reason = f"it is the model's {'input' if node.op == 'placeholder' else 'output'}"
    elif not node.users:
        reason = "its value is not used by the rest of the model"
    elif len(crossing) > 1:
        others = [n.name for n in crossing if n is not node]
        reason = (
            f"{len(crossing)} tensors cross the cut there ({node.name} and {', '.join(others)}, e.g. a "
            "skip connection's source), so no single tensor carries the state"
        )
    else:
        reason = "no single tensor carries the state there"
    before = next((nodes[i] for i in range(pos - 1, -1, -1) if valid[i]), None)
    after = next((nodes[i] for i in range(pos + 1, len(nodes)) if valid[i]), None)
    nearest = [f"{n.name} (before)" for n in [before] if n] + [f"{n.name} (after)" for n in [after] if n]
    near = (
        f" Nearest valid cut points: {', '.join(nearest)}."
        if nearest
        else " The model has no valid cut point."
    )
    return (
        f"cannot cut {type(model).__name__} at {what}: {reason}.{near} "
        "cut_points(model) lists every valid cut point"
    )


def _front(gm: fx.GraphModule, nodes: list[fx.Node], pos: int) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[: pos + 1]:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[nodes[pos]])
    for n in list(graph.nodes):  # attributes only the back half reads
        if n.op == "get_attr" and not n.users:
            graph.erase_node(n)
    return fx.GraphModule(gm, graph, f"{gm.__class__.__name__}Front")


def _back(gm: fx.GraphModule, nodes: list[fx.Node], pos: int) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {nodes[pos]: graph.placeholder(nodes[pos].name)}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a constant computed before the cut: recompute it here
            env[a] = graph.node_copy(a, arg)
        return env[a]

    for n in nodes[pos + 1 :]:
        env[n] = graph.node_copy(n, arg)
    return fx.GraphModule(gm, graph, f"{gm.__class__.__name__}Back")
