"""Where modelfuse keeps what it generates or trains: ``MODELFUSE_CACHE`` or ``~/.cache/modelfuse``.

Both ``modelfuse.data`` (generated datasets) and ``modelfuse.zoo`` (trained pools) write
here. Writes go to a temporary file in the same folder first and are moved into place
with :func:`os.replace`, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

ENV_VAR = "MODELFUSE_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$MODELFUSE_CACHE`` if set, else ``~/.cache/modelfuse`` (not created here)."""
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "modelfuse"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
