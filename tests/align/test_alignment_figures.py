"""Issue 16's alignment figures: loss barriers of naive, weight-matched and REPAIRed midpoints.

Each test trains a pair of zoo models from seeds 0 and 1 with the zoo's default training
(Adam 1e-3, one loop: ``zoo.train``), aligns B to A by weight matching, and prints the
figures (accuracy in points, loss in nats, from ``zoo.evaluate`` via ``loss_barrier``).
The bounds asserted are the issue's floors unless a docstring says otherwise (with the
values measured here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from modelfuse import data, zoo
from modelfuse.align import BarrierResult, align, interpolate, loss_barrier, repair

SEEDS = (0, 1)
TS = [i / 10 for i in range(11)]


def _pair(arch: str, splits: data.Splits, epochs: int, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    x = splits.train[0][0]
    models = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = zoo.create_model(arch, input_shape=tuple(x.shape), num_classes=10, **kwargs)
        zoo.train(model, splits, epochs=epochs, seed=seed, progress=False)
        models.append(model.eval())
    return models[0], models[1]


def _repaired_path(
    a: nn.Module, b: nn.Module, splits: data.Splits, split: str, ts: Sequence[float]
) -> BarrierResult:
    """The interpolation path with REPAIR at every point, on the training data: BatchNorm statistics
    reset for BatchNorm networks, channel rescaling to the interpolated endpoint statistics otherwise."""
    loader = DataLoader(splits.train, batch_size=256)
    losses, accs = [], []
    for t in ts:
        m = repair(interpolate(a, b, t), endpoints=(a, b), t=t, data=loader)
        metrics = zoo.evaluate(m, getattr(splits, split))
        losses.append(float(metrics["nll"]))
        accs.append(float(metrics["accuracy"]))
    return BarrierResult(
        ts=list(ts), losses=losses, accuracies=accs, split=split, n=len(getattr(splits, split))
    )


def _line(name: str, r: BarrierResult) -> str:
    ends = 50 * (r.accuracies[0] + r.accuracies[-1])
    return (
        f"{name}: endpoints {ends:.2f}%, midpoint {100 * r.midpoint['accuracy']:.2f}%, "
        f"{r.split}-loss barrier {r.barrier:.4f}"
    )


@pytest.mark.slow
def test_digits_mlp_128_weight_matching_barrier() -> None:
    """Two digits MLPs 64-128-128-10: the weight-matched test-loss barrier is at most 0.05 and 0.1x the naive one.

    Measured (seeds 0/1): naive 0.580, weight matching 0.0185, with REPAIR rescaling 0.0122."""
    splits = data.load("digits")
    a, b = _pair("mlp", splits, 40, hidden=(128, 128))
    naive = loss_barrier(a, b, splits, ts=TS)
    b_wm = align(b, to=a)
    wm = loss_barrier(a, b_wm, splits, ts=TS)
    fixed = _repaired_path(a, b_wm, splits, "test", TS)  # printed only: no floor in the issue
    print(
        "\n".join(
            [
                "",
                _line("digits mlp 128 naive", naive),
                _line("digits mlp 128 weight matching", wm),
                _line("digits mlp 128 weight matching + REPAIR (rescale)", fixed),
            ]
        )
    )
    assert wm.barrier <= 0.05
    assert wm.barrier <= 0.1 * naive.barrier


@pytest.mark.slow
def test_mnist1d_mlp_512_weight_matching() -> None:
    """MNIST-1D MLPs 40-512-512-10: weight-matched midpoint within 4.5 points, train-loss barrier <= 0.2x naive.

    Measured (seeds 0/1): test midpoint 60.60% vs endpoints' 64.60% (4.0 points: only 0.5 of margin;
    the endpoints overfit, 100% train), train-loss barrier 0.324 vs naive 2.50."""
    splits = data.load("mnist1d")
    a, b = _pair("mlp", splits, 40, hidden=(512, 512))
    naive = loss_barrier(a, b, splits, split="train", ts=TS)
    b_wm = align(b, to=a)
    wm = loss_barrier(a, b_wm, splits, split="train", ts=TS)
    wm_test = loss_barrier(a, b_wm, splits, split="test", ts=[0.0, 0.5, 1.0])
    print(
        "\n".join(
            [
                "",
                _line("mnist1d mlp 512 naive", naive),
                _line("mnist1d mlp 512 weight matching", wm),
                _line("mnist1d mlp 512 weight matching", wm_test),
            ]
        )
    )
    ends = 50 * (wm_test.accuracies[0] + wm_test.accuracies[-1])
    assert 100 * wm_test.midpoint["accuracy"] >= ends - 4.5
    assert wm.barrier <= 0.2 * naive.barrier


def _bn_figures(arch: str, **kwargs: object) -> tuple[BarrierResult, BarrierResult, BarrierResult]:
    splits = data.load("digits")
    a, b = _pair(arch, splits, 40, **kwargs)
    b_wm = align(b, to=a)
    naive = loss_barrier(a, b, splits, ts=TS)
    wm = loss_barrier(a, b_wm, splits, ts=TS)
    fixed = _repaired_path(a, b_wm, splits, "test", TS)
    print(
        "\n".join(
            [
                "",
                _line(f"digits {arch} naive", naive),
                _line(f"digits {arch} weight matching", wm),
                _line(f"digits {arch} weight matching + REPAIR", fixed),
            ]
        )
    )
    return naive, wm, fixed


@pytest.mark.slow
def test_digits_cnn_bn_repair() -> None:
    """Zoo CNN with BatchNorm on digits: weight matching + REPAIR within 2 points, barrier <= 0.6x without REPAIR.

    Measured (seeds 0/1): midpoint 98.89% vs endpoints' 100%, barrier 0.109 vs 1.83 without REPAIR."""
    _, wm, fixed = _bn_figures("cnn", batch_norm=True)
    ends = 50 * (fixed.accuracies[0] + fixed.accuracies[-1])
    assert 100 * fixed.midpoint["accuracy"] >= ends - 2
    assert fixed.barrier <= 0.6 * wm.barrier


@pytest.mark.slow
def test_digits_resnet_small_figures() -> None:
    """Zoo resnet_small on digits: the same figures, printed; no floor measured yet (only sanity).

    Measured (seeds 0/1): barrier naive 2.23, weight matching 1.87, + REPAIR 1.19 (midpoint 59% vs 99.6%)."""
    naive, wm, fixed = _bn_figures("resnet_small")
    for r in (naive, wm, fixed):
        assert all(math.isfinite(x) for x in r.losses)
