"""Packed ensembles against their members run one by one: outputs, BatchNorm statistics, gradients, round trips."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelfuse.ensemble import Ensemble
from modelfuse.ensemble.packed import PackedEnsemble, pack, supported_modules, unpack
from modelfuse.errors import ConfigError, EnsembleError
from modelfuse.zoo import create_model, get_model, list_models


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Single-threaded: these small models run faster so, above all on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ZOO_CASES = [(name, shape) for name in list_models() for shape in get_model(name).input_shapes]


def randomise_norms(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics, affine parameters and batch counts that differ per member, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(mod, "weight", None) is not None:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)
                if getattr(mod, "bias", None) is not None:
                    mod.bias.copy_(torch.rand(mod.bias.shape, generator=gen) - 0.5)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
                mod.num_batches_tracked.fill_(seed + 3)
    return model


def zoo_members(name: str, shape: tuple[int, ...], k: int = 3) -> list[nn.Module]:
    members = []
    for i in range(k):
        torch.manual_seed(i)
        members.append(randomise_norms(create_model(name, input_shape=shape, num_classes=5), i).eval())
    return members


def resnet18_members(k: int = 2) -> list[nn.Module]:
    from torchvision.models import resnet18

    members = []
    for i in range(k):
        torch.manual_seed(i)
        members.append(randomise_norms(resnet18(num_classes=10), i).eval())
    return members


def batch(shape: tuple[int, ...], n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def stacked(members: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return torch.stack([m(x) for m in members])


def assert_states_close(members: list[nn.Module], packed: PackedEnsemble, atol: float = 1e-6) -> None:
    """Every parameter and buffer of each unpacked member equals the member's (counts exactly)."""
    for i, (m, u) in enumerate(zip(members, unpack(packed))):
        ref, got = m.state_dict(), u.state_dict()
        assert list(ref) == list(got)
        for key in ref:
            if ref[key].is_floating_point():
                torch.testing.assert_close(got[key], ref[key], atol=atol, rtol=0, msg=f"member {i} {key}")
            else:
                assert torch.equal(got[key], ref[key]), (i, key)


# ------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize(
    ("name", "shape"), ZOO_CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in ZOO_CASES]
)
def test_zoo_packed_equals_members_in_eval_mode(name, shape):
    members = zoo_members(name, shape)
    packed = pack(members)
    assert packed.num_members == 3 and not packed.training
    x = batch(shape)
    with torch.no_grad():
        expected, got = stacked(members, x), packed(x)
    assert got.shape == (3, 6, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("name", "shape"), ZOO_CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in ZOO_CASES]
)
def test_zoo_packed_equals_members_in_train_mode(name, shape):
    """Batch statistics are per member channel block: outputs and updated running statistics match."""
    members = zoo_members(name, shape)
    packed = pack(members).train()
    for m in members:
        m.train()
    x = batch(shape, n=8, seed=1)
    expected, got = stacked(members, x), packed(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert_states_close(members, packed)


def test_torchvision_resnet18_packed_equals_members():
    members = resnet18_members()
    packed = pack(members)
    x = batch((3, 32, 32), n=4)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)


def test_torchvision_resnet18_train_mode_in_float64():
    """Train mode in float64: at 32x32 the last stage is 1x1, so BatchNorm divides by the spread of
    4 values and magnifies float32 rounding (differently ordered sums) to ~3e-5; in float64 it vanishes."""
    members = [m.double().train() for m in resnet18_members()]
    packed = pack(members).train()
    x = batch((3, 32, 32), n=4).double()
    out, expected = packed(x), stacked(members, x)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    assert_states_close(members, packed, atol=1e-12)
    # gradients, also through the layers that run per member (wide groups: layer3, layer4)
    out.square().sum().backward()
    expected.square().sum().backward()
    for name in (
        "conv1.weight",
        "layer2.0.conv1.weight",
        "layer4.1.conv2.weight",
        "layer4.1.bn2.weight",
        "fc.bias",
    ):
        want = torch.cat([m.get_parameter(name).grad for m in members])
        torch.testing.assert_close(packed.get_parameter(name).grad, want, atol=1e-9, rtol=1e-9, msg=name)


def test_single_member_equals_the_member():
    (member,) = zoo_members("resnet_small", (3, 32, 32), k=1)
    x = batch((3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(pack([member])(x), member(x).unsqueeze(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_memory_format_does_not_change_values(channels_last):
    members = zoo_members("vgg_small", (1, 8, 8))
    packed = pack(members, channels_last=channels_last)
    weight = packed.get_submodule("features.conv1_2.conv").weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert weight.is_contiguous() != channels_last
    x = batch((1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)


def test_output_plugs_into_ensemble_combiners():
    members = zoo_members("cnn", (1, 8, 8))
    ensemble = Ensemble(members, combine="mean_prob", weights=[0.5, 0.3, 0.2])
    packed = pack(ensemble.members)  # a ModuleList of frozen members
    assert not any(p.requires_grad for p in packed.parameters())
    x = batch((1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(ensemble.combine_outputs(packed(x)), ensemble(x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ state and round trips


@pytest.mark.parametrize("arch", [*list_models(), "resnet18"])
def test_unpack_round_trip_is_exact(arch):
    members = (
        resnet18_members(3) if arch == "resnet18" else zoo_members(arch, get_model(arch).input_shapes[-1])
    )
    before = [copy.deepcopy(m.state_dict()) for m in members]
    packed = pack(members)
    unpacked = unpack(packed)
    assert len(unpacked) == 3
    for i, (m, u, state) in enumerate(zip(members, unpacked, before)):
        assert type(u) is type(m) and not u.training
        got, ref = u.state_dict(), m.state_dict()
        assert list(got) == list(ref)
        for key in ref:
            assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), (i, key)
            assert torch.equal(ref[key], state[key]), f"pack changed member {i}'s {key}"
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(u.parameters(), m.parameters()))


class Spare(nn.Module):
    """Tensors the forward never reads: an unused head, a non-persistent buffer, a top-level parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
        self.register_buffer("scratch", torch.randn(5), persistent=False)
        self.temperature = nn.Parameter(torch.randn(()))

    def forward(self, x):
        return self.fc(x)


def test_unpack_keeps_tensors_the_forward_never_reads():
    members = []
    for i in range(3):
        torch.manual_seed(i)
        members.append(randomise_norms(Spare(), i))
    packed = pack(members)
    for m, u in zip(members, unpack(packed)):
        ref, got = dict(m.named_buffers()), dict(u.named_buffers())
        assert torch.equal(got["scratch"], ref["scratch"])
        assert "scratch" not in u.state_dict()
        for key, value in m.state_dict().items():
            assert torch.equal(u.state_dict()[key], value), key
    assert packed.state_dict()["temperature"].shape == (3,)


def test_batchnorm_cumulative_average_with_different_counts():
    """momentum=None: each member's running statistics average over its own number of batches."""
    members = []
    for i in range(3):
        torch.manual_seed(i)
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(16, 3)
        )
        members.append(randomise_norms(m, i).train())
    packed = pack(members)
    for step in range(2):
        x = batch((2, 4, 4), n=5, seed=step)
        torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)
    assert_states_close(members, packed)
    assert packed.state_dict()["1.num_batches_tracked"].tolist() == [5, 6, 7]


def test_state_dict_is_the_members_concatenated():
    members = zoo_members("resnet_small", (1, 8, 8))
    packed = pack(members)
    state = packed.state_dict()
    refs = [m.state_dict() for m in members]
    assert list(state) == list(refs[0]) or sorted(state) == sorted(refs[0])
    for key, value in state.items():
        parts = [r[key] for r in refs]
        expected = torch.stack(parts) if parts[0].dim() == 0 else torch.cat(parts)
        assert torch.equal(value, expected), key
    assert state["stem.bn.num_batches_tracked"].tolist() == [3, 4, 5]
    # a state_dict loads into another packing of the same architecture
    fresh = pack(zoo_members("resnet_small", (1, 8, 8)))
    fresh.load_state_dict(state)
    x = batch((1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), packed(x), atol=0, rtol=0)


def test_copies_and_conversions():
    members = zoo_members("cnn1d", (1, 40))
    packed = pack(members)
    x = batch((1, 40))
    with torch.no_grad():
        expected = packed(x)
        torch.testing.assert_close(copy.deepcopy(packed)(x), expected, atol=0, rtol=0)
        # pickling rebuilds the generated forward from the template (in memory: no torch.load of objects)
        loaded = pickle.loads(pickle.dumps(packed))
        torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0)
        assert loaded.num_members == 3 and len(unpack(loaded)) == 3
        # a saved state_dict reloads with weights_only=True into a packing of fresh members
        buffer = io.BytesIO()
        torch.save(packed.state_dict(), buffer)
        buffer.seek(0)
        fresh = pack(members[::-1])  # other values in each block until the load
        assert not torch.equal(fresh(x), expected)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        torch.testing.assert_close(fresh(x), expected, atol=0, rtol=0)
        doubled = copy.deepcopy(packed).double()
        out = doubled(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=0)
    assert all(m.state_dict()["features.conv1.conv.weight"].dtype == torch.float64 for m in unpack(doubled))


# ------------------------------------------------------------------------------------ gradients


def test_gradients_equal_separate_training_with_summed_loss():
    members = zoo_members("vgg_small", (1, 8, 8))
    for m in members:
        m.train()
    packed = pack(members)
    assert packed.training
    x, y = batch((1, 8, 8), n=8), torch.arange(8) % 5
    sum(F.cross_entropy(out, y) for out in packed(x)).backward()
    sum(F.cross_entropy(m(x), y) for m in members).backward()
    grads = dict(packed.named_parameters())
    for name, p in grads.items():
        expected = torch.cat([m.get_parameter(name).grad for m in members])
        torch.testing.assert_close(p.grad, expected, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------ layers and ops


class Norms(nn.Module):
    """GroupNorm, LayerNorm over (C, L) and over L, and a LayerNorm head on features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.ln_cl = nn.LayerNorm([8, 10])
        self.ln_l = nn.LayerNorm(10)
        self.act = nn.GELU()
        self.fc = nn.Linear(80, 6)
        self.ln_out = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.act(self.ln_l(self.ln_cl(self.gn(self.conv(x)))))
        return self.head(self.ln_out(self.fc(x.flatten(1))))


class Functional(nn.Module):
    """Functional ops the rewrite supports: sizes, view/reshape, broadcasting, softmax, means, pads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=3, bias=False, padding_mode="reflect")
        self.conv3 = nn.Conv2d(6, 4, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc_seq = nn.Linear(4, 5)  # on the last dim of a (N, C, L) tensor
        self.fc = nn.Linear(4 * 5, 7)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        gate = torch.sigmoid(x.mean((2, 3), keepdim=True))  # (N, C, 1, 1), squeeze-excitation style
        x = x * gate + 0.5 * x
        x = F.leaky_relu(self.conv2(F.pad(x, (1, 1, 1, 1))), 0.1)
        x = F.max_pool2d(x, 2, ceil_mode=True)
        x = self.pool(self.conv3(x))
        n, c = x.size(0), x.size(1)
        seq = F.adaptive_avg_pool1d(x.reshape(n, c, -1), 4)  # (N, C, 4)
        seq = torch.tanh(self.fc_seq(seq))  # (N, C, 5)
        flat = seq.view(seq.size(0), -1)
        logits = self.fc(flat)
        return F.log_softmax(logits, dim=1) - torch.softmax(logits, -1).amax(1, keepdim=True)


@pytest.mark.parametrize(
    ("model", "shape"), [(Norms, (2, 10)), (Functional, (3, 16, 16))], ids=["norms", "functional"]
)
def test_more_layers_and_functional_ops(model, shape):
    members = []
    for i in range(3):
        torch.manual_seed(10 + i)
        members.append(randomise_norms(model(), i).eval())
    packed = pack(members)
    x = batch(shape)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)
    packed.train()
    for m in members:
        m.train()
    torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)


class WithLayer(nn.Module):
    def __init__(self, layer: nn.Module, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(4, width)
        self.block = nn.Sequential(layer)

    def forward(self, x):
        return self.block(self.fc(x))


@pytest.mark.parametrize(
    ("layer", "type_name"),
    [
        (nn.LSTM(8, 8), "torch.nn.modules.rnn.LSTM"),
        (nn.MultiheadAttention(8, 2), "MultiheadAttention"),
        (nn.PReLU(), "PReLU"),
    ],
    ids=["lstm", "attention", "prelu"],
)
def test_refuses_unsupported_layer_by_name_and_type(layer, type_name):
    members = [WithLayer(copy.deepcopy(layer)) for _ in range(2)]
    with pytest.raises(EnsembleError, match=r"module 'block\.0' of type \S*" + type_name):
        pack(members)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Transpose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 1)

    def forward(self, x):
        return self.conv(x).transpose(1, 2).flatten(1)


class Index(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)[:, :2]


class ReadsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize(
    ("model", "node"),
    [(Concat, "cat"), (Transpose, "transpose"), (Index, "getitem"), (ReadsParameter, "scale")],
    ids=["cat", "transpose", "indexing", "get_attr"],
)
def test_refuses_unsupported_graph_node_by_name(model, node):
    with pytest.raises(EnsembleError, match=f"cannot pack graph node '{node}'"):
        pack([model(), model()])


class BatchReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).view(-1, 2)


def test_reshape_across_the_batch_is_refused_when_run():
    packed = pack([BatchReshape(), BatchReshape()])
    with pytest.raises(
        EnsembleError, match=r"graph node 'view' reshapes a member's tensor of shape \(3, 4\)"
    ):
        packed(torch.randn(3, 4))


def test_shared_input_ops_run_once_unpacked():
    """Ops on the input alone (before any member's parameters) are not repeated per member."""

    class Prep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            x = (x - x.mean(0, keepdim=True))[:, :, :3].flatten(1)
            return self.fc(x)

    members = [Prep(), Prep()]
    packed = pack(members)
    assert "_expand" not in packed.code
    x = torch.randn(5, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ bad members


def test_different_architectures_name_the_first_differing_parameter():
    torch.manual_seed(0)
    a = create_model("cnn", input_shape=(1, 8, 8), num_classes=5)
    b = create_model("cnn", input_shape=(1, 8, 8), num_classes=5, widths=(32, 48, 128))
    with pytest.raises(EnsembleError) as info:
        pack([a, copy.deepcopy(a), b])
    message = str(info.value)
    assert "'features.conv2.conv.weight'" in message
    assert "(64, 32, 3, 3) in member 0" in message and "(48, 32, 3, 3) in member 2" in message


def test_different_module_types_or_settings_or_graphs_are_named():
    mlp = create_model("mlp", input_shape=(1, 8, 8), num_classes=5)
    cnn = create_model("cnn", input_shape=(1, 8, 8), num_classes=5)
    with pytest.raises(EnsembleError, match="member 1 is a ConvNet, member 0 a MLP"):
        pack([mlp, cnn])
    strided = copy.deepcopy(cnn)
    strided.features.conv2.conv.stride = (2, 2)
    with pytest.raises(EnsembleError, match=r"members differ at module 'features\.conv2\.conv'"):
        pack([cnn, strided])
    relu = create_model("cnn", input_shape=(1, 8, 8), num_classes=5)
    relu.features.conv1.relu = nn.Tanh()
    with pytest.raises(
        EnsembleError, match=r"module 'features\.conv1\.relu': ReLU in member 0, Tanh in member 1"
    ):
        pack([cnn, relu])

    class Other(type(cnn)):
        def forward(self, x):
            return self.classifier(self.forward_features(x)) * 2

    other = copy.deepcopy(cnn)
    other.__class__ = Other
    with pytest.raises(EnsembleError, match="member 1 is a"):
        pack([cnn, other])


def test_forward_differences_are_named_by_graph_node():
    class Scaled(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.factor = factor

        def forward(self, x):
            return self.fc(x) * self.factor

    with pytest.raises(EnsembleError, match="members differ in their forward at graph node 'mul'"):
        pack([Scaled(1.0), Scaled(2.0)])


def test_bad_member_lists():
    with pytest.raises(ConfigError, match="empty"):
        pack([])
    with pytest.raises(ConfigError, match="not one model"):
        pack(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match="member 1 is a str"):
        pack([nn.Linear(2, 2), "model"])
    cnn = create_model("cnn", input_shape=(1, 8, 8), num_classes=5)
    with pytest.raises(EnsembleError, match=r"member 1's 'features\.conv1\.conv\.weight' is torch\.float64"):
        pack([cnn, copy.deepcopy(cnn).double()])
    with pytest.raises(EnsembleError, match=r"on meta, member 0's torch\.float32 on cpu"):
        pack([cnn, copy.deepcopy(cnn).to("meta")])
    with pytest.raises(ConfigError, match="PackedEnsemble"):
        unpack(cnn)  # type: ignore[arg-type]


def test_supported_modules_lists_the_layers():
    names = supported_modules()
    for expected in (
        "Linear",
        "Conv1d",
        "Conv2d",
        "BatchNorm1d",
        "BatchNorm2d",
        "ReLU",
        "Flatten",
        "MaxPool2d",
    ):
        assert expected in names
    assert "LSTM" not in names


# ------------------------------------------------------------------------------------ speed measures keep values


def bn_cnn_members(k: int = 3) -> list[nn.Module]:
    members = []
    for i in range(k):
        torch.manual_seed(i)
        model = create_model("cnn", input_shape=(1, 8, 8), num_classes=5, batch_norm=True)
        members.append(randomise_norms(model, i).eval())
    return members


def test_batch_norm_folded_into_convolutions_in_eval_mode():
    members = bn_cnn_members()
    packed = pack(members)
    convs = [m for m in packed.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all("batch_norm folded in" in repr(c) for c in convs)
    # the BatchNorms stay registered: state_dict keys are the members' own
    assert sorted(packed.state_dict()) == sorted(members[0].state_dict())
    x = batch((1, 8, 8), n=40)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)
    # with autograd on, in eval mode, the BatchNorm runs after the convolution: same values
    torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)
    # changed statistics (in place, as load_state_dict does) reach the folded weights
    with torch.no_grad():
        for m in members:
            m.features.conv2.bn.running_mean.add_(0.25)
            m.features.conv2.bn.running_var.mul_(2.0)
        packed.load_state_dict(pack(members).state_dict())
        torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)
        # and so do other devices and dtypes (new tensors)
        doubled = copy.deepcopy(packed).double()
        torch.testing.assert_close(doubled(x.double()), stacked(members, x).double(), atol=1e-6, rtol=0)
    # train mode: batch statistics, running statistics updated per member as before
    packed.train()
    for m in members:
        m.train()
    torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-5, rtol=0)
    assert_states_close(members, packed)


def test_large_batches_run_in_chunks_with_the_same_outputs():
    members = bn_cnn_members(k=4)
    packed, whole = pack(members), pack(members, chunk_size=0)
    assert packed.per_sample and packed.chunk_size == 1024 // 4 and whole.chunk_size == 0
    x = batch((1, 8, 8), n=600)  # 256 + 256 + 88
    with torch.no_grad():
        expected = stacked(members, x)
        got = packed(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, whole(x), atol=1e-5, rtol=0)
    assert got.shape == (4, 600, 5)
    with pytest.raises(ConfigError, match="chunk_size"):
        pack(members, chunk_size=-1)


class RowMixing(nn.Module):
    """Subtracts the batch mean of the input: each sample's output depends on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - x.mean(0, keepdim=True))


class BatchReduction(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h - h.mean(0, keepdim=True)


@pytest.mark.parametrize("cls", [RowMixing, BatchReduction])
def test_batches_are_not_split_where_samples_mix(cls):
    members = [cls().eval() for _ in range(2)]
    packed = pack(members, chunk_size=4)
    assert not packed.per_sample
    x = batch((4,), n=10)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), stacked(members, x), atol=1e-6, rtol=0)
