"""Does AdaMerging's objective track accuracy on the digits multi-task pools? (issue 16)

AdaMerging (Yang et al. 2024) learns merge coefficients by minimising the merged model's
prediction entropy on unlabelled inputs, the sum over tasks of each task's mean entropy on its
own inputs. That is only a proxy: it can find good coefficients only where lower entropy goes
with higher accuracy. This script measures that on the pools of ``multitask_merge.py`` (the
same ``pool`` function, so the same base, fine-tunes and data) over the whole grid of task-wise
coefficients ``lambda in {0, 0.1, ..., 1}^3``, merged as ``theta_0 + sum_k lambda_k tau_k``:

- ``rho``: Spearman rank correlation between the entropy objective (on the validation inputs, as
  AdaMerging uses them in ``multitask_merge.py``) and the mean test accuracy over the tasks.
  An objective that tracks accuracy has ``rho`` near -1; AdaMerging needs it clearly negative;
- ``rho val``: the same against the mean accuracy on the very validation inputs the entropy is
  measured on (no distribution shift between objective and score);
- the grid point of least entropy and its test accuracy, task arithmetic at the paper's 0.3
  (the grid point ``(0.3, 0.3, 0.3)``) and the best grid point by test accuracy (an oracle no
  method may use, here only to show what coefficients alone could reach).

Usage: ``PYTHONPATH=src python benchmarks/adamerging_landscape.py [--family transforms labels]
[--head linear cosine] [--seeds 0 1 2] [--step 0.1] [--transforms-base mix] [--finetune-lr 1e-4]``
(a few seconds per pool on 2 CPU cores).
``tests/merge/test_multitask_figures.py`` imports :func:`landscape` and :func:`summary`.
"""

from __future__ import annotations

import argparse
import itertools
import statistics as stats
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multitask_merge as mm
from modelfuse.merge.adamerging import prediction_entropy


@torch.no_grad()
def landscape(fam: mm.Family, base: nn.Module, members: Sequence[nn.Module], step: float = 0.1) -> list[dict]:
    """One row per grid point: the coefficients, the entropy objective, mean test and validation accuracy."""
    b = {k: v.clone() for k, v in base.state_dict().items()}
    taus = [{k: m.state_dict()[k] - b[k] for k in b} for m in members]
    vals = [t.val.tensors for t in fam.tasks]
    tests = [t.test.tensors for t in fam.tasks]
    model = mm._with(base, b).eval()
    n = round(1 / step)
    grid = [round(step * i, 6) for i in range(n + 1)]
    rows = []
    for lam in itertools.product(grid, repeat=len(members)):
        model.load_state_dict({k: b[k] + sum(c * t[k] for c, t in zip(lam, taus)) for k in b})
        val_logits = [model(x) for x, _ in vals]
        rows.append(
            {
                "lambda": lam,
                "entropy": sum(float(prediction_entropy(z)) for z in val_logits),
                "test": stats.fmean(float((model(x).argmax(-1) == y).float().mean()) for x, y in tests),
                "val": stats.fmean(
                    float((z.argmax(-1) == y).float().mean()) for z, (_, y) in zip(val_logits, vals)
                ),
            }
        )
    return rows


def summary(rows: Sequence[dict]) -> dict[str, object]:
    """The figures the module docstring lists, accuracies in points."""
    ent = np.array([r["entropy"] for r in rows])
    test = np.array([r["test"] for r in rows])
    val = np.array([r["val"] for r in rows])
    i_ent, i_best = int(ent.argmin()), int(test.argmax())
    ta = next(r for r in rows if all(abs(c - mm.PAPER_LAMBDA) < 1e-9 for c in r["lambda"]))
    return {
        "rho": float(spearmanr(ent, test)[0]),
        "rho_val": float(spearmanr(ent, val)[0]),
        "min_entropy_lambda": rows[i_ent]["lambda"],
        "min_entropy_test": 100 * float(test[i_ent]),
        "ta_test": 100 * ta["test"],
        "ta_entropy": ta["entropy"],
        "min_entropy": float(ent[i_ent]),
        "best_lambda": rows[i_best]["lambda"],
        "best_test": 100 * float(test[i_best]),
        # of the grid points whose entropy is below task arithmetic's, the share that is less accurate
        "lower_entropy_worse": float(np.mean(test[ent < ta["entropy"]] < ta["test"]))
        if (ent < ta["entropy"]).any()
        else 0.0,
    }


def run(name: str, seed: int, head: str, step: float = 0.1, **pool_options: object) -> dict[str, object]:
    """The summary for one pool; ``pool_options`` go to ``multitask_merge.pool`` (e.g. ``transforms_base``)."""
    fam, base, members = mm.pool(name, seed, head=head, **pool_options)
    return {"family": name, "head": head, "seed": seed, **summary(landscape(fam, base, members, step))}


def _lam(lam: Sequence[float]) -> str:
    return "(" + ", ".join(f"{c:.1f}" for c in lam) + ")"


def table(results: Sequence[dict]) -> str:
    lines = [
        "| family | head | seed | rho (entropy, test acc) | rho (entropy, val acc) | least-entropy λ | its test % "
        "| TA λ 0.3 test % | lower entropy than TA 0.3 but less accurate | best λ (oracle) | its test % |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['family']} | {r['head']} | {r['seed']} | {r['rho']:.2f} | {r['rho_val']:.2f} "
            f"| {_lam(r['min_entropy_lambda'])} | {r['min_entropy_test']:.1f} | {r['ta_test']:.1f} "
            f"| {100 * r['lower_entropy_worse']:.0f}% | {_lam(r['best_lambda'])} | {r['best_test']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", default=["transforms", "labels"], choices=mm.FAMILIES)
    p.add_argument("--head", nargs="+", default=list(mm.HEADS), choices=mm.HEADS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--step", type=float, default=0.1)
    p.add_argument("--transforms-base", default="original", choices=["original", "mix"])
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    args = p.parse_args(argv)
    options = {"transforms_base": args.transforms_base, "finetune_lr": args.finetune_lr}
    results = []
    for name, head, seed in itertools.product(args.family, args.head, args.seeds):
        t0 = time.perf_counter()
        results.append(run(name, seed, head, args.step, **options))
        print(f"{name} {head} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
