"""Parallel and Serial: outputs equal the parts run separately; state dicts keep readable names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelfuse.errors import ConfigError, RegistryError, StructureError
from modelfuse.structure import Parallel, Serial
from modelfuse.zoo import create_model


def _cnn(seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("cnn", input_shape=(1, 8, 8), num_classes=10, **kwargs).eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_parallel_combines_the_branches_outputs(x):
    a, b = _cnn(0), _cnn(1)
    ya, yb = a(x), b(x)
    assert torch.equal(Parallel({"a": a, "b": b}, "stack")(x), torch.stack([ya, yb], dim=1))
    assert torch.equal(Parallel({"a": a, "b": b}, "stack", dim=0)(x), torch.stack([ya, yb]))
    assert torch.equal(Parallel([a, b], "concat")(x), torch.cat([ya, yb], dim=1))
    torch.testing.assert_close(Parallel([a, b], "sum")(x), ya + yb, rtol=0, atol=1e-6)
    torch.testing.assert_close(Parallel([a, b], "mean")(x), (ya + yb) / 2, rtol=0, atol=1e-6)
    assert torch.equal(Parallel([a, b], lambda outs: outs[0] - outs[1])(x), ya - yb)
    assert Parallel({"a": a, "b": b}).branch_outputs(x).keys() == {"a", "b"}


@torch.no_grad()
def test_parallel_state_dict_is_readable_and_loads_back(x):
    model = Parallel({"rgb": _cnn(0), "depth": _cnn(1)}, "concat")
    state = model.state_dict()
    assert "branches.rgb.features.conv1.conv.weight" in state
    assert "branches.depth.classifier.bias" in state
    assert all(k.startswith(("branches.rgb.", "branches.depth.")) for k in state)
    fresh = Parallel({"rgb": _cnn(5), "depth": _cnn(6)}, "concat")
    assert not torch.equal(fresh(x), model(x))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(model["rgb"].classifier.weight, state["branches.rgb.classifier.weight"])


@torch.no_grad()
def test_serial_runs_the_stages_in_turn_and_keeps_names():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 16))
    head = nn.Linear(16, 3)
    model = Serial({"encoder": encoder, "head": head})
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), head(encoder(x)))
    assert set(model.state_dict()) == {
        "stages.encoder.1.weight",
        "stages.encoder.1.bias",
        "stages.head.weight",
        "stages.head.bias",
    }
    fresh = Serial({"encoder": nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), "head": nn.Linear(16, 3)})
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))
    assert len(model) == 2 and list(model) == [encoder, head]
    assert next(iter(Serial([encoder, head]).state_dict())) == "stages.0.1.weight"


def test_parallel_with_mismatched_shapes_names_the_branches(x):
    a, b = _cnn(0), _cnn(1, widths=(8, 8, 8))
    wide = nn.Sequential(a, nn.Linear(10, 12))
    with pytest.raises(StructureError) as err:
        Parallel({"a": a, "wide": wide}, "sum")(x)
    msg = str(err.value)
    assert "branch 'wide' gives outputs of shape (5, 12), branch 'a' (5, 10)" in msg
    assert "combine='sum' needs equal shapes; use combine='concat'" in msg
    assert Parallel({"a": a, "wide": wide}, "concat")(x).shape == (5, 22)
    with pytest.raises(StructureError, match="equal shapes except along dim 0"):
        Parallel({"a": a, "wide": wide}, "concat", dim=0)(x)
    assert Parallel([a, b], "mean")(x).shape == (5, 10)


def test_bad_compositions_are_refused():
    with pytest.raises(ConfigError, match="needs at least one module"):
        Parallel([])
    with pytest.raises(ConfigError, match=r"without '\.'"):
        Parallel({"a.b": nn.Identity()})
    with pytest.raises(ConfigError, match=r"'x' is a str, not a torch\.nn\.Module"):
        Serial({"x": "conv"})
    with pytest.raises(RegistryError, match="unknown branch combine 'max'"):
        Parallel([nn.Identity()], "max")
    with pytest.raises(StructureError, match="branch '0' returns a tuple"):
        Parallel([_Pair(), _Pair()], "stack")(torch.ones(2))


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x
