"""Whether the compiled merge kernels can be tested here, decided in one place.

The C kernels (``modelfuse/merge/methods/_ckernels.c``) are an optional extension that
``pip install -e .`` builds when a C compiler is present. A test that compares them with
the torch path calls :func:`require_kernels` first:

- ``MODELFUSE_KERNELS=0`` switches them off on purpose: skip.
- not built and no C compiler on this machine: skip, with the reason below.
- not built although a compiler exists: fail (the build broke, or the install skipped it),
  with how to build them.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import sysconfig

import pytest

NO_COMPILER = "C kernels not built: no C compiler at install time"
EXTENSION = "modelfuse.merge.methods._ckernels"


def c_compiler() -> str | None:
    """The C compiler a build would use (``$CC``, Python's configured ``CC``, cc, gcc or clang), or None."""
    candidates = [os.environ.get("CC", ""), sysconfig.get_config_var("CC") or "", "cc", "gcc", "clang"]
    for command in candidates:
        words = shlex.split(command)
        if words and (found := shutil.which(words[0])):
            return found
    return None


def kernels_built() -> bool:
    """True when the compiled extension is importable (built), whatever MODELFUSE_KERNELS says."""
    return importlib.util.find_spec(EXTENSION) is not None


def require_kernels() -> None:
    """Skip or fail the calling test unless the C kernels can run (see the module docstring)."""
    if os.environ.get("MODELFUSE_KERNELS", "1") == "0":
        pytest.skip("C kernels switched off with MODELFUSE_KERNELS=0")
    if kernels_built():
        return
    compiler = c_compiler()
    if compiler is None:
        pytest.skip(NO_COMPILER)
    pytest.fail(
        f"the C kernels ({EXTENSION}, from src/modelfuse/merge/methods/_ckernels.c) are not built, "
        f"although a C compiler exists ({compiler}): build them with `python setup.py build_ext "
        "--inplace` (or reinstall with `pip install -e .`) and read its output for the error"
    )
