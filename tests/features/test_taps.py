"""Taps: shapes against a forward-hook run written here, FX against hooks, fallbacks and errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from modelfuse.errors import FeatureError
from modelfuse.features import TapExtractor, taps
from modelfuse.zoo import create_model

torchvision = pytest.importorskip("torchvision")

ZOO = [
    ("cnn", (3, 32, 32)),
    ("vgg_small", (3, 32, 32)),
    ("resnet_small", (3, 32, 32)),
    ("mlp", (1, 8, 8)),
    ("cnn1d", (1, 40)),
]


def hooked_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every named module's output at its first call, by plain forward hooks over one full forward pass."""
    outs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:  # returns None: output unchanged
            if name not in outs:
                outs[name] = out.clone()  # later in-place ops (ReLU(inplace=True), +=) must not reach it

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    model.eval()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return outs


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:
            x = x * 2
        return self.body(x).mean((2, 3))


@pytest.mark.parametrize(("arch", "shape"), ZOO, ids=[a for a, _ in ZOO])
def test_zoo_taps_have_the_shapes_hooks_see(arch, shape):
    torch.manual_seed(0)
    model = create_model(arch, input_shape=shape, num_classes=10)
    listed = taps(model, shape)
    reference = hooked_outputs(model, torch.zeros(2, *shape))
    modules = {t.name: t.shape for t in listed if t.kind == "module"}
    assert modules == {n: tuple(o.shape[1:]) for n, o in reference.items()}
    assert listed.method == "fx"
    assert listed.names()[-1] == "classifier" and listed["classifier"].shape == (10,)


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_torchvision_taps_have_the_shapes_hooks_see(arch):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    listed = taps(model, (3, 32, 32))
    reference = hooked_outputs(model, torch.zeros(2, 3, 32, 32))
    assert {t.name: t.shape for t in listed if t.kind == "module"} == {
        n: tuple(o.shape[1:]) for n, o in reference.items()
    }
    if arch == "resnet18":
        assert listed["layer4"].shape == (512, 1, 1)
        assert listed["layer1.0.add"].kind == "node"
        assert listed["layer1.0.add"].shape == reference["layer1.0.bn2"].shape[1:]
        assert listed["flatten"].shape == (512,)
        assert listed["relu"].calls == 1 and listed["layer1.0.relu"].calls == 2
        assert str(listed).splitlines()[1].split() == ["name", "kind", "shape"]
    else:
        assert listed["features"].shape == (512, 1, 1)


def test_fx_and_hooks_read_the_same_values():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    reference = hooked_outputs(model, x)
    for tap in ("layer2", "layer3.1.bn2", "avgpool"):
        fx, hooks = TapExtractor(model, tap, method="fx"), TapExtractor(model, tap, method="hooks")
        assert (fx.method, hooks.method) == ("fx", "hooks")
        with torch.no_grad():
            torch.testing.assert_close(fx(x), reference[tap])
            torch.testing.assert_close(hooks(x), reference[tap])
    node = TapExtractor(model, "layer1.0.add")
    assert node.kind == "node"
    with torch.no_grad():
        torch.testing.assert_close(torch.relu(node(x)), reference["layer1.0"])


def test_hooks_stop_the_forward_pass_at_the_tap():
    model = create_model("cnn", input_shape=(3, 16, 16), num_classes=10).eval()
    ran = []
    model.classifier.register_forward_hook(lambda *_: ran.append(True))
    out = TapExtractor(model, "features.conv2", method="hooks")(torch.zeros(1, 3, 16, 16))
    assert out.shape == (1, 64, 4, 4) and ran == []
    assert not model.features.conv2._forward_hooks  # its own hook is gone


def test_untraceable_model_falls_back_to_hooks():
    torch.manual_seed(0)
    model = Untraceable().eval()
    ext = TapExtractor(model, "body")
    assert ext.method == "hooks" and "does not trace" in ext.why_not_fx
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ext(x), hooked_outputs(model, x)["body"])
    listed = taps(model, (3, 8, 8))
    assert listed.method == "hooks" and listed.names() == ["conv", "body.0", "body.1", "body"]
    with pytest.raises(FeatureError, match="does not trace"):
        TapExtractor(model, "body", method="fx")


def test_unknown_tap_lists_the_closest_names_and_changes_nothing():
    model = torchvision.models.resnet18(weights=None)
    model.layer2.train(False)
    modes = [m.training for m in model.modules()]
    with pytest.raises(
        FeatureError, match=r"no tap 'layer5'.*Closest available: 'layer4'.*taps\(model, input_shape\)"
    ):
        TapExtractor(model, "layer5")
    with pytest.raises(FeatureError, match=r"'layer1\.0\.relu_1'"):
        TapExtractor(model, "layer1.0.relu_2")
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(FeatureError, match="Only module taps are available"):
        TapExtractor(Untraceable(), "body.2")


def test_unknown_tap_on_a_small_model_lists_every_name_when_none_is_close():
    model = create_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    names = [t.name for t in taps(model, (1, 8, 8))]
    assert 0 < len(names) <= 20
    with pytest.raises(FeatureError) as err:
        TapExtractor(model, "zzz")
    message = str(err.value)
    assert "Closest" not in message and "Available: " in message
    assert all(repr(n) in message for n in names)
    # a large model gets the pointer to taps() instead of a list of hundreds of names
    with pytest.raises(FeatureError) as err:
        TapExtractor(torchvision.models.resnet18(weights=None), "zzz")
    assert "Available: " not in str(err.value) and "taps(model, input_shape) lists all" in str(err.value)


def test_taps_without_torchvision_are_module_taps_read_by_hooks():
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torchvision":
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, Block())
        import torch
        from modelfuse.features import Branch, FeatureFusion, taps
        from modelfuse.zoo import create_model

        a = create_model("vgg_small", input_shape=(3, 16, 16), num_classes=10)
        b = create_model("resnet_small", input_shape=(3, 16, 16), num_classes=10)
        listed = taps(a, (3, 16, 16))
        assert listed.method == "hooks" and all(t.kind == "module" for t in listed)
        f = FeatureFusion([Branch(a, "features"), Branch(b, "layers")], fuse="concat", num_classes=10,
                          input_shape=(3, 16, 16))
        assert f(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
        assert "torchvision" not in sys.modules
        print("ok", f.describe().count("read by hooks"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "2"]


class Scaled(nn.Module):
    """A buffer used at the top level: the traced graph holds it as an attribute of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(2.0))
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x * self.scale)


def test_moving_the_model_retraces_only_when_a_traced_buffer_changed():
    model = Scaled()
    ext = TapExtractor(model, "conv")
    traced = ext._fx
    model.to("cpu")  # nothing moves: the graph stays
    ext.refresh()
    assert ext._fx is traced
    model.double()  # the buffer is a new tensor now: the graph is re-traced over the model
    ext.refresh()
    assert ext._fx is None
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        out = ext(x)
        torch.testing.assert_close(out, model.conv(x * 2))
    assert out.dtype == torch.float64 and ext._fx is not None and ext._fx is not traced


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.spare = nn.Linear(4, 4)  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_module_that_does_not_run_is_refused_when_read():
    ext = TapExtractor(Unused(), "spare")
    assert ext.method == "hooks" and "no operation of its own" in ext.why_not_fx
    with pytest.raises(FeatureError, match="'spare' of Unused did not run in the forward pass"):
        ext(torch.zeros(1, 3, 5, 5))
    assert "spare" not in taps(Unused(), (3, 5, 5))
