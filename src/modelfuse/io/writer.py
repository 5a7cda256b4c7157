"""An atomic, sharded safetensors writer.

Everything is written into a hidden temporary folder (or file) beside the target and
moved into place only when complete, so a failure at any point leaves the target as it
was. Tensors either arrive in any order into a layout declared up front (streaming:
each tensor is written at its offset as it comes, nothing is buffered) or are buffered
until a shard is full.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from modelfuse._defaults import DEFAULT_SHARD_SIZE
from modelfuse._durable import fsync_folder, publish
from modelfuse.errors import CheckpointError, ConfigError, OutputError, OutputExistsError
from modelfuse.io._safetensors import CODE_OF, header_bytes, numel, tensor_bytes, write_file
from modelfuse.io.checkpoint import AUX_FILES, Checkpoint

_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "b": 10**9,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)

_DTYPE_ALIASES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def parse_size(size: int | str) -> int:
    """Bytes in a size such as ``5GB``, ``500MB``, ``2GiB``, or mergekit's ``5B`` (= 5e9) and ``100M``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (match := _SIZE.match(size)) and match.group(2).lower() in _UNITS:
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        raise ConfigError(
            f"invalid size {size!r}: expected a number of bytes or a number with a unit: "
            "K, M, B (thousand, million, billion bytes, as in mergekit), KB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024), e.g. '5GB' or '500MiB'"
        )
    if value <= 0:
        raise ConfigError(f"invalid size {size!r}: it must be more than 0 bytes")
    return value


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The floating-point dtype that ``dtype`` names (``"bf16"``, ``torch.float16``...), or None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        found = _DTYPE_ALIASES.get(dtype.lower().removeprefix("torch."))
    else:
        found = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
    if found is None or found not in CODE_OF:
        raise ConfigError(
            f"invalid output dtype {dtype!r}: expected a floating-point dtype: "
            "float32/fp32, float16/fp16, bfloat16/bf16 or float64"
        )
    return found


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = {"format": "pt"}  # transformers refuses safetensors files without it
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigError(
                f"invalid safetensors metadata entry {key!r}: {value!r}: keys and values must be strings "
                "(convert numbers with str() or json.dumps())"
            )
        out[key] = value
    return out


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    view = data.cast("B") if data.ndim != 1 or data.format != "B" else data
    while len(view):
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(f"pwrite wrote {written} bytes")
        view, offset = view[written:], offset + written


def _libc_sync_file_range() -> Any:
    """Linux's sync_file_range from the C library, or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class _WriteBehind:
    """Moves streamed tensor data out of the page cache soon after it is written.

    Each written range has its write-back started at once (``sync_file_range``), and once
    ``lag`` more bytes have been written after it, its pages (clean by then) are dropped
    (``posix_fadvise(DONTNEED)``). So a multi-gigabyte output occupies about ``lag`` bytes
    of page cache instead of its whole size: it does not push the inputs out of the cache,
    and its writes reuse the pages just freed instead of asking the system for fresh ones
    (on virtual machines whose host reclaims freed guest memory, first touches of fresh
    pages made writing 0.9 GB cost 3-5 s of CPU instead of 0.5-1.5 s;
    benchmarks/RESULTS.md). Advisory only: where the calls are missing or fail, the data is
    written all the same and stays cached."""

    LAG = 64 * 2**20

    def __init__(self, lag: int | None = None) -> None:
        self.lag = self.LAG if lag is None else lag
        self.ranges: deque[tuple[int, int, int]] = deque()
        self.held = 0

    def written(self, fd: int, offset: int, length: int) -> None:
        if length <= 0:
            return
        if _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
        self.ranges.append((fd, offset, length))
        self.held += length
        while self.ranges and self.held - self.ranges[0][2] >= self.lag:
            old_fd, old_offset, old_length = self.ranges.popleft()
            self.held -= old_length
            if hasattr(os, "posix_fadvise"):
                with contextlib.suppress(OSError):
                    os.posix_fadvise(old_fd, old_offset, old_length, os.POSIX_FADV_DONTNEED)

    def clear(self) -> None:
        """Forget the ranges (their files are about to close)."""
        self.ranges.clear()
        self.held = 0


class _Slot:
    """Where a declared tensor goes: its shard file, absolute offset and expected form."""

    __slots__ = ("dtype", "offset", "shape", "shard")

    def __init__(self, shard: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shard, self.offset, self.shape, self.dtype = shard, offset, shape, dtype


class CheckpointWriter:
    """Write named tensors as an atomic safetensors checkpoint: ``with CheckpointWriter(out) as w: w.add(...)``.

    A ``target`` ending in ``.safetensors`` becomes one file; any other target becomes a
    Hugging Face style folder sharded at ``max_shard_size`` (``model.safetensors`` or
    ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``). ``dtype``
    casts floating-point tensors; ``metadata`` goes into every shard's ``__metadata__``;
    ``protect`` lists input paths the target must not equal, lie inside or contain.
    ``drop_cache``: streamed tensor data leaves the page cache soon after it is written
    (``_WriteBehind``): a large output does not push other files out of the cache, but
    reading it right after it was written comes from disk. Off by default.

    Durability: before the move into place every file of the output and its folders are
    fsynced, and the parent folder after it (``modelfuse._durable``).
    """

    def __init__(
        self,
        target: str | os.PathLike,
        *,
        max_shard_size: int | str = DEFAULT_SHARD_SIZE,
        dtype: torch.dtype | str | None = None,
        metadata: Mapping[str, str] | None = None,
        force: bool = False,
        protect: Iterable[str | os.PathLike] = (),
        drop_cache: bool = False,
    ) -> None:
        self.target = Path(os.path.abspath(Path(target).expanduser()))
        self.max_shard_size = parse_size(max_shard_size)
        self.dtype = parse_dtype(dtype)
        self.metadata = _check_metadata(metadata)
        self.force = bool(force)
        self.protect = [Path(p) for p in protect]
        self.single_file = self.target.name.endswith(".safetensors")
        self._state = "new"
        self._tmp: Path | None = None  # temp folder (or temp file in single-file mode)
        self._created_parents: list[Path] = []
        self._names: set[str] = set()
        self._order: list[tuple[int, str]] = []  # (shard, name) for the index
        self._nbytes = 0
        # buffered mode
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._pending_bytes = 0
        self._shards: list[Path] = []
        # streaming mode
        self._slots: dict[str, _Slot] | None = None
        self._fds: list[int] = []
        self._behind = _WriteBehind() if drop_cache else None

    # -- life cycle -----------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        self.open()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
        return False

    def open(self) -> None:
        """Check the target and create the temporary folder (or file) beside it."""
        if self._state != "new":
            raise OutputError(f"this writer for {self.target} was opened already; make a new one")
        self._check_target()
        anchor = self._anchor()
        prefix = f".{self.target.name}.tmp-"
        try:
            if self.single_file:
                fd, tmp = tempfile.mkstemp(prefix=prefix, dir=anchor)
                os.close(fd)
                self._tmp = Path(tmp)
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it normal permissions
            else:
                self._tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=anchor))
                os.chmod(self._tmp, 0o777 & ~_umask())
        except OSError as exc:
            raise OutputError(f"cannot create a temporary output in {anchor} ({exc})") from exc
        self._state = "open"

    def check(self) -> None:
        """Raise now if the target could not be written (it exists without force, or overlaps an input)."""
        self._check_target()
        self._anchor()

    def _check_target(self) -> None:
        target = Path(os.path.realpath(self.target))
        for given in self.protect:
            guarded = Path(os.path.realpath(Path(given).expanduser()))
            if _inside(target, guarded) or _inside(guarded, target):
                relation = (
                    "is"
                    if target == guarded
                    else "lies inside"
                    if _inside(target, guarded)
                    else "would replace a folder holding"
                )
                raise OutputError(
                    f"refusing to write into input folder {given}: the output {self.target} {relation} "
                    "an input. Choose an output path outside the inputs."
                )
        if self.target.exists() or self.target.is_symlink():
            if not self.force:
                raise OutputExistsError(
                    f"the output {self.target} exists already; pass force=True (--force on the command "
                    "line) to replace it, or choose another path"
                )
            if self.single_file and self.target.is_dir():
                raise OutputError(
                    f"the output {self.target} is a folder, but a target ending in .safetensors is written "
                    "as one file; remove the folder or choose another name"
                )

    def _anchor(self) -> Path:
        """The nearest existing folder above the target: the temp output lives there."""
        anchor = self.target.parent
        while not anchor.exists():
            anchor = anchor.parent
        if not anchor.is_dir():
            raise OutputError(f"cannot write {self.target}: {anchor} is a file, not a folder")
        return anchor

    def _require_open(self) -> Path:
        if self._state != "open" or self._tmp is None:
            raise OutputError(
                f"the writer for {self.target} is {self._state}: use it as `with CheckpointWriter(...) as w:`"
            )
        return self._tmp

    # -- tensors ----------------------------------------------------------------------------------
    def declare(self, layout: Mapping[str, Any]) -> None:
        """Fix every tensor's name, shape and dtype up front (ordered ``name -> (shape, dtype)``).

        Shards and offsets are assigned now and each shard's header is written, so
        :meth:`add` then writes each tensor straight to its place, in any order.
        """
        tmp = self._require_open()
        if self._slots is not None or self._names:
            raise OutputError("declare() must be called once, before any add()")
        entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for name, spec in layout.items():
            self._check_name(name)
            if hasattr(spec, "shape") and hasattr(spec, "dtype"):
                shape, dtype = spec.shape, spec.dtype
            else:
                try:
                    shape, dtype = spec
                except (TypeError, ValueError) as exc:
                    raise OutputError(
                        f"declared layout entry {name!r}: expected (shape, dtype), found {spec!r}"
                    ) from exc
            if not isinstance(dtype, torch.dtype):
                raise OutputError(f"declared layout entry {name!r}: {dtype!r} is not a torch.dtype")
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise OutputError(f"declared layout entry {name!r}: invalid shape {dims}")
            entries.append((name, dims, self._stored_dtype(name, dtype)))

        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
        size = 0
        for entry in entries:
            nbytes = numel(entry[1]) * entry[2].itemsize
            if not groups or (groups[-1] and size + nbytes > self.max_shard_size and not self.single_file):
                groups.append([])
                size = 0
            groups[-1].append(entry)
            size += nbytes
        if not groups:
            groups.append([])

        self._slots = {}
        n = len(groups)
        try:
            for i, group in enumerate(groups):
                path = tmp if self.single_file else tmp / _shard_name(i, n)
                head, offsets = header_bytes(((nm, dt, sh) for nm, sh, dt in group), self.metadata)
                data_size = sum(end - begin for begin, end in offsets.values())
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                self._fds.append(fd)
                _pwrite_all(fd, memoryview(head), 0)
                os.ftruncate(fd, len(head) + data_size)
                self._shards.append(path)
                for nm, sh, dt in group:
                    self._slots[nm] = _Slot(i, len(head) + offsets[nm][0], sh, dt)
                    self._order.append((i, nm))
                    self._nbytes += numel(sh) * dt.itemsize
        except OSError as exc:
            raise OutputError(f"cannot write shard headers in {tmp} ({exc})") from exc

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor (cast to the writer's dtype when it is floating-point).

        Without :meth:`declare` the tensor is kept until its shard is written: do not
        change it in place after adding it.
        """
        self._require_open()
        self._check_name(name)
        if name in self._names:
            raise OutputError(f"tensor {name!r} was added twice to {self.target}; every name must be unique")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, found {type(tensor).__name__}")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        stored = self._stored_dtype(name, tensor.dtype)
        if tensor.dtype != stored:
            tensor = tensor.to(stored)
        if self._slots is not None:
            self._write_declared(name, tensor)
        else:
            self._buffer(name, tensor)
        self._names.add(name)

    def _check_name(self, name: object) -> None:
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise OutputError(
                f"invalid tensor name {name!r}: expected a non-empty string other than __metadata__"
            )

    def _stored_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        stored = self.dtype if self.dtype is not None and dtype.is_floating_point else dtype
        if stored not in CODE_OF:
            raise OutputError(
                f"tensor {name!r} has dtype {stored}, which safetensors cannot store; "
                f"supported: {', '.join(str(d).removeprefix('torch.') for d in CODE_OF)}"
            )
        return stored

    def _write_declared(self, name: str, tensor: torch.Tensor) -> None:
        assert self._slots is not None
        slot = self._slots.get(name)
        if slot is None:
            raise OutputError(
                f"tensor {name!r} was not declared; the layout given to declare() has "
                f"{len(self._slots)} tensors and this name is not one of them"
            )
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise OutputError(
                f"tensor {name!r}: declared as shape {slot.shape} {slot.dtype}, but the tensor added is "
                f"shape {tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor_bytes(tensor)
        try:
            _pwrite_all(self._fds[slot.shard], data, slot.offset)
        except OSError as exc:
            raise OutputError(f"cannot write tensor {name!r} to {self._shards[slot.shard]} ({exc})") from exc
        if self._behind is not None:
            self._behind.written(self._fds[slot.shard], slot.offset, data.nbytes)

    def _buffer(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.dtype.itemsize
        if self._pending and self._pending_bytes + nbytes > self.max_shard_size and not self.single_file:
            self._flush()
        self._pending.append((name, tensor))
        self._pending_bytes += nbytes
        self._order.append((len(self._shards), name))
        self._nbytes += nbytes

    def _flush(self) -> None:
        tmp = self._require_open()
        path = tmp if self.single_file else tmp / f"shard-{len(self._shards):05d}.partial"
        try:
            write_file(path, self._pending, self.metadata)
        except OSError as exc:
            raise OutputError(f"cannot write shard {path} ({exc})") from exc
        self._shards.append(path)
        self._pending, self._pending_bytes = [], 0

    # -- other files ----------------------------------------------------------------------------
    def _aux_path(self, relname: str | os.PathLike) -> Path:
        tmp = self._require_open()
        if self.single_file:
            raise OutputError(
                f"cannot write {relname} beside a single-file target {self.target}; "
                "write to a folder target to keep config and tokenizer files"
            )
        rel = Path(relname)
        if (
            rel.is_absolute()
            or not rel.parts
            or ".." in rel.parts
            or rel.name.endswith(".safetensors")
            or rel.name == "model.safetensors.index.json"
        ):
            raise OutputError(
                f"invalid extra file name {str(relname)!r}: expected a relative path inside the output "
                "that is not a weight file or the weight index"
            )
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def copy_files(
        self, src_folder: str | os.PathLike | Checkpoint | None, names: Iterable[str] = AUX_FILES
    ) -> list[str]:
        """Copy the config and tokenizer files that exist in ``src_folder``; returns the names copied."""
        if isinstance(src_folder, Checkpoint):
            src_folder = src_folder.folder
        if src_folder is None:
            return []
        src = Path(src_folder)
        if not src.is_dir():
            raise CheckpointError(f"cannot copy model files from {src}: it is not a folder")
        copied = []
        for name in names:
            if (src / name).is_file():
                shutil.copyfile(src / name, self._aux_path(name))
                copied.append(name)
        return copied

    def write_text(self, relname: str | os.PathLike, text: str) -> Path:
        """Write an extra text file (a model card, a recipe) into the output folder."""
        path = self._aux_path(relname)
        path.write_text(text, encoding="utf-8")
        return self.target / Path(relname)

    def write_json(self, relname: str | os.PathLike, obj: Any) -> Path:
        """Write an extra JSON file (e.g. config.json) into the output folder."""
        return self.write_text(relname, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    # -- finishing ------------------------------------------------------------------------------
    def close(self) -> Path:
        """Finish the shards, write the index and move the result into place; returns the target."""
        tmp = self._require_open()
        if self._slots is not None:
            missing = [n for n in self._slots if n not in self._names]
            if missing:
                shown = ", ".join(map(repr, missing[:10])) + (
                    f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                )
                raise OutputError(
                    f"{len(missing)} declared tensor(s) were never added to {self.target}: {shown}"
                )
            self._close_fds()  # publish() fsyncs every file
        elif self._pending or not self._shards:
            self._flush()
        if not self.single_file:
            n = len(self._shards)
            final = [tmp / _shard_name(i, n) for i in range(n)]
            for old, new in zip(self._shards, final):
                if old != new:
                    os.rename(old, new)
            self._shards = final
            if n > 1:
                index = {
                    "metadata": {"total_size": self._nbytes},
                    "weight_map": {name: final[i].name for i, name in self._order},
                }
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        self._publish(tmp)
        self._state = "closed"
        return self.target

    def _publish(self, tmp: Path) -> None:
        """Move the finished temp output onto the target; with force, keep the old one until then."""
        if (self.target.exists() or self.target.is_symlink()) and not self.force:
            raise OutputExistsError(
                f"the output {self.target} appeared while it was being written; pass force=True "
                "(--force) to replace it"
            )
        parent = self.target.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._created_parents.append(folder)
        try:
            publish(tmp, self.target, replace=True)
        except OSError as exc:
            raise OutputError(f"cannot move the finished output into place at {self.target} ({exc})") from exc
        self._tmp = None
        for folder in self._created_parents:  # the folders made for it exist durably too
            fsync_folder(folder.parent)

    def _close_fds(self) -> None:
        if self._behind is not None:
            self._behind.clear()
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def abort(self) -> None:
        """Discard everything written so far; the target stays as it was."""
        self._close_fds()
        self._pending = []
        tmp, self._tmp = self._tmp, None
        if tmp is not None:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        for folder in reversed(self._created_parents):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created_parents = []
        self._state = "aborted"


# ------------------------------------------------------------------------------------------------
def write_checkpoint(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Checkpoint,
    target: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    copy_from: str | os.PathLike | Checkpoint | None = None,
) -> Path:
    """Write tensors (a Mapping, ``(name, tensor)`` pairs or a :class:`Checkpoint`) atomically; returns the target.

    A Checkpoint is streamed one tensor at a time (its layout declared from the headers),
    and its own files are protected from being overwritten. ``copy_from`` copies config
    and tokenizer files from that folder (or that checkpoint's folder).
    """
    guarded = list(protect)
    if isinstance(tensors, Checkpoint):
        guarded += [p for p in (tensors.path, tensors.folder) if p is not None] + list(tensors.files)
    with CheckpointWriter(
        target, max_shard_size=max_shard_size, dtype=dtype, metadata=metadata, force=force, protect=guarded
    ) as writer:
        if isinstance(tensors, Checkpoint):
            writer.declare({name: (tensors.shape(name), tensors.dtype(name)) for name in tensors})
            for name in tensors:
                writer.add(name, tensors.get(name))
        else:
            pairs = tensors.items() if isinstance(tensors, Mapping) else tensors
            for pair in pairs:
                try:
                    name, tensor = pair
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"expected (name, tensor) pairs, found {pair!r}") from exc
                writer.add(name, tensor)
        if copy_from is not None:
            writer.copy_files(copy_from)
    return writer.target


def save_state_dict(
    module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Save a module's (or a dict's) tensors as one ``.safetensors`` file, atomically.

    Tied or shared tensors are fine: every name's bytes are written on their own.
    """
    if not str(path).endswith(".safetensors"):
        raise ConfigError(f"save_state_dict writes one safetensors file: {path} must end with .safetensors")
    state = (
        module_or_state_dict.state_dict()
        if isinstance(module_or_state_dict, torch.nn.Module)
        else module_or_state_dict
    )
    if not isinstance(state, Mapping):
        raise TypeError(f"expected an nn.Module or a state_dict, found {type(module_or_state_dict).__name__}")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "safetensors stores tensors only"
            )
    return write_checkpoint(state, path, metadata=metadata, force=force)
