"""The ``text`` suite: generated text tasks, MiniLM-L6 fine-tunes and their merges loaded back with transformers."""

from __future__ import annotations

import inspect
import math
import re
from importlib import resources

import pytest
import torch
import yaml

from modelfuse.bench import BenchPool, get_bench_method, get_pool_builder
from modelfuse.bench.suites import text as suite
from modelfuse.errors import ConfigError

METHODS = ["text_finetuned", "text_pretrained", "text_simple_average", "text_task_arithmetic", "text_ties"]


def _words(sentence: str) -> set[str]:
    return set(sentence.split())


@pytest.mark.parametrize("task", suite.TASKS)
def test_generated_tasks_are_balanced_seeded_and_labelled_by_their_vocabulary(task):
    sentences, labels = suite.generate_task(task, 60, seed=3)
    assert (sentences, labels) == suite.generate_task(task, 60, seed=3)
    assert suite.generate_task(task, 60, seed=4)[0] != sentences
    k = len(suite.CLASSES[task])
    assert [labels.count(c) for c in range(k)] == [60 // k] * k
    if task == "sentiment":  # both polarities of adjective occur under both labels
        negated = [bool(_words(s) & set(suite.NEGATIONS)) for s in sentences]
        assert 10 < sum(negated) < 50
    for s, y in zip(sentences, labels):
        if task == "sentiment":
            # positive iff a positive adjective stands un-negated or a negative one negated
            negated = bool(_words(s) & set(suite.NEGATIONS))
            positive_adj = bool(_words(s) & set(suite.POSITIVE))
            assert positive_adj != bool(_words(s) & set(suite.NEGATIVE))
            assert (positive_adj != negated) == (y == 1)
        elif task == "topic":
            topic = suite.CLASSES["topic"][y]
            assert any(w in s for w in suite.TOPICS[topic])
            assert not any(w in s for t, ws in suite.TOPICS.items() if t != topic for w in ws)
        else:
            assert (s.split()[0] in ("is", "was", "why")) == (y == 1)


def test_task_splits_pack_tokens_and_mask():
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(suite.minilm_path()))
    sp = suite.task_splits("topic", tok, seed=0, n_train=12, n_val=6, n_test=9, max_length=16)
    assert [len(sp.train), len(sp.val), len(sp.test)] == [12, 6, 9] and sp.num_classes == 3
    x, y = sp.train.tensors
    assert x.shape == (12, 2, 16) and x.dtype == torch.long and set(y.tolist()) == {0, 1, 2}
    sentences, _ = suite.generate_task("topic", 12, seed=0)
    for row, s in zip(x, sentences):
        ids = row[0][row[1].bool()].tolist()
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert tok.decode(ids[1:-1]) == s


def test_mean_pool_averages_only_the_unmasked_tokens():
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)

    class Fake(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"last_hidden_state": hidden})()

    x = torch.tensor([[[5, 6, 0], [1, 1, 0]], [[7, 0, 0], [1, 0, 0]]])
    pooled = suite.mean_pool(Fake(), x)
    torch.testing.assert_close(pooled[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    torch.testing.assert_close(pooled[1], hidden[1, 0])


def test_bad_inputs_say_what_is_valid():
    with pytest.raises(ConfigError, match="sentiment, topic, question"):
        get_pool_builder("minilm_tasks")(seed=0, tasks=["sentiment", "poetry"])
    with pytest.raises(ConfigError, match="sentiment, topic, question"):
        suite.generate_task("poetry", 4, seed=0)
    with pytest.raises(ConfigError, match=r"train_layers must be in \[1, 6\]"):
        get_pool_builder("minilm_tasks")(seed=0, train_layers=9)
    bare = BenchPool(name="digits_tasks", seed=0, models={}, data=None)
    for method in METHODS:
        with pytest.raises(ConfigError, match="minilm_tasks"):
            get_bench_method(method).fn(bare)


def _spec() -> dict:
    return yaml.safe_load(resources.files("modelfuse.bench.suites").joinpath("text.yaml").read_text())


def test_yaml_references_only_registered_methods_and_valid_params():
    spec = _spec()
    assert spec["suite"] == "text" and spec["seeds"] == 3
    builder = get_pool_builder(spec["pool"]["builder"])
    inspect.signature(builder).bind(seed=0, **{**spec["pool"]["options"], **spec["small"]["options"]})
    names = []
    for entry in spec["methods"]:
        inspect.signature(get_bench_method(entry["method"]).fn).bind(None, **entry.get("params", {}))
        names.append(entry.get("name", entry["method"]))
    assert len(set(names)) == len(names) and set(spec["small"]["methods"]) <= set(names)
    assert {e["method"] for e in spec["methods"]} == set(METHODS)


@pytest.mark.slow
def test_merged_minilm_loads_with_automodel_and_beats_chance_on_every_task():
    """The issue's figure: every merge of the fine-tuned MiniLM-L6 encoders, written by modelfuse.merge and
    loaded with transformers.AutoModel.from_pretrained, scores above chance on every task with its heads."""
    torch.set_num_threads(1)
    spec = _spec()
    small = {**spec["pool"]["options"], **spec["small"]["options"]}  # the demo's pool
    pool = get_pool_builder("minilm_tasks")(seed=0, **small)
    assert list(pool.tasks) == list(suite.TASKS)
    base = pool.base.state_dict()
    fts = [m.encoder.state_dict() for m in pool.models.values()]
    outs = {}
    for method in METHODS:
        out = outs[method] = get_bench_method(method).fn(pool)
        per_task = [out.metrics[f"accuracy/{t}"] for t in pool.tasks]
        assert all(math.isfinite(v) for v in out.metrics.values())
        assert out.metrics["accuracy"] == pytest.approx(sum(per_task) / len(per_task))
        for t, task in pool.tasks.items():
            assert out.metrics[f"accuracy/{t}"] > 1.0 / task.num_classes, (method, t, out.metrics)
        assert out.model is not None
    # the merged encoders are what the merge methods define, computed by hand from the loaded weights
    avg = outs["text_simple_average"].model.encoder.state_dict()
    ta = outs["text_task_arithmetic"].model.encoder.state_dict()
    for k, v in base.items():
        if not v.is_floating_point():
            continue
        torch.testing.assert_close(avg[k], sum(s[k] for s in fts) / len(fts), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ta[k], v + 0.5 * sum(s[k] - v for s in fts), rtol=1e-5, atol=1e-6)
    # embeddings were frozen, and with train_layers=n only the top n layers moved
    moved = {
        k for k, v in base.items() if v.is_floating_point() and any(not torch.equal(s[k], v) for s in fts)
    }
    layers = {int(m.group(1)) for k in moved if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    assert moved and all(k.startswith("encoder.layer.") for k in moved)
    assert layers == set(range(6 - small["train_layers"], 6))
    # the multi-head model of a merge gives every task's logits in one pass
    logits = outs["text_ties"].model(pool.inference_input)
    assert logits.shape == (len(pool.inference_input), sum(t.num_classes for t in pool.tasks.values()))
    # a second build reads the fine-tunes back from the cache (files untouched): the same weights
    folders = list(pool.extra["folders"].values())
    stamps = [(f / "model.safetensors").stat().st_mtime_ns for f in folders]
    again = get_pool_builder("minilm_tasks")(seed=0, **small)
    assert list(again.extra["folders"].values()) == folders
    assert [(f / "model.safetensors").stat().st_mtime_ns for f in folders] == stamps
    for a, b in zip(pool.models.values(), again.models.values()):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k])
