"""``modelfuse demo``: its figures against an independent computation, and the command end to end
(its run time is measured by benchmarks/demo_time.py, not asserted here)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from modelfuse.cli.demo import DEMO_ARCH, DEMO_DATA, demo_rows
from modelfuse.zoo import build_pool, predict


def np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_figures(log_p, labels):
    """(accuracy, NLL) of log-probabilities, in NumPy."""
    return (log_p.argmax(1) == labels).mean(), -log_p[np.arange(len(labels)), labels].mean()


def test_demo_rows_match_independent_computations():
    result = demo_rows(members=3, epochs=3, seed=0)
    rows = result.rows
    assert [(r.level, r.name) for r in rows] == [
        ("members", "member seed=0"),
        ("members", "member seed=1"),
        ("members", "member seed=2"),
        ("members", "members' mean"),
        ("output", "ensemble: mean of probabilities"),
        ("output", "ensemble: weights + T fitted on val"),
        ("output", "distilled into one cnn"),
        ("feature", "3 members' features, one new head"),
        ("structure", "stitched: seed=0 front, seed=1 back"),
        ("parameter", "3 fine-tunes of one base: mean"),
        ("parameter", "model soup of the 3 fine-tunes"),
    ]
    by_name = {r.name: r for r in rows}
    pool = build_pool(DEMO_ARCH, DEMO_DATA, seeds=[0, 1, 2], epochs=3)  # from the cache now
    test = pool.data.test
    labels = test.tensors[1].numpy()

    def figures_of(model):
        return np_figures(np_log_softmax(predict(model, test).double().numpy()), labels)

    log_p = [np_log_softmax(predict(m, test).double().numpy()) for m in pool.members]
    for lp, row in zip(log_p, rows):
        assert (row.accuracy, row.nll) == pytest.approx(np_figures(lp, labels), rel=1e-9)
    assert rows[3].accuracy == pytest.approx(np.mean([r.accuracy for r in rows[:3]]))
    right = np.stack([lp.argmax(1) == labels for lp in log_p])
    best = max(range(3), key=lambda i: (right[i].mean(), -rows[i].nll))
    assert result.room.best_name == f"seed={best}"
    assert result.room.fixable == int((~right[best] & np.delete(right, best, 0).any(0)).sum())
    probs = np.exp(np.stack(log_p))
    mean = by_name["ensemble: mean of probabilities"]
    assert (mean.accuracy, mean.nll) == pytest.approx(np_figures(np.log(probs.mean(0)), labels), rel=1e-9)
    # the fitted ensemble: the weighted mixture of probabilities, its log divided by T
    w, t = np.asarray(result.fitted_weights), result.fitted_temperature
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0) and t > 0
    fitted = by_name["ensemble: weights + T fitted on val"]
    mixture = np_log_softmax(np.log(np.einsum("k,knc->nc", w, probs)) / t)
    assert (fitted.accuracy, fitted.nll) == pytest.approx(np_figures(mixture, labels), rel=1e-6)
    # every other fused row reports its model's own figures
    for key, name in (
        ("student", "distilled into one cnn"),
        ("features", "3 members' features, one new head"),
        ("stitched", "stitched: seed=0 front, seed=1 back"),
        ("soup", "model soup of the 3 fine-tunes"),
    ):
        row = by_name[name]
        assert (row.accuracy, row.nll) == pytest.approx(figures_of(result.models[key]), rel=1e-5), name
    # the fused features read the members themselves, frozen; the stitched model is member 0's
    # front and member 1's back, unchanged
    for i, member in enumerate(pool.members):
        inside = result.models["features"].branches[f"seed{i}"].state_dict()
        assert all(torch.equal(v, member.state_dict()[k]) for k, v in inside.items())
    stitched = result.models["stitched"]
    for part, member in ((stitched.front, pool.members[0]), (stitched.back, pool.members[1])):
        assert all(torch.equal(v, member.state_dict()[k]) for k, v in part.state_dict().items())
    # the soup is the plain average of the fine-tunes' weights, in NumPy
    tuned = [m.state_dict() for m in result.finetune_pool.members]
    for key, value in result.models["soup"].state_dict().items():
        expected = np.mean([sd[key].double().numpy() for sd in tuned], axis=0)
        np.testing.assert_allclose(value.double().numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=key)
    tuned_figures = [figures_of(m) for m in result.finetune_pool.members]
    assert by_name["3 fine-tunes of one base: mean"].accuracy == pytest.approx(
        np.mean([f[0] for f in tuned_figures])
    )


def test_a_demo_of_one_member_fuses_to_that_member():
    result = demo_rows(members=1, epochs=2, seed=7)
    rows = {r.name: r for r in result.rows}
    assert result.room is None  # nothing to add to a single model
    member = rows["member seed=7"]
    assert "stitched" not in " ".join(rows)  # stitching needs two members
    ensemble = rows["ensemble: mean of probabilities"]
    assert (ensemble.accuracy, ensemble.nll) == pytest.approx((member.accuracy, member.nll), rel=1e-12)
    # one member's weight is 1; a temperature changes the NLL, never the predicted class
    assert rows["ensemble: weights + T fitted on val"].accuracy == member.accuracy


def test_demo_command_from_an_empty_cache(tmp_path):
    # how long it takes is measured by benchmarks/demo_time.py (benchmarks/RESULTS.md), not here
    env = {**os.environ, "MODELFUSE_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "modelfuse", "demo"], capture_output=True, text=True, env=env, timeout=1200
    )
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    members = re.findall(r"member seed=\d+\s*│\s*([\d.]+)%", out.stdout)
    assert len(members) == 5, out.stdout
    ensemble = re.search(r"ensemble: mean of probabilities\s*│\s*([\d.]+)%", out.stdout)
    assert ensemble is not None, out.stdout
    assert float(ensemble.group(1)) >= 95.0
    for level in ("output", "feature", "structure", "parameter"):  # every available fusion level
        assert re.search(rf"│ {level}\s+│", out.stdout), (level, out.stdout)
    assert re.search(r"room for fusion: seed=\d is wrong on \d+ of 359 samples", out.stdout), out.stdout
    soup = re.search(r"model soup of the 5 fine-tunes\s*│\s*([\d.]+)%", out.stdout)
    assert soup is not None and float(soup.group(1)) >= 95.0, out.stdout


def test_demo_rejects_a_bad_pool_size():
    out = subprocess.run(
        [sys.executable, "-m", "modelfuse", "demo", "--members", "0"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "--members must be at least 1, got 0" in out.stderr
