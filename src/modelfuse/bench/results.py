"""Result records of a suite run: reading and writing the output folder, and the summary over seeds.

One record per (suite, seed, display name), a JSON object::

    {"suite", "seed", "name", "method", "level", "params", "pool", "status": "ok" | "failed",
     "error": None | "Type: message", "metrics": {...}, "parameters": int | None,
     "inference_ms": float | None, "fusion_s": float, "series": {name: [[x, y], ...]},
     "notes": str, "recipe": {...}, "recipe_hash": str}

The folder holds ``results.json`` (the list of records), ``results.csv`` (one row a record,
metrics flattened to one column each) and ``suite.yaml`` (the suite as it ran), each replaced
atomically (:func:`modelfuse._durable.atomic_file`) so that a crash leaves the previous version.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from modelfuse.data._cache import atomic_write
from modelfuse.errors import OutputError

__all__ = [
    "CSV_COLUMNS",
    "RESULTS_CSV",
    "RESULTS_JSON",
    "SUITE_YAML",
    "read_results",
    "summarize",
    "write_results",
]

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
SUITE_YAML = "suite.yaml"

#: the record fields of results.csv, in order (``params`` as JSON); metric columns follow, sorted
CSV_COLUMNS = (
    "suite", "seed", "name", "method", "level", "status", "error", "parameters",
    "inference_ms", "fusion_s", "params", "notes", "recipe_hash",
)  # fmt: skip

#: fields every record has (checked when a folder is read back)
REQUIRED = ("suite", "seed", "name", "method", "status", "recipe_hash")


def _finite(x: Any) -> Any:
    """NaN and infinities as None (JSON has no such numbers)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_results(folder: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Write ``results.json`` and ``results.csv`` of ``records`` into ``folder``, each atomically."""
    folder = Path(folder)
    text = json.dumps(list(records), indent=1, default=repr)

    def write_json(tmp: Path) -> None:
        tmp.write_text(text + "\n", encoding="utf-8")

    metrics = sorted({k for r in records for k in (r.get("metrics") or {})})

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow([*CSV_COLUMNS, *metrics])
            for r in records:
                row = [json.dumps(r.get(c), default=repr) if c == "params" else r.get(c) for c in CSV_COLUMNS]
                row += [_finite((r.get("metrics") or {}).get(m)) for m in metrics]
                writer.writerow(["" if v is None else v for v in row])

    atomic_write(folder / RESULTS_JSON, write_json)
    atomic_write(folder / RESULTS_CSV, write_csv)


def read_results(folder: str | Path) -> list[dict[str, Any]]:
    """The records in ``folder/results.json`` ([] where there is none); a damaged file is an OutputError."""
    file = Path(folder) / RESULTS_JSON
    if not file.exists():
        return []
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(
            f"{file}: cannot read the results ({exc}); name another --out, or pass --force to start over"
        ) from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise OutputError(f"{file}: expected a list of result records; pass --force to start over")
    for i, r in enumerate(records):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise OutputError(
                f"{file}: record {i} lacks {', '.join(missing)}: not a modelfuse bench result; "
                "name another --out, or pass --force to start over"
            )
    return records


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; 0 for one value); None for no value."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: Iterable[dict[str, Any]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """One row per (suite, display name), in first-seen order: ``metric`` mean and std over the seeds
    where the method ran (``ok`` seeds; sample std, 0 for one seed), mean parameter count, fusion time
    and inference time, the seeds ok and failed, and the errors of the failed ones (``seed: error``)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["suite"], r["name"]), []).append(r)
    rows = []
    for (suite, name), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        values = [float(v) for r in ok if (v := (r.get("metrics") or {}).get(metric)) is not None]
        mean, std = _mean_std([v for v in values if math.isfinite(v)])
        params = [r["parameters"] for r in ok if r.get("parameters") is not None]
        rows.append(
            {
                "suite": suite,
                "name": name,
                "method": rs[0]["method"],
                "level": rs[0].get("level"),
                "metric": metric,
                "mean": mean,
                "std": std,
                "parameters": round(statistics.fmean(params)) if params else None,
                "fusion_s": _mean_std([float(r["fusion_s"]) for r in ok if r.get("fusion_s") is not None])[0],
                "inference_ms": _mean_std(
                    [float(r["inference_ms"]) for r in ok if r.get("inference_ms") is not None]
                )[0],
                "seeds_ok": [r["seed"] for r in ok],
                "seeds_failed": [r["seed"] for r in rs if r["status"] != "ok"],
                "errors": [f"seed {r['seed']}: {r.get('error')}" for r in rs if r["status"] != "ok"],
            }
        )
    return rows
