"""The ``mtl`` bench suite: its pool builder, its two bench methods and its YAML definition.

The runner is not needed: the pool builder and the methods are called directly, the YAML read
with PyYAML. Labels, parameter counts and metrics are checked against values computed here by
hand (NumPy) from the tasks' definitions. Measured on the small setting (10 epochs, seeds 0 and 1,
every entry): every task's test accuracy 0.88 or more (digit chance 0.1, the binary tasks ~0.5);
the test (seed 0) asserts 0.8.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from importlib.resources import files

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from modelfuse.activations import ActivationMix
from modelfuse.bench import BenchPool, get_bench_method, get_pool_builder
from modelfuse.bench.suites import mtl
from modelfuse.data import load
from modelfuse.errors import ConfigError, RegistryError
from modelfuse.losses import get_loss_fusion, list_loss_fusions
from modelfuse.registry import check_options

SUITE = yaml.safe_load((files("modelfuse.bench.suites") / "mtl.yaml").read_text())
ENTRIES = {e.get("name", e["method"]): e for e in SUITE["methods"]}
SMALL = {**SUITE["pool"]["options"], **SUITE["small"]["options"]}
# the network by hand: 64->128, 128->64, heads 64->10, 64->2, 64->2 (weights + biases)
NETWORK_PARAMETERS = (64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10) + 2 * (64 * 2 + 2)


@pytest.fixture(scope="module")
def pool() -> Iterator[BenchPool]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: more threads only contend on a shared machine
    try:
        yield get_pool_builder(SUITE["pool"]["builder"])(seed=0, **SMALL)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def outcomes(pool):
    """Each YAML entry's Outcome on the small setting, seed 0, computed once when first asked for."""
    cache = {}

    def get(name):
        if name not in cache:
            entry = ENTRIES[name]
            cache[name] = get_bench_method(entry["method"]).fn(pool, **entry.get("params", {}))
        return cache[name]

    return get


# --- the YAML --------------------------------------------------------------------------------


def test_yaml_lists_every_registered_loss_fusion_without_activation_mix():
    plain = [e["params"]["fusion"] for e in SUITE["methods"] if e["method"] == "loss_fusion"]
    assert sorted(plain) == list_loss_fusions()  # a newly registered loss fusion fails here until listed


def test_yaml_runs_activation_mix_with_equal_uncertainty_and_a_gradient_method():
    mixed = {e["params"]["fusion"] for e in SUITE["methods"] if e["method"] == "activation_mix"}
    assert {"equal", "uncertainty"} <= mixed
    assert any(get_loss_fusion(f).uses_gradients for f in mixed)
    assert get_bench_method("activation_mix").level == "activation"
    assert get_bench_method("loss_fusion").level == "loss"


def test_yaml_shape_names_and_parameters_fit_the_registered_methods():
    assert SUITE["suite"] == "mtl" and SUITE["seeds"] == 3 and SUITE["pool"]["options"]["epochs"] == 30
    names = [e.get("name", e["method"]) for e in SUITE["methods"]]
    assert len(names) == len(set(names))
    assert set(SUITE["small"]["methods"]) <= set(names)
    assert SUITE["small"]["options"]["epochs"] < SUITE["pool"]["options"]["epochs"]
    check_options("pool digits_multitask", get_pool_builder("digits_multitask"), SMALL, fixed=["seed"])
    for e in SUITE["methods"]:
        check_options(e["method"], get_bench_method(e["method"]).fn, e.get("params", {}), fixed=["pool"])


# --- the pool --------------------------------------------------------------------------------


def test_pool_holds_three_tasks_with_labels_by_hand_and_half_the_parity_labels(pool):
    digits = load("digits")
    assert list(pool.tasks) == ["digit", "parity", "gt4"]
    assert pool.models == {}
    y_test = digits.test.tensors[1].numpy()
    expected = {"digit": y_test, "parity": y_test % 2, "gt4": (y_test > 4).astype(np.int64)}
    for name, labels in expected.items():
        split = pool.tasks[name]
        assert np.array_equal(split.test.tensors[1].numpy(), labels)
        assert torch.equal(split.test.tensors[0], digits.test.tensors[0])
    assert pool.tasks["digit"].num_classes == 10 and pool.tasks["parity"].num_classes == 2

    x, y, mask = pool.extra["train"].tensors
    assert mask.shape == (len(digits.train), 3)
    assert torch.equal(x, digits.train.tensors[0]) and torch.equal(y, digits.train.tensors[1])
    assert mask[:, 0].all() and mask[:, 2].all()
    n = len(y)
    kept = int(mask[:, 1].sum())
    assert abs(kept / n - 0.5) < 3 * math.sqrt(0.25 / n)  # binomial(n, 0.5), 3 sigma
    # the parity task's train split holds exactly the labelled samples, with their parity
    px, py = pool.tasks["parity"].train.tensors
    assert len(py) == kept
    assert torch.equal(px, x[mask[:, 1]])
    assert np.array_equal(py.numpy(), y[mask[:, 1]].numpy() % 2)
    assert pool.info["train_labelled"] == {"digit": n, "parity": kept, "gt4": n}
    json.dumps(pool.info)
    assert pool.inference_input.shape == (64, 1, 8, 8)


def test_hidden_labels_are_seeded():
    build = get_pool_builder("digits_multitask")
    m0 = build(seed=0, epochs=1).extra["train"].tensors[2]
    assert torch.equal(m0, build(seed=0, epochs=1).extra["train"].tensors[2])
    assert not torch.equal(m0, build(seed=1, epochs=1).extra["train"].tensors[2])
    gt4 = build(seed=0, epochs=1, missing=0.3, missing_task="gt4").extra["train"].tensors[2]
    assert gt4[:, 0].all() and gt4[:, 1].all() and not gt4[:, 2].all()


@pytest.mark.parametrize(
    "options, words",
    [
        ({"missing_task": "colour"}, ["missing_task", "digit, parity, gt4", "colour"]),
        ({"missing": 1.0}, ["missing", "[0, 1)", "1.0"]),
        ({"missing": "half"}, ["missing", "[0, 1)", "'half'"]),
        ({"epochs": 0}, ["epochs", "epochs=0"]),
    ],
)
def test_bad_pool_options_are_refused_clearly(options, words):
    with pytest.raises(ConfigError) as err:
        get_pool_builder("digits_multitask")(seed=0, **options)
    for w in words:
        assert w in str(err.value)


# --- the methods -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ENTRIES))
def test_every_yaml_method_trains_on_the_small_setting(outcomes, name):
    out = outcomes(name)
    tasks = mtl.TASKS
    assert set(out.metrics) == {"accuracy", "nll", *(f"{m}/{t}" for t in tasks for m in ("accuracy", "nll"))}
    assert all(math.isfinite(v) for v in out.metrics.values())
    per_task = [out.metrics[f"accuracy/{t}"] for t in tasks]
    assert out.metrics["accuracy"] == pytest.approx(np.mean(per_task), abs=1e-12)
    assert out.metrics["nll"] == pytest.approx(np.mean([out.metrics[f"nll/{t}"] for t in tasks]), abs=1e-12)
    assert min(per_task) >= 0.8, out.metrics  # chance: 0.1, ~0.5, ~0.5; measured >= 0.88
    assert "weights_ at the last step" in out.notes
    n_params = sum(p.numel() for p in out.model.parameters())
    if ENTRIES[name]["method"] == "activation_mix":
        assert n_params == NETWORK_PARAMETERS + 2 * 4  # two mixtures of 4 candidates (convex logits)
    else:
        assert n_params == NETWORK_PARAMETERS


def test_metrics_match_a_numpy_evaluation_of_the_trained_heads(pool, outcomes):
    out = outcomes("equal")
    x, y = load("digits").test.tensors
    y = y.numpy()
    with torch.no_grad():
        logits = [o.double().numpy() for o in out.model.eval()(x)]
    for t, z, labels in zip(mtl.TASKS, logits, [y, y % 2, (y > 4).astype(np.int64)], strict=True):
        assert out.metrics[f"accuracy/{t}"] == pytest.approx(np.mean(z.argmax(1) == labels), abs=1e-12)
        logp = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        assert out.metrics[f"nll/{t}"] == pytest.approx(-logp[np.arange(len(labels)), labels].mean(), rel=1e-5)


def test_fixed_weights_reach_the_notes(outcomes):
    assert "digit 1.000, parity 0.500, gt4 0.500" in outcomes("fixed").notes


def test_activation_mix_trains_mixtures_in_the_trunk_and_loss_fusion_keeps_relu(outcomes):
    mixed = outcomes("uncertainty + ActivationMix").model
    mixtures = [m for m in mixed.modules() if isinstance(m, ActivationMix)]
    assert len(mixtures) == 2
    assert all(any(m is n for n in mixed.trunk.modules()) for m in mixtures)
    assert not any(isinstance(m, nn.ReLU) for m in mixed.trunk.children())
    for m in mixtures:  # uniform start 1/4, moved by training
        w = m.mixing_weights().detach()
        assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (w - 0.25).abs().max().item() > 1e-4
    assert "mixtures:" in outcomes("uncertainty + ActivationMix").notes

    plain = outcomes("uncertainty").model
    assert not any(isinstance(m, ActivationMix) for m in plain.modules())
    assert sum(isinstance(m, nn.ReLU) for m in plain.trunk.children()) == 2


def test_every_method_of_a_seed_starts_from_the_same_weights(pool):
    a, _ = mtl.train_multitask("equal", pool.extra["train"], seed=0, epochs=0)
    b, _ = mtl.train_multitask("pcgrad", pool.extra["train"], seed=0, epochs=0)
    c, _ = mtl.train_multitask("equal", pool.extra["train"], seed=1, epochs=0)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_unknown_fusion_and_foreign_pool_are_refused_clearly(pool):
    with pytest.raises(RegistryError) as err:
        mtl.loss_fusion(pool, fusion="equall")
    assert "equal" in str(err.value) and "uncertainty" in str(err.value)
    with pytest.raises(ConfigError, match="'equal': bad options") as err:
        mtl.loss_fusion(pool, fusion="equal", options={"weigths": [1, 1, 1]})
    assert "weigths" in str(err.value)
    foreign = BenchPool(name="digits_seeds", seed=0, models={}, data=None)
    with pytest.raises(ConfigError, match="digits_multitask"):
        mtl.activation_mix(foreign, fusion="equal")
