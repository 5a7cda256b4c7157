"""The benchmark report (modelfuse.bench.report) from hand-made result records.

Every figure the tests expect is computed here from the records with the statistics module
(mean, sample stdev), and the best method is found here, independently of the report's code.
"""

from __future__ import annotations

import base64
import html
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest

from modelfuse.bench.report import render_html, render_markdown, summarize, write_report
from modelfuse.errors import ConfigError

EVIL = "<script>alert('x')</script> & co"


def _record(
    suite,
    seed,
    name,
    level,
    status="ok",
    *,
    method=None,
    metrics=None,
    parameters=None,
    fusion_s=0.5,
    inference_ms=1.25,
    series=None,
    error=None,
):
    return {
        "suite": suite,
        "seed": seed,
        "name": name,
        "method": method or name,
        "level": level,
        "params": {},
        "pool": {"members": 3},
        "status": status,
        "error": error,
        "metrics": metrics or {},
        "parameters": parameters,
        "inference_ms": inference_ms if status == "ok" else None,
        "fusion_s": fusion_s,
        "series": series or {},
        "notes": "",
        "recipe": {"seed": seed},
        "recipe_hash": f"h{seed}",
    }


# suite "seeds": three seeds; an ensemble with a members curve and NLL, naive and aligned averages
# with barrier curves, a method that fails on every seed, one that fails on one seed only, and a
# method with a hostile name (escaping).
SEEDS_ACC = {
    "mean_prob": [0.91, 0.93, 0.92],
    "average (naive)": [0.31, 0.12, 0.25],
    "average (weight matching)": [0.84, 0.88, 0.81],
    "flaky": [0.70, 0.74],  # seeds 0 and 2; seed 1 failed
    EVIL: [0.5, 0.6, 0.55],
}
MIDPOINT = {"average (naive)": [0.1, 0.15, 0.2], "average (weight matching)": [0.8, 0.7, 0.75]}
SEEDS_NLL = {"mean_prob": [0.30, 0.25, 0.28]}
SEEDS_PARAMS = {
    "mean_prob": 3 * 1000,
    "average (naive)": 1000,
    "average (weight matching)": 1000,
    "flaky": 1000,
}
LEVEL = {
    "mean_prob": "output",
    "average (naive)": "parameter",
    "average (weight matching)": "parameter",
    "flaky": "structure",
    EVIL: "feature",
    "broken": "activation",
}

# suite "tasks": merges with per-task accuracies, task arithmetic with a lambda sweep, no NLL,
# no parameter counts (so no size plot), two seeds
TASKS = ("odd", "small")
TASKS_ACC = {
    "task arithmetic": {"odd": [0.8, 0.7], "small": [0.6, 0.9]},
    "ties": {"odd": [0.85, 0.75], "small": [0.65, 0.95]},
    "average": {"odd": [0.5, 0.6], "small": [0.55, 0.45]},
}

# suite "nothing": every method failed: a table, a failure list, no plot, no best
NOTHING_ERRORS = {"a": "RuntimeError: CUDA out of memory", "b": "ValueError: shapes <3> & <4>"}


def make_records() -> list[dict]:
    recs = []
    for seed in range(3):
        for name, accs in SEEDS_ACC.items():
            if name == "flaky" and seed == 1:
                recs.append(
                    _record(
                        "seeds",
                        seed,
                        name,
                        LEVEL[name],
                        "failed",
                        error="AlignmentError: no permutation <found> for layer 'fc'",
                    )
                )
                continue
            acc = accs[seed if name != "flaky" else (0 if seed == 0 else 1)]
            metrics = {"accuracy": acc}
            if name.startswith("average ("):
                metrics["midpoint_accuracy"] = MIDPOINT[name][seed]
            if name in SEEDS_NLL:
                metrics["nll"] = SEEDS_NLL[name][seed]
            series = {}
            if name == "mean_prob":
                series["members"] = [[1, 0.85 + 0.01 * seed], [2, 0.89], [3, acc]]
            if name.startswith("average ("):
                series["barrier"] = [
                    [0.0, 0.3],
                    [0.5, 2.0 if "naive" in name else 0.5 + 0.1 * seed],
                    [1.0, 0.31],
                ]
            recs.append(
                _record(
                    "seeds",
                    seed,
                    name,
                    LEVEL[name],
                    metrics=metrics,
                    parameters=SEEDS_PARAMS.get(name),
                    fusion_s=0.1 * (seed + 1),
                    series=series,
                )
            )
        recs.append(
            _record(
                "seeds",
                seed,
                "broken",
                LEVEL["broken"],
                "failed",
                error=f"RuntimeError: broken on seed {seed} <&>",
            )
        )
    for seed in range(2):
        for name, per_task in TASKS_ACC.items():
            metrics = {f"accuracy/{t}": per_task[t][seed] for t in TASKS}
            metrics["accuracy"] = statistics.mean(per_task[t][seed] for t in TASKS)
            series = {}
            if name == "task arithmetic":
                series["lambda_sweep"] = [[0.1 * k, 0.5 + 0.02 * k + 0.01 * seed] for k in range(1, 11)]
            recs.append(
                _record("tasks", seed, name, "parameter", metrics=metrics, series=series, fusion_s=1.0 + seed)
            )
    for name, err in NOTHING_ERRORS.items():
        recs.append(_record("nothing", 0, name, "output", "failed", error=err))
    return recs


def _pct(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def _expected_accuracies() -> dict[str, dict[str, list[float]]]:
    """suite -> display name -> accuracies of the seeds where it ran, from the records."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in make_records():
        bucket = out.setdefault(r["suite"], {}).setdefault(r["name"], [])
        if r["status"] == "ok":
            bucket.append(r["metrics"]["accuracy"])
    return out


def _expected_best() -> dict[str, str | None]:
    best = {}
    for suite, by_name in _expected_accuracies().items():
        ran = {n: statistics.mean(v) for n, v in by_name.items() if v}
        best[suite] = max(ran, key=ran.get) if ran else None
    return best


# ----------------------------------------------------------------------------------------- markdown


def _md_tables(text: str) -> dict[str, list[list[str]]]:
    """suite -> rows (header first) of its (first) markdown table, split by hand on unescaped pipes, cells unescaped."""
    tables: dict[str, list[list[str]]] = {}
    suite, done = None, True
    for line in text.splitlines():
        m = re.match(r"## Suite `(.+)`", line)
        if m:
            suite, done = m.group(1), False
            tables[suite] = []
        elif not done and tables[suite] and not line.startswith("|"):
            done = True  # the suite's first table ended
        elif not done and line.startswith("| "):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            tables[suite].append(
                [html.unescape(c.strip().replace("\\|", "|").replace("\\*", "*")) for c in cells]
            )
    return tables


def test_markdown_table_holds_mean_and_std_over_seeds():
    text = render_markdown(make_records())
    tables = _md_tables(text)
    assert list(tables) == ["seeds", "tasks", "nothing"]

    header, *rows = tables["seeds"]
    assert header == [
        "method",
        "level",
        "seeds",
        "accuracy (%)",
        "NLL",
        "parameters",
        "fusion time (s)",
        "inference (ms/batch)",
    ]
    by_name = {r[0].removeprefix("**").split("** (best)")[0]: r for r in rows}
    assert list(by_name) == [*SEEDS_ACC, "broken"]  # order of first appearance
    for name, accs in SEEDS_ACC.items():
        row = by_name[name]
        assert row[1] == LEVEL[name]
        assert row[2] == f"{len(accs)}/3"
        assert row[3] == _pct(accs)
    nll = SEEDS_NLL["mean_prob"]
    assert by_name["mean_prob"][4] == f"{statistics.mean(nll):.4f} ± {statistics.stdev(nll):.4f}"
    assert by_name["average (naive)"][4] == "–"
    assert by_name["mean_prob"][5] == "3,000"
    fusion = [0.1, 0.2, 0.3]
    assert by_name["mean_prob"][6] == f"{statistics.mean(fusion):.3f} ± {statistics.stdev(fusion):.3f}"
    flaky_fusion = [0.1, 0.3]  # the failed seed's time is not averaged in
    assert (
        by_name["flaky"][6] == f"{statistics.mean(flaky_fusion):.3f} ± {statistics.stdev(flaky_fusion):.3f}"
    )
    assert by_name["mean_prob"][7] == "1.250"
    assert by_name["broken"][2:4] == ["0/3", "–"]

    header, *rows = tables["tasks"]
    assert header == [
        "method",
        "level",
        "seeds",
        "accuracy (%)",
        "acc. odd (%)",
        "acc. small (%)",
        "parameters",
        "fusion time (s)",
        "inference (ms/batch)",
    ]
    for row in rows:
        name = row[0].removeprefix("**").split("** (best)")[0]
        per_task = TASKS_ACC[name]
        means = [statistics.mean(per_task[t][s] for t in TASKS) for s in range(2)]
        assert row[3] == _pct(means)
        assert row[4:6] == [_pct(per_task["odd"]), _pct(per_task["small"])]
        assert row[6] == "–"


def test_markdown_marks_the_best_method_and_lists_failures():
    text = render_markdown(make_records())
    tables = _md_tables(text)
    best = _expected_best()
    assert best == {"seeds": "mean_prob", "tasks": "ties", "nothing": None}
    for suite, rows in tables.items():
        marked = [r[0] for r in rows[1:] if r[0].endswith("(best)")]
        assert marked == ([f"**{best[suite]}** (best)"] if best[suite] else [])
    assert "Best: none" in text.split("## Suite `nothing`")[1]
    # failures listed with their errors, HTML-escaped (markdown renders raw HTML)
    for seed in range(3):
        assert f"- broken (seed {seed}): RuntimeError: broken on seed {seed} &lt;&amp;&gt;" in text
    assert "- flaky (seed 1): AlignmentError: no permutation &lt;found&gt; for layer 'fc'" in text
    assert "- b (seed 0): ValueError: shapes &lt;3&gt; &amp; &lt;4&gt;" in text
    assert "- a (seed 0): RuntimeError: CUDA out of memory" in text
    assert "<script>" not in text and "&lt;script&gt;alert('x')&lt;/script&gt; &amp; co" in text


def test_other_metrics_table():
    expected = [
        [name, "midpoint_accuracy", f"{statistics.mean(v):.4g} ± {statistics.stdev(v):.2g}", "3"]
        for name, v in MIDPOINT.items()
    ]
    text = render_markdown(make_records())
    section = text.split("## Suite `seeds`")[1].split("## Suite")[0]
    assert "Other metrics:" in section and "Other metrics" not in text.split("## Suite `tasks`")[1]
    rows = [line for line in section.split("Other metrics:")[1].splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | metric | mean ± std | seeds |"
    assert [[c.strip() for c in r.split("|")[1:-1]] for r in rows[1:]] == expected
    page = _parse(render_html(make_records()))
    assert page.other == {"seeds": expected, "tasks": [], "nothing": []}


def test_summary_numbers():
    suites = {s.suite: s for s in summarize(make_records())}
    m = {x.name: x for x in suites["seeds"].methods}
    accs = SEEDS_ACC["average (weight matching)"]
    stat = m["average (weight matching)"].accuracy
    assert stat.mean == pytest.approx(statistics.mean(accs)) and stat.std == pytest.approx(
        statistics.stdev(accs)
    )
    assert m["flaky"].seeds_ok == [0, 2] and [s for s, _ in m["flaky"].failures] == [1]
    assert not m["broken"].ran and m["broken"].accuracy is None
    # curves are averaged over seeds at each x
    members = m["mean_prob"].series["members"]
    assert members[0] == (1.0, pytest.approx(statistics.mean([0.85, 0.86, 0.87])))
    assert members[2] == (3.0, pytest.approx(statistics.mean(SEEDS_ACC["mean_prob"])))
    t = {x.name: x for x in suites["tasks"].methods}
    assert t["ties"].tasks["small"].mean == pytest.approx(0.8)
    assert suites["tasks"].tasks == list(TASKS)


# ----------------------------------------------------------------------------------------- html


class _Page(HTMLParser):
    """Collects what the tests look at, and checks that every non-void element is closed in order."""

    VOID = frozenset({"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.imgs: list[dict] = []
        self.figures: dict[str, list[str]] = {}  # suite -> data-plot names
        self.rows: dict[str, list[list[str]]] = {}  # suite -> body rows (cell texts)
        self.row_classes: dict[str, dict[str, str]] = {}
        self.failures: dict[str, list[str]] = {}
        self.other: dict[str, list[list[str]]] = {}  # suite -> rows of the "other metrics" table
        self._table = ""
        self.tags: set[str] = set()
        self.suite: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_tbody = False
        self._li: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "section":
            self.suite = a["data-suite"]
            self.rows[self.suite], self.figures[self.suite], self.failures[self.suite] = [], [], []
            self.row_classes[self.suite], self.other[self.suite] = {}, []
        elif tag == "table":
            self._table = a.get("class", "")
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "figure":
            self.figures[self.suite].append(a["data-plot"])
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self._row = []
            if self._table == "summary":
                self.row_classes[self.suite][a["data-method"]] = a.get("class", "")
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "li":
            self._li = []

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "tbody":
            self._in_tbody = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            (self.rows if self._table == "summary" else self.other)[self.suite].append(self._row)
            self._row = None
        elif tag == "li" and self._li is not None:
            self.failures[self.suite].append("".join(self._li))
            self._li = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._li is not None:
            self._li.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    assert not p.errors and p.stack == [], (p.errors, p.stack)
    return p


def _expected_plots(records) -> dict[str, set[str]]:
    """suite -> the plots whose data exists in the records (computed here, not by the report)."""
    out: dict[str, set[str]] = {}
    for r in records:
        plots = out.setdefault(r["suite"], set())
        if r["status"] != "ok":
            continue
        if r["metrics"].get("accuracy") is not None:
            plots.add("accuracy")
            if r["parameters"]:
                plots.add("params")
        plots.update(k for k, v in r["series"].items() if v)
    return out


def test_html_table_numbers_best_and_failures():
    page = _parse(render_html(make_records()))
    best = _expected_best()
    expected = _expected_accuracies()
    assert list(page.rows) == ["seeds", "tasks", "nothing"]
    for suite, rows in page.rows.items():
        names = list(page.row_classes[suite])  # the rows' data-method, in order
        assert names == list(expected[suite])  # every method, in order, each once
        for name, row in zip(names, rows, strict=True):
            assert row[0] == name + ("best" if name == best[suite] else "")  # the name, and the badge
            accs = expected[suite][name]
            assert row[3] == (_pct(accs) if accs else "–")
        marked = [n for n, c in page.row_classes[suite].items() if c == "best"]
        assert marked == ([best[suite]] if best[suite] else [])
    assert page.row_classes["seeds"]["broken"] == "failed"
    assert page.failures["seeds"] == [
        "flaky (seed 1): AlignmentError: no permutation <found> for layer 'fc'",
        *[f"broken (seed {s}): RuntimeError: broken on seed {s} <&>" for s in range(3)],
    ]
    assert page.failures["tasks"] == []
    assert page.failures["nothing"] == [f"{n} (seed 0): {e}" for n, e in NOTHING_ERRORS.items()]


def test_html_is_self_contained_and_escaped():
    text = render_html(make_records())
    page = _parse(text)
    assert not re.search(r"https?://", text)
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert EVIL not in text and html.escape(EVIL) in text  # the hostile name shows, escaped
    assert page.imgs
    for img in page.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width > 100 and height > 100
        assert img["alt"]


def test_every_plot_is_drawn_exactly_when_its_data_exists():
    records = make_records()
    page = _parse(render_html(records))
    expected = _expected_plots(records)
    assert expected == {
        "seeds": {"accuracy", "params", "members", "barrier"},
        "tasks": {"accuracy", "lambda_sweep"},
        "nothing": set(),
    }
    got = {suite: figs for suite, figs in page.figures.items()}
    assert {s: set(f) for s, f in got.items()} == expected
    assert all(len(f) == len(set(f)) for f in got.values())  # each plot once
    assert len(page.imgs) == sum(len(v) for v in expected.values())

    # drop the curves and the sizes: those plots go, the accuracy plots stay
    for r in records:
        r["series"] = {}
        r["parameters"] = None
    page = _parse(render_html(records))
    assert {s: set(f) for s, f in page.figures.items()} == {
        "seeds": {"accuracy"},
        "tasks": {"accuracy"},
        "nothing": set(),
    }


def test_write_report_writes_both_files_atomically(tmp_path):
    out = tmp_path / "run" / "report"
    path = write_report(make_records(), out)
    assert path == out / "report.html"
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    _parse(path.read_text(encoding="utf-8"))
    assert (out / "report.md").read_text(encoding="utf-8") == render_markdown(make_records())

    # a second report replaces the first; nothing temporary is left behind
    only_tasks = [r for r in make_records() if r["suite"] == "tasks"]
    write_report(only_tasks, out)
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.md"]
    assert "## Suite `seeds`" not in (out / "report.md").read_text(encoding="utf-8")
    assert 'data-suite="seeds"' not in path.read_text(encoding="utf-8")


def test_a_failing_render_leaves_the_old_report(tmp_path, monkeypatch):
    write_report(make_records(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import modelfuse.bench.report as report

    def boom(_fig):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "_png", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_report(make_records(), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda recs: recs.clear(), "at least one result record"),
        (lambda recs: recs[2].pop("status"), r"record 2 .*missing field\(s\) status"),
        (
            lambda recs: recs[1].update(status="done"),
            r"record 1 .*'status' must be one of ok, failed; found 'done'",
        ),
        (
            lambda recs: recs[0]["metrics"].update(accuracy="high"),
            r"record 0 .*metric 'accuracy' must be a number",
        ),
        (
            lambda recs: recs[0].update(series={"members": [[1, 2, 3]]}),
            r"series 'members' must be a list of \[x, y\]",
        ),
    ],
    ids=["empty", "missing-status", "bad-status", "bad-metric", "bad-series"],
)
def test_bad_records_are_clear_errors(mutate, match, tmp_path):
    recs = make_records()
    mutate(recs)
    with pytest.raises(ConfigError, match=match):
        write_report(recs, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half written


def test_report_folder_that_is_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        write_report(make_records(), f)
    assert Path(f).read_text() == "x"


def test_methods_notes_are_shown_per_seed_in_both_files():
    """A method's notes (e.g. "TIES below task arithmetic on this seed") reach both report files."""
    recs = [
        _record("tasks", 0, "TIES", "parameter", metrics={"accuracy": 0.8}),
        _record("tasks", 1, "TIES", "parameter", metrics={"accuracy": 0.7}),
        _record("tasks", 0, "average", "parameter", metrics={"accuracy": 0.6}),
    ]
    recs[0]["notes"] = "TIES >= task arithmetic >= simple average: no (TIES 80.0 < TA 81.0)"
    recs[1]["notes"] = f"seed note {EVIL}"
    md = render_markdown(recs)
    # markdown passes HTML through, so the report escapes it there too
    assert "- TIES (seed 0): TIES >= task arithmetic >= simple average: no (TIES 80.0 < TA 81.0)" in html.unescape(md)
    assert "(seed 1): seed note" in md and "<script>" not in md
    page = render_html(recs)
    assert "TIES (seed 0): TIES &gt;= task arithmetic &gt;= simple average: no" in page
    assert "<script>" not in page and page.count('<ul class="notes">') == 1
    assert "average (seed" not in md  # a method without notes lists none
