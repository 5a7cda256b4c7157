"""fit_feature_fusion: cached features give the same head as recomputing them; policies decide caching."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from modelfuse.data import Splits
from modelfuse.errors import ConfigError
from modelfuse.features import Branch, CachedHead, FeatureFusion, cache_features, fit_feature_fusion
from modelfuse.zoo import create_model

SHAPE = (3, 16, 16)


def toy_splits(n: int = 96, seed: int = 0) -> Splits:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n + 40,), generator=g)
    x = torch.randn(n + 40, *SHAPE, generator=g) * 0.5 + y.float()[:, None, None, None] / 5
    train, val = TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])
    return Splits("toy", train, val, val, num_classes=10, input_shape=SHAPE)


def backbones(seed: int = 0):
    torch.manual_seed(seed)
    return (
        create_model("vgg_small", input_shape=SHAPE, num_classes=10),
        create_model("resnet_small", input_shape=SHAPE, num_classes=10),
    )


def make(vgg, resnet, fuse: str = "gated", **policy) -> FeatureFusion:
    return FeatureFusion(
        [Branch(vgg, "features", name="vgg", **policy), Branch(resnet, "layers.layer2")],
        fuse=fuse,
        channels=32,
        num_classes=10,
        input_shape=SHAPE,
        seed=3,
    )


def test_cached_features_train_the_same_head_as_recomputing():
    vgg, resnet = backbones()
    cached, recomputed = make(vgg, resnet), make(copy.deepcopy(vgg), copy.deepcopy(resnet))
    data = toy_splits()
    fit_c = fit_feature_fusion(cached, data, epochs=3, seed=7, batch_size=32, progress=False)
    fit_r = fit_feature_fusion(recomputed, data, epochs=3, seed=7, batch_size=32, cache=False, progress=False)
    assert fit_c.cached and not fit_r.cached and fit_c.model is cached
    assert fit_c.result.steps == fit_r.result.steps == 9
    sd_c, sd_r = cached.state_dict(), recomputed.state_dict()
    assert sd_c.keys() == sd_r.keys()
    diff = max(float((sd_c[k].float() - sd_r[k].float()).abs().max()) for k in sd_c)
    assert diff < 1e-6, diff
    start = make(*backbones()).state_dict()
    assert not torch.equal(sd_c["head.mlp.fc1.weight"], start["head.mlp.fc1.weight"])  # it did train
    for rc, rr in zip(fit_c.history, fit_r.history):
        assert rc.keys() == rr.keys() >= {"train_loss", "val_accuracy", "val_nll"}
        for key in rc:
            assert rc[key] == pytest.approx(rr[key], abs=1e-5), key


def test_same_head_when_the_data_is_no_tensor_dataset():
    vgg, resnet = backbones()
    cached, recomputed = (
        make(vgg, resnet, fuse="concat"),
        make(copy.deepcopy(vgg), copy.deepcopy(resnet), "concat"),
    )
    data = toy_splits(n=50)
    train = Subset(data.train, list(range(45)))  # batched by a seeded DataLoader, which also draws a seed
    fit_c = fit_feature_fusion(cached, train, epochs=2, seed=1, batch_size=16, progress=False)
    fit_r = fit_feature_fusion(
        recomputed, train, epochs=2, seed=1, batch_size=16, cache=False, progress=False
    )
    assert fit_c.cached and not fit_r.cached and fit_c.result.steps == 6
    sd_c, sd_r = cached.state_dict(), recomputed.state_dict()
    assert max(float((sd_c[k].float() - sd_r[k].float()).abs().max()) for k in sd_c) < 1e-6


def test_cache_holds_prepared_features_in_dataset_order():
    vgg, resnet = backbones()
    fusion = make(vgg, resnet, fuse="concat")
    data = toy_splits(n=20)
    subset = Subset(data.train, [5, 2, 9])  # not a TensorDataset: read through a DataLoader, in order
    feats = cache_features(fusion, subset, batch_size=2)
    x = torch.stack([data.train[i][0] for i in (5, 2, 9)])
    fusion.eval()
    with torch.no_grad():
        expected = fusion.prepare(fusion.tap_outputs(x))
        logits = fusion(x)
    assert len(feats.tensors) == 3 and torch.equal(feats.tensors[2], data.train.tensors[1][[5, 2, 9]])
    for got, want in zip(feats.tensors, expected):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(CachedHead(fusion).eval()(*feats.tensors[:2]), logits)


def test_trainable_branch_means_no_cache():
    vgg, resnet = backbones()
    fusion = make(vgg, resnet, policy="finetune", lr=1e-4)
    with pytest.raises(ConfigError, match="cache=True needs every branch frozen; 'vgg' train"):
        fit_feature_fusion(fusion, toy_splits(), epochs=1, seed=0, cache=True)
    with pytest.raises(ConfigError, match="caching features needs every branch frozen"):
        cache_features(fusion, toy_splits().train)
    weights = copy.deepcopy(vgg.state_dict())
    fit = fit_feature_fusion(fusion, toy_splits(n=40), epochs=1, seed=0, progress=False)
    assert not fit.cached
    assert not torch.equal(
        vgg.state_dict()["features.conv1_1.conv.weight"], weights["features.conv1_1.conv.weight"]
    )


def test_options_are_checked():
    fusion = make(*backbones())
    with pytest.raises(ConfigError, match=r"unknown option.*optimiser.*optimizer"):
        fit_feature_fusion(fusion, toy_splits(), epochs=1, seed=0, optimiser="sgd")
    with pytest.raises(ConfigError, match="cache must be"):
        fit_feature_fusion(fusion, toy_splits(), epochs=1, seed=0, cache="yes")


def test_unbuilt_fusion_is_built_from_the_data():
    vgg, resnet = backbones()
    fusion = FeatureFusion([Branch(vgg, "features"), Branch(resnet, "layers")], num_classes=10, hidden=())
    fit = fit_feature_fusion(fusion, toy_splits(n=40).train, epochs=1, seed=0, progress=False)
    assert fusion.input_shape == SHAPE and fit.cached and len(fit.history) == 1
    assert "val_accuracy" not in fit.history[0]  # a Dataset, not Splits: no validation split
