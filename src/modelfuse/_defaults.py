"""Defaults shared by the Python API, the command line and the docs (standard library only, so
that ``modelfuse --help`` can show them without importing torch)."""

from __future__ import annotations

#: the shard size of every writer, API call and command that does not say otherwise: 5 * 10^9
#: bytes (mergekit's default ``5B`` is the same size); ``modelfuse.io.DEFAULT_SHARD_SIZE``
DEFAULT_SHARD_SIZE = "5GB"
