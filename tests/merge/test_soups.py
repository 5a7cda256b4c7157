"""Uniform and greedy soups (Wortsman et al. 2022), checked against by-hand averages and the paper's guarantee."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelfuse.errors import ConfigError
from modelfuse.merge.soups import greedy_soup, uniform_soup
from modelfuse.zoo import build_finetune_pool, evaluate


@pytest.fixture(scope="module")
def digits_pool():
    """One zoo MLP pretrained on digits, fine-tuned on all of digits from four seeds."""
    return build_finetune_pool(
        "mlp",
        "digits",
        tasks=[{"fraction": 1.0, "seed": i} for i in range(4)],
        pretrain_epochs=3,
        finetune_epochs=2,
        model_kwargs={"hidden": (64,)},
        train_kwargs={"lr": 3e-3},
        finetune_kwargs={"lr": 3e-3},
        progress=False,
    )


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_uniform_soup_is_the_mean_by_hand():
    models = [_mlp(s) for s in range(3)]
    for i, m in enumerate(models):
        m[3].running_mean.fill_(float(i))
    soup = uniform_soup(models)
    for name, value in soup.state_dict().items():
        tensors = [m.state_dict()[name] for m in models]
        if torch.is_floating_point(value):
            expected = (tensors[0].double() + tensors[1].double() + tensors[2].double()) / 3
            torch.testing.assert_close(value.double(), expected, atol=1e-7, rtol=0)
        else:
            assert torch.equal(value, tensors[0])
    assert torch.equal(soup[3].running_mean, torch.ones(2))
    assert soup is not models[0]


def test_uniform_soup_of_copies_is_the_model():
    model = _mlp(0)
    soup = uniform_soup([copy.deepcopy(model) for _ in range(5)])
    x = torch.randn(8, 4)
    model.eval(), soup.eval()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(soup.state_dict()[name], value, atol=1e-7, rtol=0)
    torch.testing.assert_close(soup(x), model(x), atol=1e-6, rtol=0)


def test_greedy_soup_never_below_best_ingredient(digits_pool):
    result = greedy_soup(digits_pool.members, digits_pool.data)
    val = digits_pool.data.val
    singles = [evaluate(m, val)["accuracy"] for m in digits_pool.members]
    assert result.accuracies == pytest.approx(singles)
    assert result.accuracy >= max(singles)
    assert evaluate(result.model, val)["accuracy"] == pytest.approx(result.accuracy)
    # the first step is the best ingredient; soup accuracy after each step never drops
    assert result.steps[0].index == max(range(4), key=lambda i: (singles[i], -i))
    soup_accs = [s.soup_accuracy for s in result.steps]
    assert soup_accs == sorted(soup_accs)
    assert [s.index for s in result.steps if s.kept] == result.kept
    # candidates are visited best first
    assert [s.ingredient_accuracy for s in result.steps] == sorted(singles, reverse=True)
    # kept soup = uniform soup of the kept ingredients
    by_hand = uniform_soup([digits_pool.members[i] for i in result.kept])
    for name, value in by_hand.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], value)


def test_greedy_soup_of_one_is_that_model(digits_pool):
    model = digits_pool.members[0]
    result = greedy_soup([model], digits_pool.data)
    assert result.kept == [0] and len(result.steps) == 1
    for name, value in model.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], value)


def test_greedy_soup_refuses_the_test_split(digits_pool):
    with pytest.raises(ConfigError, match="test split"):
        greedy_soup(digits_pool.members, digits_pool.data, split="test")
    with pytest.raises(ConfigError, match="split must be one of"):
        greedy_soup(digits_pool.members, digits_pool.data, split="holdout")
    result = greedy_soup(digits_pool.members[:2], digits_pool.data, split="test", allow_test=True)
    assert result.split == "test"


def test_soups_refuse_different_architectures():
    a, b = _mlp(0), nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.BatchNorm1d(2))
    with pytest.raises(ConfigError, match=r"tensor '0.weight' has shape \(5, 4\) in model 1"):
        uniform_soup([a, b])
    c = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ConfigError, match="missing"):
        uniform_soup([a, c])
    with pytest.raises(ConfigError, match="no models"):
        uniform_soup([])
