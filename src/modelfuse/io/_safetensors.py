"""The safetensors layout, parsed and written by hand.

Parsing the header ourselves lets a checkpoint list names, shapes and dtypes without
touching tensor data, and turns a damaged file into a message that says what is wrong.
Writing the header ourselves lets the streaming writer place every tensor at a known
offset before its data exists.

Layout: 8-byte little-endian header length N, N bytes of JSON (``{name: {"dtype",
"shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then the data
section, where the tensors lie back to back with offsets relative to its start.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from modelfuse.errors import CheckpointError

#: the largest header we agree to read (safetensors itself refuses beyond 100 MB)
MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "C64": "complex64",
}
#: safetensors dtype code -> torch dtype (only those this torch has)
DTYPE_OF: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}
#: torch dtype -> safetensors dtype code
CODE_OF: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_OF.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file, read from its header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensors in file (offset) order and the metadata."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}. The file is damaged or not a safetensors file; re-download or re-save it."
    )


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def read_header(path: Path) -> Header:
    """Parse and check the header of the safetensors file at ``path``; reads no tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(
                    path,
                    f"truncated safetensors file: it is {size} bytes long, shorter than the "
                    "8-byte header length every safetensors file starts with",
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > size - 8:
                raise _bad(
                    path,
                    f"the declared header length ({n} bytes) exceeds the file, which has only "
                    f"{size - 8} bytes after the 8-byte length prefix (truncated file?)",
                )
            if n > MAX_HEADER_BYTES:
                raise _bad(
                    path, f"the declared header length ({n} bytes) exceeds the limit of {MAX_HEADER_BYTES}"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read this file ({exc})") from exc
    if len(raw) < n:
        raise _bad(path, f"truncated header: {len(raw)} of the declared {n} bytes could be read")
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"invalid header JSON ({exc})") from exc
    if not isinstance(parsed, dict):
        raise _bad(path, f"invalid header JSON: expected an object, found {type(parsed).__name__}")

    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _bad(path, "invalid __metadata__: expected an object mapping strings to strings")

    data_size = size - 8 - n
    infos = [_tensor_info(path, name, entry) for name, entry in parsed.items()]
    infos.sort(key=lambda info: (info.begin, info.end))
    position = 0
    for info in infos:
        if info.end > data_size:
            raise _bad(
                path,
                f"truncated safetensors file: tensor {info.name!r} needs bytes {info.begin}..{info.end} "
                f"of the data section, but the file holds only {data_size} data bytes "
                f"(file size {size}, expected at least {8 + n + max(i.end for i in infos)})",
            )
        if info.begin != position:
            raise _bad(
                path,
                f"invalid data_offsets for tensor {info.name!r}: it starts at byte {info.begin} of the "
                f"data section, expected {position} (tensors must lie back to back without gaps or overlaps)",
            )
        position = info.end
    if position != data_size:
        raise _bad(
            path,
            f"the data section is {data_size} bytes but the header's tensors cover only {position} "
            f"({data_size - position} unexplained bytes at the end)",
        )
    return Header(path, {info.name: info for info in infos}, dict(metadata), 8 + n)


def _tensor_info(path: Path, name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"header entry {name!r} is not an object")
    code = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if code not in DTYPE_OF:
        raise _bad(path, f"tensor {name!r} has unknown dtype {code!r} (known: {', '.join(sorted(DTYPE_OF))})")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(path, f"tensor {name!r} has invalid shape {shape!r} (expected a list of integers >= 0)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r} (expected [begin, end])")
    dtype = DTYPE_OF[code]
    expected = numel(shape) * dtype.itemsize
    begin, end = offsets
    if end - begin != expected:
        raise _bad(
            path,
            f"tensor {name!r}: data_offsets {offsets} span {end - begin} bytes, but shape {tuple(shape)} "
            f"of dtype {code} needs {expected} bytes",
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def header_bytes(
    entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Length prefix + JSON header (space-padded to 8 bytes) for tensors laid out back to back.

    Returns the bytes and each tensor's ``(begin, end)`` within the data section.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for name, dtype, shape in entries:
        end = position + numel(shape) * dtype.itemsize
        header[name] = {"dtype": CODE_OF[dtype], "shape": list(shape), "data_offsets": [position, end]}
        offsets[name] = (position, end)
        position = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def write_file(path: Path, items: list[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> None:
    """Write CPU tensors to one safetensors file at ``path``, sequentially (the writer's
    ``modelfuse._durable.publish`` fsyncs it with the rest of the output)."""
    head, _ = header_bytes(((name, t.dtype, tuple(t.shape)) for name, t in items), metadata)
    with open(path, "wb") as f:
        f.write(head)
        for _, tensor in items:
            f.write(tensor_bytes(tensor))
