"""Every command and Python example that README.md shows must work as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_and_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = blocks("python")
    assert code, "README.md shows no Python example"
    # the Python examples run first: they create the files that the commands inspect
    for block in code:
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    commands = [
        line.strip()
        for block in blocks("bash")
        for line in block.splitlines()
        if line.strip().startswith("modelfuse ")
    ]
    assert len(commands) >= 3, commands
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        out = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, f"README command failed: {command}\n{out.stderr}"


def test_readme_merge_recipe_and_commands_run(tmp_path, monkeypatch):
    """The recipe and the merge commands of the README, on tiny models in the folders it names."""
    from tests.merge.conftest import llama_state, write_model

    monkeypatch.chdir(tmp_path)
    (recipe,) = blocks("yaml")
    (tmp_path / "recipe.yaml").write_text(recipe)
    base = llama_state(0)
    for i, folder in enumerate(sorted(set(re.findall(r"\./([\w-]+)", recipe)))):
        write_model(tmp_path / folder, llama_state(i + 1, base=base, scale=0.1) if folder != "base" else base)
    commands = [
        line.split("#")[0].strip()
        for block in blocks("text")
        for line in block.splitlines()
        if line.startswith("modelfuse merge ") and "RECIPE" not in line and "MODEL..." not in line
    ]
    assert len(commands) >= 4, commands
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in commands:
        out = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, f"README command failed: {command}\n{out.stderr}"
    assert (tmp_path / "merged" / "model.safetensors").exists()
