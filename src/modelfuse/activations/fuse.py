"""Put learnable activation mixtures into a model, fold them back, and report what they learnt."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from modelfuse.activations._registry import (
    FUNCTION_NAMES,
    INPLACE_TARGETS,
    METHOD_NAMES,
    MODULE_NAMES,
    build_candidates,
    get_activation,
    list_activations,
    out_of_place,
)
from modelfuse.activations.mix import GRANULARITIES, WEIGHTINGS, ActivationMix, MixingWeights, entropy
from modelfuse.errors import ActivationError

DEFAULT_CANDIDATES = ("relu", "gelu", "silu", "tanh")


class ActivationWarning(UserWarning):
    """Some activation of a model was left as it was (named in the message)."""


class _Shallow(fx.Tracer):
    """Traces one module's own forward: every submodule call stays one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


@dataclass
class _Site:
    where: str  # for messages: "module 'features.relu1'" or "F.relu in 'layer1.0' (node relu)"
    original: nn.Module


def _function_original(node: fx.Node) -> tuple[nn.Module | None, bool]:
    """The module equal to a functional activation call (None when an option is not a constant),
    and whether the call writes its input in place."""
    if node.op == "call_method":
        return get_activation(METHOD_NAMES[node.target])(), node.target in INPLACE_TARGETS
    name, options = FUNCTION_NAMES[node.target]
    kwargs = dict(zip(options, node.args[1:], strict=False))
    kwargs.update({k: v for k, v in node.kwargs.items() if k != "input"})
    inplace = node.target in INPLACE_TARGETS or kwargs.pop("inplace", False) is True
    if any(isinstance(v, fx.Node) for v in kwargs.values()):
        return None, inplace
    return get_activation(name)(**kwargs), inplace


def _is_activation_node(node: fx.Node) -> bool:
    if node.op == "call_function":
        try:
            return node.target in FUNCTION_NAMES
        except TypeError:  # unhashable target
            return False
    return node.op == "call_method" and node.target in METHOD_NAMES


def _own_class(m: nn.Module) -> bool:
    """User code: not torch's own modules (they hold no functional activations we should rewrite)."""
    mod = type(m).__module__
    return not (mod == "torch" or mod.startswith("torch.")) and not isinstance(m, ActivationMix)


def _mixture_candidates(names: Sequence[str], original: nn.Module) -> list[str | nn.Module]:
    """The requested candidates with the original activation in its own slot (added first if absent)."""
    orig_name = next((n for n in list_activations() if get_activation(n) is type(original)), None)
    out: list[str | nn.Module] = [original if n == orig_name else n for n in names]
    if orig_name not in names:
        out.insert(0, original)
    return out


def fuse_activations(
    model: nn.Module,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    *,
    granularity: str = "layer",
    weights: str = "convex",
    init: str | None = "original",
) -> nn.Module:
    """A copy of ``model`` whose activations are :class:`ActivationMix` es (``model`` is not modified).

    Replaced: ``nn.Module`` activations (``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``, ``nn.Tanh``, ...;
    a module object used at several places becomes one mixture used there), and functional
    calls (``F.relu``, ``torch.relu``, ``F.gelu(x, approximate=...)``, ``x.tanh()``, ...) in the
    forward of the model's own (non-torch) modules, found by tracing each module's forward
    with torch.fx (submodules kept as calls). A module whose forward does not trace becomes a
    ``GraphModule`` only where it has functional activations; one that does not trace is kept
    as it is with an :class:`ActivationWarning` naming it and the tracing error: its
    functional activations stay. Tracing bakes Python control flow (``self.training`` tests
    included) into the rewritten module, as torch.fx always does.

    Each mixture's candidates are ``candidates`` with the activation it replaces in its own
    slot (with its options, e.g. ``LeakyReLU(0.2)``; added first when not listed). ``init``:
    ``"original"`` (all weight on the replaced activation: outputs equal the original model's
    exactly), ``None`` (uniform) or a candidate name. ``granularity="global"`` makes one
    :class:`MixingWeights` shared by every mixture (all replaced activations must then agree).
    """
    if granularity not in GRANULARITIES:
        raise ActivationError(f"granularity must be one of {', '.join(GRANULARITIES)}; found {granularity!r}")
    if weights not in WEIGHTINGS:
        raise ActivationError(f"weights must be one of {', '.join(WEIGHTINGS)}; found {weights!r}")
    names = list(candidates)
    build_candidates(names)  # unknown names -> ActivationError listing the valid ones
    if not all(isinstance(n, str) for n in names):
        raise ActivationError("fuse_activations takes candidate names (see list_activations())")
    if init not in (None, "original") and init not in names:
        raise ActivationError(
            f"init={init!r}: expected 'original', None or one of the candidates ({', '.join(names)})"
        )
    model = copy.deepcopy(model)

    # 1. nn.Module activations, by object (a module used twice is one site)
    module_sites: dict[int, _Site] = {}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            if type(child) in MODULE_NAMES:
                qual = f"{parent_name}.{child_name}" if parent_name else child_name
                module_sites.setdefault(id(child), _Site(f"module {qual!r}", child))
                owners.setdefault(id(child), []).append((parent, child_name))

    # 2. functional activations, module by module (children before their parents)
    traced: list[tuple[str, nn.Module, fx.Graph, list[tuple[fx.Node, _Site]]]] = []
    for qual, m in reversed(list(model.named_modules())):
        if not _own_class(m):
            continue
        label = repr(qual) if qual else "the model itself"
        try:
            graph = _Shallow().trace(m)
        except Exception as exc:  # any tracing failure means: leave this module's forward as it is
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            warnings.warn(
                f"fuse_activations: the forward of module {label} ({type(m).__name__}) does not trace with "
                f"torch.fx ({type(exc).__name__}: {first}); its nn.Module activations were replaced, but "
                f"functional activations in that forward (F.relu, torch.tanh, ...) were left unchanged",
                ActivationWarning,
                stacklevel=2,
            )
            continue
        found = []
        for node in graph.nodes:
            if not _is_activation_node(node):
                continue
            where = f"{node.target if isinstance(node.target, str) else node.target.__name__}() in {label} (fx node {node.name})"
            inp = node.args[0] if node.args else node.kwargs.get("input")
            original, inplace = _function_original(node)
            if original is None or not isinstance(inp, fx.Node):
                warnings.warn(
                    f"fuse_activations: {where} was left unchanged: its options are not constants",
                    ActivationWarning,
                    stacklevel=2,
                )
                continue
            if inplace and len(inp.users) > 1:
                warnings.warn(
                    f"fuse_activations: {where} was left unchanged: it writes its input in place and "
                    "that input is used elsewhere too",
                    ActivationWarning,
                    stacklevel=2,
                )
                continue
            found.append((node, _Site(where, original)))
        if found:
            traced.append((qual, m, graph, found))

    sites = list(module_sites.values()) + [s for *_, found in traced for _, s in found]
    if not sites:
        raise ActivationError(
            f"{type(model).__name__} has no activations to replace: no nn.Module activation "
            f"({', '.join(sorted(c.__name__ for c in MODULE_NAMES))}) and no traceable functional call "
            "(F.relu, torch.tanh, x.relu(), ...)"
        )

    shared: MixingWeights | None = None
    if granularity == "global":
        kinds = {repr(out_of_place(copy.deepcopy(s.original))): s.where for s in sites}
        if len(kinds) > 1 and init == "original":
            listed = "; ".join(f"{k} at {w}" for k, w in kinds.items())
            raise ActivationError(
                f"granularity='global' shares one weight vector, which cannot start at each of the model's "
                f"different activations ({listed}); use granularity='layer', or init=None / a candidate name"
            )

    shared_candidates: list[str] = []

    def make(original: nn.Module) -> ActivationMix:
        nonlocal shared
        original = out_of_place(copy.deepcopy(original))
        cands = _mixture_candidates(names, original)
        start = init
        if init == "original":
            start = next(n for n, c in zip(build_candidates(cands), cands, strict=True) if c is original)[0]
        mix = ActivationMix(
            cands, granularity=granularity, weights=weights, init=start, shared_weights=shared
        )
        if granularity == "global":
            listed = tuple(repr(c) for c in mix.candidates)
            if shared is None:
                shared, shared_candidates[:] = mix.mix, listed
            elif listed != tuple(shared_candidates):
                raise ActivationError(
                    "granularity='global' shares one weight vector, so every mixture needs the same candidates; "
                    f"adding the replaced activations gives ({', '.join(shared_candidates)}) in one place and "
                    f"({', '.join(listed)}) in another. List every activation the model uses in candidates, "
                    "or use granularity='layer'"
                )
        return mix

    for key, site in module_sites.items():
        mix = make(site.original)
        for parent, attr in owners[key]:
            setattr(parent, attr, mix)

    for qual, m, graph, found in traced:
        for i, (node, site) in enumerate(found):
            attr = f"activation_mix_{node.name}"
            while hasattr(m, attr):
                attr += f"_{i}"
            m.add_module(attr, make(site.original))
            inp = node.args[0] if node.args else node.kwargs["input"]
            with graph.inserting_after(node):
                new = graph.call_module(attr, (inp,))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        graph.lint()
        gm = fx.GraphModule(m, graph, class_name=type(m).__name__)
        gm.train(m.training)
        if not qual:
            model = gm
        else:
            parent_name, _, attr = qual.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, gm)
    return model


def _one_hot_index(w: torch.Tensor, tol: float) -> int | None:
    """The candidate k with |w - e_k| <= tol everywhere (every channel), else None."""
    w = w.detach()
    k = int(w.reshape(w.shape[0], -1).mean(1).argmax())
    target = torch.zeros_like(w)
    target[k] = 1.0
    return k if float((w - target).abs().max()) <= tol else None


@torch.no_grad()
def collapse(model: nn.Module, tol: float = 1e-3) -> nn.Module:
    """A copy of ``model`` where each mixture within ``tol`` of one-hot (max |w - e_k| <= tol,
    every channel on the same k) is replaced by its candidate k, a plain activation module.

    The output of a collapsed mixture then differs from the mixture's by at most
    ``tol * sum_i |f_i(x)|`` (element-wise). Mixtures further from one-hot stay.
    """
    if not tol >= 0:
        raise ActivationError(f"tol must be a non-negative number; found {tol!r}")
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ActivationMix) and child.mix.materialized:
                k = _one_hot_index(child.mixing_weights(), tol)
                if k is not None:
                    setattr(parent, name, copy.deepcopy(child.candidates[k]))
    if isinstance(model, ActivationMix):
        k = _one_hot_index(model.mixing_weights(), tol)
        if k is not None:
            return copy.deepcopy(model.candidates[k])
    return model


@dataclass(frozen=True)
class MixtureSummary:
    """One mixture of a model: its weights (mean over channels for channel mixtures) and what leads."""

    name: str
    granularity: str
    weighting: str
    candidates: tuple[str, ...]
    weights: tuple[float, ...]
    top: str
    top_weight: float
    entropy: float  # nats; mean over channels for channel mixtures


@torch.no_grad()
def summarize(model: nn.Module) -> list[MixtureSummary]:
    """A :class:`MixtureSummary` per :class:`ActivationMix` of ``model`` (by qualified name)."""
    rows = []
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, ActivationMix) or not m.mix.materialized:
            continue
        w = m.mixing_weights().detach().float().cpu()
        cols = w.reshape(w.shape[0], -1)
        mean = cols.mean(1)
        ent = sum(entropy(cols[:, c]) for c in range(cols.shape[1])) / cols.shape[1]
        k = int(mean.argmax())
        rows.append(
            MixtureSummary(
                name or "(model)",
                m.granularity,
                m.weighting,
                m.names,
                tuple(mean.tolist()),
                m.names[k],
                float(mean[k]),
                ent,
            )
        )
    return rows


def report(model: nn.Module, *, console: Any = None) -> list[MixtureSummary]:
    """Print a rich table of the model's learned mixtures (to ``console``, default a new one); return the rows."""
    from rich.console import Console
    from rich.table import Table

    rows = summarize(model)
    table = Table(title="activation mixtures")
    for col in ("layer", "granularity", "weights", "top", "top weight", "entropy (nats)", "all weights"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.name,
            r.granularity,
            r.weighting,
            r.top,
            f"{r.top_weight:.3f}",
            f"{r.entropy:.3f}",
            " ".join(f"{n}={v:.2f}" for n, v in zip(r.candidates, r.weights, strict=True)),
        )
    (console or Console()).print(table)
    return rows
