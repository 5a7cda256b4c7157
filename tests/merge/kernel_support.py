"""Whether the tests that compare the C kernels with the torch path can run here.

The kernels (``src/modelfuse/merge/methods/_ckernels.c``) are an optional extension: ``pip
install`` builds them when a C compiler is present and silently leaves them out otherwise, and
``MODELFUSE_KERNELS=0`` switches them off. A kernel test then has nothing to compare (with the
kernels missing, ``set_enabled(True)`` leaves the torch path on, and both sides would be the
torch path): it skips, with the reason, where that is expected, and fails where a compiler is
present but the kernels are missing (a broken build, not a machine without a compiler).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sysconfig

import pytest

NO_COMPILER = "C kernels not built: no C compiler at install time"
SWITCHED_OFF = "C kernels switched off with MODELFUSE_KERNELS=0"


def kernels_built() -> bool:
    """True when the compiled extension can be imported (whatever MODELFUSE_KERNELS says)."""
    from modelfuse.merge.methods import _kernels

    return _kernels._SPEC is not None


def c_compiler() -> str | None:
    """The path of the C compiler setuptools would use ($CC, else Python's configured CC, else
    cc / gcc / clang) when it is on PATH, else None."""
    names = [os.environ.get("CC", ""), sysconfig.get_config_var("CC") or "", "cc", "gcc", "clang"]
    for name in names:
        words = shlex.split(name)
        if words and (path := shutil.which(words[0])):
            return path
    return None


def require_kernels() -> None:
    """Skip the calling test where the kernels are switched off or could not be built (no C
    compiler); fail it where a compiler is present and the kernels are still missing."""
    if os.environ.get("MODELFUSE_KERNELS", "1") == "0":
        pytest.skip(SWITCHED_OFF)
    if kernels_built():
        return
    compiler = c_compiler()
    if compiler is None:
        pytest.skip(NO_COMPILER)
    pytest.fail(
        f"the C kernels (modelfuse/merge/methods/_ckernels.c) are not built although a C compiler is "
        f"present ({compiler}): rebuild them with `pip install -e .` (or `python setup.py build_ext "
        "--inplace`) and read its output for the compiler's error"
    )
