"""Fitted combiners on cached predictions, against NumPy / SciPy references written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from modelfuse.ensemble import Ensemble, GreedySelection, LearnedWeights, Stacking, TemperatureScaling
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


@pytest.mark.parametrize(
    "fitter",
    [LearnedWeights(), LearnedWeights(temperature=True), GreedySelection(), Stacking(), Stacking("mlp")],
)
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
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 4\)"):
        fitter.fit(outputs, labels + 4)


def test_greedy_selection_needs_a_step():
    with pytest.raises(ConfigError, match="at least one step"):
        GreedySelection(steps=0)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_nll(log_p, y):
    return -log_p[np.arange(len(y)), y].mean()


def np_best_temperature(scores, y):
    """The temperature minimising the NLL of softmax(scores / T), by SciPy's bounded scalar search."""
    return minimize_scalar(
        lambda t: np_nll(np_log_softmax(scores / t), y),
        bounds=(0.05, 20),
        method="bounded",
        options={"xatol": 1e-10},
    )


def test_temperature_scaling_minimises_the_nll_over_t(pool):
    outputs, labels = pool
    scores, y = outputs[0] * 3.0, labels.numpy()  # an over-confident member: T should come out > 1
    fit = TemperatureScaling().fit(scores, labels)
    z = scores.numpy()
    ref = np_best_temperature(z, y)
    assert fit.temperature_ == pytest.approx(ref.x, rel=1e-4)
    assert fit.temperature_ > 1
    assert fit.nll_ == pytest.approx(ref.fun, rel=1e-8)
    assert fit.start_nll_ == pytest.approx(np_nll(np_log_softmax(z), y), rel=1e-12)
    calibrated = fit.transform(scores)
    np.testing.assert_allclose(calibrated.numpy(), np_log_softmax(z / fit.temperature_), atol=1e-6)
    assert torch.equal(calibrated.argmax(1), scores.argmax(1))  # accuracy never changes


def test_learned_weights_with_temperature_scale_the_weighted_mixture(pool):
    outputs, labels = pool
    plain = LearnedWeights().fit(outputs, labels)
    fit = LearnedWeights(temperature=True).fit(outputs, labels)
    np.testing.assert_allclose(fit.weights_.numpy(), plain.weights_.numpy())
    p, y = np_softmax(outputs.numpy()), labels.numpy()
    mixture = np.log(np.einsum("k,knc->nc", fit.weights_.numpy(), p))
    ref = np_best_temperature(mixture, y)
    assert fit.temperature_ == pytest.approx(ref.x, rel=1e-4)
    assert fit.nll_ == pytest.approx(ref.fun, rel=1e-8)
    assert fit.nll_ <= plain.nll_ <= fit.start_nll_
    module = fit.ensemble([torch.nn.Identity()] * len(outputs))
    assert module.temperature == fit.temperature_
    x = outputs[:, :7]
    np.testing.assert_allclose(
        module.combine_outputs(x.float()).numpy(),
        np_log_softmax(
            np.log(np.einsum("k,knc->nc", fit.weights_.numpy(), np_softmax(x.numpy()))) / fit.temperature_
        ),
        atol=1e-5,
    )


def test_ensemble_temperature_is_checked():
    with pytest.raises(ConfigError, match="positive finite"):
        Ensemble([torch.nn.Identity()], temperature=0.0)
    with pytest.raises(ConfigError, match="regression"):
        Ensemble([torch.nn.Identity()], "median", temperature=2.0)


def np_stacking_features(outputs):
    """Member log-probabilities side by side: sample n's row is [log p_1(n), ..., log p_K(n)]."""
    lp = np.maximum(np_log_softmax(outputs), -30.0)
    return np.concatenate(list(lp), axis=1)


def test_logistic_stacking_is_out_of_fold_scikit_learn(pool):
    outputs, labels = pool
    y = labels.numpy()
    fit = Stacking(folds=4, seed=3, cs=(0.1, 1.0)).fit(outputs, labels)
    x = np_stacking_features(outputs.numpy())
    cv = {}
    folds = list(StratifiedKFold(4, shuffle=True, random_state=3).split(x, y))
    for c in (0.1, 1.0):
        oof = np.empty((len(y), 4))
        for fit_idx, held_idx in folds:
            lr = LogisticRegression(C=c, tol=1e-8, max_iter=5000).fit(x[fit_idx], y[fit_idx])
            oof[held_idx] = lr.predict_log_proba(x[held_idx])
        cv[c] = (np_nll(oof, y), oof)
    best = min(cv, key=lambda c: cv[c][0])
    assert fit.c_ == best
    assert fit.cv_nll_ == pytest.approx({c: v[0] for c, v in cv.items()}, rel=1e-5)
    np.testing.assert_allclose(fit.oof_log_probs_.numpy(), cv[best][1], rtol=1e-4, atol=1e-5)
    full = LogisticRegression(C=best, tol=1e-8, max_iter=5000).fit(x, y)
    np.testing.assert_allclose(
        fit.predict_log_proba(outputs).numpy(), full.predict_log_proba(x), rtol=1e-4, atol=1e-5
    )
    assert fit.mean_nll_ == pytest.approx(np_nll(np.log(np_softmax(outputs.numpy()).mean(0)), y), rel=1e-12)
    # the out-of-fold estimate is at least as good as the plain mean (which the noise member drags down)
    assert fit.oof_nll_ <= fit.mean_nll_
    # the module runs members then the meta-learner, equal to predict_log_proba
    module = fit.ensemble([torch.nn.Identity()] * len(outputs))
    np.testing.assert_allclose(
        module.combine_outputs(outputs[:, :20].float()).numpy(), full.predict_log_proba(x[:20]), atol=1e-4
    )


def test_logistic_stacking_of_a_binary_task():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    outputs = np.stack([np.eye(2)[y] * q + rng.standard_normal((200, 2)) for q in (1.5, 1.0, 0.5)])
    fit = Stacking(cs=(1.0,)).fit(torch.from_numpy(outputs), torch.from_numpy(y))
    x = np_stacking_features(outputs)
    full = LogisticRegression(C=1.0, tol=1e-8, max_iter=5000).fit(x, y)
    np.testing.assert_allclose(
        fit.predict_log_proba(torch.from_numpy(outputs)).numpy(), full.predict_log_proba(x), atol=1e-6
    )


def test_mlp_stacking_beats_the_plain_mean_out_of_fold_and_is_seeded(pool):
    outputs, labels = pool
    a = Stacking("mlp", folds=3, seed=0, epochs=60).fit(outputs, labels)
    b = Stacking("mlp", folds=3, seed=0, epochs=60).fit(outputs, labels)
    assert a.oof_nll_ == b.oof_nll_
    assert torch.equal(a.predict_log_proba(outputs), b.predict_log_proba(outputs))
    assert a.oof_nll_ <= a.mean_nll_
    assert a.c_ is None and a.cv_nll_ == {}
    assert a.oof_log_probs_.shape == (300, 4)
    assert torch.allclose(a.oof_log_probs_.exp().sum(1), torch.ones(300, dtype=torch.float64))


def test_stacking_bad_settings_are_clear_errors(pool):
    outputs, labels = pool
    with pytest.raises(ConfigError, match="unknown meta-learner 'tree'"):
        Stacking("tree").fit(outputs, labels)
    with pytest.raises(ConfigError, match="folds >= 2"):
        Stacking(folds=1).fit(outputs, labels)
    few = labels.clone()
    few[few == 2] = 1
    few[0] = 2
    with pytest.raises(ConfigError, match="class 2 has 1 validation samples, fewer than folds=5"):
        Stacking().fit(outputs, few)
    with pytest.raises(ConfigError, match="not fitted"):
        Stacking().predict_log_proba(outputs)
    fit = Stacking(cs=(1.0,)).fit(outputs, labels)
    with pytest.raises(ConfigError, match="5 members over 4 classes"):
        fit.predict_log_proba(outputs[:, :, :3])
    with pytest.raises(ConfigError, match="fitted on 5 members, given 2"):
        fit.ensemble([torch.nn.Identity()] * 2)
