"""Fitted combiners on cached predictions, against NumPy / SciPy references written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from modelfuse.ensemble import GreedySelection, LearnedWeights
from modelfuse.errors import ConfigError


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_mixture_nll(p, w, y):
    """-mean_n log sum_k w_k p_k(y_n)."""
    return -np.log(np.einsum("k,kn->n", w, p[:, np.arange(len(y)), y])).mean()


@pytest.fixture
def pool():
    """5 members of varying quality on 300 validation samples of 4 classes, one pure noise."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    signal = np.eye(4)[y] * 2.0
    outputs = np.stack([signal * q + rng.standard_normal((300, 4)) * 1.5 for q in (1.0, 0.8, 1.2, 0.6, 0.0)])
    return torch.from_numpy(outputs), torch.from_numpy(y)


def test_learned_weights_reach_the_simplex_optimum(pool):
    outputs, labels = pool
    fit = LearnedWeights().fit(outputs, labels)
    w = fit.weights_.numpy()
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    p, y = np_softmax(outputs.numpy()), labels.numpy()
    k = len(p)
    ref = minimize(
        lambda v: np_mixture_nll(p, v, y),
        np.full(k, 1 / k),
        method="SLSQP",
        bounds=[(0, 1)] * k,
        constraints=[{"type": "eq", "fun": lambda v: v.sum() - 1}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert fit.nll_ == pytest.approx(np_mixture_nll(p, w, y), rel=1e-9)
    assert fit.nll_ <= ref.fun + 1e-6  # as good as SciPy's constrained optimum
    assert fit.nll_ <= np_mixture_nll(p, np.full(k, 1 / k), y)  # at least as good as the plain mean
    assert w[4] < 0.02  # the noise member gets (almost) nothing
    ensemble = fit.ensemble([torch.nn.Identity()] * k)
    assert torch.allclose(ensemble.weights, fit.weights_)


def test_greedy_selection_trajectory_is_the_nll_of_its_picks(pool):
    outputs, labels = pool
    sel = GreedySelection(steps=30).fit(outputs, labels)
    p, y = np_softmax(outputs.numpy()), labels.numpy()
    k = len(p)
    singles = [np_mixture_nll(p, np.eye(k)[i], y) for i in range(k)]
    assert sel.picks_[0] == int(np.argmin(singles))
    assert len(sel.trajectory_) == len(sel.picks_) <= 30
    for step, value in enumerate(sel.trajectory_):
        counts = np.bincount(sel.picks_[: step + 1], minlength=k)
        assert value == pytest.approx(np_mixture_nll(p, counts / counts.sum(), y), rel=1e-12)
    assert all(b <= a for a, b in zip(sel.trajectory_, sel.trajectory_[1:]))  # non-increasing
    assert sel.trajectory_[-1] < singles[sel.picks_[0]]  # the ensemble beats the best single member
    counts = np.bincount(sel.picks_, minlength=k)
    np.testing.assert_allclose(sel.weights_.numpy(), counts / counts.sum())
    assert sel.weights_[4] == 0  # never the noise member


@pytest.mark.parametrize("fitter", [LearnedWeights(), GreedySelection()])
def test_fitting_bad_inputs_are_clear_errors(pool, fitter):
    outputs, labels = pool
    with pytest.raises(ConfigError, match="299 labels for 300 samples"):
        fitter.fit(outputs, labels[:299])
    with pytest.raises(ConfigError, match=r"\(members, samples, classes\)"):
        fitter.fit(outputs[0], labels)
    bad = outputs.clone()
    bad[1, 3, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        fitter.fit(bad, labels)
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 3\]"):
        fitter.fit(outputs, labels + 4)


def test_greedy_selection_needs_a_step():
    with pytest.raises(ConfigError, match="at least one step"):
        GreedySelection(steps=0)
