"""``modelfuse demo``: its figures against an independent computation, and its run time."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np

from modelfuse.cli.demo import DEMO_ARCH, DEMO_DATA, pool_rows
from modelfuse.zoo import build_pool, predict


def test_demo_rows_match_a_numpy_ensemble():
    rows = pool_rows(members=3, epochs=3, seed=0)
    assert [r[0] for r in rows] == [
        "member seed=0",
        "member seed=1",
        "member seed=2",
        "members' mean",
        "ensemble: mean of probabilities",
    ]
    pool = build_pool(DEMO_ARCH, DEMO_DATA, seeds=[0, 1, 2], epochs=3)  # from the cache now
    labels = pool.data.test.tensors[1].numpy()
    probs = []
    for member, row in zip(pool.members, rows):
        z = predict(member, pool.data.test).double().numpy()
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        probs.append(p)
        assert np.isclose(row[1], (p.argmax(1) == labels).mean())
        assert np.isclose(row[2], -np.log(p[np.arange(len(labels)), labels]).mean())
    assert np.isclose(rows[3][1], np.mean([r[1] for r in rows[:3]]))
    mean = np.mean(probs, axis=0)
    assert np.isclose(rows[4][1], (mean.argmax(1) == labels).mean())
    assert np.isclose(rows[4][2], -np.log(mean[np.arange(len(labels)), labels]).mean())


def test_demo_command_from_an_empty_cache_within_three_minutes(tmp_path):
    env = {**os.environ, "MODELFUSE_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "modelfuse", "demo"], capture_output=True, text=True, env=env, timeout=300
    )
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert elapsed < 180, f"modelfuse demo took {elapsed:.0f} s from an empty cache"
    members = re.findall(r"member seed=\d+\s*│\s*([\d.]+)%", out.stdout)
    assert len(members) == 5, out.stdout
    ensemble = re.search(r"ensemble: mean of probabilities\s*│\s*([\d.]+)%", out.stdout)
    assert ensemble is not None, out.stdout
    assert float(ensemble.group(1)) >= 95.0


def test_demo_rejects_a_bad_pool_size():
    out = subprocess.run(
        [sys.executable, "-m", "modelfuse", "demo", "--members", "0"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "--members must be at least 1, got 0" in out.stderr
