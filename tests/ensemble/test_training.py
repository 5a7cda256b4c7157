"""Training ensembles (bagging, snapshots, FGE, SWA) against closed forms and references written here."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse.data import load
from modelfuse.ensemble import Ensemble
from modelfuse.ensemble.training import (
    bagging,
    bootstrap_indices,
    fast_geometric_ensemble,
    snapshot_ensemble,
    swa,
)
from modelfuse.errors import ConfigError
from modelfuse.zoo import Callback, create_model, train

SMALL = {"hidden": (32,)}  # a small zoo mlp keeps every run well under a second


@pytest.fixture(scope="module")
def digits():
    return load("digits")


class Recorder(Callback):
    """The learning rate used at every step, and a copy of the weights after every step and epoch."""

    def __init__(self):
        self.lrs, self.after_step, self.after_epoch = [], [], []

    def before_step(self, state):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])

    def on_step(self, state):
        self.after_step.append(copy.deepcopy(state.model.state_dict()))

    def on_epoch_end(self, state):
        self.after_epoch.append(copy.deepcopy(state.model.state_dict()))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps_per_epoch(n: int, batch_size: int = 64) -> int:
    return n // batch_size if n > batch_size and n % batch_size == 1 else math.ceil(n / batch_size)


def test_snapshot_lr_follows_the_cyclic_cosine_and_snapshots_are_the_cycle_ends(digits):
    rec = Recorder()
    lr0, cycles = 0.1, 4
    snaps = snapshot_ensemble(
        "mlp",
        digits,
        cycles=cycles,
        epochs=2,
        lr=lr0,
        seed=0,
        model_kwargs=SMALL,
        callbacks=[rec],
        progress=False,
    )
    T = 2 * steps_per_epoch(len(digits.train))  # 34: cycles of 9, 9, 9 and 7 steps
    t = np.arange(1, T + 1)
    length = math.ceil(T / cycles)
    expected = lr0 / 2 * (np.cos(np.pi * np.mod(t - 1, length) / length) + 1)  # Huang et al. 2017, eq. 2
    np.testing.assert_allclose(rec.lrs, expected, rtol=1e-12, atol=1e-15)
    assert len(snaps) == cycles
    assert snaps.steps == [length, 2 * length, 3 * length, T]
    for member, step in zip(snaps.members, snaps.steps):
        assert same_weights(member.state_dict(), rec.after_step[step - 1])
    assert same_weights(
        snaps.members[-1].state_dict(), rec.after_step[-1]
    )  # the last snapshot is the final model
    assert not any(p.grad is not None for m in snaps for p in m.parameters())


def test_fge_lr_is_piecewise_linear_and_members_sit_at_its_minima(digits):
    rec = Recorder()
    c, a1, a2 = 8, 0.05, 0.0005
    fge = fast_geometric_ensemble(
        "mlp",
        digits,
        epochs=2,
        cycle_steps=c,
        alpha1=a1,
        alpha2=a2,
        pretrain_epochs=1,
        seed=0,
        model_kwargs=SMALL,
        callbacks=[rec],
        progress=False,
    )
    T = 2 * steps_per_epoch(len(digits.train))
    i = np.arange(1, T + 1)
    t = (np.mod(i - 1, c) + 1) / c  # Garipov et al. 2018, eq. 2
    expected = np.where(t <= 0.5, (1 - 2 * t) * a1 + 2 * t * a2, (2 - 2 * t) * a2 + (2 * t - 1) * a1)
    np.testing.assert_allclose(rec.lrs, expected, rtol=1e-12)
    minima = [int(s) for s in i[np.isclose(expected, a2)]]
    assert minima == [4, 12, 20, 28]
    assert fge.steps == minima and len(fge) == len(minima)
    for member, step in zip(fge.members, fge.steps):
        assert rec.lrs[step - 1] == pytest.approx(a2) == pytest.approx(min(rec.lrs))
        assert same_weights(member.state_dict(), rec.after_step[step - 1])
    assert len(fge.results) == 2  # pre-training, then the cyclic phase


def test_fge_from_a_trained_model_starts_from_its_weights(digits):
    torch.manual_seed(0)
    trained = create_model("mlp", input_shape=digits.input_shape, num_classes=digits.num_classes, **SMALL)
    train(trained, digits, epochs=1, seed=0, progress=False)
    before = copy.deepcopy(trained.state_dict())
    rec = Recorder()
    rec.on_train_begin = lambda state: rec.after_step.append(copy.deepcopy(state.model.state_dict()))
    fast_geometric_ensemble(trained, digits, epochs=1, cycle_steps=4, seed=0, callbacks=[rec], progress=False)
    assert same_weights(rec.after_step[0], before)  # the FGE phase began at the given weights
    assert same_weights(trained.state_dict(), before)  # and the caller's module is left as it was


def test_swa_average_is_the_mean_of_the_weights_at_each_averaging_epoch(digits):
    rec = Recorder()
    epochs, start, lr, swa_lr = 4, 1, 0.05, 0.01
    averaged = swa(
        "mlp",
        digits,
        epochs=epochs,
        swa_start=start,
        lr=lr,
        swa_lr=swa_lr,
        seed=0,
        model_kwargs=SMALL,
        callbacks=[rec],
        progress=False,
    )
    captured = rec.after_epoch[start:]  # epochs start + 1 .. epochs
    assert len(captured) == epochs - start
    state = averaged.state_dict()
    for name, value in state.items():
        mean = np.mean([c[name].double().numpy() for c in captured], axis=0)
        np.testing.assert_allclose(value.double().numpy(), mean, rtol=1e-5, atol=1e-6)
    spe = steps_per_epoch(len(digits.train))
    expected = np.where(
        np.arange(1, epochs * spe + 1) <= start * spe, lr, swa_lr
    )  # anneal_epochs=0: a switch
    np.testing.assert_allclose(rec.lrs, expected)
    assert not averaged.training


def test_swa_recomputes_batchnorm_statistics_over_the_training_data(digits):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 10))
    x = digits.train.tensors[0]
    averaged = swa(net, digits, epochs=2, swa_start=1, bn_batch_size=len(x), seed=0, progress=False)
    bn, fc = averaged[1], averaged[2]
    feats = x.reshape(len(x), -1).double().numpy()
    mean, var = feats.mean(0), feats.var(0, ddof=1)  # BatchNorm keeps the unbiased variance
    np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-4, atol=1e-5)
    # the eval-mode forward pass normalises with exactly those statistics
    xt = digits.test.tensors[0].reshape(len(digits.test), -1).double().numpy()
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    h = (xt - mean) / np.sqrt(var + bn.eps) * gamma + beta
    by_hand = h @ fc.weight.detach().double().numpy().T + fc.bias.detach().double().numpy()
    with torch.no_grad():
        out = averaged(digits.test.tensors[0]).double().numpy()
    np.testing.assert_allclose(out, by_hand, rtol=1e-4, atol=1e-4)
    assert net[1].running_mean.abs().sum() == 0  # the caller's module was copied, not trained


def test_bootstrap_indices_are_seeded_draws_with_replacement():
    n, k = 500, 4
    idx = bootstrap_indices(n, k, seed=7)
    assert idx.shape == (k, n) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    for row in idx:  # with replacement: about 1 - 1/e of the rows are distinct, never all
        assert 0.55 < len(torch.unique(row)) / n < 0.72
    assert torch.equal(idx, bootstrap_indices(n, k, seed=7))
    assert not torch.equal(idx, bootstrap_indices(n, k, seed=8))
    assert all(not torch.equal(idx[i], idx[j]) for i in range(k) for j in range(i + 1, k))


def test_each_bagging_member_is_train_on_its_bootstrap_resample(digits):
    bag = bagging("mlp", digits, k=2, epochs=1, seed=3, model_kwargs=SMALL, progress=False)
    x, y = digits.train.tensors
    assert torch.equal(bag.indices, bootstrap_indices(len(x), 2, seed=3))
    for i, member in enumerate(bag):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3 + i)
            ref = create_model("mlp", input_shape=digits.input_shape, num_classes=digits.num_classes, **SMALL)
        rows = bag.indices[i]
        train(ref, TensorDataset(x[rows], y[rows]), epochs=1, seed=3 + i, progress=False)
        assert same_weights(member.state_dict(), ref.state_dict())
    ensemble = bag.ensemble()
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2


METHODS = {
    "bagging": lambda d, s: (
        bagging("mlp", d, k=2, epochs=1, seed=s, model_kwargs=SMALL, progress=False).members
    ),
    "snapshot": lambda d, s: (
        snapshot_ensemble("mlp", d, cycles=2, epochs=1, seed=s, model_kwargs=SMALL, progress=False).members
    ),
    "fge": lambda d, s: (
        fast_geometric_ensemble(
            "mlp", d, epochs=1, cycle_steps=4, pretrain_epochs=1, seed=s, model_kwargs=SMALL, progress=False
        ).members
    ),
    "swa": lambda d, s: [
        swa(
            "cnn",
            d,
            epochs=1,
            swa_start=0,
            seed=s,
            model_kwargs={"widths": (8,), "batch_norm": True, "dropout": 0.2},
            progress=False,
        )
    ],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_seed_same_weights_and_the_global_rng_is_untouched(digits, method):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = METHODS[method](digits, 0)
    assert torch.equal(torch.get_rng_state(), before)
    second = METHODS[method](digits, 0)
    other = METHODS[method](digits, 1)
    assert len(first) == len(second) == len(other)
    assert all(same_weights(a.state_dict(), b.state_dict()) for a, b in zip(first, second))
    assert not same_weights(first[0].state_dict(), other[0].state_dict())


BAD = [
    (lambda d: bagging("mlp", d, k=0, epochs=1), r"k \(members\) must be a positive integer, found 0"),
    (lambda d: snapshot_ensemble("mlp", d, cycles=0, epochs=1), r"cycles must be a positive integer"),
    (
        lambda d: snapshot_ensemble("mlp", d, cycles=18, epochs=1),
        r"cycles=18 is more than the 17 optimizer steps",
    ),
    (lambda d: snapshot_ensemble("mlp", d, cycles=7, epochs=1), r"make only 6 cycles, not 7"),
    (lambda d: snapshot_ensemble("mlp", d, cycles=2, epochs=1, schedule="cosine"), r"sets schedule itself"),
    (lambda d: swa("mlp", d, epochs=3, swa_start=3), r"swa_start=3 must lie in \[0, epochs\)"),
    (lambda d: swa("mlp", d, epochs=3, swa_start=-1), r"swa_start=-1 must lie in \[0, epochs\)"),
    (lambda d: fast_geometric_ensemble("mlp", d, epochs=1, cycle_steps=5), r"positive even integer"),
    (lambda d: fast_geometric_ensemble("mlp", d, epochs=1, cycle_steps=0), r"positive even integer"),
    (lambda d: fast_geometric_ensemble("mlp", d, epochs=1, cycle_steps=-4), r"positive even integer"),
    (
        lambda d: fast_geometric_ensemble("mlp", d, epochs=1, cycle_steps=40),
        r"17 steps, fewer than the 20 needed",
    ),
    (
        lambda d: fast_geometric_ensemble("mlp", d, epochs=1, cycle_steps=4, alpha1=0.01, alpha2=0.1),
        r"alpha2 <= alpha1",
    ),
    (lambda d: bagging("mlp", d, k=2, epochs=1, batchsize=8), r"unknown training options \['batchsize'\]"),
    (
        lambda d: bagging(nn.Linear(64, 10), d, k=1, epochs=1, model_kwargs=SMALL),
        r"model_kwargs apply to a zoo",
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_settings_raise_config_errors_that_say_what_is_wrong(digits, call, message):
    with pytest.raises(ConfigError, match=message):
        call(digits)
