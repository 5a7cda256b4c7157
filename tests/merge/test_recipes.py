"""Recipes in mergekit's format: per-tensor parameters (filters, gradients, precedence), slices, files."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from modelfuse.cli import main
from modelfuse.merge import merge, plan_merge
from modelfuse.merge.params import depth, interpolate

from .conftest import LAYERS


def write(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def by_name(plan):
    return {t.out: t for t in plan.tasks}


def test_gradient_interpolation_by_hand():
    assert interpolate([0.0, 1.0], 0.5) == 0.5
    assert interpolate([1.0, 0.0, 1.0], 0.25) == pytest.approx(0.5)
    assert interpolate([2.0, 4.0, 8.0], 0.75) == pytest.approx(6.0)
    assert interpolate([3.0], 0.7) == 3.0
    assert interpolate([0.0, 1.0], 1.0) == 1.0
    assert [depth(j, 4) for j in range(4)] == [0, 1 / 3, 2 / 3, 1]
    assert depth(None, 4) == 0 and depth(0, 1) == 1


def test_filters_gradients_and_precedence(tmp_path, family):
    paths, states = family
    recipe = write(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        base_model: {paths["base"]}
        models:
          - model: {paths["ft1"]}
            parameters:
              weight:
                - filter: self_attn
                  value: [0.0, 1.0]
                - value: 0.5
          - model: {paths["ft2"]}
          - model: {paths["ft3"]}
            parameters:
              lambda: 7.0   # shared: ignored under a model, as in mergekit
        parameters:
          weight: 0.25
          lambda: [1.0, 0.5]
          normalize: false
          int8_mask: true
        """,
    )
    plan = plan_merge(recipe)
    tasks = by_name(plan)
    assert any("ignored" in n and "lambda" in n for n in plan.notes)
    for i in range(LAYERS):
        t = i / (LAYERS - 1)
        q = tasks[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert [p["weight"] for p in q.per_model] == pytest.approx([t, 0.25, 0.25])
        assert q.shared["lambda"] == pytest.approx(1.0 - 0.5 * t)
        up = tasks[f"model.layers.{i}.mlp.up_proj.weight"]
        assert [p["weight"] for p in up.per_model] == pytest.approx([0.5, 0.25, 0.25])
    emb = tasks["model.embed_tokens.weight"]  # outside the layers: t = 0
    assert emb.shared["lambda"] == 1.0 and [p["weight"] for p in emb.per_model] == [0.5, 0.25, 0.25]
    plan.close()

    out = merge(recipe, tmp_path / "out")
    got = load_file(out / "model.safetensors")
    base = states["base"]
    for name, task in tasks.items():
        w = [p["weight"] for p in task.per_model]
        tau = [states[f"ft{j}"][name] - base[name] for j in (1, 2, 3)]
        want = base[name] + task.shared["lambda"] * (w[0] * tau[0] + w[1] * tau[1] + w[2] * tau[2])
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6)


def test_plan_command_prints_resolved_parameters(tmp_path, family, capsys):
    paths, _ = family
    recipe = write(
        tmp_path,
        f"""
        merge_method: linear
        models:
          - model: {paths["ft1"]}
            parameters: {{weight: [1.0, 3.0]}}
          - model: {paths["ft2"]}
            parameters: {{weight: 1.0}}
        """,
    )
    assert main(["merge", str(recipe), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.3.mlp.up_proj.weight" in out and "weight=3" in out
    assert "weight=1.667" in out  # layer 1 of 4: 1 + 2 * (1/3)
    assert not (tmp_path / "out").exists()


def test_slices_stack_layers_and_rewrite_the_config(tmp_path, family):
    paths, states = family
    recipe = write(
        tmp_path,
        f"""
        merge_method: passthrough
        slices:
          - sources:
              - model: {paths["ft1"]}
                layer_range: [0, 3]
          - sources:
              - model: {paths["ft2"]}
                layer_range: [1, 4]
        dtype: float32
        """,
    )
    out = merge(recipe, tmp_path / "stacked")
    got = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    expected_sources = [("ft1", 0), ("ft1", 1), ("ft1", 2), ("ft2", 1), ("ft2", 2), ("ft2", 3)]
    for k, (model, j) in enumerate(expected_sources):
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(got[f"model.layers.{k}.{suffix}"], states[model][f"model.layers.{j}.{suffix}"])
    assert torch.equal(got["model.embed_tokens.weight"], states["ft1"]["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], states["ft2"]["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], states["ft2"]["lm_head.weight"])
    assert len(got) == 1 + 6 * 4 + 2


def test_slices_with_a_per_slice_gradient(tmp_path, family):
    paths, states = family
    recipe = write(
        tmp_path,
        f"""
        merge_method: slerp
        base_model: {paths["ft1"]}
        slices:
          - sources:
              - model: {paths["ft1"]}
                layer_range: [0, 4]
              - model: {paths["ft2"]}
                layer_range: [0, 4]
            parameters:
              t: [0.0, 1.0]
        """,
    )
    tasks = by_name(plan_merge(recipe))
    for k in range(4):
        assert tasks[f"model.layers.{k}.mlp.up_proj.weight"].shared["t"] == pytest.approx(k / 3)
    out = merge(recipe, tmp_path / "slerped")
    got = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], states["ft1"][name])  # t = 0: the base
    name = "model.layers.3.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], states["ft2"][name])  # t = 1: the other model


def test_tokenizer_source_config_and_model_card(tmp_path, family):
    paths, _ = family
    recipe = write(
        tmp_path,
        f"""
        merge_method: task_arithmetic
        base_model: {paths["base"]}
        models:
          - model: {paths["ft1"]}
          - model: {paths["ft2"]}
        tokenizer_source: {paths["ft2"]}
        out_dtype: bfloat16
        """,
    )
    out = merge(recipe, tmp_path / "out")
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] == "ft2"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and "tokenizer_source" in card and "modelfuse" in card
    got = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in got.values())
