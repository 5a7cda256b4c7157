"""Checkpoint I/O: lazy maps of named tensors in, atomic sharded safetensors out.

``open_checkpoint`` reads safetensors files, Hugging Face folders (sharded or not),
PyTorch files (only with ``weights_only=True``) and in-memory state_dicts through one
:class:`Checkpoint` interface. ``CheckpointWriter`` / ``write_checkpoint`` /
``save_state_dict`` write safetensors so that a failure never leaves a half-written
or lost output.
"""

from __future__ import annotations

from modelfuse._defaults import DEFAULT_SHARD_SIZE
from modelfuse.io.checkpoint import (
    AUX_FILES,
    Checkpoint,
    MissingTensorError,
    MixedFormatWarning,
    load_into,
    open_checkpoint,
)
from modelfuse.io.writer import (
    CheckpointWriter,
    parse_dtype,
    parse_size,
    save_state_dict,
    write_checkpoint,
)

__all__ = [
    "AUX_FILES",
    "DEFAULT_SHARD_SIZE",
    "Checkpoint",
    "CheckpointWriter",
    "MissingTensorError",
    "MixedFormatWarning",
    "load_into",
    "open_checkpoint",
    "parse_dtype",
    "parse_size",
    "save_state_dict",
    "write_checkpoint",
]
