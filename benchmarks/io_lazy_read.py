"""Lazy checkpoint access versus loading everything: wall time and peak RSS, side by side.

Builds a sharded safetensors checkpoint (default ~1 GB, float32) and a sharded PyTorch
``.bin`` copy in a temporary folder, then runs each way of getting ONE tensor's values in
its own subprocess and reports wall seconds and peak RSS growth over the process's RSS
right after its imports (VmHWM from /proc):

- modelfuse ``open_checkpoint`` + keys + shapes + ``get(one)`` (safetensors and .bin);
- ``safetensors.torch.load_file`` of every shard (what a load-everything tool does);
- ``torch.load(weights_only=True)`` of every .bin shard without mmap.

Run: ``.venv/bin/python benchmarks/io_lazy_read.py [--gb 1.0]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PEAK = textwrap.dedent(
    """
    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    """
)

CASES = {
    "modelfuse lazy (safetensors)": """
        from modelfuse.io import open_checkpoint
        ck = open_checkpoint(ROOT / "st")
        shapes = [ck.shape(k) for k in ck.keys()]
        value = ck.get(ONE)
    """,
    "modelfuse lazy (.bin, mmap)": """
        from modelfuse.io import open_checkpoint
        ck = open_checkpoint(ROOT / "bin")
        shapes = [ck.shape(k) for k in ck.keys()]
        value = ck.get(ONE)
    """,
    "safetensors load_file (all shards)": """
        from safetensors.torch import load_file
        state = {}
        for f in sorted((ROOT / "st").glob("*.safetensors")):
            state.update(load_file(f))
        value = state[ONE]
    """,
    "torch.load weights_only (all .bin shards)": """
        state = {}
        for f in sorted((ROOT / "bin").glob("*.bin")):
            state.update(torch.load(f, weights_only=True))
        value = state[ONE]
    """,
}


def build(root: Path, gb: float) -> str:
    import torch

    from modelfuse.io import CheckpointWriter

    n_tensors = max(2, int(gb * 1e9 / (4096 * 4096 * 4)))  # 64 MiB float32 tensors
    names = [f"model.layers.{i}.mlp.weight" for i in range(n_tensors)] + ["model.norm.weight"]
    gen = torch.Generator().manual_seed(0)
    with CheckpointWriter(root / "st", max_shard_size="500MB", drop_cache=True) as w:  # as before
        for name in names[:-1]:
            w.add(name, torch.randn(4096, 4096, generator=gen))
        w.add(names[-1], torch.ones(1024 * 1024))  # the 4 MB tensor we read
    # a sharded .bin copy, one shard per safetensors shard
    from safetensors.torch import load_file

    (root / "bin").mkdir()
    weight_map = {}
    for i, f in enumerate(sorted((root / "st").glob("*.safetensors"))):
        shard = f"pytorch_model-{i + 1:05d}.bin"
        part = load_file(f)
        torch.save(part, root / "bin" / shard)
        weight_map.update(dict.fromkeys(part, shard))
        del part
    (root / "bin" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return names[-1]


def run_case(code: str, root: Path, one: str) -> tuple[float, float]:
    script = (
        PEAK
        + textwrap.dedent(
            f"""
        import time, torch, modelfuse.io, safetensors.torch
        from pathlib import Path
        ROOT, ONE = Path({str(root)!r}), {one!r}
        base = peak_mb()
        start = time.perf_counter()
        """
        )
        + textwrap.dedent(code)
        + textwrap.dedent(
            """
        assert float(value.sum()) == value.numel()
        print(time.perf_counter() - start, peak_mb() - base)
        """
        )
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    seconds, growth = map(float, out.stdout.split())
    return seconds, growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (default 1.0)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        one = build(root, args.gb)
        size = sum(f.stat().st_size for f in (root / "st").iterdir())
        print(
            f"checkpoint: {size / 1e9:.2f} GB in {len(list((root / 'st').glob('*.safetensors')))} "
            f"safetensors shards (+ .bin copy), built in {time.perf_counter() - start:.1f} s"
        )
        print(f"{'case':45s} {'seconds':>9s} {'peak RSS growth MB':>19s}")
        for name, code in CASES.items():
            seconds, growth = run_case(code, root, one)
            print(f"{name:45s} {seconds:9.3f} {growth:19.1f}")


if __name__ == "__main__":
    main()
