"""``modelfuse merge``: merge checkpoints with a recipe (mergekit's YAML format) or a shorthand."""

from __future__ import annotations

import argparse
from typing import Any

from modelfuse._defaults import DEFAULT_SHARD_SIZE


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge the weights of several checkpoints (recipes in mergekit's format)",
        description="Merge checkpoints tensor by tensor into a Hugging Face folder (safetensors shards, "
        "config, tokenizer, model card). Give a recipe file (mergekit's YAML format), or the shorthand "
        "--method M [--base B] MODEL... [--param k=v]... The data-driven methods (fisher, regmean, adamerging, "
        "greedy_soup) take a recipe file with architecture: and data: sections and run on whole models.",
        epilog="examples:\n  modelfuse merge recipe.yaml -o merged\n"
        "  modelfuse merge --method ties --base base ft1 ft2 ft3 --param density=0.3 -o merged",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="RECIPE|MODEL", help="a recipe file, or models with --method")
    p.add_argument("--list-methods", action="store_true", help="list the merge methods and their parameters")
    p.add_argument("-o", "--out", help="output folder (required unless --plan)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print each tensor's method, parameters and inputs; compute nothing",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate everything (shapes, output path) and stop"
    )
    p.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, cuda:1, ...")
    p.add_argument(
        "--out-shard-size",
        default=DEFAULT_SHARD_SIZE,
        help=f"shard size: bytes or K/M/B/KB/MB/GB/GiB (default {DEFAULT_SHARD_SIZE})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of randomised methods (DARE, DELLA); default 0")
    p.add_argument(
        "--missing",
        choices=("error", "copy-base", "skip"),
        default="error",
        help="tensors not in every model: error (default), copy-base, skip",
    )
    p.add_argument(
        "--allow-architecture-mismatch",
        action="store_true",
        help="merge models whose config.json differ in architecture",
    )
    res = p.add_argument_group("resources of this process")
    res.add_argument(
        "--threads",
        default="auto",
        metavar="auto|N",
        help="torch threads for the computation: auto (default) uses one core fewer than this process "
        "may run on, leaving one to the threads that read and write; N uses N",
    )
    cache = res.add_mutually_exclusive_group()
    cache.add_argument(
        "--drop-cache",
        dest="drop_cache",
        action="store_true",
        default=True,
        help="drop the output from the page cache soon after writing it (default): a large output does "
        "not push the inputs out of memory",
    )
    cache.add_argument(
        "--keep-cache",
        dest="drop_cache",
        action="store_false",
        help="leave the output in the page cache: loading it right after the merge is faster",
    )
    short = p.add_argument_group("shorthand without a recipe file")
    short.add_argument("--method", help="merge method (see --list-methods)")
    short.add_argument("--base", help="base model (the one the others were fine-tuned from)")
    short.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter for every model (repeatable)",
    )
    short.add_argument("--dtype", help="cast inputs to this dtype (float32, bfloat16, float16)")
    short.add_argument("--out-dtype", help="dtype written (default: --dtype, else the inputs')")
    p.set_defaults(run=run)


def _shorthand(args: argparse.Namespace) -> dict[str, Any]:
    from modelfuse.cli._args import key_values

    params = key_values(args.param, "--param", "density=0.3")
    recipe: dict[str, Any] = {
        "merge_method": args.method,
        "models": [{"model": m} for m in args.inputs],
        "parameters": params,
    }
    if args.base:
        recipe["base_model"] = args.base
    if args.dtype:
        recipe["dtype"] = args.dtype
    if args.out_dtype:
        recipe["out_dtype"] = args.out_dtype
    return recipe


def _print_plan(plan: Any, out: str | None) -> None:
    """One line per output tensor: name, shape, dtype, method, resolved parameters, inputs."""
    from modelfuse.cli._format import human_bytes

    for note in plan.notes:
        print(f"note: {note}")
    print(f"merge plan: {plan.recipe.merge_method}, {len(plan.tasks)} tensors")
    for task in plan.tasks:
        head = f"{task.out}  {tuple(task.shape)}  {str(task.out_dtype).removeprefix('torch.')}"
        if task.copy_from:
            print(f"{head}  copy from {task.copy_from[0]}")
            continue
        parts = [", ".join(f"{k}={_fmt(v)}" for k, v in task.shared.items())]
        parts += [
            f"{m}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in p.items())
            for (m, _), p in zip(task.xs, task.per_model)
            if p
        ]
        names = [f"{m}:{n}" if n != task.out else m for m, n in task.xs]
        if task.base:
            names.insert(0, "base=" + (task.base[0] if task.base[1] == task.out else ":".join(task.base)))
        params = "; ".join(p for p in parts if p)
        print(f"{head}  {task.method.name}({params})  <- {', '.join(names)}")
    where = f" to {out}" if out else ""
    print(
        f"{len(plan.tasks)} tensors, {human_bytes(plan.nbytes)} to write{where}; "
        f"config from {plan.config_from}, tokenizer from {plan.tokenizer_from}"
    )


def method_block(name: str) -> str:
    """One method's entry of ``--list-methods``: base use, parameters with defaults, paper, mergekit parity."""
    from modelfuse.merge import get_method

    m = get_method(name)

    def fields(schema: Any) -> str:
        shown = [
            f"{f.alias or n}" + ("" if f.is_required() else f"={f.default!r}") for n, f in schema.model_fields.items()
        ]
        return ", ".join(shown) or "(none)"

    count = f"{m.min_models}" + ("+" if m.max_models is None else f"-{m.max_models}" if m.max_models != m.min_models else "")
    lines = [
        f"{name}",
        f"  base: {m.base}; models besides the base: {count}{'; randomised (--seed)' if m.randomized else ''}",
        f"  per-model parameters: {fields(m.per_model)}",
        f"  shared parameters: {fields(m.shared)}",
        f"  paper: {m.paper or '(none)'}",
        f"  mergekit: {m.mergekit or '(not recorded)'}",
    ]
    return "\n".join(lines)


def _print_methods() -> None:
    from modelfuse.merge import list_methods

    print(
        "merge methods (mergekit: how mergekit 0.1.5's method of the same name differs; parameters a method "
        "does not use but another one does are ignored with a warning, as mergekit ignores them)\n"
    )
    print("\n\n".join(method_block(name) for name in list_methods()))
    from modelfuse.merge.data_recipes import DATA_METHODS, describe_data_method

    print(
        "\n\ndata-driven methods (they run the models on data, so only from a recipe file with "
        "architecture: and data: sections; see the README, 'Data-driven merges')\n"
    )
    print("\n\n".join(describe_data_method(name) for name in DATA_METHODS))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _run_data_recipe(args: argparse.Namespace, path: Any) -> int:
    """A recipe of a data-driven method (fisher, regmean, adamerging, greedy_soup): run in Python
    over whole models by modelfuse.merge.data_recipes."""
    import json
    import time

    from modelfuse.errors import ConfigError
    from modelfuse.merge.data_recipes import merge_with_data

    if args.plan:
        from modelfuse.merge.data_recipes import plan_data_recipe

        print(plan_data_recipe(path, args.out))
        return 0
    if not args.out:
        raise ConfigError("give the output with -o/--out (a folder, or a file ending in .safetensors)")
    start = time.perf_counter()
    result = merge_with_data(path, args.out, force=args.force, device=args.device, dry_run=args.dry_run)
    if args.dry_run:
        print(
            f"dry run ok: {result.report['method']} on {result.report['examples']} examples; would write {args.out}"
        )
        return 0
    seconds = time.perf_counter() - start
    extra = {k: v for k, v in result.report.items() if k not in ("method", "models")}
    print(
        f"merged {len(result.report['models'])} models by {result.report['method']} into {result.out} in {seconds:.1f} s"
    )
    print(json.dumps(extra, sort_keys=True))
    return 0


def run(args: argparse.Namespace) -> int:
    import time

    import yaml

    from modelfuse.errors import ConfigError
    from modelfuse.io import CheckpointWriter
    from modelfuse.merge.executor import resolve_torch_threads, write_merge
    from modelfuse.merge.plan import build_plan
    from modelfuse.merge.recipe import load_recipe, parse_recipe

    if args.list_methods:
        _print_methods()
        return 0
    if not args.inputs:
        raise ConfigError("give a recipe file, or --method with the models to merge (see --help)")
    if args.method:
        from modelfuse.merge.data_recipes import DATA_METHODS

        if args.method in DATA_METHODS:
            raise ConfigError(
                f"--method {args.method} runs the models on data: write a recipe file with its "
                "architecture: and data: sections (see the README, 'Data-driven merges')"
            )
        data = _shorthand(args)
        recipe, text, folder = parse_recipe(data, "command line"), yaml.safe_dump(data, sort_keys=False), None
    else:
        if len(args.inputs) != 1:
            raise ConfigError(
                f"give one recipe file, or --method with the models to merge; found {len(args.inputs)} "
                f"inputs without --method: {' '.join(args.inputs)}"
            )
        extra = [o for o in ("base", "dtype", "out_dtype") if getattr(args, o)] + (
            ["param"] if args.param else []
        )
        if extra:
            raise ConfigError(
                f"--{extra[0].replace('_', '-')} belongs to the shorthand with --method; put it in the recipe"
            )
        from pathlib import Path

        from modelfuse.merge.data_recipes import is_data_recipe

        path = Path(args.inputs[0])
        if is_data_recipe(path):
            return _run_data_recipe(args, path)
        recipe = load_recipe(path)
        text, folder = path.read_text(encoding="utf-8"), path.resolve().parent
    torch_threads = resolve_torch_threads(args.threads)
    if not args.plan and not args.out:
        raise ConfigError("give the output folder with -o/--out (or use --plan to only print the plan)")
    plan = build_plan(
        recipe,
        recipe_dir=folder,
        missing=args.missing,
        allow_architecture_mismatch=args.allow_architecture_mismatch,
    )
    try:
        if args.plan:
            _print_plan(plan, args.out)
            return 0
        CheckpointWriter(
            args.out, max_shard_size=args.out_shard_size, force=args.force, protect=plan.input_paths()
        ).check()
        if args.dry_run:
            for note in plan.notes:
                print(f"note: {note}")
            print(
                f"dry run ok: {len(plan.tasks)} tensors ({plan.nbytes / 1e9:.3f} GB) would be written to {args.out}"
            )
            return 0
        start = time.perf_counter()
        out = write_merge(
            plan,
            args.out,
            recipe_text=text,
            force=args.force,
            seed=args.seed,
            device=args.device,
            out_shard_size=args.out_shard_size,
            torch_threads=torch_threads,
            freeze_gc=True,  # this process ends after the merge: the objects of its imports stay
            drop_cache=args.drop_cache,
        )
        seconds = time.perf_counter() - start
        print(f"merged {len(plan.tasks)} tensors ({plan.nbytes / 1e9:.3f} GB) into {out} in {seconds:.1f} s")
    finally:
        plan.close()
    return 0
