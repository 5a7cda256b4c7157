"""Bad recipes and bad checkpoints: a clear error naming the place, and nothing written."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfuse.cli import main
from modelfuse.errors import ConfigError, FusionError
from modelfuse.merge import merge, merge_state_dicts

from .conftest import llama_state, write_model


def recipe_file(tmp_path, body: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def ta_recipe(paths, extra: str = "", method: str = "task_arithmetic") -> str:
    return f"""
    merge_method: {method}
    base_model: {paths["base"]}
    models:
      - model: {paths["ft1"]}
      - model: {paths["ft2"]}
    {extra}
    """


def nothing_written(tmp_path, name="out"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{name}")]
    return not (tmp_path / name).exists() and not leftovers


def cli_error(capsys, *args) -> str:
    assert main(["merge", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_method(tmp_path, family, capsys):
    paths, _ = family
    err = cli_error(
        capsys, recipe_file(tmp_path, ta_recipe(paths, method="task_arithmatic")), "-o", tmp_path / "out"
    )
    assert "unknown merge method 'task_arithmatic'" in err and "Did you mean 'task_arithmetic'" in err
    assert nothing_written(tmp_path)


def test_unknown_parameter(tmp_path, family, capsys):
    paths, _ = family
    body = ta_recipe(paths, "parameters:\n      lamda: 0.5")
    err = cli_error(capsys, recipe_file(tmp_path, body), "-o", tmp_path / "out")
    assert "parameters.lamda" in err and "no parameter 'lamda'" in err and "lambda" in err
    assert nothing_written(tmp_path)


def test_unknown_recipe_field(tmp_path, family, capsys):
    paths, _ = family
    err = cli_error(capsys, recipe_file(tmp_path, ta_recipe(paths, "dtpye: float16")), "-o", tmp_path / "out")
    assert "recipe.yaml" in err and "dtpye: unknown field" in err and "dtype" in err


def test_parameter_out_of_range(tmp_path, family, capsys):
    paths, _ = family
    body = f"""
    merge_method: slerp
    base_model: {paths["base"]}
    models:
      - model: {paths["ft1"]}
    parameters:
      t: [0.0, 1.5]
    """
    err = cli_error(capsys, recipe_file(tmp_path, body), "-o", tmp_path / "out")
    assert "parameters.t" in err and "1.5" in err
    assert nothing_written(tmp_path)


def test_density_outside_unit_interval(tmp_path, family, capsys):
    paths, _ = family
    body = ta_recipe(paths, "parameters:\n      density: 1.5", method="ties")
    err = cli_error(capsys, recipe_file(tmp_path, body), "-o", tmp_path / "out")
    assert "density" in err and "1.5" in err
    body = ta_recipe(paths, "parameters:\n      density: 0", method="ties")
    assert "density" in cli_error(capsys, recipe_file(tmp_path, body), "-o", tmp_path / "out")
    assert nothing_written(tmp_path)


def test_weight_list_length_mismatch(family):
    _, states = family
    with pytest.raises(ConfigError, match="model_params has 1 entries for 2 models"):
        merge_state_dicts("linear", [states["ft1"], states["ft2"]], model_params=[{"weight": 1.0}])


def test_missing_base(tmp_path, family, capsys):
    paths, _ = family
    body = f"""
    merge_method: task_arithmetic
    models:
      - model: {paths["ft1"]}
    """
    err = cli_error(capsys, recipe_file(tmp_path, body), "-o", tmp_path / "out")
    assert "needs a base model" in err and "base_model" in err


def test_slice_outside_the_layers(tmp_path, family, capsys):
    paths, _ = family
    body = f"""
    merge_method: passthrough
    slices:
      - sources:
          - model: {paths["ft1"]}
            layer_range: [2, 6]
    """
    err = cli_error(capsys, recipe_file(tmp_path, body), "-o", tmp_path / "out")
    assert "slices[0].sources[0].layer_range [2, 6]" in err and "has 4 layers" in err
    assert nothing_written(tmp_path)


def test_yaml_syntax_error_has_a_line_number(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2}\n")
    err = cli_error(capsys, path, "-o", tmp_path / "out")
    assert "recipe.yaml" in err and "YAML syntax error at line 4" in err


def test_model_that_does_not_exist(tmp_path, family, capsys):
    paths, _ = family
    body = ta_recipe(paths).replace(str(paths["ft2"]), str(tmp_path / "nope"))
    err = cli_error(capsys, recipe_file(tmp_path, body), "-o", tmp_path / "out")
    assert "model" in err and "nope" in err and "not found" in err


def test_truncated_input_checkpoint(tmp_path, family, capsys):
    paths, _ = family
    shard = paths["ft2"] / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    err = cli_error(capsys, recipe_file(tmp_path, ta_recipe(paths)), "-o", tmp_path / "out")
    assert "ft2" in err and "model.safetensors" in err
    assert nothing_written(tmp_path)


def test_different_key_sets(tmp_path, family, capsys):
    paths, states = family
    extra = dict(states["ft2"], **{"model.extra.weight": torch.ones(3)})
    del extra["lm_head.weight"]
    write_model(paths["ft2"], extra)
    recipe = recipe_file(tmp_path, ta_recipe(paths))
    err = cli_error(capsys, recipe, "-o", tmp_path / "out")
    assert "lm_head.weight" in err and "model.extra.weight" in err and "--missing" in err
    assert nothing_written(tmp_path)
    assert main(["merge", str(recipe), "-o", str(tmp_path / "copy"), "--missing", "copy-base"]) == 0
    copied = load_file(tmp_path / "copy" / "model.safetensors")
    assert torch.equal(copied["lm_head.weight"], states["base"]["lm_head.weight"])
    assert "model.extra.weight" not in copied
    assert main(["merge", str(recipe), "-o", str(tmp_path / "skip"), "--missing", "skip"]) == 0
    assert "lm_head.weight" not in load_file(tmp_path / "skip" / "model.safetensors")


def test_shape_mismatch_and_vocabulary_hint(tmp_path, family, capsys):
    paths, states = family
    bad = dict(states["ft2"], **{"model.layers.1.mlp.up_proj.weight": torch.ones(3, 8)})
    write_model(paths["ft2"], bad)
    err = cli_error(capsys, recipe_file(tmp_path, ta_recipe(paths)), "-o", tmp_path / "out")
    assert "model.layers.1.mlp.up_proj.weight" in err and "(3, 8)" in err and "(16, 8)" in err
    bigger = llama_state(5)
    bigger["model.embed_tokens.weight"] = torch.ones(20, 8)
    bigger["lm_head.weight"] = torch.ones(20, 8)
    write_model(paths["ft2"], bigger, vocab_size=20)
    err = cli_error(capsys, recipe_file(tmp_path, ta_recipe(paths)), "-o", tmp_path / "out")
    assert "vocabulary" in err and "(20, 8)" in err and "tokenizer" in err
    assert nothing_written(tmp_path)


def test_architecture_mismatch(tmp_path, family, capsys):
    paths, states = family
    write_model(paths["ft2"], states["ft2"], model_type="mistral", architectures=["MistralForCausalLM"])
    recipe = recipe_file(tmp_path, ta_recipe(paths))
    err = cli_error(capsys, recipe, "-o", tmp_path / "out")
    assert "mistral" in err and "llama" in err and "--allow-architecture-mismatch" in err
    assert nothing_written(tmp_path)
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--allow-architecture-mismatch"]) == 0


def test_mixed_dtypes_compute_in_float32(tmp_path, family):
    paths, states = family
    write_model(paths["ft2"], {k: v.to(torch.bfloat16) for k, v in states["ft2"].items()})
    out = merge(recipe_file(tmp_path, ta_recipe(paths)), tmp_path / "out")
    got = load_file(out / "model.safetensors")
    name = "model.layers.2.mlp.up_proj.weight"
    base = states["base"][name]
    want = base + (states["ft1"][name] - base) + (states["ft2"][name].to(torch.bfloat16).float() - base)
    assert got[name].dtype == torch.float32
    torch.testing.assert_close(got[name], want)


def test_non_finite_result(tmp_path, family, capsys):
    paths, states = family
    bad = dict(states["ft2"])
    bad["model.norm.weight"] = torch.full_like(bad["model.norm.weight"], float("inf"))
    write_model(paths["ft2"], bad)
    err = cli_error(capsys, recipe_file(tmp_path, ta_recipe(paths)), "-o", tmp_path / "out")
    assert "non-finite" in err and "model.norm.weight" in err and "task_arithmetic" in err
    assert nothing_written(tmp_path)


def test_output_inside_an_input_folder(tmp_path, family, capsys):
    paths, _ = family
    err = cli_error(capsys, recipe_file(tmp_path, ta_recipe(paths)), "-o", paths["ft1"] / "merged")
    assert "refusing to write into input folder" in err
    assert not (paths["ft1"] / "merged").exists()


def test_existing_output_needs_force(tmp_path, family, capsys):
    paths, _ = family
    recipe = recipe_file(tmp_path, ta_recipe(paths))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    err = cli_error(capsys, recipe, "-o", tmp_path / "out")
    assert "exists already" in err and "--force" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--force"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "keep.txt").exists()


def test_disk_failure_midway_leaves_nothing(tmp_path, family, monkeypatch):
    paths, _ = family
    real = os.pwrite
    calls = {"n": 0}

    def failing(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(FusionError, match="No space left"):
        merge(recipe_file(tmp_path, ta_recipe(paths)), tmp_path / "out")
    assert calls["n"] > 5
    assert nothing_written(tmp_path)


def test_inputs_are_not_modified(tmp_path, family):
    paths, _ = family
    before = {p: p.read_bytes() for name in paths for p in paths[name].iterdir()}
    merge(recipe_file(tmp_path, ta_recipe(paths)), tmp_path / "out")
    assert before == {p: p.read_bytes() for name in paths for p in paths[name].iterdir()}


def test_dry_run_validates_without_writing(tmp_path, family, capsys):
    paths, _ = family
    assert (
        main(
            ["merge", str(recipe_file(tmp_path, ta_recipe(paths))), "-o", str(tmp_path / "out"), "--dry-run"]
        )
        == 0
    )
    assert "dry run ok" in capsys.readouterr().out
    assert nothing_written(tmp_path)


def test_shorthand_needs_output(tmp_path, family, capsys):
    paths, _ = family
    err = cli_error(capsys, "--method", "linear", paths["ft1"], paths["ft2"])
    assert "-o/--out" in err


def test_unsupported_modules_and_union_tokenizer(tmp_path, family, capsys):
    paths, _ = family
    err = cli_error(
        capsys, recipe_file(tmp_path, "merge_method: linear\nmodules: {text: {}}\n"), "-o", tmp_path / "o"
    )
    assert "modules" in err and "not supported" in err
    body = ta_recipe(paths, "tokenizer_source: union")
    assert "union" in cli_error(capsys, recipe_file(tmp_path, body), "-o", tmp_path / "o")


def test_save_file_fixture_is_valid(tmp_path):
    # guards the fixtures: a checkpoint written by safetensors itself reads back
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    assert json.loads((tmp_path / "x.safetensors").read_bytes()[8:60].split(b"}")[0] + b"}}")["a"]
