"""Tests of pool building: seed pools, fine-tune pools, and the on-disk cache and its keys."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import modelfuse.zoo.pool as pool_module
from modelfuse.data import cache_dir, load
from modelfuse.errors import ConfigError
from modelfuse.zoo import build_finetune_pool, build_pool, create_model, member_key, member_spec, train

FAST = {"batch_size": 128}


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _forbid_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training fail: whatever a pool returns from now on must come from the cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("trained although the cache holds the result")

    monkeypatch.setattr(pool_module, "train", refuse)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


# --- cache keys -----------------------------------------------------------------------------


def test_cache_key_changes_with_every_setting(digits, monkeypatch):
    def key(arch="mlp", data=digits, seed=0, epochs=2, model_kwargs=None, **train_kwargs):
        return member_key(
            member_spec(
                arch, data, seed=seed, epochs=epochs, model_kwargs=model_kwargs, train_kwargs=train_kwargs
            )
        )

    base = key()
    variants = {
        "arch": key(arch="cnn"),
        "data": key(data=load("digits", split_seed=1)),
        "subset": key(data=digits.subset(labels=[0, 1])),
        "seed": key(seed=1),
        "epochs": key(epochs=3),
        "model_kwargs": key(model_kwargs={"hidden": [64]}),
        "lr": key(lr=0.01),
        "batch_size": key(batch_size=32),
        "optimizer": key(optimizer="sgd"),
        "weight_decay": key(weight_decay=1e-4),
        "schedule": key(schedule="cosine"),
        "max_grad_norm": key(max_grad_norm=1.0),
        "device": key(device="meta"),
    }
    assert len(set(variants.values()) | {base}) == len(variants) + 1, variants
    # explicit defaults and settings that cannot change the weights leave the key alone
    assert key(lr=1e-3, optimizer="adam", progress=True, num_workers=2) == base
    assert key(model_kwargs={"hidden": (256, 128)}) == base
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert key() != base
    monkeypatch.undo()
    monkeypatch.setattr(pool_module, "code_hash", lambda: "changed")
    assert key() != base


def test_cache_key_needs_json_settings(digits):
    with pytest.raises(ConfigError, match="cache=False"):
        member_spec("mlp", digits, seed=0, epochs=1, train_kwargs={"loss": lambda m, b: 0})
    with pytest.raises(ConfigError, match="unknown train_kwargs"):
        member_spec("mlp", digits, seed=0, epochs=1, train_kwargs={"learning_rate": 1})
    empty = type(digits)("mine", digits.train, digits.val, digits.test, 10, (1, 8, 8), {})
    with pytest.raises(ConfigError, match="empty spec"):
        member_spec("mlp", empty, seed=0, epochs=1)


def test_code_hash_covers_zoo_and_data_sources():
    h = pool_module.code_hash()
    assert isinstance(h, str) and len(h) == 16 and h == pool_module.code_hash()


# --- seed pools -----------------------------------------------------------------------------


def test_build_pool_trains_caches_and_reloads(digits, monkeypatch):
    pool = build_pool("mlp", "digits", k=2, epochs=3, train_kwargs=FAST)
    assert len(pool) == 2 and pool.base is None and pool.data.spec == digits.spec
    assert not _same_weights(pool.members[0], pool.members[1])
    assert [s["train"]["seed"] for s in pool.specs] == [0, 1]
    for path, metrics, spec in zip(pool.paths, pool.metrics, pool.specs):
        assert path.exists() and path.parent == cache_dir() / "pools"
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["spec"] == spec and meta["metrics"] == metrics
        assert len(meta["history"]) == 3 and 0.8 < metrics["test_accuracy"] <= 1.0
    assert not list((cache_dir() / "pools").glob(".*tmp"))  # no temporary files left behind

    # member i is exactly: init from seed i, train with seed i
    torch.manual_seed(1)
    manual = create_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    train(manual, digits, epochs=3, seed=1, **FAST)
    assert _same_weights(manual, pool.members[1])

    _forbid_training(monkeypatch)
    again = build_pool("mlp", digits, k=2, epochs=3, train_kwargs=FAST)
    assert all(_same_weights(a, b) for a, b in zip(pool.members, again.members))
    assert again.metrics == pool.metrics and again.paths == pool.paths
    # a different setting is a different member, so it must train (and here it cannot)
    with pytest.raises(AssertionError, match="trained"):
        build_pool("mlp", digits, k=2, epochs=4, train_kwargs=FAST)


def test_build_pool_retrains_a_damaged_cache_entry(digits):
    pool = build_pool("mlp", digits, seeds=[7], epochs=1, train_kwargs=FAST)
    pool.paths[0].write_bytes(b"garbage")
    again = build_pool("mlp", digits, seeds=[7], epochs=1, train_kwargs=FAST)
    assert _same_weights(pool.members[0], again.members[0])
    assert pool.paths[0].stat().st_size > 1000


def test_build_pool_without_cache_writes_nothing(digits):
    before = set((cache_dir() / "pools").glob("*")) if (cache_dir() / "pools").exists() else set()

    def mse(model, batch):
        return nn.functional.mse_loss(model(batch[0]).softmax(1), nn.functional.one_hot(batch[1], 10).float())

    pool = build_pool("mlp", digits, seeds=[11], epochs=1, cache=False, train_kwargs={"loss": mse, **FAST})
    assert pool.paths == [None] and "function" in pool.specs[0]["train"]["loss"]
    after = set((cache_dir() / "pools").glob("*")) if (cache_dir() / "pools").exists() else set()
    assert after == before


def test_build_pool_validates_arguments(digits):
    with pytest.raises(ConfigError):
        build_pool("mlp", digits, epochs=1)
    with pytest.raises(ConfigError):
        build_pool("mlp", digits, k=3, seeds=[0, 1], epochs=1)
    with pytest.raises(ConfigError):
        build_pool("mlp", digits, seeds=[1, 1], epochs=1)
    with pytest.raises(ConfigError):
        build_pool("mlp", digits, k=1, epochs=1, data_kwargs={"upsample": True})
    with pytest.raises(ConfigError, match="epochs and seed"):
        build_pool("mlp", digits, k=1, epochs=1, train_kwargs={"seed": 3})


# --- fine-tune pools ----------------------------------------------------------------------------


def test_build_finetune_pool(digits, monkeypatch):
    tasks = [[0, 1, 2, 3, 4], {"labels": [5, 6, 7, 8, 9], "fraction": 0.5}]
    kwargs = dict(
        pretrain_epochs=2, finetune_epochs=2, seed=3, train_kwargs=FAST, finetune_kwargs={"lr": 3e-4, **FAST}
    )
    pool = build_finetune_pool("mlp", "digits", tasks, **kwargs)
    assert len(pool) == 2 and pool.base is not None
    assert pool.base_spec["kind"] == "base" and pool.base_metrics["test_accuracy"] > 0.5
    for member, spec in zip(pool.members, pool.specs):
        assert not _same_weights(member, pool.base)
        assert spec["kind"] == "finetune" and spec["base"] == member_key(pool.base_spec)
        assert spec["train"]["lr"] == 3e-4
    assert pool.specs[0]["task"] == {"labels": [0, 1, 2, 3, 4], "fraction": None, "seed": 0}
    assert pool.specs[1]["task"] == {"labels": [5, 6, 7, 8, 9], "fraction": 0.5, "seed": 1}
    assert pool.specs[1]["data"]["subsets"] == [{"labels": [5, 6, 7, 8, 9], "fraction": 0.5, "seed": 1}]
    assert [s["train"]["seed"] for s in pool.specs] == [4, 5]

    # the base is exactly: init from seed 3, train 2 epochs with seed 3
    torch.manual_seed(3)
    base = create_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    train(base, digits, epochs=2, seed=3, **FAST)
    assert _same_weights(base, pool.base)

    # fine-tuning on digits 0-4 is better on those digits than on the others
    test_x, test_y = digits.test.tensors
    with torch.no_grad():
        right = pool.members[0](test_x).argmax(1) == test_y
    assert right[test_y < 5].float().mean() > right[test_y >= 5].float().mean()

    _forbid_training(monkeypatch)
    again = build_finetune_pool("mlp", digits, tasks, **kwargs)
    assert _same_weights(again.base, pool.base)
    assert all(_same_weights(a, b) for a, b in zip(pool.members, again.members))
    assert again.metrics == pool.metrics


def test_finetune_pool_with_pretraining_subset(digits):
    pool = build_finetune_pool(
        "mlp",
        digits,
        [{"fraction": 0.3}],
        pretrain_task={"labels": [0, 1, 2, 3, 4, 5]},
        pretrain_epochs=1,
        finetune_epochs=1,
        train_kwargs=FAST,
        cache=False,
    )
    assert pool.base_spec["data"]["subsets"][0]["labels"] == [0, 1, 2, 3, 4, 5]
    assert pool.specs[0]["task"] == {"labels": None, "fraction": 0.3, "seed": 0}
    with pytest.raises(ConfigError, match="labels"):
        build_finetune_pool("mlp", digits, [{"classes": [1]}], pretrain_epochs=1, finetune_epochs=1)
    with pytest.raises(ConfigError):
        build_finetune_pool("mlp", digits, [], pretrain_epochs=1, finetune_epochs=1)


def test_progress_bars_draw_without_clashing(digits, monkeypatch):
    # rich allows one live display at a time: members train with their own bars off
    shown = []

    def recording_train(*args, **kwargs):
        shown.append(kwargs["progress"])
        return train(*args, **kwargs)

    monkeypatch.setattr(pool_module, "train", recording_train)
    train_kwargs = {"progress": True, **FAST}
    pool = build_pool("mlp", digits, k=2, epochs=1, cache=False, train_kwargs=train_kwargs, progress=True)
    assert len(pool) == 2 and shown == [False, False]
    result = train(
        create_model("mlp", input_shape=(1, 8, 8), num_classes=10), digits, epochs=1, seed=0, progress=True
    )
    assert result.steps == 17
