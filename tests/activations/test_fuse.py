"""fuse_activations / collapse / report: exact identity start on every zoo model, bad inputs, by hand."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import fx, nn

from modelfuse.activations import (
    ActivationMix,
    ActivationWarning,
    collapse,
    fuse_activations,
    report,
    summarize,
)
from modelfuse.errors import ActivationError
from modelfuse.zoo import create_model, get_model, list_models

ZOO = [(name, shape) for name in list_models() for shape in get_model(name).input_shapes]


def mixtures(model):
    return [m for m in model.modules() if isinstance(m, ActivationMix)]


@pytest.mark.parametrize("granularity", ["layer", "channel", "global"])
@pytest.mark.parametrize(("name", "shape"), ZOO, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in ZOO])
def test_identity_start_equals_the_original_on_every_zoo_model(name, shape, granularity):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_activations(model, granularity=granularity).eval()
    x = torch.randn(4, *shape) * 3
    assert torch.equal(fused(x), model(x))
    n_relu = sum(isinstance(m, nn.ReLU) for m in model.modules())
    assert len(mixtures(fused)) == n_relu > 0
    left = [n for n, m in fused.named_modules() if isinstance(m, nn.ReLU) and ".candidates." not in n]
    assert left == []  # every ReLU left is a candidate inside a mixture
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    if granularity == "global":
        assert len({id(m.mix) for m in mixtures(fused)}) == 1
        assert sum(p.numel() for m in mixtures(fused) for p in m.parameters()) > 0
        assert len(list(nn.ModuleList(mixtures(fused)).parameters())) == 2  # logits and blend, once


def test_torchvision_resnet18_identity_start_is_exact():
    import torchvision  # the "vision" extra, installed for development

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    fused = fuse_activations(model).eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(fused(x), model(x))
    # the block's one nn.ReLU(inplace=True) is called twice: one mixture, used twice
    assert len(mixtures(fused)) == 9


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)
        self.act = nn.ELU()

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = torch.tanh(h) + F.leaky_relu(h, 0.2) + F.gelu(h, approximate="tanh")
        h = self.act(self.fc2(h)).sigmoid()
        return self.fc3(F.silu(h))


def test_functional_calls_are_replaced_through_fx():
    torch.manual_seed(0)
    model = Functional().eval()
    fused = fuse_activations(model)
    x = torch.randn(5, 6) * 3
    assert torch.equal(fused(x), model(x))
    assert isinstance(fused, fx.GraphModule)
    assert len(mixtures(fused)) == 7  # relu, tanh, leaky_relu, gelu, sigmoid, silu + the nn.ELU
    targets = {n.target for n in fused.graph.nodes if n.op in ("call_function", "call_method")}
    assert not targets & {F.relu, torch.tanh, F.leaky_relu, F.gelu, F.silu, "sigmoid"}
    by_start = {m.names[int(m.mixing_weights().argmax())] for m in mixtures(fused)}
    assert by_start == {"relu", "tanh", "leaky_relu", "gelu", "sigmoid", "silu", "elu"}
    leaky = next(m for m in mixtures(fused) if "leaky_relu" in m.names)
    assert leaky.candidates[leaky.names.index("leaky_relu")].negative_slope == 0.2
    gelu = next(m for m in mixtures(fused) if m.names[int(m.mixing_weights().argmax())] == "gelu")
    assert gelu.candidates[gelu.names.index("gelu")].approximate == "tanh"


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.GELU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = F.relu(x)
        return self.act(self.fc(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Untraceable()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(F.silu(self.inner(x)))


def test_untraceable_module_keeps_its_functional_calls_with_a_warning():
    torch.manual_seed(0)
    model = Outer().eval()
    with pytest.warns(
        ActivationWarning, match=r"module 'inner' \(Untraceable\) does not trace.*left unchanged"
    ):
        fused = fuse_activations(model)
    x = torch.randn(3, 4)
    assert torch.equal(fused(x), model(x)) and torch.equal(fused(-x), model(-x))
    assert isinstance(fused.inner.act, ActivationMix)  # the module was replaced
    assert type(fused.inner) is Untraceable  # the functional F.relu there was not
    assert len(mixtures(fused)) == 2  # inner.act and the outer F.silu


def test_no_activations_and_unknown_names_are_errors():
    with pytest.raises(ActivationError, match="Sequential has no activations to replace"):
        fuse_activations(nn.Sequential(nn.Linear(3, 3), nn.Identity(), nn.Linear(3, 2)))
    with pytest.raises(ActivationError, match=r"unknown activation name\(s\) 'swish'.*Valid names:.*silu"):
        fuse_activations(nn.Sequential(nn.ReLU()), candidates=("relu", "swish"))
    with pytest.raises(ActivationError, match="granularity must be"):
        fuse_activations(nn.Sequential(nn.ReLU()), granularity="unit")
    with pytest.raises(ActivationError, match="cannot start at each"):
        fuse_activations(nn.Sequential(nn.ReLU(), nn.Tanh()), granularity="global")
    with pytest.raises(ActivationError, match="every mixture needs the same candidates"):
        fuse_activations(
            nn.Sequential(nn.ELU(), nn.SELU()), candidates=("relu",), granularity="global", init=None
        )


def test_original_activation_not_in_candidates_is_added_first():
    fused = fuse_activations(
        nn.Sequential(nn.Linear(2, 2), nn.Softplus(beta=2.0)), candidates=("relu", "tanh")
    )
    mix = fused[1]
    assert mix.names == ("softplus", "relu", "tanh")
    assert mix.candidates[0].beta == 2.0
    x = torch.randn(4, 2)
    assert torch.equal(fused(x), nn.Sequential(fused[0], nn.Softplus(beta=2.0))(x))


def test_uniform_init_and_global_weights_can_be_asked_for():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh())
    fused = fuse_activations(model, candidates=("relu", "tanh"), init=None, granularity="global")
    x = torch.randn(5, 3, dtype=torch.float64)
    fused = fused.double()
    h = fused[0](x)
    h = 0.5 * torch.relu(h) + 0.5 * torch.tanh(h)
    h = fused[2](h)
    torch.testing.assert_close(fused(x), 0.5 * torch.relu(h) + 0.5 * torch.tanh(h), rtol=1e-12, atol=1e-12)


def _set_weights(mix: ActivationMix, w):
    with torch.no_grad():
        mix.mix.coefficients.copy_(torch.as_tensor(w, dtype=mix.mix.coefficients.dtype))


def test_collapse_replaces_near_one_hot_mixtures_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    fused = fuse_activations(model, candidates=("relu", "gelu", "tanh"), weights="free")
    _set_weights(fused[1], [0.0005, 0.9997, -0.0004])  # within 1e-3 of gelu
    _set_weights(fused[3], [0.7, 0.2, 0.1])  # a real mixture
    # fused[5] stays exactly relu
    out = collapse(fused, tol=1e-3)
    assert type(out[1]) is nn.GELU and type(out[5]) is nn.ReLU and isinstance(out[3], ActivationMix)
    assert isinstance(fused[1], ActivationMix)  # collapse copies
    x = torch.randn(16, 4) * 3
    h = fused[0](x)
    bound = 1e-3 * (h.relu().abs() + F.gelu(h).abs() + h.tanh().abs())
    assert ((out[1](h) - fused[1](h)).abs() <= bound + 1e-7).all()
    assert torch.equal(out[5](h), fused[5](h))
    assert isinstance(collapse(fused, tol=0.29)[3], ActivationMix)  # [0.7, 0.2, 0.1] is 0.3 from one-hot
    assert type(collapse(fused, tol=0.31)[3]) is nn.ReLU


def test_collapse_channel_mixture_needs_one_candidate_on_every_channel():
    a = ActivationMix(("relu", "tanh"), granularity="channel", num_channels=3, weights="free")
    with torch.no_grad():
        a.mix.coefficients.copy_(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert collapse(a, tol=1e-3) is not a and isinstance(collapse(a, tol=1e-3), ActivationMix)
    with torch.no_grad():
        a.mix.coefficients.copy_(torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert type(collapse(a, tol=0.0)) is nn.ReLU


def test_report_lists_weights_top_and_entropy_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
    fused = fuse_activations(model, candidates=("relu", "gelu", "silu", "tanh"), init=None)
    with torch.no_grad():
        fused[1].mix.logits.copy_(torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1])))
    buf = io.StringIO()
    rows = report(fused, console=Console(file=buf, width=200))
    assert [r.name for r in rows] == ["1", "3"]
    r = rows[0]
    assert r.top == "relu" and math.isclose(r.top_weight, 0.7, rel_tol=1e-6)
    expected_entropy = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert math.isclose(r.entropy, expected_entropy, rel_tol=1e-6)
    assert math.isclose(rows[1].entropy, math.log(4), rel_tol=1e-6)  # uniform
    np.testing.assert_allclose(r.weights, [0.7, 0.1, 0.1, 0.1], rtol=1e-6)
    text = buf.getvalue()
    assert "relu=0.70" in text and "1.386" in text
    assert summarize(nn.Linear(2, 2)) == []


def test_mixtures_train_through_the_zoo_loop_and_leave_their_start():
    from torch.utils.data import TensorDataset

    from modelfuse.data import load
    from modelfuse.zoo import train

    digits = load("digits")
    x, y = digits.train.tensors
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=digits.input_shape, num_classes=10, hidden=[32])
    fused = fuse_activations(model, candidates=("relu", "tanh"))
    blends = [m.mix.blend for m in mixtures(fused)]
    assert all(float(b.detach()) == 0.0 for b in blends)
    train(fused, TensorDataset(x[:256], y[:256]), epochs=1, seed=0, lr=1e-2, progress=False)
    w = mixtures(fused)[0].mixing_weights().detach()
    assert float(blends[0].detach()) != 0.0 and (w >= 0).all() and abs(float(w.sum()) - 1.0) < 1e-6


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        a = F.relu(h, inplace=True)  # h is used again below: rewriting this would change the sum
        b = self.fc(x).tanh_()  # its input is used nowhere else: safe to rewrite
        return a + h + b


def test_in_place_calls_are_rewritten_only_where_nothing_else_reads_their_input():
    torch.manual_seed(0)
    model = InPlace()
    with pytest.warns(ActivationWarning, match=r"relu\(\) in the model itself .* writes its input in place"):
        fused = fuse_activations(model)
    x = torch.randn(3, 4)
    assert torch.equal(fused(x), model(x))
    assert [m.names[int(m.mixing_weights().argmax())] for m in mixtures(fused)] == ["tanh"]


def test_fused_state_dict_round_trips_and_bad_tol_is_refused():
    torch.manual_seed(0)
    model = create_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(8, 16))
    a = fuse_activations(model, granularity="channel").eval()
    x = torch.randn(2, 1, 8, 8)
    a(x)  # materialises the channel weights
    with torch.no_grad():
        for m in mixtures(a):
            m.mix.blend.fill_(0.5)
            m.mix.logits.normal_()
    b = fuse_activations(model, granularity="channel").eval()
    b.load_state_dict(a.state_dict())  # b's channel weights are still lazy
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), model.eval()(x))
    with pytest.raises(ActivationError, match="tol must be a non-negative number"):
        collapse(a, tol=-1.0)
