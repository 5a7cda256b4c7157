"""Activation matching against planted permutations; bad data loaders."""

from __future__ import annotations

import pytest
import torch

from modelfuse import zoo
from modelfuse.align import activation_matching, align, apply_permutation, permutation_spec
from modelfuse.errors import AlignmentError, ConfigError


@pytest.mark.parametrize(
    ("name", "kwargs"), [("mlp", {"hidden": (32, 16)}), ("cnn", {"batch_norm": True}), ("resnet_small", {})]
)
def test_recovers_a_planted_permutation(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    a = zoo.create_model(name, input_shape=(1, 8, 8), num_classes=10, **kwargs).eval()
    spec = permutation_spec(a)
    gen = torch.Generator().manual_seed(1)
    planted = {g: torch.randperm(grp.size, generator=gen) for g, grp in spec.groups.items()}
    b = apply_permutation(a, spec, planted)
    data = [(torch.randn(64, 1, 8, 8), torch.zeros(64)) for _ in range(3)]
    b.train()
    m = activation_matching(spec, a, b, data)
    assert b.training  # the caller's modules keep their mode
    for g, p in planted.items():  # identical units correlate perfectly: the inverse is found
        assert torch.equal(m.perms[g], torch.argsort(p)), g
    aligned = align(b, to=a, method="activation_matching", data=data)
    for key, t in a.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], t), key


def test_batches_that_do_not_fit_the_model() -> None:
    a = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(8,))
    with pytest.raises(AlignmentError, match=r"a batch of shape \(4, 3, 5\) does not fit the model"):
        align(a, to=a, method="activation_matching", data=[torch.randn(4, 3, 5)])
    with pytest.raises(AlignmentError, match="no batches"):
        align(a, to=a, method="activation_matching", data=[])
    with pytest.raises(ConfigError, match=r"missing required option\(s\): data"):
        align(a, to=a, method="activation_matching")
