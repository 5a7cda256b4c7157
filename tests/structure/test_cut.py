"""cut / cut_points: the halves compose to the model exactly; invalid points say why and where to cut."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelfuse.errors import StructureError
from modelfuse.structure import cut, cut_points, trace
from modelfuse.zoo import create_model, get_model, list_models

ZOO = [(name, shape) for name in list_models() for shape in get_model(name).input_shapes]


def _model(name: str, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, input_shape=shape, num_classes=10).eval()


def expected_cut_points(model: nn.Module, flatten_after: str | None = None) -> list[str]:
    """The cut points of ``model`` derived from its module tree, not from the graph: children run in
    registration order (true of the zoo and of torchvision's ResNet / VGG), every leaf module is one
    point named by its path with dots as underscores (FX's node names); inside a residual block
    (``BasicBlock``) the block's input is still needed by the shortcut, so a block gives only its
    addition (FX's ``add``, ``add_1``, ... in order) and the second call of its ReLU (``..._relu_1``).
    ``flatten_after`` names the module after which the forward calls ``torch.flatten`` (a function:
    node ``flatten``)."""
    names: list[str] = []
    adds = 0

    def walk(module: nn.Module, path: str) -> None:
        nonlocal adds
        node = path.replace(".", "_")
        if type(module).__name__ == "BasicBlock":
            names.extend(["add" if adds == 0 else f"add_{adds}", f"{node}_relu_1"])
            adds += 1
            return
        children = list(module.named_children())
        if not children:
            names.append(node)
        for name, child in children:
            walk(child, f"{path}.{name}" if path else name)
        if path and path == flatten_after:
            names.append("flatten")

    walk(model, "")
    return names


@pytest.mark.parametrize(("name", "shape"), ZOO, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in ZOO])
@torch.no_grad()
def test_every_cut_of_every_zoo_model_composes_exactly(name, shape):
    model = _model(name, shape)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    points = cut_points(model, shape)
    assert [p.name for p in points] == expected_cut_points(model)
    for point in points:
        front, back = cut(model, point.name)
        middle = front(x)
        assert tuple(middle.shape[1:]) == point.shape, point
        assert torch.equal(back(middle), expected), point


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
@torch.no_grad()
def test_every_cut_of_torchvision_models_composes_exactly(arch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    traced = trace(model)  # traced once; cut takes the GraphModule as it is
    points = cut_points(traced, x)
    # resnet18: 4 stem modules + 2 per BasicBlock (8 blocks) + avgpool, flatten, fc = 23;
    # vgg16: 31 feature layers + avgpool, flatten + 7 classifier layers = 40
    names = expected_cut_points(model, flatten_after="avgpool")
    assert len(names) == {"resnet18": 4 + 2 * 8 + 3, "vgg16": 31 + 2 + 7}[arch]
    assert [p.name for p in points] == names
    for point in points:
        front, back = cut(traced, point.name)
        assert torch.equal(back(front(x)), expected), point
    # a module path cuts after that module: resnet18's layer2 ends its second stage
    front, back = cut(model, "layer2" if arch == "resnet18" else "features.16")
    assert front(x).shape == ((1, 128, 4, 4) if arch == "resnet18" else (1, 256, 4, 4))
    assert torch.equal(back(front(x)), expected)


def test_cut_points_of_a_resnet_skip_the_inside_of_residual_blocks():
    model = _model("resnet_small", (3, 32, 32))
    points = cut_points(model, (3, 32, 32))
    # inside a BasicBlock the block's input is still needed by the shortcut: one addition and the
    # block's last ReLU per block, between the stem's three modules and the head's four
    assert [p.name for p in points] == expected_cut_points(model)
    assert [p.name for p in points][:6] == [
        "stem_conv",
        "stem_bn",
        "stem_relu",
        "add",
        "layers_layer1_0_relu_1",
        "add_1",
    ]
    assert len(points) == 3 + 2 * 3 + 4
    shapes = {p.name: p.shape for p in points}
    assert shapes["layers_layer2_0_relu_1"] == (32, 16, 16) and shapes["flatten"] == (64,)
    assert "layers.layer2.0" in next(p for p in points if p.name == "layers_layer2_0_relu_1").ends


@torch.no_grad()
def test_cut_at_a_module_path_is_after_that_module():
    model = _model("resnet_small", (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    hook = model.layers.layer2.register_forward_hook(lambda m, i, o: seen.update(out=o))
    expected = model(x)
    hook.remove()
    front, back = cut(model, "layers.layer2")
    assert torch.equal(front(x), seen["out"])
    assert torch.equal(back(front(x)), expected)
    with pytest.raises(StructureError, match="a module inside the traced graph, not one node of it"):
        cut(trace(model), "layers.layer2")  # a GraphModule is cut as traced, at its nodes
    # a leaf module's path names its node: features.conv2 of a cnn is a block, features.conv2.relu a leaf
    cnn = _model("cnn", (1, 8, 8))
    y = torch.randn(2, 1, 8, 8)
    front, _ = cut(cnn, "features.conv2.relu")
    features = cnn.features
    assert torch.equal(front(y), features.conv2.relu(features.conv2.conv(features.conv1(y))))


def test_halves_share_the_models_parameters():
    model = _model("cnn", (1, 8, 8))
    front, back = cut(model, "features.conv2")
    assert front.features.conv1.conv.weight is model.features.conv1.conv.weight
    assert back.classifier.weight is model.classifier.weight
    assert not hasattr(front, "classifier")


def test_cut_inside_a_residual_block_names_the_nearest_valid_points():
    model = _model("resnet_small", (3, 32, 32))
    with pytest.raises(StructureError) as err:
        cut(model, "layers_layer1_0_conv1")
    msg = str(err.value)
    assert "cannot cut ResNet at 'layers_layer1_0_conv1'" in msg
    assert (
        "2 tensors cross the cut" in msg
        and "stem_relu" in msg
        and "no single tensor carries the state" in msg
    )
    assert "Nearest valid cut points: stem_relu (before), add (after)" in msg and "cut_points(model)" in msg
    with pytest.raises(StructureError, match=r"'layers.layer2.0.bn1' \(node layers_layer2_0_bn1\)"):
        cut(model, "layers.layer2.0.bn1")


def test_cut_at_an_unknown_name_lists_close_names():
    model = _model("resnet_small", (3, 32, 32))
    with pytest.raises(StructureError) as err:
        cut(model, "layers.layer1.0.conv")
    msg = str(err.value)
    assert "has no node or module named 'layers.layer1.0.conv'" in msg
    assert "Closest names: " in msg and "layers.layer1.0.conv1" in msg and "layers.layer1.0.conv2" in msg


def test_cut_at_a_module_called_twice_asks_for_a_node_name():
    model = _model("resnet_small", (3, 32, 32))  # a BasicBlock calls its ReLU twice
    with pytest.raises(
        StructureError, match=r"called 2 times \(nodes layers_layer1_0_relu, layers_layer1_0_relu_1\)"
    ):
        cut(model, "layers.layer1.0.relu")


def test_cut_at_the_input_or_output_is_refused():
    model = _model("cnn", (1, 8, 8))
    with pytest.raises(StructureError, match="it is the model's input"):
        cut(model, "x")
    with pytest.raises(StructureError, match="it is the model's output"):
        cut(model, "output")


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on data: torch.fx cannot trace it
            return self.fc(x)
        return x


def test_untraceable_model_says_how_to_proceed():
    with pytest.raises(StructureError, match=r"not traceable by torch\.fx.*pass the GraphModule"):
        cut(_DataDependent(), "fc")


def test_example_of_the_wrong_shape_is_reported():
    with pytest.raises(StructureError, match=r"fails on the example input of shape \(2, 3, 8, 8\)"):
        cut_points(_model("cnn", (1, 8, 8)), (3, 8, 8))
