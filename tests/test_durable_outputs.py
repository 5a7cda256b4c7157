"""Outputs are durable before they are reported: every file of an output and its folder are
fsynced before the atomic rename that publishes it, and the parent folder after it.

The order of the calls is recorded in-process (``os.fsync`` / ``os.rename`` / ``os.replace``
patched) and in a real ``modelfuse`` process (a ``sitecustomize.py`` on PYTHONPATH logs the
same calls to a file), and a CLI process killed right after it reports success leaves
complete files behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modelfuse
from modelfuse._durable import atomic_file
from modelfuse.io import CheckpointWriter, write_checkpoint
from tests.merge.conftest import llama_state, write_model, write_ties_recipe

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")

SRC = Path(modelfuse.__file__).resolve().parents[1]


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def calls(monkeypatch):
    """The fsyncs (by path) and renames of this process, in order."""
    log: list[tuple[str, ...]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        real_fsync(fd)
        log.append(("fsync", _path_of(fd)))

    def rename(src, dst, *a, **kw):
        real_rename(src, dst, *a, **kw)
        log.append(("rename", os.fspath(src), os.fspath(dst)))

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        log.append(("rename", os.fspath(src), os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return log


def check_durable(log: list[tuple[str, ...]], target: Path) -> None:
    """The rename that publishes ``target`` comes after an fsync of every file the output now
    holds (under its temporary name) and of the temporary folder itself; the parent folder is
    fsynced after it."""
    target = Path(os.path.realpath(target))
    publish = [i for i, e in enumerate(log) if e[0] == "rename" and Path(os.path.realpath(e[2])) == target]
    assert len(publish) == 1, f"one rename onto {target} expected, found {[log[i] for i in publish]}"
    at = publish[0]
    tmp = Path(os.path.realpath(log[at][1]))
    before = {Path(e[1]) for e in log[:at] if e[0] == "fsync"}
    after = {Path(e[1]) for e in log[at + 1 :] if e[0] == "fsync"}
    if target.is_dir():
        files = [p.relative_to(target) for p in target.rglob("*") if p.is_file()]
        assert files, "an empty output"
        missing = [str(rel) for rel in files if tmp / rel not in before]
        assert not missing, f"not fsynced before the rename: {missing}"
        folders = [p.relative_to(target) for p in target.rglob("*") if p.is_dir()]
        assert tmp in before, "the output folder itself was not fsynced before the rename"
        assert all(tmp / rel in before for rel in folders)
    else:
        assert tmp in before, f"{target} was not fsynced before the rename"
    assert target.parent in after, "the parent folder was not fsynced after the rename"


def _family(root: Path) -> dict[str, Path]:
    base = llama_state(0)
    states = {"base": base, **{f"ft{i}": llama_state(i, base=base, scale=0.1) for i in (1, 2)}}
    return {name: write_model(root / name, sd) for name, sd in states.items()}


def _recipe(root: Path, paths: dict[str, Path]) -> Path:
    return write_ties_recipe(root, paths)


def check_complete(out: Path, names: set[str]) -> None:
    """Every file of a merge output is whole: shards load, JSON parses, the index names them."""
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    found: set[str] = set()
    for shard in shards:
        found |= set(load_file(shard))
    assert found == names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == names and set(index["weight_map"].values()) == {s.name for s in shards}
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        json.loads((out / name).read_text())
    assert "ties" in (out / "README.md").read_text()


def test_api_merge_fsyncs_every_file_and_the_folder_before_the_rename(tmp_path, calls):
    from modelfuse.merge import merge

    paths = _family(tmp_path)
    out = merge(_recipe(tmp_path, paths), tmp_path / "out", out_shard_size=2000, progress=False)
    check_durable(calls, out)
    check_complete(out, set(load_file(paths["base"] / "model.safetensors")))


def test_replacing_an_output_is_durable_too(tmp_path, calls):
    target = tmp_path / "deep" / "er" / "out"
    write_checkpoint({"a": torch.zeros(3)}, target)
    calls.clear()
    write_checkpoint({"a": torch.ones(3), "b": torch.ones(700)}, target, force=True, max_shard_size=100)
    check_durable(calls, target)
    assert torch.equal(load_file(next(target.glob("*00001*.safetensors")))["a"], torch.ones(3))


def test_buffered_writer_with_extra_files_and_single_files(tmp_path, calls):
    """The buffered writer (fuse-features' path: tensors, recipe.yaml, metrics.json), a
    single .safetensors file, and the dataset cache's atomic files."""
    out = tmp_path / "fused"
    with CheckpointWriter(out, max_shard_size=64) as w:
        for i in range(4):
            w.add(f"w{i}", torch.full((20,), float(i)))
        w.write_text("recipe.yaml", "fusion: concat\n")
        w.write_json("metrics.json", {"accuracy": 0.5})
        w.write_text("sub/notes.txt", "nested")
    check_durable(calls, out)
    assert json.loads((out / "metrics.json").read_text()) == {"accuracy": 0.5}

    calls.clear()
    single = write_checkpoint({"a": torch.arange(5.0)}, tmp_path / "one.safetensors")
    check_durable(calls, single)

    calls.clear()
    with atomic_file(tmp_path / "cache" / "data.bin") as tmp:
        tmp.write_bytes(b"12345")
    check_durable(calls, tmp_path / "cache" / "data.bin")
    assert (tmp_path / "cache" / "data.bin").read_bytes() == b"12345"


SITECUSTOMIZE = textwrap.dedent(
    """
    import os

    _log = open(os.environ["MODELFUSE_CALL_LOG"], "a", buffering=1)
    _fsync, _rename, _replace = os.fsync, os.rename, os.replace


    def fsync(fd):
        _fsync(fd)
        _log.write("fsync\\t" + os.readlink("/proc/self/fd/%d" % fd) + "\\n")


    def rename(src, dst, *a, **kw):
        _rename(src, dst, *a, **kw)
        _log.write("rename\\t%s\\t%s\\n" % (os.fspath(src), os.fspath(dst)))


    def replace(src, dst, *a, **kw):
        _replace(src, dst, *a, **kw)
        _log.write("rename\\t%s\\t%s\\n" % (os.fspath(src), os.fspath(dst)))


    os.fsync, os.rename, os.replace = fsync, rename, replace
    """
)


def _cli_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(SRC)]),
        "MODELFUSE_CALL_LOG": str(log),
    }
    return env, log


def test_cli_merge_process_fsyncs_before_the_rename(tmp_path):
    paths = _family(tmp_path)
    env, log = _cli_env(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "modelfuse", "-q", "merge", str(_recipe(tmp_path, paths)), "-o", str(out)]
    done = subprocess.run([*cmd, "--out-shard-size", "2000"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("merged ")
    calls = [tuple(line.split("\t")) for line in log.read_text().splitlines()]
    check_durable(calls, out)
    check_complete(out, set(load_file(paths["base"] / "model.safetensors")))


def test_cli_killed_right_after_success_leaves_complete_files(tmp_path):
    paths = _family(tmp_path)
    env, _ = _cli_env(tmp_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "modelfuse", "-q", "merge", str(_recipe(tmp_path, paths)), "-o", str(out)]
    proc = subprocess.Popen([*cmd, "--out-shard-size", "2000"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("merged "), line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    check_complete(out, set(load_file(paths["base"] / "model.safetensors")))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")], (
        "a temporary output was left"
    )


def test_cli_fast_exit_waits_for_running_writes(tmp_path):
    """``modelfuse``'s exit (``os._exit``, skipping torch's teardown) first joins the
    non-daemon threads, as a normal exit does: a write still running on one completes, and
    what was printed is flushed."""
    done = tmp_path / "late.txt"
    script = textwrap.dedent(
        f"""
        import sys, threading, time
        from modelfuse import cli

        def late_write():
            time.sleep(0.5)
            with open({str(done)!r}, "w") as f:
                f.write("complete")

        def main():
            threading.Thread(target=late_write).start()
            print("reported", end="")  # no newline: only a flush writes it out
            return 3

        cli.main = main
        cli.run()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "reported"
    assert done.read_text() == "complete"


def test_fuse_features_output_is_durable(tmp_path, calls):
    """``modelfuse fuse-features``: model, recipe.yaml and metrics.json fsynced before the rename."""
    import yaml

    from modelfuse.cli import main
    from modelfuse.io import save_state_dict
    from modelfuse.zoo import build_pool

    pool = build_pool("cnn", "digits", k=2, epochs=1, cache=False, progress=False)
    for i, m in enumerate(pool.members):
        save_state_dict(m, tmp_path / f"cnn{i}.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "branches": [
                    {
                        "name": n,
                        "model": "cnn",
                        "weights": str(tmp_path / f"cnn{i}.safetensors"),
                        "tap": "features",
                    }
                    for i, n in enumerate("ab")
                ],
                "fuse": "concat",
                "data": {"name": "digits"},
                "train": {"epochs": 1, "seed": 0},
            }
        )
    )
    calls.clear()
    out = tmp_path / "fused"
    assert main(["-q", "fuse-features", str(recipe), "-o", str(out), "--json"]) == 0
    check_durable(calls, out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.safetensors", "recipe.yaml"]
    json.loads((out / "metrics.json").read_text())
