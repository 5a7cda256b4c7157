"""AdaMerging (Yang et al. 2024): entropy goes down, lr 0 is task arithmetic by hand, shapes, bad inputs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse.errors import ConfigError
from modelfuse.merge import merge_modules
from modelfuse.merge.adamerging import adamerging, prediction_entropy
from modelfuse.zoo import build_finetune_pool


@pytest.fixture(scope="module")
def task_pool():
    """One zoo MLP pretrained on digits, fine-tuned on the label subsets 0-3 / 4-6 / 7-9."""
    return build_finetune_pool(
        "mlp",
        "digits",
        tasks=[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]],
        pretrain_epochs=3,
        finetune_epochs=3,
        model_kwargs={"hidden": (64, 32)},
        train_kwargs={"lr": 3e-3},
        progress=False,
    )


def _by_hand(base: nn.Module, models, lam) -> dict[str, torch.Tensor]:
    """theta_0 + sum_k lambda_k (theta_k - theta_0), lam: (K,) or (K, P) over the named parameters."""
    names = [n for n, _ in base.named_parameters()]
    sb = base.state_dict()
    out = {}
    for j, n in enumerate(names):
        total = sb[n].double().clone()
        for k, m in enumerate(models):
            w = float(lam[k]) if lam.dim() == 1 else float(lam[k, j])
            total += w * (m.state_dict()[n].double() - sb[n].double())
        out[n] = total
    return out


def test_prediction_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    p = 1 / (1 + math.exp(-2))  # softmax of (2, 0)
    h2 = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(prediction_entropy(logits)) == pytest.approx((math.log(2) + h2) / 2, abs=1e-6)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_lr_zero_is_task_arithmetic(task_pool, granularity):
    base, models = task_pool.base, task_pool.members
    result = adamerging(base, models, task_pool.data, granularity=granularity, init=0.3, lr=0.0, epochs=1)
    lam = torch.full(result.coefficients.shape, 0.3)
    torch.testing.assert_close(result.coefficients, lam)
    expected = _by_hand(base, models, lam)
    for name, value in expected.items():
        torch.testing.assert_close(result.model.state_dict()[name].double(), value, atol=1e-6, rtol=0)
    # and the registry's task arithmetic (lambda scales the summed task vectors) agrees
    ta = merge_modules("task_arithmetic", models, base, lambda_=0.3)
    for name, value in ta.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], value, atol=1e-6, rtol=0)


def test_layerwise_entropy_decreases_and_shapes(task_pool):
    base, models = task_pool.base, task_pool.members
    result = adamerging(base, models, task_pool.data, granularity="layer", lr=1e-2, epochs=4, batch_size=64)
    n_tensors = len(list(base.parameters()))
    assert result.coefficients.shape == (3, n_tensors) == (3, 6)
    assert result.names == [n for n, _ in base.named_parameters()]
    assert result.entropy_after < result.entropy_before - 1e-3
    assert ((result.coefficients >= 0) & (result.coefficients <= 1)).all()
    assert not torch.allclose(result.coefficients, torch.full((3, 6), 0.3))
    # the returned model is exactly theta_0 + sum lambda tau with the learned (clamped) coefficients
    expected = _by_hand(base, models, result.coefficients)
    for name, value in expected.items():
        torch.testing.assert_close(result.model.state_dict()[name].double(), value, atol=1e-6, rtol=0)
    # its entropy on the adaptation inputs is the reported one, computed independently here
    x = task_pool.data.val.tensors[0]
    with torch.no_grad():
        logp = torch.log_softmax(result.model.eval()(x).double(), -1)
    assert float(-(logp.exp() * logp).sum(-1).mean()) == pytest.approx(result.entropy_after, abs=1e-5)
    # the inputs were not modified
    assert torch.equal(
        base.state_dict()["classifier.weight"], task_pool.base.state_dict()["classifier.weight"]
    )


def test_taskwise_has_one_coefficient_per_task(task_pool):
    result = adamerging(
        task_pool.base, task_pool.members, task_pool.data, granularity="task", lr=1e-2, epochs=2
    )
    assert result.coefficients.shape == (3,)
    assert result.entropy_after < result.entropy_before


def test_bad_inputs(task_pool):
    base, models, data = task_pool.base, task_pool.members, task_pool.data
    with pytest.raises(ConfigError, match="test split"):
        adamerging(base, models, data, split="test")
    ok = adamerging(base, models, data, split="test", allow_test=True, lr=0.0, epochs=1, max_examples=16)
    assert ok.split == "test"
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match=r"different architectures: tensor .* model 1"):
        adamerging(base, [models[0], other], data)
    wider = copy.deepcopy(base)
    wider.classifier = nn.Linear(32, 11)
    with pytest.raises(ConfigError, match=r"tensor 'classifier.weight' has shape \(11, 32\) in model 0"):
        adamerging(base, [wider], data)
    with pytest.raises(ConfigError, match="granularity"):
        adamerging(base, models, data, granularity="block")
    with pytest.raises(ConfigError, match="at least one fine-tuned model"):
        adamerging(base, [], data)
    with pytest.raises(ConfigError, match="cannot run on"):
        adamerging(base, models, TensorDataset(torch.randn(10, 5), torch.zeros(10, dtype=torch.long)))


def test_batchnorm_buffers_and_eval_mode():
    """Running statistics are merged with the initial lambda and the merged net runs in eval mode (dropout off)."""

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3))
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        return m

    base, models = net(0), [net(1), net(2)]
    data = TensorDataset(torch.randn(40, 4), torch.zeros(40, dtype=torch.long))
    frozen = adamerging(base, models, data, granularity="layer", init=0.4, lr=0.0, epochs=1)
    for name in ("running_mean", "running_var"):
        b = getattr(base[1], name)
        expected = b + 0.4 * sum(getattr(m[1], name) - b for m in models)
        torch.testing.assert_close(getattr(frozen.model[1], name), expected, atol=1e-6, rtol=0)
    assert frozen.coefficients.shape == (2, 6)  # 2 tasks x (2 linear + BN weight/bias + 2 linear) tensors
    # eval mode while learning: with lr 0 the mean batch entropy is the full-data entropy (dropout or
    # batch statistics would change it); 5 equal batches of 8
    still = adamerging(base, models, data, granularity="layer", init=0.4, lr=0.0, epochs=2, batch_size=8)
    assert len(still.losses) == 10
    assert sum(still.losses) / 10 == pytest.approx(frozen.entropy_before, abs=1e-6)
    learned = adamerging(base, models, data, granularity="layer", lr=5e-2, epochs=20, batch_size=8)
    assert learned.entropy_after < learned.entropy_before
    for name in ("running_mean", "running_var"):  # buffers stay at the initial lambda (0.3), not learned
        b = getattr(base[1], name)
        expected = b + 0.3 * sum(getattr(m[1], name) - b for m in models)
        torch.testing.assert_close(getattr(learned.model[1], name), expected, atol=1e-6, rtol=0)


def _entropy_np(model: nn.Module, x: torch.Tensor) -> float:
    """Mean Shannon entropy of softmax(model(x)), in NumPy from the definition."""
    with torch.no_grad():
        z = model.eval()(x).double().numpy()
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return float(-(p * np.log(p)).sum(-1).mean())


def test_per_task_objective_is_the_sum_of_each_tasks_mean_entropy(task_pool):
    """The paper's loss: sum_k mean entropy on task k's own inputs, each batch holding every task."""
    base, models = task_pool.base, task_pool.members
    x = task_pool.data.val.tensors[0]
    parts = [TensorDataset(x[:8]), TensorDataset(x[8:20]), TensorDataset(x[20:36])]  # 8, 12, 16 inputs
    # lr 0: the merged model is task arithmetic at 0.3; one batch of 16 per task per step
    fixed = adamerging(base, models, parts, granularity="layer", init=0.3, lr=0.0, epochs=1, batch_size=16)
    ta = merge_modules("task_arithmetic", models, base, lambda_=0.3)
    by_hand = sum(_entropy_np(ta, p.tensors[0]) for p in parts)
    assert fixed.entropy_before == pytest.approx(by_hand, abs=1e-5)
    assert fixed.entropy_after == pytest.approx(by_hand, abs=1e-5)
    # one step: the longest task (16) sets the epoch; the batch holds all 16 of task 3, and tasks 1
    # and 2 cycled to 16 (8 twice, 12 + the first 4): its loss is the sum of those mean entropies
    assert len(fixed.losses) == 1
    cycled = [x[:8].repeat(2, 1, 1, 1), torch.cat([x[8:20], x[8:12]]), x[20:36]]
    expected = sum(_entropy_np(ta, c) for c in cycled)
    assert fixed.losses[0] == pytest.approx(expected, abs=1e-5)
    # a pooled single dataset of the same inputs gives another objective (one mean over all 36)
    pooled = adamerging(base, models, TensorDataset(x[:36]), init=0.3, lr=0.0, epochs=1)
    assert pooled.entropy_before == pytest.approx(_entropy_np(ta, x[:36]), abs=1e-5)
    assert abs(pooled.entropy_before - by_hand) > 1e-2
    # learning lowers the per-task objective
    learned = adamerging(base, models, parts, granularity="layer", lr=1e-2, epochs=10, batch_size=4)
    assert learned.entropy_after < learned.entropy_before - 1e-3


def test_per_task_bad_inputs(task_pool):
    base, models, data = task_pool.base, task_pool.members, task_pool.data
    with pytest.raises(ConfigError, match="2 per-task data sets for 3 fine-tuned models"):
        adamerging(base, models, [data, data])
    with pytest.raises(ConfigError, match=r"adamerging \(task 0\) was pointed at the test split"):
        adamerging(base, models, [data, data, data], split="test")
    with pytest.raises(ConfigError, match=r"adamerging \(task 2\): the .val. split is empty"):
        x = data.val.tensors[0]
        adamerging(base, models, [TensorDataset(x), TensorDataset(x), TensorDataset(x[:0])])
