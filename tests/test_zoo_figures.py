"""Accuracy figures the reference architectures must reach with their standard recipes (seeded, CPU).

Each test prints its measured figure; the assert messages carry it too.
"""

from __future__ import annotations

import time

import pytest
import torch

from modelfuse.data import Splits, load
from modelfuse.zoo import create_model, evaluate, train


def _fit(arch: str, data: Splits, *, epochs: int, seed: int = 0, model_kwargs=None, **train_kwargs):
    """Build ``arch`` from ``seed``, train it, return (test accuracy, wall seconds)."""
    torch.manual_seed(seed)
    model = create_model(
        arch, input_shape=data.input_shape, num_classes=data.num_classes, **(model_kwargs or {})
    )
    start = time.perf_counter()
    train(model, data, epochs=epochs, seed=seed, **train_kwargs)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, data.test)["accuracy"]
    print(f"{arch} on {data.name}: test accuracy {accuracy:.4f} after {epochs} epochs in {seconds:.1f} s")
    return accuracy, seconds


def test_cnn_on_digits_reaches_95_percent():
    accuracy, _ = _fit("cnn", load("digits"), epochs=20)  # the seconds are printed, not asserted
    assert accuracy >= 0.95, f"cnn reached {accuracy:.4f} on digits (want >= 0.95)"


def test_mlp_on_digits_reaches_90_percent():
    accuracy, _ = _fit("mlp", load("digits"), epochs=20)
    assert accuracy >= 0.90, f"mlp reached {accuracy:.4f} on digits (want >= 0.90)"


def test_digits_hard_keeps_the_cnn_below_95_percent():
    accuracy, _ = _fit("cnn", load("digits_hard"), epochs=20)
    assert 0.5 < accuracy < 0.95, (
        f"cnn reached {accuracy:.4f} on digits_hard (want well above chance, < 0.95)"
    )


def test_cnn1d_beats_mlp_on_mnist1d():
    data = load("mnist1d")
    cnn1d, _ = _fit("cnn1d", data, epochs=20)
    mlp, _ = _fit("mlp", data, epochs=20)
    assert cnn1d >= 0.93, f"cnn1d reached {cnn1d:.4f} on MNIST-1D (want >= 0.93)"
    assert mlp < cnn1d - 0.15, f"mlp reached {mlp:.4f} against cnn1d's {cnn1d:.4f} on MNIST-1D"


@pytest.mark.parametrize("arch", ["vgg_small", "resnet_small"])
def test_image_backbones_train_on_upsampled_digits(arch):
    data = load("digits", upsample=True)
    accuracy, _ = _fit(arch, data, epochs=3, batch_size=32)
    assert accuracy > 0.5, f"{arch} reached {accuracy:.4f} on 3x32x32 digits after 3 epochs (chance is 0.1)"
