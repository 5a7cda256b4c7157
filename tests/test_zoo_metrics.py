"""modelfuse.zoo.metrics against NumPy: accuracy, float64 NLL, and the one check of logits and labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.zoo.metrics import accuracy, accuracy_nll, check_logits_labels, nll


def numpy_reference(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    z = logits.astype(np.float64)
    shifted = z - z.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float((z.argmax(1) == labels).mean()), float(-log_probs[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_figures_equal_numpy(dtype):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(257, 7))
    labels = rng.integers(0, 7, size=257)
    z = torch.tensor(logits, dtype=dtype)
    exact_acc, exact_nll = numpy_reference(z.double().numpy(), labels)  # the values the tensor holds
    y = torch.tensor(labels)
    assert accuracy(z, y) == exact_acc
    # float64 log-softmax whatever the input dtype: agrees with NumPy to double precision
    assert nll(z, y) == pytest.approx(exact_nll, rel=1e-12)
    assert accuracy_nll(z, y) == {"accuracy": accuracy(z, y), "nll": nll(z, y)}


def test_large_logits_do_not_lose_the_nll_to_float32():
    # float32 cross-entropy of logits ~1e4 apart by small amounts loses digits; float64 keeps them
    logits = torch.tensor([[10000.0, 10000.5, 9999.0], [0.0, 1e-3, -1e-3]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    _, expected = numpy_reference(logits.numpy(), labels.numpy())
    assert nll(logits, labels) == pytest.approx(expected, rel=1e-14)


def test_log_probabilities_score_as_themselves():
    # a combiner's output (log-probabilities, with -inf for impossible classes) gives -mean log p(label)
    p = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.7, 0.2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    expected = -np.mean(np.log([0.5, 0.7, 1.0]))
    assert nll(p.log(), labels) == pytest.approx(expected, rel=1e-14)
    assert nll(p.log(), torch.tensor([2, 1, 2])) == float("inf")  # a label of probability 0
    assert accuracy(p.log(), labels) == 1.0
    assert accuracy(p.log(), torch.tensor([1, 1, 2])) == pytest.approx(2 / 3)  # row 0 ties: argmax gives class 0


def test_check_returns_the_inputs_as_tensors():
    z, y = check_logits_labels([[0.0, 1.0], [2.0, 0.5]], [1, 0])
    assert z.shape == (2, 2) and y.dtype == torch.int64 and y.tolist() == [1, 0]
    stacked, y = check_logits_labels(
        torch.zeros(3, 4, 5), torch.tensor([0, 4, 2, 1], dtype=torch.int32), stacked=True
    )
    assert stacked.shape == (3, 4, 5) and y.dtype == torch.int64
    z, none = check_logits_labels(torch.zeros(3, 4, 5), None, stacked=True)
    assert none is None


@pytest.mark.parametrize(
    ("logits", "labels", "options", "message"),
    [
        (
            torch.zeros(4),
            torch.zeros(4, dtype=torch.long),
            {},
            "model x must be (samples, classes) logits; found shape (4,)",
        ),
        (
            torch.zeros(4, 3),
            torch.zeros(4, dtype=torch.long),
            {"stacked": True},
            "(members, samples, classes)",
        ),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), {}, "floating-point logits"),
        (torch.zeros(4, 3), torch.zeros(4), {}, "labels must be a 1-D integer tensor"),
        (torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), {}, "labels must be a 1-D integer tensor"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), {}, "5 labels for 4 samples of model x"),
        (
            torch.zeros(4, 3),
            torch.tensor([0, 1, 2, 3]),
            {},
            "labels must lie in [0, 3) for the 3 classes of model x; found 0..3",
        ),
        (torch.zeros(4, 3), torch.tensor([0, -1, 2, 1]), {}, "found -1..2"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), {"min_samples": 1}, "model x has 0 samples"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), {"finite": True}, "NaN or infinite"),
    ],
)
def test_bad_inputs_are_refused_naming_them(logits, labels, options, message):
    with pytest.raises(ConfigError) as info:
        check_logits_labels(logits, labels, what="model x", **options)
    assert message in str(info.value)


def test_every_figure_goes_through_the_check():
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 2\)"):
        accuracy(torch.zeros(2, 2), torch.tensor([0, 2]))
    with pytest.raises(ConfigError, match="labels for"):
        nll(torch.zeros(2, 2), torch.tensor([0]))
