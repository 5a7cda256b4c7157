"""``compare_predictions``: paired differences of accuracy and NLL with bootstrap intervals, checked
against closed forms, the normal approximation and NumPy written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.zoo import FusionRoom, compare_predictions, room_for_fusion


def one_hot_logits(predicted, classes=3, scale=4.0):
    """Logits that predict ``predicted`` (one row per sample)."""
    return torch.nn.functional.one_hot(torch.as_tensor(predicted), classes).double() * scale


def numpy_nll(logits, labels):
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels]


def test_a_model_against_itself_is_an_exact_tie():
    rng = np.random.default_rng(0)
    logits = torch.as_tensor(rng.normal(size=(50, 4)))
    labels = torch.as_tensor(rng.integers(0, 4, 50))
    c = compare_predictions(logits, logits, labels)
    assert c.accuracy_difference == 0 and c.accuracy_interval == (0.0, 0.0)
    assert c.nll_difference == 0 and c.nll_interval == (0.0, 0.0)
    assert (c.only_a, c.only_b, c.n) == (0, 0, 50)
    assert not c.accuracy_significant and "in accuracy a tie" in c.describe()


def test_always_right_against_always_wrong_is_a_sure_win():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    right, wrong = one_hot_logits(labels), one_hot_logits((labels + 1) % 3)
    c = compare_predictions(right, wrong, labels)
    assert c.accuracy_difference == 1.0 and c.accuracy_interval == (1.0, 1.0)
    assert (c.only_a, c.only_b) == (6, 0)
    assert c.accuracy_significant and "tie" not in c.describe()
    # per-sample NLL difference is the same for every sample, so the interval is that point
    d = numpy_nll(right.numpy(), labels.numpy()) - numpy_nll(wrong.numpy(), labels.numpy())
    assert c.nll_difference == pytest.approx(d.mean(), abs=1e-12)
    assert c.nll_interval == pytest.approx((d[0], d[0]), abs=1e-12)


def test_differences_and_counts_equal_numpy_and_the_interval_the_normal_approximation():
    rng = np.random.default_rng(1)
    n, classes = 2000, 5
    labels = rng.integers(0, classes, n)
    a = rng.normal(size=(n, classes))
    b = rng.normal(size=(n, classes))
    a[np.arange(n), labels] += 1.5  # A is the better model
    b[np.arange(n), labels] += 1.0
    c = compare_predictions(torch.as_tensor(a), torch.as_tensor(b), torch.as_tensor(labels), draws=4000)
    right_a, right_b = a.argmax(1) == labels, b.argmax(1) == labels
    d = right_a.astype(float) - right_b
    assert c.accuracy_difference == pytest.approx(d.mean(), abs=1e-12)
    assert (c.only_a, c.only_b) == ((right_a & ~right_b).sum(), (right_b & ~right_a).sum())
    dn = numpy_nll(a, labels) - numpy_nll(b, labels)
    assert c.nll_difference == pytest.approx(dn.mean(), rel=1e-9)
    # with 2000 samples the percentile interval is close to mean +- 1.96 standard errors
    for (low, high), diffs in ((c.accuracy_interval, d), (c.nll_interval, dn)):
        se = diffs.std(ddof=1) / np.sqrt(n)
        assert low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.15 * se + 1e-3 * abs(diffs.mean()))
        assert high == pytest.approx(diffs.mean() + 1.96 * se, abs=0.15 * se + 1e-3 * abs(diffs.mean()))
    assert c.accuracy_significant  # 1.5 against 1.0 logit margins over 2000 samples


def test_levels_nest_and_the_seed_fixes_the_result():
    rng = np.random.default_rng(2)
    labels = torch.as_tensor(rng.integers(0, 3, 300))
    a, b = (torch.as_tensor(rng.normal(size=(300, 3))) for _ in range(2))
    wide = compare_predictions(a, b, labels, level=0.99)
    narrow = compare_predictions(a, b, labels, level=0.5)
    assert wide.accuracy_interval[0] <= narrow.accuracy_interval[0] <= narrow.accuracy_interval[1]
    assert narrow.accuracy_interval[1] <= wide.accuracy_interval[1]
    assert compare_predictions(a, b, labels, seed=7) == compare_predictions(a, b, labels, seed=7)
    # the resamples are drawn in blocks; many samples (small blocks) give the same kind of answer
    big = compare_predictions(a.repeat(20, 1), b.repeat(20, 1), labels.repeat(20), draws=1000)  # 2 blocks
    assert big.accuracy_difference == pytest.approx(wide.accuracy_difference, abs=1e-12)
    assert (
        big.accuracy_interval[1] - big.accuracy_interval[0]
        < narrow.accuracy_interval[1] - narrow.accuracy_interval[0]
    )
    assert "right only A: " in wide.describe() and "99% paired bootstrap" in wide.describe()
    assert wide.as_dict()["accuracy_interval"] == list(wide.accuracy_interval)


@pytest.mark.parametrize(
    ("a", "b", "labels", "options", "message"),
    [
        (
            torch.zeros(4, 3),
            torch.zeros(5, 3),
            torch.zeros(4, dtype=torch.long),
            {},
            "4 labels for 5 samples of logits_b",
        ),
        (
            torch.zeros(4, 3),
            torch.zeros(4, 2),
            torch.zeros(4, dtype=torch.long),
            {},
            "differ in shape: (4, 3) against (4, 2)",
        ),
        (
            torch.zeros(4),
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
            {},
            "logits_a must be (samples, classes)",
        ),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4), {}, "labels must be a 1-D integer"),
        (torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), {}, "logits_a has 0 samples"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), {}, "labels must lie in [0, 3)"),
        (
            torch.zeros(4, 3, dtype=torch.long),
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
            {},
            "floating-point",
        ),
        (
            torch.zeros(4, 3),
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
            {"level": 95},
            "level must be in (0, 1)",
        ),
        (
            torch.zeros(4, 3),
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
            {"draws": 0},
            "draws must be",
        ),
    ],
)
def test_bad_inputs_are_named(a, b, labels, options, message):
    with pytest.raises(ConfigError) as err:
        compare_predictions(a, b, labels, **options)
    assert message in str(err.value)


def test_a_label_probability_of_zero_leaves_accuracy_comparable_and_nll_undefined():
    labels = torch.tensor([0, 1, 2, 1])
    votes = torch.log(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]))  # -inf where no vote
    soft = one_hot_logits(labels, scale=1.0)
    c = compare_predictions(votes, soft, labels)
    assert c.accuracy_difference == pytest.approx(0.5 - 1.0)
    assert (c.only_a, c.only_b) == (0, 2)
    assert np.isnan(c.nll_difference) and all(np.isnan(c.nll_interval))
    assert "NLL not comparable" in c.describe()
    back = type(c).from_dict({**c.as_dict(), "against": "other"})
    assert back.accuracy_interval == c.accuracy_interval and back.only_b == 2


def test_room_for_fusion_by_hand():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    #                  right on:   0  1  2  3  4  5
    a = one_hot_logits([0, 1, 2, 0, 0, 0])  # 4 of 6, wrong on 4 and 5
    b = one_hot_logits([1, 1, 2, 1, 1, 0])  # 3 of 6, right on 4
    c = one_hot_logits([1, 0, 2, 1, 0, 0])  # 1 of 6
    room = room_for_fusion([c, a, b], labels, names=["c", "a", "b"])
    assert (room.best, room.best_name, room.n) == (1, "a", 6)
    assert room.accuracies == pytest.approx((1 / 6, 4 / 6, 3 / 6))
    assert (room.best_wrong, room.fixable) == (2, 1)  # sample 5: nobody right
    assert room.oracle_accuracy == pytest.approx(5 / 6)
    assert "a is wrong on 2 of 6 samples and another model is right on 1 of them" in room.describe()
    assert FusionRoom.from_dict(room.as_dict()) == room
    # a (K, N, C) tensor works the same, with default names; equal accuracy goes to the lower NLL:
    # the same predictions made twice as sharp cost 2 x 8 nats on the two errors instead of 2 x 4
    sharper = one_hot_logits([0, 1, 2, 0, 0, 0], scale=8.0)
    tied = room_for_fusion(torch.stack([sharper, a]), labels)
    assert (tied.best_name, tied.fixable, tied.oracle_accuracy) == ("model 1", 0, pytest.approx(4 / 6))


def test_room_for_fusion_equals_numpy_on_random_models():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 400)
    logits = [rng.normal(size=(400, 5)) + 2.0 * k * np.eye(5)[labels] for k in range(4)]
    room = room_for_fusion([torch.as_tensor(z) for z in logits], torch.as_tensor(labels))
    right = np.stack([z.argmax(1) == labels for z in logits])
    best = int(np.argmax(right.mean(1)))
    assert room.best == best and room.accuracies == pytest.approx(tuple(right.mean(1)))
    assert room.best_wrong == int((~right[best]).sum())
    assert room.fixable == int((~right[best] & np.delete(right, best, 0).any(0)).sum())
    assert room.oracle_accuracy == pytest.approx(right.any(0).mean())


@pytest.mark.parametrize(
    ("models", "labels", "names", "message"),
    [
        ([torch.zeros(3, 2)], torch.tensor([0, 1, 0]), None, "at least 2 models"),
        ([torch.zeros(3, 2), torch.zeros(3, 2)], torch.tensor([0, 1, 0]), ["a", "a"], "one distinct name"),
        ([torch.zeros(3, 2), torch.zeros(3, 2)], torch.tensor([0, 1, 0]), ["a"], "one distinct name"),
        (
            [torch.zeros(3, 2), torch.zeros(3, 3)],
            torch.tensor([0, 1, 0]),
            ["a", "b"],
            "a and b differ in shape",
        ),
        ([torch.zeros(3, 2), torch.zeros(3, 2)], torch.tensor([0, 1, 2]), None, "labels must lie in [0, 2)"),
        (
            [torch.zeros(3, 2), torch.zeros(4, 2)],
            torch.tensor([0, 1, 0]),
            ["a", "b"],
            "3 labels for 4 samples of b",
        ),
    ],
)
def test_room_for_fusion_bad_inputs(models, labels, names, message):
    with pytest.raises(ConfigError) as err:
        room_for_fusion(models, labels, names=names)
    assert message in str(err.value)
