"""``require_kernels()``: skip, fail or go on, for each way the kernels can be missing."""

from __future__ import annotations

import pytest

from . import kernel_support
from .kernel_support import NO_COMPILER, require_kernels


def _outcome(monkeypatch, *, env: str | None, built: bool, compiler: str | None) -> tuple[str, str]:
    if env is None:
        monkeypatch.delenv("MODELFUSE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MODELFUSE_KERNELS", env)
    monkeypatch.setattr(kernel_support, "kernels_built", lambda: built)
    monkeypatch.setattr(kernel_support, "c_compiler", lambda: compiler)
    try:
        require_kernels()
    except pytest.skip.Exception as exc:
        return "skip", str(exc)
    except pytest.fail.Exception as exc:
        return "fail", str(exc)
    return "run", ""


@pytest.mark.parametrize("built", [True, False])
@pytest.mark.parametrize("compiler", ["/usr/bin/cc", None])
def test_switched_off_kernels_skip(monkeypatch, built, compiler):
    kind, reason = _outcome(monkeypatch, env="0", built=built, compiler=compiler)
    assert kind == "skip" and "MODELFUSE_KERNELS=0" in reason


@pytest.mark.parametrize("env", [None, "1"])
def test_built_kernels_run(monkeypatch, env):
    assert _outcome(monkeypatch, env=env, built=True, compiler=None)[0] == "run"


def test_missing_kernels_without_a_compiler_skip_with_the_reason(monkeypatch):
    assert _outcome(monkeypatch, env=None, built=False, compiler=None) == ("skip", NO_COMPILER)
    assert NO_COMPILER == "C kernels not built: no C compiler at install time"


def test_missing_kernels_with_a_compiler_fail_and_say_how_to_build(monkeypatch):
    kind, message = _outcome(monkeypatch, env=None, built=False, compiler="/usr/bin/gcc")
    assert kind == "fail"
    assert "/usr/bin/gcc" in message and "build_ext --inplace" in message


def test_compiler_lookup_follows_path(monkeypatch, tmp_path):
    """No compiler on PATH (and none named by $CC): None; an executable ``cc`` on PATH: found."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(kernel_support.sysconfig, "get_config_var", lambda name: "gcc -pthread")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert kernel_support.c_compiler() is None
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\n")
    cc.chmod(0o755)
    assert kernel_support.c_compiler() == str(cc)
