"""The suite schema and runner on a toy suite (tests/bench/conftest.py): records, files, resume, refusals."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch
import yaml

from modelfuse.bench import Outcome
from modelfuse.bench.results import read_results, summarize
from modelfuse.bench.runner import run_suite
from modelfuse.bench.schema import load_suite, recipe_hash
from modelfuse.errors import ConfigError, OutputError, OutputExistsError

from .conftest import TOY_SUITE, toy_pool


def test_toy_suite_end_to_end(write_suite, tmp_path, calls):
    out = tmp_path / "out"
    records = run_suite(write_suite(), out=out)
    names = [m.get("name", m["method"]) for m in TOY_SUITE["methods"]]
    assert [(r["seed"], r["name"]) for r in records] == [(s, n) for s in (0, 1) for n in names]
    by = {(r["seed"], r["name"]): r for r in records}

    # metrics recomputed here from the pool's definition: the weight average of 3 linear members
    for seed in (0, 1):
        pool = toy_pool(seed, members=3)
        x, y = pool.data
        w = sum(m.weight for m in pool.models.values()) / 3
        expected = (x @ w.T.detach()).argmax(1).eq(y).double().mean().item()
        rec = by[(seed, "toy_average")]
        assert rec["status"] == "ok" and rec["error"] is None
        assert rec["metrics"]["accuracy"] == pytest.approx(expected, abs=1e-6)
        assert rec["parameters"] == 4 * 3 + 3  # Linear(4, 3)
        assert rec["level"] == "parameter" and rec["notes"] == "mean of weights"
        assert rec["pool"] == {"members": 3, "features": 4, "classes": 3}
        assert rec["inference_ms"] > 0 and rec["fusion_s"] >= 0
        # the two-layer baseline of width 16: 4*16 + 16 + 16*3 + 3 parameters
        assert by[(seed, "wide (16)")]["parameters"] == 4 * 16 + 16 + 16 * 3 + 3
        assert by[(seed, "wide (16)")]["params"] == {"hidden": 16}
        assert by[(seed, "wide (16)")]["metrics"]["nll"] is None  # NaN is not JSON: recorded as null
        # a method without a model: no size, no speed; its series as lists of [x, y]
        mean = by[(seed, "mean of 2")]
        assert mean["parameters"] is None and mean["inference_ms"] is None
        logits = [m(x).detach() for m in list(pool.models.values())[:2]]
        first = logits[0].argmax(1).eq(y).double().mean().item()
        assert mean["series"]["members"][0] == [1.0, pytest.approx(first)]
        assert len(mean["series"]["members"]) == 2
        # the failing method is recorded and the suite went on
        fail = by[(seed, "toy_fail")]
        assert fail["status"] == "failed" and fail["error"] == "RuntimeError: boom on purpose"
        assert fail["metrics"] == {} and fail["parameters"] is None
    assert calls == {"toy_average": 2, "toy_fail": 2, "toy_wide": 2, "toy_mean": 2}

    # the recipe is the exact entry, pool and seed; the hash is that of the recipe
    rec = by[(1, "wide (16)")]
    assert rec["recipe"] == {
        "suite": "toy", "method": "toy_wide", "name": "wide (16)", "params": {"hidden": 16},
        "pool": {"builder": "toy_pool", "options": {"members": 3}}, "seed": 1,
    }  # fmt: skip
    assert rec["recipe_hash"] == recipe_hash(rec["recipe"])
    assert len({r["recipe_hash"] for r in records}) == len(records)

    # results.json holds the same records; results.csv one row each with metric columns
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(records))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(records)
    assert {"accuracy", "nll", "params", "recipe_hash"} <= set(rows[0])
    for row, r in zip(rows, records):
        assert row["name"] == r["name"] and row["status"] == r["status"] and int(row["seed"]) == r["seed"]
        acc = r["metrics"].get("accuracy")
        assert (row["accuracy"] == "") if acc is None else float(row["accuracy"]) == pytest.approx(acc)
    assert rows[1]["error"] == "RuntimeError: boom on purpose" and rows[2]["parameters"] == "131"
    # suite.yaml is the suite as it ran, loadable as a suite
    again = load_suite(out / "suite.yaml")
    assert again.suite == "toy" and again.seeds == 2 and [m.display for m in again.methods] == names


def test_small_version_and_seeds_override(write_suite, calls):
    records = run_suite(write_suite(), small=True, seeds=3)
    assert [(r["seed"], r["name"]) for r in records] == [
        (s, n) for s in range(3) for n in ("toy_average", "wide (16)")
    ]
    assert all(
        r["pool"]["members"] == 2 and r["recipe"]["pool"]["options"] == {"members": 2} for r in records
    )
    assert calls == {"toy_average": 3, "toy_wide": 3}


def test_same_seed_same_metrics_whatever_ran_before(write_suite):
    """Each method starts from the seed's RNG state: toy_wide's random init does not depend on the order."""
    alone = run_suite(write_suite(methods=[TOY_SUITE["methods"][2]], small=None), seeds=1)
    after = run_suite(write_suite("b.yaml"), seeds=1)
    assert alone[0]["metrics"] == next(r for r in after if r["name"] == "wide (16)")["metrics"]


def test_resume_skips_finished_methods(write_suite, tmp_path, calls):
    out = tmp_path / "out"
    first = run_suite(write_suite(), out=out, seeds=1)
    assert calls == {"toy_average": 1, "toy_fail": 1, "toy_wide": 1, "toy_mean": 1}
    calls.clear()
    # two seeds now: seed 0's finished methods are kept; the failed one and all of seed 1 run
    records = run_suite(write_suite(), out=out, seeds=2, resume=True)
    assert calls == {"toy_fail": 2, "toy_average": 1, "toy_wide": 1, "toy_mean": 1}
    kept = {r["name"]: r for r in records if r["seed"] == 0}
    for r in first:
        if r["status"] == "ok":
            assert kept[r["name"]] == r  # the stored record, fusion time and all
    assert len(read_results(out)) == 8
    calls.clear()
    run_suite(write_suite(), out=out, seeds=2, resume=True)
    assert calls == {"toy_fail": 2}  # only the failed method is retried


def test_interrupted_run_keeps_every_finished_method(write_suite, tmp_path, calls, monkeypatch):
    """results.json is written after every method: a crash in the third keeps the first two."""
    from modelfuse.bench import _api

    out = tmp_path / "out"

    def interrupted(pool, hidden=8):
        raise KeyboardInterrupt

    method = _api.get_bench_method("toy_wide")
    monkeypatch.setitem(
        _api._METHODS._entries, "toy_wide", type(method)(method.name, method.level, interrupted)
    )
    with pytest.raises(KeyboardInterrupt):
        run_suite(write_suite(), out=out)
    assert [r["name"] for r in read_results(out)] == ["toy_average", "toy_fail"]
    monkeypatch.undo()
    calls.clear()
    run_suite(write_suite(), out=out, resume=True, seeds=1)
    assert calls == {"toy_fail": 1, "toy_wide": 1, "toy_mean": 1}


def test_interrupted_resume_keeps_the_records_of_later_seeds(write_suite, tmp_path, monkeypatch):
    from modelfuse.bench import _api

    out = tmp_path / "out"
    run_suite(write_suite(), out=out)
    before = read_results(out)

    def fixed_then_interrupted(pool):  # seed 0's retry succeeds (and is saved), seed 1's is cut off
        if pool.seed == 1:
            raise KeyboardInterrupt
        return Outcome({"accuracy": 1.0})

    method = _api.get_bench_method("toy_fail")
    entry = type(method)(method.name, method.level, fixed_then_interrupted)
    monkeypatch.setitem(_api._METHODS._entries, "toy_fail", entry)
    with pytest.raises(KeyboardInterrupt):
        run_suite(write_suite(), out=out, resume=True)
    after = {(r["seed"], r["name"]): r for r in read_results(out)}
    for r in before:
        if r["status"] == "ok":  # every finished record, seed 1's too, is still in the file
            assert after[(r["seed"], r["name"])] == r
    assert after[(0, "toy_fail")]["status"] == "ok" and after[(1, "toy_fail")]["status"] == "failed"
    assert [(r["seed"], r["name"]) for r in read_results(out)] == [(r["seed"], r["name"]) for r in before]


def test_existing_folder_is_refused_without_resume_or_force(write_suite, tmp_path, calls):
    out = tmp_path / "out"
    run_suite(write_suite(), out=out, seeds=1)
    before = (out / "results.json").read_bytes()
    with pytest.raises(OutputExistsError, match=r"not empty.*--resume.*--force.*--out"):
        run_suite(write_suite(), out=out, seeds=1)
    assert (out / "results.json").read_bytes() == before  # nothing overwritten
    calls.clear()
    records = run_suite(
        write_suite(methods=[TOY_SUITE["methods"][0]], small=None), out=out, seeds=1, force=True
    )
    assert calls == {"toy_average": 1}  # started over: nothing kept
    assert [r["name"] for r in read_results(out)] == ["toy_average"] == [r["name"] for r in records]
    with pytest.raises(ConfigError, match="contradict"):
        run_suite(write_suite(), out=out, resume=True, force=True)


def test_resume_refuses_another_suite_or_recipe(write_suite, tmp_path):
    out = tmp_path / "out"
    run_suite(write_suite(), out=out, seeds=1)
    with pytest.raises(OutputExistsError, match=r"suite 'toy', not 'other'.*another --out.*--force"):
        run_suite(write_suite("o.yaml", suite="other"), out=out, seeds=1, resume=True)
    changed = [
        *TOY_SUITE["methods"][:2],
        {"method": "toy_wide", "name": "wide (16)", "params": {"hidden": 32}},
    ]
    with pytest.raises(OutputExistsError, match="another recipe"):
        run_suite(write_suite("c.yaml", methods=changed), out=out, seeds=1, resume=True)
    with pytest.raises(OutputExistsError, match="another recipe"):
        run_suite(
            write_suite("p.yaml", pool={"builder": "toy_pool", "options": {"members": 2}}),
            out=out,
            resume=True,
        )
    # without suite.yaml the records themselves are checked
    (out / "suite.yaml").unlink()
    with pytest.raises(OutputExistsError, match=r"'wide \(16\)' \(seed 0\) from another recipe"):
        run_suite(write_suite("c.yaml", methods=changed), out=out, seeds=1, resume=True)
    (out / "results.json").write_text("{not json")
    with pytest.raises(OutputError, match=r"results.json: cannot read.*--force"):
        run_suite(write_suite(), out=out, seeds=1, resume=True)


def test_a_failing_pool_fails_its_seed_and_the_suite_goes_on(write_suite, calls):
    records = run_suite(
        write_suite(pool={"builder": "toy_pool_odd_fails", "options": {"members": 3}}), seeds=3
    )
    assert [r["status"] for r in records if r["name"] == "toy_average"] == ["ok", "failed", "ok"]
    for r in records:
        if r["seed"] == 1:
            assert r["status"] == "failed"
            assert r["error"] == "the pool could not be built: ValueError: no pool for odd seed 1"
    assert calls == {"toy_average": 2, "toy_fail": 2, "toy_wide": 2, "toy_mean": 2}  # not called for seed 1


def test_bad_outcomes_are_recorded_as_failures(write_suite):
    methods = [
        {"method": "toy_bad_outcome", "name": w, "params": {"what": w}} for w in ("type", "metric", "model")
    ]
    records = run_suite(write_suite(methods=methods, small=None), seeds=1, progress=True)
    errors = {r["name"]: r["error"] for r in records}
    assert all(r["status"] == "failed" for r in records)
    assert errors["type"] == "TypeError: bench method 'toy_bad_outcome' returned dict, expected an Outcome"
    assert errors["metric"] == "TypeError: metric 'accuracy' is not a number (found 'high')"
    assert errors["model"] == "TypeError: Outcome.model must be a torch nn.Module; found function"


def test_summary_mean_and_sample_std_over_seeds(write_suite):
    records = run_suite(write_suite(), seeds=3)
    rows = {r["name"]: r for r in summarize(records)}
    accs = [r["metrics"]["accuracy"] for r in records if r["name"] == "wide (16)"]
    assert rows["wide (16)"]["mean"] == pytest.approx(sum(accs) / 3)
    m = sum(accs) / 3
    assert rows["wide (16)"]["std"] == pytest.approx((sum((a - m) ** 2 for a in accs) / 2) ** 0.5)
    assert rows["wide (16)"]["parameters"] == 131 and rows["wide (16)"]["seeds_ok"] == [0, 1, 2]
    assert rows["toy_fail"]["mean"] is None and rows["toy_fail"]["seeds_failed"] == [0, 1, 2]
    assert rows["toy_fail"]["errors"][0] == "seed 0: RuntimeError: boom on purpose"
    assert statistics.fmean(accs) == pytest.approx(rows["wide (16)"]["mean"])


def _error(write_suite, **changes) -> str:
    with pytest.raises(ConfigError) as info:
        load_suite(write_suite(**changes))
    return str(info.value)


def test_unknown_method_lists_the_registered_ones(write_suite):
    msg = _error(write_suite, methods=[{"method": "toy_avrage"}])
    assert "toy.yaml" in msg and "methods[0].method" in msg
    assert "Did you mean 'toy_average'" in msg and "toy_fail, toy_mean, toy_wide" in msg


def test_unknown_parameter_lists_the_valid_ones(write_suite):
    msg = _error(write_suite, methods=[{"method": "toy_wide", "params": {"width": 3}}])
    assert "methods[0].params" in msg and "'width'" in msg and "Valid options: hidden" in msg
    msg = _error(write_suite, pool={"builder": "toy_pool", "options": {"size": 3}})
    assert "pool.options" in msg and "Valid options: members, features, classes, n" in msg
    msg = _error(write_suite, pool={"builder": "toy_pol"})
    assert "pool.builder" in msg and "Did you mean 'toy_pool'" in msg
    msg = _error(write_suite, small={"options": {"size": 2}})
    assert "small" in msg and "Valid options: members" in msg


def test_bad_yaml_names_the_field(write_suite, tmp_path):
    msg = _error(write_suite, seeds="three")
    assert "toy.yaml" in msg and "seeds:" in msg and "'three'" in msg
    msg = _error(write_suite, methods=[{"method": "toy_mean", "parms": {}}])
    assert "methods[0].parms: unknown field (valid here: method, name, params)" in msg
    msg = _error(write_suite, methods=[{"method": "toy_mean"}, {"method": "toy_wide", "name": "toy_mean"}])
    assert "methods:" in msg and "'toy_mean' more than once" in msg
    msg = _error(write_suite, small={"methods": ["wide 16"]})
    assert "small:" in msg and "'wide 16' is not a display name" in msg and "Did you mean 'wide (16)'" in msg
    assert "pool: Input should be a valid dictionary" in _error(write_suite, pool=None)
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: x\nmethods: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+"):
        load_suite(bad)


def test_unknown_suite_name_lists_the_built_in_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "no_such_suite").mkdir()  # a folder of that name is not a suite file
    with pytest.raises(
        ConfigError, match=r"unknown suite 'no_such_suite'.*Built-in suites:.*path of a suite YAML"
    ):
        load_suite("no_such_suite")
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_suite("missing/suite.yaml")


def test_inference_time_leaves_the_model_as_it_was():
    from modelfuse.bench.runner import count_parameters, inference_ms

    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Dropout(0.5))
    shared = torch.nn.Sequential(model, model[0])  # a shared layer counts once
    assert count_parameters(shared) == 3 * 5 + 5
    model.train()
    assert inference_ms(model, torch.randn(2, 3)) > 0 and model.training


def test_suite_yaml_round_trip_keeps_the_recipe(write_suite, tmp_path):
    out = tmp_path / "out"
    records = run_suite(write_suite(), out=out, seeds=1)
    rerun = run_suite(load_suite(out / "suite.yaml"), seeds=1)
    assert [r["recipe_hash"] for r in rerun] == [r["recipe_hash"] for r in records]
    assert yaml.safe_load((out / "suite.yaml").read_text())["suite"] == "toy"
