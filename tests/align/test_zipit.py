"""ZipIt!: greedy pairing by hand, zipping a model with (a permuted copy of) itself keeps its function."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from modelfuse import zoo
from modelfuse.align import align, apply_permutation, interpolate, permutation_spec
from modelfuse.align.zipit import zip_matrices, zipit
from modelfuse.errors import AlignmentError, ConfigError
from tests.align.trained import PAIRS, Recipe, splits, trained


def _corr(pairs: dict[tuple[int, int], float], size: int = 4) -> torch.Tensor:
    c = torch.eye(size)
    for (i, j), v in pairs.items():
        c[i, j] = c[j, i] = v
    return c


def test_greedy_pairs_across_models_by_hand() -> None:
    # features: A0, A1, B0, B1; A0~B1 is the strongest pair, then A1~B0
    merge, unmerge = zip_matrices(_corr({(0, 3): 0.9, (1, 2): 0.2, (0, 1): 0.1}))
    assert merge.tolist() == [[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]]
    assert unmerge.tolist() == [[1, 0], [0, 1], [0, 1], [1, 0]]


def test_greedy_pairs_within_a_model_unless_forbidden() -> None:
    c = _corr({(0, 1): 0.95, (0, 3): 0.9, (1, 2): 0.2, (2, 3): 0.5})
    merge, _ = zip_matrices(c)
    assert merge.tolist() == [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]  # A0+A1, then B0+B1
    merge, _ = zip_matrices(c, within=False)
    assert merge.tolist() == [[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]]
    with pytest.raises(AlignmentError, match="even"):
        zip_matrices(torch.eye(3))


def _cnn(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return zoo.create_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(8, 12, 16)).eval()


def test_zipping_a_model_with_a_permuted_copy_keeps_its_function() -> None:
    a = _cnn(0)
    spec = permutation_spec(a)
    g = torch.Generator().manual_seed(3)
    b = apply_permutation(
        a, spec, {k: torch.randperm(grp.size, generator=g) for k, grp in spec.groups.items()}
    )
    x = torch.rand(128, 1, 8, 8, generator=g)
    data = [x[:64], x[64:]]
    for stop_at in (None, 1, 2):
        z = zipit(a, b, data, stop_at=stop_at)
        torch.testing.assert_close(z(x), a(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="stop_at"):
        zipit(a, b, data, stop_at=0)
    with pytest.raises(AlignmentError, match="does not fit"):
        zipit(a, b, [torch.randn(2, 5)])


#: a zoo CNN trained on one half of the digit labels (zoo default training, 20 epochs)
def _half(labels: range) -> Recipe:
    return Recipe("cnn", labels=tuple(labels), epochs=20)


@pytest.mark.slow
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"seeds{p[0]}-{p[1]}")
def test_zipit_beats_weight_matching_on_disjoint_digit_tasks(pair: tuple[int, int]) -> None:
    # issue 16: two zoo CNNs, A trained on digits 0-4 (first seed of the pair) and B on 5-9
    # (second seed); the zipped model must beat weight matching + averaging on the joint
    # 10-class task, on every pair (figures per pair in benchmarks/RESULTS.md, "alignment figures").
    digits = splits("digits")

    def acc(m: torch.nn.Module) -> float:
        return 100 * zoo.evaluate(m, digits.test)["accuracy"]

    a, b = trained(_half(range(5)), pair[0]), trained(_half(range(5, 10)), pair[1])
    wm = acc(interpolate(a, align(b, to=a), 0.5))
    loader = DataLoader(digits.train, batch_size=256)
    full, partial = acc(zipit(a, b, loader)), acc(zipit(a, b, loader, stop_at=1))
    print(
        f"\nZipIt seeds {pair[0]}/{pair[1]}: A {acc(a):.2f}, B {acc(b):.2f}, WM + avg {wm:.2f}, "
        f"ZipIt {full:.2f}, ZipIt stop_at=1 {partial:.2f}"
    )
    assert full > wm
    assert partial > wm
