"""The loss-fusion interface's helpers and the one training loop's ``backward=`` hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse.errors import ConfigError, LossFusionError
from modelfuse.losses import check_task_losses, masked_task_losses
from modelfuse.zoo import train


def test_masked_task_losses_average_over_labelled_samples_only():
    rng = np.random.default_rng(0)
    per = rng.normal(size=(7, 3)) ** 2
    mask = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
    per_t = torch.tensor(per)
    per_t[~torch.tensor(mask)] = float("nan")  # unlabelled entries are never read
    losses, present = masked_task_losses(per_t, torch.tensor(mask))
    expected = [per[mask[:, k], k].mean() if mask[:, k].any() else 0.0 for k in range(3)]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-12)
    assert present.tolist() == [True, True, False]


def test_check_task_losses_names_the_bad_task_and_count():
    good = [torch.tensor(1.0), torch.tensor(2.0)]
    assert check_task_losses(good, 2).tolist() == [1.0, 2.0]
    with pytest.raises(LossFusionError, match=r"expected 3 task losses.*found 2"):
        check_task_losses(good, 3)
    with pytest.raises(LossFusionError, match=r"task 1 \('depth'\) is inf"):
        check_task_losses([torch.tensor(1.0), torch.tensor(float("inf"))], 2, ["seg", "depth"])
    with pytest.raises(LossFusionError, match="task 0 must be a scalar"):
        check_task_losses([torch.ones(3), torch.tensor(1.0)], 2)


def _two_task_data(n: int = 40) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long(), x[:, 1:2] * 2.0)


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.cls, self.reg = nn.Linear(8, 2), nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.cls(h), self.reg(h)


def _task_losses(model, batch):
    x, y, t = batch
    out_cls, out_reg = model(x)
    return torch.stack([F.cross_entropy(out_cls, y), F.mse_loss(out_reg, t)])


def test_train_backward_hook_gets_the_loss_output_and_logs_its_return_value():
    torch.manual_seed(0)
    model = _TwoHeads()
    seen, returned, sizes = [], [], []

    def backward(losses):
        seen.append(losses.detach().clone())
        combined = 0.3 * losses[0] + 2.0 * losses[1]
        combined.backward()
        returned.append(float(combined.detach()))
        return combined.detach()

    class Sizes:
        def on_step(self, state):
            sizes.append(len(state.batch[0]))
            assert state.loss == returned[-1]  # the logged loss is the combined objective

    result = train(model, _two_task_data(), epochs=1, seed=0, batch_size=16, loss=_task_losses,
                   backward=backward, callbacks=[Sizes()])
    assert [s.shape for s in seen] == [(2,)] * 3 and sizes == [16, 16, 8]
    expected = sum(r * n for r, n in zip(returned, sizes, strict=True)) / sum(sizes)
    assert result.history[0]["train_loss"] == pytest.approx(expected, rel=1e-12)
    # and it trained: the gradients the hook filled reached the optimizer
    before = [p.detach().clone() for p in model.parameters()]
    train(model, _two_task_data(), epochs=1, seed=0, batch_size=16, loss=_task_losses, backward=backward)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_train_backward_hook_accepts_a_float_and_refuses_no_objective():
    model = _TwoHeads()

    def as_float(losses):
        losses.sum().backward()
        return float(losses.detach().sum())

    result = train(model, _two_task_data(), epochs=1, seed=0, loss=_task_losses, backward=as_float)
    assert np.isfinite(result.history[0]["train_loss"])
    with pytest.raises(ConfigError, match="must return the combined objective"):
        train(model, _two_task_data(), epochs=1, seed=0, loss=_task_losses, backward=lambda v: v.sum().backward())
    with pytest.raises(ConfigError, match=r"found \(2,\)"):
        train(model, _two_task_data(), epochs=1, seed=0, loss=_task_losses, backward=lambda v: v)
