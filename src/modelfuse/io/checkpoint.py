"""Checkpoints as lazy, read-only maps of named tensors.

:func:`open_checkpoint` accepts a safetensors file, a Hugging Face style folder
(single or sharded, safetensors or ``pytorch_model*.bin``), a PyTorch file, an index
json, an in-memory state_dict or an ``nn.Module``, and returns one :class:`Checkpoint`
whatever the source. Names, shapes and dtypes come from headers and indexes; tensor
data is read one tensor at a time, so a merge's memory is bounded by tensors, not models.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import mmap
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from modelfuse.errors import CheckpointError
from modelfuse.io._safetensors import Header, read_header
from modelfuse.io._torchfile import load_tensors, tensors_from_object

#: tokenizer files of a Hugging Face model folder
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
)
#: configuration files beside the weights (config.json itself aside)
CONFIG_FILES = ("generation_config.json", "preprocessor_config.json")
#: files that sit beside weights in a model folder but are not weights
AUX_FILES = ("config.json", *CONFIG_FILES, *TOKENIZER_FILES)
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: pickles that Hugging Face / Lightning trainers leave in checkpoint folders beside the weights
_TRAINING_FILES = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"})


class MixedFormatWarning(UserWarning):
    """A folder holds weights in two formats; the safetensors ones were used."""


class MissingTensorError(CheckpointError, KeyError):
    """No tensor of that name: a CheckpointError that is also the KeyError a Mapping raises."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class _Source(ABC):
    """One weight file (or an in-memory dict) that a checkpoint reads tensors from."""

    path: Path | None = None

    @abstractmethod
    def names(self) -> list[str]:
        """Tensor names in file order."""

    @abstractmethod
    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one tensor, without reading its data."""

    @abstractmethod
    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor's values, in a tensor the caller owns: in ``into`` (a uint8 buffer of at
        least the tensor's size in bytes) when given, so that a caller can reuse memory."""

    def map(self, name: str) -> torch.Tensor:
        """One tensor's values without a copy where the format allows (a private memory map of
        its bytes in the file); otherwise as :meth:`read`. The mapping closes when the last
        view of it is freed."""
        return self.read(name)

    def close(self) -> None:  # noqa: B027  (a default: sources without open handles keep it)
        """Release open handles (sources without any have nothing to do)."""


def _bytes(nbytes: int, into: torch.Tensor | None) -> torch.Tensor:
    """``nbytes`` of uint8 memory: the front of ``into`` when given (checked), else new."""
    if into is None:
        return torch.empty(nbytes, dtype=torch.uint8)
    if into.dtype != torch.uint8 or into.dim() != 1 or not into.is_contiguous() or into.numel() < nbytes:
        raise ValueError(f"read buffer must be a contiguous 1-D uint8 tensor of at least {nbytes} bytes")
    return into[:nbytes]


def _copy(tensor: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
    """A copy of ``tensor`` the caller owns, in ``into``'s memory when given."""
    if into is None or tensor.numel() == 0:
        return tensor.clone()
    out = _bytes(tensor.numel() * tensor.element_size(), into).view(tensor.dtype).view(tensor.shape)
    return out.copy_(tensor)


class _SafetensorsSource(_Source):
    """A safetensors file: header parsed up front, each tensor read with ``pread`` at its offset.

    Plain positional reads (no memory map) keep a streaming reader's RSS bounded by the
    tensors it holds, are safe from several threads at once, and copy each byte once.
    """

    def __init__(self, header: Header) -> None:
        self.header = header
        self.path = header.path
        self._fd: int | None = None

    def names(self) -> list[str]:
        return list(self.header.tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self.header.tensors[name]
        return entry.shape, entry.dtype

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        entry = self.header.tensors[name]
        out = _bytes(entry.nbytes, into)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            view, offset = memoryview(out.numpy()), self.header.data_start + entry.begin
            while len(view):
                got = os.preadv(self._fd, [view], offset)
                if got <= 0:
                    raise OSError(f"the file ended {len(view)} bytes before the tensor's end")
                view, offset = view[got:], offset + got
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {name!r} ({exc})") from exc
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return out.view(entry.dtype).reshape(entry.shape)

    def map(self, name: str) -> torch.Tensor:
        """A copy-on-write map of the tensor's pages: reading them costs no copy, and writes
        (which a merge does not make) would stay private to this process."""
        entry = self.header.tensors[name]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        start = self.header.data_start + entry.begin
        skip = start % mmap.ALLOCATIONGRANULARITY
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            region = mmap.mmap(
                self._fd,
                skip + entry.nbytes,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=start - skip,
            )
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot map tensor {name!r} ({exc})") from exc
        _populate(region)
        data = torch.frombuffer(region, dtype=torch.uint8, count=entry.nbytes, offset=skip)
        return data.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


_MADV_POPULATE_READ = 22  # Linux 5.14+: fault the pages in now (reading them from disk if needed)


def _populate(region: mmap.mmap) -> None:
    """Fault a fresh mapping's pages in now, so that the thread that maps (a reader) pays for
    the faults and any disk reads instead of the one that computes. Older kernels: a hint."""
    try:
        region.madvise(_MADV_POPULATE_READ)
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            region.madvise(mmap.MADV_WILLNEED)


class _TorchSource(_Source):
    """A PyTorch file, loaded (memory-mapped) the first time one of its tensors is asked for.

    ``expected`` lists the names an index assigns to this shard (so names need no load);
    ``owner`` is the index's full name -> shard map, to catch names stored in two shards.
    """

    def __init__(
        self, path: Path, expected: list[str] | None = None, owner: Mapping[str, Path] | None = None
    ) -> None:
        self.path = path
        self._expected = expected
        self._owner = owner
        self._tensors: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            tensors = load_tensors(self.path)
            if self._expected is not None:
                missing = [n for n in self._expected if n not in tensors]
                if missing:
                    raise CheckpointError(
                        f"{self.path}: the index assigns {len(self._expected)} tensors to this shard but "
                        f"{len(missing)} are not in it (e.g. {', '.join(map(repr, missing[:3]))}). The index "
                        "and the shards do not match; re-download the checkpoint."
                    )
                if self._owner is not None:
                    for name in tensors:
                        other = self._owner.get(name)
                        if other is not None and other != self.path:
                            raise CheckpointError(
                                f"duplicate tensor name {name!r}: it is stored in both {self.path.name} and "
                                f"{other.name} (in {self.path.parent}). Remove it from one shard."
                            )
            self._tensors = tensors
        return self._tensors

    def names(self) -> list[str]:
        return list(self._expected) if self._expected is not None else list(self._load())

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        tensor = self._load()[name]
        return tuple(tensor.shape), tensor.dtype

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        return _copy(self._load()[name], into)

    def close(self) -> None:
        self._tensors = None  # drops the memory map; loaded again if asked for


class _MemorySource(_Source):
    """Tensors already in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        tensor = self._tensors[name]
        return tuple(tensor.shape), tensor.dtype

    def read(self, name: str, into: torch.Tensor | None = None) -> torch.Tensor:
        return _copy(self._tensors[name].detach(), into)


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only, lazily loaded map of tensor names to tensors; build it with :func:`open_checkpoint`.

    ``shape``/``dtype``/``nbytes`` read no tensor data; ``get``/``[]`` read one tensor and
    return a fresh copy the caller owns (changing it in place never changes the checkpoint).
    Attributes: ``format`` ("safetensors", "pytorch" or "memory"), ``files`` (weight files
    used), ``path`` (what was opened), ``folder`` (the folder with config/tokenizer files),
    ``ignored`` (weight files of another format left unused), ``metadata`` (safetensors
    ``__metadata__``, merged over shards), ``config`` (parsed config.json) and ``size_on_disk``.
    """

    def __init__(
        self,
        sources: list[_Source],
        *,
        format: str,
        path: Path | None = None,
        folder: Path | None = None,
        ignored: list[Path] | None = None,
        metadata: dict[str, str] | None = None,
        names: list[tuple[str, _Source]] | None = None,
    ) -> None:
        self.format = format
        self.path = path
        self.folder = folder
        self.ignored = list(ignored or [])
        self.metadata = dict(metadata or {})
        self.files = [s.path for s in sources if s.path is not None]
        self.size_on_disk = sum(p.stat().st_size for p in self.files)
        self._sources = sources
        if names is None:
            names = [(name, source) for source in sources for name in source.names()]
        self._where: dict[str, _Source] = {}
        for name, source in names:
            if name in self._where:
                raise CheckpointError(
                    f"duplicate tensor name {name!r} in {self._describe()}: it is stored in both "
                    f"{_label(self._where[name])} and {_label(source)}. Remove it from one of them."
                )
            self._where[name] = source
        self._config: dict | None = None
        self._config_read = False
        self._closed = False

    # -- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    _MISSING: Any = object()

    def get(self, name: str, default: Any = _MISSING, *, into: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor. A missing name raises :class:`MissingTensorError` unless ``default`` is given.

        ``into``: a contiguous 1-D uint8 tensor of at least :meth:`nbytes` bytes that the
        values are read into (the result is a view of it), to reuse memory across reads.
        """
        source = self._where.get(name)
        if source is None:
            if default is not Checkpoint._MISSING:
                return default
            raise self._missing(name)
        if self._closed:
            raise CheckpointError(f"{self._describe()} was closed; open it again to read {name!r}")
        return source.read(name, into)

    def map(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped without a copy where its file allows it (safetensors:
        a private, copy-on-write map whose pages are faulted in now); otherwise read as
        :meth:`get`. The mapping is released when the last view of the tensor is freed."""
        source = self._where.get(name)
        if source is None:
            raise self._missing(name)
        if self._closed:
            raise CheckpointError(f"{self._describe()} was closed; open it again to read {name!r}")
        return source.map(name)

    # -- metadata without data -----------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header or index (a .bin shard is memory-mapped, not read)."""
        return tuple(self._source(name).info(name)[0])

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's dtype, read like :meth:`shape`."""
        return self._source(name).info(name)[1]

    def nbytes(self, name: str) -> int:
        """The tensor's size in bytes (numel x itemsize), read like :meth:`shape`."""
        shape, dtype = self._source(name).info(name)
        n = 1
        for d in shape:
            n *= d
        return n * dtype.itemsize

    @property
    def config(self) -> dict | None:
        """The folder's parsed ``config.json``, or None when there is none."""
        if not self._config_read:
            file = self.folder / "config.json" if self.folder is not None else None
            if file is not None and file.is_file():
                try:
                    self._config = json.loads(file.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, ValueError) as exc:
                    raise CheckpointError(f"{file}: invalid JSON ({exc}); fix or delete the file") from exc
            self._config_read = True
        return self._config

    def close(self) -> None:
        """Release open files and memory maps."""
        for source in self._sources:
            source.close()
        self._closed = True

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint(format={self.format!r}, source={self._describe()}, tensors={len(self)})"

    # -- helpers ------------------------------------------------------------------------------
    def _source(self, name: str) -> _Source:
        source = self._where.get(name)
        if source is None:
            raise self._missing(name)
        return source

    def _describe(self) -> str:
        return str(self.path) if self.path is not None else "the in-memory state_dict"

    def _missing(self, name: object) -> MissingTensorError:
        names = list(self._where)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
        if close:
            hint = f"close names: {', '.join(map(repr, close))}"
        else:
            hint = f"it holds {len(names)} tensors, e.g. {', '.join(map(repr, names[:3])) or 'none'}"
        return MissingTensorError(f"no tensor named {name!r} in {self._describe()}; {hint}")


def _label(source: _Source) -> str:
    return source.path.name if source.path is not None else "memory"


# ------------------------------------------------------------------------------------------------
def open_checkpoint(source: str | os.PathLike | Mapping | torch.nn.Module | Checkpoint) -> Checkpoint:
    """Open a checkpoint file, folder, index json, state_dict or module as a :class:`Checkpoint`."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, torch.nn.Module):
        state = tensors_from_object(source.state_dict(), f"the state_dict of {type(source).__name__}")
        return Checkpoint([_MemorySource(state)], format="memory")
    if isinstance(source, Mapping):
        return Checkpoint(
            [_MemorySource(tensors_from_object(source, "the in-memory state_dict"))], format="memory"
        )
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(
            f"cannot open a {type(source).__name__} as a checkpoint: pass a path to a file or folder, "
            "a state_dict (dict of name -> tensor) or an nn.Module"
        )
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}{_did_you_mean(path)}")
    if path.is_dir():
        return _open_folder(path)
    return _open_file(path)


def _did_you_mean(path: Path) -> str:
    try:
        siblings = [p.name for p in path.parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(str(path.parent / c) for c in close)}?)" if close else ""


def _folder_of(file: Path) -> Path | None:
    """The folder beside a weight file when it holds config or tokenizer files."""
    parent = file.parent
    return parent if any((parent / name).is_file() for name in AUX_FILES) else None


def _open_file(
    path: Path, *, folder: Path | None = None, ignored: list[Path] | None = None, given: Path | None = None
) -> Checkpoint:
    """Open one weight file or index; ``given`` is what the user named (a folder, say)."""
    folder = folder if folder is not None else _folder_of(path)
    given = given if given is not None else path
    name = path.name
    if name.endswith(".json"):
        return _open_index(path, folder=folder, ignored=ignored, given=given)
    kind = _sniff(path)
    if kind == "safetensors":
        header = read_header(path)
        return Checkpoint(
            [_SafetensorsSource(header)],
            format="safetensors",
            path=given,
            folder=folder,
            ignored=ignored,
            metadata=header.metadata,
        )
    if kind == "pytorch":
        return Checkpoint([_TorchSource(path)], format="pytorch", path=given, folder=folder, ignored=ignored)
    raise CheckpointError(
        f"{path}: unknown checkpoint format: expected a .safetensors file, a PyTorch file "
        f"({', '.join(TORCH_SUFFIXES)}), an index .json or a model folder"
    )


def _sniff(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in TORCH_SUFFIXES:
        return "pytorch"
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read this file ({exc})") from exc
    if start[:4] == b"PK\x03\x04" or start[:1] == b"\x80":  # zip archive / pickle protocol 2+
        return "pytorch"
    if len(start) == 9 and start[8:9] == b"{":
        return "safetensors"
    return None


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of an index json (tensor name -> shard file name), in file order."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(
                    f"{index}: duplicate tensor name {key!r}: it is listed twice in the index. "
                    "Keep one entry and make sure the tensor is stored in one shard only."
                )
            out[key] = value
        return out

    try:
        data = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{index}: not a valid index: invalid JSON ({exc}). Re-download the index file or "
            "delete it and pass one weight file."
        ) from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: not a valid index: it has no weight_map (expected "
            '{"weight_map": {"tensor.name": "model-00001-of-0000N.safetensors", ...}}).'
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"{index}: weight_map entry {name!r} -> {shard!r} is not a shard file name in the index's folder"
            )
    return weight_map


def _open_index(index: Path, *, folder: Path | None, ignored: list[Path] | None, given: Path) -> Checkpoint:
    weight_map = _read_index(index)
    base = index.parent
    shards: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(base / shard, []).append(name)
    order = sorted(shards)
    missing = [p for p in order if not p.is_file()]
    if missing:
        lines = "; ".join(f"{p.name} (should hold {len(shards[p])} tensors)" for p in missing)
        raise CheckpointError(
            f"{index}: the index names shard(s) that do not exist in {base}: {lines}. "
            "Re-download the missing shard(s) or fix the index."
        )
    suffixes = {p.suffix for p in order}
    if suffixes == {".safetensors"}:
        headers = [read_header(p) for p in order]
        stored: dict[str, Path] = {}
        for header in headers:
            for tname in header.tensors:
                if tname in stored:
                    raise CheckpointError(
                        f"duplicate tensor name {tname!r}: it is stored in both {stored[tname].name} and "
                        f"{header.path.name} (shards of {index}). Remove it from one shard."
                    )
                stored[tname] = header.path
        sources: list[_Source] = []
        names: list[tuple[str, _Source]] = []
        metadata: dict[str, str] = {}
        for header in headers:
            source = _SafetensorsSource(header)
            sources.append(source)
            metadata.update(header.metadata)
            wanted = set(shards[header.path])
            lacking = wanted.difference(header.tensors)
            if lacking:
                raise CheckpointError(
                    f"{index}: the index maps {len(lacking)} tensor(s) to {header.path.name} that it does not "
                    f"hold (e.g. {sorted(lacking)[0]!r}). The index and the shards do not match; re-download "
                    "the checkpoint."
                )
            names += [(tname, source) for tname in header.tensors if tname in wanted]
        return Checkpoint(
            sources,
            format="safetensors",
            path=given,
            folder=folder,
            ignored=ignored,
            metadata=metadata,
            names=names,
        )
    if all(s in TORCH_SUFFIXES for s in suffixes):
        owner = {name: base / shard for name, shard in weight_map.items()}
        sources = [_TorchSource(p, expected=shards[p], owner=owner) for p in order]
        return Checkpoint(sources, format="pytorch", path=given, folder=folder, ignored=ignored)
    raise CheckpointError(
        f"{index}: the index mixes shard formats ({', '.join(sorted(suffixes))}); expected only "
        ".safetensors shards or only PyTorch shards"
    )


def _is_training_file(name: str) -> bool:
    return name in _TRAINING_FILES or name.startswith("rng_state")


def _weight_files(files: list[Path], suffixes: tuple[str, ...]) -> list[Path]:
    return [p for p in files if p.suffix in suffixes and not _is_training_file(p.name)]


def _pick(folder: Path, files: list[Path], main: str, suffixes: tuple[str, ...]) -> Path | None:
    """The one weight file or index of one format in a folder, following Hugging Face's names."""
    names = {p.name: p for p in files}
    if main in names:
        return names[main]
    if main + ".index.json" in names:
        return names[main + ".index.json"]
    indexes = [p for p in files if p.name.endswith(tuple(s + ".index.json" for s in suffixes))]
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder}: holds several index files ({', '.join(p.name for p in indexes)}); pass the one to use"
        )
    if len(indexes) == 1:
        return indexes[0]
    weights = _weight_files(files, suffixes)
    if len(weights) == 1:
        return weights[0]
    if len(weights) > 1:
        shown = ", ".join(p.name for p in weights[:8]) + (" ..." if len(weights) > 8 else "")
        raise CheckpointError(
            f"{folder}: holds {len(weights)} weight files and no index to say how they fit together "
            f"({shown}). Pass one file, or add an index json ({main}.index.json with a weight_map)."
        )
    return None


def _open_folder(folder: Path) -> Checkpoint:
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot list this folder ({exc})") from exc
    chosen = _pick(folder, files, "model.safetensors", (".safetensors",))
    if chosen is not None:
        ignored = _weight_files(files, TORCH_SUFFIXES)
        if ignored:
            warnings.warn(
                f"{folder} holds weights in two formats: using {chosen.name} (safetensors) and ignoring "
                f"{', '.join(p.name for p in ignored)}. Delete the files you do not want to silence this.",
                MixedFormatWarning,
                stacklevel=3,
            )
        return _open_file(chosen, folder=folder, ignored=ignored, given=folder)
    chosen = _pick(folder, files, "pytorch_model.bin", TORCH_SUFFIXES)
    if chosen is not None:
        return _open_file(chosen, folder=folder, given=folder)
    if not files:
        found = "it is empty"
    else:
        shown = ", ".join(p.name for p in files[:10]) + (
            f" and {len(files) - 10} more" if len(files) > 10 else ""
        )
        found = f"it holds {shown}"
    raise CheckpointError(
        f"{folder}: no weight files found ({found}). Expected model.safetensors, sharded "
        "model-0000x-of-0000y.safetensors with model.safetensors.index.json, pytorch_model.bin, "
        "or one .safetensors/.bin/.pt/.pth file."
    )


def load_into(model: torch.nn.Module, source: str | os.PathLike | Mapping | Checkpoint) -> torch.nn.Module:
    """Load a checkpoint's tensors into ``model`` (in place, returned), strictly: every
    parameter and buffer present with its shape, nothing left over. A mismatch is a
    CheckpointError that names the file, the first keys missing / unexpected / misshapen and
    the usual cause (another architecture or other options), and leaves ``model`` unchanged."""
    ckpt = open_checkpoint(source)
    where = str(ckpt.path) if ckpt.path is not None else "the state_dict"
    try:
        expected = model.state_dict()
        missing = [k for k in expected if k not in ckpt]
        unexpected = [k for k in ckpt if k not in expected]
        misshapen = [
            f"{k} {tuple(ckpt.shape(k))} (model {tuple(expected[k].shape)})"
            for k in expected
            if k in ckpt and tuple(ckpt.shape(k)) != tuple(expected[k].shape)
        ]
        if missing or unexpected or misshapen:
            parts = [
                f"{label} {len(keys)}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                for label, keys in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("shape differs", misshapen),
                )
                if keys
            ]
            raise CheckpointError(
                f"{where} does not fit the {type(model).__name__} it is loaded into ("
                + "; ".join(parts)
                + "): is it another architecture, or the same one with other options (width, classes)?"
            )
        model.load_state_dict({k: ckpt[k] for k in expected})
    finally:
        if ckpt is not source:
            ckpt.close()
    return model
