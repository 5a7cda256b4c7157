"""The benchmark report: ``report.html`` (self-contained) and ``report.md`` from result records.

Input: the runner's result records (one dict per suite, seed and display name; see the record
format in ``_api.py`` and the runner). :func:`summarize` groups them into one :class:`MethodSummary`
per (suite, display name), in the order the records first name them; :func:`render_markdown` and
:func:`render_html` turn the summaries into a document; :func:`write_report` writes both files
atomically into a folder.

Per suite the report shows a table of every method: mean +/- std over the seeds where the method
ran (``ok`` records) of accuracy, NLL and per-task accuracies (``accuracy/<task>``) where present,
the fused model's parameter count, fusion time and inference time; the best method (highest mean
accuracy among methods that ran) is marked; any other metric a method reports goes into a second
table ("Other metrics"); failed runs are listed with their errors. The std is
the sample standard deviation (:func:`statistics.stdev`); with a single seed it is 0.

The HTML page needs no network and no JavaScript: inline CSS, plots as PNG ``data:`` URIs drawn
with matplotlib's Agg canvas. A plot is drawn only when its data exists:

- ``accuracy``: accuracy per method, bars with std error bars, coloured by fusion level;
- ``lambda_sweep``, ``barrier``, ``members``: one curve per method with that series
  (see :data:`modelfuse.bench.SERIES`), averaged over seeds at each x;
- ``params``: accuracy against the fused model's parameter count (log x), a point per method.

The markdown file holds the same tables and failure lists (its plots are in the HTML page).
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelfuse._durable import atomic_file
from modelfuse.bench._api import LEVELS, SERIES
from modelfuse.errors import ConfigError

__all__ = [
    "PLOTS",
    "MethodSummary",
    "Stat",
    "SuiteSummary",
    "render_html",
    "render_markdown",
    "summarize",
    "write_report",
]

#: the plots of a suite, by the name the HTML page gives them (``data-plot`` of their <figure>)
PLOTS = {
    "accuracy": "accuracy per method (mean +/- std over seeds), coloured by fusion level",
    "lambda_sweep": SERIES["lambda_sweep"],
    "barrier": SERIES["barrier"],
    "members": SERIES["members"],
    "params": "accuracy against the fused model's parameter count (log scale)",
}

_STATUSES = ("ok", "failed")
_REQUIRED = ("suite", "seed", "name", "status")

# one colour per fusion level (matplotlib's tab10), grey for a level the report does not know
_LEVEL_COLOURS = dict(
    zip(
        LEVELS,
        ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"),
        strict=True,
    )
)
_OTHER_COLOUR = "#bcbd22"


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for one value) of one figure over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        vals = [float(v) for v in values]
        if not vals:
            return None
        return cls(statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))


@dataclass
class MethodSummary:
    """One method (display name) of one suite, over its seeds."""

    suite: str
    name: str
    method: str
    level: str
    seeds_ok: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)  # (seed, error)
    notes: list[tuple[int, str]] = field(default_factory=list)  # (seed, what the method said of its run)
    accuracy: Stat | None = None
    nll: Stat | None = None
    tasks: dict[str, Stat] = field(default_factory=dict)  # task -> accuracy
    other: dict[str, Stat] = field(default_factory=dict)  # any other metric a method reports
    parameters: Stat | None = None
    fusion_s: Stat | None = None
    inference_ms: Stat | None = None
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # mean over seeds at each x
    best: bool = False

    @property
    def ran(self) -> bool:
        """At least one seed finished (``ok``)."""
        return bool(self.seeds_ok)


@dataclass
class SuiteSummary:
    suite: str
    methods: list[MethodSummary]

    @property
    def tasks(self) -> list[str]:
        seen: dict[str, None] = {}
        for m in self.methods:
            seen.update(dict.fromkeys(m.tasks))
        return list(seen)

    @property
    def has_nll(self) -> bool:
        return any(m.nll is not None for m in self.methods)

    @property
    def best(self) -> MethodSummary | None:
        return next((m for m in self.methods if m.best), None)


# ----------------------------------------------------------------------------------------- summary


def _check(records: Sequence[Mapping[str, Any]]) -> None:
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise ConfigError(
            f"the report needs a list of result records (dicts); found {type(records).__name__}"
        )
    if not records:
        raise ConfigError(
            "the report needs at least one result record; found an empty list (run a suite first)"
        )
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ConfigError(f"result record {i}: expected a dict, found {type(rec).__name__}")
        missing = [k for k in _REQUIRED if k not in rec]
        if missing:
            raise ConfigError(
                f"result record {i} ({rec.get('suite', '?')}/{rec.get('name', '?')}): missing field(s) "
                f"{', '.join(missing)}; every record needs {', '.join(_REQUIRED)} (see the runner's record format)"
            )
        if rec["status"] not in _STATUSES:
            raise ConfigError(
                f"result record {i} ({rec['suite']}/{rec['name']}, seed {rec['seed']}): field 'status' must be "
                f"one of {', '.join(_STATUSES)}; found {rec['status']!r}"
            )
        metrics = rec.get("metrics") or {}
        if not isinstance(metrics, Mapping):
            raise ConfigError(
                f"result record {i} ({rec['suite']}/{rec['name']}): field 'metrics' must be a dict of "
                f"name -> number; found {type(metrics).__name__}"
            )
        for key, value in metrics.items():
            if value is not None and not isinstance(value, (int, float)):
                raise ConfigError(
                    f"result record {i} ({rec['suite']}/{rec['name']}): metric {key!r} must be a number; "
                    f"found {value!r}"
                )
        for key, curve in (rec.get("series") or {}).items():
            if not isinstance(curve, Sequence) or any(
                not isinstance(p, Sequence) or len(p) != 2 for p in curve
            ):
                raise ConfigError(
                    f"result record {i} ({rec['suite']}/{rec['name']}): series {key!r} must be a list of "
                    f"[x, y] points; found {curve!r:.80}"
                )


def _finite(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean_curve(curves: list[list[Sequence[float]]]) -> list[tuple[float, float]]:
    """The curves of several seeds as one: the mean y at each x (over the seeds that have that x)."""
    by_x: dict[float, list[float]] = {}
    for curve in curves:
        for x, y in curve:
            if y is not None and math.isfinite(float(y)):
                by_x.setdefault(float(x), []).append(float(y))
    return [(x, statistics.mean(ys)) for x, ys in sorted(by_x.items())]


def summarize(results: Sequence[Mapping[str, Any]]) -> list[SuiteSummary]:
    """Group result records by suite and display name (in the order they first appear) into
    summaries over seeds, and mark each suite's best method. Bad records raise :class:`ConfigError`."""
    _check(results)
    suites: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for rec in results:
        suites.setdefault(str(rec["suite"]), {}).setdefault(str(rec["name"]), []).append(rec)
    out = []
    for suite, by_name in suites.items():
        methods = []
        for name, recs in by_name.items():
            first = recs[0]
            ok = [r for r in recs if r["status"] == "ok"]
            m = MethodSummary(
                suite=suite,
                name=name,
                method=str(first.get("method") or name),
                level=str(first.get("level") or "?"),
                seeds_ok=sorted(int(r["seed"]) for r in ok),
                failures=sorted(
                    (int(r["seed"]), str(r.get("error") or "failed (no error recorded)"))
                    for r in recs
                    if r["status"] == "failed"
                ),
                notes=sorted((int(r["seed"]), str(r["notes"])) for r in ok if r.get("notes")),
            )
            metrics = [r.get("metrics") or {} for r in ok]
            m.accuracy = Stat.of(_finite(mt.get("accuracy") for mt in metrics))
            m.nll = Stat.of(_finite(mt.get("nll") for mt in metrics))
            task_names = dict.fromkeys(k for mt in metrics for k in mt if k.startswith("accuracy/"))
            for key in task_names:
                stat = Stat.of(_finite(mt.get(key) for mt in metrics))
                if stat is not None:
                    m.tasks[key.split("/", 1)[1]] = stat
            other_names = dict.fromkeys(
                k
                for mt in metrics
                for k in mt
                if k not in ("accuracy", "nll") and not k.startswith("accuracy/")
            )
            for key in other_names:
                stat = Stat.of(_finite(mt.get(key) for mt in metrics))
                if stat is not None:
                    m.other[key] = stat
            m.parameters = Stat.of(_finite(r.get("parameters") for r in ok))
            m.fusion_s = Stat.of(_finite(r.get("fusion_s") for r in ok))
            m.inference_ms = Stat.of(_finite(r.get("inference_ms") for r in ok))
            series_names = dict.fromkeys(k for r in ok for k in (r.get("series") or {}))
            for key in series_names:
                curve = _mean_curve([r["series"][key] for r in ok if (r.get("series") or {}).get(key)])
                if curve:
                    m.series[key] = curve
            methods.append(m)
        ranked = [m for m in methods if m.ran and m.accuracy is not None]
        if ranked:
            max(ranked, key=lambda m: m.accuracy.mean).best = True  # first of equals wins
        out.append(SuiteSummary(suite, methods))
    return out


# ----------------------------------------------------------------------------------------- format


def _pct(stat: Stat | None) -> str:
    return "–" if stat is None else f"{100 * stat.mean:.2f} ± {100 * stat.std:.2f}"


def _num(stat: Stat | None, digits: int) -> str:
    return "–" if stat is None else f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def _params(stat: Stat | None) -> str:
    if stat is None:
        return "–"
    return f"{round(stat.mean):,}" if stat.std == 0 else f"{stat.mean:,.0f} ± {stat.std:,.0f}"


def _mean_only(stat: Stat | None, digits: int) -> str:
    return "–" if stat is None else f"{stat.mean:.{digits}f}"


def _columns(suite: SuiteSummary) -> list[str]:
    cols = ["method", "level", "seeds", "accuracy (%)"]
    if suite.has_nll:
        cols.append("NLL")
    cols += [f"acc. {t} (%)" for t in suite.tasks]
    cols += ["parameters", "fusion time (s)", "inference (ms/batch)"]
    return cols


def _cells(suite: SuiteSummary, m: MethodSummary) -> list[str]:
    """The table cells of one method, as plain text (the name without the best mark)."""
    total = len(m.seeds_ok) + len(m.failures)
    seeds = f"{len(m.seeds_ok)}/{total}"
    cells = [m.name, m.level, seeds, _pct(m.accuracy)]
    if suite.has_nll:
        cells.append(_num(m.nll, 4))
    cells += [_pct(m.tasks.get(t)) for t in suite.tasks]
    cells += [_params(m.parameters), _num(m.fusion_s, 3), _mean_only(m.inference_ms, 3)]
    return cells


def _other_rows(suite: SuiteSummary) -> list[tuple[str, str, str, str]]:
    """(method, metric, "mean ± std", seeds) of every metric outside the main table."""
    return [
        (m.name, key, f"{st.mean:.4g} ± {st.std:.2g}", str(st.n))
        for m in suite.methods
        for key, st in m.other.items()
    ]


# ----------------------------------------------------------------------------------------- markdown


def _md_escape(text: str) -> str:
    """``text`` safe in a markdown table cell or list item: HTML escaped (markdown passes raw HTML
    through), pipes, stars and backslashes escaped, one line."""
    text = html.escape(text, quote=False).replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*")
    return " ".join(text.splitlines())


def render_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """The report as markdown: per suite its table (best method in bold, marked "(best)") and its failures."""
    suites = summarize(results)
    lines = ["# modelfuse benchmark report", ""]
    lines.append("Mean ± sample standard deviation over the seeds where each method ran (seeds: ran/total).")
    lines.append("Plots: see report.html.")
    for suite in suites:
        lines += ["", f"## Suite `{suite.suite}`", ""]
        cols = _columns(suite)
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(cols) - 3)) + "|")
        for m in suite.methods:
            cells = [_md_escape(c) for c in _cells(suite, m)]
            if m.best:
                cells[0] = f"**{cells[0]}** (best)"
            lines.append("| " + " | ".join(cells) + " |")
        best = suite.best
        lines += [
            "",
            f"Best: {_md_escape(best.name)} ({_pct(best.accuracy)} %)."
            if best
            else "Best: none (no method that ran reports an accuracy).",
        ]
        other = _other_rows(suite)
        if other:
            lines += [
                "",
                "Other metrics:",
                "",
                "| method | metric | mean ± std | seeds |",
                "|---|---|---:|---:|",
            ]
            lines += [f"| {_md_escape(n)} | {_md_escape(k)} | {v} | {c} |" for n, k, v, c in other]
        failures = [(m, seed, err) for m in suite.methods for seed, err in m.failures]
        if failures:
            lines += ["", "Failed:", ""]
            lines += [f"- {_md_escape(m.name)} (seed {seed}): {_md_escape(err)}" for m, seed, err in failures]
        notes = [(m, seed, note) for m in suite.methods for seed, note in m.notes]
        if notes:
            lines += ["", "Notes (what each method said of its run):", ""]
            lines += [f"- {_md_escape(m.name)} (seed {seed}): {_md_escape(note)}" for m, seed, note in notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", pad_inches=0.1, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colour(level: str) -> str:
    return _LEVEL_COLOURS.get(level, _OTHER_COLOUR)


def _level_legend(ax, levels: Iterable[str]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=_colour(lv), label=lv) for lv in dict.fromkeys(levels)]
    ax.legend(
        handles=handles,
        title="level",
        fontsize=8,
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )


def _plot_accuracy(suite: SuiteSummary) -> str | None:
    rows = [m for m in suite.methods if m.accuracy is not None]
    if not rows:
        return None
    fig = _figure(max(5.0, 0.55 * len(rows) + 2.0), 3.8)
    ax = fig.subplots()
    xs = range(len(rows))
    ax.bar(
        xs,
        [100 * m.accuracy.mean for m in rows],
        yerr=[100 * m.accuracy.std for m in rows],
        color=[_colour(m.level) for m in rows],
        capsize=3,
        edgecolor=["black" if m.best else "none" for m in rows],
        linewidth=1.5,
    )
    ax.set_xticks(list(xs), [m.name for m in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    low = min(100 * (m.accuracy.mean - m.accuracy.std) for m in rows)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_title(f"{suite.suite}: accuracy per method (best outlined)")
    _level_legend(ax, (m.level for m in rows))
    return _png(fig)


# series -> x label, y label, title, factor on y (accuracies are fractions, shown in %)
_CURVE_LABELS = {
    "lambda_sweep": ("scaling λ", "average accuracy (%)", "task-arithmetic λ sweep", 100.0),
    "barrier": ("interpolation t (0 = A, 1 = B)", "test loss", "loss along the interpolation path", 1.0),
    "members": ("ensemble members", "accuracy (%)", "accuracy vs number of members", 100.0),
}


def _plot_series(suite: SuiteSummary, key: str) -> str | None:
    rows = [m for m in suite.methods if m.series.get(key)]
    if not rows:
        return None
    xlabel, ylabel, title, factor = _CURVE_LABELS[key]
    fig = _figure()
    ax = fig.subplots()
    for m in rows:
        xs, ys = zip(*m.series[key], strict=True)
        ax.plot(xs, [factor * y for y in ys], marker="o", markersize=3, label=m.name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{suite.suite}: {title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _plot_params(suite: SuiteSummary) -> str | None:
    rows = [
        m
        for m in suite.methods
        if m.accuracy is not None and m.parameters is not None and m.parameters.mean > 0
    ]
    if not rows:
        return None
    fig = _figure()
    ax = fig.subplots()
    for m in rows:
        ax.errorbar(
            m.parameters.mean,
            100 * m.accuracy.mean,
            yerr=100 * m.accuracy.std,
            fmt="o",
            color=_colour(m.level),
            capsize=3,
        )
        ax.annotate(
            m.name,
            (m.parameters.mean, 100 * m.accuracy.mean),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.margins(x=0.25)
    ax.set_xlabel("parameters of the fused model")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{suite.suite}: accuracy vs size")
    ax.grid(alpha=0.3, which="both")
    _level_legend(ax, (m.level for m in rows))
    return _png(fig)


def _plots(suite: SuiteSummary) -> dict[str, str]:
    """Plot name -> PNG data URI, only for the plots whose data exists, in :data:`PLOTS` order."""
    drawn = {
        "accuracy": _plot_accuracy(suite),
        **{key: _plot_series(suite, key) for key in _CURVE_LABELS},
        "params": _plot_params(suite),
    }
    return {k: v for k, v in drawn.items() if v is not None}


# ----------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 72em;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .9em; margin: 1em 0; }
table th, table td { border: 1px solid #ccc; padding: .3em .6em; }
table th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.summary tr.best { background: #e8f5e9; font-weight: 600; }
table.summary tr.failed { color: #999; }
span.badge { background: #2e7d32; color: white; border-radius: .3em; padding: 0 .4em; font-size: .8em;
             margin-left: .4em; }
td.level { white-space: nowrap; }
span.level { display: inline-block; width: .8em; height: .8em; border-radius: .2em; margin-right: .3em;
             vertical-align: middle; }
ul.failures li { color: #b71c1c; } ul.failures code { white-space: pre-wrap; }
figure.plot { display: inline-block; margin: .5em; vertical-align: top; }
figure.plot img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure.plot figcaption { font-size: .85em; color: #555; }
p.note { color: #555; font-size: .9em; }
"""


def render_html(results: Sequence[Mapping[str, Any]], *, title: str = "modelfuse benchmark report") -> str:
    """The report as one self-contained HTML page (inline CSS, plots as PNG data URIs, no script)."""
    suites = summarize(results)
    e = html.escape
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="note">Written {e(stamp)}. Mean ± sample standard deviation over the seeds where each '
        "method ran (seeds: ran/total); the best method (highest mean accuracy) is marked.</p>",
    ]
    for suite in suites:
        sid = "suite-" + "".join(c if c.isalnum() else "-" for c in suite.suite)
        out.append(f'<section class="suite" id="{e(sid)}" data-suite="{e(suite.suite)}">')
        out.append(f"<h2>Suite <code>{e(suite.suite)}</code></h2>")
        cols = _columns(suite)
        out.append('<table class="summary">')
        out.append("<thead><tr>" + "".join(f'<th scope="col">{e(c)}</th>' for c in cols) + "</tr></thead>")
        out.append("<tbody>")
        for m in suite.methods:
            cells = _cells(suite, m)
            cls = "best" if m.best else ("failed" if not m.ran else "")
            row = [
                f'<tr class="{cls}" data-method="{e(m.name)}">',
                f'<th scope="row" class="method">{e(cells[0])}'
                + ('<span class="badge">best</span>' if m.best else "")
                + "</th>",
                f'<td class="level"><span class="level" style="background:{_colour(m.level)}"></span>{e(cells[1])}</td>',
            ]
            row += [f'<td class="num">{e(c)}</td>' for c in cells[2:]]
            out.append("".join(row) + "</tr>")
        out.append("</tbody></table>")
        other = _other_rows(suite)
        if other:
            out.append("<h3>Other metrics</h3>")
            out.append('<table class="other">')
            out.append(
                '<thead><tr><th scope="col">method</th><th scope="col">metric</th>'
                '<th scope="col">mean ± std</th><th scope="col">seeds</th></tr></thead><tbody>'
            )
            out += [
                f'<tr data-method="{e(n)}"><td>{e(n)}</td><td>{e(k)}</td><td class="num">{e(v)}</td>'
                f'<td class="num">{e(c)}</td></tr>'
                for n, k, v, c in other
            ]
            out.append("</tbody></table>")
        failures = [(m, seed, err) for m in suite.methods for seed, err in m.failures]
        if failures:
            out.append("<h3>Failed</h3>")
            out.append('<ul class="failures">')
            out += [
                f'<li data-method="{e(m.name)}">{e(m.name)} (seed {seed}): <code>{e(err)}</code></li>'
                for m, seed, err in failures
            ]
            out.append("</ul>")
        notes = [(m, seed, note) for m in suite.methods for seed, note in m.notes]
        if notes:
            out.append("<h3>Notes</h3>")
            out.append('<ul class="notes">')
            out += [
                f'<li data-method="{e(m.name)}">{e(m.name)} (seed {seed}): {e(note)}</li>'
                for m, seed, note in notes
            ]
            out.append("</ul>")
        for key, uri in _plots(suite).items():
            caption = PLOTS[key]
            out.append(
                f'<figure class="plot" data-plot="{e(key)}"><img src="{uri}" alt="{e(suite.suite)}: {e(caption)}">'
                f"<figcaption>{e(caption)}</figcaption></figure>"
            )
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_report(results: Sequence[Mapping[str, Any]], out_dir: str | Path) -> Path:
    """Write ``report.html`` and ``report.md`` into ``out_dir`` (created), each atomically (a whole
    file or the previous one, never a truncated one); returns the path of ``report.html``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"the report folder {out_dir} is a file; give a folder (it is created if missing)")
    page = render_html(results)
    text = render_markdown(results)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    with atomic_file(md_path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    with atomic_file(html_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return html_path
