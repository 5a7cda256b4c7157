"""Issue 16's digits multi-task table: the floors that hold, with margin, on every seed.

One pretrained zoo MLP fine-tuned on three tasks (label subsets 0-3 / 4-6 / 7-9; input
transformations original / rotated 90 / inverted), merged by every method of the table in
``benchmarks/multitask_merge.py`` (imported from there, so the test checks the figures the
benchmark prints). Accuracy is on test samples no method selected or learned on.

Floors (issue 16, measured here over seeds 0-2; benchmarks/RESULTS.md has the table):

- RegMean beats the simple average on every seed, on both families;
- on the transformations RegMean beats task arithmetic (lambda chosen on validation) by at
  least 20 points on every seed;
- on the transformations task arithmetic beats the pretrained model on every seed, and no
  merge reaches the jointly trained model.

Layer-wise AdaMerging runs as in the paper (the sum over tasks of each task's mean entropy on
its own unlabelled inputs, init 0.3, Adam 1e-3, about 500 steps of 16 inputs per task; on the
validation inputs, not the test inputs). What is asserted of it is what was measured: it
lowers its objective on every seed, and it does so by scaling the logits up (their spread on
the adaptation inputs at least doubles), which is why lower entropy is not higher accuracy here.

Not asserted, because they did not hold in this setup (benchmarks/RESULTS.md has the table and
the variants tried):

- layer-wise AdaMerging beating task arithmetic on the transformations (issue 16 asks for it):
  it stays below task arithmetic at the paper's lambda 0.3 and at the validation-chosen lambda
  on every seed, also with the variants tried (pooled vs per-task objective, lr 1e-3..1e-2,
  mini-batch vs full batch, validation vs test inputs, init 0.3 vs the chosen lambda, a base
  pretrained longer or on a mix of the transformations, fine-tunes at lower lr or with a frozen
  head, task-specific heads). Why, asserted below: over the grid of task-wise coefficients
  the entropy objective does not rank merges by accuracy on this pool
  (``benchmarks/adamerging_landscape.py``);
- on the label subsets, task arithmetic did not beat the pretrained base on every seed, and
  RegMean came above the jointly trained model on one seed.

The pool rebuilt with the zoo MLP's cosine head (``head="cosine"``, CLIP-style normalised
logits at the fixed scale 20, so no coefficient can inflate the logits) keeps every floor on
both families, and task arithmetic then beats the pretrained base on the label subsets too
(asserted, slow); AdaMerging still does not beat task arithmetic there on every seed (seed 2
of the transformations: 39.6 against 49.2), so that is not asserted either.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from modelfuse.merge import gram_matrices, regmean_merge
from modelfuse.zoo import create_model

SEEDS = (0, 1, 2)


def _bench(name: str = "multitask_merge"):
    """``benchmarks/<name>.py`` as a module (``adamerging_landscape`` imports ``multitask_merge``
    and finds it in ``sys.modules`` once the ``bench`` fixture loaded it)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def results(bench):
    return {name: [bench.run(name, seed) for seed in SEEDS] for name in bench.FAMILIES}


@pytest.fixture(scope="module")
def cosine_results(bench):
    """The same table on the pool built with the cosine head (``--head cosine``, scale 20)."""
    return {name: [bench.run(name, seed, head="cosine") for seed in SEEDS] for name in bench.FAMILIES}


def test_regmean_averages_the_cosine_head_and_solves_the_linear_layers():
    """With ``head="cosine"`` RegMean Gram-merges the hidden Linear layers and averages the head.

    The cosine head is not an ``nn.Linear`` (its input is normalised, its output not linear in
    its weight), so ``gram_matrices`` has no statistic for it and ``regmean_merge`` takes the
    plain mean of its weight. Checked against the closed forms in NumPy.
    """
    alpha, xs, models = 0.9, [], []
    for k in range(3):
        torch.manual_seed(k)
        models.append(
            create_model(
                "mlp", input_shape=(1, 8, 8), num_classes=4, hidden=(6, 5), head="cosine", logit_scale=20.0
            )
        )
        xs.append(torch.rand(120, 1, 8, 8) + k)
    grams = [gram_matrices(m, DataLoader(TensorDataset(x), batch_size=50)) for m, x in zip(models, xs)]
    assert set(grams[0].tensors) == {"features.fc1.weight", "features.fc2.weight"}
    merged = regmean_merge([m.state_dict() for m in models], grams, alpha=alpha)

    def npy(t):
        return t.detach().double().numpy()

    def regmean(ws, inputs):
        gs = [a.T @ a for a in inputs]
        gs = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in gs]
        return np.linalg.solve(sum(gs), sum(g @ w.T for g, w in zip(gs, ws))).T

    inputs1 = [npy(x.flatten(1)) for x in xs]
    w1 = [npy(m.features.fc1.weight) for m in models]
    np.testing.assert_allclose(npy(merged["features.fc1.weight"]), regmean(w1, inputs1), rtol=1e-4, atol=1e-5)
    inputs2 = [
        np.maximum(a @ npy(m.features.fc1.weight).T + npy(m.features.fc1.bias), 0.0)
        for a, m in zip(inputs1, models)
    ]
    w2 = [npy(m.features.fc2.weight) for m in models]
    np.testing.assert_allclose(npy(merged["features.fc2.weight"]), regmean(w2, inputs2), rtol=1e-4, atol=1e-5)
    for name in ("classifier.weight", "features.fc1.bias", "features.fc2.bias"):
        mean = np.mean([npy(m.state_dict()[name]) for m in models], axis=0)
        np.testing.assert_allclose(npy(merged[name]), mean, rtol=1e-6, atol=1e-7)


def _avg(result, row: str) -> float:
    values = result["acc"][row]
    return 100 * sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["labels", "transforms"])
def test_regmean_beats_simple_average_every_seed(results, name):
    for r in results[name]:
        assert _avg(r, "RegMean") > _avg(r, "simple average") + 0.5, (name, r["seed"], r["acc"])


@pytest.mark.slow
def test_regmean_beats_task_arithmetic_by_20_points_on_transformations(results):
    for r in results["transforms"]:
        assert _avg(r, "RegMean") >= _avg(r, "task arithmetic") + 20, (r["seed"], r["acc"])


@pytest.mark.slow
def test_task_arithmetic_beats_pretrained_every_seed_on_transformations(results):
    name = "transforms"
    for r in results[name]:
        assert _avg(r, "task arithmetic") > _avg(r, "pretrained") + 1.0, (name, r["seed"], r["acc"])
        assert r["lambda_ta"] > 0


@pytest.mark.slow
def test_no_merge_reaches_the_jointly_trained_model_on_transformations(results, bench):
    name = "transforms"
    for r in results[name]:
        joint = _avg(r, "jointly trained")
        for row in bench.ROWS:
            if row in ("pretrained", "individual", "jointly trained"):
                continue
            assert _avg(r, row) < joint, (name, r["seed"], row, r["acc"])


@pytest.mark.slow
def test_adamerging_lowers_its_objective_by_scaling_the_logits_on_transformations(results):
    for r in results["transforms"]:
        before, after = r["ada_entropy"]
        assert after < before - 0.1, (r["seed"], r["ada_entropy"])
        spread_init, spread_ada = r["ada_logit_spread"]
        assert spread_ada > 2 * spread_init, (r["seed"], r["ada_logit_spread"])


@pytest.mark.slow
def test_table_has_every_row_task_and_seed(results, bench, capsys):
    for name, rs in results.items():
        text = bench.table(rs)
        lines = text.splitlines()
        assert len(lines) == 2 + len(bench.ROWS)
        for row in bench.ROWS:
            assert any(line.startswith(f"| {row} |") for line in lines)
            for r in rs:
                assert len(r["acc"][row]) == 3
                assert all(0.0 <= a <= 1.0 for a in r["acc"][row])
        # individual: each fine-tune on its own task beats the pretrained base there
        for r in rs:
            assert all(i > p for i, p in zip(r["acc"]["individual"], r["acc"]["pretrained"]))
        with capsys.disabled():
            print(f"\n{name}\n{text}")
            for r in rs:
                print(
                    f"seed {r['seed']}: lambda TA {r['lambda_ta']}, TIES {r['lambda_ties']}, "
                    f"AdaMerging mean coefficients {[round(float(c), 2) for c in r['ada_coefficients'].mean(1)]}"
                )


@pytest.mark.slow
def test_cosine_head_pool_keeps_the_floors_and_task_arithmetic_beats_pretrained(cosine_results, bench):
    """With the cosine head every floor of the linear pool holds, and on both families.

    Measured margins over seeds 0-2 (benchmarks/RESULTS.md): RegMean above the simple average by
    2.1 or more (label subsets) and 47 or more (transformations), above task arithmetic by 44 or
    more on the transformations; task arithmetic above the pretrained base by 1.2 or more (label
    subsets) and 10 or more (transformations); every merge below the jointly trained model.
    Layer-wise AdaMerging is not ranked: it stays below task arithmetic on seed 2 of the
    transformations (benchmarks/RESULTS.md, "What was tried").
    """
    for name, rs in cosine_results.items():
        for r in rs:
            assert r["head"] == "cosine"
            assert _avg(r, "RegMean") > _avg(r, "simple average") + 1.0, (name, r["seed"], r["acc"])
            assert _avg(r, "task arithmetic") > _avg(r, "pretrained") + 0.5, (name, r["seed"], r["acc"])
            joint = _avg(r, "jointly trained")
            for row in bench.ROWS:
                if row not in ("pretrained", "individual", "jointly trained"):
                    assert _avg(r, row) < joint, (name, r["seed"], row, r["acc"])
            if name == "transforms":
                assert _avg(r, "RegMean") >= _avg(r, "task arithmetic") + 20, (r["seed"], r["acc"])


@pytest.mark.slow
@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_adamerging_entropy_does_not_track_accuracy_on_the_transformations(bench, head, capsys):
    """Why layer-wise AdaMerging cannot beat task arithmetic on this pool (issue 16's open floor).

    Over the whole grid of task-wise coefficients {0, 0.1, ..., 1}^3 (merged as
    ``theta_0 + sum_k lambda_k tau_k``, 1331 models), AdaMerging's objective, the sum over tasks of
    the mean prediction entropy on each task's validation inputs, is ranked against the mean test
    accuracy (Spearman). Measured (benchmarks/RESULTS.md, "AdaMerging's objective on the digits
    pools"): rho between -0.37 and 0.19, where an objective that tracks accuracy is near -1; the
    least-entropy coefficients put 1.0 on one or two fine-tunes (the original images' in five pools
    of six) and are 6-21 points below task arithmetic at 0.3 on every pool except one (linear
    head, seed 0: 33.9 vs 31.5), while the grid holds coefficients 3.7-12.3 points above it.

    Asserted: -0.4 <= rho <= 0.25 on every seed (the README quotes -0.37 to 0.19), the
    least-entropy point at most 3 points above task arithmetic at 0.3, and the grid's best at
    least 3 points above it: entropy minimisation has nothing to follow toward the coefficients
    that would beat task arithmetic.
    """
    land = _bench("adamerging_landscape")
    results = [land.run("transforms", seed, head) for seed in SEEDS]
    with capsys.disabled():
        print("\n" + land.table(results))
    for r in results:
        assert -0.4 <= r["rho"] <= 0.25, r
        assert r["min_entropy_test"] <= r["ta_test"] + 3.0, r
        assert r["best_test"] >= r["ta_test"] + 3.0, r
