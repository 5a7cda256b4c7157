"""The executor: global TIES trimming, seeded randomness per tensor, in-memory API invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelfuse.merge import merge_modules, merge_state_dicts
from modelfuse.merge.executor import tensor_seed


def random_family(n_models=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {f"model.layers.{i}.w": torch.randn(40, 25, generator=g) for i in range(3)}
    base["model.norm.weight"] = torch.randn(25, generator=g)
    fts = [
        {k: v + torch.randn(v.shape, generator=g) * 0.1 * (j + 1) for k, v in base.items()}
        for j in range(n_models)
    ]
    return base, fts


@pytest.mark.parametrize("density", [0.05, 0.2, 0.7])
def test_ties_with_global_trimming_matches_the_paper(density):
    base, fts = random_family()
    out = merge_state_dicts("ties", fts, base, density=density, trim="global", vote="unweighted")
    # NumPy reference (Yadav et al. 2023, Algorithm 1) on the whole concatenated task vector
    names = list(base)
    taus = [np.concatenate([(ft[k] - base[k]).numpy().ravel() for k in names]) for ft in fts]
    trimmed = []
    for t in taus:
        k = int(density * t.size)
        cut = np.sort(np.abs(t))[::-1][k - 1]
        trimmed.append(np.where(np.abs(t) >= cut, t, 0.0))
    stacked = np.stack(trimmed)
    sign = np.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(stacked) == sign) & (stacked != 0)
    merged = (stacked * agree).sum(0) / np.maximum(agree.sum(0), 1)
    want = np.concatenate([base[k].numpy().ravel() for k in names]) + merged
    got = np.concatenate([out[k].numpy().ravel() for k in names])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_randomised_methods_are_seeded_per_tensor_name():
    base, fts = random_family()
    same_content = {**base, "model.layers.9.w": base["model.layers.0.w"].clone()}
    fts = [{**ft, "model.layers.9.w": ft["model.layers.0.w"].clone()} for ft in fts]
    a = merge_state_dicts("dare_ties", fts, same_content, density=0.5, seed=1)
    b = merge_state_dicts("dare_ties", fts, same_content, density=0.5, seed=1)
    c = merge_state_dicts("dare_ties", fts, same_content, density=0.5, seed=2)
    for name in a:
        assert torch.equal(a[name], b[name])
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # identical inputs under two names draw different masks
    assert not torch.equal(a["model.layers.0.w"], a["model.layers.9.w"])
    assert tensor_seed(1, "x") != tensor_seed(1, "y") and tensor_seed(1, "x") == tensor_seed(1, "x")


def test_merging_copies_of_a_module_returns_it():
    from modelfuse.zoo import create_model

    torch.manual_seed(0)
    net = create_model("cnn", input_shape=(1, 8, 8), num_classes=10).eval()
    x = torch.randn(5, 1, 8, 8)
    for method in ("linear", "karcher", "multislerp", "model_stock"):
        base = net if method == "model_stock" else None
        merged = merge_modules(method, [net, net, net], base).eval()
        torch.testing.assert_close(merged(x), net(x), rtol=1e-5, atol=1e-5)
    assert merged is not net


def test_task_arithmetic_with_lambda_zero_gives_the_base():
    base, fts = random_family()
    out = merge_state_dicts("task_arithmetic", fts, base, **{"lambda": 0.0})
    for name in base:
        assert torch.equal(out[name], base[name])


@pytest.mark.parametrize(
    ("method", "params", "dtype"),
    [
        ("ties", {"density": 0.5}, "float32"),
        ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.1}, "float32"),
        ("dare_ties", {"density": 0.5}, "float32"),
        ("linear", {}, "float32"),
        ("task_arithmetic", {}, "float32"),
        ("model_stock", {}, "float32"),
        ("ties", {"density": 0.5}, "bfloat16"),
    ],
)
def test_file_merge_equals_the_in_memory_merge(tmp_path, family, monkeypatch, method, params, dtype):
    """A merge of checkpoint folders (inputs memory-mapped, outputs in reused buffers that go
    back to the pool once written) gives the in-memory API's tensors, even when the writes
    lag behind the computes (a slow disk: a buffer reused too early would show here)."""
    import time

    import yaml
    from safetensors.torch import load_file

    from modelfuse.io.writer import CheckpointWriter
    from modelfuse.merge import merge

    paths, states = family
    slow = CheckpointWriter._write_declared

    def lagging(self, name, tensor):
        time.sleep(0.01)
        return slow(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "_write_declared", lagging)
    weights = [1.0, 0.5, 0.25]
    per_model = [{"weight": w} for w in weights] if method != "model_stock" else [{}] * 3
    with_base = method != "linear"
    recipe = {
        "merge_method": method,
        "parameters": params,
        "dtype": dtype,
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": p} for i, p in zip((1, 2, 3), per_model)],
    }
    if with_base:
        recipe["base_model"] = str(paths["base"])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = merge(tmp_path / "recipe.yaml", tmp_path / "out", progress=False)
    got = load_file(str(out / "model.safetensors"))
    want = merge_state_dicts(
        method,
        [states[f"ft{i}"] for i in (1, 2, 3)],
        states["base"] if with_base else None,
        model_params=per_model,
        dtype=dtype,
        **params,
    )
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_device_cuda_without_a_gpu_is_a_clear_error_and_writes_nothing(tmp_path, family):
    """--device cuda where torch sees no GPU: an error that says so and what to use instead."""
    from modelfuse.errors import ConfigError
    from modelfuse.merge import merge

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the error is for machines without one")
    paths, _ = family
    recipe = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"density": 0.5}} for i in (1, 2)],
    }
    with pytest.raises(ConfigError, match=r"--device cuda.*no CUDA GPU.*--device cpu"):
        merge(recipe, tmp_path / "out", device="cuda", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs where one is present)")
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("linear", {}),
        ("ties", {"density": 0.4}),
        ("dare_ties", {"density": 0.5}),
        ("della", {"density": 0.5, "epsilon": 0.1}),
    ],
)
def test_a_merge_on_the_gpu_gives_the_cpu_merge(tmp_path, family, method, params):
    """--device cuda computes on the GPU: the same draws (counter-based), the same keeps;
    values within float32 rounding of the CPU's (another summation order)."""
    from safetensors.torch import load_file

    from modelfuse.merge import merge

    paths, _ = family
    recipe = {
        "merge_method": method,
        "models": [
            {"model": str(paths[f"ft{i}"]), "parameters": {"weight": 1.0, **params}} for i in (1, 2, 3)
        ],
    }
    if method != "linear":
        recipe["base_model"] = str(paths["base"])
    gpu = load_file(str(merge(recipe, tmp_path / "gpu", device="cuda", progress=False) / "model.safetensors"))
    cpu = load_file(str(merge(recipe, tmp_path / "cpu", device="cpu", progress=False) / "model.safetensors"))
    assert set(gpu) == set(cpu)
    for name in cpu:
        assert gpu[name].device.type == "cpu"
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-5, atol=1e-6)
