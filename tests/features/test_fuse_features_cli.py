"""``modelfuse fuse-features``: the written model reproduces the printed figures; bad recipes fail
clearly before training and leave nothing behind."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from modelfuse.cli import main
from modelfuse.data import load
from modelfuse.features import Branch, FeatureFusion
from modelfuse.io import save_state_dict
from modelfuse.zoo import build_pool, create_model, evaluate


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbones")
    pool = build_pool("cnn", "digits", k=2, epochs=2, cache=False, progress=False)
    for i, m in enumerate(pool.members):
        save_state_dict(m, folder / f"cnn{i}.safetensors")
    save_state_dict(
        build_pool("mlp", "digits", k=1, epochs=1, cache=False, progress=False).members[0],
        folder / "mlp.safetensors",
    )
    return folder


def write_recipe(folder, **changes):
    recipe = {
        "branches": [
            {"name": "a", "model": "cnn", "weights": str(folder / "cnn0.safetensors"), "tap": "features"},
            {"name": "b", "model": "cnn", "weights": str(folder / "cnn1.safetensors"), "tap": "features"},
        ],
        "fuse": "concat",
        "data": {"name": "digits"},
        "train": {"epochs": 3, "seed": 0},
    }
    recipe.update(changes)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_written_model_reproduces_the_reported_figures(backbones, tmp_path, capsys):
    recipe = write_recipe(backbones, fuse="weighted", compare=True)
    out = tmp_path / "fused"
    assert main(["fuse-features", str(recipe), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["models"]) == ["a alone", "b alone", "fused (weighted)"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.safetensors", "recipe.yaml"]
    # rebuild the fused model from scratch and load the written weights: same test figures
    splits = load("digits")
    branches = [
        Branch(create_model("cnn", input_shape=(1, 8, 8), num_classes=10), "features", name=n) for n in "ab"
    ]
    model = FeatureFusion(branches, fuse="weighted", num_classes=10, input_shape=(1, 8, 8))
    model.load_state_dict(load_file(out / "model.safetensors"))
    test = evaluate(model, splits.test)
    fused = report["models"]["fused (weighted)"]
    assert test["accuracy"] == pytest.approx(fused["test_accuracy"], abs=1e-9)
    assert test["nll"] == pytest.approx(fused["test_nll"], rel=1e-5)
    assert fused["cached"] is True  # frozen backbones: the head trained on cached features
    # the backbones inside are the given checkpoints, untouched by training
    for name, file in (("a", "cnn0"), ("b", "cnn1")):
        given = load_file(backbones / f"{file}.safetensors")
        backbone = model.branches[name].state_dict()
        assert backbone.keys() == given.keys()
        for key, value in backbone.items():
            assert torch.equal(value, given[key]), key
    assert yaml.safe_load((out / "recipe.yaml").read_text())["fuse"] == "weighted"
    written = json.loads((out / "metrics.json").read_text())
    assert written["fused (weighted)"]["test_nll"] == fused["test_nll"]
    # the paired comparison against the best branch alone agrees with the rows' own figures
    comparison = report["comparison"]
    assert written["comparison"] == comparison
    alone = {n: m for n, m in report["models"].items() if n.endswith("alone")}
    best = max(alone, key=lambda n: (alone[n]["test_accuracy"], -alone[n]["test_nll"]))
    assert comparison["against"] == best and comparison["fused"] == "fused (weighted)"
    n = len(splits.test)
    assert comparison["n"] == n
    difference = fused["test_accuracy"] - alone[best]["test_accuracy"]
    assert comparison["accuracy_difference"] == pytest.approx(difference, abs=1e-6)
    assert (comparison["only_a"] - comparison["only_b"]) / n == pytest.approx(difference, abs=1e-6)
    assert comparison["nll_difference"] == pytest.approx(
        fused["test_nll"] - alone[best]["test_nll"], abs=1e-5
    )
    low, high = comparison["accuracy_interval"]
    assert low <= comparison["accuracy_difference"] <= high
    # how many of the best branch's errors the other branch gets right, consistent with the rows
    room = report["room"]
    assert written["room"] == room and room["names"] == list(alone) and room["n"] == n
    assert room["accuracies"] == pytest.approx([alone[k]["test_accuracy"] for k in alone], abs=1e-6)
    assert room["names"][room["best"]] == best
    assert room["best_wrong"] == round((1 - alone[best]["test_accuracy"]) * n)
    assert 0 <= room["fixable"] <= room["best_wrong"]
    assert room["oracle_accuracy"] == pytest.approx(
        alone[best]["test_accuracy"] + room["fixable"] / n, abs=1e-6
    )


def test_table_output_and_refusal_to_overwrite(backbones, tmp_path, capsys):
    recipe = write_recipe(backbones)
    out = tmp_path / "fused"
    assert main(["fuse-features", str(recipe), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fused (concat)" in printed
    assert "paired bootstrap" not in printed and "room for fusion" not in printed  # compare: false
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(["fuse-features", str(recipe), "-o", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(["fuse-features", str(recipe), "-o", str(out), "--force"]) == 0
    capsys.readouterr()
    compared = write_recipe(backbones, compare=True)
    assert main(["fuse-features", str(compared), "-o", str(tmp_path / "compared")]) == 0
    printed = capsys.readouterr().out
    assert "a alone" in printed and "b alone" in printed
    assert re.search(r"room for fusion: [ab] alone is wrong on \d+ of \d+ samples and another model", printed)
    assert re.search(
        r"fused \(concat\) - [ab] alone: [+-]\d+\.\d\d accuracy points \(95% paired bootstrap", printed
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fuze": "concat"}, "fuze: unknown field (valid here: branches, fuse,"),
        ({"train": {"epochs": 0}}, "train.epochs: Input should be greater than or equal to 1"),
        ({"branches": []}, "branches: List should have at least 1 item"),
        ({"fuse": "sume"}, "sume"),
    ],
)
def test_bad_recipes_are_clear_errors_and_write_nothing(backbones, tmp_path, capsys, changes, message):
    recipe = write_recipe(backbones, **changes)
    out = tmp_path / "fused"
    assert main(["fuse-features", str(recipe), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_branches_name_the_branch(backbones, tmp_path, capsys):
    base = write_recipe(backbones)
    recipe = yaml.safe_load(base.read_text())
    cases = [
        ({"tap": "featurs"}, "branch 'a'", "no tap 'featurs'. Closest available: 'features'"),
        ({"weights": str(backbones / "mlp.safetensors")}, "branches[0] (a)", "does not fit the ConvNet"),
        ({"weights": str(backbones / "absent.safetensors")}, "branches[0] (a)", "no such file"),
        ({"model": "cnm"}, "branches[0] (a)", "unknown model 'cnm'"),
    ]
    for change, where, message in cases:
        branch = {**recipe["branches"][0], **change}
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**recipe, "branches": [branch, recipe["branches"][1]]}))
        assert main(["fuse-features", str(path), "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert where in err and message in err, (change, err)
        assert not (tmp_path / "out").exists()
    (tmp_path / "syntax.yaml").write_text("branches: [\n  - a: b\n")
    assert main(["fuse-features", str(tmp_path / "syntax.yaml"), "-o", str(tmp_path / "out")]) == 2
    assert "YAML syntax error at line" in capsys.readouterr().err
    # the output may not be an input
    assert main(["fuse-features", str(base), "-o", str(backbones / "cnn0.safetensors")]) == 2
    assert "refusing to write into input" in capsys.readouterr().err


def test_a_users_image_folder_with_torchvision_and_zoo_backbones(tmp_path, capsys):
    """fuse-features on root/<class>/<image>.png: torchvision ResNet-18 (weights from a local file)
    fused with a zoo CNN, through the image_folder dataset."""
    from PIL import Image
    from torchvision.models import resnet18

    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        (tmp_path / "images" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / f"class{c}" / f"{i}.png")
    torch.manual_seed(0)
    torch.save(resnet18(num_classes=2).state_dict(), tmp_path / "resnet18.pth")
    recipe = {
        "branches": [
            {
                "name": "resnet",
                "model": "torchvision:resnet18",
                "options": {"num_classes": 2},
                "weights": str(tmp_path / "resnet18.pth"),
                "tap": "layer4",
            },
            {"name": "cnn", "model": "cnn", "tap": "features"},
        ],
        "fuse": "concat",
        "data": {
            "name": "image_folder",
            "options": {
                "root": str(tmp_path / "images"),
                "image_size": 16,
                "val_fraction": 0.2,
                "test_fraction": 0.2,
            },
        },
        "train": {"epochs": 2, "batch_size": 4},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["fuse-features", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["models"]
    assert list(report) == ["fused (concat)"]
    written = load_file(tmp_path / "out" / "model.safetensors")
    given = torch.load(tmp_path / "resnet18.pth", weights_only=True)
    assert torch.equal(written["branches.resnet.conv1.weight"], given["conv1.weight"])  # frozen, as loaded
