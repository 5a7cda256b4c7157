"""The loss-barrier tool, checked against a NumPy closed form, identical models and BatchNorm by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import TensorDataset

from modelfuse.align import interpolate, loss_barrier
from modelfuse.data import Splits
from modelfuse.errors import ConfigError


def _linear(seed: int, d: int = 5, c: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(d, c)
    with torch.no_grad():
        model.weight.mul_(3.0)
    return model


def _data(n: int = 200, d: int = 5, c: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g))


def _numpy_path(a: nn.Linear, b: nn.Linear, data: TensorDataset, ts: np.ndarray):
    x, y = data.tensors[0].double().numpy(), data.tensors[1].numpy()
    wa, ba = a.weight.detach().double().numpy(), a.bias.detach().double().numpy()
    wb, bb = b.weight.detach().double().numpy(), b.bias.detach().double().numpy()
    losses, accs = [], []
    for t in ts:
        w, bias = (1 - t) * wa + t * wb, (1 - t) * ba + t * bb
        z = x @ w.T + bias
        m = z.max(axis=1, keepdims=True)
        log_p = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
        losses.append(-log_p[np.arange(len(y)), y].mean())
        accs.append((z.argmax(axis=1) == y).mean())
    return np.array(losses), np.array(accs)


def test_identical_models_have_no_barrier():
    a = _linear(0)
    result = loss_barrier(a, copy.deepcopy(a), _data())
    assert len(result.ts) == 25 and result.ts[0] == 0.0 and result.ts[-1] == 1.0
    assert abs(result.barrier) < 1e-7
    assert max(result.losses) - min(result.losses) < 1e-7


def test_linear_softmax_path_matches_numpy():
    a, b, data = _linear(0), _linear(1), _data()
    result = loss_barrier(a, b, data, points=11)
    ts = np.linspace(0, 1, 11)
    losses, accs = _numpy_path(a, b, data, ts)
    np.testing.assert_allclose(result.ts, ts, atol=1e-12)
    np.testing.assert_allclose(result.losses, losses, atol=1e-5)
    np.testing.assert_allclose(result.accuracies, accs, atol=1e-12)
    expected = losses.max() - (losses[0] + losses[-1]) / 2
    assert result.barrier == pytest.approx(expected, abs=1e-5)
    assert result.barrier > 0.05  # two random linear models: a real barrier, so the check is not vacuous
    i = 5
    assert result.midpoint == pytest.approx({"t": 0.5, "loss": losses[i], "accuracy": accs[i]}, abs=1e-5)
    # the models are left as they were
    assert torch.equal(a.weight, _linear(0).weight)


def test_split_of_splits_and_bad_inputs():
    a, b = _linear(0), _linear(1)
    splits = Splits("toy", _data(seed=1), _data(seed=2), _data(seed=3), 3, (5,))
    on_val = loss_barrier(a, b, splits, split="val", points=3)
    direct = loss_barrier(a, b, _data(seed=2), points=3)
    assert on_val.losses == pytest.approx(direct.losses) and on_val.split == "val"
    with pytest.raises(ConfigError, match="points >= 2"):
        loss_barrier(a, b, splits, points=1)
    with pytest.raises(ConfigError, match="split must be one of"):
        loss_barrier(a, b, splits, split="dev")
    with pytest.raises(ConfigError, match=r"tensor 'weight' has shape \(3, 4\) in model B"):
        loss_barrier(a, nn.Linear(4, 3), splits)
    with pytest.raises(ConfigError, match=r"cannot run on the 'test' data \(one input is \(4,\)\)"):
        loss_barrier(a, b, _data(d=4))


def test_batchnorm_running_stats_are_interpolated():
    def net(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].num_batches_tracked.fill_(seed + 7)
        return m

    a, b = net(0), net(1)
    mid = interpolate(a, b, 0.25)
    for name in ("running_mean", "running_var"):
        expected = 0.75 * getattr(a[1], name) + 0.25 * getattr(b[1], name)
        torch.testing.assert_close(getattr(mid[1], name), expected, atol=1e-6, rtol=0)
    assert int(mid[1].num_batches_tracked) == 7
    for ta, t0 in zip(a.state_dict().values(), interpolate(a, b, 0.0).state_dict().values()):
        assert torch.equal(ta, t0)


def test_table_and_png(tmp_path):
    result = loss_barrier(_linear(0), _linear(1), _data(), points=5)
    console = Console(record=True, width=100)
    result.print(console)
    text = console.export_text()
    assert "loss barrier" in text and "0.500" in text
    path = result.plot(tmp_path / "plots" / "barrier.png", title="toy")
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="PNG"):
        result.plot(tmp_path / "barrier.pdf")


def test_cli_barrier(tmp_path, capsys):
    import json

    from modelfuse.cli import main
    from modelfuse.data import load
    from modelfuse.io import save_state_dict
    from modelfuse.zoo import create_model, evaluate

    splits = load("digits")
    models, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("mlp", input_shape=splits.input_shape, num_classes=10, hidden=[16])
        path = tmp_path / f"m{seed}.safetensors"
        save_state_dict(model, path)
        models.append(model)
        paths.append(str(path))
    png = tmp_path / "out" / "path.png"
    args = [
        "barrier",
        *paths,
        "--arch",
        "mlp",
        "--arch-option",
        "hidden=[16]",
        "--points",
        "5",
        "-o",
        str(png),
    ]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["t"] for p in report["path"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for end, model in ((0, models[0]), (-1, models[1])):  # the endpoints are the checkpoints themselves
        metrics = evaluate(model, splits.test)
        assert report["path"][end]["loss"] == pytest.approx(metrics["nll"], abs=1e-6)
        assert report["path"][end]["accuracy"] == pytest.approx(metrics["accuracy"])
    losses = [p["loss"] for p in report["path"]]
    assert report["barrier"] == pytest.approx(max(losses) - (losses[0] + losses[-1]) / 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = png.read_bytes()
    # an existing PNG is kept unless --force; bad inputs are one-line errors that write nothing
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert png.read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert "loss barrier" in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    assert main(["barrier", *paths, "--arch", "mlp", "--arch-option", "hidden=[8]", "-o", str(bad)]) == 2
    assert "does not fit the MLP" in capsys.readouterr().err
    assert not bad.exists()
    assert (
        main(
            [
                "barrier",
                *paths,
                "--arch",
                "mlp",
                "--arch-option",
                "hidden=[16]",
                "-o",
                str(tmp_path / "x.pdf"),
            ]
        )
        == 2
    )
    assert "PNG" in capsys.readouterr().err
