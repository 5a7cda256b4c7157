"""``modelfuse demo``: the tour of all six levels end to end (in-process, fresh cache), its table
against the records it wrote, and its refusal of folders that are not its own (its run time is
measured by benchmarks/demo_time.py, not asserted here)."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch

from modelfuse.bench.results import RESULTS_JSON
from modelfuse.cli import main
from modelfuse.cli.demo import DEMO_MARKER, DEMO_SUITES, run_demo
from modelfuse.errors import OutputExistsError

LEVELS = ("output", "feature", "structure", "parameter", "activation", "loss")
ROW = re.compile(r"^│\s*(\w*)\s*│\s*(.+?)\s*│\s*(\w+)\s*│\s*([\d.]+)\s*│\s*([\d.]+K?M?)\s*│\s*([\d.]+)\s*│$")


def read_json(path):
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else data["results"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `modelfuse demo` through the command's entry point, fresh cache, torch at 3 threads
    before it; the captured stdout, the output folder and the thread count after it."""
    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("MODELFUSE_CACHE", str(root / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    import contextlib
    import io

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            code = main(["demo", "--out", str(root / "out")])
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return code, buffer.getvalue(), root / "out", after


@pytest.mark.slow
def test_demo_prints_a_row_per_method_at_all_six_levels_and_the_report(demo_run):
    code, printed, out, threads_after = demo_run
    assert code == 0, printed
    assert threads_after == 3  # the demo's one thread is restored afterwards
    rows = [m.groups() for line in printed.splitlines() if (m := ROW.match(line))]
    # every method of every suite, each with its accuracy as results.json in that suite's folder holds it
    expected = []
    for suite in DEMO_SUITES:
        records = read_json(out / suite / RESULTS_JSON)
        assert {r["seed"] for r in records} == {0} and all(r["status"] == "ok" for r in records), records
        expected += [(r["name"], r["level"], 100 * r["metrics"]["accuracy"]) for r in records]
    assert len(rows) == len(expected), printed
    for (_, name, level, acc, _, _), (e_name, e_level, e_acc) in zip(rows, expected):
        assert (name, level) == (e_name, e_level)
        assert float(acc) == pytest.approx(e_acc, abs=0.006)
    assert [r[0] for r in rows if r[0]] == list(DEMO_SUITES)  # a section per suite, in order
    assert set(LEVELS) <= {r[2] for r in rows}
    for level in LEVELS:  # a level's accuracy is a real accuracy (chance on digits is 10%, mtl's mean ~33%)
        assert max(float(r[3]) for r in rows if r[2] == level) > 50.0, level
    # it ends with the path of the report, which exists and shows every method
    last = printed.strip().splitlines()[-1]
    assert last.startswith("report: ")
    report = out.resolve() / "report.html"
    assert last == f"report: {report}" and report.is_file()
    page = html.unescape(report.read_text())
    assert all(name in page for _, name, *_ in expected)
    assert (out / DEMO_MARKER).is_file()


@pytest.mark.slow
def test_demo_rerun_replaces_its_results_and_reuses_the_pools(demo_run, tmp_path, monkeypatch):
    _, _, out, _ = demo_run
    monkeypatch.setenv("MODELFUSE_CACHE", str(out.parent / "cache"))
    cache_files = sorted(p for p in (out.parent / "cache").rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in cache_files}
    before = read_json(out / "seeds" / RESULTS_JSON)
    result = run_demo(out, progress=False)
    # the methods ran again (fresh records: the folder was started over), the pools came from the cache
    after = read_json(out / "seeds" / RESULTS_JSON)
    assert [r["name"] for r in after] == [r["name"] for r in before]
    assert [r["fusion_s"] for r in after] != [r["fusion_s"] for r in before]
    assert sorted(p for p in (out.parent / "cache").rglob("*") if p.is_file()) == cache_files
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert len(result.records) == sum(len(read_json(out / s / RESULTS_JSON)) for s in DEMO_SUITES)
    assert result.report == out / "report.html"


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(
        OutputExistsError, match=r"non-empty folder that an earlier demo did not make .*name a new"
    ):
        run_demo(theirs, progress=False)
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]  # untouched
    # through the command: exit 2 and the message, nothing written
    assert main(["demo", "--out", str(theirs)]) == 2
    assert "did not make" in capsys.readouterr().err
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


def test_demo_refuses_a_file_as_out(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file, not a folder"):
        run_demo(path, progress=False)
    assert path.read_text() == "x"


def test_demo_help_names_only_its_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and all(s in text for s in DEMO_SUITES)
    for gone in ("--members", "--epochs", "--seed", "--no-cache"):
        assert gone not in text
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--members", "3"])
    assert exit_.value.code == 2


def test_demo_runs_each_suite_small_on_one_thread_and_restores_the_count(tmp_path, monkeypatch):
    import modelfuse.bench.runner as runner

    calls = []

    def fake_run_suite(suite, **kw):
        calls.append((suite, torch.get_num_threads(), kw))
        if suite == "tasks":
            raise RuntimeError("boom")
        return []

    monkeypatch.setattr(runner, "run_suite", fake_run_suite)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run_demo(tmp_path / "out", progress=False)
        assert torch.get_num_threads() == 2  # restored although a suite raised
    finally:
        torch.set_num_threads(threads)
    assert [c[0] for c in calls] == ["seeds", "features", "tasks"]
    for suite, n, kw in calls:
        assert n == 1
        assert kw == {
            "seeds": 1,
            "out": tmp_path / "out" / suite,
            "force": True,
            "small": True,
            "progress": False,
        }


@pytest.mark.slow
def test_the_readme_shows_the_demo_table_as_a_run_prints_it(demo_run):
    """The README's demo table is one run's output: every column but the time must be what this
    run (fresh cache, fixed seeds, one thread) prints."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### The demo", 1)[1].split("\n## ", 1)[0]
    shown = [m.groups()[:5] for line in section.splitlines() if (m := ROW.match(line))]
    _, printed, _, _ = demo_run
    ran = [m.groups()[:5] for line in printed.splitlines() if (m := ROW.match(line))]
    assert shown and shown == ran
