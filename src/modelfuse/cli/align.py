"""``modelfuse align A B -o OUT``: B with its hidden units permuted to line up with A's.

Both checkpoints are loaded into one architecture (``--arch``, as ``modelfuse barrier``
loads them), B is aligned to A by weight matching or activation matching (on a split of a
zoo dataset or of a user's image folder), and the permuted B, which computes the same
function as B, is written atomically as one safetensors file. ``--barrier`` also reports
the loss barrier between A and B before and after the alignment.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from modelfuse.cli._models import add_pair_arguments


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "align",
        help="permute B's hidden units to line up with A's (weight or activation matching)",
        description="Align checkpoint B to checkpoint A (same architecture) by permuting B's hidden "
        "units, so that interpolating them stays on a low-loss path; write the permuted B, which "
        "computes exactly B's function, as a safetensors file.",
    )
    add_pair_arguments(p, split_default="train")
    p.add_argument("-o", "--output", required=True, help="safetensors file to write (the permuted B)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument(
        "--method",
        choices=("weight_matching", "activation_matching"),
        default="weight_matching",
        help="weight_matching (no data) or activation_matching (on --data/--split); default %(default)s",
    )
    p.add_argument("--max-passes", type=int, default=100, help="weight matching: most passes (default 100)")
    p.add_argument("--seed", type=int, default=0, help="weight matching: order of the layers (default 0)")
    p.add_argument(
        "--max-batches", type=int, default=None, help="activation matching: most batches to use (default all)"
    )
    p.add_argument(
        "--barrier",
        type=int,
        nargs="?",
        const=25,
        default=None,
        metavar="POINTS",
        help="also report the loss barrier A-B before and after aligning, on --split (default 25 points)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from modelfuse.align import apply_permutation, get_aligner, loss_barrier, permutation_spec
    from modelfuse.cli._models import load_pair
    from modelfuse.errors import ConfigError, OutputExistsError
    from modelfuse.io import save_state_dict

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ConfigError(
            f"-o {args.output}: the aligned model is written as one safetensors file; give a path ending in .safetensors"
        )
    if out.exists() and not args.force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it or name another -o")
    if args.barrier is not None and args.barrier < 2:
        raise ConfigError(f"--barrier POINTS must be at least 2, got {args.barrier}")
    splits, model_a, model_b = load_pair(args)
    spec = permutation_spec(model_b)
    if args.method == "weight_matching":
        options: dict[str, Any] = {"max_passes": args.max_passes, "seed": args.seed}
    else:
        loader = torch.utils.data.DataLoader(getattr(splits, args.split), batch_size=args.batch_size)
        options = {"data": loader, "max_batches": args.max_batches, "device": args.device}
    matching = get_aligner(args.method)(spec, model_a, model_b, **options)
    aligned = apply_permutation(model_b, spec, matching.perms)
    report: dict[str, Any] = {
        "method": args.method,
        "passes": matching.passes,
        "converged": matching.converged,
        "moved": sorted(k for k, p in matching.perms.items() if not torch.equal(p, torch.arange(len(p)))),
        "groups": len(matching.perms),
    }
    if args.barrier is not None:
        for key, model in (("barrier_before", model_b), ("barrier_after", aligned)):
            result = loss_barrier(
                model_a,
                model,
                splits,
                split=args.split,
                points=args.barrier,
                batch_size=args.batch_size,
                device=args.device,
            )
            report[key] = result.barrier
    metadata = {
        "modelfuse.align": json.dumps(
            {"method": args.method, "reference": str(args.checkpoint_a), "aligned": str(args.checkpoint_b)}
        )
    }
    save_state_dict(aligned, out, metadata=metadata, force=args.force)
    report["output"] = str(out)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    state = "converged" if matching.converged else "did not converge"
    print(
        f"{args.method}: {len(report['moved'])} of {report['groups']} unit groups permuted, "
        f"{matching.passes} pass(es), {state}"
    )
    if args.barrier is not None:
        print(
            f"loss barrier on {args.split}: {report['barrier_before']:.4f} before, {report['barrier_after']:.4f} after"
        )
    print(f"aligned model written to {out}")
    return 0
