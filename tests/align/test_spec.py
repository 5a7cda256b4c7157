"""Permutation specifications derived by tracing, checked against specs written by hand."""

from __future__ import annotations

import pytest
import torch
import torchvision

from modelfuse import zoo
from modelfuse.align import AxisRef, explain, permutation_spec
from modelfuse.errors import AlignmentError, FusionError
from tests.align.models import AxisShuffle, CatNet, FlattenNet, Outer, SortNet


def _axes(spec):
    return {name: set(g.axes) for name, g in spec.groups.items()}


def test_mlp_spec_by_hand() -> None:
    spec = permutation_spec(zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(7, 5)))
    assert _axes(spec) == {
        "features.fc1": {
            AxisRef("features.fc1.weight", 0),
            AxisRef("features.fc1.bias", 0),
            AxisRef("features.fc2.weight", 1),
        },
        "features.fc2": {
            AxisRef("features.fc2.weight", 0),
            AxisRef("features.fc2.bias", 0),
            AxisRef("classifier.weight", 1),
        },
    }
    assert {g.size for g in spec.groups.values()} == {7, 5}
    # the input axis of fc1 and the output axis of the classifier stay put
    (fixed,) = spec.fixed
    assert fixed.name == "classifier" and fixed.node == "output"
    assert set(fixed.axes) == {AxisRef("classifier.weight", 0), AxisRef("classifier.bias", 0)}


def test_flatten_repeats_each_channel_over_the_positions() -> None:
    spec = permutation_spec(FlattenNet())
    bn = [f"bn.{a}" for a in ("weight", "bias", "running_mean", "running_var")]
    assert _axes(spec)["conv"] == {
        AxisRef("conv.weight", 0),
        AxisRef("conv.bias", 0),
        AxisRef("fc.weight", 1, 0, 9),
    } | {AxisRef(n, 0) for n in bn}


def test_concatenation_residual_and_layernorm() -> None:
    spec = permutation_spec(CatNet())
    axes = _axes(spec)
    # the two branches sit side by side on mix's input axis: 3 units from 0, 5 units from 3
    assert axes["a"] == {AxisRef("a.weight", 0), AxisRef("a.bias", 0), AxisRef("mix.weight", 1, 0)}
    assert axes["b"] == {AxisRef("b.weight", 0), AxisRef("b.bias", 0), AxisRef("mix.weight", 1, 3)}
    # the residual add joins mix and skip; the 2x2 map flattens into fc (4 positions per channel)
    assert axes["mix"] == {
        AxisRef("mix.weight", 0), AxisRef("mix.bias", 0), AxisRef("skip.weight", 0), AxisRef("skip.bias", 0),
        AxisRef("fc.weight", 1, 0, 4),
    }  # fmt: skip
    assert axes["fc"] == {
        AxisRef("fc.weight", 0), AxisRef("fc.bias", 0), AxisRef("ln.weight", 0), AxisRef("ln.bias", 0),
        AxisRef("out.weight", 1),
    }  # fmt: skip
    assert "skip" not in spec.groups  # merged into mix


def test_unknown_op_fixes_its_groups_and_explain_says_where() -> None:
    spec = permutation_spec(SortNet())
    assert set(spec.groups) == {"fc1"}
    fixed = {f.name: f for f in spec.fixed}
    assert fixed["fc2"].node == "sort" and "sort" in fixed["fc2"].reason
    text = explain(SortNet())
    assert "fixed fc2 (6 units) at node 'sort'" in text
    assert "fixed input fc1.weight axis 1: fed by the model's input 'x'" in text
    assert "fixed input out.weight axis 1: fed by the output of node 'sort', where call_function sort" in text


def test_untraceable_model_names_the_module() -> None:
    with pytest.raises(AlignmentError, match=r"inner \(Branchy\)") as info:
        permutation_spec(Outer())
    assert isinstance(info.value, FusionError)


def test_torchvision_resnet18_groups() -> None:
    spec = permutation_spec(torchvision.models.resnet18(weights=None))
    # stem + layer1's residual stream, one inner group per block, and per later stage the residual stream
    assert len(spec.groups) == 1 + 2 + 3 * 3
    stream = spec.groups["conv1"]
    names = {a.name for a in stream.axes}
    assert {"layer1.0.bn2.weight", "layer1.1.bn2.running_var", "layer2.0.downsample.0.weight"} <= names
    assert [f.name for f in spec.fixed] == ["fc"]


def test_torchvision_vgg16_flatten_repeat() -> None:
    spec = permutation_spec(torchvision.models.vgg16(weights=None))
    assert len(spec.groups) == 13 + 2
    assert AxisRef("classifier.0.weight", 1, 0, 49) in spec.groups["features.28"].axes


def test_depthwise_convolution_keeps_the_channel_group() -> None:
    spec = permutation_spec(torchvision.models.mobilenet_v2(weights=None))
    [fixed] = spec.fixed
    assert fixed.name == "classifier.1"
    # the first block: a 3x3 depthwise conv on the stem's 32 channels, then a 1x1 projection
    stem = set(spec.groups["features.0.0"].axes)
    assert {AxisRef("features.1.conv.0.0.weight", 0), AxisRef("features.1.conv.1.weight", 1)} <= stem


def test_axes_moved_to_the_middle_fix_their_group_and_explain_names_the_node() -> None:
    spec = permutation_spec(AxisShuffle(), example_input=torch.randn(2, 1, 4, 4))
    assert not spec.groups
    fixed = {f.name: f for f in spec.fixed}
    assert fixed["conv"].node == "permute" and "moves the features to axis 2" in fixed["conv"].reason
    assert (
        "fixed conv (3 units) at node 'permute': moves the features to axis 2, neither axis 1 nor the last"
        in (spec.explain())
    )
