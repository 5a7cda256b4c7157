"""The ensemble figures of the output-fusion issue, measured on trained pools and printed.

MNIST-1D (cnn1d, 5 members from different seeds, 3 seeds of the whole experiment) carries
the accuracy claim; digits (the demo's CNN pool) the NLL one. Slow: about 15 cnn1d trainings
(cached under MODELFUSE_CACHE for a rerun); run with ``make test-slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.data import labels_of
from modelfuse.ensemble import Ensemble, GreedySelection, LearnedWeights, Stacking, metrics
from modelfuse.zoo import build_pool, predict

MEMBERS = 5
EPOCHS = 20


def pool_logits(arch: str, data: str, seeds: list[int]):
    pool = build_pool(arch, data, seeds=seeds, epochs=EPOCHS, progress=False)
    split = {name: getattr(pool.data, name) for name in ("val", "test")}
    logits = {
        name: torch.stack([predict(m, ds).double() for m in pool.members]) for name, ds in split.items()
    }
    labels = {name: labels_of(ds) for name, ds in split.items()}
    return pool, logits, labels


def scores(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return metrics.accuracy(log_probs, labels), metrics.nll(log_probs, labels)


@pytest.mark.slow
def test_mnist1d_ensemble_beats_the_validation_chosen_member():
    rows = []
    for experiment in range(3):
        seeds = [100 * experiment + i for i in range(MEMBERS)]
        pool, logits, labels = pool_logits("cnn1d", "mnist1d", seeds)
        val = [scores(torch.log_softmax(z, -1), labels["val"]) for z in logits["val"]]
        test = [scores(torch.log_softmax(z, -1), labels["test"]) for z in logits["test"]]
        chosen = max(range(MEMBERS), key=lambda i: (val[i][0], -val[i][1]))
        ensemble = Ensemble(pool.members, "mean_prob")
        ens_acc, ens_nll = scores(ensemble.combine_outputs(logits["test"]), labels["test"])
        rows.append((test[chosen][0], ens_acc, float(np.mean([t[1] for t in test])), ens_nll))
        print(
            f"experiment {experiment} (seeds {seeds}): val-chosen member {100 * test[chosen][0]:.2f}% "
            f"(NLL {test[chosen][1]:.4f}), ensemble {100 * ens_acc:.2f}% (NLL {ens_nll:.4f}), "
            f"members' mean NLL {rows[-1][2]:.4f}"
        )
        # the fitted combiners on the same validation predictions
        weights = LearnedWeights().fit(logits["val"], labels["val"])
        assert (weights.weights_ >= 0).all() and float(weights.weights_.sum()) == pytest.approx(1.0)
        assert weights.nll_ <= weights.start_nll_
        greedy = GreedySelection().fit(logits["val"], labels["val"])
        assert all(b <= a for a, b in zip(greedy.trajectory_, greedy.trajectory_[1:]))
        stack = Stacking().fit(logits["val"], labels["val"])
        print(
            f"  validation NLL: plain mean {weights.start_nll_:.4f}, learned weights {weights.nll_:.4f}, "
            f"greedy {greedy.trajectory_[-1]:.4f}, stacking {stack.nll_:.4f} (out of fold {stack.oof_nll_:.4f})"
        )
        assert stack.nll_ <= stack.mean_nll_
    best, ens, member_nll, ens_nll = np.mean(rows, axis=0)
    print(
        f"mean over 3 experiments: val-chosen member {100 * best:.2f}%, ensemble {100 * ens:.2f}% "
        f"(+{100 * (ens - best):.2f} points); test NLL ensemble {ens_nll:.4f} = "
        f"{ens_nll / member_nll:.3f} x the members' mean {member_nll:.4f}"
    )
    assert ens - best >= 0.005, f"ensemble only +{100 * (ens - best):.2f} points over the val-chosen member"
    assert ens_nll <= 0.95 * member_nll


@pytest.mark.slow
def test_digits_ensemble_nll():
    pool, logits, labels = pool_logits("cnn", "digits", list(range(MEMBERS)))
    test = [scores(torch.log_softmax(z, -1), labels["test"]) for z in logits["test"]]
    ens_acc, ens_nll = scores(Ensemble(pool.members).combine_outputs(logits["test"]), labels["test"])
    member_nll = float(np.mean([t[1] for t in test]))
    print(
        f"digits, 5 cnn: members {100 * np.mean([t[0] for t in test]):.2f}% NLL {member_nll:.4f}; "
        f"ensemble {100 * ens_acc:.2f}% NLL {ens_nll:.4f} ({ens_nll / member_nll:.3f} x)"
    )
    assert ens_nll <= 0.95 * member_nll
