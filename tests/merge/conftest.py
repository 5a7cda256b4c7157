"""Tiny Llama-style checkpoints on disk for the merge engine's tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .kernel_support import require_kernels

HIDDEN, VOCAB, LAYERS = 8, 16, 4


def llama_state(seed: int, layers: int = LAYERS, scale: float = 1.0, base: dict | None = None) -> dict:
    """Embeddings, ``layers`` decoder layers (attention + MLP + norms), final norm and lm_head."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rnd(HIDDEN, HIDDEN)
        sd[p + "self_attn.k_proj.weight"] = rnd(HIDDEN, HIDDEN)
        sd[p + "mlp.up_proj.weight"] = rnd(2 * HIDDEN, HIDDEN)
        sd[p + "input_layernorm.weight"] = 1 + rnd(HIDDEN)
    sd["model.norm.weight"] = 1 + rnd(HIDDEN)
    sd["lm_head.weight"] = rnd(VOCAB, HIDDEN)
    if base is not None:  # a "fine-tune": base plus this seed's delta
        sd = {k: base[k] + v for k, v in sd.items()}
    return sd


def write_model(folder: Path, state: dict, layers: int = LAYERS, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": HIDDEN,
        "vocab_size": VOCAB,
        **config,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": str(folder.name)}}))
    (folder / "generation_config.json").write_text("{}")
    return folder


@pytest.fixture
def family(tmp_path):
    """A base and three fine-tunes (base + small deltas) as Hugging Face folders, with their states."""
    base = llama_state(0)
    states = {"base": base}
    for i in range(1, 4):
        states[f"ft{i}"] = llama_state(i, base=base, scale=0.1)
    paths = {name: write_model(tmp_path / name, sd) for name, sd in states.items()}
    return paths, states


@pytest.fixture(params=["kernels", "torch"])
def merge_path(request):
    """Run a test once through the compiled CPU kernels and once through the torch blocks
    (the path GPUs and other dtypes take); yields the path's name."""
    from modelfuse.merge.methods import _kernels

    if request.param == "kernels":
        require_kernels()
    before = _kernels.set_enabled(request.param == "kernels")
    try:
        yield request.param
    finally:
        _kernels.set_enabled(before)


def write_ties_recipe(root: Path, paths: dict) -> Path:
    """``root/recipe.yaml``: TIES (density 0.5) of ft1 and ft2 onto base, from ``paths``' folders."""
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "merge_method: ties\n"
        f"base_model: {paths['base']}\n"
        "parameters: {density: 0.5}\n"
        "models:\n" + "".join(f"  - model: {paths[m]}\n" for m in ("ft1", "ft2"))
    )
    return recipe
