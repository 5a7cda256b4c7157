"""Ensemble combiners and metrics against NumPy written here from their definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from modelfuse.ensemble import Ensemble, get_combiner, list_combiners, metrics
from modelfuse.errors import ConfigError, EnsembleError, RegistryError


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_softmax(z):
    return np.log(np_softmax(z))


class Fixed(nn.Module):
    """A 'trained model' that returns fixed outputs (rows picked by the integer input)."""

    def __init__(self, outputs):
        super().__init__()
        self.register_buffer("outputs", torch.as_tensor(outputs, dtype=torch.float64))

    def forward(self, idx):
        return self.outputs[idx]


def members_of(outputs):
    return [Fixed(o) for o in outputs]


@pytest.fixture
def logits():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 50, 6)) * 2


WEIGHTS = [None, [0.1, 0.2, 0.3, 0.4], [0.0, 1.0, 3.0, 0.0]]


def np_weights(w, k):
    w = np.full(k, 1.0 / k) if w is None else np.asarray(w, float) / np.sum(w)
    return w


@pytest.mark.parametrize("weights", WEIGHTS)
def test_probability_combiners_match_their_definitions(logits, weights):
    k = len(logits)
    w = np_weights(weights, k)
    idx = torch.arange(logits.shape[1])
    want = {
        "mean_prob": np.log(np.einsum("k,knc->nc", w, np_softmax(logits))),
        "mean_logits": np_log_softmax(np.einsum("k,knc->nc", w, logits)),
        "geometric_mean": np_log_softmax(np.einsum("k,knc->nc", w, np_log_softmax(logits))),
    }
    for name, ref in want.items():
        got = Ensemble(members_of(logits), name, weights)(idx)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12, err_msg=name)


def test_vote_counts_weighted_votes_and_breaks_ties_by_the_lowest_class():
    # 3 members, 2 rows, 3 classes; row 0: votes 2, 0, 2 -> classes 0 and 2 tie
    outputs = np.array(
        [
            [[5.0, 0.0, 1.0], [0.0, 3.0, 1.0]],
            [[0.0, 0.0, 5.0], [0.0, 3.0, 1.0]],
            [[4.0, 0.0, 1.0], [9.0, 0.0, 1.0]],
            [[0.0, 1.0, 5.0], [0.0, 0.0, 1.0]],
        ]
    )
    e = Ensemble(members_of(outputs), "vote")
    got = e(torch.arange(2)).exp()
    np.testing.assert_allclose(got.numpy(), [[0.5, 0.0, 0.5], [0.25, 0.5, 0.25]])
    assert e(torch.arange(2)).argmax(-1).tolist() == [0, 1]  # the tie goes to class 0
    weighted = Ensemble(members_of(outputs), "vote", [1, 1, 1, 3])(torch.arange(2)).exp()
    np.testing.assert_allclose(weighted.numpy(), [[2 / 6, 0, 4 / 6], [1 / 6, 2 / 6, 3 / 6]])


def test_max_confidence_takes_the_most_confident_member_per_row(logits):
    idx = torch.arange(logits.shape[1])
    got = Ensemble(members_of(logits), "max_confidence")(idx).numpy()
    logp = np_log_softmax(logits)
    best = logp.max(-1).argmax(0)
    np.testing.assert_allclose(got, logp[best, np.arange(logits.shape[1])], rtol=1e-12)
    with pytest.raises(ConfigError, match="does not use member weights"):
        Ensemble(members_of(logits), "max_confidence", [1, 1, 1, 1])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_median_equals_numpy_with_equal_weights(k):
    rng = np.random.default_rng(k)
    values = rng.standard_normal((k, 30, 2))
    values[:, :5] = np.round(values[:, :5])  # ties
    got = Ensemble(members_of(values), "median")(torch.arange(30)).numpy()
    np.testing.assert_allclose(got, np.median(values, axis=0), rtol=1e-12)
    mean = Ensemble(members_of(values), "mean")(torch.arange(30)).numpy()
    np.testing.assert_allclose(mean, values.mean(0), rtol=1e-12)


def test_weighted_median_by_hand():
    values = np.array([[[1.0]], [[3.0]], [[2.0]], [[10.0]]])  # 4 members, 1 row, 1 output

    def med(w):
        return Ensemble(members_of(values), "median", w)(torch.arange(1)).item()

    assert med([1, 1, 1, 1]) == 2.5  # 1 2 | 3 10
    assert med([3, 1, 1, 1]) == 1.5  # weight of 1 reaches 1/2 exactly: mean with the next value (2)
    assert med([4, 1, 1, 1]) == 1.0
    assert med([1, 0, 1, 2]) == 6.0  # 1 and 2 hold 1/2, the zero-weight 3 is skipped: (2 + 10) / 2
    assert med([0, 0, 0, 1]) == 10.0


@pytest.mark.parametrize("name", ["mean_prob", "mean_logits", "geometric_mean", "vote", "max_confidence"])
def test_an_ensemble_of_one_or_of_copies_is_the_member(logits, name):
    idx = torch.arange(logits.shape[1])
    single = Ensemble(members_of(logits[:1]), name)(idx)
    copies = Ensemble(members_of(np.repeat(logits[:1], 3, axis=0)), name)(idx)
    ref = np_log_softmax(logits[0])
    if name == "vote":
        with np.errstate(divide="ignore"):  # classes without votes: log 0 = -inf
            ref = np.log(np.eye(logits.shape[2])[logits[0].argmax(-1)])
    np.testing.assert_allclose(single.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(copies.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_members_are_frozen_and_stay_in_eval_mode():
    torch.manual_seed(0)
    member = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    member.train()
    e = Ensemble([member], "mean_logits")
    e.train()
    x = torch.randn(16, 4)
    first = e(x)
    assert torch.equal(first, e(x))  # no dropout, no BatchNorm update
    assert not member.training and e.training
    assert not any(p.requires_grad for p in e.parameters())
    assert torch.equal(member.eval()(x).log_softmax(-1), first)


def test_bad_members_and_weights_are_clear_errors():
    ten, nine = nn.Linear(4, 10), nn.Linear(4, 9)
    with pytest.raises(
        EnsembleError, match=r"member 1 \(Linear\) gives outputs of shape \(2, 9\).*\(2, 10\)"
    ):
        Ensemble([ten, nine])(torch.randn(2, 4))
    with pytest.raises(ConfigError, match="at least one member"):
        Ensemble([])
    with pytest.raises(ConfigError, match="3 weights for 2 members"):
        Ensemble([ten, ten], weights=[1, 2, 3])
    with pytest.raises(ConfigError, match=r"non-negative; member\(s\) \[1\]"):
        Ensemble([ten, ten], weights=[1, -1])
    with pytest.raises(ConfigError, match="sum to 0"):
        Ensemble([ten, ten], weights=[0, 0])
    with pytest.raises(ConfigError, match="finite"):
        Ensemble([ten, ten], weights=[1, float("nan")])
    with pytest.raises(ConfigError, match=r"not a torch\.nn\.Module"):
        Ensemble([ten, "model.pt"])
    with pytest.raises(RegistryError, match="mean_prob"):
        Ensemble([ten], "mean_probs")
    with pytest.raises(EnsembleError, match=r"\(K, N, classes\)"):
        Ensemble([ten], "mean_prob").combine_outputs(torch.randn(1, 5))


def test_every_combiner_is_registered_with_a_task():
    assert set(list_combiners()) >= {
        "mean_prob",
        "mean_logits",
        "geometric_mean",
        "vote",
        "max_confidence",
        "mean",
        "median",
    }
    for name in list_combiners():
        assert get_combiner(name).task in ("classification", "regression")


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def np_ece(p, y, bins):
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return total


def test_metrics_match_their_definitions():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((200, 5)) * 3
    y = rng.integers(0, 5, 200)
    p = np_softmax(z)
    logp = torch.from_numpy(np.log(p))
    labels = torch.from_numpy(y)
    assert metrics.accuracy(logp, labels) == pytest.approx((p.argmax(1) == y).mean())
    assert metrics.nll(logp, labels) == pytest.approx(-np.log(p[np.arange(200), y]).mean())
    assert metrics.brier(logp, labels) == pytest.approx(((p - np.eye(5)[y]) ** 2).sum(1).mean())
    for bins in (1, 10, 15):
        assert metrics.ece(logp, labels, bins) == pytest.approx(np_ece(p, y, bins))
    preds = torch.from_numpy(rng.integers(0, 3, (4, 100)))
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    want = np.mean([(preds[i] != preds[j]).double().mean().item() for i, j in pairs])
    assert metrics.disagreement(preds) == pytest.approx(want)
    assert metrics.disagreement(preds[:1]) == 0.0
    with pytest.raises(ConfigError, match="labels must lie in"):
        metrics.nll(logp, labels + 5)
    with pytest.raises(ConfigError, match="one label per sample"):
        metrics.accuracy(logp, labels[:10])
