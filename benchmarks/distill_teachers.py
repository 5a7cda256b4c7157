"""Multi-teacher distillation on digits (issue 17): one small student from two heterogeneous teachers.

Teachers: a zoo MLP (64-64-10) and a zoo CNN (widths 16, 32), each trained ``--teacher-epochs``
epochs (Adam 1e-3) with the run's seed. Student: a zoo MLP with 16 hidden
units, trained ``--epochs`` epochs with :class:`modelfuse.losses.MultiTeacherDistillation`
(T = 2, alpha = 0.5) through :func:`modelfuse.zoo.train`, from the same initial weights and with
the same batches for every row (Adam 1e-3; the learned teacher weights get their own rate,
``--weights-lr``, since Adam moves a parameter by about its rate per step). Rows: ``scratch`` (plain cross-entropy, same budget), each teacher
weighting (equal, confidence, entropy, true_label, ca_mkd, learned) and equal weights plus a FitNets
hint (student ``features.relu1`` -> MLP teacher ``features.relu1``, beta 0.1). Test accuracy and
NLL are :func:`modelfuse.zoo.evaluate` on the test split; mean +/- std over the seeds.

Usage: ``PYTHONPATH=src python benchmarks/distill_teachers.py [--seeds 0 1 2] [--epochs 20]
[--teacher-epochs 30] [--weights-lr 0.05]``
(a minute or two on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import statistics as stats
import sys
import time
from pathlib import Path

import torch

from modelfuse.data import load
from modelfuse.losses import MultiTeacherDistillation
from modelfuse.zoo import create_model, evaluate, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine

ROWS = ["scratch", "equal", "confidence", "entropy", "true_label", "ca_mkd", "learned", "equal + hint"]


def run_seed(seed: int, epochs: int, teacher_epochs: int, weights_lr: float) -> dict[str, dict[str, float]]:
    data = load("digits")
    shape, c = data.input_shape, data.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = create_model("mlp", input_shape=shape, num_classes=c, hidden=(64,))
        cnn = create_model("cnn", input_shape=shape, num_classes=c, widths=(16, 32))
        init = create_model("mlp", input_shape=shape, num_classes=c, hidden=(16,)).state_dict()
    out = {}
    for name, t in (("teacher mlp", mlp), ("teacher cnn", cnn)):
        train(t, data, epochs=teacher_epochs, seed=seed, progress=False, eval_every_epoch=False)
        out[name] = evaluate(t, data.test)
    x0 = data.train.tensors[0][:8]
    for row in ROWS:
        student = create_model("mlp", input_shape=shape, num_classes=c, hidden=(16,))
        student.load_state_dict(init)
        common = dict(epochs=epochs, seed=seed, progress=False, eval_every_epoch=False)
        if row == "scratch":
            train(student, data, **common)
        else:
            weights = {"equal": None, "equal + hint": None}.get(row, row)
            hint = dict(
                features=[("features.relu1", 0, "features.relu1")],
                student=student,
                example_input=x0,
                beta=0.1,
            )
            with MultiTeacherDistillation(
                [mlp, cnn],
                temperature=2.0,
                alpha=0.5,
                weights=weights,
                **(hint if row.endswith("hint") else {}),
            ) as kd:
                train(
                    student,
                    data,
                    loss=kd.training_loss(),
                    param_groups=[
                        {"params": list(student.parameters())},
                        {"params": list(kd.parameters()), "lr": weights_lr if row == "learned" else 1e-3},
                    ],
                    **common,
                )
                if row == "learned":
                    out["learned weights (mlp, cnn)"] = {"w": kd.weights_.tolist()}
        out[row] = evaluate(student, data.test)
    return out


def sd(values: list[float]) -> float:
    return stats.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--weights-lr", type=float, default=0.05)
    args = p.parse_args()
    print(machine())
    start = time.perf_counter()
    runs = [run_seed(s, args.epochs, args.teacher_epochs, args.weights_lr) for s in args.seeds]
    took = time.perf_counter() - start
    print(
        f"digits, teachers {args.teacher_epochs} epochs, student mlp(16) {args.epochs} epochs, "
        f"weights lr {args.weights_lr}, seeds {args.seeds}, {took:.0f} s"
    )
    print("| row | test accuracy (%) | test NLL |")
    print("|---|---|---|")
    for row in ["teacher mlp", "teacher cnn", *ROWS]:
        acc = [100 * r[row]["accuracy"] for r in runs]
        nll = [r[row]["nll"] for r in runs]
        print(f"| {row} | {stats.mean(acc):.1f} ± {sd(acc):.1f} | {stats.mean(nll):.3f} ± {sd(nll):.3f} |")
    for s, r in zip(args.seeds, runs):
        print(
            f"seed {s}: learned weights (mlp, cnn) {[round(w, 3) for w in r['learned weights (mlp, cnn)']['w']]}"
        )


if __name__ == "__main__":
    main()
