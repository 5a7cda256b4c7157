"""Data-driven merge recipes (fisher, regmean, adamerging, greedy_soup): the Python API's results, bad recipes refused."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from modelfuse.cli import main
from modelfuse.data import load
from modelfuse.io import open_checkpoint, save_state_dict
from modelfuse.merge import (
    fisher_information,
    fisher_merge,
    gram_matrices,
    merge,
    regmean_merge,
)
from modelfuse.merge.soups import greedy_soup
from modelfuse.zoo import create_model

ARCH = {"name": "mlp", "options": {"hidden": [16]}}
EXAMPLES = 96


@pytest.fixture(scope="module")
def splits():
    return load("digits")


def _model(splits, seed):
    torch.manual_seed(seed)
    return create_model("mlp", input_shape=splits.input_shape, num_classes=10, hidden=[16]).eval()


@pytest.fixture
def models(tmp_path, splits):
    out = []
    for seed in (0, 1, 2):
        model = _model(splits, seed)
        save_state_dict(model, tmp_path / f"m{seed}.safetensors")
        out.append(model)
    return out


def _recipe(tmp_path, method, *, data=None, name="recipe.yaml", **extra):
    recipe = {
        "merge_method": method,
        "models": [{"model": f"m{i}.safetensors"} for i in range(3)],
        "architecture": ARCH,
        "data": data or {"dataset": "digits", "split": "val", "examples": EXAMPLES},
        **extra,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _read(path):
    ckpt = open_checkpoint(path)
    try:
        return {k: ckpt[k].clone() for k in ckpt}
    finally:
        ckpt.close()


def _assert_same(state, expected):
    assert sorted(state) == sorted(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


def test_fisher_recipe_equals_fisher_merge(tmp_path, splits, models, capsys):
    path = _recipe(tmp_path, "fisher", parameters={"label": "true", "epsilon": 1e-8})
    recipe = yaml.safe_load(path.read_text())
    recipe["models"][1]["parameters"] = {"weight": 2.0}
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "fisher.safetensors"
    assert main(["-q", "merge", str(path), "-o", str(out), "--dry-run"]) == 0  # checks, writes nothing
    assert "dry run ok" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "fisher.safetensors.statistics").exists()
    assert main(["-q", "merge", str(path), "-o", str(out)]) == 0
    assert "by fisher" in capsys.readouterr().out
    loader = DataLoader(splits.val, batch_size=64)
    fishers = [fisher_information(m, loader, max_examples=EXAMPLES) for m in models]
    expected = fisher_merge(models, fishers, weights=[1.0, 2.0, 1.0], epsilon=1e-8)
    _assert_same(_read(out), expected)
    # statistics cached beside the output, reused on the next run (same result)
    cache = sorted((tmp_path / "fisher.safetensors.statistics").iterdir())
    assert len(cache) == 3
    stamps = [p.stat().st_mtime_ns for p in cache]
    assert main(["-q", "merge", str(path), "-o", str(out), "--force"]) == 0
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    _assert_same(_read(out), expected)


def test_regmean_recipe_equals_regmean_merge(tmp_path, splits, models):
    stats_dir = tmp_path / "stats"
    path = _recipe(tmp_path, "regmean", parameters={"alpha": 0.7}, statistics=str(stats_dir))
    out = merge(path, tmp_path / "regmean")  # the Python API takes data recipes too; a folder output
    loader = DataLoader(splits.val, batch_size=64)
    grams = [gram_matrices(m, loader, max_examples=EXAMPLES) for m in models]
    expected = regmean_merge(models, grams, alpha=0.7)
    _assert_same(_read(out), expected)
    assert len(list(stats_dir.glob("*.gram.*.safetensors"))) == 3


def test_greedy_soup_recipe_equals_greedy_soup(tmp_path, splits, models, capsys):
    path = _recipe(tmp_path, "greedy_soup", data={"dataset": "digits", "split": "val"})
    out = tmp_path / "soup.safetensors"
    assert main(["-q", "merge", str(path), "-o", str(out)]) == 0
    expected = greedy_soup(models, splits, split="val")
    _assert_same(_read(out), expected.model.state_dict())
    assert '"kept"' in capsys.readouterr().out


def _refused(args, capsys, *needles):
    assert main(["-q", "merge", *args]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_recipes_write_nothing(tmp_path, splits, models, capsys):
    out = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())

    # an unknown field of data: lists the valid ones
    path = _recipe(
        tmp_path, "fisher", data={"dataset": "digits", "split": "val", "exmaples": 5}, name="a.yaml"
    )
    err = _refused([str(path), "-o", str(out)], capsys, "data.exmaples", "unknown field")
    assert "dataset, split, examples" in err

    # adamerging on the test split needs allow_test
    path = _recipe(
        tmp_path,
        "adamerging",
        data={"dataset": "digits", "split": "test"},
        base_model="m0.safetensors",
        name="b.yaml",
    )
    _refused([str(path), "-o", str(out)], capsys, "test split", "allow_test")

    # an unknown parameter of the method, a missing architecture
    path = _recipe(tmp_path, "regmean", parameters={"alpah": 0.5}, name="c.yaml")
    _refused([str(path), "-o", str(out)], capsys, "'alpah'", "valid: alpha")
    bad = yaml.safe_load(path.read_text())
    del bad["architecture"], bad["parameters"]
    path.write_text(yaml.safe_dump(bad))
    _refused([str(path), "-o", str(out)], capsys, "architecture", "Field required")

    # data-driven methods need a recipe file
    _refused(["--method", "fisher", "m0.safetensors", "-o", str(out)], capsys, "architecture:", "data:")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "a.yaml", "b.yaml", "c.yaml"])


def test_existing_output_and_foreign_statistics_refused(tmp_path, splits, models, capsys):
    path = _recipe(tmp_path, "fisher")
    out = tmp_path / "merged.safetensors"
    assert main(["-q", "merge", str(path), "-o", str(out)]) == 0
    first = out.read_bytes()
    # an existing output is kept without --force
    _refused([str(path), "-o", str(out)], capsys, "exists")
    assert out.read_bytes() == first
    # m1 replaced by another model: its cached statistics belong to the old one and are refused
    save_state_dict(_model(splits, 7), tmp_path / "m1.safetensors", force=True)
    _refused([str(path), "-o", str(out), "--force"], capsys, "computed on another model", "m1.safetensors")
    assert out.read_bytes() == first


def test_adamerging_recipe_equals_adamerging(tmp_path, splits, models):
    from modelfuse.merge.adamerging import adamerging

    path = _recipe(
        tmp_path,
        "adamerging",
        base_model="m0.safetensors",
        parameters={"epochs": 2, "lr": 0.01, "granularity": "layer"},
        data={"dataset": "digits", "split": "val", "examples": 64, "batch_size": 32},
    )
    recipe = yaml.safe_load(path.read_text())
    recipe["models"] = recipe["models"][1:]
    path.write_text(yaml.safe_dump(recipe))
    out = merge(path, tmp_path / "ada.safetensors")
    expected = adamerging(
        models[0], models[1:], splits, split="val", max_examples=64, epochs=2, lr=0.01, batch_size=32
    )
    _assert_same(_read(out), expected.model.state_dict())


def test_plan_says_what_would_run_and_which_statistics_are_cached(tmp_path, models, capsys):
    path = _recipe(tmp_path, "regmean", parameters={"alpha": 0.7})
    out = tmp_path / "regmean.safetensors"
    assert main(["-q", "merge", str(path), "-o", str(out), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert plan.startswith("data merge plan: regmean (alpha=0.7) over 3 model(s)\n")
    assert f"digits, split val, at most {EXAMPLES} examples, batches of 64" in plan
    assert plan.count("gram statistics to compute") == 3 and not out.exists()
    assert main(["-q", "merge", str(path), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["-q", "merge", str(path), "-o", str(out), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert plan.count("gram statistics cached in ") == 3
    assert "(exists: refused without --force)" in plan


def test_list_methods_lists_the_data_driven_methods(capsys):
    assert main(["merge", "--list-methods"]) == 0
    out = capsys.readouterr().out
    data_part = out.split("data-driven methods")[1]
    for name in ("fisher", "regmean", "adamerging", "greedy_soup"):
        assert f"\n{name}\n" in data_part
    assert "alpha=0.9" in data_part and "Matena & Raffel 2022" in data_part
    assert "the test split needs data.allow_test: true" in data_part
