"""Merging base + 3 fine-tunes of a ~1 GB sharded checkpoint stays far below the models' size in RSS."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from modelfuse.io import CheckpointWriter

SHAPE = (2048, 4096)  # 32 MiB float32 tensors
LAYERS = 32  # 32 x 32 MiB = 1 GiB per model

MEASURE = r"""
import json, os, resource, sys
import torch


def peak_mib():
    # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's RSS at fork)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


after_torch = peak_mib()
from modelfuse.merge import merge

merge(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"after_torch": after_torch, "peak": peak_mib()}))
"""


@pytest.mark.slow
def test_merge_of_four_1gb_models_stays_under_1gb_of_rss(tmp_path):
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(LAYERS)]
    folders = {}
    for m, name in enumerate(["base", "ft1", "ft2", "ft3"]):
        folders[name] = tmp_path / name
        with CheckpointWriter(folders[name], max_shard_size="300MB") as writer:
            for i, tensor_name in enumerate(names):
                g = torch.Generator().manual_seed(1000 * m + i)
                writer.add(tensor_name, torch.randn(SHAPE, generator=g) * (1.0 if m == 0 else 0.01))
            writer.write_json("config.json", {"model_type": "llama", "num_hidden_layers": LAYERS})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "merge_method": "ties",
                "base_model": str(folders["base"]),
                "models": [
                    {"model": str(folders[f"ft{i}"]), "parameters": {"density": 0.3}} for i in (1, 2, 3)
                ],
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(recipe), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    grown = report["peak"] - report["after_torch"]
    print(f"merge of 4 x 1 GiB: peak RSS {report['peak']:.0f} MiB, {grown:.0f} MiB above import torch")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) >= 1
    assert grown * 2**20 < 1e9, f"peak RSS grew {grown:.0f} MiB above the post-import RSS (limit: 1 GB)"
    shutil.rmtree(tmp_path, ignore_errors=True)
