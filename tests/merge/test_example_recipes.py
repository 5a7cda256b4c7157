"""The example recipes shipped in examples/recipes/: parsed, planned and run on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modelfuse.merge import merge, plan_merge

from .conftest import LAYERS, llama_state, write_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "recipes"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The folders the examples name (./base, ./ft-*), as tiny Llama-style models, and the cwd there."""
    base = llama_state(0)
    write_model(tmp_path / "base", base)
    for i, name in enumerate(["ft-math", "ft-code", "ft-chat"]):
        write_model(tmp_path / name, llama_state(10 + i, base=base, scale=0.05))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tasks_of(recipe: str) -> dict:
    plan = plan_merge(EXAMPLES / recipe)
    tasks = {t.out: t for t in plan.tasks}
    plan.close()
    return tasks


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(
        [
            "ties_gradient_filters.yaml",
            "slerp_layer_gradient.yaml",
            "passthrough_stack.yaml",
            "dare_ties_tokenizer.yaml",
        ]
    )


def test_ties_gradient_filters(workdir):
    tasks = tasks_of("ties_gradient_filters.yaml")
    # density: [0.2, 0.6] over the 4 layers, i.e. 0.2 + 0.4 * i / 3, written out
    math_density = [0.2, 0.2 + 0.4 / 3, 0.2 + 0.8 / 3, 0.6]
    for i in range(LAYERS):
        q = tasks[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert [p["density"] for p in q.per_model] == pytest.approx([math_density[i], 0.4, 0.3])
        assert [p["weight"] for p in q.per_model] == pytest.approx([1.0, 0.5, 0.8])
        up = tasks[f"model.layers.{i}.mlp.up_proj.weight"]
        assert [p["weight"] for p in up.per_model] == pytest.approx([1.0, 1.0, 0.8])
        assert q.shared == {"lambda": 1.0, "normalize": True}
        assert q.out_dtype == torch.bfloat16 and q.compute_dtype == torch.float32
    out = merge(EXAMPLES / "ties_gradient_filters.yaml", workdir / "out")
    assert all(v.dtype == torch.bfloat16 for v in load_file(out / "model.safetensors").values())


def slerp_reference(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Shoemake's SLERP of the flattened tensors from a (t = 0) to b (t = 1), in float64 NumPy:
    cos theta = <a, b> / (|a| |b|), a sin((1 - t) theta) / sin theta + b sin(t theta) / sin theta."""
    cos = float(a.ravel() @ b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b))
    assert abs(cos) < 0.9995, cos  # far from the colinear fallback (a plain lerp)
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def test_slerp_layer_gradient(workdir):
    tasks = tasks_of("slerp_layer_gradient.yaml")
    # a gradient of 5 anchors over 4 layers: layer i sits at anchor position 4 * i / 3 and takes the
    # linear interpolation of the two anchors around it, written out by hand:
    # attention [0.0, 0.5, 0.3, 0.7, 1.0]: 0.0; 0.5 - 0.2 / 3; 0.3 + 0.4 * 2 / 3; 1.0
    # MLP       [1.0, 0.5, 0.7, 0.3, 0.0]: 1.0; 0.5 + 0.2 / 3; 0.7 - 0.4 * 2 / 3; 0.0
    attn = [0.0, 13 / 30, 17 / 30, 1.0]
    mlp = [1.0, 17 / 30, 13 / 30, 0.0]
    for k in range(LAYERS):
        assert tasks[f"model.layers.{k}.self_attn.k_proj.weight"].shared["t"] == pytest.approx(attn[k])
        assert tasks[f"model.layers.{k}.mlp.up_proj.weight"].shared["t"] == pytest.approx(mlp[k])
        assert tasks[f"model.layers.{k}.input_layernorm.weight"].shared["t"] == 0.5
    assert tasks["lm_head.weight"].shared["t"] == 0.5
    base = load_file(workdir / "base" / "model.safetensors")
    tuned = load_file(workdir / "ft-math" / "model.safetensors")
    got = load_file(merge(EXAMPLES / "slerp_layer_gradient.yaml", workdir / "out") / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"  # t = 0: the base
    torch.testing.assert_close(got[name], base[name])
    for name, t in [
        ("model.layers.1.self_attn.k_proj.weight", 13 / 30),
        ("model.layers.2.mlp.up_proj.weight", 13 / 30),
        ("model.layers.3.mlp.up_proj.weight", 0.0),
        ("lm_head.weight", 0.5),
    ]:
        want = slerp_reference(t, base[name].double().numpy(), tuned[name].double().numpy())
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_passthrough_stack(workdir):
    out = merge(EXAMPLES / "passthrough_stack.yaml", workdir / "out")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] == "ft-code"
    got = load_file(out / "model.safetensors")
    code = load_file(workdir / "ft-code" / "model.safetensors")
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], code["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["lm_head.weight"], code["lm_head.weight"])


def test_dare_ties_tokenizer(workdir):
    tasks = tasks_of("dare_ties_tokenizer.yaml")
    task = tasks["model.layers.2.mlp.up_proj.weight"]
    assert task.per_model == [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]
    assert task.shared == {"lambda": 1.2}
    out = merge(EXAMPLES / "dare_ties_tokenizer.yaml", workdir / "out", seed=3)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] == "base"
    again = merge(EXAMPLES / "dare_ties_tokenizer.yaml", workdir / "again", seed=3)
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    shutil.rmtree(again)
