"""Process-wide settings are explicit options: the Python API leaves the process alone, the
command line asks for them; and one shard-size default everywhere."""

from __future__ import annotations

import gc
import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modelfuse.errors import ConfigError
from tests.merge.conftest import write_ties_recipe


def _recipe(family, tmp_path) -> Path:
    return write_ties_recipe(tmp_path, family[0])


def _spy_process_settings(monkeypatch):
    calls = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(("threads", n)), real_set(n))[1])
    real_freeze = gc.freeze
    monkeypatch.setattr(gc, "freeze", lambda: (calls.append(("freeze",)), real_freeze())[1])
    return calls


def test_api_merge_leaves_torch_threads_and_gc_alone(family, tmp_path, monkeypatch):
    from modelfuse.merge import api

    threads, frozen = torch.get_num_threads(), gc.get_freeze_count()
    calls = _spy_process_settings(monkeypatch)
    out = api.merge(_recipe(family, tmp_path), tmp_path / "out", progress=False)
    assert calls == []
    assert torch.get_num_threads() == threads and gc.get_freeze_count() == frozen
    assert (out / "model.safetensors").is_file()


def test_merge_state_dicts_leaves_the_process_alone(family, monkeypatch):
    from modelfuse.merge import merge_state_dicts

    _, states = family
    threads = torch.get_num_threads()
    calls = _spy_process_settings(monkeypatch)
    merged = merge_state_dicts("linear", [states["ft1"], states["ft2"]])
    assert calls == [] and torch.get_num_threads() == threads
    want = (states["ft1"]["lm_head.weight"] + states["ft2"]["lm_head.weight"]) / 2
    torch.testing.assert_close(merged["lm_head.weight"], want)


@pytest.mark.parametrize("setting", [2, "1", "auto"])
def test_asked_settings_hold_during_the_run_and_are_restored(family, tmp_path, monkeypatch, setting):
    from modelfuse.merge import api
    from modelfuse.merge.methods import _kernels

    monkeypatch.setattr(_kernels, "cores", lambda: 3)
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    seen = []
    real_add = __import__("modelfuse.io.writer", fromlist=["CheckpointWriter"]).CheckpointWriter.add

    def add(self, name, tensor):
        seen.append((torch.get_num_threads(), gc.get_freeze_count() > 0))
        return real_add(self, name, tensor)

    from modelfuse.io import writer

    monkeypatch.setattr(writer.CheckpointWriter, "add", add)
    try:
        api.merge(
            _recipe(family, tmp_path), tmp_path / "out", progress=False, torch_threads=setting, freeze_gc=True
        )
        want = {2: 2, "1": 1, "auto": 2}[setting]  # auto: one core fewer than the 3 cores
        assert seen and all(s == (want, True) for s in seen)
        assert torch.get_num_threads() == 4 and gc.get_freeze_count() == 0
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, "many", "2.5", True])
def test_bad_thread_counts_are_config_errors(bad):
    from modelfuse.merge.executor import resolve_torch_threads

    with pytest.raises(ConfigError, match="torch threads"):
        resolve_torch_threads(bad)


@pytest.mark.parametrize(
    "argv, threads, drop",
    [
        ([], "auto", True),
        (["--threads", "3"], 3, True),
        (["--keep-cache"], "auto", False),
        (["--threads", "auto", "--drop-cache"], "auto", True),
    ],
)
def test_cli_flags_reach_the_executor(family, tmp_path, monkeypatch, argv, threads, drop):
    from modelfuse.cli import main
    from modelfuse.merge import executor

    got = {}
    real = executor.write_merge

    def spy(plan, out, **kw):
        got.update(kw)
        return real(plan, out, **kw)

    monkeypatch.setattr(executor, "write_merge", spy)
    out = tmp_path / "out"
    assert main(["-q", "merge", str(_recipe(family, tmp_path)), "-o", str(out), *argv]) == 0
    assert got["torch_threads"] == threads and got["drop_cache"] is drop and got["freeze_gc"] is True
    assert set(load_file(out / "model.safetensors")) == set(family[1]["base"])


def test_cli_rejects_a_bad_thread_count(family, tmp_path, capsys):
    from modelfuse.cli import main

    assert main(["merge", str(_recipe(family, tmp_path)), "-o", str(tmp_path / "o"), "--threads", "0"]) == 2
    assert "torch threads" in capsys.readouterr().err


def test_cli_cache_flags_exclude_each_other(capsys):
    from modelfuse.cli import main

    with pytest.raises(SystemExit):
        main(["merge", "r.yaml", "-o", "x", "--drop-cache", "--keep-cache"])
    assert "not allowed with" in capsys.readouterr().err


def test_one_shard_size_default_everywhere():
    """API, executor, writer, command line and README all name ``io.DEFAULT_SHARD_SIZE``
    (5 * 10^9 bytes, mergekit's 5B)."""
    from modelfuse import io
    from modelfuse.cli import build_parser
    from modelfuse.io.writer import parse_size
    from modelfuse.merge import api, executor

    assert parse_size(io.DEFAULT_SHARD_SIZE) == 5 * 10**9
    defaults = [
        inspect.signature(api.merge).parameters["out_shard_size"].default,
        inspect.signature(executor.write_merge).parameters["out_shard_size"].default,
        inspect.signature(io.CheckpointWriter).parameters["max_shard_size"].default,
        inspect.signature(io.write_checkpoint).parameters["max_shard_size"].default,
    ]
    assert all(d is io.DEFAULT_SHARD_SIZE for d in defaults)
    args = build_parser().parse_args(["merge", "r.yaml", "-o", "x"])
    assert args.out_shard_size == io.DEFAULT_SHARD_SIZE
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"default {io.DEFAULT_SHARD_SIZE}" in readme
