"""Permuted networks compute the same function as the originals."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from modelfuse import zoo
from modelfuse.align import AxisRef, PermutationGroup, PermutationSpec, apply_permutation, permutation_spec
from modelfuse.align.permute import permute_state_dict
from modelfuse.errors import AlignmentError
from tests.align.models import CatNet, FlattenNet

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
