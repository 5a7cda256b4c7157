"""ActivationMix against the definition y = sum_i w_i f_i(x), computed in NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from modelfuse.activations import ActivationMix, get_activation, list_activations, register_activation
from modelfuse.errors import ActivationError, RegistryError

ERF = np.vectorize(math.erf)
NUMPY = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + ERF(x / math.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "identity": lambda x: x,
}
CANDS = ("relu", "gelu", "silu", "tanh")


def softmax(z, axis=0):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_registry_has_the_usual_activations():
    for name in (
        "relu",
        "gelu",
        "silu",
        "tanh",
        "sigmoid",
        "elu",
        "leaky_relu",
        "softplus",
        "mish",
        "identity",
        "hardswish",
    ):
        assert name in list_activations()
        assert isinstance(get_activation(name)(), nn.Module)
    assert get_activation("leaky_relu")(negative_slope=0.2).negative_slope == 0.2
    with pytest.raises(RegistryError, match="Did you mean 'gelu'"):
        get_activation("gelu2")


def test_register_a_new_activation():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    register_activation("test_square", Square)
    mix = ActivationMix(("relu", "test_square"), weights="free", init=[0.5, 2.0])
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    expected = 0.5 * np.maximum(x.numpy(), 0) + 2.0 * x.numpy() ** 2
    np.testing.assert_allclose(mix.double()(x).detach().numpy(), expected, rtol=1e-12)


def test_layer_convex_is_softmax_weighted_sum():
    torch.manual_seed(0)
    mix = ActivationMix(CANDS).double()
    theta = np.array([0.3, -1.0, 2.0, 0.1])
    with torch.no_grad():
        mix.mix.logits.copy_(torch.from_numpy(theta))
    x = torch.randn(5, 3, dtype=torch.float64)
    w = softmax(theta)
    expected = sum(w[i] * NUMPY[n](x.numpy()) for i, n in enumerate(CANDS))
    np.testing.assert_allclose(mix(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mix.mixing_weights().detach().numpy(), w, rtol=1e-12)


def test_uniform_init_is_the_mean_of_the_candidates():
    x = torch.randn(7, 4, dtype=torch.float64)
    for weights in ("convex", "free"):
        mix = ActivationMix(CANDS, weights=weights).double()
        expected = np.mean([NUMPY[n](x.numpy()) for n in CANDS], axis=0)
        np.testing.assert_allclose(mix(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_free_weights_are_unconstrained_coefficients():
    mix = ActivationMix(CANDS, weights="free").double()
    a = np.array([2.0, -1.0, 0.5, -3.0])
    with torch.no_grad():
        mix.mix.coefficients.copy_(torch.from_numpy(a))
    x = torch.randn(6, 2, dtype=torch.float64)
    expected = sum(a[i] * NUMPY[n](x.numpy()) for i, n in enumerate(CANDS))
    np.testing.assert_allclose(mix(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_channel_weights_per_channel_of_dim_1_lazily():
    torch.manual_seed(1)
    mix = ActivationMix(CANDS, granularity="channel").double()
    assert not mix.mix.materialized
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    mix(x)
    assert mix.mix.logits.shape == (4, 3)
    theta = np.random.default_rng(0).normal(size=(4, 3))
    with torch.no_grad():
        mix.mix.logits.copy_(torch.from_numpy(theta))
    w = softmax(theta, axis=0)  # (K, C)
    expected = sum(w[i][None, :, None, None] * NUMPY[n](x.numpy()) for i, n in enumerate(CANDS))
    np.testing.assert_allclose(mix(x).detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ActivationError, match="has 3 channels; the input has 5"):
        mix(torch.randn(2, 5, dtype=torch.float64))
    given = ActivationMix(CANDS, granularity="channel", num_channels=3)
    assert given.mix.logits.shape == (4, 3)


def test_lazy_channel_mixture_loads_a_state_dict():
    a = ActivationMix(CANDS, granularity="channel", num_channels=6, init="gelu")
    with torch.no_grad():
        a.mix.blend.fill_(0.25)
    b = ActivationMix(CANDS, granularity="channel", init="gelu")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 6, 2)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("weights", ["convex", "free"])
@pytest.mark.parametrize("granularity", ["layer", "channel", "global"])
@pytest.mark.parametrize("start", ["relu", "gelu", "tanh"])
def test_named_init_gives_exactly_that_activation(weights, granularity, start):
    torch.manual_seed(2)
    x = torch.randn(8, 5, 3) * 4
    mix = ActivationMix(CANDS, granularity=granularity, weights=weights, init=start)
    assert torch.equal(mix(x), get_activation(start)()(x))


def test_anchored_convex_start_can_learn_and_stays_convex():
    torch.manual_seed(3)
    x = torch.randn(32, 4, dtype=torch.float64)
    r = torch.randn(32, 4, dtype=torch.float64)
    mix = ActivationMix(CANDS, init="relu").double()
    (mix(x) * r).sum().backward()
    # dL/dw_i = sum(r * f_i(x)); w = (1 - lam) e_relu + lam softmax(0) -> dL/dblend = sum_i (1/K - e_i) dL/dw_i
    g = np.array([(r.numpy() * NUMPY[n](x.numpy())).sum() for n in CANDS])
    expected = float(((np.full(4, 0.25) - np.eye(4)[0]) * g).sum())
    assert mix.mix.blend.grad is not None and abs(expected) > 1e-3
    np.testing.assert_allclose(float(mix.mix.blend.grad), expected, rtol=1e-10)
    sign = -float(np.sign(expected))  # a loss whose gradient step raises the blend above 0
    opt = torch.optim.SGD(mix.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        (sign * mix(x) * r).sum().backward()
        opt.step()
    w = mix.mixing_weights().detach()
    assert (w >= 0).all() and abs(float(w.sum()) - 1.0) < 1e-12 and float(w[0]) < 1.0


def test_global_mixtures_share_one_parameter():
    a = ActivationMix(CANDS, granularity="global")
    b = ActivationMix(CANDS, granularity="global", shared_weights=a.mix)
    with torch.no_grad():
        a.mix.logits.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(b.mixing_weights(), a.mixing_weights())
    params = list(nn.ModuleList([a, b]).parameters())
    assert len(params) == 1


def test_bad_inputs_are_named():
    with pytest.raises(
        ActivationError, match=r"unknown activation name\(s\) 'rleu'.*Valid names: .*gelu.*relu"
    ):
        ActivationMix(("rleu", "gelu"))
    with pytest.raises(ActivationError, match="init='elu' is not among the candidates"):
        ActivationMix(CANDS, init="elu")
    with pytest.raises(ActivationError, match="granularity must be one of layer, channel, global"):
        ActivationMix(CANDS, granularity="neuron")
    with pytest.raises(ActivationError, match="weights must be one of convex, free"):
        ActivationMix(CANDS, weights="affine")
    with pytest.raises(ActivationError, match="positive and sum to 1"):
        ActivationMix(CANDS, init=[0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ActivationError, match="4 finite numbers"):
        ActivationMix(CANDS, weights="free", init=[1.0, 0.0])
    with pytest.raises(ActivationError, match="more than once"):
        ActivationMix(("relu", "relu"))
    with pytest.raises(ActivationError, match="non-empty sequence"):
        ActivationMix("relu")
    with pytest.raises(ActivationError, match="channel dim 1"):
        ActivationMix(CANDS, granularity="channel")(torch.randn(4))
