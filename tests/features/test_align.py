"""Alignment against formulas written here: NumPy block means, interpolation sizes, token grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError, FeatureError
from modelfuse.features.align import (
    Projection,
    global_pool,
    map_to_tokens,
    plan_alignment,
    resize,
    resolve_layout,
    token_grid,
    tokens_to_map,
)


def test_adaptive_pool_equals_numpy_block_mean_when_sizes_divide():
    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    out = resize(x, (4, 3), "pool")
    a = x.numpy().reshape(2, 3, 4, 2, 3, 4)  # blocks of 2 rows x 4 columns
    np.testing.assert_allclose(out.numpy(), a.mean(axis=(3, 5)), rtol=1e-6, atol=1e-6)


def test_adaptive_pool_uneven_sizes_use_floor_ceil_windows():
    x = torch.randn(1, 2, 7, 5, generator=torch.Generator().manual_seed(1))
    out = resize(x, (3, 2), "pool").numpy()
    a = x.numpy()
    expected = np.zeros((1, 2, 3, 2), dtype=np.float32)
    for i in range(3):
        r0, r1 = math.floor(i * 7 / 3), math.ceil((i + 1) * 7 / 3)
        for j in range(2):
            c0, c1 = math.floor(j * 5 / 2), math.ceil((j + 1) * 5 / 2)
            expected[:, :, i, j] = a[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_interpolation_sizes_and_linear_formula():
    x = torch.randn(2, 4, 5, 3)
    assert resize(x, (10, 7), "interpolate").shape == (2, 4, 10, 7)
    assert resize(x, (2, 2), "interpolate").shape == (2, 4, 2, 2)
    assert resize(torch.randn(2, 4, 6), (9,), "interpolate").shape == (2, 4, 9)
    assert resize(x, (5, 3), "interpolate") is x  # equal size: untouched
    # 1-D linear interpolation, align_corners=False: source position (i + 0.5) * n_in / n_out - 0.5
    v = torch.tensor([[[0.0, 10.0, 20.0, 40.0]]])
    out = resize(v, (6,), "interpolate")[0, 0].numpy()
    src = np.clip((np.arange(6) + 0.5) * 4 / 6 - 0.5, 0, 3)
    np.testing.assert_allclose(out, np.interp(src, np.arange(4), v[0, 0].numpy()), rtol=1e-6, atol=1e-5)


def test_tokens_and_maps_round_trip():
    m = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    t = map_to_tokens(m)
    assert t.shape == (2, 16, 3)
    assert torch.equal(t[1, 4 * 2 + 3], m[1, :, 2, 3])  # token index = row * width + column
    assert torch.equal(tokens_to_map(t), m)
    with_cls = torch.cat([torch.full((2, 1, 3), -1.0), t], dim=1)  # (B, 1 + 16, C): a class token first
    assert torch.equal(tokens_to_map(with_cls), m)
    assert token_grid(197) == (1, 14) and token_grid(196) == (0, 14) and token_grid(261, 5) == (5, 16)
    with pytest.raises(FeatureError, match="prefix_tokens"):
        token_grid(20)


def test_global_pool_and_projection_is_a_1x1_convolution():
    x = torch.randn(2, 5, 3, 4)
    np.testing.assert_allclose(global_pool(x).numpy(), x.numpy().mean(axis=(2, 3)), rtol=1e-6, atol=1e-6)
    proj = Projection(5, 7)
    conv = torch.nn.Conv2d(5, 7, 1)
    conv.weight.data = proj.linear.weight.data[:, :, None, None].clone()
    conv.bias.data = proj.linear.bias.data.clone()
    torch.testing.assert_close(proj(x), conv(x))
    assert Projection(5, 7)(torch.randn(2, 5)).shape == (2, 7)


def test_plan_levels_sizes_and_layouts():
    shapes = {"a": (16, 8, 8), "b": (32, 4, 4)}
    layouts = {"a": "channels_first", "b": "channels_first"}
    plan = plan_alignment(shapes, layouts)
    assert (
        plan["a"].level == "map" and plan["a"].out_shape == (16, 4, 4) and plan["b"].out_shape == (32, 4, 4)
    )
    plan = plan_alignment(shapes, layouts, spatial="interpolate")
    assert plan["b"].out_shape == (32, 8, 8)
    assert plan_alignment(shapes, layouts, size=2)["a"].out_shape == (16, 2, 2)
    assert plan_alignment(shapes, layouts, level="vector")["b"].out_shape == (32,)
    # channels-last maps and tokens with a class token: tokens make "auto" fuse vectors
    x_last = torch.randn(2, 4, 4, 6)
    tokens = torch.randn(2, 17, 10)
    shapes = {"a": (16, 8, 8), "last": (4, 4, 6), "tok": (17, 10)}
    layouts = {"a": "channels_first", "last": "channels_last", "tok": "tokens"}
    plan = plan_alignment(shapes, layouts)
    assert {a.level for a in plan.values()} == {"vector"}
    torch.testing.assert_close(plan["last"](x_last), x_last.mean((1, 2)))
    torch.testing.assert_close(plan["tok"](tokens), tokens.mean(1))
    first = plan_alignment(shapes, layouts, token_pool={"tok": "first"})["tok"]
    assert torch.equal(first(tokens), tokens[:, 0])
    plan = plan_alignment(shapes, layouts, level="map")
    assert plan["tok"].out_shape == (10, 4, 4) and plan["last"].out_shape == (6, 4, 4)
    torch.testing.assert_close(plan["tok"](tokens), tokens_to_map(tokens))
    torch.testing.assert_close(plan["last"](x_last), x_last.permute(0, 3, 1, 2))


def test_plan_errors_say_what_would_work():
    with pytest.raises(FeatureError, match="level='vector'"):
        plan_alignment(
            {"a": (16, 8, 8), "v": (32,)}, {"a": "channels_first", "v": "channels_first"}, level="map"
        )
    with pytest.raises(FeatureError, match=r"spatial dimensions.*level='vector'"):
        plan_alignment(
            {"a": (16, 8, 8), "b": (8, 5)}, {"a": "channels_first", "b": "channels_first"}, level="map"
        )
    with pytest.raises(ConfigError, match="unknown level"):
        plan_alignment({"a": (4,)}, {"a": "channels_first"}, level="pixels")
    assert resolve_layout((5, 8), "auto", conv1d=False) == "tokens"
    assert resolve_layout((5, 8), "auto", conv1d=True) == "channels_first"
    with pytest.raises(FeatureError, match="layout='tokens'"):
        resolve_layout((5, 8, 8), "tokens", conv1d=False)
