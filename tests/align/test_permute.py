"""Permuted networks compute the same function as the originals."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from modelfuse import zoo
from modelfuse.align import (
    AxisRef,
    PermutationGroup,
    PermutationSpec,
    apply_permutation,
    permutation_spec,
    weight_matching,
)
from modelfuse.align.permute import permute_state_dict
from modelfuse.errors import AlignmentError
from tests.align.models import CatNet, FlattenNet, tiny_convnext, tiny_vit

ZOO_CASES = [
    (name, shape, kwargs)
    for name in zoo.list_models()
    for shape in zoo.get_model(name).input_shapes
    for kwargs in ([{}, {"batch_norm": True}] if name == "cnn" else [{}])
]


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Give biases and BatchNorm statistics distinct values (they start constant), so permuting them matters."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.bias is not None:
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
        if isinstance(m, nn.LayerNorm):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen))


def _check_same_function(model: nn.Module, x: torch.Tensor, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _randomise_norms(model, gen)
    model.eval()
    spec = permutation_spec(model)
    assert spec.groups
    perms = {name: torch.randperm(g.size, generator=gen) for name, g in spec.groups.items()}
    permuted = apply_permutation(model, spec, perms)
    # the permutation really moved every listed tensor
    before, after = model.state_dict(), permuted.state_dict()
    for name in spec.param_axes():
        assert not torch.equal(before[name], after[name]), name
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("name", "shape", "kwargs"), ZOO_CASES, ids=lambda v: str(v))
def test_zoo_models_compute_the_same_function(name: str, shape: tuple[int, ...], kwargs: dict) -> None:
    torch.manual_seed(0)
    model = zoo.create_model(name, input_shape=shape, num_classes=10, **kwargs)
    _check_same_function(model, torch.randn(4, *shape))


# beyond the list: depthwise convolutions, squeeze-excitation products, stochastic depth
@pytest.mark.parametrize("arch", ["resnet18", "vgg16", "mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_models_compute_the_same_function(arch: str) -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    _check_same_function(model, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("cls", [FlattenNet, CatNet])
def test_flatten_and_concatenation_compute_the_same_function(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, 3) if cls is FlattenNet else torch.randn(5, 2, 2, 2)
    _check_same_function(cls(), x)


def test_permutation_convention_by_hand() -> None:
    w = torch.arange(12.0).reshape(3, 4)  # rows: units of group g; columns: 2 units x repeat 2 of group h
    spec = PermutationSpec(
        {
            "g": PermutationGroup("g", 3, (AxisRef("w", 0),)),
            "h": PermutationGroup("h", 2, (AxisRef("w", 1, 0, 2),)),
        }
    )
    out = permute_state_dict({"w": w}, spec, {"g": torch.tensor([2, 0, 1]), "h": torch.tensor([1, 0])})["w"]
    expected = torch.tensor([[10.0, 11, 8, 9], [2, 3, 0, 1], [6, 7, 4, 5]])
    assert torch.equal(out, expected)


def test_bad_permutations_are_refused() -> None:
    model = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(4, 3))
    spec = permutation_spec(model)
    with pytest.raises(AlignmentError, match=r"features\.fc1 must hold each of 0\.\.3 once"):
        apply_permutation(model, spec, {"features.fc1": torch.tensor([0, 0, 1, 2])})
    with pytest.raises(AlignmentError, match="not permutation groups"):
        apply_permutation(model, spec, {"classifier": torch.tensor([0])})


def _vit_stream_by_hand() -> set[AxisRef]:
    stream = {AxisRef("conv_proj.weight", 0), AxisRef("conv_proj.bias", 0), AxisRef("heads.head.weight", 1)}
    # the class token (1, 1, 16) is concatenated to the patch tokens, the positions (1, 3, 16) added
    stream |= {AxisRef("class_token", 2), AxisRef("encoder.pos_embedding", 2)}
    stream |= {AxisRef(f"encoder.ln.{w}", 0) for w in ("weight", "bias")}
    per_layer = [
        ("ln_1.weight", 0), ("ln_1.bias", 0), ("self_attention.in_proj_weight", 1),
        ("self_attention.out_proj.weight", 0), ("self_attention.out_proj.bias", 0),
        ("ln_2.weight", 0), ("ln_2.bias", 0), ("mlp.0.weight", 1), ("mlp.3.weight", 0), ("mlp.3.bias", 0),
    ]  # fmt: skip
    return stream | {
        AxisRef(f"encoder.layers.encoder_layer_{i}.{n}", a) for i in (0, 1) for n, a in per_layer
    }


def _convnext_stage_by_hand(stem: str, block: str, after: list[str], nxt: str) -> set[AxisRef]:
    """One stage's channels: what produces them (stem or downsampling conv), its LayerNorm2d, the block's
    depthwise conv, LayerNorm, first Linear's inputs, second Linear's outputs and layer scale, and the
    LayerNorm2d and input axis of what follows."""
    axes = {AxisRef(f"{stem}.weight", 0), AxisRef(f"{stem}.bias", 0), AxisRef(f"{block}.layer_scale", 0)}
    axes |= {AxisRef(f"{block}.block.{i}.{w}", 0) for i in (0, 2, 5) for w in ("weight", "bias")}
    axes |= {AxisRef(f"{n}.{w}", 0) for n in after for w in ("weight", "bias")}
    return axes | {AxisRef(f"{block}.block.3.weight", 1), AxisRef(f"{nxt}.weight", 1)}


def test_tiny_torchvision_vit_and_convnext_specs_by_hand() -> None:
    x = torch.randn(2, 3, 16, 16)
    vit = permutation_spec(tiny_vit(), example_input=x)
    layers = [f"encoder.layers.encoder_layer_{i}" for i in (0, 1)]
    heads = {f"{la}.self_attention.head{h}.{p}" for la in layers for h in (0, 1) for p in ("qk", "v")}
    assert set(vit.groups) == {"conv_proj"} | heads | {f"{la}.mlp.0" for la in layers}
    assert set(vit.groups["conv_proj"].axes) == _vit_stream_by_hand()
    assert set(vit.groups[f"{layers[1]}.self_attention.head1.v"].axes) == {
        AxisRef(f"{layers[1]}.self_attention.in_proj_{w}", 0, 32 + 8) for w in ("weight", "bias")
    } | {AxisRef(f"{layers[1]}.self_attention.out_proj.weight", 1, 8)}
    assert [f.name for f in vit.fixed] == ["heads.head"]

    cnx = permutation_spec(tiny_convnext(), example_input=x)
    assert set(cnx.groups) == {"features.0.0", "features.1.0.block.3", "features.2.1", "features.3.0.block.3"}
    assert set(cnx.groups["features.0.0"].axes) == _convnext_stage_by_hand(
        "features.0.0", "features.1.0", ["features.0.1", "features.2.0"], "features.2.1"
    )
    assert set(cnx.groups["features.2.1"].axes) == _convnext_stage_by_hand(
        "features.2.1", "features.3.0", ["classifier.0"], "classifier.2"
    )
    assert set(cnx.groups["features.3.0.block.3"].axes) == {
        AxisRef("features.3.0.block.3.weight", 0),
        AxisRef("features.3.0.block.3.bias", 0),
        AxisRef("features.3.0.block.5.weight", 1),
    }


@pytest.mark.parametrize(
    ("build", "whole_heads"), [(tiny_vit, False), (tiny_vit, True), (tiny_convnext, False)]
)
def test_tiny_torchvision_vit_and_convnext_compute_the_same_function(build, whole_heads: bool) -> None:
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # the head starts at zero (ViT) and the layer scales at 1e-6 (ConvNeXt)
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 3, 16, 16)
    spec = permutation_spec(model, example_input=x, whole_heads=whole_heads)
    gen = torch.Generator().manual_seed(1)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    if whole_heads:  # the heads of the second layer swap places
        perms["encoder.layers.encoder_layer_1.self_attention.heads"] = torch.tensor([1, 0])
    permuted = apply_permutation(model, spec, perms).eval()
    with torch.no_grad():
        out = model(x)
        assert out.abs().max() > 0.1  # not a constant output
        torch.testing.assert_close(permuted(x), out, atol=1e-5, rtol=1e-5)
    m = weight_matching(spec, model.state_dict(), permuted.state_dict())
    for n, t in apply_permutation(permuted, spec, m.perms).state_dict().items():
        assert torch.equal(t, model.state_dict()[n]), n
    if not whole_heads:  # with whole heads, a unit's group inside a head depends on where the head went
        for n, p in perms.items():
            assert torch.equal(m.perms[n], torch.argsort(p)), n


def test_tiny_vit_without_example_input_says_which_node_fixes_the_patches() -> None:
    spec = permutation_spec(tiny_vit())
    fixed = {f.name: f for f in spec.fixed}
    assert fixed["conv_proj"].node == "reshape" and "example_input=" in fixed["conv_proj"].reason
    # the patch tokens' reshape is where the stream stops; the class token concatenated to them does not move
    why = "fed by the output of node 'reshape', where a reshape whose shapes are unknown"
    assert (
        f"fixed input encoder.layers.encoder_layer_0.self_attention.in_proj_weight axis 1: {why}"
        in spec.explain()
    )
