"""Weight matching (Git Re-Basin) against planted permutations and a brute-force optimum."""

from __future__ import annotations

import itertools

import pytest
import torch

from modelfuse import zoo
from modelfuse.align import PermutationSpec, align, apply_permutation, permutation_spec, weight_matching
from modelfuse.errors import AlignmentError, ConfigError, RegistryError
from tests.align.models import AttentionBlock


def _planted(model: torch.nn.Module, seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    spec = permutation_spec(model)
    gen = torch.Generator().manual_seed(seed)
    planted = {name: torch.randperm(g.size, generator=gen) for name, g in spec.groups.items()}
    return apply_permutation(model, spec, planted), planted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_a_planted_mlp_permutation_exactly(seed: int) -> None:
    torch.manual_seed(seed)
    a = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(512, 512))
    b, planted = _planted(a, seed + 100)
    spec = permutation_spec(b)
    m = weight_matching(spec, a.state_dict(), b.state_dict(), seed=seed)
    assert m.converged and m.passes <= 30
    # b's unit i is a's unit planted[i]; undoing it takes the inverse permutation
    for name, p in planted.items():
        assert torch.equal(m.perms[name], torch.argsort(p)), name
    aligned = align(b, to=a, seed=seed)
    for key, t in a.state_dict().items():
        assert torch.equal(aligned.state_dict()[key], t), key
    # loss barrier on the straight line from a to aligned b: zero, as every point is a itself
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    sa, sb = a.state_dict(), aligned.state_dict()
    loss = torch.nn.functional.cross_entropy
    probe = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(512, 512)).eval()
    losses = []
    for lam in torch.linspace(0, 1, 5).tolist():
        probe.load_state_dict({k: (1 - lam) * sa[k] + lam * sb[k] for k in sa})
        with torch.no_grad():
            losses.append(loss(probe(x), y).item())
    assert max(losses) - (losses[0] + losses[-1]) / 2 == pytest.approx(0.0, abs=1e-6)


def test_recovers_a_planted_permutation_in_a_cnn_with_batchnorm_and_a_resnet() -> None:
    torch.manual_seed(0)
    for a in (
        zoo.create_model("cnn", input_shape=(1, 8, 8), num_classes=10, batch_norm=True),
        zoo.create_model("resnet_small", input_shape=(1, 8, 8), num_classes=10),
    ):
        b, planted = _planted(a, 7)
        m = weight_matching(permutation_spec(b), a.state_dict(), b.state_dict())
        for name, p in planted.items():
            assert torch.equal(m.perms[name], torch.argsort(p)), name


def test_single_group_matches_the_brute_force_optimum() -> None:
    torch.manual_seed(3)
    a = zoo.create_model("mlp", input_shape=(1, 2, 2), num_classes=3, hidden=(5,))
    b = zoo.create_model("mlp", input_shape=(1, 2, 2), num_classes=3, hidden=(5,))
    sa, sb = a.state_dict(), b.state_dict()

    def score(
        p: tuple[int, ...],
    ) -> float:  # sum over the group's axes of <W_a, W_b with units reordered by p>
        idx = list(p)
        return float(
            (sa["features.fc1.weight"] * sb["features.fc1.weight"][idx]).sum()
            + (sa["features.fc1.bias"] * sb["features.fc1.bias"][idx]).sum()
            + (sa["classifier.weight"] * sb["classifier.weight"][:, idx]).sum()
        )

    best = max(itertools.permutations(range(5)), key=score)
    m = weight_matching(permutation_spec(b), sa, sb)
    assert tuple(m.perms["features.fc1"].tolist()) == best


def test_head_group_sums_its_slices_and_matches_the_brute_force_optimum() -> None:
    """A within-head group covers two slices of one weight (head 1's query rows 4..7 and key rows
    12..15 of in_proj): its cost is the sum of both slices' products."""
    torch.manual_seed(5)
    a, b = AttentionBlock(), AttentionBlock()
    for m in (a, b):
        with torch.no_grad():
            m.attn.in_proj_bias.copy_(torch.randn(24))
    sa, sb = a.state_dict(), b.state_dict()
    wa, wb, ba, bb = (
        sa["attn.in_proj_weight"],
        sb["attn.in_proj_weight"],
        sa["attn.in_proj_bias"],
        sb["attn.in_proj_bias"],
    )

    def score(p: tuple[int, ...]) -> float:
        q, k = [4 + i for i in p], [12 + i for i in p]
        return float(
            (wa[4:8] * wb[q]).sum()
            + (wa[12:16] * wb[k]).sum()
            + (ba[4:8] * bb[q]).sum()
            + (ba[12:16] * bb[k]).sum()
        )

    full = permutation_spec(b)
    only = PermutationSpec({"attn.head1.qk": full.groups["attn.head1.qk"]}, model_name="AttentionBlock")
    best = max(itertools.permutations(range(4)), key=score)
    assert score(best) > score((0, 1, 2, 3))  # the test is not trivial
    m = weight_matching(only, sa, sb)
    assert tuple(m.perms["attn.head1.qk"].tolist()) == best


def test_whole_heads_and_their_insides_match_the_brute_force_optimum() -> None:
    """Heads (blocks of 3 rows) and the units inside them, searched jointly by brute force over
    2 head orders x 6^4 inner orders, against weight matching over those groups alone."""
    torch.manual_seed(6)
    a, b = AttentionBlock(d=6), AttentionBlock(d=6)  # 2 heads of 3
    for m in (a, b):
        with torch.no_grad():
            m.attn.in_proj_bias.copy_(torch.randn(18))
    sa, sb = a.state_dict(), b.state_dict()
    wa, wb = sa["attn.in_proj_weight"], sb["attn.in_proj_weight"]
    ba, bb = sa["attn.in_proj_bias"], sb["attn.in_proj_bias"]
    oa, ob = sa["attn.out_proj.weight"], sb["attn.out_proj.weight"]

    def score(
        sigma: tuple[int, ...], qk: tuple[tuple[int, ...], ...], v: tuple[tuple[int, ...], ...]
    ) -> float:
        # position i holds B's head sigma[i], its units reordered by qk[i] (queries, keys) and v[i] (values)
        rows = [
            c * 6 + sigma[i] * 3 + u for c in range(3) for i in range(2) for u in (qk[i] if c < 2 else v[i])
        ]
        cols = [sigma[i] * 3 + u for i in range(2) for u in v[i]]
        return float((wa * wb[rows]).sum() + (ba * bb[rows]).sum() + (oa * ob[:, cols]).sum())

    inner = list(itertools.permutations(range(3)))
    candidates = [
        (sigma, (q0, q1), (v0, v1))
        for sigma in itertools.permutations(range(2))
        for q0, q1, v0, v1 in itertools.product(inner, repeat=4)
    ]
    best = max(candidates, key=lambda c: score(*c))
    assert best[0] == (1, 0)  # the heads do swap: the test is not trivial
    full = permutation_spec(b, whole_heads=True)
    keep = ["attn.heads", "attn.head0.qk", "attn.head0.v", "attn.head1.qk", "attn.head1.v"]
    only = PermutationSpec({n: full.groups[n] for n in keep}, model_name="AttentionBlock")
    m = weight_matching(only, sa, sb)
    found = (
        tuple(m.perms["attn.heads"].tolist()),
        tuple(tuple(m.perms[f"attn.head{i}.qk"].tolist()) for i in (0, 1)),
        tuple(tuple(m.perms[f"attn.head{i}.v"].tolist()) for i in (0, 1)),
    )
    assert score(*found) == pytest.approx(score(*best), rel=1e-9)
    assert found == best


@pytest.mark.parametrize("name", ["cnn", "resnet_small", "vgg_small"])
def test_align_keeps_the_function_of_an_unrelated_model(name: str) -> None:
    torch.manual_seed(0)
    a = zoo.create_model(name, input_shape=(1, 8, 8), num_classes=10).eval()
    b = zoo.create_model(name, input_shape=(1, 8, 8), num_classes=10).eval()
    aligned = align(b, to=a).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), b(x), atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(aligned.state_dict()[k], v) for k, v in b.state_dict().items())


def test_different_architectures_name_the_first_differing_parameter() -> None:
    a = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(8, 4))
    b = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(8, 5))
    with pytest.raises(AlignmentError, match=r"'features\.fc2\.weight' has shape \(5, 8\) .* but \(4, 8\)"):
        align(b, to=a)
    c = zoo.create_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(AlignmentError, match="different architectures"):
        align(c, to=a)


def test_bad_settings() -> None:
    a = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(8,))
    with pytest.raises(RegistryError, match=r"unknown alignment method 'sinkhorn'.*weight_matching"):
        align(a, to=a, method="sinkhorn")
    with pytest.raises(ConfigError, match="max_passes"):
        align(a, to=a, max_passes=0)
    with pytest.raises(ConfigError, match="Valid options: max_passes, seed"):
        align(a, to=a, data=[])
