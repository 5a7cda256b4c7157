"""Distillation: the KD loss against NumPy formulas written here, its limiting cases, validation,
the report's arithmetic, and (slow) the MNIST-1D figures against a scratch baseline."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse.data import load
from modelfuse.ensemble.distill import (
    KDLoss,
    distill,
    distill_report,
    kd_loss,
    teacher_logits,
    teacher_mixture,
    teacher_weights,
)
from modelfuse.errors import ConfigError
from modelfuse.zoo import build_pool, create_model, evaluate, train


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kd(s, z, y, w, T, alpha):
    """Hinton et al. 2015 with a mixture of teachers: alpha T^2 KL(sum_k w_kn p_k^T || q^T) + (1 - alpha) CE.

    ``w`` is (K, N): one weight per teacher and sample."""
    p = np.einsum("kn,knc->nc", w, np_softmax(z / T))
    q = np_softmax(s / T)
    kl = (p * (np.log(p) - np.log(q))).sum(1).mean()
    ce = -np.log(np_softmax(s)[np.arange(len(y)), y]).mean()
    return alpha * T**2 * kl + (1 - alpha) * ce


@pytest.fixture(scope="module")
def hand():
    """3 teachers' and a student's logits on 5 samples of 4 classes, with labels."""
    rng = np.random.default_rng(0)
    z = rng.normal(scale=2.0, size=(3, 5, 4))
    s = rng.normal(scale=2.0, size=(5, 4))
    y = rng.integers(0, 4, 5)
    return s, z, y


def as_t(*arrays):
    return [torch.from_numpy(np.asarray(a)) for a in arrays]


@pytest.mark.parametrize(("T", "alpha"), [(1.0, 0.5), (3.0, 0.7), (6.0, 1.0)])
def test_kd_loss_with_fixed_teacher_weights_is_the_formula(hand, T, alpha):
    s, z, y = hand
    raw = np.array([1.0, 3.0, 0.0])  # normalised to 1/4, 3/4, 0
    w = np.repeat((raw / raw.sum())[:, None], len(y), 1)
    st, zt, yt = as_t(s, z, y)
    got = kd_loss(st, zt, yt, temperature=T, alpha=alpha, weights=raw.tolist())
    assert got.item() == pytest.approx(np_kd(s, z, y, w, T, alpha), rel=1e-10)
    equal = np.full((3, len(y)), 1 / 3)
    got = kd_loss(st, zt, yt, temperature=T, alpha=alpha)  # None: equal weights
    assert got.item() == pytest.approx(np_kd(s, z, y, equal, T, alpha), rel=1e-10)


def test_the_soft_term_carries_the_t_squared_factor(hand):
    s, z, y = hand
    st, zt, yt = as_t(s, z, y)
    equal = np.full((3, len(y)), 1 / 3)
    for T in (2.0, 5.0):
        kl = np_kd(s, z, y, equal, T, 1.0) / T**2
        assert kd_loss(st, zt, yt, temperature=T, alpha=1.0).item() == pytest.approx(T**2 * kl, rel=1e-10)


def test_confidence_and_true_label_weights_by_hand(hand):
    s, z, y = hand
    p = np_softmax(z)  # confidences are read at temperature 1
    conf = p.max(-1)
    conf = conf / conf.sum(0, keepdims=True)
    true = p[:, np.arange(len(y)), y]
    true = true / true.sum(0, keepdims=True)
    st, zt, yt = as_t(s, z, y)
    np.testing.assert_allclose(teacher_weights(zt, weights="confidence").numpy(), conf, rtol=1e-12)
    np.testing.assert_allclose(teacher_weights(zt, yt, weights="true_label").numpy(), true, rtol=1e-12)
    for name, w in (("confidence", conf), ("true_label", true)):
        got = kd_loss(st, zt, yt, temperature=2.5, alpha=0.6, weights=name)
        assert got.item() == pytest.approx(np_kd(s, z, y, w, 2.5, 0.6), rel=1e-10)
    mix = teacher_mixture(zt, yt, temperature=2.5, weights="true_label").exp().numpy()
    np.testing.assert_allclose(mix, np.einsum("kn,knc->nc", true, np_softmax(z / 2.5)), rtol=1e-12)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def small_teachers(data):
    """Two untrained teachers of different architectures (their quality does not matter here)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        a = create_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes, hidden=(16,))
        b = create_model("cnn", input_shape=data.input_shape, num_classes=data.num_classes, widths=(8,))
    return [a, b]


def test_alpha_zero_is_plain_cross_entropy_training(digits):
    out = distill(
        "mlp",
        small_teachers(digits),
        digits,
        epochs=2,
        seed=5,
        alpha=0.0,
        model_kwargs={"hidden": (32,)},
        scratch=True,
        progress=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ref = create_model(
            "mlp", input_shape=digits.input_shape, num_classes=digits.num_classes, hidden=(32,)
        )
    train(ref, digits, epochs=2, seed=5, progress=False)
    for model in (out.student, out.scratch):
        sd = model.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    assert out.teacher_logits.shape == (2, len(digits.train), 10)


def test_a_student_equal_to_its_only_teacher_has_zero_loss_and_gradient(digits):
    teacher = small_teachers(digits)[0]
    student = copy.deepcopy(teacher)
    x, y = digits.train.tensors
    cached = teacher_logits([teacher], TensorDataset(x, y))  # (1, N, C)
    batch = (x[:200], y[:200], cached.transpose(0, 1)[:200])
    loss = KDLoss(temperature=1.0, alpha=1.0, weights=None, teachers=1)(student, batch)
    loss.backward()
    assert abs(loss.item()) < 1e-7
    assert max(p.grad.abs().max().item() for p in student.parameters()) < 1e-6


def test_distillation_trains_the_student_towards_the_teachers(digits):
    teachers = small_teachers(digits)
    for t in teachers:
        train(t, digits, epochs=3, seed=0, progress=False)
    x = digits.test.tensors[0]
    out = distill("mlp", teachers, digits, epochs=3, seed=0, alpha=1.0, temperature=2.0, progress=False)
    with torch.no_grad():
        target = teacher_mixture(torch.stack([t.eval()(x) for t in teachers]), temperature=2.0).exp()
        untrained = create_model("mlp", input_shape=digits.input_shape, num_classes=digits.num_classes)
        before = torch.softmax(untrained(x) / 2.0, -1)
        after = torch.softmax(out.student(x) / 2.0, -1)

    def kl(q):
        return (target * (target.log() - q.log())).sum(1).mean().item()

    assert kl(after) < 0.2 * kl(before)  # trained on soft targets only, it matches them on held-out data
    assert all(not t.training for t in teachers)


def test_report_fractions_follow_the_formula(digits):
    teachers = small_teachers(digits)
    for i, t in enumerate(teachers):
        train(t, digits, epochs=1 + i, seed=i, progress=False)
    student = small_teachers(digits)[0]
    train(student, digits, epochs=2, seed=9, progress=False)
    rep = distill_report(student, teachers, digits, weights=[1.0, 2.0])
    val = [evaluate(t, digits.val) for t in teachers]
    test = [evaluate(t, digits.test) for t in teachers]
    best = max(range(2), key=lambda k: (val[k]["accuracy"], -val[k]["nll"]))
    assert rep.best_index == best
    assert rep.best_teacher["accuracy"] == pytest.approx(test[best]["accuracy"])
    assert rep.best_teacher["nll"] == pytest.approx(test[best]["nll"], rel=1e-5)
    x, y = (t.numpy() for t in digits.test.tensors)
    with torch.no_grad():
        probs = np.stack([np_softmax(t(torch.from_numpy(x)).double().numpy()) for t in teachers])
    mix = (np.array([1 / 3, 2 / 3])[:, None, None] * probs).sum(0)
    ens = {"accuracy": (mix.argmax(1) == y).mean(), "nll": -np.log(mix[np.arange(len(y)), y]).mean()}
    assert rep.ensemble["accuracy"] == pytest.approx(ens["accuracy"])
    assert rep.ensemble["nll"] == pytest.approx(ens["nll"], rel=1e-5)
    s = evaluate(student, digits.test)
    for m in ("accuracy", "nll"):
        assert rep.student[m] == pytest.approx(s[m], rel=1e-5)
        gap = ens[m] - rep.best_teacher[m]
        if (gap > 0) if m == "accuracy" else (gap < 0):
            expected = (s[m] - rep.best_teacher[m]) / gap
            assert rep.gap_closed[m] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        else:  # the ensemble is not better than the best teacher: no gap to close
            assert math.isnan(rep.gap_closed[m])
    assert "student" in rep.table() and rep.scratch is None


def test_gap_share_is_undefined_where_the_ensemble_is_not_better():
    """By hand: best 0.90, ensemble 0.95, student 0.92 closes (0.92 - 0.90) / 0.05 = 40% of the
    accuracy gap; NLL best 0.30, ensemble 0.20, student 0.25 closes 50%. An ensemble worse than
    the best teacher (0.88 accuracy, 0.35 NLL) leaves no gap: NaN, printed n/a (not 200%)."""
    from modelfuse.ensemble.distill import _fraction, _gap_cell

    assert _fraction(0.92, 0.90, 0.95, higher=True) == pytest.approx(0.4)
    assert _fraction(0.25, 0.30, 0.20, higher=False) == pytest.approx(0.5)
    assert math.isnan(_fraction(0.86, 0.90, 0.88, higher=True))
    assert math.isnan(_fraction(0.40, 0.30, 0.35, higher=False))
    assert math.isnan(_fraction(0.90, 0.90, 0.90, higher=True))
    assert _gap_cell(math.nan).strip() == "n/a" and _gap_cell(0.4).strip() == "40.0%"


class Head(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


BAD = [
    (lambda d, t: distill("mlp", [], d, epochs=1), r"at least one teacher"),
    (
        lambda d, t: distill("mlp", [Head(7)], d, epochs=1),
        r"teachers give 7 class scores but 'digits' has 10",
    ),
    (lambda d, t: distill("mlp", [t[0], Head(7)], d, epochs=1), r"teacher 1 \(Head\) gives 7 class scores"),
    (lambda d, t: distill(Head(5), t, d, epochs=1), r"the student \(Head\) gives outputs of shape \(5,\)"),
    (lambda d, t: distill("mlp", t, d, epochs=1, temperature=0), r"temperature must be a positive"),
    (lambda d, t: distill("mlp", t, d, epochs=1, temperature=-2.0), r"temperature must be a positive"),
    (lambda d, t: distill("mlp", t, d, epochs=1, alpha=1.5), r"alpha .* must lie in \[0, 1\], found 1.5"),
    (lambda d, t: distill("mlp", t, d, epochs=1, alpha=-0.1), r"must lie in \[0, 1\], found -0.1"),
    (lambda d, t: distill("mlp", t, d, epochs=1, weights=[1.0]), r"1 weights for 2 teachers"),
    (
        lambda d, t: distill("mlp", t, d, epochs=1, weights=[1.0, -1.0]),
        r"must be non-negative; teacher\(s\) \[1\]",
    ),
    (lambda d, t: distill("mlp", t, d, epochs=1, weights=[0.0, 0.0]), r"sum to 0"),
    (lambda d, t: distill("mlp", t, d, epochs=1, weights="vote"), r"unknown teacher weighting 'vote'"),
    (lambda d, t: distill("mlp", t, d, epochs=1, loss=None), r"distill sets loss itself"),
    (
        lambda d, t: distill("mlp", t, d, epochs=1, temprature=2.0),
        r"unknown training options \['temprature'\]",
    ),
    (
        lambda d, t: kd_loss(torch.zeros(3, 10), torch.zeros(2, 3, 8), torch.zeros(3, dtype=torch.long)),
        r"do not match the teachers'",
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_inputs_raise_config_errors_that_say_what_is_wrong(digits, call, message):
    with pytest.raises(ConfigError, match=message):
        call(digits, small_teachers(digits))


# MNIST-1D figures: 5 cnn1d teachers (the pool recipe: Adam 1e-3, constant rate, 20 epochs) distilled
# into one cnn1d. Student and scratch twin share every setting but the loss: 20 epochs, Adam 1e-3 with
# a cosine schedule, seed 100. T and alpha were picked by the students' mean validation NLL over seeds
# 101-103 among T in {2, 4} x alpha in {0.5, 0.9}.
FIG_EPOCHS = 20
FIG_KD = {"temperature": 2.0, "alpha": 0.5, "schedule": "cosine"}


@pytest.mark.slow
def test_distilled_cnn1d_beats_its_scratch_twin_on_mnist1d():
    data = load("mnist1d")
    start = time.perf_counter()
    pool = build_pool("cnn1d", data, k=5, epochs=FIG_EPOCHS, cache=True, progress=False)
    pool_seconds = time.perf_counter() - start
    start = time.perf_counter()
    out = distill(
        "cnn1d", pool.members, data, epochs=FIG_EPOCHS, seed=100, scratch=True, progress=False, **FIG_KD
    )
    rep = out.report
    print(f"\nMNIST-1D, cnn1d, {FIG_EPOCHS} epochs, {FIG_KD}, student and scratch seed 100")
    print(f"pool of 5 in {pool_seconds:.0f} s, student + scratch in {time.perf_counter() - start:.0f} s")
    print(rep.table())
    assert rep.student["nll"] <= rep.scratch["nll"], rep.table()
    assert rep.student["accuracy"] >= rep.scratch["accuracy"] - 0.01, rep.table()
    assert math.isfinite(rep.gap_closed["nll"])
