"""Where modelfuse keeps what it generates or trains: ``MODELFUSE_CACHE`` or ``~/.cache/modelfuse``.

Both ``modelfuse.data`` (generated datasets) and ``modelfuse.zoo`` (trained pools) write
here. Writes go to a temporary file in the same folder first and are moved into place
with :func:`modelfuse._durable.publish`, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from modelfuse._durable import atomic_file

ENV_VAR = "MODELFUSE_CACHE"


def cache_dir() -> Path:
    """The cache root: ``$MODELFUSE_CACHE`` if set, else ``~/.cache/modelfuse`` (not created here)."""
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "modelfuse"


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it onto ``path``
    durably (``modelfuse._durable.atomic_file``: fsynced before the rename)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        write(tmp)
    return path
