"""``modelfuse ensemble``: members and ensemble metrics against NumPy, fits, factories, bad inputs."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from modelfuse.cli import main
from modelfuse.data import labels_of, load
from modelfuse.io import save_state_dict
from modelfuse.zoo import build_pool, create_model, predict


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three small CNNs and one MLP trained briefly on digits, saved as safetensors files."""
    folder = tmp_path_factory.mktemp("ensemble-ckpts")
    cnns = build_pool("cnn", "digits", k=3, epochs=2, cache=False, progress=False)
    mlp = build_pool("mlp", "digits", k=1, epochs=2, cache=False, progress=False)
    paths = []
    for i, m in enumerate([*cnns.members, *mlp.members]):
        path = folder / f"{'cnn' if i < 3 else 'mlp'}{i}.safetensors"
        save_state_dict(m, path)
        paths.append(path)
    return folder, paths, [*cnns.members, *mlp.members]


def run_json(capsys, *args):
    code = main(["ensemble", *map(str, args), "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_metrics(log_p, y):
    p = np.exp(log_p)
    return {
        "accuracy": (log_p.argmax(1) == y).mean(),
        "nll": -log_p[np.arange(len(y)), y].mean(),
        "brier": ((p - np.eye(p.shape[1])[y]) ** 2).sum(1).mean(),
    }


def test_members_and_mean_of_probabilities_match_numpy(checkpoints, capsys):
    _, paths, models = checkpoints
    result = run_json(capsys, *paths[:3], "--arch", "cnn")
    test = load("digits").test
    y = labels_of(test).numpy()
    logits = np.stack([predict(m, test).double().numpy() for m in models[:3]])
    log_p = np_log_softmax(logits)
    for row, lp in zip(result["members"], log_p):
        for key, value in np_metrics(lp, y).items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert row["weight"] == pytest.approx(1 / 3)
    ensemble = np.log(np.exp(log_p).mean(0))
    for key, value in np_metrics(ensemble, y).items():
        assert result["ensemble"][key] == pytest.approx(value, rel=1e-9)
    assert result["members_mean"]["nll"] == pytest.approx(np.mean([r["nll"] for r in result["members"]]))
    preds = logits.argmax(-1)
    pairs = [(preds[i] != preds[j]).mean() for i in range(3) for j in range(i + 1, 3)]
    assert result["disagreement"] == pytest.approx(np.mean(pairs))
    # the best member's errors that another member gets right, in NumPy
    right = preds == y
    nll = [np_metrics(lp, y)["nll"] for lp in log_p]
    best = max(range(3), key=lambda i: (right[i].mean(), -nll[i]))
    room = result["room"]
    assert room["names"] == [p.name for p in paths[:3]] and room["best"] == best
    assert room["best_wrong"] == int((~right[best]).sum())
    assert room["fixable"] == int((~right[best] & np.delete(right, best, 0).any(0)).sum())
    assert room["oracle_accuracy"] == pytest.approx(right.any(0).mean())
    assert result["samples"] == len(y)
    # the paired comparison with the best member (highest accuracy, then lowest NLL), from NumPy
    rows = result["members"]
    best = min(range(3), key=lambda i: (-rows[i]["accuracy"], rows[i]["nll"]))
    comparison = result["comparison"]
    assert comparison["against"] == rows[best]["name"] and comparison["n"] == len(y)
    right_e, right_b = ensemble.argmax(1) == y, log_p[best].argmax(1) == y
    assert comparison["accuracy_difference"] == pytest.approx(right_e.mean() - right_b.mean(), abs=1e-12)
    assert (comparison["only_a"], comparison["only_b"]) == (
        (right_e & ~right_b).sum(),
        (right_b & ~right_e).sum(),
    )
    nll_e, nll_b = -ensemble[np.arange(len(y)), y], -log_p[best][np.arange(len(y)), y]
    assert comparison["nll_difference"] == pytest.approx((nll_e - nll_b).mean(), rel=1e-9)
    low, high = comparison["accuracy_interval"]
    assert low <= comparison["accuracy_difference"] <= high


def test_heterogeneous_members_weights_and_vote(checkpoints, capsys):
    _, paths, models = checkpoints
    args = [paths[0], paths[3], "--arch", "cnn", "--arch", "mlp", "--weights", "3", "1", "--split", "val"]
    result = run_json(capsys, *args)
    val = load("digits").val
    y = labels_of(val).numpy()
    p = np.exp(np_log_softmax(np.stack([predict(m, val).double().numpy() for m in (models[0], models[3])])))
    expected = np_metrics(np.log(0.75 * p[0] + 0.25 * p[1]), y)
    assert result["ensemble"]["nll"] == pytest.approx(expected["nll"], rel=1e-9)
    assert [r["arch"] for r in result["members"]] == ["cnn", "mlp"]
    voted = run_json(capsys, *paths[:3], "--arch", "cnn", "--combine", "vote")
    assert voted["ensemble"]["combine"] == "vote"
    assert (
        voted["ensemble"]["nll"] is None or voted["ensemble"]["nll"] > 0
    )  # inf (label without votes) -> null
    if voted["ensemble"]["nll"] is None:  # then the NLL difference is not comparable either
        assert voted["comparison"]["nll_difference"] is None and voted["comparison"]["nll_interval"] == [
            None,
            None,
        ]
    assert voted["comparison"]["accuracy_difference"] == pytest.approx(
        voted["ensemble"]["accuracy"] - max(r["accuracy"] for r in voted["members"]), abs=1e-12
    )


@pytest.mark.parametrize("fit", ["weights", "temperature", "greedy", "stacking"])
def test_fit_on_validation_then_evaluate(checkpoints, capsys, fit):
    _, paths, models = checkpoints
    result = run_json(capsys, *paths[:3], "--arch", "cnn", "--fit", fit)
    fitted = result["fitted"]
    assert fitted["method"] == fit
    val = load("digits").val
    y = labels_of(val).numpy()
    p = np.exp(np_log_softmax(np.stack([predict(m, val).double().numpy() for m in models[:3]])))
    mean_val_nll = np_metrics(np.log(p.mean(0)), y)["nll"]
    if fit == "stacking":
        assert fitted["val_nll_mean"] == pytest.approx(mean_val_nll, rel=1e-9)
    else:
        w = np.asarray(fitted["weights"])
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        mixture = np.log(np.einsum("k,knc->nc", w, p))
        t = fitted.get("temperature", 1.0)
        assert fitted["val_nll"] == pytest.approx(np_metrics(np_log_softmax(mixture / t), y)["nll"], rel=1e-6)
        assert fitted["val_nll"] <= mean_val_nll + 1e-12  # at least as good as the plain mean on validation
    assert 0 <= fitted["accuracy"] <= 1 and fitted["nll"] > 0
    # the fitted ensemble against the best member on the test split, from the rows' own figures
    best = max(result["members"], key=lambda r: (r["accuracy"], -r["nll"]))
    comparison = fitted["comparison"]
    assert comparison["against"] == best["name"] and comparison["n"] == result["samples"]
    assert comparison["accuracy_difference"] == pytest.approx(
        fitted["accuracy"] - best["accuracy"], abs=1e-12
    )
    assert comparison["nll_difference"] == pytest.approx(fitted["nll"] - best["nll"], rel=1e-9)
    assert comparison["only_a"] - comparison["only_b"] == round(
        comparison["accuracy_difference"] * comparison["n"]
    )
    if fit != "stacking":  # the test split's mixture, in NumPy, from the fitted weights and temperature
        test = load("digits").test
        p_test = np.exp(np_log_softmax(np.stack([predict(m, test).double().numpy() for m in models[:3]])))
        log_p = np_log_softmax(np.log(np.einsum("k,knc->nc", w, p_test)) / t)
        for key, value in np_metrics(log_p, labels_of(test).numpy()).items():
            assert fitted[key] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_table_output(checkpoints, capsys):
    _, paths, _ = checkpoints
    assert main(["ensemble", *map(str, paths[:2]), "--arch", "cnn", "--fit", "temperature"]) == 0
    out = capsys.readouterr().out
    for text in (
        "cnn0.safetensors (cnn)",
        "members' mean",
        "ensemble: mean_prob",
        "fitted on val",
        "disagreement",
        "room for fusion: cnn",
        "ensemble - cnn",
        "fitted (temperature) - cnn",
        "95% paired bootstrap interval",
    ):
        assert text in out


def test_factory_architecture(checkpoints, capsys, tmp_path, monkeypatch):
    _, paths, _ = checkpoints
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            from modelfuse.zoo import create_model

            def digits_cnn(input_shape, num_classes):
                return create_model("cnn", input_shape=input_shape, num_classes=num_classes)

            def nine_classes():
                return create_model("cnn", input_shape=(1, 8, 8), num_classes=9)

            NOT_A_FACTORY = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_json(capsys, paths[0], "--arch", "my_models:digits_cnn")
    reference = run_json(capsys, paths[0], "--arch", "cnn")
    assert result["members"][0]["nll"] == reference["members"][0]["nll"]
    torch.save(create_model("cnn", input_shape=(1, 8, 8), num_classes=9).state_dict(), tmp_path / "nine.pt")
    code = main(
        [
            "ensemble",
            str(paths[0]),
            str(tmp_path / "nine.pt"),
            "--arch",
            "cnn",
            "--arch",
            "my_models:nine_classes",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "nine.pt (my_models:nine_classes) predicts outputs of shape (359, 9)" in err
    assert "(359, 10)" in err
    for arch, message in (
        ("my_models:missing", "cannot import 'missing' from 'my_models'"),
        ("no_such_module:f", "cannot import 'f' from 'no_such_module'"),
        ("my_models:NOT_A_FACTORY", "is a int, not a callable factory"),
    ):
        assert main(["ensemble", str(paths[0]), "--arch", arch]) == 2
        assert message in capsys.readouterr().err


def test_bad_inputs_are_clear_errors_and_write_nothing(checkpoints, capsys, tmp_path, monkeypatch):
    folder, paths, _ = checkpoints
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    cases = [
        ([paths[3], "--arch", "cnn"], "mlp3.safetensors does not fit the ConvNet"),
        ([paths[0], "--arch", "cnn", "--arch", "mlp", "--arch", "cnn"], "3 --arch for 1 checkpoints"),
        ([folder / "absent.safetensors", "--arch", "cnn"], "no such file or folder"),
        ([*paths[:2], "--arch", "cnn", "--weights", "1"], "1 weights for 2 members"),
        ([*paths[:2], "--arch", "cnn", "--weights", "1", "-1"], "must be non-negative"),
        ([*paths[:2], "--arch", "cnn", "--weights", "0", "0"], "sum to 0"),
        ([paths[0], "--arch", "cnn", "--combine", "median"], "evaluates classifiers"),
        ([paths[0], "--arch", "cnn", "--combine", "vote", "--fit", "weights"], "leave out --combine vote"),
        ([*paths[:2], "--arch", "cnn", "--fit", "greedy", "--split", "val"], "leave out --split val"),
        (
            [paths[0], "--arch", "cnn", "--arch-option", "width"],
            "--arch-option 'width': expected KEY=VALUE, e.g. --arch-option width=32",
        ),
        ([paths[0], "--arch", "cnm"], "unknown model 'cnm'"),
        ([paths[0], "--arch", "cnn", "--data", "digitz"], "unknown dataset 'digitz'"),
    ]
    for args, message in cases:
        assert main(["ensemble", *map(str, args)]) == 2, args
        assert message in capsys.readouterr().err, (args, message)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert list(tmp_path.iterdir()) == []
