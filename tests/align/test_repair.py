"""REPAIR (Jordan et al. 2023): BatchNorm statistics reset and per-channel rescaling, checked in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelfuse.align import interpolate, repair, repair_statistics, reset_bn_stats
from modelfuse.errors import AlignmentError, ConfigError


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def _np_stats(model: nn.Sequential, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Mean and population std of the two hidden pre-activations, by hand in NumPy."""
    w = [model[i].weight.detach().numpy() for i in (0, 2)]
    b = [model[i].bias.detach().numpy() for i in (0, 2)]
    z1 = x @ w[0].T + b[0]
    z2 = np.maximum(z1, 0) @ w[1].T + b[1]
    return [(z.mean(0), z.std(0)) for z in (z1, z2)]


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_rescaled_channels_have_the_interpolated_endpoint_statistics(t: float) -> None:
    a, b = _mlp(0), _mlp(1)
    x = np.random.default_rng(0).normal(size=(200, 3))
    # uneven batches: the statistics are over all samples, not averaged per batch
    loader = DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=64)
    merged = interpolate(a, b, t)
    fixed = repair(merged, endpoints=(a, b), t=t, data=loader)
    sa, sb, sm, sf = (_np_stats(m, x) for m in (a, b, merged, fixed))
    for (ma, da), (mb, db), (_mm, dm), (mf, df) in zip(sa, sb, sm, sf, strict=True):
        np.testing.assert_allclose(mf, (1 - t) * ma + t * mb, atol=1e-9)
        np.testing.assert_allclose(df, (1 - t) * da + t * db, atol=1e-9)
        assert not np.allclose(dm, (1 - t) * da + t * db, atol=1e-3)  # the correction did something
    # same architecture, merged untouched, output layer untouched
    assert fixed.state_dict().keys() == merged.state_dict().keys()
    assert torch.equal(fixed[4].weight, merged[4].weight)
    for k, v in interpolate(a, b, t).state_dict().items():
        assert torch.equal(merged.state_dict()[k], v)


def test_rescale_at_an_endpoint_changes_nothing() -> None:
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(100, 3, dtype=torch.float64)
    fixed = repair(interpolate(a, b, 0.0), endpoints=(a, b), t=0.0, data=[x])
    for k, v in a.state_dict().items():
        torch.testing.assert_close(fixed.state_dict()[k], v, atol=1e-10, rtol=1e-10)


def test_rescale_conv_channels_over_positions() -> None:
    torch.manual_seed(0)

    def net() -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)
        ).double()

    a, b = net(), net()
    x = torch.randn(40, 2, 6, 6, dtype=torch.float64)
    fixed = repair(interpolate(a, b, 0.5), endpoints=(a, b), data=[x[:25], x[25:]])

    def stats(m: nn.Sequential) -> tuple[np.ndarray, np.ndarray]:
        z = m[0](x).detach().numpy().transpose(0, 2, 3, 1).reshape(-1, 3)
        return z.mean(0), z.std(0)

    (ma, da), (mb, db), (mf, df) = stats(a), stats(b), stats(fixed)
    np.testing.assert_allclose(mf, (ma + mb) / 2, atol=1e-9)
    np.testing.assert_allclose(df, (da + db) / 2, atol=1e-9)
    assert fixed[0].bias is not None  # a bias-free layer gets the shift as a bias


def test_reset_bn_equals_numpy_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))
    model.double()
    x = np.random.default_rng(1).normal(2.0, 3.0, size=(150, 4))
    loader = DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=32)  # last batch of 22
    out = reset_bn_stats(model, loader)
    w, bias = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    z = x @ w.T + bias
    np.testing.assert_allclose(out[1].running_mean.numpy(), z.mean(0), rtol=1e-10)
    np.testing.assert_allclose(out[1].running_var.numpy(), z.var(0, ddof=1), rtol=1e-10)
    # second BN: its input in the training-mode pass, batch by batch (first BN normalises per batch)
    zs = []
    g, beta = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    w2, b2 = model[3].weight.detach().numpy(), model[3].bias.detach().numpy()
    for i in range(0, 150, 32):
        zb = z[i : i + 32]
        h = np.maximum((zb - zb.mean(0)) / np.sqrt(zb.var(0) + 1e-5) * g + beta, 0)
        zs.append(h @ w2.T + b2)
    z2 = np.concatenate(zs)
    np.testing.assert_allclose(out[4].running_mean.numpy(), z2.mean(0), rtol=1e-8)
    np.testing.assert_allclose(out[4].running_var.numpy(), z2.var(0, ddof=1), rtol=1e-8)
    assert not out.training
    assert model[1].running_mean.abs().max() == 0  # the input model is unchanged
    # repair picks the reset for BatchNorm networks
    auto = repair(model, data=loader)
    torch.testing.assert_close(auto[1].running_var, out[1].running_var)


def test_bad_inputs_say_what_is_wrong() -> None:
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(10, 3, dtype=torch.float64)
    with pytest.raises(ConfigError, match="endpoints"):
        repair(a, data=[x])
    with pytest.raises(ConfigError, match="no BatchNorm"):
        reset_bn_stats(a, [x])
    with pytest.raises(AlignmentError, match="does not fit"):
        repair(a, endpoints=(a, b), data=[torch.randn(10, 7, dtype=torch.float64)])
    with pytest.raises(AlignmentError, match="no batches"):
        repair(a, endpoints=(a, b), data=[])
    with pytest.raises(ConfigError, match="method"):
        repair(a, endpoints=(a, b), data=[x], method="magic")
    with pytest.raises(ConfigError, match="'1'"):
        repair_statistics(a, (a, b), [x], layers=["1"])
    with pytest.raises(AlignmentError, match="different architectures"):
        repair(a, endpoints=(a, nn.Sequential(nn.Linear(3, 2)).double()), data=[x])
