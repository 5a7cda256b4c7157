"""FeatureFusion: the VGG16 + ResNet18 request, state dicts, per-branch policies and bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse.errors import ConfigError, FeatureError
from modelfuse.features import Branch, FeatureFusion, Projection
from modelfuse.zoo import Callback, create_model, train

SHAPE = (3, 16, 16)


def zoo(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(arch, input_shape=SHAPE, num_classes=10, **kwargs)


def toy_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, *SHAPE, generator=g) * 0.5 + y.float()[:, None, None, None] / 10
    return TensorDataset(x, y)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def flags(model: nn.Module) -> tuple[list[bool], list[bool], list[int]]:
    return (
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        [len(m._forward_hooks) for m in model.modules()],
    )


def test_vgg16_and_resnet18_concatenated_on_32px_inputs():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vgg, resnet = tv.models.vgg16(weights=None), tv.models.resnet18(weights=None)
    fusion = FeatureFusion([Branch(vgg, "features"), Branch(resnet, "layer4")], fuse="concat", num_classes=10)
    fusion.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = fusion(x)
        feats = fusion.forward_features(x)
        r = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
        r = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(r))))
        expected = torch.cat([vgg.features(x), r], dim=1)
    assert out.shape == (2, 10)
    assert fusion.tap_shapes == {"vgg": (512, 1, 1), "resnet": (512, 1, 1)}
    assert fusion.fused_shape == (1024, 1, 1)
    torch.testing.assert_close(feats, expected)
    assert fusion.head.mlp.fc1.in_features == 1024
    # the branches' features are read by torch.fx, cut after the tap: VGG's classifier never runs
    assert "vgg: VGG['features'] (frozen, read by fx): (512, 1, 1)" in fusion.describe()


def test_state_dict_names_branches_and_loads_back():
    def make(seed: int) -> FeatureFusion:
        return FeatureFusion(
            [
                Branch(zoo("vgg_small", seed), "features", name="vgg"),
                Branch(zoo("resnet_small", seed), "layers"),
            ],
            fuse="sum",
            channels=48,
            num_classes=10,
            input_shape=SHAPE,
            seed=seed,
        )

    a, b = make(0), make(1)
    keys = list(a.state_dict())
    assert "branches.vgg.features.conv1_1.conv.weight" in keys
    assert "branches.resnet.layers.layer3.0.conv1.weight" in keys
    assert {"align.vgg.linear.weight", "align.resnet.linear.weight", "head.mlp.classifier.bias"} <= set(keys)
    assert isinstance(a.align["vgg"], Projection) and a.align["vgg"].linear.in_features == 128
    x = torch.randn(3, *SHAPE)
    a.eval(), b.eval()
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))
    # the branch's keys are the backbone's own: its weights load into a fresh model of that architecture
    resnet = zoo("resnet_small", 5)
    prefix = "branches.resnet."
    resnet.load_state_dict({k[len(prefix) :]: v for k, v in a.state_dict().items() if k.startswith(prefix)})
    # a copy is independent and still works (its traced graphs are rebuilt over the copied layers)
    c = copy.deepcopy(a)
    torch.testing.assert_close(c(x), a(x))
    with torch.no_grad():
        c.branches["resnet"].stem.conv.weight.add_(1.0)
    assert not torch.allclose(c(x), a(x))
    # the same settings and seed give the same new layers
    torch.testing.assert_close(
        make(0).state_dict()["head.mlp.fc1.weight"], a.state_dict()["head.mlp.fc1.weight"]
    )


def test_lazy_build_on_first_forward_and_build_errors_before():
    fusion = FeatureFusion([Branch(zoo("cnn"), "features"), Branch(zoo("mlp"), "features")], num_classes=10)
    assert not fusion.built
    with pytest.raises(FeatureError, match="input_shape="):
        fusion.param_groups(1e-3)
    with pytest.raises(FeatureError, match="build"):
        fusion.load_state_dict({})
    with pytest.warns(UserWarning, match="optimizer"):
        out = fusion(torch.randn(2, *SHAPE))
    assert out.shape == (2, 10) and fusion.input_shape == SHAPE
    assert fusion.alignments["mlp"].level == "vector"  # an MLP gives vectors, so maps are pooled
    assert fusion.fused_shape == (128 + 128,)


def test_frozen_branch_keeps_batchnorm_statistics_and_weights_when_trained():
    backbone = zoo("vgg_small")
    before = copy.deepcopy(backbone.state_dict())
    fusion = FeatureFusion([Branch(backbone, "features.conv2_2")], num_classes=10, input_shape=SHAPE)
    head_before = copy.deepcopy(fusion.head.state_dict())
    fusion.train()
    assert not backbone.training and all(not m.training for m in backbone.modules())
    assert fusion.head.training
    train(fusion, toy_data(), epochs=2, seed=0, param_groups=fusion.param_groups(1e-2), progress=False)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not torch.equal(fusion.head.state_dict()["mlp.fc1.weight"], head_before["mlp.fc1.weight"])
    assert all(not p.requires_grad for p in backbone.parameters())


class LearningRates(Callback):
    def __init__(self) -> None:
        self.groups: list[tuple[str, float, int]] = []

    def on_train_begin(self, state) -> None:
        self.groups = [(g["name"], g["lr"], len(g["params"])) for g in state.optimizer.param_groups]


def test_finetune_branch_trains_with_its_own_learning_rate():
    backbone = zoo("resnet_small")
    stats = bn_state(backbone)
    weights = copy.deepcopy(backbone.state_dict())
    fusion = FeatureFusion(
        [Branch(backbone, "layers", policy="finetune", lr=1e-4), Branch(zoo("cnn", 1), "features")],
        num_classes=10,
        input_shape=SHAPE,
    )
    groups = fusion.param_groups(1e-2)
    assert [(g["name"], g["lr"]) for g in groups] == [("branches.resnet", 1e-4), ("head", 1e-2)]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in backbone.parameters()]
    seen = LearningRates()
    fusion.train()
    assert backbone.training and not fusion.branches["convnet"].training
    train(fusion, toy_data(), epochs=1, seed=0, param_groups=groups, callbacks=[seen], progress=False)
    head_count = sum(1 for _ in fusion.head.parameters())
    assert seen.groups == [
        ("branches.resnet", 1e-4, len(list(backbone.parameters()))),
        ("head", 1e-2, head_count),
    ]
    moved = [k for k, v in backbone.state_dict().items() if not torch.equal(v, weights[k])]
    assert "stem.conv.weight" in moved
    assert any(not torch.equal(v, stats[k]) for k, v in bn_state(backbone).items())  # BN trained too


def test_partial_unfreezes_exactly_the_modules_from_the_named_layer_on():
    backbone = zoo("resnet_small")
    fusion = FeatureFusion(
        [Branch(backbone, "layers", policy="partial", unfreeze_from="layers.layer3", lr=1e-3)],
        num_classes=10,
        input_shape=SHAPE,
    )
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    expected = {
        n
        for n, _ in backbone.named_parameters()
        if n.startswith("layers.layer3.") or n.startswith("classifier.")
    }
    assert trainable == expected
    names = [n for n, _ in backbone.named_modules()]
    start = names.index("layers.layer3")
    assert fusion.trainable_modules("resnet") == names[start:]
    fusion.train()
    for n, m in backbone.named_modules():
        assert m.training == (n in names[start:]), n
    stats = bn_state(backbone)
    weights = copy.deepcopy(backbone.state_dict())
    train(fusion, toy_data(), epochs=1, seed=0, param_groups=fusion.param_groups(1e-2), progress=False)
    for k, v in backbone.state_dict().items():
        changed = not torch.equal(v, weights[k])
        if k.startswith("layers.layer3."):
            assert changed, k
        elif not k.startswith("classifier."):  # the classifier runs after the tap: no gradient reaches it
            assert not changed, k
    assert torch.equal(bn_state(backbone)["stem.bn.running_mean"], stats["stem.bn.running_mean"])
    fusion.eval()
    assert not any(m.training for m in backbone.modules())


def test_tokens_and_maps_fuse_with_each_operator():
    class Tokens(nn.Module):  # a stand-in transformer: (B, 1 + 16, 32) tokens with a class token
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 32, 4, stride=4)
            self.norm = nn.LayerNorm(32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)
            return self.norm(torch.cat([t.mean(1, keepdim=True), t], dim=1))

    x = torch.randn(2, *SHAPE)
    for fuse in ("concat", "sum", "mean", "weighted", "gated", "attention", "bilinear"):
        fusion = FeatureFusion(
            [Branch(Tokens(), "norm", name="vit"), Branch(zoo("cnn"), "features.conv2")],
            fuse=fuse,
            level="map",
            channels=32 if fuse not in ("concat", "bilinear") else None,
            num_classes=10,
            input_shape=SHAPE,
        ).eval()
        assert fusion.alignments["vit"].out_shape == (32, 4, 4) and fusion.alignments["convnet"].out_shape[
            1:
        ] == (4, 4)
        assert fusion(x).shape == (2, 10)


def test_unknown_tap_is_refused_with_close_names_and_nothing_changed():
    a, b = zoo("vgg_small"), zoo("resnet_small")
    b.stem.train(False)
    before = (flags(a), flags(b))
    with pytest.raises(
        FeatureError, match=r"branch 'resnet' \(ResNet\) has no tap 'layers.layer4'.*'layers.layer1'"
    ):
        FeatureFusion([Branch(a, "features"), Branch(b, "layers.layer4")], num_classes=10, input_shape=SHAPE)
    assert (flags(a), flags(b)) == before


def test_operator_that_needs_equal_widths_says_which_shapes_and_options():
    a, b = zoo("vgg_small"), zoo("resnet_small")
    before = (flags(a), flags(b))
    with pytest.raises(FeatureError) as info:
        FeatureFusion(
            [Branch(a, "features"), Branch(b, "layers")], fuse="sum", num_classes=10, input_shape=SHAPE
        )
    message = str(info.value)
    assert "'sum' needs equal widths" in message
    assert (
        "convnet: 128 (tap shape (128, 4, 4))" in message and "resnet: 64 (tap shape (64, 4, 4))" in message
    )
    assert "channels=128" in message and "fuse='concat'" in message
    assert (flags(a), flags(b)) == before
    fusion = FeatureFusion(
        [Branch(a, "features"), Branch(b, "layers")],
        fuse="sum",
        channels=128,
        num_classes=10,
        input_shape=SHAPE,
    )
    assert fusion(torch.randn(2, *SHAPE)).shape == (2, 10)


def test_maps_of_different_rank_say_to_fuse_vectors():
    signal = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (3, 256)), nn.Conv1d(3, 8, 3, padding=1))
    with pytest.raises(FeatureError, match=r"spatial dimensions.*level='vector'.*\(8, 256\)"):
        FeatureFusion(
            [Branch(zoo("cnn"), "features"), Branch(signal, "2")],
            level="map",
            num_classes=10,
            input_shape=SHAPE,
        )
    fusion = FeatureFusion(
        [Branch(zoo("cnn"), "features"), Branch(signal, "2")], num_classes=10, input_shape=SHAPE
    )
    assert fusion.alignments["sequential"].level == "vector" and fusion.fused_shape == (128 + 8,)


def test_bad_settings_are_config_errors():
    m = zoo("cnn")
    with pytest.raises(ConfigError, match="num_classes"):
        FeatureFusion([Branch(m, "features")])
    with pytest.raises(ConfigError, match="Branch\\(model, tap"):
        FeatureFusion([(m, "features")], num_classes=10)
    with pytest.raises(ConfigError, match="frozen branch does not train"):
        Branch(m, "features", lr=1e-3)
    with pytest.raises(ConfigError, match="needs unfreeze_from"):
        Branch(m, "features", policy="partial")
    with pytest.raises(FeatureError, match=r"has no module 'features.conv9'.*'features.conv1'"):
        FeatureFusion(
            [Branch(m, "features", policy="partial", unfreeze_from="features.conv9")], num_classes=10
        )
    with pytest.raises(ConfigError, match="named 'x'"):
        FeatureFusion(
            [Branch(m, "features", name="x"), Branch(zoo("mlp"), "features", name="x")], num_classes=10
        )
    with pytest.raises(ConfigError, match="same model with different training policies"):
        FeatureFusion([Branch(m, "features.conv1"), Branch(m, "features", policy="finetune")], num_classes=10)
    with pytest.raises(FeatureError, match=r"head .* does not accept"):
        FeatureFusion([Branch(m, "features")], head=nn.Linear(7, 2), input_shape=SHAPE)
    assert all(p.requires_grad for p in m.parameters())


def test_head_norm_standardises_the_pooled_features_before_the_mlp():
    from modelfuse.features import PoolMLPHead

    torch.manual_seed(0)
    head = PoolMLPHead(6, 3, hidden=(5,), norm=True)
    x = torch.randn(8, 6, 2, 2) * torch.tensor([1.0, 10.0, 100.0, 0.1, 1.0, 5.0]).view(1, 6, 1, 1)
    pooled = x.mean(dim=(2, 3)).double().numpy()
    z = (pooled - pooled.mean(0)) / np.sqrt(pooled.var(0) + 1e-5)  # BatchNorm in training mode, affine 1 / 0
    fc1, classifier = head.mlp.fc1, head.mlp.classifier
    ref = np.maximum(z @ fc1.weight.double().detach().numpy().T + fc1.bias.double().detach().numpy(), 0)
    ref = ref @ classifier.weight.double().detach().numpy().T + classifier.bias.double().detach().numpy()
    np.testing.assert_allclose(head(x).detach().double().numpy(), ref, atol=1e-5)
    assert next(iter(head.mlp)) is head.mlp.norm
