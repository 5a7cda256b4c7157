"""``modelfuse demo``: a tour of all six fusion levels on bundled data, in well under 3 minutes.

Runs the small versions of the built-in benchmark suites, one seed each, through
:func:`modelfuse.bench.run_suite`: ``seeds`` (output, parameter and structure fusion of small
CNNs trained from different seeds), ``features`` (feature fusion of a VGG-style and a
ResNet-style network, and stitching), ``tasks`` (parameter fusion of fine-tunes: task
arithmetic, TIES) and ``mtl`` (loss fusion and ActivationMix in multi-task training). Then
prints one table of every method (level, test accuracy, parameters, fusion time) and writes
``report.html`` over all records.

The pools come from the cache (``MODELFUSE_CACHE`` or ``~/.cache/modelfuse``): the first run
trains them, later runs load them. The methods themselves run afresh every time (each suite's
results folder is started over, ``force``), so the table always shows this run's figures.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the built-in suites the demo runs, small versions, in this order
DEMO_SUITES = ("seeds", "features", "tasks", "mtl")
#: the default output folder (relative to the working directory)
DEMO_OUT = "modelfuse-demo"
#: the file that marks a folder as the demo's own (the demo starts over only in such a folder)
DEMO_MARKER = ".modelfuse-demo"
#: the seeds per suite (seed 0 only)
DEMO_SEEDS = 1


@dataclass
class DemoResult:
    """What :func:`run_demo` produced: every record of every suite (in run order, see
    :mod:`modelfuse.bench.results`), the summary rows the table shows (one per suite and
    method, :func:`modelfuse.bench.results.summarize`), the output folder and ``report.html``."""

    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    out: Path
    report: Path


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="a tour of all six fusion levels: the small benchmark suites, one table, report.html",
        description="Run the small versions of the built-in suites "
        f"({', '.join(DEMO_SUITES)}; one seed each, torch on one thread) with progress bars, "
        "print one table of every method (level, test accuracy, parameters, fusion time) and "
        "write report.html. The pools are trained once and cached (MODELFUSE_CACHE or "
        "~/.cache/modelfuse); the methods run afresh every time, in the demo's own folder.",
    )
    p.add_argument(
        "--out",
        default=DEMO_OUT,
        help="output folder: one results folder per suite and report.html; it must be new, empty "
        "or an earlier demo's, whose results are replaced (default: ./%(default)s)",
    )
    p.set_defaults(run=run)


def _claim(out: Path) -> None:
    """Refuse an ``out`` that is a file or a non-empty folder not made by the demo; create it and mark it."""
    from modelfuse.errors import OutputExistsError

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file, not a folder; name a new folder as --out")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
        raise OutputExistsError(
            f"--out {out} is a non-empty folder that an earlier demo did not make (no {DEMO_MARKER} "
            "file in it); the demo replaces what it finds in its folder, so name a new or empty "
            "folder as --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by `modelfuse demo`; its results are replaced on every run\n")


def run_demo(out: str | Path = DEMO_OUT, *, progress: bool | None = None) -> DemoResult:
    """Run the demo's suites (:data:`DEMO_SUITES`, small, :data:`DEMO_SEEDS` seed) into ``out``
    with torch on one thread (the thread count is restored afterwards); see :class:`DemoResult`."""
    import torch

    from modelfuse.bench.report import write_report
    from modelfuse.bench.results import summarize
    from modelfuse.bench.runner import run_suite

    out = Path(out)
    _claim(out)
    threads = torch.get_num_threads()
    # the small suites' models are tiny: on a quiet 2-core machine 1 thread runs them as fast as 2
    # (benchmarks/RESULTS.md, demo_time), and on a busy one threads only wait for each other
    torch.set_num_threads(1)
    try:
        records: list[dict[str, Any]] = []
        for suite in DEMO_SUITES:
            records += run_suite(
                suite, seeds=DEMO_SEEDS, out=out / suite, force=True, small=True, progress=progress
            )
    finally:
        torch.set_num_threads(threads)
    report = write_report(records, out)
    return DemoResult(records=records, rows=summarize(records), out=out, report=Path(report))


def demo_table(rows: list[dict[str, Any]]) -> Any:
    """The demo's rich Table: one row per suite and method (a section per suite)."""
    from rich.table import Table

    from modelfuse.cli._format import human_count

    table = Table(title="modelfuse demo: small suites, seed 0, test split")
    for col, justify in (("suite", "left"), ("method", "left"), ("level", "left"),
                         ("accuracy (%)", "right"), ("parameters", "right"), ("time (s)", "right")):  # fmt: skip
        table.add_column(col, justify=justify)
    suite = None
    for r in rows:
        if suite is not None and r["suite"] != suite:
            table.add_section()
        failed = bool(r["seeds_failed"])
        table.add_row(
            r["suite"] if r["suite"] != suite else "",
            r["name"],
            r["level"] or "",
            "failed" if failed or r["mean"] is None else f"{100 * r['mean']:.2f}",
            "-" if r["parameters"] is None else human_count(r["parameters"]),
            "-" if r["fusion_s"] is None else f"{r['fusion_s']:.2f}",
            style="red" if failed else None,
        )
        suite = r["suite"]
    return table


def run(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console

    from modelfuse.cli.bench import failures

    start = time.perf_counter()
    result = run_demo(args.out)
    console = Console()
    if not console.is_terminal:  # piped or captured: wide enough for the table on one line a row
        console = Console(width=120)
    console.print(demo_table(result.rows))
    for line in failures(result.rows):
        console.print(line, style="red", highlight=False, markup=False, soft_wrap=True)
    print(f"done in {time.perf_counter() - start:.1f} s; results in {result.out}")
    print(f"report: {result.report.resolve()}")
    return 0
