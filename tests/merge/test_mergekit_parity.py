"""mergekit 0.1.5's recipe semantics, method by method, through the recipe path.

Each expected value is a NumPy transcription of mergekit's formula (the references of
``test_methods_interp`` / ``test_methods_sparse``, written from the papers with mergekit's
choices) applied to the inputs mergekit would give the method: which models are inputs
(mergekit merges a named base model as one more input of the methods without a base role),
which parameters it ignores (accepted here with an ``IgnoredParameterWarning``), and which
entries a magnitude cut keeps when magnitudes tie (``tie_break: sort``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from modelfuse.errors import ConfigError
from modelfuse.merge import IgnoredParameterWarning, get_method, list_methods, merge_state_dicts
from tests.merge.test_methods_interp import (
    ref_arcee_fusion,
    ref_karcher,
    ref_model_stock,
    ref_multislerp,
    ref_nearswap,
    ref_nuslerp,
    ref_slerp,
)
from tests.merge.test_methods_sparse import np_breadcrumb, np_merge, np_ram, np_sce, np_ties

SHAPE = (6, 5)


def around_base(n: int = 3, seed: int = 0, spread: float = 0.3):
    """A float64 base and n models around it (distinct magnitudes: no ties at any cut)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(SHAPE)
    return base, [base + spread * rng.standard_normal(SHAPE) for _ in range(n)]


def merged(method, xs, base=None, model_params=None, **params) -> np.ndarray:
    """The recipe path (merge_state_dicts builds a recipe with base_model and models), one tensor."""
    out = merge_state_dicts(
        method,
        [{"w": torch.from_numpy(x)} for x in xs],
        None if base is None else {"w": torch.from_numpy(base)},
        model_params=model_params,
        **params,
    )
    return out["w"].numpy()


def close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def ignoring(key: str, method: str):
    return pytest.warns(IgnoredParameterWarning, match=rf"'{method}' does not use parameter '{key}'.*ignored")


# ------------------------------------------------------------------ parameters mergekit ignores


def test_sce_with_per_model_weights_is_mergekits_sce():
    """mergekit's sce has no per-model parameters: weight: 1.0 under each model changes nothing."""
    base, xs = around_base()
    with ignoring("weight", "sce"):
        got = merged("sce", xs, base, model_params=[{"weight": 1.0}] * 3, select_topk=0.5)
    close(got, np_sce(xs, base, 0.5))
    with ignoring("weight", "sce"):  # any weight: ignored, not applied
        close(merged("sce", xs, base, model_params=[{"weight": 0.2}, {"weight": 3.0}, {}]), np_sce(xs, base, 1.0))


def test_sce_of_barely_moved_tensors_averages_uniformly():
    """mergekit 0.1.5: coefficients are uniform when the task vectors' mean squares sum below 1e-6."""
    base, xs = around_base(spread=1e-4)  # mean squares ~1e-8
    energy = [np.mean((x - base) ** 2) for x in xs]
    assert sum(energy) < 1e-6
    uniform = np_merge(base, [x - base for x in xs], [1 / 3] * 3, elect=True, normalize=True, lam=1.0)
    close(merged("sce", xs, base), uniform)


def test_model_stock_with_per_model_weights_is_mergekits_model_stock():
    base, xs = around_base()
    with ignoring("weight", "model_stock"):
        got = merged("model_stock", xs, base, model_params=[{"weight": 1.0}] * 3)
    close(got, ref_model_stock(xs, base))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_keeps_the_base_where_the_ratio_has_no_finite_value(filter_wise):
    """mergekit 0.1.5: |1 + (N - 1) cos| < 1e-6 (two opposite task vectors: cos = -1) gives t = 0."""
    base, (x,) = around_base(1)
    got = merged("model_stock", [x, 2 * base - x], base, filter_wise=filter_wise)
    assert np.array_equal(got, base)


@pytest.mark.parametrize(
    ("method", "n", "params", "ignored", "reference"),
    [
        ("slerp", 1, {"t": 0.3}, "weight", lambda b, xs: ref_slerp(0.3, b, xs[0])),
        ("nearswap", 1, {"t": 0.2}, "weight", lambda b, xs: ref_nearswap(0.2, b, xs[0])),
        ("ram", 3, {"epsilon": 0.1}, "weight", lambda b, xs: np_ram(xs, b, 0.1)),
        ("ramplus_tl", 3, {"epsilon": 0.1}, "density", lambda b, xs: np_ram(xs, b, 0.1, plus=(0.1, 0.2))),
        ("arcee_fusion", 1, {}, "weight", lambda b, xs: ref_arcee_fusion(b, xs[0])[0]),
        ("task_arithmetic", 3, {}, "density", lambda b, xs: np_merge(
            b, [x - b for x in xs], [1.0] * 3, elect=False, normalize=False, lam=1.0
        )),
    ],
)
def test_a_parameter_of_another_method_is_ignored_with_a_warning(method, n, params, ignored, reference):
    base, xs = around_base(n)
    with ignoring(ignored, method):
        got = merged(method, xs, base, model_params=[{ignored: 0.5}] * n, **params)
    close(got, reference(base, xs))


def test_top_level_and_shared_parameters_of_other_methods_are_ignored_too():
    base, xs = around_base()
    with ignoring("normalize", "sce"):
        close(merged("sce", xs, base, normalize=False), np_sce(xs, base, 1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredParameterWarning)  # int8_mask: mergekit's sce takes it (memory only)
        close(merged("sce", xs, base, int8_mask=True), np_sce(xs, base, 1.0))


def test_unknown_parameter_names_are_refused_with_suggestions():
    base, xs = around_base()
    with pytest.raises(ConfigError) as info:
        merged("sce", xs, base, model_params=[{"densty": 0.5}] * 3)
    msg = str(info.value)
    assert "models[0].parameters.densty" in msg and "no registered method knows it" in msg
    assert "valid: select_topk" in msg and "Did you mean 'density'" in msg
    with pytest.raises(ConfigError, match=r"no parameter 'lamda'.*Did you mean 'lambda'"):
        merged("ties", xs, base, lamda=0.5)


# ------------------------------------------------------------------ a base model as an input


def test_karcher_includes_the_base_model_after_the_models():
    """mergekit's karcher (base policy: ignored) gets [models..., base] and ignores weight."""
    base, xs = around_base()
    got = merged("karcher", xs, base, model_params=[{"weight": w} for w in (0.1, 0.5, 2.0)])
    close(got, ref_karcher([*xs, base]))
    assert not np.allclose(got, ref_karcher(xs))  # leaving the base out is a different merge


def test_linear_includes_the_base_model_after_the_models():
    """mergekit appends a base model missing from the models as one more input (weight: top level)."""
    base, xs = around_base()
    weights = [0.5, 0.25, 0.125]  # exact in float32, in which mergekit (and modelfuse) hold weights
    got = merged("linear", xs, base, model_params=[{"weight": w} for w in weights], weight=0.75)
    want = (sum(w * x for w, x in zip(weights, xs)) + 0.75 * base) / (sum(weights) + 0.75)
    close(got, want)
    # no top-level weight: the base weighs modelfuse's default 1 (mergekit requires one)
    plain = merged("linear", xs, base)
    close(plain, (base + sum(xs)) / 4)


def test_passthrough_with_a_base_model_is_refused_clearly():
    base, xs = around_base(1)
    with pytest.raises(ConfigError, match=r"'passthrough' takes at most 1 model.*base is one more input"):
        merged("passthrough", xs, base)


@pytest.mark.parametrize("name", list_methods())
def test_base_role_follows_mergekit(name):
    """Methods without a base role in mergekit take a named base as an input; the others never do."""
    m = get_method(name)
    note = m.mergekit
    if note.startswith("not in mergekit"):
        return
    if m.base == "none":
        assert note.startswith("base: no role")
    else:
        assert f"base: {m.base}" in note and "not an input" in note


# ------------------------------------------------------------------ multislerp: models equal to the base


def test_multislerp_of_models_equal_to_the_base_is_the_base():
    base, _ = around_base()
    for n in (2, 3, 4):
        got = merged("multislerp", [base.copy() for _ in range(n)], base, model_params=[{"weight": 1.0}] * n)
        assert np.array_equal(got, base)
    with pytest.raises(ConfigError, match="weighted sum of the models' directions is zero"):
        x = base + 1.0
        merged("multislerp", [x, 2 * base - x, x, 2 * base - x], base)  # antipodal task vectors


def test_multislerp_and_nuslerp_leave_the_base_out_of_the_inputs():
    base, xs = around_base(2)
    close(merged("multislerp", xs, base), ref_multislerp(xs, [1.0, 1.0], base))
    close(merged("nuslerp", xs, base), ref_nuslerp([1.0, 1.0], xs[0], xs[1], base))


# ------------------------------------------------------------------ sparsifying methods


@pytest.mark.parametrize(
    ("method", "params", "reference"),
    [
        ("ties", {"density": 0.5}, lambda b, xs, w: np_ties(xs, b, w, [0.5] * 3)),
        ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, lambda b, xs, w: np_merge(
            b, [np_breadcrumb(x - b, 0.5, 0.1) for x in xs], w, elect=False, normalize=False, lam=1.0
        )),
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}, lambda b, xs, w: np_merge(
            b, [np_breadcrumb(x - b, 0.5, 0.1) for x in xs], w, elect=True, normalize=False, lam=1.0
        )),
        # the random methods at density 1 draw nothing: mergekit's formula exactly
        ("dare_linear", {}, lambda b, xs, w: np_merge(b, [x - b for x in xs], w, elect=False, normalize=False, lam=1.0)),
        ("dare_ties", {}, lambda b, xs, w: np_merge(b, [x - b for x in xs], w, elect=True, normalize=False, lam=1.0)),
        ("della", {}, lambda b, xs, w: np_merge(b, [x - b for x in xs], w, elect=True, normalize=True, lam=1.0)),
        ("della_linear", {}, lambda b, xs, w: np_merge(b, [x - b for x in xs], w, elect=False, normalize=False, lam=1.0)),
    ],
)
def test_task_vector_methods_match_mergekits_formula(method, params, reference):
    base, xs = around_base()
    w = [1.0, 0.5, 0.8]
    close(merged(method, xs, base, model_params=[{"weight": v} for v in w], **params), reference(base, xs, w))


def tie_heavy(n: int = 4099, seed: int = 3) -> np.ndarray:
    """float32 task-vector entries on a coarse grid: most magnitudes are shared by hundreds of entries."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-6, 7, size=n) * 0.25).astype(np.float32)


def mergekit_magnitude_keep(tau: np.ndarray, density: float) -> np.ndarray:
    """mergekit.sparsify.magnitude on CPU: argsort(|tau|.float(), descending)[:int(density n)]."""
    w = torch.from_numpy(np.abs(tau)).float()
    keep = np.zeros(tau.size, bool)
    keep[torch.argsort(w, descending=True)[: int(density * tau.size)].numpy()] = True
    return keep


def mergekit_outlier_keep(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit.sparsify.magnitude_outliers on CPU: sort(|tau|.float()).indices[n_bot:n_bot + target]."""
    n = tau.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = np.zeros(n, bool)
    keep[torch.sort(torch.from_numpy(np.abs(tau)).float(), descending=False).indices[n_bot : n_bot + target].numpy()] = True
    return keep


@pytest.mark.parametrize("density", [0.3, 0.55])
def test_ties_tie_break_sort_keeps_mergekits_entries(density):
    tau = tie_heavy()
    base = np.zeros_like(tau)
    keep = mergekit_magnitude_keep(tau, density)
    got = merged("ties", [tau], base, density=density, tie_break="sort")
    assert np.array_equal(got, np.where(keep, tau, 0))  # one model: y = base + trimmed tau, exactly
    index = merged("ties", [tau], base, density=density)
    assert np.count_nonzero(index) == np.count_nonzero(got)  # as many kept ...
    assert not np.array_equal(index, got)  # ... but other equal-magnitude entries: not mergekit's bytes


def test_breadcrumbs_tie_break_sort_keeps_mergekits_entries():
    tau = tie_heavy()
    base = np.zeros_like(tau)
    keep = mergekit_outlier_keep(tau, 0.4, 0.05)
    got = merged("breadcrumbs", [tau], base, density=0.4, gamma=0.05, tie_break="sort")
    assert np.array_equal(got, np.where(keep, tau, 0))


# ------------------------------------------------------------------ where the notes are shown


def test_every_method_records_its_mergekit_parity():
    for name in list_methods():
        assert get_method(name).mergekit, name
    for name in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        note = get_method(name).mergekit
        assert "tie_break: sort" in note and "1e-5 of entries" in note


def test_list_methods_prints_a_block_per_method_with_its_mergekit_note(capsys):
    from modelfuse.cli import main

    assert main(["merge", "--list-methods"]) == 0
    out = capsys.readouterr().out
    for name in list_methods():
        assert f"\n{name}\n" in out
        assert f"  mergekit: {get_method(name).mergekit}" in out


def test_the_model_card_quotes_the_methods_mergekit_note(tmp_path, family):
    from modelfuse.merge import merge

    paths, _ = family
    recipe = {
        "merge_method": "ties",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"density": 0.5}} for i in (1, 2)],
    }
    card = (merge(recipe, tmp_path / "out", progress=False) / "README.md").read_text()
    assert f"mergekit parity of `ties`: {get_method('ties').mergekit}." in card


def test_a_mergekit_sce_recipe_runs_unchanged_from_the_command_line(tmp_path, family):
    """The recipe mergekit runs (weight: 1.0 under each model of an sce merge) merges, with a warning."""
    import yaml

    from modelfuse.cli import main

    paths, _ = family
    recipe = {
        "merge_method": "sce",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[f"ft{i}"]), "parameters": {"weight": 1.0}} for i in (1, 2, 3)],
        "parameters": {"select_topk": 0.5},
        "dtype": "float32",
    }
    (tmp_path / "sce.yaml").write_text(yaml.safe_dump(recipe))
    with ignoring("weight", "sce"):
        assert main(["merge", str(tmp_path / "sce.yaml"), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
