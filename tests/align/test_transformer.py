"""Transformer encoders: the residual stream is one group, each feed-forward's hidden units another, and
inside each attention head the query/key units one group and the value units another."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelfuse import zoo
from modelfuse.align import AxisRef, apply_permutation, permutation_spec, weight_matching
from modelfuse.errors import AlignmentError, ConfigError
from tests.align.models import (
    AttentionBlock,
    BagOfEmbeddings,
    CrossAttention,
    PackedCrossAttention,
    TiedEmbeddings,
    TinyEncoder,
)


def _head_axes(attn: str, d: int, hd: int, h: int) -> tuple[set[AxisRef], set[AxisRef]]:
    """Head ``h``'s query/key and value blocks of a packed in-projection, written out by hand."""
    qk = {AxisRef(f"{attn}.in_proj_{w}", 0, s) for w in ("weight", "bias") for s in (h * hd, d + h * hd)}
    v = {AxisRef(f"{attn}.in_proj_{w}", 0, 2 * d + h * hd) for w in ("weight", "bias")}
    return qk, v | {AxisRef(f"{attn}.out_proj.weight", 1, h * hd)}


def test_encoder_spec_by_hand() -> None:
    torch.manual_seed(0)
    spec = permutation_spec(TinyEncoder(), example_input=torch.randn(2, 5, 3))
    heads = {f"encoder.layers.{i}.self_attn.head{h}.{p}" for i in (0, 1) for h in (0, 1) for p in ("qk", "v")}
    assert set(spec.groups) == {"embed", "encoder.layers.0.linear1", "encoder.layers.1.linear1"} | heads
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
    # d = 8, two heads of 4: queries are rows 0..7 of in_proj, keys 8..15, values 16..23
    for i in (0, 1):
        for h in (0, 1):
            qk, v = _head_axes(f"encoder.layers.{i}.self_attn", 8, 4, h)
            assert set(spec.groups[f"encoder.layers.{i}.self_attn.head{h}.qk"].axes) == qk
            assert set(spec.groups[f"encoder.layers.{i}.self_attn.head{h}.v"].axes) == v
            assert spec.groups[f"encoder.layers.{i}.self_attn.head{h}.v"].size == 4


def test_separate_projections_and_bias_kv_spec_by_hand() -> None:
    spec = permutation_spec(CrossAttention())  # d 6, kdim 5, vdim 7, 3 heads of 2
    for h in range(3):
        assert set(spec.groups[f"attn.head{h}.qk"].axes) == {
            AxisRef("attn.q_proj_weight", 0, 2 * h),
            AxisRef("attn.k_proj_weight", 0, 2 * h),
            AxisRef("attn.in_proj_bias", 0, 2 * h),
            AxisRef("attn.in_proj_bias", 0, 6 + 2 * h),
            AxisRef("attn.bias_k", 2, 2 * h),
        }
        assert set(spec.groups[f"attn.head{h}.v"].axes) == {
            AxisRef("attn.v_proj_weight", 0, 2 * h),
            AxisRef("attn.in_proj_bias", 0, 12 + 2 * h),
            AxisRef("attn.bias_v", 2, 2 * h),
            AxisRef("attn.out_proj.weight", 1, 2 * h),
        }
    # the key and value inputs have widths of their own, each its own group
    assert set(spec.groups["k_in"].axes) == {
        AxisRef("k_in.weight", 0),
        AxisRef("k_in.bias", 0),
        AxisRef("attn.k_proj_weight", 1),
    }
    assert set(spec.groups["v_in"].axes) == {
        AxisRef("v_in.weight", 0),
        AxisRef("v_in.bias", 0),
        AxisRef("attn.v_proj_weight", 1),
    }
    assert AxisRef("attn.q_proj_weight", 1) in spec.groups["q_in"].axes


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


def _encoder_wrapped(batch_first: bool) -> nn.Module:
    """A TransformerEncoderLayer used on its own between two Linears (d 8, 2 heads of 4, 12 hidden)."""
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
    return nn.Sequential(nn.Linear(3, 8), layer, nn.Linear(8, 4))


def _permute_encoder_layer_by_hand(
    sd: dict[str, torch.Tensor],
    pre: str,
    s: torch.Tensor,
    perms: dict[str, torch.Tensor],
    d: int = 8,
    hd: int = 4,
) -> None:
    """Reorder one encoder layer's weights: stream units by ``s``, hidden and per-head units by ``perms``."""
    heads, hidden = d // hd, perms[f"{pre}linear1"]
    qk = [perms[f"{pre}self_attn.head{h}.qk"] for h in range(heads)]
    v = [perms[f"{pre}self_attn.head{h}.v"] for h in range(heads)]
    # whole heads (if planted) move first: position h then holds old head sigma[h], whose units qk[h] / v[h] reorder
    sigma = perms.get(f"{pre}self_attn.heads", torch.arange(heads))
    # in_proj rows: [queries of head 0, 1, ...; keys ...; values ...]; head h of block c starts at c*d + h*hd
    rows = torch.cat(
        [c * d + sigma[h] * hd + (qk[h] if c < 2 else v[h]) for c in range(3) for h in range(heads)]
    )
    cols = torch.cat([sigma[h] * hd + v[h] for h in range(heads)])
    a = f"{pre}self_attn."
    sd[a + "in_proj_weight"] = sd[a + "in_proj_weight"][rows][:, s]
    sd[a + "in_proj_bias"] = sd[a + "in_proj_bias"][rows]
    sd[a + "out_proj.weight"] = sd[a + "out_proj.weight"][s][:, cols]
    sd[a + "out_proj.bias"] = sd[a + "out_proj.bias"][s]
    sd[pre + "linear1.weight"] = sd[pre + "linear1.weight"][hidden][:, s]
    sd[pre + "linear1.bias"] = sd[pre + "linear1.bias"][hidden]
    sd[pre + "linear2.weight"] = sd[pre + "linear2.weight"][s][:, hidden]
    for n in ("linear2.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
        sd[pre + n] = sd[pre + n][s]


def _randomise_vectors(model: nn.Module) -> None:
    """Biases and norms start constant; give them values that a wrong order would show."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape))


def _random_perms(names: list[str], sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    """A random permutation per group, sized by the name's last part (``sizes``; 12 feed-forward units else)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randperm(sizes.get(n.rsplit(".", 1)[-1], 12), generator=gen) for n in names}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["tiny_encoder", "encoder_layer"])
def test_planted_permutation_with_heads_by_hand(kind: str, batch_first: bool) -> None:
    """A permutation planted by hand (stream, feed-forward and within-head units) keeps the function,
    and weight matching finds its inverse exactly."""
    torch.manual_seed(0)
    model = TinyEncoder(batch_first=batch_first) if kind == "tiny_encoder" else _encoder_wrapped(batch_first)
    _randomise_vectors(model)
    model.eval()
    x = torch.randn(4, 5, 3) if batch_first else torch.randn(5, 4, 3)
    layers = ["encoder.layers.0.", "encoder.layers.1."] if kind == "tiny_encoder" else ["1."]
    stream = "embed" if kind == "tiny_encoder" else "0"
    names = [stream] + [
        f"{pre}{n}"
        for pre in layers
        for n in ["linear1"] + [f"self_attn.head{h}.{p}" for h in (0, 1) for p in ("qk", "v")]
    ]
    perms = _random_perms(names, {stream: 8, "qk": 4, "v": 4}, seed=7)
    s = perms[stream]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    first, last = ("embed", "head") if kind == "tiny_encoder" else ("0", "2")
    sd[f"{first}.weight"], sd[f"{first}.bias"] = sd[f"{first}.weight"][s], sd[f"{first}.bias"][s]
    sd[f"{last}.weight"] = sd[f"{last}.weight"][:, s]
    for pre in layers:
        _permute_encoder_layer_by_hand(sd, pre, s, perms)
    if kind == "tiny_encoder":
        sd["pos"] = sd["pos"][..., s]
        sd["encoder.norm.weight"], sd["encoder.norm.bias"] = (
            sd["encoder.norm.weight"][s],
            sd["encoder.norm.bias"][s],
        )
    planted = copy.deepcopy(model)
    planted.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(planted(x), model(x), atol=1e-5, rtol=1e-5)

    spec = permutation_spec(model, example_input=x)
    assert set(spec.groups) == set(names)
    for n, t in apply_permutation(model, spec, perms).state_dict().items():  # the code plants the same
        assert torch.equal(t, sd[n]), n
    m = weight_matching(spec, model.state_dict(), planted.state_dict())
    for n, p in perms.items():  # planted unit i is the model's unit p[i]; undoing it is p's inverse
        assert torch.equal(m.perms[n], torch.argsort(p)), n
    for n, t in apply_permutation(planted, spec, m.perms).state_dict().items():
        assert torch.equal(t, model.state_dict()[n]), n


def test_planted_permutation_of_separate_projections_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = CrossAttention().eval()
    _randomise_vectors(model)
    x, memory = torch.randn(4, 5, 3), torch.randn(4, 6, 4)
    spec = permutation_spec(model)
    gen = torch.Generator().manual_seed(3)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    planted = apply_permutation(model, spec, perms)
    # head 1's keys, by hand: rows 2..3 of k_proj_weight in the order perms["attn.head1.qk"], columns by k_in's
    k_rows = 2 + perms["attn.head1.qk"]
    torch.testing.assert_close(
        planted.state_dict()["attn.k_proj_weight"][2:4],
        model.state_dict()["attn.k_proj_weight"][k_rows][:, perms["k_in"]],
        atol=0,
        rtol=0,
    )
    with torch.no_grad():
        torch.testing.assert_close(planted(x, memory), model(x, memory), atol=1e-5, rtol=1e-5)
    m = weight_matching(spec, model.state_dict(), planted.state_dict())
    for n, p in perms.items():
        assert torch.equal(m.perms[n], torch.argsort(p)), n


def test_packed_projection_reading_the_input_fixes_the_query_stream_and_explain_says_why() -> None:
    spec = permutation_spec(PackedCrossAttention())
    # in_proj_weight's columns read the queries (q_in's units) and the raw input alike: q_in cannot move
    fixed = {f.name: f for f in spec.fixed}
    assert fixed["q_in"].node == "attn" and "packed in-projection" in fixed["q_in"].reason
    assert AxisRef("attn.in_proj_weight", 1) in fixed["q_in"].axes
    # the heads still move: their units sit on the other axis of in_proj_weight
    assert {"attn.head0.qk", "attn.head0.v", "attn.head1.qk", "attn.head1.v", "attn"} <= set(spec.groups)
    text = spec.explain()
    assert "fixed q_in (4 units) at node 'attn': the packed in-projection also reads an input" in text
    assert "fixed input attn.in_proj_weight axis 1: fed by the model's input 'x'" in text
    model = PackedCrossAttention().eval()
    x = torch.randn(3, 5, 4)
    gen = torch.Generator().manual_seed(0)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    with torch.no_grad():
        torch.testing.assert_close(apply_permutation(model, spec, perms)(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["weights", "activations"])
def test_ot_fusion_of_a_permuted_encoder_gives_back_its_function(mode: str) -> None:
    """Exact OT between an encoder and its permuted copy is the inverse permutation, heads included (the
    groups inside heads carry no traced activation: their cost comes from the weights)."""
    pytest.importorskip("ot")
    from modelfuse.align.ot_fusion import ot_fusion

    torch.manual_seed(0)
    model = TinyEncoder().eval()
    _randomise_vectors(model)
    x = torch.randn(16, 5, 3)
    spec = permutation_spec(model, example_input=x)
    gen = torch.Generator().manual_seed(1)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    permuted = apply_permutation(model, spec, perms).eval()
    data = [x] if mode == "activations" else None
    fused = ot_fusion(model, permuted, mode=mode, data=data, spec=spec, spec_b=spec)
    for n, p in perms.items():  # T maps the permuted copy's unit j = p^-1(i) onto unit i
        expected = torch.zeros(p.numel(), p.numel(), dtype=torch.float64)
        expected[p, torch.arange(p.numel())] = 1.0 / p.numel()
        torch.testing.assert_close(fused.transports[n], expected, atol=1e-9, rtol=0, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(fused.model.eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_whole_heads_spec_by_hand() -> None:
    spec = permutation_spec(AttentionBlock(), whole_heads=True)  # d 8, 2 heads of 4
    heads = spec.groups["attn.heads"]
    assert heads.size == 2 and heads.inner == (
        ("attn.head0.qk", "attn.head0.v"),
        ("attn.head1.qk", "attn.head1.v"),
    )
    assert set(heads.axes) == {
        AxisRef(f"attn.in_proj_{w}", 0, s, 4) for w in ("weight", "bias") for s in (0, 8, 16)
    } | {AxisRef("attn.out_proj.weight", 1, 0, 4)}
    names = list(spec.groups)  # blocks move before the groups inside them
    assert names.index("attn.heads") < min(names.index(n) for n in ("attn.head0.qk", "attn.head1.v"))
    assert (
        "attn.heads (2 units, unit i a block reordered inside by attn.head0.qk, attn.head0.v"
        in spec.explain()
    )
    assert "attn.heads" not in permutation_spec(AttentionBlock()).groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_whole_head_permutation_by_hand_is_recovered(seed: int) -> None:
    """Heads swapped and reordered inside, by hand: same function; weight matching with whole heads undoes it."""
    torch.manual_seed(seed)
    model = TinyEncoder().eval()
    _randomise_vectors(model)
    x = torch.randn(4, 5, 3)
    layers = ["encoder.layers.0.", "encoder.layers.1."]
    names = ["embed"] + [
        f"{pre}{n}"
        for pre in layers
        for n in ["linear1", "self_attn.heads"]
        + [f"self_attn.head{h}.{p}" for h in (0, 1) for p in ("qk", "v")]
    ]
    perms = _random_perms(names, {"embed": 8, "qk": 4, "v": 4, "heads": 2}, seed=seed + 10)
    for pre in layers:
        perms[f"{pre}self_attn.heads"] = torch.tensor([1, 0])  # the heads swap places
    s = perms["embed"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["embed.weight"], sd["embed.bias"], sd["pos"] = (
        sd["embed.weight"][s],
        sd["embed.bias"][s],
        sd["pos"][:, s],
    )
    sd["head.weight"] = sd["head.weight"][:, s]
    sd["encoder.norm.weight"], sd["encoder.norm.bias"] = (
        sd["encoder.norm.weight"][s],
        sd["encoder.norm.bias"][s],
    )
    for pre in layers:
        _permute_encoder_layer_by_hand(sd, pre, s, perms)
    planted = copy.deepcopy(model)
    planted.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(planted(x), model(x), atol=1e-5, rtol=1e-5)

    spec = permutation_spec(model, example_input=x, whole_heads=True)
    assert set(spec.groups) == set(names)
    for n, t in apply_permutation(model, spec, perms).state_dict().items():  # the code plants the same
        assert torch.equal(t, sd[n]), n
    m = weight_matching(spec, model.state_dict(), planted.state_dict(), seed=seed)
    for pre in layers:  # undo: heads swap back; inside position i, the inverse of what head sigma'(i) got
        back = torch.argsort(perms[f"{pre}self_attn.heads"])
        assert torch.equal(m.perms[f"{pre}self_attn.heads"], back)
        for i in (0, 1):
            for p in ("qk", "v"):
                planted_inside = perms[f"{pre}self_attn.head{int(back[i])}.{p}"]
                assert torch.equal(m.perms[f"{pre}self_attn.head{i}.{p}"], torch.argsort(planted_inside))
    for n in ("embed", "encoder.layers.0.linear1", "encoder.layers.1.linear1"):
        assert torch.equal(m.perms[n], torch.argsort(perms[n])), n
    for n, t in apply_permutation(planted, spec, m.perms).state_dict().items():
        assert torch.equal(t, model.state_dict()[n]), n


def test_activation_matching_finds_the_units_no_node_carries_by_weights() -> None:
    """The stream is matched on activations; the units inside heads and the encoder's feed-forward units,
    which no traced node carries, by weight matching with the stream held fixed."""
    from modelfuse.align import activation_matching

    torch.manual_seed(0)
    model = TinyEncoder().eval()
    x = torch.randn(32, 5, 3)
    spec = permutation_spec(model, example_input=x)
    assert not spec.groups["encoder.layers.0.self_attn.head1.qk"].producers
    gen = torch.Generator().manual_seed(1)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    permuted = apply_permutation(model, spec, perms).eval()
    m = activation_matching(spec, model, permuted, [x])
    for n, p in perms.items():
        assert torch.equal(m.perms[n], torch.argsort(p)), n


def test_weight_matching_keeps_given_permutations() -> None:
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    spec = permutation_spec(model, example_input=torch.randn(2, 5, 3), whole_heads=True)
    given = {"embed": torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])}
    m = weight_matching(spec, model.state_dict(), model.state_dict(), given=given)
    assert torch.equal(m.perms["embed"], given["embed"])  # held, although the identity would score higher
    with pytest.raises(ConfigError, match=r"encoder\.layers\.0\.self_attn\.heads, the whole heads"):
        weight_matching(
            spec,
            model.state_dict(),
            model.state_dict(),
            given={"encoder.layers.0.self_attn.head0.qk": torch.arange(4)},
        )


def test_whole_heads_of_separate_projections_with_bias_kv() -> None:
    """3 heads of 2 with q/k/v projections of their own and bias_k/bias_v: the heads rotate, the function stays,
    and weight matching brings every parameter back."""
    torch.manual_seed(0)
    model = CrossAttention().eval()
    _randomise_vectors(model)
    spec = permutation_spec(model, whole_heads=True)
    assert AxisRef("attn.bias_v", 2, 0, 2) in spec.groups["attn.heads"].axes
    assert AxisRef("attn.k_proj_weight", 0, 0, 2) in spec.groups["attn.heads"].axes
    gen = torch.Generator().manual_seed(2)
    perms = {n: torch.randperm(g.size, generator=gen) for n, g in spec.groups.items()}
    perms["attn.heads"] = torch.tensor([2, 0, 1])
    planted = apply_permutation(model, spec, perms).eval()
    # by hand: position 0 now holds head 2, its value units reordered by head0.v's permutation
    v_rows = 2 * 2 + perms["attn.head0.v"]
    torch.testing.assert_close(
        planted.state_dict()["attn.v_proj_weight"][0:2],
        model.state_dict()["attn.v_proj_weight"][v_rows][:, perms["v_in"]],
        atol=0,
        rtol=0,
    )
    torch.testing.assert_close(
        planted.state_dict()["attn.bias_v"][..., 0:2],
        model.state_dict()["attn.bias_v"][..., v_rows],
        atol=0,
        rtol=0,
    )
    x, memory = torch.randn(4, 5, 3), torch.randn(4, 6, 4)
    with torch.no_grad():
        torch.testing.assert_close(planted(x, memory), model(x, memory), atol=1e-5, rtol=1e-5)
    m = weight_matching(spec, model.state_dict(), planted.state_dict())
    assert torch.equal(m.perms["attn.heads"], torch.tensor([1, 2, 0]))
    for n, t in apply_permutation(planted, spec, m.perms).state_dict().items():
        assert torch.equal(t, model.state_dict()[n]), n


def test_ot_fusion_and_zipit_refuse_whole_head_groups() -> None:
    pytest.importorskip("ot")
    from modelfuse.align.ot_fusion import ot_fusion
    from modelfuse.align.zipit import zipit

    model = AttentionBlock().eval()
    spec = permutation_spec(model, whole_heads=True)
    with pytest.raises(ConfigError, match=r"OT fusion cannot transport whole-head groups \(attn\.heads"):
        ot_fusion(model, model, spec=spec, spec_b=spec)
    with pytest.raises(ConfigError, match=r"ZipIt cannot zip whole-head groups \(attn\.heads"):
        zipit(model, model, [torch.randn(2, 5, 3)], spec=spec)
