"""``FeatureFusion``: several backbones, one tap each, aligned, fused by one operator, one head."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelfuse.errors import ConfigError, FeatureError
from modelfuse.features.align import (
    LAYOUTS,
    LEVELS,
    SPATIAL,
    TOKEN_POOLS,
    Alignment,
    Projection,
    global_pool,
    plan_alignment,
    resolve_layout,
)
from modelfuse.features.fuse import build_fusion, get_feature_fusion, list_feature_fusions
from modelfuse.features.taps import TapExtractor, preserved_modes, probe_input, unknown_tap_message
from modelfuse.registry import check_options

POLICIES = ("frozen", "finetune", "partial")


@dataclass(eq=False)
class Branch:
    """One backbone and where to tap it.

    - ``tap``: a module name or FX node name (:func:`modelfuse.features.taps` lists them).
    - ``policy``: ``"frozen"`` (no gradients, always in eval mode, so BatchNorm statistics and
      dropout stay as trained), ``"finetune"`` (every parameter trains, at ``lr`` if given, else the
      base rate), or ``"partial"`` (the modules from ``unfreeze_from`` on, in ``named_modules()``
      order, train at ``lr``; the ones before stay frozen and in eval mode).
    - ``name``: the key in ``FeatureFusion.branches`` and in its state dict (default: the model's
      class name in lower case, ``_1``, ``_2`` appended to repeats).
    - ``layout``: ``"auto"``, ``"channels_first"`` (B, C, *spatial), ``"channels_last"`` (B, *spatial, C)
      or ``"tokens"`` (B, N, C); ``auto`` reads 2-D outputs (B, N, C) as tokens unless the model has
      1-D convolutions. ``prefix_tokens``: class/register tokens before the patch tokens (default:
      0 if N is a square, 1 if N - 1 is). ``token_pool``: ``"mean"`` or ``"first"`` (the class token),
      how tokens become a vector when fusing vectors.
    - ``method``: ``"auto"`` (torch.fx where the model traces, else forward hooks), ``"fx"``, ``"hooks"``.
    """

    model: nn.Module
    tap: str
    policy: str = "frozen"
    lr: float | None = None
    unfreeze_from: str | None = None
    name: str | None = None
    layout: str = "auto"
    prefix_tokens: int | None = None
    token_pool: str = "mean"
    method: str = "auto"

    def __post_init__(self) -> None:
        label = f"branch {self.name!r}" if self.name else f"branch tapping {self.tap!r}"
        if not isinstance(self.model, nn.Module):
            raise ConfigError(f"{label}: model is a {type(self.model).__name__}, not a torch.nn.Module")
        if self.policy not in POLICIES:
            raise ConfigError(
                f"{label}: unknown policy {self.policy!r}; expected one of {', '.join(POLICIES)}"
            )
        if self.policy == "frozen" and self.lr is not None:
            raise ConfigError(
                f"{label}: a frozen branch does not train; lr applies to 'finetune' and 'partial'"
            )
        if self.lr is not None and not (float(self.lr) > 0):
            raise ConfigError(f"{label}: lr must be a positive number, found {self.lr!r}")
        if self.policy == "partial" and not self.unfreeze_from:
            raise ConfigError(f"{label}: policy='partial' needs unfreeze_from= (the first module to train)")
        if self.policy != "partial" and self.unfreeze_from is not None:
            raise ConfigError(f"{label}: unfreeze_from applies to policy='partial', not {self.policy!r}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "." in self.name):
            raise ConfigError(f"branch name must be a non-empty string without '.', found {self.name!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"{label}: unknown layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}"
            )
        if self.token_pool not in TOKEN_POOLS:
            raise ConfigError(
                f"{label}: unknown token_pool {self.token_pool!r}; expected one of {', '.join(TOKEN_POOLS)}"
            )
        if self.prefix_tokens is not None and int(self.prefix_tokens) < 0:
            raise ConfigError(f"{label}: prefix_tokens must be >= 0, found {self.prefix_tokens}")


def _branch_names(branches: Sequence[Branch]) -> list[str]:
    names: list[str] = []
    for b in branches:
        base = b.name or type(b.model).__name__.lower()
        name, i = base, 0
        while name in names:
            if b.name is not None:
                raise ConfigError(f"two branches are named {b.name!r}; branch names must be unique")
            i += 1
            name = f"{base}_{i}"
        names.append(name)
    return names


class PoolMLPHead(nn.Module):
    """The default head: global average pooling (when the fused features are maps), then an MLP:
    per width in ``hidden`` ``(Dropout) -> Linear -> ReLU``, then ``(Dropout) -> Linear`` to the classes.
    ``norm=True`` puts a BatchNorm over the pooled features first (Ioffe & Szegedy 2015), so that
    branches whose features differ in scale enter the MLP standardised."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        norm: bool = False,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = int(in_channels)
        if norm:
            layers["norm"] = nn.BatchNorm1d(width)
        for i, h in enumerate(hidden, start=1):
            if dropout:
                layers[f"dropout{i}"] = nn.Dropout(dropout)
            layers[f"fc{i}"] = nn.Linear(width, int(h))
            layers[f"relu{i}"] = nn.ReLU()
            width = int(h)
        if dropout:
            layers["dropout"] = nn.Dropout(dropout)
        layers["classifier"] = nn.Linear(width, int(num_classes))
        self.mlp = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(global_pool(x))


def _partial_split(model: nn.Module, start: str, label: str) -> tuple[list[str], list[str]]:
    """Module names (``""`` the root) before ``start`` and from ``start`` on, in ``named_modules()`` order."""
    names = [n for n, _ in model.named_modules()]
    if start not in names or not start:
        raise FeatureError(
            unknown_tap_message(start, [n for n in names if n], label).replace("has no tap", "has no module")
            + " (unfreeze_from names the first module to train)"
        )
    i = names.index(start)
    return names[:i], names[i:]


def _training_of(branch: Branch) -> tuple[str, str | None, float | None]:
    return branch.policy, branch.unfreeze_from, branch.lr


def _seed_cpu(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


class FeatureFusion(nn.Module):
    """Features of several backbones, aligned and fused, under one head.

    ``branches``: :class:`Branch` es (backbone, tap, training policy). Each branch's tap output is
    aligned (:mod:`modelfuse.features.align`: ``level`` ``"map"``/``"vector"``/``"auto"``,
    ``spatial`` ``"pool"``/``"interpolate"`` to ``size``), optionally projected by a 1x1 projection
    to ``channels``, fused by the operator ``fuse`` (:func:`modelfuse.features.list_feature_fusions`, with
    ``fuse_options``), and classified by ``head`` (default: :class:`PoolMLPHead` with ``hidden``,
    ``dropout``, ``head_norm`` and ``num_classes``; a user head receives the fused (B, C, *spatial) or (B, C) tensor).

    Shapes are known once the module is built for an input shape: pass ``input_shape`` (no batch
    dimension), call :meth:`build`, or let the first forward pass build it. The new layers
    (projections, operator, head) are initialised from ``seed``. State dict keys:
    ``branches.<name>.*`` (each backbone's own keys), ``align.<name>.*``, ``fuse.*``, ``head.*``.
    Frozen branches (and the frozen part of partial ones) stay in eval mode when the module trains.
    """

    def __init__(
        self,
        branches: Sequence[Branch],
        fuse: str = "concat",
        head: nn.Module | None = None,
        *,
        num_classes: int | None = None,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        head_norm: bool = False,
        level: str = "auto",
        spatial: str = "pool",
        size: int | Sequence[int] | None = None,
        channels: int | None = None,
        fuse_options: Mapping[str, Any] | None = None,
        input_shape: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        specs = list(branches)
        if not specs:
            raise ConfigError("a feature fusion needs at least one branch; the branch list is empty")
        for i, b in enumerate(specs):
            if not isinstance(b, Branch):
                raise ConfigError(
                    f"branch {i} is a {type(b).__name__}; give each as Branch(model, tap, policy=...)"
                )
        names = _branch_names(specs)
        get_feature_fusion(fuse)
        fuse_options = dict(fuse_options or {})
        check_options(f"fusion operator {fuse!r}", get_feature_fusion(fuse).build, fuse_options, fixed=("widths",))
        if level not in LEVELS:
            raise ConfigError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
        if spatial not in SPATIAL:
            raise ConfigError(f"unknown spatial alignment {spatial!r}; expected one of {', '.join(SPATIAL)}")
        if channels is not None and (not isinstance(channels, int) or channels < 1):
            raise ConfigError(
                f"channels must be a positive integer (or None to keep widths), found {channels!r}"
            )
        if head is None:
            if not isinstance(num_classes, int) or num_classes < 1:
                raise ConfigError(
                    f"the default head needs num_classes= (a positive integer), found {num_classes!r}; "
                    "or pass head= (a module mapping the fused features to outputs)"
                )
        elif not isinstance(head, nn.Module):
            raise ConfigError(f"head must be a torch.nn.Module, found {type(head).__name__}")
        for i, a in enumerate(specs):
            for b, name_b in zip(specs[i + 1 :], names[i + 1 :]):
                if a.model is b.model and _training_of(a) != _training_of(b):
                    raise ConfigError(
                        f"branches {names[i]!r} and {name_b!r} tap the same model with different training "
                        "policies; give them the same policy (the model is one set of weights)"
                    )
        extractors = [
            TapExtractor(b.model, b.tap, method=b.method, owner=f"branch {n!r} ({type(b.model).__name__})")
            for b, n in zip(specs, names)
        ]
        frozen_part: dict[str, list[str]] = {}
        for b, n in zip(specs, names):
            if b.policy == "partial":
                assert b.unfreeze_from is not None
                frozen_part[n] = _partial_split(b.model, b.unfreeze_from, f"branch {n!r}")[0]
        # everything is valid: from here on, state is set
        self.branch_specs: dict[str, Branch] = dict(zip(names, specs))
        self.branches = nn.ModuleDict({n: b.model for n, b in zip(names, specs)})
        self._extractors = dict(zip(names, extractors))
        self._frozen_part = frozen_part
        self.fuse_name = fuse
        self.fuse_options = fuse_options
        self.level = level
        self.spatial = spatial
        self.size = size
        self.channels = channels
        self.num_classes = num_classes
        self.hidden = tuple(int(h) for h in hidden)
        self.dropout = float(dropout)
        self.head_norm = bool(head_norm)
        self.seed = int(seed)
        self.align = nn.ModuleDict()
        self.fuse: nn.Module | None = None
        self.head: nn.Module | None = head
        self._user_head = head is not None
        self.input_shape: tuple[int, ...] | None = None
        self.tap_shapes: dict[str, tuple[int, ...]] = {}
        self.alignments: dict[str, Alignment] = {}
        self.fused_shape: tuple[int, ...] | None = None
        if input_shape is not None:
            self.build(input_shape)
        self._apply_policies()

    # ----------------------------------------------------------------- building

    @property
    def built(self) -> bool:
        return self.input_shape is not None

    @property
    def branch_names(self) -> list[str]:
        return list(self.branches.keys())

    @torch.no_grad()
    def probe(self, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Each branch's tap output shape (no batch dimension) for inputs of ``input_shape`` (eval mode)."""
        shapes = {}
        for name, ext in self._extractors.items():
            model = self.branches[name]
            with preserved_modes(model):
                model.eval()
                shapes[name] = tuple(ext(probe_input(model, input_shape)).shape[1:])
        return shapes

    def build(self, input_shape: Sequence[int]) -> FeatureFusion:
        """Probe the taps for ``input_shape``, plan the alignment and create the projections, the fusion
        operator and the default head. Errors (nothing changed) say which shapes do not fit and what would."""
        input_shape = tuple(int(s) for s in input_shape)
        shapes = self.probe(input_shape)
        layouts = {
            n: resolve_layout(
                s,
                self.branch_specs[n].layout,
                conv1d=any(isinstance(m, nn.Conv1d) for m in self.branches[n].modules()),
            )
            for n, s in shapes.items()
        }
        listing = ", ".join(f"{n} {s}" for n, s in shapes.items())
        try:
            plan = plan_alignment(
                shapes,
                layouts,
                level=self.level,
                spatial=self.spatial,
                size=self.size,
                prefix_tokens={n: b.prefix_tokens for n, b in self.branch_specs.items()},
                token_pool={n: b.token_pool for n, b in self.branch_specs.items()},
            )
        except FeatureError as exc:
            raise FeatureError(f"{exc} (tap output shapes without the batch dimension: {listing})") from None
        widths = {n: a.channels for n, a in plan.items()}
        fused_widths = {n: (self.channels or w) for n, w in widths.items()}
        op = get_feature_fusion(self.fuse_name)
        if op.equal_widths and len(set(fused_widths.values())) > 1:
            per_branch = ", ".join(f"{n}: {w} (tap shape {shapes[n]})" for n, w in widths.items())
            any_width = ", ".join(repr(o) for o in list_feature_fusions() if not get_feature_fusion(o).equal_widths)
            raise FeatureError(
                f"{self.fuse_name!r} needs equal widths; the aligned branches have {per_branch}. Set "
                f"channels={max(widths.values())} (a 1x1 projection of every branch to one width) or use "
                f"fuse='concat' (operators that take any widths: {any_width})"
            )
        first = next(iter(self.branches.values()))
        device = next(iter(first.parameters()), torch.zeros(0)).device
        with torch.random.fork_rng(devices=[]):
            _seed_cpu(self.seed)
            align = nn.ModuleDict(
                {
                    n: Projection(w, fused_widths[n]) if fused_widths[n] != w else nn.Identity()
                    for n, w in widths.items()
                }
            )
            fuse = build_fusion(self.fuse_name, list(fused_widths.values()), self.fuse_options)
            head = self.head
            if not self._user_head:
                assert self.num_classes is not None
                head = PoolMLPHead(
                    fuse.out_channels, self.num_classes, self.hidden, self.dropout, self.head_norm
                )
        assert head is not None
        align.to(device)
        fuse.to(device)
        if not self._user_head:
            head.to(device)
        with torch.no_grad():
            prepared = [torch.zeros(2, *a.out_shape, device=device) for a in plan.values()]
            fused = fuse([align[n](p) for n, p in zip(plan, prepared)])
            with preserved_modes(head):
                head.eval()
                try:
                    head(fused)
                except Exception as exc:
                    raise FeatureError(
                        f"the head ({type(head).__name__}) does not accept the fused features of shape "
                        f"(B, *{tuple(fused.shape[1:])}): {type(exc).__name__}: {exc}"
                    ) from exc
        self.align, self.fuse, self.head = align, fuse, head
        for m in (align, fuse, head):
            m.train(self.training)
        self.tap_shapes, self.alignments = shapes, plan
        self.fused_shape = tuple(fused.shape[1:])
        self.input_shape = input_shape
        return self

    # ----------------------------------------------------------------- policies

    def _apply_policies(self) -> None:
        for name, spec in self.branch_specs.items():
            model = self.branches[name]
            if spec.policy == "frozen":
                model.requires_grad_(False)
            elif spec.policy == "finetune":
                model.requires_grad_(True)
            else:
                frozen = set(self._frozen_part[name])
                for mname, module in model.named_modules():
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(mname not in frozen)
        self._set_branch_modes(self.training)

    def _set_branch_modes(self, mode: bool) -> None:
        for name, spec in self.branch_specs.items():
            model = self.branches[name]
            if spec.policy == "frozen":
                model.eval()
            else:
                model.train(mode)
                for mname in self._frozen_part.get(name, ()):
                    model.get_submodule(mname).training = False  # this module only; later ones train

    def train(self, mode: bool = True) -> FeatureFusion:
        """Sets the mode of the fusion layers and the trainable branches; frozen parts stay in eval mode."""
        super().train(mode)
        self._set_branch_modes(mode)
        return self

    def trainable_modules(self, name: str) -> list[str]:
        """Names of branch ``name``'s modules that train (all for finetune, none for frozen)."""
        spec, model = self.branch_specs[name], self.branches[name]
        if spec.policy == "frozen":
            return []
        frozen = set(self._frozen_part.get(name, ()))
        return [n for n, _ in model.named_modules() if n not in frozen]

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups for ``train(param_groups=...)``: one per trainable branch (``"name":
        "branches.<name>"``, its own ``lr`` or ``base_lr``) and one for the projections, operator and
        head (``"name": "head"``, ``base_lr``). Frozen parameters are in none."""
        self._require_built("param_groups")
        seen: set[int] = set()

        def fresh(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
            out = [p for p in params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in out)
            return out

        groups: list[dict[str, Any]] = []
        for name, spec in self.branch_specs.items():
            params = fresh(self.branches[name].parameters())
            if params:
                lr = float(spec.lr) if spec.lr is not None else float(base_lr)
                groups.append({"params": params, "lr": lr, "name": f"branches.{name}"})
        head_params = fresh(
            p for m in (self.align, self.fuse, self.head) if m is not None for p in m.parameters()
        )
        if head_params:
            groups.append({"params": head_params, "lr": float(base_lr), "name": "head"})
        return groups

    @property
    def all_frozen(self) -> bool:
        return all(b.policy == "frozen" for b in self.branch_specs.values())

    # ----------------------------------------------------------------- forward

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise FeatureError(
                f"{what} needs the module built for an input shape: pass input_shape= to FeatureFusion, "
                "call .build(input_shape), or run one forward pass first"
            )

    def tap_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The raw tap output of every branch, in branch order."""
        return [ext(x) for ext in self._extractors.values()]

    def prepare(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The parameter-free alignment of the tap outputs (layout, pooling/interpolation); what caches store."""
        self._require_built("prepare")
        return [a(t) for a, t in zip(self.alignments.values(), taps)]

    def fuse_prepared(self, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        """Projections and the fusion operator over prepared features: the fused (B, C, *spatial)."""
        assert self.fuse is not None
        return self.fuse([self.align[n](p) for n, p in zip(self.alignments, prepared)])

    def forward_prepared(self, prepared: Sequence[torch.Tensor]) -> torch.Tensor:
        """The outputs (logits) from prepared features, e.g. cached ones."""
        assert self.head is not None
        return self.head(self.fuse_prepared(prepared))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The fused features of a batch, before the head."""
        self._build_on_first_call(x)
        return self.fuse_prepared(self.prepare(self.tap_outputs(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._build_on_first_call(x)
        return self.forward_prepared(self.prepare(self.tap_outputs(x)))

    def _build_on_first_call(self, x: torch.Tensor) -> None:
        if self.built:
            return
        if self.training and torch.is_grad_enabled():
            warnings.warn(
                "FeatureFusion was built by its first forward pass in training mode; an optimizer made "
                "before it does not hold the new layers. Build it first: input_shape= or .build(shape)",
                stacklevel=3,
            )
        self.build(tuple(x.shape[1:]))

    # ----------------------------------------------------------------- plumbing

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FeatureFusion:
        out = super()._apply(fn, recurse)
        for ext in self._extractors.values():
            ext.refresh()  # a traced graph may hold a buffer that was moved or converted
        return out

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """As ``nn.Module.load_state_dict``; the module must be built (same settings and input shape)."""
        self._require_built("load_state_dict")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def describe(self) -> str:
        """A table: per branch its tap, policy, tap shape, aligned shape and projection; then operator and head."""
        lines = []
        for name, spec in self.branch_specs.items():
            ext = self._extractors[name]
            line = f"{name}: {type(spec.model).__name__}[{spec.tap!r}] ({spec.policy}, read by {ext.method})"
            if self.built:
                a = self.alignments[name]
                proj = self.align[name]
                to = (
                    f" -> 1x1 projection to {proj.linear.out_features}"
                    if isinstance(proj, Projection)
                    else ""
                )
                line += f": {a.in_shape} -> {a.out_shape}{to}"
            lines.append(line)
        if self.built:
            lines.append(
                f"fuse {self.fuse_name!r} at level {next(iter(self.alignments.values())).level!r}: {self.fused_shape}"
            )
        else:
            lines.append(f"fuse {self.fuse_name!r} (not built yet)")
        lines.append(f"head: {type(self.head).__name__ if self.head is not None else PoolMLPHead.__name__}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        shape = f", input_shape={self.input_shape}" if self.built else ", not built"
        return f"fuse={self.fuse_name!r}, level={self.level!r}{shape}"
