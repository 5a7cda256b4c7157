"""Model stitching: the front of network A, a learned adapter, the back of network B.

Lenc & Vedaldi (2015), "Understanding image representations by measuring their
equivariance and equivalence", join two networks with a linear "stitching layer" and
read how well A's representation at a layer can stand in for B's; Bansal, Nakkiran &
Barak (2021), "Revisiting model stitching to compare neural representations", train only
that layer (a 1x1 convolution), with both halves frozen, and compare the stitched
accuracy with the endpoints'.

The adapter is one linear map over channels (a 1x1 convolution for feature maps, a
linear layer for vectors and tokens), preceded where shapes need it by a fixed spatial
resampling or a change of layout between feature maps and tokens. It starts from the
closed-form least-squares fit of B's activations from A's on the same inputs
(``min_W ||[A 1] W - B||``, solved with ``torch.linalg.lstsq``) and is then trained through
the shared loop :func:`modelfuse.zoo.train.train` with everything else frozen.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from modelfuse.data.splits import Splits
from modelfuse.errors import ConfigError, StructureError
from modelfuse.registry import Registry
from modelfuse.structure.cut import cut
from modelfuse.zoo.train import TrainResult, evaluate, train

Shape = tuple[int, ...]
INITS = ("least_squares", "random")


@dataclass(frozen=True)
class AdapterKind:
    """A kind of adapter: which activation shapes (per example) it maps, and how it reads them.

    ``fits(in_shape, out_shape)`` says whether it can map them; ``maps`` describes that in words.
    """

    name: str
    maps: str
    fits: Callable[[Shape, Shape], bool]


_ADAPTERS: Registry[AdapterKind] = Registry("adapter")


def _square(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n else None


def _token_grid(tokens: int, grid: Sequence[int]) -> tuple[int, int] | None:
    """The (h, w) grid ``tokens`` tokens lie on, next to a feature map of spatial ``grid``: itself, or a square."""
    if tokens == math.prod(grid):
        return int(grid[0]), int(grid[1])
    r = _square(tokens)
    return (r, r) if r is not None else None


for _kind in (
    AdapterKind(
        "linear",
        "vectors (D,) -> (D',) or tokens (L, D) -> (L, D')",
        lambda i, o: (len(i) == len(o) == 1) or (len(i) == len(o) == 2 and i[0] == o[0]),
    ),
    AdapterKind(
        "conv1x1",
        "feature maps (C, *S) -> (C', *S) with the same spatial size S",
        lambda i, o: len(i) == len(o) and 2 <= len(i) <= 4 and i[1:] == o[1:],
    ),
    AdapterKind(
        "resample",
        "feature maps (C, *S) -> (C', *S'): resamples S to S', then a 1x1 conv",
        lambda i, o: len(i) == len(o) and 2 <= len(i) <= 4,
    ),
    AdapterKind(
        "conv_to_tokens",
        "feature maps (C, H, W) -> tokens (L, D) with L = H*W or a square number (resampled)",
        lambda i, o: len(i) == 3 and len(o) == 2 and _token_grid(o[0], i[1:]) is not None,
    ),
    AdapterKind(
        "tokens_to_conv",
        "tokens (L, D) -> feature maps (C, H, W) with L = H*W or a square number (resampled)",
        lambda i, o: len(i) == 2 and len(o) == 3 and _token_grid(i[0], o[1:]) is not None,
    ),
):
    _ADAPTERS.register(_kind.name, _kind)


def list_adapters(pattern: str = "*") -> list[str]:
    """Names of the adapter kinds matching a shell-style ``pattern``, sorted (besides ``"auto"``,
    which picks one from the shapes)."""
    return _ADAPTERS.names(pattern)


def get_adapter(kind: str) -> AdapterKind:
    """The adapter kind ``kind`` (what it maps, whether it fits two shapes); an unknown kind raises
    RegistryError listing close names. The kinds are a fixed set: each one's arithmetic is part of
    :class:`Adapter`, so there is no ``register_adapter``; a module of your own can be passed as the
    ``adapter`` of ``stitch`` instead."""
    return _ADAPTERS.get(kind)


def auto_adapter(in_shape: Sequence[int], out_shape: Sequence[int]) -> str:
    """The adapter kind for activations of ``in_shape`` -> ``out_shape`` (per example, no batch).

    Vectors -> ``linear``; feature maps of equal spatial size -> ``conv1x1``, else
    ``resample``; 3-D <-> 2-D -> ``conv_to_tokens`` / ``tokens_to_conv``. Two 2-D shapes are
    read as channels-first 1-D feature maps (C, L) unless only their first dimension agrees
    (then tokens (L, D)); pass ``adapter="linear"`` for tokens of equal count and width.
    """
    i, o = tuple(int(d) for d in in_shape), tuple(int(d) for d in out_shape)
    if len(i) == len(o) == 1 or (len(i) == len(o) == 2 and i[0] == o[0] and i[1] != o[1]):
        kind = "linear"
    elif len(i) == len(o) and 2 <= len(i) <= 4:
        kind = "conv1x1" if i[1:] == o[1:] else "resample"
    elif len(i) == 3 and len(o) == 2:
        kind = "conv_to_tokens"
    elif len(i) == 2 and len(o) == 3:
        kind = "tokens_to_conv"
    else:
        kind = ""
    if not kind or not get_adapter(kind).fits(i, o):
        raise StructureError(
            f"no adapter maps activations of shape {i} to {o} (per example). Adapters: "
            + "; ".join(f"{k.name}: {k.maps}" for k in map(get_adapter, list_adapters()))
            + ". Cut the models where both carry vectors, feature maps or tokens"
        )
    return kind


def _resample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *size): area averaging when shrinking, (bi/tri)linear interpolation otherwise."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[2:]) == size:
        return x
    dims = len(size)
    if all(s <= t for s, t in zip(size, x.shape[2:])):
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[dims - 1]
        return pool(x, size)
    mode = ("linear", "bilinear", "trilinear")[dims - 1]
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


class Adapter(nn.Module):
    """A stitching layer (Lenc & Vedaldi 2015): one linear map over channels between two layouts.

    Activations are read as rows ``(N, P, C)`` (P positions of C channels): vectors as one
    position, feature maps ``(C, *S)`` as their pixels (so the map is a 1x1 convolution),
    tokens ``(L, D)`` as tokens. ``resample`` and the token adapters first resample A's
    positions onto B's (a fixed linear map), so that row p of A's and of B's rows describe
    the same place; :meth:`source_rows` and :meth:`target_rows` give those rows, which the
    least-squares initialisation fits. ``linear`` holds the learned ``weight`` and ``bias``.
    """

    def __init__(self, kind: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        super().__init__()
        self.in_shape: Shape = tuple(int(d) for d in in_shape)
        self.out_shape: Shape = tuple(int(d) for d in out_shape)
        entry = get_adapter(kind)
        if not entry.fits(self.in_shape, self.out_shape):
            working = [k for k in list_adapters() if get_adapter(k).fits(self.in_shape, self.out_shape)]
            fix = (
                f"use {' or '.join(map(repr, working))} (or 'auto')"
                if working
                else "no adapter maps these shapes; cut the models where both carry vectors, feature maps or tokens"
            )
            raise StructureError(
                f"adapter {kind!r} cannot map activations of shape {self.in_shape} to {self.out_shape} "
                f"(per example): it maps {entry.maps}; {fix}"
            )
        self.kind = kind
        c_in = self.in_shape[-1] if kind in ("linear", "tokens_to_conv") else self.in_shape[0]
        c_out = self.out_shape[-1] if kind in ("linear", "conv_to_tokens") else self.out_shape[0]
        self.linear = nn.Linear(c_in, c_out)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, in_shape={self.in_shape}, out_shape={self.out_shape}"

    def source_rows(self, a: torch.Tensor) -> torch.Tensor:
        """A's activations ``(N, *in_shape)`` as rows ``(N, P, C_in)`` on B's positions."""
        if self.kind == "linear":
            return a.unsqueeze(1) if a.dim() == 2 else a
        if self.kind in ("conv1x1", "resample"):
            return _resample(a, self.out_shape[1:]).flatten(2).transpose(1, 2)
        if self.kind == "conv_to_tokens":
            grid = _token_grid(self.out_shape[0], self.in_shape[1:])
            return _resample(a, grid).flatten(2).transpose(1, 2)
        # tokens_to_conv: tokens on their grid, resampled onto B's feature map
        grid = _token_grid(self.in_shape[0], self.out_shape[1:])
        n, _, d = a.shape
        maps = a.transpose(1, 2).reshape(n, d, *grid)
        return _resample(maps, self.out_shape[1:]).flatten(2).transpose(1, 2)

    def target_rows(self, b: torch.Tensor) -> torch.Tensor:
        """B's activations ``(N, *out_shape)`` as rows ``(N, P, C_out)``, row for row with :meth:`source_rows`."""
        if b.dim() == 2:
            return b.unsqueeze(1)
        if self.kind in ("linear", "conv_to_tokens"):
            return b
        return b.flatten(2).transpose(1, 2)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        rows = self.linear(self.source_rows(a))
        n = rows.shape[0]
        if len(self.out_shape) == 1:
            return rows.reshape(n, -1)
        if self.kind in ("linear", "conv_to_tokens"):
            return rows
        return rows.transpose(1, 2).reshape(n, *self.out_shape)


@torch.no_grad()
def least_squares_init(adapter: Adapter, source: torch.Tensor, target: torch.Tensor) -> Adapter:
    """Set ``adapter`` to the least-squares fit of ``target`` (B's activations) from ``source`` (A's).

    Solves ``min_{W, b} ||A W + 1 b - B||_F`` over the rows of both (every example and position;
    the closed-form initialisation of a stitching layer) with ``torch.linalg.lstsq`` in float64
    on the CPU (``gelsd``: the minimum-norm solution when A is rank-deficient, e.g. dead ReLUs).
    """
    if source.shape[0] != target.shape[0]:
        raise StructureError(
            f"least squares needs A's and B's activations on the same inputs; found {source.shape[0]} "
            f"and {target.shape[0]} examples"
        )
    a = adapter.source_rows(source.detach()).reshape(-1, adapter.linear.in_features)
    b = adapter.target_rows(target.detach()).reshape(-1, adapter.linear.out_features)
    a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1).double().cpu()
    solution = torch.linalg.lstsq(a, b.double().cpu(), driver="gelsd").solution
    weight, bias = solution[:-1].T, solution[-1]
    adapter.linear.weight.copy_(weight.to(adapter.linear.weight))
    adapter.linear.bias.copy_(bias.to(adapter.linear.bias))
    return adapter


class Stitched(nn.Module):
    """``back(adapter(front(x)))``: front of A, a trainable adapter, back of B (Bansal et al. 2021).

    ``front`` and ``back`` are frozen and stay in eval mode also when the stitched model is
    put in training mode, so their BatchNorm statistics do not move while the adapter trains.
    """

    def __init__(self, front: nn.Module, adapter: nn.Module, back: nn.Module) -> None:
        super().__init__()
        self.front = front.requires_grad_(False).eval()
        self.adapter = adapter
        self.back = back.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Stitched:
        """Sets the adapter's mode; front and back stay in eval mode."""
        super().train(mode)
        self.front.eval()
        self.back.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.adapter(self.front(x)))


def _activations(module: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """``module(x)`` in eval mode without gradients; every submodule's mode is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:
        raise StructureError(
            f"{what} fails on the stitching inputs of shape {tuple(x.shape)} ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(out, torch.Tensor):
        raise StructureError(
            f"{what} returns a {type(out).__name__}, not one tensor; cut where a tensor flows"
        )
    return out


def stitch(
    front: nn.Module,
    back: nn.Module,
    adapter: str | nn.Module = "auto",
    *,
    inputs: torch.Tensor,
    target: nn.Module | torch.Tensor,
    init: str = "least_squares",
    seed: int = 0,
) -> Stitched:
    """Join ``front`` (of model A) and ``back`` (of model B) with an adapter (Lenc & Vedaldi 2015).

    - ``inputs``: a batch both models take; A's activations on it fix the adapter's input shape.
    - ``target``: B's front (run on ``inputs``) or its activations on ``inputs``: B's activations
      at its cut, which fix the adapter's output shape and are what least squares fits.
    - ``adapter``: ``"auto"`` (from the shapes), a kind in ``list_adapters()``, or a module.
    - ``init``: ``"least_squares"`` (closed form on ``inputs``) or ``"random"`` (PyTorch's
      default initialisation, seeded by ``seed``).

    Front and back are deep-copied (the models are left untouched), frozen and kept in eval
    mode; train the adapter with :func:`train_adapter`.
    """
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    if not isinstance(inputs, torch.Tensor):
        raise ConfigError(f"inputs must be a batch of model inputs (a tensor); found {type(inputs).__name__}")
    source = _activations(front, inputs, "the front of model A")
    if isinstance(target, nn.Module):
        try:
            target_acts = _activations(target, inputs, "the front of model B")
        except StructureError as exc:
            raise StructureError(
                f"{exc}, but the front of model A runs on them: stitched models must take the same "
                "inputs; stitch models trained on inputs of one shape, or resize the inputs for one of them"
            ) from None
    else:
        target_acts = target.detach()
    if target_acts.shape[0] != source.shape[0]:
        raise StructureError(
            f"target holds activations of {target_acts.shape[0]} examples but inputs has {source.shape[0]}; "
            "give B's activations on the same inputs"
        )
    in_shape, out_shape = tuple(source.shape[1:]), tuple(target_acts.shape[1:])
    _activations(back, target_acts[:2], f"the back of model B (on activations of shape {out_shape})")
    if isinstance(adapter, nn.Module):
        module = adapter
        if init == "least_squares":
            if not isinstance(module, Adapter):
                raise ConfigError(
                    "init='least_squares' needs a built-in adapter (a kind name or an Adapter); "
                    f"pass init='random' to use your {type(module).__name__} as it is"
                )
            least_squares_init(module, source, target_acts)
    else:
        kind = auto_adapter(in_shape, out_shape) if adapter == "auto" else adapter
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(seed))
            module = Adapter(kind, in_shape, out_shape)
        module.to(device=source.device, dtype=source.dtype)
        if init == "least_squares":
            least_squares_init(module, source, target_acts)
    stitched = Stitched(copy.deepcopy(front), module, copy.deepcopy(back))
    out = _activations(module, source[:2], "the adapter")
    if tuple(out.shape[1:]) != out_shape:
        raise StructureError(
            f"the adapter maps A's activations {in_shape} to {tuple(out.shape[1:])}, but B's back takes "
            f"{out_shape}; give an adapter whose output has B's shape"
        )
    return stitched


def train_adapter(
    stitched: Stitched,
    data: Splits | Dataset,
    *,
    epochs: int,
    seed: int,
    lr: float = 1e-3,
    **train_kwargs: Any,
) -> TrainResult:
    """Train only the adapter of ``stitched`` (front and back stay frozen, BatchNorm in eval) with :func:`train`."""
    if "param_groups" in train_kwargs:
        raise ConfigError("train_adapter trains the adapter's parameters; param_groups cannot be given")
    params = [p for p in stitched.adapter.parameters() if p.requires_grad]
    return train(stitched, data, epochs=epochs, seed=seed, lr=lr, param_groups=params, **train_kwargs)


@dataclass
class StitchReport:
    """Accuracy and NLL of model A, model B and the stitched model (before and after training).

    ``penalty`` is the worse endpoint's accuracy minus the trained stitched accuracy
    (Bansal et al. 2021's "stitching penalty", in accuracy points when multiplied by 100).
    """

    model_a: dict[str, float]
    model_b: dict[str, float]
    stitched_init: dict[str, float]
    stitched: dict[str, float]
    at_a: str = ""
    at_b: str = ""
    adapter: str = ""
    init: str = ""

    @property
    def penalty(self) -> float:
        return min(self.model_a["accuracy"], self.model_b["accuracy"]) - self.stitched["accuracy"]

    def __str__(self) -> str:
        rows = [
            (f"model A (cut at {self.at_a})" if self.at_a else "model A", self.model_a),
            (f"model B (cut at {self.at_b})" if self.at_b else "model B", self.model_b),
            (f"stitched, {self.adapter} adapter, {self.init} init, untrained", self.stitched_init),
            ("stitched, adapter trained", self.stitched),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'':{width}}  accuracy     NLL"]
        lines += [f"{name:{width}}  {m['accuracy']:8.4f}  {m['nll']:6.4f}" for name, m in rows]
        return "\n".join(lines)


def _first_inputs(dataset: Dataset, n: int) -> torch.Tensor:
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][:n]
    items = [dataset[i][0] for i in range(min(n, len(dataset)))]  # type: ignore[arg-type]
    return torch.stack([torch.as_tensor(x) for x in items])


def _metrics(model: nn.Module, dataset: Dataset) -> dict[str, float]:
    m = evaluate(model, dataset)
    return {"accuracy": m["accuracy"], "nll": m["nll"]}


def stitch_models(
    model_a: nn.Module,
    model_b: nn.Module,
    at: str,
    data: Splits,
    *,
    at_b: str | None = None,
    adapter: str | nn.Module = "auto",
    init: str = "least_squares",
    fit_examples: int = 512,
    epochs: int = 5,
    seed: int = 0,
    lr: float = 1e-3,
    **train_kwargs: Any,
) -> tuple[Stitched, StitchReport]:
    """Cut A at ``at`` and B at ``at_b`` (default: the same name), stitch, train the adapter, report.

    The adapter is initialised (``init``) on the first ``fit_examples`` training inputs and
    trained for ``epochs`` on ``data``'s train split (Bansal et al. 2021's protocol: only the
    stitching layer learns); the report holds test accuracy and NLL of A, B and the stitched
    model before and after training.
    """
    at_b = at if at_b is None else at_b
    front_a, _ = cut(model_a, at)
    front_b, back_b = cut(model_b, at_b)
    inputs = _first_inputs(data.train, int(fit_examples))
    stitched = stitch(front_a, back_b, adapter, inputs=inputs, target=front_b, init=init, seed=seed)
    before = _metrics(stitched, data.test)
    if epochs > 0:
        train_adapter(stitched, data, epochs=epochs, seed=seed, lr=lr, **train_kwargs)
    kind = stitched.adapter.kind if isinstance(stitched.adapter, Adapter) else type(stitched.adapter).__name__
    report = StitchReport(
        model_a=_metrics(model_a, data.test),
        model_b=_metrics(model_b, data.test),
        stitched_init=before,
        stitched=_metrics(stitched, data.test) if epochs > 0 else dict(before),
        at_a=at,
        at_b=at_b,
        adapter=kind,
        init=init,
    )
    return stitched, report
