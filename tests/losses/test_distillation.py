"""Multi-teacher distillation: the KD term, every weighting and the feature term against NumPy formulas
written here from the papers' definitions, learned weights on a problem with a known answer, hooks that
do not leak, a heterogeneous pair distilled on digits through zoo.train, and the bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from modelfuse.data import load
from modelfuse.errors import ConfigError, FusionError, LossFusionError, RegistryError
from modelfuse.losses import (
    MultiTeacherDistillation,
    distillation_loss,
    get_teacher_weighting,
    list_teacher_weightings,
)
from modelfuse.zoo import create_model, evaluate, train


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kd(s, z, y, w, T, alpha):
    """Hinton et al. 2015 with a mixture of teachers, by hand: alpha T^2 KL(sum_k w_kn p_k^T || q^T)
    + (1 - alpha) CE over the labelled samples (y >= 0). ``w`` is (K, N)."""
    p = np.einsum("kn,knc->nc", w, np_softmax(z / T))
    q = np_softmax(s / T)
    kl = (p * (np.log(p) - np.log(q))).sum(1).mean()
    has = y >= 0
    ce = -np.log(np_softmax(s[has])[np.arange(has.sum()), y[has]]).mean()
    return alpha * T**2 * kl + (1 - alpha) * ce


def linear_teachers(seed=0, k=2, d=6, c=4, scale=1.5):
    """K linear teachers with known weights, so their logits are computable in NumPy."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        lin = nn.Linear(d, c).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64) * scale)
            lin.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        out.append(lin)
    return out


def np_logits(teachers, x):
    return np.stack([x @ t.weight.detach().numpy().T + t.bias.detach().numpy() for t in teachers])


@pytest.fixture
def batch():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 6))
    s = rng.normal(scale=2.0, size=(7, 4))
    y = rng.integers(0, 4, 7)
    return x, s, y


def t64(a):
    return torch.from_numpy(np.asarray(a))


def test_two_teachers_fixed_weights_is_hintons_formula_by_hand(batch):
    x, s, y = batch
    teachers = linear_teachers()
    z = np_logits(teachers, x)
    w = np.repeat(np.array([[0.25], [0.75]]), len(y), 1)  # [1, 3] normalised
    kd = MultiTeacherDistillation(teachers, temperature=2.0, alpha=0.5, weights=[1.0, 3.0])
    got = kd(t64(s), t64(x), t64(y))
    assert got.item() == pytest.approx(np_kd(s, z, y, w, 2.0, 0.5), rel=1e-10)
    np.testing.assert_allclose(kd.weights_.numpy(), [0.25, 0.75], rtol=1e-12)
    # the same formula from precomputed logits, as a plain function
    fn = distillation_loss(t64(s), t64(z), t64(y), temperature=2.0, alpha=0.5, weights=[1.0, 3.0])
    assert fn.item() == pytest.approx(got.item(), rel=1e-12)
    # the T^2 factor: distillation only, at two temperatures
    for T in (1.0, 5.0):
        kl = np_kd(s, z, y, w, T, 1.0) / T**2
        f = distillation_loss(t64(s), t64(z), temperature=T, alpha=1.0, weights=[1.0, 3.0])
        assert f.item() == pytest.approx(T**2 * kl, rel=1e-10)


def test_labels_count_only_where_they_exist(batch):
    x, s, y = batch
    teachers = linear_teachers()
    z = np_logits(teachers, x)
    y_missing = y.copy()
    y_missing[[1, 4]] = -1  # two samples without a label
    equal = np.full((2, len(y)), 0.5)
    kd = MultiTeacherDistillation(teachers, temperature=3.0, alpha=0.3)
    got = kd(t64(s), t64(x), t64(y_missing)).item()
    assert got == pytest.approx(np_kd(s, z, y_missing, equal, 3.0, 0.3), rel=1e-10)
    soft_only = 0.3 * 9.0 * (np_kd(s, z, y, equal, 3.0, 1.0) / 9.0)
    assert kd(t64(s), t64(x), None).item() == pytest.approx(soft_only, rel=1e-10)


def test_alpha_zero_is_plain_cross_entropy(batch):
    x, s, y = batch
    kd = MultiTeacherDistillation(linear_teachers(), alpha=0.0)
    ce = -np.log(np_softmax(s)[np.arange(len(y)), y]).mean()
    assert kd(t64(s), t64(x), t64(y)).item() == pytest.approx(ce, rel=1e-12)


def test_one_teacher_with_weight_one_is_single_teacher_kd(batch):
    x, s, y = batch
    teachers = linear_teachers()
    z = np_logits(teachers, x)
    T, alpha = 2.0, 0.7
    p, q = np_softmax(z[0] / T), np_softmax(s / T)
    single = (
        alpha * T**2 * (p * np.log(p / q)).sum(1).mean()
        + (1 - alpha) * -np.log(np_softmax(s)[np.arange(len(y)), y]).mean()
    )
    alone = MultiTeacherDistillation(teachers[:1], temperature=T, alpha=alpha)
    assert alone(t64(s), t64(x), t64(y)).item() == pytest.approx(single, rel=1e-10)
    first_only = MultiTeacherDistillation(teachers, temperature=T, alpha=alpha, weights=[1.0, 0.0])
    assert first_only(t64(s), t64(x), t64(y)).item() == pytest.approx(single, rel=1e-10)
    for name in ("confidence", "entropy", "true_label", "ca_mkd"):  # with one teacher every weighting is 1
        one = MultiTeacherDistillation(teachers[:1], temperature=T, alpha=alpha, weights=name)
        assert one(t64(s), t64(x), t64(y)).item() == pytest.approx(single, rel=1e-10)
        np.testing.assert_allclose(one.weights_.numpy(), 1.0, rtol=1e-12)


def hand_weights(z, y):
    """Per-sample weights (K, N) of every weighting, by hand at T = 1."""
    p = np_softmax(z)
    conf = p.max(-1)
    neg_h = (p * np.log(p)).sum(-1)  # minus the entropy
    true = p[:, np.arange(len(y)), y]
    ce = -np.log(true)
    k = len(z)
    return {
        "confidence": conf / conf.sum(0),
        "entropy": np.exp(neg_h) / np.exp(neg_h).sum(0),
        "true_label": true / true.sum(0),
        "ca_mkd": (1 - np.exp(ce) / np.exp(ce).sum(0)) / (k - 1),  # Zhang et al. 2022, eq. 2
    }


@pytest.mark.parametrize("name", ["confidence", "entropy", "true_label", "ca_mkd"])
def test_per_sample_weights_by_hand(batch, name):
    x, s, y = batch
    teachers = linear_teachers(seed=1, k=3)
    z = np_logits(teachers, x)
    w = hand_weights(z, y)[name]
    np.testing.assert_allclose(w.sum(0), 1.0, rtol=1e-12)
    kd = MultiTeacherDistillation(teachers, temperature=2.5, alpha=0.6, weights=name)
    got = kd(t64(s), t64(x), t64(y))
    np.testing.assert_allclose(kd.weights_.numpy(), w, rtol=1e-10)
    assert got.item() == pytest.approx(np_kd(s, z, y, w, 2.5, 0.6), rel=1e-10)
    assert name in list_teacher_weightings() and get_teacher_weighting(name) is not None


def test_label_weightings_fall_back_to_equal_weights_on_unlabelled_samples(batch):
    x, s, y = batch
    teachers = linear_teachers(seed=1, k=3)
    y_missing = y.copy()
    y_missing[2] = -1
    kd = MultiTeacherDistillation(teachers, weights="true_label")
    kd(t64(s), t64(x), t64(y_missing))
    np.testing.assert_allclose(kd.weights_[:, 2].numpy(), 1 / 3, rtol=1e-12)
    w = hand_weights(np_logits(teachers, x), y)["true_label"]
    np.testing.assert_allclose(kd.weights_[:, [0, 1, 3]].numpy(), w[:, [0, 1, 3]], rtol=1e-10)


class Oracle(nn.Module):
    """A teacher that reads the label hidden in the input's last column: always right."""

    def forward(self, x):
        return 6.0 * nn.functional.one_hot(x[:, -1].long(), 5).float()


def test_learned_weights_are_a_simplex_point_that_moves_to_the_right_teacher():
    """One teacher is always right, the other random; the student starts as a copy of the random
    one (the teacher it imitates best), yet the weights, trained on the mixture's hard-label loss,
    go to the right one. Measured over generator seeds 0-4: 0.983 for the right teacher each time."""
    g = torch.Generator().manual_seed(0)
    n = 512
    y = torch.randint(0, 5, (n,), generator=g)
    x = torch.cat([torch.randn(n, 8, generator=g), y[:, None].float()], 1)
    noise = nn.Linear(9, 5)  # a random teacher: right one time in five
    with torch.no_grad():
        noise.weight.copy_(torch.randn(5, 9, generator=g) * 2)
    student = copy.deepcopy(noise)
    kd = MultiTeacherDistillation([noise, Oracle()], temperature=2.0, alpha=0.5, weights="learned")
    assert list(kd.parameters()) == [kd.theta]  # only the weights learn; teachers are not submodules
    data = torch.utils.data.TensorDataset(x, y)
    train(
        student,
        data,
        epochs=4,
        seed=0,
        lr=0.1,
        loss=kd.training_loss(),
        param_groups=[*student.parameters(), *kd.parameters()],
        progress=False,
    )
    w = kd.weights_
    assert w.shape == (2,) and bool((w >= 0).all()) and w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w[1].item() > 0.95, w  # from 0.5 at the start
    assert kd.theta.grad is not None and all(p.grad is None for p in noise.parameters())


def np_relu(a):
    return np.maximum(a, 0)


def test_feature_term_is_mse_of_the_projected_student_feature_and_hooks_go_away():
    torch.manual_seed(0)
    student = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(12,)).double()
    t_mlp = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(20,)).double()
    t_cnn = create_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(8,)).double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 3, 9, 1, 3])
    pairs = [("features.relu1", 0, "features.relu1"), ("features.fc1", 1, "classifier")]
    with MultiTeacherDistillation(
        [t_mlp, t_cnn], temperature=2.0, alpha=0.5, features=pairs, student=student, example_input=x, beta=0.3
    ) as kd:
        kd.double()
        assert [type(p) for p in kd.projections] == [nn.Linear, nn.Linear]
        assert kd.projections[0].weight.shape == (20, 12) and kd.projections[1].weight.shape == (10, 12)
        s = student(x)
        loss = kd(s, x, y)
        # by hand: the student's hidden layer, the MLP teacher's hidden layer, the CNN teacher's logits
        xs = x.flatten(1).numpy()
        w1, b1 = (p.detach().numpy() for p in (student.features.fc1.weight, student.features.fc1.bias))
        pre = xs @ w1.T + b1
        tw, tb = (p.detach().numpy() for p in (t_mlp.features.fc1.weight, t_mlp.features.fc1.bias))
        t_hidden = np_relu(xs @ tw.T + tb)
        with torch.no_grad():
            t_cnn_logits = t_cnn.eval()(x).numpy()
        pw = [(p.weight.detach().numpy(), p.bias.detach().numpy()) for p in kd.projections]
        mse0 = ((np_relu(pre) @ pw[0][0].T + pw[0][1] - t_hidden) ** 2).mean()
        mse1 = ((pre @ pw[1][0].T + pw[1][1] - t_cnn_logits) ** 2).mean()
        z = np.stack([t_mlp.eval()(x).detach().numpy(), t_cnn_logits])
        kd_part = np_kd(s.detach().numpy(), z, y.numpy(), np.full((2, 5), 0.5), 2.0, 0.5)
        assert loss.item() == pytest.approx(kd_part + 0.3 * (mse0 + mse1) / 2, rel=1e-10)
        assert kd.terms_["feature"] == pytest.approx((mse0 + mse1) / 2, rel=1e-10)
        loss.backward()
        assert kd.projections[0].weight.grad is not None and student.features.fc1.weight.grad is not None
        hooked = [student.features.relu1, student.features.fc1, t_mlp.features.relu1, t_cnn.classifier]
        assert all(len(m._forward_hooks) == 1 for m in hooked)
        with pytest.raises(LossFusionError, match=r"'features.relu1' has not run since the last loss"):
            kd(s, x, y)  # the student's features were used up by the last call
    assert all(len(m._forward_hooks) == 0 for m in hooked)  # removed at the end of the with-block
    assert all(len(m._forward_hooks) == 0 for net in (student, t_mlp, t_cnn) for m in net.modules())


def test_conv_features_get_a_1x1_convolution_by_hand():
    torch.manual_seed(1)
    student = create_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(4,)).double()
    teacher = create_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(6,)).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    kd = MultiTeacherDistillation(
        [teacher],
        alpha=1.0,
        features=[("features.conv1", 0, "features.conv1")],
        student=student,
        example_input=x,
    ).double()
    proj = kd.projections[0]
    assert isinstance(proj, nn.Conv2d) and proj.weight.shape == (6, 4, 1, 1)
    feats = {}
    student.features.conv1.register_forward_hook(lambda m, i, o: feats.__setitem__("s", o.detach().numpy()))
    teacher.features.conv1.register_forward_hook(lambda m, i, o: feats.__setitem__("t", o.detach().numpy()))
    s = student(x)
    loss = kd(s, x)
    mapped = np.einsum("oc,nchw->nohw", proj.weight.detach().numpy()[:, :, 0, 0], feats["s"])
    mapped += proj.bias.detach().numpy()[None, :, None, None]
    assert kd.terms_["feature"] == pytest.approx(((mapped - feats["t"]) ** 2).mean(), rel=1e-10)
    assert loss.item() == pytest.approx(kd.terms_["kd"] + kd.terms_["feature"], rel=1e-10)
    kd.close()
    assert len(student.features.conv1._forward_hooks) == 1  # only the test's own hook is left


def test_teachers_run_in_eval_mode_without_gradients_and_keep_their_mode():
    torch.manual_seed(2)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4)).double().train()
    x = torch.randn(10, 6, dtype=torch.float64)
    kd = MultiTeacherDistillation([teacher])
    z = kd.teacher_logits(x)
    with torch.no_grad():
        expected = teacher.eval()(x)  # dropout off
    teacher.train()
    assert torch.equal(z[0], expected) and teacher.training and not z.requires_grad


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def test_a_heterogeneous_pair_distils_a_student_on_digits_through_the_training_loop(digits):
    """Teachers: an MLP (64-32-10) and a CNN (widths 8, 16), 10 epochs each; student: an MLP with
    16 hidden units, 10 epochs with confidence weights and a hidden-feature hint from the MLP
    teacher. Measured with seeds 0-4 in place of 0: student test accuracy 0.74-0.85 (chance 0.10);
    a scratch twin with the same budget reached 0.73-0.86, so beating it is not asserted."""
    shape, c = digits.input_shape, digits.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mlp = create_model("mlp", input_shape=shape, num_classes=c, hidden=(32,))
        cnn = create_model("cnn", input_shape=shape, num_classes=c, widths=(8, 16))
        student = create_model("mlp", input_shape=shape, num_classes=c, hidden=(16,))
    for t in (mlp, cnn):
        train(t, digits, epochs=10, seed=0, progress=False, eval_every_epoch=False)
    x0 = digits.train.tensors[0][:8]
    with MultiTeacherDistillation(
        [mlp, cnn],
        temperature=2.0,
        alpha=0.5,
        weights="confidence",
        features=[("features.relu1", 0, "features.relu1")],
        student=student,
        example_input=x0,
        beta=0.1,
    ) as kd:
        train(
            student,
            digits,
            epochs=10,
            seed=0,
            loss=kd.training_loss(),
            param_groups=[*student.parameters(), *kd.parameters()],
            progress=False,
            eval_every_epoch=False,
        )
        w = kd.weights_  # per-sample confidence weights of the last batch (1078 = 16 x 64 + 54 samples)
        assert w.shape == (2, 54) and torch.allclose(w.sum(0), torch.ones(54))
    acc = evaluate(student, digits.test)["accuracy"]
    assert acc > 0.6, acc
    assert mlp.training and cnn.training  # the loss ran them in eval mode and restored their mode
    assert all(len(m._forward_hooks) == 0 for net in (student, mlp, cnn) for m in net.modules())


class Head(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(x)


class NaNHead(Head):
    def forward(self, x):
        return self.fc(x) * float("nan")


def bad_call(kind):
    x = torch.randn(4, 6)
    s = torch.randn(4, 4)
    if kind == "classes":
        return MultiTeacherDistillation([Head(4), Head(7)])(s, x)
    if kind == "count":
        return MultiTeacherDistillation([Head(4), Head(4)], weights=[1.0])
    if kind == "negative":
        return MultiTeacherDistillation([Head(4), Head(4)], weights=[1.0, -0.5])
    if kind == "name":
        return MultiTeacherDistillation([Head(4)], weights="confidance")
    if kind == "module":
        student = Head(4)
        return MultiTeacherDistillation(
            [Head(4)], features=[("f", 0, "fc")], student=student, example_input=x
        )
    if kind == "nan":
        return MultiTeacherDistillation([Head(4), NaNHead(4)])(s, x)
    if kind == "student classes":
        return MultiTeacherDistillation([Head(5)])(s, x)
    if kind == "no example":
        return MultiTeacherDistillation([Head(4)], features=[("fc", 0, "fc")], student=Head(4))
    if kind == "nan logits":
        return distillation_loss(s, torch.stack([s, s * float("nan")]), temperature=2.0)
    if kind == "label range":
        return MultiTeacherDistillation([Head(4)])(s, x, torch.tensor([0, 1, 4, 2]))
    if kind == "labels needed":
        return MultiTeacherDistillation([Head(4), Head(4)], weights="ca_mkd")(s, x)
    raise AssertionError(kind)


BAD = [
    ("classes", LossFusionError, r"teacher 1 \(Head\) gives 7 class scores, teacher 0 \(Head\) 4"),
    ("count", ConfigError, r"1 weights for 2 teachers"),
    ("negative", ConfigError, r"must be non-negative; teacher\(s\) \[1\] have \[-0.5\]"),
    (
        "name",
        ConfigError,
        r"unknown teacher weighting 'confidance'; expected one of ca_mkd, confidence, entropy",
    ),
    ("module", ConfigError, r"the student \(Head\) has no module named 'f'; close names: 'fc'"),
    ("nan", LossFusionError, r"teacher 1 \(NaNHead\) gives NaN or infinite logits"),
    ("student classes", LossFusionError, r"the student gives 4 class scores, the teachers 5"),
    ("no example", ConfigError, r"feature matching needs the student module .* example batch"),
    ("labels needed", ConfigError, r"'ca_mkd' needs the labels"),
    ("nan logits", LossFusionError, r"teacher\(s\) \[1\] have NaN or infinite logits"),
    ("label range", ConfigError, r"labels must be 4 class indices below 4 .* largest 4"),
]


@pytest.mark.parametrize(("kind", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_errors_that_say_what_is_wrong(kind, error, message):
    with pytest.raises(error, match=message) as info:
        bad_call(kind)
    assert isinstance(info.value, FusionError)


def test_a_failed_hook_setup_leaves_no_hooks_behind():
    student, teacher = Head(4), Head(4)
    with pytest.raises(ConfigError, match="close names: 'fc'"):
        MultiTeacherDistillation(
            [teacher],
            features=[("fc", 0, "fc"), ("fcc", 0, "fc")],
            student=student,
            example_input=torch.randn(2, 6),
        )
    assert not student.fc._forward_hooks and not teacher.fc._forward_hooks


def test_unknown_weighting_lookup_lists_the_registered_ones():
    with pytest.raises(RegistryError, match="Registered: ca_mkd, confidence, entropy, true_label"):
        get_teacher_weighting("vote")


def one_step(device):
    """Loss, learned weights and gradients of one step with everything on ``device`` (seeded)."""
    torch.manual_seed(4)
    student = create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(12,)).to(device)
    teachers = [
        create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(20,)).to(device),
        create_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(8,)).to(device),
    ]
    x = torch.randn(16, 1, 8, 8).to(device)
    y = torch.randint(0, 10, (16,)).to(device)
    y[3] = -1  # one unlabelled sample
    with MultiTeacherDistillation(
        teachers,
        weights="learned",
        features=[("features.relu1", 0, "features.relu1")],
        student=student,
        example_input=x,
    ) as kd:
        kd.to(device)
        loss = kd(student(x), x, y)
        loss.backward()
        return loss.item(), kd.theta.grad.cpu(), student.features.fc1.weight.grad.cpu()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where one is present)")
def test_the_loss_runs_on_cuda_as_on_the_cpu():
    cpu, gpu = one_step("cpu"), one_step("cuda")
    assert gpu[0] == pytest.approx(cpu[0], rel=1e-4)
    for a, b in zip(cpu[1:], gpu[1:]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)


def test_one_step_is_reproducible_on_the_cpu():
    a, b = one_step("cpu"), one_step("cpu")
    assert a[0] == b[0] and all(torch.equal(u, v) for u, v in zip(a[1:], b[1:]))
    assert a[1].abs().sum() > 0  # the labelled samples train the learned weights
