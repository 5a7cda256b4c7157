"""One battery of checks run over every registered merge method (``list_methods()``).

As timm's tests run over ``list_models()`` and scikit-learn's ``estimator_checks`` over
every estimator, a method is checked here the moment it is registered: ``CASES`` must name
it (what parameters it needs, which settings give the base back), or the first test fails.

The checks are invariants each method's definition implies, not values copied from the
code: identical inputs give that input back; a zero strength (lambda, alpha, t or the
weights) gives the base; the dtype and shape of the inputs are kept and the low-precision
result is the float64 result rounded; the same seed gives the same bytes and another seed
other masks; the compiled C kernels give the torch path's bytes (the sign of zero
included); non-contiguous inputs give a contiguous result equal to that of their copies.

Two functions pin semantics being introduced with mergekit parity (they fail until it
lands): ``test_base_joins_the_mean`` (a method without a base role takes a named base model
as one more input) and ``test_multislerp_models_equal_to_the_base_give_the_base``.

Only public entry points are used (``get_method``, ``list_methods``, ``merge_state_dicts``),
plus the kernels' on/off switch and ``available()`` in ``modelfuse.merge.methods._kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import get_method, list_methods, merge_state_dicts

from .kernel_support import require_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(6, 5), (7,), (2, 3, 4)]
#: per-model weights handed to methods that take a ``weight`` (model i gets WEIGHTS[i])
WEIGHTS = [1.0, 0.6, 0.8]


@dataclass(frozen=True)
class Case:
    """How to run one method in the battery.

    ``shared`` / ``per_model``: parameters of a representative run (every required one, and
    values that make the method do real work: densities below 1, t inside (0, 1)).
    ``zero``: (shared, per-model) settings under which the method's definition gives the
    base model back (lambda 0, alpha 0, t 0, all weights 0); empty where it defines none.
    ``kernels``: the method has a compiled C path for float32 on CPU.
    ``identity``: per-model overrides under which identical inputs must come back.
    """

    shared: dict[str, Any] = field(default_factory=dict)
    per_model: dict[str, Any] = field(default_factory=dict)
    zero: tuple[tuple[dict[str, Any], dict[str, Any]], ...] = ()
    kernels: bool = False
    #: per-model parameters for the identical-inputs check (passthrough's scale is no identity)
    identity: dict[str, Any] = field(default_factory=dict)


LAMBDA_OR_WEIGHTS_ZERO = (({"lambda": 0.0}, {}), ({}, {"weight": 0.0}))
ALPHA_ZERO = (({"alpha": 0.0}, {}),)

CASES: dict[str, Case] = {
    "arcee_fusion": Case(),
    "breadcrumbs": Case(per_model={"density": 0.6, "gamma": 0.1}, zero=LAMBDA_OR_WEIGHTS_ZERO, kernels=True),
    "breadcrumbs_ties": Case(
        per_model={"density": 0.6, "gamma": 0.1}, zero=LAMBDA_OR_WEIGHTS_ZERO, kernels=True
    ),
    "dare_linear": Case(per_model={"density": 0.5}, zero=LAMBDA_OR_WEIGHTS_ZERO, kernels=True),
    "dare_ties": Case(per_model={"density": 0.5}, zero=LAMBDA_OR_WEIGHTS_ZERO, kernels=True),
    "della": Case(per_model={"density": 0.5, "epsilon": 0.2}, zero=LAMBDA_OR_WEIGHTS_ZERO, kernels=True),
    "della_linear": Case(
        per_model={"density": 0.5, "epsilon": 0.2}, zero=LAMBDA_OR_WEIGHTS_ZERO, kernels=True
    ),
    "iso_c": Case(shared={"alpha": 0.7}, zero=ALPHA_ZERO),
    "iso_cts": Case(shared={"alpha": 0.7}, zero=ALPHA_ZERO),
    "karcher": Case(),
    "linear": Case(kernels=True),
    "magmax": Case(shared={"lambda": 0.9}, zero=(({"lambda": 0.0}, {}),)),
    "model_stock": Case(kernels=True),
    "multislerp": Case(),
    "nearswap": Case(shared={"t": 0.05}),
    "nuslerp": Case(),
    "passthrough": Case(per_model={"scale": 0.5}, identity={"scale": None}),
    "ram": Case(),
    "ramplus_tl": Case(),
    "sce": Case(shared={"select_topk": 0.6}),
    "slerp": Case(shared={"t": 0.3}, zero=(({"t": 0.0}, {}),), kernels=True),
    "task_arithmetic": Case(shared={"lambda": 0.8}, zero=LAMBDA_OR_WEIGHTS_ZERO, kernels=True),
    "ties": Case(
        shared={"lambda": 0.9}, per_model={"density": 0.5}, zero=LAMBDA_OR_WEIGHTS_ZERO, kernels=True
    ),
    "tsv_m": Case(shared={"alpha": 0.7}, zero=ALPHA_ZERO),
}

METHODS = list_methods()
RANDOMIZED = [name for name in METHODS if get_method(name).randomized]
#: mergekit's methods without a base role: a named base model is one more input there
BASE_JOINS = sorted(
    {"karcher", "linear", "passthrough"} | {n for n in METHODS if get_method(n).base == "none"}
)


# ----------------------------------------------------------------------------- helpers


def model_count(name: str, want: int = 3) -> int:
    """``want`` models, or the nearest count the method accepts."""
    method = get_method(name)
    n = max(want, method.min_models)
    return n if method.max_models is None else min(n, method.max_models)


def base_modes(name: str) -> list[bool]:
    """With a base (True) and/or without (False), as the method's base role allows (any other role: both)."""
    return {"required": [True], "none": [False]}.get(get_method(name).base, [True, False])


def method_base_params(names: list[str] | None = None) -> list[Any]:
    return [
        pytest.param(name, with_base, id=f"{name}-{'base' if with_base else 'nobase'}")
        for name in names or METHODS
        for with_base in base_modes(name)
    ]


def per_model_params(name: str, n: int, override: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The case's per-model parameters for n models, ``weight`` WEIGHTS[i] where the method takes one."""
    fields = get_method(name).per_model.model_fields
    models = []
    for i in range(n):
        params = dict(CASES[name].per_model)
        if "weight" in fields:
            params["weight"] = WEIGHTS[i % len(WEIGHTS)]
        params.update(override or {})
        models.append(params)
    return models


def inputs(
    n: int,
    shape: tuple[int, ...] = (6, 5),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    zeros: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A base and n fine-tunes of it (base + deltas of about 0.1).

    With ``zeros``: the base holds -0.0 at every 7th entry and +0.0 at every 7th from the 3rd,
    where the deltas are small (they are trimmed first); every 11th entry from the 5th of
    each model is the base's entry itself (a task vector entry of exactly 0); so the sign
    of zero of the merged sums shows in the output.
    """
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    deltas = [0.1 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]
    if zeros:
        flat = base.view(-1)
        flat[0::7] = -0.0
        flat[3::7] = 0.0
        for i, d in enumerate(deltas):
            d.view(-1)[0::7] = -1e-3 * (i + 1)
            d.view(-1)[3::7] = 1e-3 * (-1) ** i
    base_d = base.to(dtype)
    xs = [(base + d).to(dtype) for d in deltas]
    if zeros:
        for x in xs:
            x.view(-1)[5::11] = base_d.view(-1)[5::11]
    return xs, base_d


def run(
    name: str,
    xs: list[torch.Tensor],
    base: torch.Tensor | None,
    *,
    shared: dict[str, Any] | None = None,
    per_model: dict[str, Any] | None = None,
    seed: int = 1234,
) -> torch.Tensor:
    """The method called through its registry entry with the case's parameters (overridden by the given ones)."""
    method = get_method(name)
    params = {**CASES[name].shared, **(shared or {})}
    generator = torch.Generator().manual_seed(seed) if method.randomized else None
    return method(xs, base, models=per_model_params(name, len(xs), per_model), generator=generator, **params)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same_bytes(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, (
        f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    )
    if not torch.equal(raw_bytes(a), raw_bytes(b)):
        differ = (raw_bytes(a).view(-1, a.element_size()) != raw_bytes(b).view(-1, b.element_size())).any(1)
        where = differ.nonzero().reshape(-1)[:5].tolist()
        flat_a, flat_b = a.reshape(-1), b.reshape(-1)
        shown = [(j, flat_a[j].item(), flat_b[j].item()) for j in where]
        signs = int(((a == 0) & (b == 0) & (torch.signbit(a) != torch.signbit(b))).sum())
        raise AssertionError(
            f"{what}: {int(differ.sum())} of {a.numel()} entries differ in their bytes "
            f"({signs} of them only in the sign of a zero); first (position, one, other): {shown}"
        )


def close_to(out: torch.Tensor, expected: torch.Tensor, ulps: float = 4.0) -> None:
    """out equals expected up to ``ulps`` units of the output dtype's precision (relative to the largest entry)."""
    eps = torch.finfo(out.dtype).eps
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        out.double(), expected.double(), rtol=ulps * eps, atol=ulps * eps * max(scale, 1e-30)
    )


# ----------------------------------------------------------------------------- the registry


def test_every_registered_method_has_a_case():
    """A new method needs a line in CASES (its parameters, its zero settings): then the battery runs it."""
    assert set(CASES) == set(METHODS), (
        f"methods without a battery case: {sorted(set(METHODS) - set(CASES))}; "
        f"cases of no registered method: {sorted(set(CASES) - set(METHODS))}"
    )


@pytest.mark.parametrize("name", METHODS)
def test_case_parameters_are_valid_and_complete(name):
    """Every required parameter is given by the case, and the case names only parameters the method has."""
    method = get_method(name)
    case = CASES[name]
    required = {f.alias or n for n, f in method.shared.model_fields.items() if f.is_required()}
    assert required <= set(case.shared), f"{name}: the case lacks required parameters {sorted(required)}"
    method.check_shared(case.shared)
    for shared, per_model in case.zero:
        method.check_shared({**case.shared, **shared})
        method.check_per_model({**case.per_model, **per_model})
    method.check_per_model(case.per_model)


# ----------------------------------------------------------------------------- invariants


IDENTITY_PARAMS = [
    # multislerp with a base and models equal to it: new semantics, see
    # test_multislerp_models_equal_to_the_base_give_the_base
    p
    for p in method_base_params()
    if p.values != ("multislerp", True)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("name", "with_base"), IDENTITY_PARAMS)
def test_identical_inputs_give_the_input(name, with_base, dtype):
    """Every model equal to x (and the base too, where one is given): the merge is x.

    Averages, spherical means and interpolations of equal points are that point; task
    vectors are all zero, so whatever trims, votes or rescales them adds nothing to the base.
    """
    xs, _ = inputs(1, dtype=dtype)
    x = xs[0]
    n = model_count(name)
    out = run(
        name, [x.clone() for _ in range(n)], x.clone() if with_base else None, per_model=CASES[name].identity
    )
    assert out.dtype == x.dtype and out.shape == x.shape
    close_to(out, x)


ZERO_PARAMS = [
    pytest.param(
        name,
        shared,
        per_model,
        id=f"{name}-{'-'.join(f'{k}{v}' for k, v in {**shared, **per_model}.items())}",
    )
    for name in METHODS
    for shared, per_model in CASES.get(name, Case()).zero
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("name", "shared", "per_model"), ZERO_PARAMS)
def test_zero_strength_gives_the_base(name, shared, per_model, dtype):
    """lambda 0 (or alpha 0, slerp's t 0, every weight 0) gives the base model exactly."""
    xs, base = inputs(model_count(name), dtype=dtype)
    out = run(name, xs, base, shared=shared, per_model=per_model)
    assert out.dtype == base.dtype and out.shape == base.shape
    assert torch.equal(out, base), (
        f"{name} with {shared or per_model}: max |out - base| = {(out - base).abs().max()}"
    )


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("name", "with_base"), method_base_params())
def test_dtype_and_shape_kept(name, with_base, dtype, shape):
    """The output has the inputs' dtype and shape, and is the float64 merge of the same inputs rounded.

    The float64 run takes the same (rounded) inputs, so the two differ by the rounding of
    the result and of the intermediate steps each method takes in the input dtype: within
    2 units of the dtype's precision at the scale of the inputs (max(|base|, 1)). Measured:
    within 1 for every method, dtype and shape here; a trim or vote that flipped because two
    magnitudes rounded alike would show as an entry far off.
    """
    n = model_count(name)
    xs, base = inputs(n, shape, dtype, zeros=False)
    out = run(name, xs, base if with_base else None)
    assert out.dtype == dtype, f"{name}: {dtype} in, {out.dtype} out"
    assert out.shape == torch.Size(shape), f"{name}: shape {shape} in, {tuple(out.shape)} out"
    assert torch.isfinite(out).all()
    wide = run(name, [x.double() for x in xs], base.double() if with_base else None)
    scale = max(float(base.double().abs().max()), 1.0)
    torch.testing.assert_close(out.double(), wide, rtol=0, atol=2 * torch.finfo(dtype).eps * scale)


# ----------------------------------------------------------------------------- randomness


def _mask(name: str, seed: int, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Which task-vector entries one model keeps (no rescale: kept entries are x, dropped ones the base)."""
    method = get_method(name)
    names = {f.alias or n for n, f in method.shared.model_fields.items()}
    shared = {k: v for k, v in {"rescale": "none", "lambda": 1.0}.items() if k in names}
    per_model = {"weight": 1.0} if "weight" in method.per_model.model_fields else {}
    out = run(name, [x], base, shared=shared, per_model=per_model, seed=seed)
    kept = out != base
    # kept entries are base + (x - base): x up to the rounding of that sum
    torch.testing.assert_close(out[kept], x[kept], rtol=0, atol=2 * torch.finfo(x.dtype).eps * 4)
    return kept


@pytest.mark.parametrize("name", RANDOMIZED)
def test_same_seed_same_bytes_other_seed_other_masks(name):
    xs, base = inputs(model_count(name), (16, 16), zeros=False)
    first = run(name, xs, base, seed=7)
    assert_same_bytes(first, run(name, xs, base, seed=7), f"{name}, seed 7 twice")
    assert not torch.equal(first, run(name, xs, base, seed=8)), f"{name}: seeds 7 and 8 give the same result"
    masks = [_mask(name, seed, xs[0], base) for seed in (7, 7, 8)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2]), f"{name}: seeds 7 and 8 keep the same entries"
    density = CASES[name].per_model["density"]
    for m in masks:  # 256 draws at density 0.5: the kept fraction is 0.5 +- 0.03 (1 sd)
        assert abs(m.float().mean().item() - density) < 0.2


@pytest.mark.parametrize("name", RANDOMIZED)
def test_executor_seeds_runs_and_tensors(name):
    """``merge_state_dicts(seed=...)``: the same seed the same bytes, another seed and another tensor other draws."""
    xs, base = inputs(1, (16, 16), zeros=False)
    state = lambda t: {"a.weight": t, "b.weight": t.clone()}  # noqa: E731
    shared = {"rescale": "none"} if "rescale" in get_method(name).shared.model_fields else {}

    def merged(seed: int) -> dict[str, torch.Tensor]:
        return merge_state_dicts(
            name, [state(xs[0])], state(base), model_params=per_model_params(name, 1), seed=seed, **shared
        )

    one, again, other = merged(3), merged(3), merged(4)
    for key in one:
        assert_same_bytes(one[key], again[key], f"{name} {key}, seed 3 twice")
        assert not torch.equal(one[key], other[key]), f"{name} {key}: seeds 3 and 4 give the same draws"
    assert not torch.equal(one["a.weight"], one["b.weight"]), f"{name}: two tensors drew the same mask"


# ----------------------------------------------------------------------------- C kernels


def _both_paths(fn):
    """(kernels on, kernels off) results of ``fn()`` in this process, and how many kernel calls the first made."""
    from modelfuse.merge.methods import _kernels

    calls = [0]
    real = _kernels._lib

    def counted():
        calls[0] += 1
        return real()

    before = _kernels.set_enabled(True)
    try:
        _kernels._lib = counted
        with_kernels = fn()
        _kernels._lib = real
        _kernels.set_enabled(False)
        without = fn()
    finally:
        _kernels._lib = real
        _kernels.set_enabled(before)
    return with_kernels, without, calls[0]


def kernel_variants(name: str) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(label, shared, per-model) runs to compare: the case, one negative weight, the zero settings.

    A per-model value None means: the case's, with the last model's weight -0.5."""
    variants: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [("case", {}, {})]
    if "weight" in get_method(name).per_model.model_fields:
        variants.append(("negative_weight", {}, None))
    for shared, per_model in CASES[name].zero:
        label = "_".join(f"{k}{v}" for k, v in {**shared, **per_model}.items())
        variants.append((label, shared, per_model))
    return variants


KERNEL_PARAMS = [
    pytest.param(p.values[0], p.values[1], label, shared, per_model, id=f"{p.id}-{label}")
    for p in method_base_params()
    for label, shared, per_model in kernel_variants(p.values[0])
]


@pytest.mark.parametrize(("name", "with_base", "label", "shared", "per_model"), KERNEL_PARAMS)
def test_kernels_and_torch_give_the_same_bytes(name, with_base, label, shared, per_model):
    """float32 on CPU: the C kernels and the torch path give the same bytes, the sign of zero included.

    The inputs hold -0.0 and +0.0 in the base where the deltas are trimmed (see ``inputs``),
    so a sum that starts from its first term instead of +0 shows as a -0.0 in the output.
    Methods without a kernel path must run none (else CASES should say kernels=True).
    """
    require_kernels()
    method = get_method(name)
    n = model_count(name)
    for shape in [(6, 5), (3, 40)]:
        xs, base = inputs(n, shape, seed=sum(map(ord, name)))
        if per_model is None:
            models = per_model_params(name, n)
            models[-1]["weight"] = -0.5
        else:
            models = per_model_params(name, n, per_model)

        def call(xs=xs, base=base, models=models):
            generator = torch.Generator().manual_seed(99) if method.randomized else None
            params = {**CASES[name].shared, **shared}
            return method(xs, base if with_base else None, models=models, generator=generator, **params)

        fast, slow, calls = _both_paths(call)
        assert_same_bytes(fast, slow, f"{name} ({label}, {shape}): kernels vs torch")
        if CASES[name].kernels and label == "case":
            assert calls > 0, f"{name}: CASES says it has a kernel path, but no kernel ran"
        if not CASES[name].kernels:
            assert calls == 0, f"{name} ran the C kernels: set kernels=True in its case"


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(("name", "with_base"), method_base_params())
def test_non_contiguous_inputs_give_the_result_of_their_copies(name, with_base):
    """Transposed views (a checkpoint's tensor as torch may hold it) merge as their contiguous copies do."""
    xs, base = inputs(model_count(name), (5, 6))
    views = [x.t() for x in xs]
    base_view = base.t()
    assert not base_view.is_contiguous()
    out = run(name, views, base_view if with_base else None)
    expected = run(name, [v.contiguous() for v in views], base_view.contiguous() if with_base else None)
    assert out.shape == expected.shape == base_view.shape
    assert_same_bytes(out.contiguous(), expected, f"{name}: views vs copies")


# ----------------------------------------------------------------------------- new semantics (mergekit parity)


@pytest.mark.parametrize("name", BASE_JOINS)
def test_base_joins_the_mean(name):
    """mergekit semantics: for a method without a base role, a named base model is one more input.

    Merging xs with base b equals merging xs + [b] without one; where that is more models
    than the method takes (passthrough), the recipe is refused with a ConfigError.
    """
    method = get_method(name)
    n = model_count(name, 2)
    xs, b = inputs(n)
    states = [{"w": x, "v": x[0].clone()} for x in xs]
    base_state = {"w": b, "v": b[0].clone()}
    if method.max_models is not None and n + 1 > method.max_models:
        with pytest.raises(ConfigError, match=name):
            merge_state_dicts(name, states, base_state, model_params=[dict(CASES[name].per_model)] * n)
        return
    with_base = merge_state_dicts(name, states, base_state, **CASES[name].shared)
    joined = merge_state_dicts(name, [*states, base_state], **CASES[name].shared)
    for key in with_base:
        assert_same_bytes(with_base[key], joined[key], f"{name} {key}: base given vs base listed as a model")
    # and not the merge that leaves the base out
    without = merge_state_dicts(name, states, **CASES[name].shared)
    assert not torch.equal(with_base["w"], without["w"]), f"{name}: the base model was left out"


@pytest.mark.parametrize("n", [2, 3])
def test_multislerp_models_equal_to_the_base_give_the_base(n):
    """Every task vector exactly zero: multislerp gives the base (the weighted combination of zeros, plus the base)."""
    _, base = inputs(1)
    out = run("multislerp", [base.clone() for _ in range(n)], base)
    assert torch.equal(out, base), (
        f"multislerp of {n} copies of the base: max |out - base| {(out - base).abs().max()}"
    )
    merged = merge_state_dicts("multislerp", [{"w": base.clone()} for _ in range(n)], {"w": base})
    assert torch.equal(merged["w"], base), f"merge_state_dicts multislerp of {n} copies of the base"


def test_multislerp_antipodal_cancelling_inputs_still_raise():
    """Genuinely cancelling directions (not all-zero task vectors) stay an error for 3+ models;
    two models fall back to the weighted sum of their task vectors."""
    _, base = inputs(1)
    base = torch.round(base * 4) / 4  # multiples of 1/4: base +- d and the task vectors are exact
    d = torch.full_like(base, 0.25)
    pair = get_method("multislerp")([base + d, base - d], base)  # 0.5 d - 0.5 d: the base
    close_to(pair, base)
    weights = [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}]  # u - 2u + u = 0
    with pytest.raises(ConfigError, match="zero"):
        get_method("multislerp")([base + d, base - d, base + d], base, models=weights)


def test_battery_is_not_vacuous():
    """Sanity of the inputs: some deltas are trimmed at signed zeros, and the cases differ from the inputs."""
    xs, base = inputs(3)
    flat = base.view(-1)
    assert torch.signbit(flat[0]) and flat[0] == 0 and not torch.signbit(flat[3]) and flat[3] == 0
    assert torch.equal(xs[0].view(-1)[5::11], flat[5::11])
    out = run("ties", xs, base)
    assert not torch.equal(out, base) and not any(torch.equal(out, x) for x in xs)
    assert math.isfinite(float(out.sum()))
