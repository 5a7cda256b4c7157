"""Every command and Python example that README.md shows must work as written, and every Python
example that prints must print what the "Output:" block after it shows."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def python_examples() -> list[tuple[str, str | None]]:
    """Each Python block of the README with the text of the "Output:" block right after it (None
    where there is none)."""
    text = README.read_text()
    found = []
    for m in re.finditer(r"```python\n(.*?)```\n", text, flags=re.S):
        output = re.match(r"\s*Output:\s*\n```text\n(.*?)```", text[m.end() :], flags=re.S)
        found.append((m.group(1), output.group(1) if output else None))
    return found


def output_pattern(expected: str) -> re.Pattern[str]:
    """A regex for an Output block: everything literal except ``...`` (a line of its own: any lines;
    inside a line: any text on that line) and runs of spaces (any run, for table columns)."""
    lines = []
    for line in expected.strip("\n").splitlines():
        if line.strip() == "...":
            lines.append("(?s:.*?)")
            continue
        parts = [re.escape(part) for part in line.rstrip().split("...")]
        lines.append("[^\n]*?".join(parts))
    return re.compile(re.sub(r"(?:\\ ){2,}| {2,}", " +", "\n".join(lines)))


def same_output(expected: str, printed: str) -> bool:
    text = "\n".join(line.rstrip() for line in printed.strip("\n").splitlines())
    return output_pattern(expected).fullmatch(text) is not None


def test_output_blocks_match_literally_except_for_wildcards():
    assert same_output("a ... c\n...\nend", "a b b c\nx\ny\nend")
    assert same_output("x   y", "x y")  # runs of spaces: table columns
    assert same_output("{'n': 359}", "{'n': 359}  \n")
    assert not same_output("{'n': 360}", "{'n': 359}")
    assert not same_output("0.5033...", "0.5034")
    assert not same_output("a ... c", "a b\nc")  # an inline ... stays on its line
    assert not same_output("True", "True\nFalse")


def test_readme_examples_and_commands_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    examples = python_examples()
    assert examples, "README.md shows no Python example"
    # the Python examples run first: they create the files that the commands inspect
    for number, (block, expected) in enumerate(examples, 1):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
        where = f"README.md's Python example {number} (starting {block.splitlines()[0]!r})"
        if expected is None:
            assert not printed.getvalue(), (
                f"{where} prints but no 'Output:' block follows it; add one with what it prints:\n"
                f"{printed.getvalue()}"
            )
            continue
        assert same_output(expected, printed.getvalue()), (
            f"{where} prints what its 'Output:' block does not show (`...` stands for any text)\n"
            f"--- README shows:\n{expected}--- the example printed:\n{printed.getvalue()}"
        )
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
