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
