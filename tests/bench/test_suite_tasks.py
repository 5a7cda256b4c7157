"""The ``tasks`` suite: pool builder digits_tasks and its bench methods, checked against hand-computed references."""

from __future__ import annotations

import copy
import inspect
import math
from importlib import resources

import pytest
import torch
import yaml

from modelfuse.bench import BenchPool, get_bench_method, get_pool_builder, list_bench_methods
from modelfuse.bench.suites import tasks as suite
from modelfuse.errors import ConfigError

METHODS = [
    "tasks_pretrained",
    "tasks_individual",
    "tasks_joint",
    "tasks_ensemble",
    "tasks_simple_average",
    "tasks_task_arithmetic",
    "tasks_ties",
    "tasks_dare",
    "tasks_fisher",
    "tasks_regmean",
    "tasks_adamerging",
    "tasks_greedy_soup",
]
#: fast settings for the default test run
FAST = {"tasks_adamerging": {"epochs": 2}, "tasks_fisher": {"max_examples": 64}}


@pytest.fixture(scope="module")
def pool() -> BenchPool:
    torch.manual_seed(0)
    return get_pool_builder("digits_tasks")(seed=0, finetune_epochs=2)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def _hand_accuracy(model: torch.nn.Module, pool: BenchPool) -> dict[str, float]:
    with torch.no_grad():
        return {n: _acc(model.eval()(t.test.tensors[0]), t.test.tensors[1]) for n, t in pool.tasks.items()}


def test_pool_shape_and_label_tasks(pool):
    assert list(pool.models) == list(suite.LABEL_TASKS) == list(pool.tasks)
    assert pool.base is not None and "joint" in pool.extra
    for name, labels in suite.LABEL_TASKS.items():
        t = pool.tasks[name]
        for split in (t.train, t.val, t.test):
            assert set(split.tensors[1].tolist()) == set(labels)
    # the fine-tunes moved away from the base, each differently
    base = pool.base.state_dict()
    deltas = [
        sum(float((m.state_dict()[k] - base[k]).abs().sum()) for k in base) for m in pool.models.values()
    ]
    assert all(d > 0 for d in deltas) and len(set(deltas)) == len(deltas)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_with_finite_metrics(pool, method):
    assert method in list_bench_methods("tasks_*")
    out = get_bench_method(method).fn(pool, **FAST.get(method, {}))
    per_task = [out.metrics[f"accuracy/{t}"] for t in pool.tasks]
    assert all(0.0 <= a <= 1.0 for a in per_task)
    assert out.metrics["accuracy"] == pytest.approx(sum(per_task) / len(per_task))
    assert all(math.isfinite(v) for v in out.metrics.values())
    assert out.metrics["nll"] > 0
    assert out.model is not None
    if method not in ("tasks_individual",):
        hand = _hand_accuracy(out.model, pool)
        for t in pool.tasks:
            assert out.metrics[f"accuracy/{t}"] == pytest.approx(hand[t])


def test_individual_scores_each_task_with_its_own_finetune(pool):
    out = get_bench_method("tasks_individual").fn(pool)
    for name, model in pool.models.items():
        assert out.metrics[f"accuracy/{name}"] == pytest.approx(_hand_accuracy(model, pool)[name])


def test_lambda_sweep_matches_hand_task_arithmetic(pool):
    lambdas = [0.0, 0.3, 0.6, 1.0]
    out = get_bench_method("tasks_task_arithmetic").fn(pool, lambdas=lambdas)
    sweep = out.series["lambda_sweep"]
    assert [x for x, _ in sweep] == lambdas and all(0 <= y <= 1 for _, y in sweep)
    base = pool.base.state_dict()
    states = [m.state_dict() for m in pool.models.values()]
    val_scores = []
    for lam, y in sweep:
        # theta = theta_0 + lambda * sum_i (theta_i - theta_0), by hand
        hand = copy.deepcopy(pool.base)
        hand.load_state_dict({k: base[k] + lam * sum(s[k] - base[k] for s in states) for k in base})
        accs = _hand_accuracy(hand, pool)
        assert y == pytest.approx(sum(accs.values()) / len(accs), abs=1e-6)
        with torch.no_grad():
            val_scores.append(
                sum(_acc(hand(t.val.tensors[0]), t.val.tensors[1]) for t in pool.tasks.values())
                / len(pool.tasks)
            )
    assert out.metrics["lambda"] == lambdas[max(range(len(lambdas)), key=lambda i: val_scores[i])]


def test_task_arithmetic_at_lambda_zero_is_the_pretrained_model(pool):
    zero = get_bench_method("tasks_task_arithmetic").fn(pool, lambda_=0.0)
    pre = get_bench_method("tasks_pretrained").fn(pool)
    for key, value in pre.metrics.items():
        assert zero.metrics[key] == pytest.approx(value, abs=1e-12)
    assert zero.series == {}


def test_simple_average_is_the_mean_of_the_weights(pool):
    out = get_bench_method("tasks_simple_average").fn(pool)
    states = [m.state_dict() for m in pool.models.values()]
    for k, v in out.model.state_dict().items():
        torch.testing.assert_close(v, sum(s[k] for s in states) / len(states))


def test_ensemble_is_the_mean_of_the_probabilities(pool):
    out = get_bench_method("tasks_ensemble").fn(pool)
    for name, task in pool.tasks.items():
        x, y = task.test.tensors
        with torch.no_grad():
            probs = sum(torch.softmax(m(x), -1) for m in pool.models.values()) / len(pool.models)
        assert out.metrics[f"accuracy/{name}"] == pytest.approx(_acc(probs, y))
    # the pool's members stay trainable (the ensemble froze copies)
    assert all(p.requires_grad for m in pool.models.values() for p in m.parameters())


def test_ties_notes_the_ordering(pool):
    out = get_bench_method("tasks_ties").fn(pool, lambdas=[0.2, 0.5, 1.0])
    assert "TIES" in out.notes and "task arithmetic" in out.notes and "simple average" in out.notes
    assert ("ordering holds" in out.notes) != ("does NOT hold" in out.notes)


def test_ordering_note():
    assert suite.ordering_note({"a": 0.9, "b": 0.8, "c": 0.8}).startswith("ordering holds")
    note = suite.ordering_note({"a": 0.7, "b": 0.8, "c": 0.6})
    assert "does NOT hold" in note and "a < b" in note and "b < c" not in note


def test_transforms_family():
    p = get_pool_builder("digits_tasks")(seed=1, family="transforms", finetune_epochs=1)
    assert list(p.tasks) == list(suite.TRANSFORMS)
    x0 = p.tasks["original"].test.tensors[0]
    torch.testing.assert_close(p.tasks["rotated 90"].test.tensors[0], torch.rot90(x0, 1, dims=(-2, -1)))
    torch.testing.assert_close(p.tasks["inverted"].test.tensors[0], 1.0 - x0)
    out = get_bench_method("tasks_task_arithmetic").fn(p, lambdas=[0.0, 0.5])
    assert len(out.series["lambda_sweep"]) == 2 and math.isfinite(out.metrics["accuracy"])


def test_bad_inputs_say_what_is_valid():
    with pytest.raises(ConfigError, match="family must be one of labels, transforms"):
        get_pool_builder("digits_tasks")(seed=0, family="colours")
    bare = BenchPool(name="seeds", seed=0, models={}, data=None)
    with pytest.raises(ConfigError, match="digits_tasks"):
        get_bench_method("tasks_ties").fn(bare)


def _suite_yaml(name: str) -> dict:
    return yaml.safe_load(resources.files("modelfuse.bench.suites").joinpath(f"{name}.yaml").read_text())


def test_yaml_references_only_registered_methods_and_valid_params():
    spec = _suite_yaml("tasks")
    assert spec["suite"] == "tasks" and spec["seeds"] == 3
    builder = get_pool_builder(spec["pool"]["builder"])
    inspect.signature(builder).bind(seed=0, **{**spec["pool"]["options"], **spec["small"]["options"]})
    names = []
    for entry in spec["methods"]:
        fn = get_bench_method(entry["method"]).fn
        inspect.signature(fn).bind(None, **entry.get("params", {}))
        names.append(entry.get("name", entry["method"]))
    assert len(set(names)) == len(names)
    assert set(spec["small"]["methods"]) <= set(names)
    assert {e["method"] for e in spec["methods"]} == set(METHODS)
