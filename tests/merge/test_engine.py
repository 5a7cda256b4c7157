"""The merge engine's edge cases: the sign of zero on both paths, and layouts of the inputs."""

from __future__ import annotations

import pytest
import torch

from modelfuse.merge.methods import _kernels
from modelfuse.merge.methods._base import get_method
from modelfuse.merge.methods._engine import merge_deltas
from modelfuse.merge.methods._sparsifiers import RandomKeep, TopK, sparsify

from .kernel_support import require_kernels

GTA = [
    ("ties", {"density": 1.0}, {}),
    ("ties", {"density": 0.5}, {}),
    ("dare_linear", {"density": 1.0}, {}),
    ("dare_ties", {"density": 1.0}, {}),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.0}, {}),
    ("della_linear", {"density": 1.0, "epsilon": 0.0}, {}),
]


def _both_paths(name, xs, base, models, shared):
    require_kernels()
    outs = {}
    for enabled in (True, False):
        before = _kernels.set_enabled(enabled)
        try:
            outs[enabled] = get_method(name)(
                xs, base, models=models, generator=torch.Generator().manual_seed(1), **shared
            )
        finally:
            _kernels.set_enabled(before)
    return outs[True], outs[False]


@pytest.mark.parametrize("name, per_model, shared", GTA)
@pytest.mark.parametrize("weights", [(-1.0, -1.0), (-1.0, 2.0), (0.5, 1.5)])
def test_all_zero_deltas_give_positive_zero_on_both_paths(name, per_model, shared, weights):
    """base = -0 and x_i = -0: tau_i = (-0) - (-0) = +0, u_i = w_i tau_i is -0 for a negative
    weight. torch.sum starts from +0, so the sum is +0 and y = -0 + (+0) = +0 everywhere
    (by hand: IEEE -0 + +0 = +0 in round-to-nearest); the C kernels must give those bytes."""
    base = torch.full((3, 70), -0.0)
    xs = [torch.full((3, 70), -0.0) for _ in weights]
    models = [{**per_model, "weight": w} for w in weights]
    fast, slow = _both_paths(name, xs, base, models, shared)
    assert not torch.signbit(slow).any(), "torch path: -0 + (+0) is +0"
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
    assert torch.equal(torch.signbit(fast), torch.signbit(slow))


@pytest.mark.parametrize("name, per_model, shared", GTA)
def test_zero_signs_agree_on_mixed_inputs(name, per_model, shared):
    """Entries where x_i equals the base (tau = 0, of either sign) next to ordinary ones, with a
    base of +0s and -0s: the C path gives the torch path's bytes, sign bits included."""
    g = torch.Generator().manual_seed(7)
    n = 4096
    base = torch.randn(n, generator=g)
    base[::3] = -0.0
    base[1::3] = 0.0
    xs = []
    for _ in range(3):
        x = base + torch.randn(n, generator=g) * 0.1
        equal = torch.rand(n, generator=g) < 0.6
        x[equal] = base[equal]
        x[torch.rand(n, generator=g) < 0.2] = -0.0
        xs.append(x)
    models = [{**per_model, "weight": w} for w in (-1.0, 0.5, -0.25)]
    fast, slow = _both_paths(name, xs, base, models, shared)
    assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))


@pytest.mark.parametrize("elect", [True, False])
def test_merge_deltas_of_a_transposed_base_is_contiguous_and_correct(elect):
    """A strided base (a transposed view) gives a contiguous result equal, entry for entry,
    to the merge of the same values laid out contiguously."""
    g = torch.Generator().manual_seed(2)
    storage = torch.randn(11, 13, generator=g)
    base = storage.t()  # (13, 11), not contiguous
    assert not base.is_contiguous()
    deltas = torch.randn(3, 13, 11, generator=g)
    kw = dict(elect=elect, normalize=True, lambda_=0.5)
    got = merge_deltas(base, deltas.clone(), [1.0, 0.5, 2.0], **kw)
    want = merge_deltas(base.contiguous(), deltas.clone(), [1.0, 0.5, 2.0], **kw)
    assert got.is_contiguous() and got.shape == (13, 11)
    assert torch.equal(got, want)
    if not elect:  # an independent check: y = base + lambda * sum_i w_i d_i / sum_i w_i
        w = torch.tensor([1.0, 0.5, 2.0]).view(3, 1, 1)
        ref = base.double() + 0.5 * (deltas.double() * w).sum(0) / 3.5
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("part", [lambda: TopK(0.3, "none", "index"), lambda: RandomKeep(0.5, "none", 11)])
def test_sparsify_of_a_transposed_tensor_is_contiguous(part):
    g = torch.Generator().manual_seed(3)
    tau = torch.randn(9, 17, generator=g).t()
    got = sparsify(tau, part())
    want = sparsify(tau.contiguous(), part())
    assert got.is_contiguous() and got.shape == tau.shape
    assert torch.equal(got, want)
    kept = got != 0  # every kept entry is tau's own value (no rescale)
    assert torch.equal(got[kept], tau[kept])


@pytest.mark.parametrize("name, per_model, shared", [*GTA, ("sce", {}, {"select_topk": 0.5})])
def test_methods_take_transposed_inputs(name, per_model, shared):
    """Views as inputs (a transposed base and models) merge like their contiguous copies."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 6, generator=g).t()
    xs = [(torch.randn(8, 6, generator=g) * 0.1).t() + base for _ in range(2)]
    models = [per_model] * 2
    for enabled in (True, False):
        before = _kernels.set_enabled(enabled and _kernels.available())
        try:
            method = get_method(name)
            got = method(xs, base, models=models, generator=torch.Generator().manual_seed(1), **shared)
            want = method(
                [x.contiguous() for x in xs],
                base.contiguous(),
                models=models,
                generator=torch.Generator().manual_seed(1),
                **shared,
            )
        finally:
            _kernels.set_enabled(before)
        assert got.is_contiguous()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
