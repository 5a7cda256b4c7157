"""Taps: named places inside a backbone whose output a feature fusion reads.

A tap is any named module (``"layer4"``, ``"features.conv3"``) or, where the model traces
with torch.fx, any graph node as torchvision names them (``"layer1.0.add"``, ``"flatten"``).
:func:`taps` lists them with their output shapes for one input size; :class:`TapExtractor`
computes one tap's output, with ``torchvision.models.feature_extraction.create_feature_extractor``
where the model traces (the graph is cut after the tap) and with a forward hook where it does
not (the forward pass is stopped once the tap has run). torchvision is optional: without it,
every tap is a module tap read by a hook.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import nn

from modelfuse._optional import require
from modelfuse.errors import ConfigError, FeatureError

METHODS = ("auto", "fx", "hooks")


@dataclass(frozen=True)
class TapInfo:
    """One tap: its ``name``, output ``shape`` without the batch dimension, ``kind`` (``"module"`` or
    ``"node"``, an FX node that is no module) and how many times it ran in one forward pass (``calls``;
    a module reused within a forward pass, such as one ReLU applied twice, is read at its first call)."""

    name: str
    shape: tuple[int, ...]
    kind: str
    calls: int = 1


class Taps(Sequence[TapInfo]):
    """The taps of a model in the order they run, indexable by position or by name; ``str()`` is a table."""

    def __init__(self, infos: Sequence[TapInfo], *, method: str, input_shape: Sequence[int]) -> None:
        self._infos = tuple(infos)
        self._by_name = {t.name: t for t in self._infos}
        self.method = method
        self.input_shape = tuple(int(s) for s in input_shape)

    def names(self) -> list[str]:
        return [t.name for t in self._infos]

    @overload
    def __getitem__(self, key: int | str) -> TapInfo: ...
    @overload
    def __getitem__(self, key: slice) -> tuple[TapInfo, ...]: ...
    def __getitem__(self, key: int | str | slice) -> TapInfo | tuple[TapInfo, ...]:
        if isinstance(key, str):
            if key not in self._by_name:
                raise FeatureError(unknown_tap_message(key, self.names(), "this model"))
            return self._by_name[key]
        return self._infos[key]

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[TapInfo]:
        return iter(self._infos)

    def __contains__(self, item: object) -> bool:
        return item in self._by_name if isinstance(item, str) else item in self._infos

    def __str__(self) -> str:
        width = max([len(t.name) for t in self._infos] + [4])
        lines = [
            f"taps for input {self.input_shape} (read by {self.method}):",
            f"{'name':<{width}}  kind    shape",
        ]
        for t in self._infos:
            again = f"  (runs {t.calls}x; read at its first call)" if t.calls > 1 else ""
            lines.append(f"{t.name:<{width}}  {t.kind:<6}  {t.shape}{again}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Taps({len(self)} taps, input_shape={self.input_shape}, method={self.method!r})"


#: a tap error lists every name when none is close and there are at most this many
_LIST_ALL = 20


def unknown_tap_message(tap: str, available: Sequence[str], owner: str) -> str:
    """'no tap X; closest: ...' with difflib's closest names (all names when none is close and
    there are at most ``_LIST_ALL``) and how to list all of them with their shapes."""
    names = list(available)
    close = difflib.get_close_matches(tap, names, n=5, cutoff=0.5)
    if close:
        hint = f" Closest available: {', '.join(map(repr, close))}."
    elif 0 < len(names) <= _LIST_ALL:
        hint = f" Available: {', '.join(map(repr, names))}."
    else:
        hint = ""
    return (
        f"{owner} has no tap {tap!r}.{hint} modelfuse.features.taps(model, input_shape) lists all "
        f"{len(available)} taps with their output shapes."
    )


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit (tracing and probing switch them)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def first_tensor(value: Any) -> torch.Tensor | None:
    """A module's output as one tensor: itself, or the first element of a tuple/list (transformer layers)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown tap method {method!r}; expected one of {', '.join(METHODS)}")


def _inputs_of(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def fx_node_names(model: nn.Module) -> list[str]:
    """FX node names (torchvision's naming) present in both train and eval graphs, inputs left out.

    Raises ImportError without torchvision and whatever tracing raises when the model does not trace.
    """
    fe = require("torchvision.models.feature_extraction", "tapping a model through torch.fx")
    with preserved_modes(model), _quiet():
        train_names, eval_names = fe.get_graph_node_names(model)
    inputs, in_train = _inputs_of(model), set(train_names)
    return [n for n in eval_names if n in in_train and n not in inputs]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _try_fx_names(model: nn.Module, method: str) -> tuple[list[str] | None, str]:
    """(FX node names or None, why not) for ``method`` ``"auto"``/``"fx"``/``"hooks"``."""
    if method == "hooks":
        return None, "method='hooks' was asked for"
    try:
        return fx_node_names(model), ""
    except ImportError as exc:
        if method == "fx":
            raise
        return None, f"torchvision is not installed ({exc})"
    except Exception as exc:  # tracing fails in many ways: TraceError, TypeError, RuntimeError, ...
        if method == "fx":
            raise FeatureError(
                f"{type(model).__name__} does not trace with torch.fx ({type(exc).__name__}: {exc}); "
                "use method='hooks' (module taps only) or method='auto'"
            ) from exc
        return None, f"{type(model).__name__} does not trace with torch.fx ({type(exc).__name__}: {exc})"


def _attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


class _TapReached(BaseException):
    """Raised by the tap's forward hook to stop the forward pass (BaseException: ``except Exception`` in
    the model's own code does not swallow it)."""


def run_to_module(model: nn.Module, module: nn.Module, name: str, *args: Any) -> torch.Tensor:
    """The output of ``module`` (inside ``model``) at its first call in ``model(*args)``; later layers do not run."""
    box: list[Any] = []

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        box.append(out)
        raise _TapReached

    handle = module.register_forward_hook(hook)
    try:
        model(*args)
    except _TapReached:
        pass
    finally:
        handle.remove()
    if not box:
        raise FeatureError(
            f"tap {name!r} of {type(model).__name__} did not run in the forward pass; pick a module that "
            "the forward pass calls (modelfuse.features.taps lists them)"
        )
    out = first_tensor(box[0])
    if out is None:
        raise FeatureError(
            f"tap {name!r} of {type(model).__name__} returns a {type(box[0]).__name__}, not a tensor; "
            "tap a module that returns a tensor (or a tuple starting with one)"
        )
    return out


class TapExtractor:
    """Computes the output of one tap of ``model``: ``extractor(x)``.

    ``method``: ``"auto"`` (torch.fx via torchvision's ``create_feature_extractor`` where the model
    traces, else a forward hook), ``"fx"`` or ``"hooks"`` (module taps only). ``self.method`` says
    which one is used, ``self.kind`` whether the tap is a ``"module"`` or an FX ``"node"``.
    Raises :class:`FeatureError` naming the closest taps when ``tap`` does not exist.

    It is no ``nn.Module``: the model is owned by whoever holds it (a ``FeatureFusion``), and the
    traced graph module shares the model's layers. Call :meth:`refresh` after moving or converting
    the model (``FeatureFusion`` does): the graph is re-traced on the next call if it must be.
    """

    def __init__(self, model: nn.Module, tap: str, *, method: str = "auto", owner: str | None = None) -> None:
        _check_method(method)
        if not isinstance(tap, str) or not tap:
            raise ConfigError(f"a tap is a module or FX node name (a non-empty string), found {tap!r}")
        self.model = model
        self.tap = tap
        owner = owner or type(model).__name__
        modules = dict(model.named_modules())
        modules.pop("", None)
        nodes, why_not = _try_fx_names(model, method)
        if tap in modules:
            self.kind = "module"
        elif nodes is not None and tap in nodes:
            self.kind = "node"
        else:
            available = list(modules) + [n for n in nodes or () if n not in modules]
            message = unknown_tap_message(tap, available, owner)
            if nodes is None:
                message += f" Only module taps are available: {why_not}."
            raise FeatureError(message)
        if (
            nodes is not None
            and self.kind == "module"
            and not any(n == tap or n.startswith(tap + ".") for n in nodes)
        ):
            if method == "fx":
                raise FeatureError(
                    f"{owner}: module {tap!r} has no operation of its own in the traced graph (it is not "
                    "called, or returns its input); use method='hooks' or 'auto'"
                )
            nodes, why_not = None, f"module {tap!r} has no operation of its own in the traced graph"
        self.method = "fx" if nodes is not None else "hooks"
        self.why_not_fx = why_not
        self._module = modules.get(tap)
        self._fx: nn.Module | None = None
        self._one_graph = True
        if self.method == "fx":
            self._fx = self._trace()

    def _trace(self) -> nn.Module:
        fe = require("torchvision.models.feature_extraction", "tapping a model through torch.fx")
        with preserved_modes(self.model), _quiet():
            fx = fe.create_feature_extractor(self.model, return_nodes={self.tap: "tap"})
        # one graph for both modes (the usual case): never switch, since switching recompiles
        self._one_graph = fx.train_graph.python_code("self").src == fx.eval_graph.python_code("self").src
        return fx

    def invalidate(self) -> None:
        """Forget the traced graph (re-traced on the next call)."""
        self._fx = None

    def refresh(self) -> None:
        """After the model was moved or converted: re-trace (on the next call) only if the traced graph
        holds a tensor the model no longer has (a buffer or constant it copied as a graph attribute).
        Layers and parameters are shared with the model, so they follow it."""
        fx = self._fx
        if fx is None:
            return
        for node in (*fx.train_graph.nodes, *fx.eval_graph.nodes):  # type: ignore[attr-defined]
            if node.op == "get_attr" and _attr(fx, node.target) is not _attr(self.model, node.target):
                self._fx = None
                return

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.method == "hooks":
            assert self._module is not None
            return run_to_module(self.model, self._module, self.tap, x)
        if self._fx is None:
            self._fx = self._trace()
        fx = self._fx
        want = self.model.training
        if fx.training != want and not self._one_graph:
            # switch the graph only: fx.train() would reset the modes of the layers it shares with the model
            fx.graph = fx.train_graph if want else fx.eval_graph  # type: ignore[attr-defined]
            fx.training = want
        out = first_tensor(fx(x)["tap"])
        if out is None:
            raise FeatureError(f"tap {self.tap!r} of {type(self.model).__name__} does not give a tensor")
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fx"] = None  # re-traced after copying or unpickling, over the copied model
        return state

    def __repr__(self) -> str:
        return f"TapExtractor({type(self.model).__name__}, {self.tap!r}, kind={self.kind!r}, method={self.method!r})"


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def probe_input(model: nn.Module, input_shape: Sequence[int], batch: int = 2) -> torch.Tensor:
    """A batch of zeros of ``input_shape`` on the model's device, for shape probing."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"input_shape must be positive sizes without the batch dimension, found {shape}")
    return torch.zeros(batch, *shape, device=_device_of(model))


@torch.no_grad()
def taps(model: nn.Module, input_shape: Sequence[int], *, method: str = "auto") -> Taps:
    """Every tap of ``model`` with its output shape for inputs of ``input_shape`` (no batch dimension).

    Modules are listed in the order their forward passes finish (a block after its layers), FX nodes
    that are no module (``"layer1.0.add"``) after the module that precedes them in the graph. The model
    runs once in eval mode on zeros; its train/eval flags are restored. ``method="hooks"`` (or a model
    that does not trace, or no torchvision) lists module taps only.
    """
    _check_method(method)
    x = probe_input(model, input_shape)
    nodes, _ = _try_fx_names(model, method)
    names = {m: n for n, m in model.named_modules() if n}
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        name = names.get(mod)
        if name is None:
            return
        calls[name] = calls.get(name, 0) + 1
        t = first_tensor(out)
        if t is not None and name not in shapes:
            shapes[name] = tuple(t.shape[1:])
            order.append(name)

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with preserved_modes(model):
            model.eval()
            model(x)
    finally:
        for h in handles:
            h.remove()
    infos = {n: TapInfo(n, shapes[n], "module", calls[n]) for n in order}
    if nodes is None:
        return Taps(list(infos.values()), method="hooks", input_shape=input_shape)
    extra = [n for n in nodes if n not in names.values()]
    after: dict[str | None, list[str]] = {}
    anchor: str | None = None
    for n in nodes:
        if n in infos:
            anchor = n
        elif n in extra:
            after.setdefault(anchor, []).append(n)
    node_shapes: dict[str, tuple[int, ...]] = {}
    if extra:
        fe = require("torchvision.models.feature_extraction", "tapping a model through torch.fx")
        with preserved_modes(model), _quiet():
            extractor = fe.create_feature_extractor(model, return_nodes={n: n for n in extra})
            extractor.eval()
            outs = extractor(x)
        for n in extra:
            t = first_tensor(outs.get(n))
            if t is not None:
                node_shapes[n] = tuple(t.shape[1:])
    listed: list[TapInfo] = []

    def emit_after(key: str | None) -> None:
        listed.extend(TapInfo(n, node_shapes[n], "node") for n in after.get(key, ()) if n in node_shapes)

    emit_after(None)
    for n, info in infos.items():
        listed.append(info)
        emit_after(n)
    return Taps(listed, method="fx", input_shape=input_shape)
