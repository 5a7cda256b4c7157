"""The ``modelfuse`` command.

Each subcommand is a module of this package with ``add_parser(subparsers)`` and
``run(args) -> int``. This module imports only the standard library so that
``modelfuse --help`` starts fast; subcommands import torch and friends when they run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Sequence

from modelfuse import __version__

#: subcommand name -> module under modelfuse.cli
COMMANDS = {
    "inspect": "modelfuse.cli.inspect",
    "merge": "modelfuse.cli.merge",
    "ensemble": "modelfuse.cli.ensemble",
    "fuse-features": "modelfuse.cli.fuse_features",
    "demo": "modelfuse.cli.demo",
    "barrier": "modelfuse.cli.barrier",
    "align": "modelfuse.cli.align",
    "bench": "modelfuse.cli.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelfuse",
        description="Fuse trained PyTorch models: ensembles, features, structure, parameters, "
        "activations and losses.",
    )
    parser.add_argument("--version", action="version", version=f"modelfuse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"modelfuse: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from modelfuse import progress
    from modelfuse.errors import FusionError

    progress.set_quiet(args.quiet or progress.is_quiet())
    warnings.formatwarning = _one_line_warning
    try:
        return int(args.run(args) or 0)
    except FusionError as exc:
        if args.debug:
            raise
        print(f"modelfuse {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("modelfuse: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"modelfuse {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(this is a bug; rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


def run() -> None:
    """The console entry point (``modelfuse``, ``python -m modelfuse``): :func:`main`, then
    leave without the interpreter's teardown.

    Once a command has finished (its outputs closed, synced and moved into place), the
    process ends as a normal exit would at the Python level, but without the C-level
    teardown: torch's static destructors unregister every operator, which took about 0.5 s
    on every run here (benchmarks/RESULTS.md). ``main`` itself, which the tests and the
    Python API call, returns normally.

    What a normal exit runs first still runs, in its order, so that no write is cut off:
    the threading module's shutdown (the exit hooks of thread pools, then a join of every
    non-daemon thread still running), then the ``atexit`` handlers, then the streams are
    flushed; only then ``os._exit``.
    """
    code = main()
    import atexit
    import contextlib
    import os

    try:
        _join_threads()
        atexit._run_exitfuncs()  # what a normal exit runs at the Python level (logging, ...)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def _join_threads() -> None:
    """What the interpreter does at exit before the ``atexit`` handlers: ``threading._shutdown``
    (runs ``threading._register_atexit`` hooks, e.g. thread pools telling their workers to
    stop, then joins every non-daemon thread); where that private function is missing, the
    non-daemon threads are joined here."""
    import threading

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
        return
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
