"""Tests of modelfuse.zoo: the model registry battery, the training loop, evaluate/predict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from modelfuse.data import Splits, load
from modelfuse.errors import ConfigError, RegistryError
from modelfuse.zoo import (
    Callback,
    create_model,
    evaluate,
    get_model,
    list_models,
    predict,
    register_model,
    train,
)

CASES = [(name, shape) for name in list_models() for shape in get_model(name).input_shapes]


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load("digits")


def _small(digits: Splits, n: int = 200) -> Splits:
    """A quick slice of digits for loop mechanics."""
    t = digits.train.tensors
    return Splits(
        "digits", TensorDataset(t[0][:n], t[1][:n]), digits.val, digits.test, 10, (1, 8, 8), digits.spec
    )


def _seeded(name: str, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return create_model(name, input_shape=(1, 8, 8), num_classes=10, **kwargs)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- registry battery: every registered architecture, every input shape it is meant for ---


def test_registry_lists_the_reference_architectures():
    assert set(list_models()) >= {"mlp", "cnn", "cnn1d", "vgg_small", "resnet_small"}
    assert list_models("cnn*") == ["cnn", "cnn1d"]
    assert all(get_model(n).doc for n in list_models())


@pytest.mark.parametrize(("name", "shape"), CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_every_model_builds_runs_and_traces(name, shape):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_classes=7)
    x = torch.randn(3, *shape)
    model.eval()
    logits = model(x)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    # the common outline: pooled features of num_features, then one Linear classifier
    feats = model.forward_features(x)
    assert feats.shape == (3, model.num_features)
    assert isinstance(model.classifier, nn.Linear)
    torch.testing.assert_close(model.classifier(feats), logits)
    # FX-traceable, and the traced graph computes the same function
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), logits)
    # the same seed gives the same initial weights; state_dict round-trips
    torch.manual_seed(0)
    twin = create_model(name, input_shape=shape, num_classes=7)
    assert _same_weights(model, twin)
    twin.load_state_dict(model.state_dict())
    # gradients reach every parameter
    model.train()
    F.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["cnn", "vgg_small", "resnet_small", "cnn1d"])
def test_conv_models_run_on_other_input_sizes(name):
    shape = get_model(name).input_shapes[0]
    model = create_model(name, input_shape=shape, num_classes=4).eval()
    for size in (3, 5, 17):
        x = torch.randn(2, shape[0], *([size] * (len(shape) - 1)))
        assert model(x).shape == (2, 4)


def test_resnet_has_projection_shortcuts_only_where_shapes_change():
    model = create_model("resnet_small", input_shape=(3, 32, 32), num_classes=10, widths=(8, 8, 16), blocks=2)
    kinds = {n: type(m.shortcut).__name__ for n, m in model.named_modules() if hasattr(m, "shortcut")}
    assert kinds == {
        "layers.layer1.0": "Identity",
        "layers.layer1.1": "Identity",
        "layers.layer2.0": "Sequential",  # stride 2
        "layers.layer2.1": "Identity",
        "layers.layer3.0": "Sequential",  # stride 2, 8 -> 16 channels
        "layers.layer3.1": "Identity",
    }


def test_model_options_are_honoured():
    m = create_model("mlp", input_shape=(1, 40), num_classes=3, hidden=(5, 6, 7), dropout=0.5)
    assert [layer.out_features for layer in m.modules() if isinstance(layer, nn.Linear)] == [5, 6, 7, 3]
    assert sum(isinstance(layer, nn.Dropout) for layer in m.modules()) == 3
    v = create_model("vgg_small", input_shape=(1, 8, 8), num_classes=3, widths=(4, 8), depth=3)
    assert sum(isinstance(layer, nn.Conv2d) for layer in v.modules()) == 6
    assert sum(isinstance(layer, nn.BatchNorm2d) for layer in v.modules()) == 6


def test_mlp_cosine_head_is_opt_in_and_matches_the_formula():
    default = create_model("mlp", input_shape=(1, 8, 8), num_classes=4, hidden=(6,))
    assert isinstance(default.classifier, nn.Linear)
    torch.manual_seed(0)
    m = create_model(
        "mlp", input_shape=(1, 8, 8), num_classes=4, hidden=(6, 5), head="cosine", logit_scale=7.0
    )
    assert not isinstance(m.classifier, nn.Linear)
    assert set(m.state_dict()) == {
        "features.fc1.weight",
        "features.fc1.bias",
        "features.fc2.weight",
        "features.fc2.bias",
        "classifier.weight",
    }  # bias-free, scale not stored
    x = torch.rand(9, 1, 8, 8)
    with torch.no_grad():
        h = m.forward_features(x).double().numpy()
        w = m.classifier.weight.double().numpy()
        out = m(x).double().numpy()
        # scaling the class embeddings (or, for non-negative scalars, the features) changes nothing
        m.classifier.weight.mul_(13.0)
        scaled = m(x).double().numpy()
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    np.testing.assert_allclose(out, 7.0 * cos, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scaled, out, rtol=1e-5, atol=1e-5)
    assert np.abs(out).max() <= 7.0 + 1e-5
    assert torch.fx.symbolic_trace(m)(x).shape == (9, 4)
    with pytest.raises(ConfigError, match="head must be one of"):
        create_model("mlp", input_shape=(1, 8, 8), num_classes=4, head="cos")
    with pytest.raises(ConfigError, match="scale must be"):
        create_model("mlp", input_shape=(1, 8, 8), num_classes=4, head="cosine", logit_scale=0.0)


def test_unknown_model_lists_close_names():
    with pytest.raises(RegistryError) as err:
        create_model("resnet", input_shape=(1, 8, 8), num_classes=10)
    assert "resnet_small" in str(err.value) and "Did you mean" in str(err.value)
    with pytest.raises(ConfigError, match="widths"):
        create_model("cnn", input_shape=(1, 8, 8), num_classes=10, width=3)
    with pytest.raises(ConfigError, match="input_shape"):
        create_model("cnn", input_shape=(1, 40), num_classes=10)


def test_register_model_checks_the_factory_signature():
    with pytest.raises(TypeError):
        register_model("bad")(lambda width: nn.Linear(width, 1))
    with pytest.raises(RegistryError):
        register_model("mlp")(lambda *, input_shape, num_classes: nn.Linear(1, 1))


# --- the training loop ------------------------------------------------------------------


def test_training_is_bitwise_reproducible_and_seeded(digits):
    data = _small(digits)
    runs = []
    for seed in (0, 0, 1):
        model = _seeded("mlp", dropout=0.3)  # dropout must be seeded too
        train(model, data, epochs=2, seed=seed)
        runs.append(model)
    assert _same_weights(runs[0], runs[1])
    assert not _same_weights(runs[0], runs[2])


def test_training_leaves_the_global_rng_alone(digits):
    model = _seeded("mlp", dropout=0.5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train(model, _small(digits), epochs=1, seed=5)
    assert torch.equal(torch.get_rng_state(), before)


def test_history_records_loss_and_val_metrics(digits):
    model = _seeded("mlp")
    model.eval()
    result = train(model, _small(digits), epochs=3, seed=0)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert set(result.final) == {"epoch", "train_loss", "lr", "val_accuracy", "val_nll"}
    assert result.final["val_accuracy"] == evaluate(model, digits.val)["accuracy"]
    assert result.steps == 3 * math.ceil(200 / 64) and result.seconds > 0
    assert not model.training  # the mode it came in with
    quiet = train(_seeded("mlp"), _small(digits), epochs=1, seed=0, eval_every_epoch=False)
    assert "val_accuracy" not in quiet.final


def test_callbacks_fire_in_order_and_can_stop(digits):
    events = []

    class Recorder(Callback):
        def on_train_begin(self, state):
            events.append("begin")

        def before_step(self, state):
            events.append("before")

        def on_step(self, state):
            events.append(f"step{state.step}")
            assert math.isfinite(state.loss) and state.batch[0].shape[1:] == (1, 8, 8)

        def on_epoch_end(self, state):
            events.append(f"epoch{state.epoch}:{len(state.history)}")

        def on_train_end(self, state):
            events.append("end")

    train(_seeded("mlp"), _small(digits, 128), epochs=2, seed=0, callbacks=[Recorder()], batch_size=64)
    assert events == [
        "begin",
        *("before", "step1", "before", "step2", "epoch0:1"),
        *("before", "step3", "before", "step4", "epoch1:2"),
        "end",
    ]

    class StopAfter(Callback):
        def on_step(self, state):
            if state.step == 3:
                state.request_stop()

    result = train(_seeded("mlp"), _small(digits), epochs=5, seed=0, callbacks=[StopAfter()])
    assert result.steps == 3 and result.stopped and len(result.history) == 1


def test_before_step_can_edit_gradients(digits):
    model = _seeded("mlp")
    first = model.features.fc1.weight.detach().clone()

    class DropFirstLayerGrad(Callback):  # the hook gradient surgery plugs into
        def before_step(self, state):
            state.model.features.fc1.weight.grad = None

    train(model, _small(digits), epochs=1, seed=0, callbacks=[DropFirstLayerGrad()])
    assert torch.equal(model.features.fc1.weight, first)


def test_param_groups_leave_the_rest_frozen(digits):
    model = _seeded("cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = [{"params": list(model.classifier.parameters()), "lr": 1e-2}]
    train(model, _small(digits), epochs=1, seed=0, param_groups=groups)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_custom_loss_gets_model_and_batch(digits):
    seen = []

    def mse_to_one_hot(model, batch):
        x, y = batch
        seen.append(len(x))
        return F.mse_loss(model(x).softmax(1), F.one_hot(y, 10).float())

    model = _seeded("mlp")
    result = train(model, _small(digits), epochs=4, seed=0, loss=mse_to_one_hot, lr=3e-3)
    assert seen[:4] == [64, 64, 64, 8]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_generic_datasets_use_a_seeded_dataloader(digits):
    lazy = Subset(digits.train, list(range(150)))
    a, b = _seeded("mlp"), _seeded("mlp")
    ra = train(a, lazy, epochs=2, seed=3, batch_size=32)
    train(b, lazy, epochs=2, seed=3, batch_size=32)
    assert _same_weights(a, b)
    assert ra.steps == 2 * 5 and "val_accuracy" not in ra.final


def test_a_single_sample_last_batch_is_dropped(digits):
    model = _seeded("cnn", batch_norm=True)  # BatchNorm would fail on a batch of one
    result = train(model, _small(digits, 65), epochs=1, seed=0, batch_size=64)
    assert result.steps == 1
    lazy = Subset(digits.train, list(range(65)))
    assert train(_seeded("cnn", batch_norm=True), lazy, epochs=1, seed=0, batch_size=64).steps == 1


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_named_optimizers_train(digits, optimizer):
    model = _seeded("mlp")
    result = train(
        model, _small(digits), epochs=3, seed=0, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3
    )
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_schedules(digits):
    lrs = []

    class LR(Callback):
        def on_step(self, state):
            lrs.append(state.optimizer.param_groups[0]["lr"])

    train(_seeded("mlp"), _small(digits), epochs=2, seed=0, lr=0.01, schedule="cosine", callbacks=[LR()])
    assert lrs[0] < 0.01 and lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs == sorted(lrs, reverse=True)
    lrs.clear()
    train(_seeded("mlp"), _small(digits), epochs=5, seed=0, lr=0.01, schedule="onecycle", callbacks=[LR()])
    # warm up from lr/25 to lr, anneal to lr/25e4 at the last step taken (lrs[-2]; lrs[-1] is never used)
    assert max(lrs) == pytest.approx(0.01) and lrs[0] < 0.002 and lrs[-2] == pytest.approx(0.01 / 25e4)

    def halve_each_step(opt, total_steps):
        assert total_steps == 8
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)

    lrs.clear()
    train(
        _seeded("mlp"), _small(digits), epochs=2, seed=0, lr=1.0, schedule=halve_each_step, callbacks=[LR()]
    )
    assert lrs == [0.5**k for k in range(1, 9)]
    with pytest.raises(ConfigError, match="cosine"):
        train(_seeded("mlp"), _small(digits), epochs=1, seed=0, schedule="linear")
    with pytest.raises(ConfigError, match="adamw"):
        train(_seeded("mlp"), _small(digits), epochs=1, seed=0, optimizer="lion")


def test_optimizer_factory_and_gradient_clipping(digits):
    norms = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            norms.append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            )
            return super().step(closure)

    train(
        _seeded("mlp"),
        _small(digits),
        epochs=1,
        seed=0,
        optimizer=lambda params: RecordingSGD(params, lr=0.1),
        max_grad_norm=0.01,
    )
    assert len(norms) == 4 and max(norms) <= 0.01 + 1e-6


def test_training_rejects_nothing_to_train(digits):
    model = _seeded("mlp")
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        train(model, _small(digits), epochs=1, seed=0)


# --- evaluate and predict -------------------------------------------------------------------


def test_evaluate_matches_explicit_formulas():
    # a fixed linear model on three points: logits written out by hand
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    y = torch.tensor([0, 2, 1])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    nll = (
        -((2 - math.log(math.exp(2) + 2)) + (0 - math.log(math.exp(3) + 2)) + (1 - math.log(2 * math.e + 1)))
        / 3
    )
    out = evaluate(model, TensorDataset(x, y), batch_size=2)
    # argmax of the tied third row is class 0, so only the first point is right
    assert out == {"accuracy": pytest.approx(1 / 3), "nll": pytest.approx(nll), "n": 3}
    assert torch.equal(predict(model, TensorDataset(x, y)), logits)


def test_predict_keeps_order_mode_and_matches_dataloader_path(digits):
    model = _seeded("mlp", dropout=0.5)
    model.train()
    logits = predict(model, digits.test, batch_size=100)
    assert model.training
    model.eval()
    torch.testing.assert_close(logits, model(digits.test.tensors[0]))
    assert not model.training
    lazy = Subset(digits.test, list(range(len(digits.test))))
    torch.testing.assert_close(predict(model, lazy, batch_size=64), logits)
    assert evaluate(model, lazy) == pytest.approx(evaluate(model, digits.test))
