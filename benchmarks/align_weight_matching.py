"""Weight matching: time to recover a planted permutation, and time per pass on torchvision models.

Cases (each run in this one process, one after the other):

- ``mlp``: the zoo MLP 64-512-512-10 (random weights) against a copy whose hidden units were
  randomly permuted; weight matching must recover the permutation exactly (issue 16: in at most
  30 passes and 5 s). Prints passes, wall time and whether the recovery is exact.
- ``resnet18`` / ``vgg16``: two torchvision networks with independent random weights (no
  download), ``--passes`` passes of coordinate descent; prints the wall time per pass.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/align_weight_matching.py [--passes 2] [--cases mlp,resnet18,vgg16]``
"""

from __future__ import annotations

import argparse
import time

import torch

from _machine import machine
from modelfuse import zoo
from modelfuse.align import apply_permutation, permutation_spec, weight_matching


def planted_mlp(seed: int) -> None:
    torch.manual_seed(seed)
    a = zoo.create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(512, 512))
    spec = permutation_spec(a)
    gen = torch.Generator().manual_seed(seed + 100)
    planted = {name: torch.randperm(g.size, generator=gen) for name, g in spec.groups.items()}
    b = apply_permutation(a, spec, planted)
    start = time.perf_counter()
    m = weight_matching(spec, a.state_dict(), b.state_dict(), seed=seed)
    seconds = time.perf_counter() - start
    exact = all(torch.equal(m.perms[n], torch.argsort(p)) for n, p in planted.items())
    print(f"mlp 64-512-512-10 seed {seed}: {m.passes} passes, {seconds:.3f} s, exact recovery: {exact}")


def torchvision_pass(arch: str, passes: int) -> None:
    import torchvision

    torch.manual_seed(0)
    a, b = (getattr(torchvision.models, arch)(weights=None) for _ in range(2))
    spec = permutation_spec(a)
    start = time.perf_counter()
    m = weight_matching(spec, a.state_dict(), b.state_dict(), max_passes=passes)
    seconds = time.perf_counter() - start
    print(f"{arch}: {len(spec.groups)} groups, {m.passes} passes, {seconds / m.passes:.2f} s per pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--cases", default="mlp,resnet18,vgg16")
    args = parser.parse_args()
    print(machine())
    cases = args.cases.split(",")
    if "mlp" in cases:
        for seed in range(3):
            planted_mlp(seed)
    for arch in ("resnet18", "vgg16"):
        if arch in cases:
            torchvision_pass(arch, args.passes)


if __name__ == "__main__":
    main()
