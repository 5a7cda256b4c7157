"""Streaming writes with and without write-behind (``CheckpointWriter(drop_cache=...)``, ``_WriteBehind``).

Writes one ~0.9 GB float32 checkpoint through ``CheckpointWriter`` in streaming mode
(declared layout, 16 MiB tensors), alternately with the write-behind on (each range's
write-back started at once, its pages dropped from the page cache 64 MiB later) and off
(the data left in the page cache), deleting the previous output and pausing between runs,
as merges run one after another. Prints wall and CPU seconds (user + system) per run and
the medians.

Run: ``.venv/bin/python benchmarks/write_behind.py [--repeat 3] [--pause 3] [--dir /tmp]``
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from modelfuse.io.writer import CheckpointWriter

TENSOR = 4 * 2**20  # float32 entries per tensor: 16 MiB
COUNT = 56  # tensors: 0.94 GB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_once(target: Path, data: torch.Tensor, behind: bool) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    with CheckpointWriter(target, force=True, drop_cache=behind) as w:
        w.declare({f"t{i}": ((TENSOR,), torch.float32) for i in range(COUNT)})
        for i in range(COUNT):
            w.add(f"t{i}", data)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between runs")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    data = torch.randn(TENSOR)
    work = Path(tempfile.mkdtemp(prefix="modelfuse-write-behind-", dir=args.dir))
    results: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    try:
        for _ in range(args.repeat):
            for mode in ("off", "on"):
                target = work / f"out-{mode}.safetensors"
                target.unlink(missing_ok=True)
                time.sleep(args.pause)
                wall, cpu = write_once(target, data, behind=mode == "on")
                results[mode].append((wall, cpu))
                print(f"write-behind {mode:3}: {wall:5.2f} s wall, {cpu:5.2f} s CPU", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = TENSOR * 4 * COUNT / 1e9
    for mode in ("off", "on"):
        wall = statistics.median(r[0] for r in results[mode])
        cpu = statistics.median(r[1] for r in results[mode])
        print(f"median, write-behind {mode:3}: {wall:.2f} s wall, {cpu:.2f} s CPU for {gb:.2f} GB")


if __name__ == "__main__":
    main()
