"""Stitching: adapters between shapes, least squares against NumPy, frozen training, and the figures."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from modelfuse.errors import ConfigError, StructureError
from modelfuse.structure import (
    Adapter,
    Stitched,
    auto_adapter,
    cut,
    least_squares_init,
    list_adapters,
    stitch,
    stitch_models,
    train_adapter,
)
from modelfuse.zoo import build_pool, create_model


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _numpy_lstsq(rows_a: torch.Tensor, rows_b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """min ||[A 1] X - B|| by NumPy; returns (weight (out, in), bias (out,)) as nn.Linear stores them."""
    a = rows_a.double().numpy()
    a1 = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    x = np.linalg.lstsq(a1, rows_b.double().numpy(), rcond=None)[0]
    return x[:-1].T, x[-1]


def _check_against_numpy(adapter: Adapter, source, target, rows_a, rows_b) -> None:
    least_squares_init(adapter, source, target)
    weight, bias = _numpy_lstsq(rows_a, rows_b)
    np.testing.assert_allclose(adapter.linear.weight.detach().numpy(), weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(adapter.linear.bias.detach().numpy(), bias, rtol=1e-5, atol=1e-6)


def test_least_squares_conv1x1_equals_numpy():
    a, b = _rand(40, 6, 5, 5, seed=1), _rand(40, 9, 5, 5, seed=2)
    rows_a = a.permute(0, 2, 3, 1).reshape(-1, 6)  # every pixel of every example is one row
    rows_b = b.permute(0, 2, 3, 1).reshape(-1, 9)
    _check_against_numpy(Adapter("conv1x1", (6, 5, 5), (9, 5, 5)), a, b, rows_a, rows_b)


def test_least_squares_linear_on_vectors_and_tokens_equals_numpy():
    a, b = _rand(200, 12, seed=3), _rand(200, 7, seed=4)
    _check_against_numpy(Adapter("linear", (12,), (7,)), a, b, a, b)
    t, u = _rand(30, 5, 12, seed=5), _rand(30, 5, 7, seed=6)
    _check_against_numpy(Adapter("linear", (5, 12), (5, 7)), t, u, t.reshape(-1, 12), u.reshape(-1, 7))


def test_least_squares_resample_equals_numpy_on_pooled_rows():
    a, b = _rand(40, 4, 8, 8, seed=7), _rand(40, 6, 4, 4, seed=8)
    pooled = a.reshape(40, 4, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 area averaging, written out
    rows_a = pooled.permute(0, 2, 3, 1).reshape(-1, 4)
    rows_b = b.permute(0, 2, 3, 1).reshape(-1, 6)
    adapter = Adapter("resample", (4, 8, 8), (6, 4, 4))
    _check_against_numpy(adapter, a, b, rows_a, rows_b)
    assert adapter(a).shape == (40, 6, 4, 4)


def test_least_squares_conv_to_tokens_and_back_equal_numpy():
    a, t = _rand(20, 4, 3, 3, seed=9), _rand(20, 9, 10, seed=10)  # 3x3 pixels <-> 9 tokens, row-major
    pixels = a.permute(0, 2, 3, 1).reshape(-1, 4)
    _check_against_numpy(Adapter("conv_to_tokens", (4, 3, 3), (9, 10)), a, t, pixels, t.reshape(-1, 10))
    _check_against_numpy(Adapter("tokens_to_conv", (9, 10), (4, 3, 3)), t, a, t.reshape(-1, 10), pixels)
    assert Adapter("tokens_to_conv", (9, 10), (4, 3, 3))(t).shape == (20, 4, 3, 3)


def test_rank_deficient_activations_get_the_minimum_norm_solution():
    a = _rand(100, 5, seed=11)
    a[:, 2] = 0.0  # a dead ReLU channel
    b = _rand(100, 3, seed=12)
    _check_against_numpy(Adapter("linear", (5,), (3,)), a, b, a, b)


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "kind"),
    [
        ((64,), (128,), "linear"),
        ((32, 8, 8), (64, 8, 8), "conv1x1"),
        ((32, 8, 8), (64, 4, 4), "resample"),
        ((32, 4, 4), (64, 8, 8), "resample"),
        ((32, 40), (64, 20), "resample"),
        ((32, 4, 4), (16, 48), "conv_to_tokens"),
        ((49, 48), (32, 4, 4), "tokens_to_conv"),
        ((16, 48), (16, 64), "linear"),
    ],
)
def test_auto_adapter_maps_the_shapes(in_shape, out_shape, kind):
    assert auto_adapter(in_shape, out_shape) == kind
    adapter = Adapter(kind, in_shape, out_shape)
    assert adapter(torch.randn(3, *in_shape)).shape == (3, *out_shape)


def test_adapter_that_cannot_map_the_shapes_says_which_would():
    with pytest.raises(StructureError) as err:
        Adapter("linear", (32, 8, 8), (64, 8, 8))
    msg = str(err.value)
    assert "adapter 'linear' cannot map activations of shape (32, 8, 8) to (64, 8, 8)" in msg
    assert "use 'conv1x1' or 'resample' (or 'auto')" in msg
    with pytest.raises(
        StructureError, match=r"no adapter maps activations of shape \(64, 4, 4\) to \(128,\)"
    ):
        auto_adapter((64, 4, 4), (128,))
    with pytest.raises(StructureError, match="no adapter maps these shapes"):
        Adapter("conv1x1", (64, 4, 4), (128,))
    assert set(list_adapters()) == {"linear", "conv1x1", "resample", "conv_to_tokens", "tokens_to_conv"}


def _pair(arch: str, shape: tuple[int, ...]):
    torch.manual_seed(0)
    a = create_model(arch, input_shape=shape, num_classes=10).eval()
    torch.manual_seed(1)
    b = create_model(arch, input_shape=shape, num_classes=10).eval()
    return a, b


@torch.no_grad()
def test_stitching_a_model_with_itself_by_least_squares_reproduces_it():
    model, _ = _pair("vgg_small", (1, 8, 8))
    x = _rand(64, 1, 8, 8, seed=3)
    front, back = cut(model, "features.conv2_1")
    stitched = stitch(front, back, inputs=x, target=front)
    # the fit maps A's activations onto themselves exactly (a projection even with dead channels)
    torch.testing.assert_close(stitched(x), model(x), atol=1e-4, rtol=1e-4)


def test_training_moves_only_the_adapter_and_keeps_batchnorm_statistics():
    a, b = _pair("vgg_small", (1, 8, 8))
    front_a, _ = cut(a, "features.conv2_1")
    front_b, back_b = cut(b, "features.conv2_1")
    x, y = _rand(96, 1, 8, 8, seed=4), torch.arange(96) % 10
    stitched = stitch(front_a, back_b, "conv1x1", inputs=x[:64], target=front_b, init="random", seed=3)
    assert isinstance(stitched, Stitched) and stitched.adapter.kind == "conv1x1"
    frozen = {k: v.clone() for k, v in stitched.state_dict().items() if not k.startswith("adapter.")}
    adapter_before = copy.deepcopy(stitched.adapter.state_dict())
    stitched.train()
    assert stitched.training and not stitched.front.training and not stitched.back.training
    result = train_adapter(stitched, TensorDataset(x, y), epochs=2, seed=0, lr=1e-2)
    assert result.steps == 4
    for key, value in stitched.state_dict().items():
        if key in frozen:  # weights and BatchNorm running statistics of both halves
            assert torch.equal(value, frozen[key]), key
    assert not torch.equal(stitched.adapter.linear.weight, adapter_before["linear.weight"])
    # the endpoints themselves are untouched: stitch deep-copies the halves
    assert all(p.requires_grad for p in a.parameters()) and all(p.requires_grad for p in b.parameters())
    with pytest.raises(ConfigError, match="param_groups cannot be given"):
        train_adapter(stitched, TensorDataset(x, y), epochs=1, seed=0, param_groups=[])


def test_random_init_is_seeded():
    a, b = _pair("cnn", (1, 8, 8))
    front_a, _ = cut(a, "features.conv2")
    front_b, back_b = cut(b, "features.conv2")
    x = _rand(16, 1, 8, 8)
    one = stitch(front_a, back_b, inputs=x, target=front_b, init="random", seed=5)
    two = stitch(front_a, back_b, inputs=x, target=front_b, init="random", seed=5)
    assert torch.equal(one.adapter.linear.weight, two.adapter.linear.weight)


def test_stitching_models_whose_input_shapes_differ_is_refused():
    torch.manual_seed(0)
    small = create_model("cnn", input_shape=(1, 8, 8), num_classes=10).eval()
    large = create_model("cnn", input_shape=(3, 32, 32), num_classes=10).eval()
    front_a, _ = cut(small, "features.conv2")
    front_b, back_b = cut(large, "features.conv2")
    with pytest.raises(StructureError) as err:
        stitch(front_a, back_b, inputs=_rand(8, 1, 8, 8), target=front_b)
    msg = str(err.value)
    assert "the front of model B fails on the stitching inputs of shape (8, 1, 8, 8)" in msg
    assert "the front of model A runs on them: stitched models must take the same inputs" in msg


def test_stitch_rejects_bad_settings():
    a, b = _pair("cnn", (1, 8, 8))
    front_a, _ = cut(a, "features.conv2")
    front_b, back_b = cut(b, "features.conv2")
    x = _rand(8, 1, 8, 8)
    with pytest.raises(ConfigError, match="unknown init 'zeros'"):
        stitch(front_a, back_b, inputs=x, target=front_b, init="zeros")
    with pytest.raises(ConfigError, match="needs a built-in adapter"):
        stitch(front_a, back_b, torch.nn.Identity(), inputs=x, target=front_b)
    with pytest.raises(StructureError, match="target holds activations of 4 examples but inputs has 8"):
        stitch(front_a, back_b, inputs=x, target=front_b(x[:4]))
    with pytest.raises(StructureError, match=r"adapter 'linear' cannot map .* \(64, 2, 2\) to \(64, 2, 2\)"):
        stitch(front_a, back_b, "linear", inputs=x, target=front_b)


def test_stitching_figures(capsys):
    """Bansal et al. 2021's protocol on two digits CNNs from different seeds, cut in the middle."""
    pool = build_pool("cnn", "digits", k=2, epochs=10, progress=False)
    at = "features.conv2"  # after the second of three conv blocks: 64 x 2 x 2 feature maps
    _, report = stitch_models(pool[0], pool[1], at, pool.data, init="least_squares", epochs=5, seed=0)
    _, random = stitch_models(pool[0], pool[1], at, pool.data, init="random", epochs=5, seed=0)
    with capsys.disabled():
        print("\nstitching cnn seed 0 -> cnn seed 1 on digits (test split)")
        print(report)
        print(
            f"random init: untrained acc {random.stitched_init['accuracy']:.4f} "
            f"NLL {random.stitched_init['nll']:.4f}; trained acc {random.stitched['accuracy']:.4f} "
            f"NLL {random.stitched['nll']:.4f}"
        )
    worse = min(report.model_a["accuracy"], report.model_b["accuracy"])
    assert report.stitched["accuracy"] >= worse - 0.03
    assert report.penalty <= 0.03
    assert report.stitched_init["accuracy"] > random.stitched_init["accuracy"]
    assert report.stitched_init["nll"] < random.stitched_init["nll"]
    assert report.adapter == "conv1x1" and report.at_a == report.at_b == at
