"""``modelfuse bench SUITE ...``: run benchmark suites and print a summary table per suite.

Each suite (a built-in name or a YAML path) runs for seeds 0..N-1 into its results folder
(``--out DIR``; default ``bench-results/<suite>``; with several suites ``DIR/<suite>``), then a
table shows per method its level, accuracy mean ± std over the seeds, parameters, fusion time
and, for failed runs, the error. Where :mod:`modelfuse.bench.report` is installed, the HTML
report is written too and its path printed. ``--list`` shows the built-in suites and the
registered bench methods.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

DEFAULT_OUT = "bench-results"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run benchmark suites (built-in or YAML) over seeds; summary table and report",
        description="Run benchmark suites: a pool of models per seed and every method of the suite on it. "
        "Results (JSON, CSV and the suite as it ran) go to the output folder after every method; "
        "--resume continues an interrupted run of the same suite without rerunning finished methods.",
    )
    p.add_argument("suites", nargs="*", metavar="SUITE", help="built-in suite name or path of a suite YAML")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default: the suite's)")
    p.add_argument(
        "--out",
        default=None,
        help=f"results folder (default {DEFAULT_OUT}/SUITE; with several suites DIR/SUITE each)",
    )
    p.add_argument("--resume", action="store_true", help="continue a run of the same suite in its folder")
    p.add_argument("--force", action="store_true", help="start over in a folder holding earlier results")
    p.add_argument("--small", action="store_true", help="the suites' small (demo) versions")
    p.add_argument("--list", action="store_true", help="list the built-in suites and bench methods")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(run=run)


def _listing() -> dict[str, Any]:
    from modelfuse.bench import get_bench_method, list_bench_methods
    from modelfuse.bench.schema import list_suites, load_builtin, load_suite

    load_builtin()
    suites = []
    for name in list_suites():
        suite = load_suite(name)
        suites.append(
            {"suite": name, "description": suite.description, "seeds": suite.seeds,
             "methods": [m.display for m in suite.methods]}
        )  # fmt: skip
    methods = [
        {"method": n, "level": (m := get_bench_method(n)).level, "summary": m.summary}
        for n in list_bench_methods()
    ]
    return {"suites": suites, "methods": methods}


def _print_listing(listing: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    suites = Table(title="built-in suites")
    for col in ("suite", "seeds", "methods", "description"):
        suites.add_column(col, justify="right" if col in ("seeds", "methods") else "left")
    for s in listing["suites"]:
        suites.add_row(s["suite"], str(s["seeds"]), str(len(s["methods"])), s["description"])
    methods = Table(title="bench methods")
    for col in ("method", "level", "summary"):
        methods.add_column(col)
    for m in listing["methods"]:
        methods.add_row(m["method"], m["level"], m["summary"])
    console.print(suites)
    console.print(methods)


def summary_table(rows: list[dict[str, Any]], title: str) -> Any:
    """A rich Table of :func:`modelfuse.bench.results.summarize` rows (failed seeds counted, see :func:`failures`)."""
    from rich.table import Table

    from modelfuse.cli._format import human_count

    table = Table(title=title)
    for col, justify in (("method", "left"), ("level", "left"), ("accuracy (%)", "right"),
                         ("seeds ok", "right"), ("parameters", "right"), ("fusion (s)", "right")):  # fmt: skip
        table.add_column(col, justify=justify)
    for r in rows:
        acc = "-" if r["mean"] is None else f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"
        table.add_row(
            r["name"],
            r["level"] or "",
            acc,
            f"{len(r['seeds_ok'])}/{len(r['seeds_ok']) + len(r['seeds_failed'])}",
            "-" if r["parameters"] is None else human_count(r["parameters"]),
            "-" if r["fusion_s"] is None else f"{r['fusion_s']:.2f}",
            style="red" if r["seeds_failed"] else None,
        )
    return table


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """One line per failed method: its name, the seeds that failed and the error (seeds with the same error joined)."""
    lines = []
    for r in rows:
        by_error: dict[str, list[str]] = {}
        for text in r["errors"]:
            seed, _, error = text.partition(": ")
            by_error.setdefault(error, []).append(seed.removeprefix("seed "))
        for error, seeds in by_error.items():
            lines.append(f"failed: {r['name']} (seed {', '.join(seeds)}): {error}")
    return lines


def write_report(records: list[dict[str, Any]], folder: Path) -> Path | None:
    """``modelfuse.bench.report.write_report(records, folder)`` where that module exists; None where not."""
    try:
        module = importlib.import_module("modelfuse.bench.report")
    except ModuleNotFoundError as exc:
        if exc.name == "modelfuse.bench.report":
            return None
        raise
    writer = getattr(module, "write_report", None)
    return None if writer is None else Path(writer(records, folder))


def run(args: argparse.Namespace) -> int:
    from modelfuse.bench.results import summarize
    from modelfuse.bench.runner import run_suite
    from modelfuse.bench.schema import load_suite
    from modelfuse.errors import ConfigError

    if args.list:
        listing = _listing()
        if args.json:
            print(json.dumps(listing, indent=1))
        else:
            _print_listing(listing)
        return 0
    if not args.suites:
        raise ConfigError(
            "name a suite to run (modelfuse bench --list shows the built-in ones) or a suite YAML"
        )
    suites = [load_suite(s) for s in args.suites]  # every suite checked before any runs
    names = [s.suite for s in suites]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"suites named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}"
        )
    root = Path(args.out if args.out is not None else DEFAULT_OUT)
    from rich.console import Console

    console = Console()
    all_records: list[dict[str, Any]] = []
    runs = []
    for suite in suites:
        folder = root if len(suites) == 1 and args.out is not None else root / suite.suite
        records = run_suite(
            suite, seeds=args.seeds, out=folder, resume=args.resume, force=args.force, small=args.small
        )
        all_records += records
        runs.append({"suite": suite.suite, "out": str(folder), "summary": summarize(records)})
        if not args.json:  # each suite's table as soon as it has run
            n_seeds = len({rec["seed"] for rec in records})
            rows = runs[-1]["summary"]
            console.print(summary_table(rows, f"{suite.suite}: mean ± std over {n_seeds} seed(s)"))
            for line in failures(rows):
                console.print(line, style="red", highlight=False, markup=False, soft_wrap=True)
            console.print(f"results: {folder}", highlight=False, markup=False, soft_wrap=True)
    report = write_report(all_records, Path(runs[0]["out"]) if len(runs) == 1 else root)
    if args.json:
        print(json.dumps({"runs": runs, "results": all_records, "report": report and str(report)}, indent=1))
    elif report is not None:
        console.print(f"report: {report}", highlight=False, markup=False, soft_wrap=True)
    return 0
