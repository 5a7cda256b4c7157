"""Fusion operators against formulas written here, plus one battery over every registered operator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError, FeatureError, RegistryError
from modelfuse.features.fuse import build_fusion, get_feature_fusion, list_feature_fusions


def branches(
    k: int = 3, widths: tuple[int, ...] | None = None, spatial: tuple[int, ...] = (3, 2), seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    widths = widths or (4,) * k
    return [torch.randn(2, w, *spatial, generator=g) for w in widths]


def numpy_of(xs):
    return [x.detach().numpy().astype(np.float64) for x in xs]


def test_concat_keeps_branch_order():
    xs = branches(widths=(2, 3, 1))
    out = build_fusion("concat", [2, 3, 1])(xs)
    a = numpy_of(xs)
    np.testing.assert_array_equal(out.numpy(), np.concatenate(a, axis=1).astype(np.float32))
    assert out.shape[1] == 6 and torch.equal(out[:, 2:5], xs[1])


def test_sum_and_mean():
    xs = branches()
    a = numpy_of(xs)
    np.testing.assert_allclose(build_fusion("sum", [4, 4, 4])(xs).numpy(), a[0] + a[1] + a[2], rtol=1e-6)
    np.testing.assert_allclose(
        build_fusion("mean", [4, 4, 4])(xs).numpy(), (a[0] + a[1] + a[2]) / 3, rtol=1e-6
    )


def test_weighted_is_a_softmax_of_learned_scalars():
    xs = branches()
    op = build_fusion("weighted", [4, 4, 4])
    torch.testing.assert_close(op(xs), sum(xs) / 3)  # initially the mean
    with torch.no_grad():
        op.logits.copy_(torch.tensor([0.5, -1.0, 2.0]))
    w = np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum()
    a = numpy_of(xs)
    np.testing.assert_allclose(op(xs).detach().numpy(), w[0] * a[0] + w[1] * a[1] + w[2] * a[2], rtol=1e-5)


def test_gated_softmax_gates_per_channel_across_branches():
    xs = branches(spatial=(3, 2))
    op = build_fusion("gated", [4, 4, 4], {"min_hidden": 5})
    W1, b1 = op.squeeze.weight.detach().numpy(), op.squeeze.bias.detach().numpy()
    W2, b2 = op.excite.weight.detach().numpy(), op.excite.bias.detach().numpy()
    assert W1.shape == (5, 4)  # max(4 // 4, 5)
    a = numpy_of(xs)
    s = (a[0] + a[1] + a[2]).mean(axis=(2, 3))  # (B, C)
    z = np.maximum(s @ W1.T + b1, 0)
    logits = (z @ W2.T + b2).reshape(2, 3, 4)  # (B, K, C)
    gates = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = sum(gates[:, k, :, None, None] * a[k] for k in range(3))
    np.testing.assert_allclose(op(xs).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(op.gates(xs).sum(1).detach().numpy(), np.ones((2, 4)), rtol=1e-6)


def test_attention_over_branch_tokens():
    xs = branches(widths=(4, 4, 4), spatial=(2,))
    op = build_fusion("attention", [4, 4, 4], {"heads": 2})
    p = {n: t.detach().numpy().astype(np.float64) for n, t in op.state_dict().items()}
    a = numpy_of(xs)
    out = np.zeros((2, 4, 2))
    for b in range(2):
        for pos in range(2):
            t = np.stack([a[k][b, :, pos] for k in range(3)]) + p["branch_embedding"]  # (K, C)
            keys = t @ p["key.weight"].T + p["key.bias"]
            values = t @ p["value.weight"].T + p["value.bias"]
            heads = []
            for h in range(2):
                sl = slice(2 * h, 2 * h + 2)
                scores = keys[:, sl] @ p["query"][sl] / math.sqrt(2)
                alpha = np.exp(scores) / np.exp(scores).sum()
                heads.append(alpha @ values[:, sl])
            out[b, :, pos] = np.concatenate(heads) @ p["out.weight"].T + p["out.bias"]
    np.testing.assert_allclose(op(xs).detach().numpy(), out, rtol=1e-5, atol=1e-6)
    alpha = op.attention(xs)
    assert alpha.shape == (2, 2, 2, 3)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 2, 2))


def test_low_rank_bilinear_is_projected_product_of_projections():
    xs = branches(widths=(3, 5), spatial=(2, 2))
    op = build_fusion("bilinear", [3, 5], {"rank": 6, "out_channels": 4})
    p = {n: t.detach().numpy().astype(np.float64) for n, t in op.state_dict().items()}
    a = numpy_of(xs)
    expected = np.zeros((2, 4, 2, 2))
    for b in range(2):
        for i in range(2):
            for j in range(2):
                ua = p["factors.0.weight"] @ a[0][b, :, i, j] + p["factors.0.bias"]
                vb = p["factors.1.weight"] @ a[1][b, :, i, j] + p["factors.1.bias"]
                expected[b, :, i, j] = p["project.weight"] @ (ua * vb) + p["project.bias"]
    np.testing.assert_allclose(op(xs).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert build_fusion("bilinear", [3, 5]).out_channels == 5  # default: the widest branch


@pytest.mark.parametrize("name", list_feature_fusions())
@pytest.mark.parametrize("spatial", [(), (3, 2), (5,)], ids=["vectors", "maps", "1d-maps"])
def test_every_operator_fuses_maps_and_vectors(name, spatial):
    op = get_feature_fusion(name)
    widths = [6, 6, 6] if op.equal_widths else [6, 3, 5]
    xs = [x.requires_grad_() for x in branches(widths=tuple(widths), spatial=spatial, seed=3)]
    torch.manual_seed(0)
    module = build_fusion(name, widths)
    out = module(xs)
    assert out.shape == (2, module.out_channels, *spatial)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in xs)
    for n, p in module.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {n}"
    # position by position: fusing maps equals fusing each position's vectors
    if spatial:
        flat = [x.detach().movedim(1, -1).reshape(-1, x.shape[1]) for x in xs]
        per_position = module(flat)
        whole = out.detach().movedim(1, -1).reshape(-1, module.out_channels)
        if name != "gated":  # gated's gates depend on the whole map's mean
            torch.testing.assert_close(per_position, whole, rtol=1e-5, atol=1e-6)
    if op.equal_widths:
        with pytest.raises(FeatureError, match="needs equal widths"):
            build_fusion(name, [6, 3])


def test_registry_errors():
    with pytest.raises(RegistryError, match="Did you mean 'concat'"):
        get_feature_fusion("concatenate")
    with pytest.raises(ConfigError, match="Valid options: heads"):
        build_fusion("attention", [4, 4], {"head": 2})
    with pytest.raises(FeatureError, match="divisible"):
        build_fusion("attention", [6, 6], {"heads": 4})
