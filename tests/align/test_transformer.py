"""Transformer encoders: the residual stream is one group, each feed-forward's hidden units another."""

from __future__ import annotations

import pytest
import torch

from modelfuse import zoo
from modelfuse.align import AxisRef, apply_permutation, permutation_spec, weight_matching
from modelfuse.errors import AlignmentError
from tests.align.models import AttentionBlock, BagOfEmbeddings, TiedEmbeddings, TinyEncoder


def test_encoder_spec_by_hand() -> None:
    torch.manual_seed(0)
    spec = permutation_spec(TinyEncoder(), example_input=torch.randn(2, 5, 3))
    assert set(spec.groups) == {"embed", "encoder.layers.0.linear1", "encoder.layers.1.linear1"}
    stream = set(spec.groups["embed"].axes)
    per_layer = [
        ("self_attn.in_proj_weight", 1), ("self_attn.out_proj.weight", 0), ("self_attn.out_proj.bias", 0),
        ("linear1.weight", 1), ("linear2.weight", 0), ("linear2.bias", 0),
        ("norm1.weight", 0), ("norm1.bias", 0), ("norm2.weight", 0), ("norm2.bias", 0),
    ]  # fmt: skip
    expected = {AxisRef(f"encoder.layers.{i}.{n}", a) for i in (0, 1) for n, a in per_layer}
    expected |= {AxisRef("embed.weight", 0), AxisRef("embed.bias", 0), AxisRef("pos", 1)}
    expected |= {
        AxisRef("encoder.norm.weight", 0),
        AxisRef("encoder.norm.bias", 0),
        AxisRef("head.weight", 1),
    }
    assert stream == expected
    assert set(spec.groups["encoder.layers.1.linear1"].axes) == {
        AxisRef("encoder.layers.1.linear1.weight", 0),
        AxisRef("encoder.layers.1.linear1.bias", 0),
        AxisRef("encoder.layers.1.linear2.weight", 1),
    }


def test_without_example_input_the_token_mean_is_explained() -> None:
    spec = permutation_spec(TinyEncoder())
    fixed = {f.name: f for f in spec.fixed}
    assert "embed" not in spec.groups and "example_input=" in fixed["embed"].reason
    with pytest.raises(AlignmentError, match=r"example_input of shape \(2, 7\) does not fit TinyEncoder"):
        permutation_spec(TinyEncoder(), example_input=torch.randn(2, 7))


@pytest.mark.parametrize("cls", [TinyEncoder, AttentionBlock])
def test_permuted_transformer_computes_the_same_function(cls: type[torch.nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(4, 5, 3)
    spec = permutation_spec(model, example_input=x)
    assert "embed" in spec.groups
    gen = torch.Generator().manual_seed(1)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    permuted = apply_permutation(model, spec, perms).eval()
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), model(x), atol=1e-5, rtol=1e-5)
    m = weight_matching(spec, model.state_dict(), permuted.state_dict())
    for n, p in perms.items():
        assert torch.equal(m.perms[n], torch.argsort(p)), n


def test_example_input_leaves_the_model_untouched() -> None:
    model = zoo.create_model("cnn", input_shape=(1, 8, 8), num_classes=10, batch_norm=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    permutation_spec(model, example_input=torch.randn(4, 1, 8, 8) * 5 + 3)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_embedding_columns_form_a_group() -> None:
    torch.manual_seed(0)
    model = BagOfEmbeddings().eval()
    ids = torch.randint(0, 11, (4, 7))
    spec = permutation_spec(model, example_input=ids)
    assert set(spec.groups["emb"].axes) == {AxisRef("emb.weight", 1), AxisRef("fc.weight", 1)}
    assert set(spec.groups["fc"].axes) == {
        AxisRef("fc.weight", 0),
        AxisRef("fc.bias", 0),
        AxisRef("head.weight", 1),
    }
    gen = torch.Generator().manual_seed(2)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    with torch.no_grad():
        torch.testing.assert_close(
            apply_permutation(model, spec, perms)(ids), model(ids), atol=1e-6, rtol=1e-6
        )


def test_tied_weights_move_together() -> None:
    torch.manual_seed(0)
    model = TiedEmbeddings().eval()
    ids = torch.randint(0, 9, (3, 4))
    spec = permutation_spec(model)
    # emb.weight axis 1 (embedding columns) and head.weight axis 1 (the head's inputs, fc's outputs)
    # are one tensor: fc's output group and the embedding group become one
    merged = next(g for g in spec.groups.values() if AxisRef("emb.weight", 1) in g.axes)
    assert {AxisRef("head.weight", 1), AxisRef("fc.weight", 0), AxisRef("fc.weight", 1)} <= set(merged.axes)
    gen = torch.Generator().manual_seed(1)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    with torch.no_grad():
        torch.testing.assert_close(
            apply_permutation(model, spec, perms)(ids), model(ids), atol=1e-6, rtol=1e-6
        )
