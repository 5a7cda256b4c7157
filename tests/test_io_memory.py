"""Opening a big checkpoint and reading one tensor must not read the rest.

A ~2 GB sharded safetensors checkpoint (and a ~0.5 GB sharded .bin one) is written
tensor by tensor, then a fresh Python process opens it, lists every name and shape,
reads one 4 MB tensor and reports how much its peak resident memory grew beyond
what the imports alone took.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modelfuse.io import CheckpointWriter

MB = 1024 * 1024
BIG = (4096, 4096)  # 64 MiB of float32
PROBE = "probe.weight"
PROBE_SHAPE = (1024, 1024)  # 4 MiB of float32

MEASURE = r"""
import json, os, resource, sys
import torch
import safetensors
import modelfuse.io as mio


def peak_kib():
    # VmHWM is this process's own high-water mark. ru_maxrss also counts the RSS this
    # process inherited at fork from its parent (the pytest process), which would hide growth.
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


base = peak_kib()
ck = mio.open_checkpoint(sys.argv[1])
names = list(ck.keys())
shapes = {name: ck.shape(name) for name in names}
if len(sys.argv) > 3:  # stream every tensor, holding one at a time
    for name in names:
        value = ck.get(name)
        del value
tensor = ck.get(sys.argv[2])
expected = torch.arange(tensor.numel(), dtype=torch.float32).reshape(tensor.shape)
ok = bool(torch.equal(tensor, expected))
grown = peak_kib() - base
print(json.dumps({"grown_kib": grown, "count": len(names), "ok": ok, "shape": list(shapes[sys.argv[2]])}))
"""


def big_tensor(i: int) -> torch.Tensor:
    return torch.full(BIG, float(i))


def probe() -> torch.Tensor:
    return torch.arange(PROBE_SHAPE[0] * PROBE_SHAPE[1], dtype=torch.float32).reshape(PROBE_SHAPE)


def measure(path: Path, *extra: str) -> dict:
    """Run MEASURE in a fresh process; its report says how far peak RSS grew past the imports."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), PROBE, *extra], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def scratch(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)  # do not keep gigabytes in pytest's kept tmp dirs


@pytest.fixture(scope="module")
def big_safetensors(tmp_path_factory):
    """A ~2.1 GB checkpoint in >= 4 safetensors shards, written one 64 MiB tensor at a time."""
    scratch = tmp_path_factory.mktemp("big")
    names = [f"layers.{i}.weight" for i in range(32)]
    names.insert(17, PROBE)
    layout = {name: (PROBE_SHAPE if name == PROBE else BIG, torch.float32) for name in names}
    target = scratch / "big"
    with CheckpointWriter(target, max_shard_size="500MB") as writer:
        writer.declare(layout)
        for i, name in enumerate(names):  # one 64 MiB tensor alive at a time
            writer.add(name, probe() if name == PROBE else big_tensor(i))
    shards = sorted(target.glob("*.safetensors"))
    assert len(shards) >= 4
    assert sum(p.stat().st_size for p in shards) > 2 * 10**9
    yield target
    shutil.rmtree(scratch, ignore_errors=True)


def test_sharded_safetensors_reads_one_tensor_only(big_safetensors):
    report = measure(big_safetensors)
    assert report["ok"] and report["count"] == 33 and report["shape"] == list(PROBE_SHAPE)
    assert report["grown_kib"] < 50 * 1024, f"peak RSS grew by {report['grown_kib'] / 1024:.1f} MiB"


def test_streaming_every_tensor_holds_one_at_a_time(big_safetensors):
    # reads are positional (no memory map), so pages of tensors already read are not kept
    report = measure(big_safetensors, "all")
    print(f"streamed 2.1 GB: peak RSS grew by {report['grown_kib'] / 1024:.1f} MiB")
    assert report["ok"]
    assert report["grown_kib"] < 200 * 1024, f"peak RSS grew by {report['grown_kib'] / 1024:.1f} MiB"


def test_sharded_bin_reads_one_tensor_only(scratch):
    folder = scratch / "bin"
    folder.mkdir()
    groups = [["a.0", "a.1"], ["b.0", PROBE, "b.1"], ["c.0", "c.1"], ["d.0", "d.1"]]
    weight_map = {}
    for i, group in enumerate(groups):
        shard = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        torch.save({n: probe() if n == PROBE else big_tensor(i) for n in group}, folder / shard)
        weight_map.update(dict.fromkeys(group, shard))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert sum(p.stat().st_size for p in folder.glob("*.bin")) > 500 * MB

    report = measure(folder)
    assert report["ok"] and report["count"] == 9 and report["shape"] == list(PROBE_SHAPE)
    assert report["grown_kib"] < 50 * 1024, f"peak RSS grew by {report['grown_kib'] / 1024:.1f} MiB"
