"""``modelfuse bench``: the summary table, JSON, --list, refusals, --resume/--force and the report hook."""

from __future__ import annotations

import json
import statistics
import sys
import types

import pytest

from modelfuse.cli import main


@pytest.fixture(autouse=True)
def no_report(monkeypatch):
    """The report module (another part of modelfuse) is out of these tests unless one puts it back."""
    monkeypatch.setitem(sys.modules, "modelfuse.bench.report", None)


def _bench(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_shows_mean_and_std_over_seeds_and_the_failures(write_suite, tmp_path, capsys, calls):
    out = tmp_path / "out"
    code, text, _ = _bench(capsys, write_suite(), "--out", str(out), "--seeds", "3")
    assert code == 0
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 3 * 4 and calls["toy_wide"] == 3
    accs = [100 * r["metrics"]["accuracy"] for r in records if r["name"] == "wide (16)"]
    mean = sum(accs) / 3
    std = (sum((a - mean) ** 2 for a in accs) / 2) ** 0.5
    row = next(line for line in text.splitlines() if "wide (16)" in line)
    assert f"{mean:.2f} ± {std:.2f}" in row and "baseline" in row and "131" in row and "3/3" in row
    assert "mean ± std over 3 seed(s)" in text
    fail_row = next(line for line in text.splitlines() if "toy_fail" in line and "│" in line)
    assert "0/3" in fail_row
    assert "failed: toy_fail (seed 0, 1, 2): RuntimeError: boom on purpose" in text
    assert f"results: {out}" in text


def test_json_output_and_small(write_suite, tmp_path, capsys):
    code, text, _ = _bench(capsys, write_suite(), "--out", str(tmp_path / "o"), "--small", "--json")
    assert code == 0
    data = json.loads(text)
    assert [r["name"] for r in data["results"]] == ["toy_average", "wide (16)"] * 2
    summary = {r["name"]: r for r in data["runs"][0]["summary"]}
    accs = [r["metrics"]["accuracy"] for r in data["results"] if r["name"] == "toy_average"]
    assert summary["toy_average"]["mean"] == pytest.approx(statistics.fmean(accs))
    assert data["report"] is None


def test_existing_folder_refused_then_resume_and_force(write_suite, tmp_path, capsys, calls):
    out = str(tmp_path / "out")
    assert _bench(capsys, write_suite(), "--out", out, "--seeds", "1")[0] == 0
    code, _, err = _bench(capsys, write_suite(), "--out", out, "--seeds", "1")
    assert code == 2 and "not empty" in err and "--resume" in err and "--force" in err
    calls.clear()
    assert _bench(capsys, write_suite(), "--out", out, "--seeds", "1", "--resume")[0] == 0
    assert calls == {"toy_fail": 1}  # finished methods are not rerun
    calls.clear()
    assert _bench(capsys, write_suite(), "--out", out, "--seeds", "1", "--force")[0] == 0
    assert calls == {"toy_average": 1, "toy_fail": 1, "toy_wide": 1, "toy_mean": 1}
    code, _, err = _bench(capsys, write_suite("x.yaml", suite="other"), "--out", out, "--resume")
    assert code == 2 and "holds the results of suite 'toy', not 'other'" in err


def test_several_suites_each_in_its_folder(write_suite, tmp_path, capsys):
    a, b = write_suite(), write_suite("b.yaml", suite="toy_b")
    code, text, _ = _bench(capsys, a, b, "--out", str(tmp_path / "all"), "--seeds", "1")
    assert code == 0 and "toy: mean" in text and "toy_b: mean" in text
    assert (tmp_path / "all" / "toy" / "results.json").exists()
    assert (tmp_path / "all" / "toy_b" / "results.csv").exists()


def test_bad_inputs_are_clear_errors(write_suite, capsys):
    code, _, err = _bench(capsys, "no_such_suite")
    assert code == 2 and "unknown suite 'no_such_suite'" in err and "Built-in suites:" in err
    code, _, err = _bench(capsys, write_suite(methods=[{"method": "toy_wide", "params": {"depth": 2}}]))
    assert code == 2 and "methods[0].params" in err and "Valid options: hidden" in err
    code, _, err = _bench(capsys)
    assert code == 2 and "--list" in err
    code, _, err = _bench(capsys, write_suite(), "--seeds", "0")
    assert code == 2 and "seeds must be a positive whole number" in err


def test_list_shows_suites_and_methods_with_level_and_summary(capsys):
    code, text, _ = _bench(capsys, "--list")
    assert code == 0 and "built-in suites" in text
    row = next(line for line in text.splitlines() if "toy_average" in line)
    assert "parameter" in row and "Average the members' weights." in row
    code, text, _ = _bench(capsys, "--list", "--json")
    listing = json.loads(text)
    methods = {m["method"]: m for m in listing["methods"]}
    assert methods["toy_fail"] == {"method": "toy_fail", "level": "baseline", "summary": "Always raises."}
    assert isinstance(listing["suites"], list)


def test_report_is_written_where_the_report_module_exists(write_suite, tmp_path, capsys, monkeypatch):
    seen = {}

    def write_report(results, out_dir):
        seen["names"] = [r["name"] for r in results]
        seen["out"] = out_dir
        path = out_dir / "report.html"
        path.write_text("<html></html>")
        return path

    monkeypatch.setitem(
        sys.modules, "modelfuse.bench.report", types.SimpleNamespace(write_report=write_report)
    )
    out = tmp_path / "out"
    code, text, _ = _bench(capsys, write_suite(), "--out", str(out), "--seeds", "1", "--small")
    assert code == 0 and seen == {"names": ["toy_average", "wide (16)"], "out": out}
    assert f"report: {out / 'report.html'}" in text
