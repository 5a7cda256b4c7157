"""The ``features`` suite: its pool builder and bench methods, called directly on a tiny pool."""

from __future__ import annotations

import math
from importlib import resources

import numpy as np
import pytest
import torch
import yaml

from modelfuse.bench import get_bench_method, get_pool_builder, list_bench_methods, list_pool_builders
from modelfuse.bench.suites import features as suite
from modelfuse.errors import ConfigError, RegistryError
from modelfuse.features import list_feature_fusions

#: narrow backbones for the tests (seconds to train)
TINY_WIDTHS = [8, 16, 32]


def _yaml() -> dict:
    return yaml.safe_load(resources.files("modelfuse.bench.suites").joinpath("features.yaml").read_text())


@pytest.fixture(scope="module")
def pool():
    torch.manual_seed(0)
    return get_pool_builder("digits_backbones")(seed=0, epochs=1, widths=TINY_WIDTHS)


def test_registration_names_exist():
    assert "digits_backbones" in list_pool_builders()
    assert get_bench_method("backbone").level == "baseline"
    assert get_bench_method("feature_fusion").level == "feature"
    assert get_bench_method("backbone_stitching").level == "structure"


def test_yaml_parses_and_names_only_registered_methods():
    spec = _yaml()
    assert spec["suite"] == "features" and spec["pool"]["builder"] in list_pool_builders()
    names = [m.get("name", m["method"]) for m in spec["methods"]]
    assert len(names) == len(set(names))
    assert all(m["method"] in list_bench_methods() for m in spec["methods"])
    assert set(spec["small"]["methods"]) <= set(names)
    # one entry per registered feature-fusion operator
    ops = {m["params"]["fuse"] for m in spec["methods"] if m["method"] == "feature_fusion"}
    assert ops == set(list_feature_fusions())


def test_pool_holds_both_backbones(pool):
    assert list(pool.models) == ["vgg_small", "resnet_small"]
    assert pool.info["epochs"] == 1 and pool.info["seeds"] == [0, 1]
    assert tuple(pool.inference_input.shape[1:]) == (1, 8, 8)


@pytest.mark.parametrize("entry", _yaml()["methods"], ids=lambda e: e.get("name", e["method"]))
def test_every_method_runs_on_the_tiny_pool(pool, entry):
    params = dict(entry.get("params", {}))
    if entry["method"] in ("feature_fusion", "backbone_stitching"):
        params["epochs"] = 1
    out = get_bench_method(entry["method"]).fn(pool, **params)
    acc, nll = out.metrics["accuracy"], out.metrics["nll"]
    assert 0.0 <= acc <= 1.0 and math.isfinite(acc) and math.isfinite(nll) and nll >= 0.0
    assert out.model is not None
    with torch.no_grad():
        assert out.model.eval()(pool.inference_input).shape == (len(pool.inference_input), 10)


def test_backbone_alone_against_numpy(pool):
    out = get_bench_method("backbone").fn(pool, name="resnet_small")
    x = torch.stack([pool.data.test[i][0] for i in range(len(pool.data.test))])
    y = np.array([int(pool.data.test[i][1]) for i in range(len(pool.data.test))])
    with torch.no_grad():
        z = pool.models["resnet_small"].eval()(x).double().numpy()
    z = z - z.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert out.metrics["accuracy"] == pytest.approx((z.argmax(1) == y).mean())
    assert out.metrics["nll"] == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-5)


def test_concat_head_parameter_count_by_hand(pool):
    out = get_bench_method("feature_fusion").fn(pool, fuse="concat", channels=64, hidden=[256], epochs=1)
    # both last maps have 32 channels (the widest stage): a 1x1 projection to 64 each (weights +
    # bias); concat gives 128 features; head 128 -> 256 -> 10
    by_hand = 2 * (32 * 64 + 64) + (128 * 256 + 256) + (256 * 10 + 10)
    assert out.metrics["trained_parameters"] == by_hand
    frozen = sum(p.numel() for m in pool.models.values() for p in m.parameters())
    assert sum(p.numel() for p in out.model.parameters()) == frozen + by_hand


def test_bad_inputs_are_clear(pool):
    with pytest.raises(ConfigError, match="no backbone 'vit'"):
        get_bench_method("backbone").fn(pool, name="vit")
    with pytest.raises(RegistryError, match="Registered:"):
        get_bench_method("feature_fusion").fn(pool, fuse="no_such_operator", epochs=1)
    with pytest.raises(ConfigError, match="dataset must be one of digits, digits_hard"):
        get_pool_builder("digits_backbones")(seed=0, dataset="cifar10")
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        get_pool_builder("digits_backbones")(seed=0, epochs=0)
    assert suite.STITCH_FRONT in {n for n, _ in pool.models["vgg_small"].named_modules()}
