"""``modelfuse align``: the written model is B's function, equals ``align()``, and bad inputs write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from modelfuse.align import align
from modelfuse.cli import main
from modelfuse.data import load
from modelfuse.io import save_state_dict
from modelfuse.zoo import create_model

HIDDEN = "hidden=[16, 16]"


def mlp64():
    """A factory that ignores the dataset's input shape (always digits inputs, 1x8x8): for the test of
    data that does not fit the model."""
    torch.manual_seed(0)
    return create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[16, 16])


@pytest.fixture
def pair(tmp_path):
    splits = load("digits")
    models, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("mlp", input_shape=splits.input_shape, num_classes=10, hidden=[16, 16]).eval()
        path = tmp_path / f"m{seed}.safetensors"
        save_state_dict(model, path)
        models.append(model)
        paths.append(str(path))
    return splits, models, paths


def _aligned_model(splits, path):
    model = create_model("mlp", input_shape=splits.input_shape, num_classes=10, hidden=[16, 16])
    model.load_state_dict(load_file(path))
    return model.eval()


@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_align_writes_b_permuted(pair, tmp_path, capsys, method):
    splits, (model_a, model_b), paths = pair
    out = tmp_path / "out" / "b_aligned.safetensors"
    args = ["align", *paths, "--arch", "mlp", "--arch-option", HIDDEN, "--method", method, "-o", str(out)]
    assert main([*args, "--json", "--barrier", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == method
    assert report["converged"] is True and report["passes"] >= 1
    assert report["output"] == str(out)
    assert report["barrier_after"] < report["barrier_before"]
    aligned = _aligned_model(splits, out)
    # B's function, to 1e-5, on real and random inputs
    x = torch.cat([torch.stack([splits.test[i][0] for i in range(64)]), torch.randn(64, *splits.input_shape)])
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), model_b(x), atol=1e-5, rtol=0)
    # something moved: the two random initialisations are not already aligned
    sb = model_b.state_dict()
    assert any(not torch.equal(v, sb[k]) for k, v in aligned.state_dict().items())
    # what the Python API gives
    if method == "weight_matching":
        expected = align(model_b, to=model_a)
    else:
        loader = torch.utils.data.DataLoader(splits.train, batch_size=512)
        expected = align(model_b, to=model_a, method=method, data=loader)
    for k, v in expected.state_dict().items():
        assert torch.equal(aligned.state_dict()[k], v), k
    # the reported barrier is loss_barrier's figure for A and B on the split (its own tests check it by hand)
    from modelfuse.align import loss_barrier

    before = loss_barrier(model_a, model_b, splits, split="train", points=5).barrier
    assert report["barrier_before"] == pytest.approx(before, abs=1e-6)

    # an existing output is kept unless --force
    before_bytes = out.read_bytes()
    assert main(args) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before_bytes
    assert main([*args, "--force"]) == 0
    assert "aligned model written to" in capsys.readouterr().out


def test_align_bad_inputs_write_nothing(pair, tmp_path, capsys):
    splits, _, paths = pair
    out = tmp_path / "never.safetensors"
    base = ["--arch", "mlp", "--arch-option", HIDDEN, "-o", str(out)]

    # different architectures: the first differing parameter is named
    torch.manual_seed(2)
    other = create_model("mlp", input_shape=splits.input_shape, num_classes=10, hidden=[16, 8])
    other_path = tmp_path / "other.safetensors"
    save_state_dict(other, other_path)
    assert main(["align", paths[0], str(other_path), *base]) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err
    diff = next(k for k, v in other.state_dict().items() if v.shape != load_file(paths[0])[k].shape)
    assert repr(diff) in err and str(other_path) in err

    # data whose batches do not fit the model (mnist1d has 1x40 inputs, the model takes 1x8x8)
    assert (
        main(["align", *paths, "--arch", "tests.test_cli_align:mlp64", "--data", "mnist1d", "-o", str(out)])
        == 2
    )
    err = capsys.readouterr().err
    assert "do not fit" in err and "(1, 40)" in err

    # a checkpoint that does not fit --arch names the file
    assert main(["align", *paths, "--arch", "mlp", "--arch-option", "hidden=[8]", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the MLP" in err and paths[0] in err

    # not a safetensors path
    assert (
        main(["align", *paths, "--arch", "mlp", "--arch-option", HIDDEN, "-o", str(tmp_path / "x.pt")]) == 2
    )
    assert "safetensors" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m0.safetensors",
        "m1.safetensors",
        "other.safetensors",
    ]


def test_align_cnn_on_an_image_folder(tmp_path, capsys):
    """Activation matching of a BatchNorm CNN on a user's image folder (modelfuse.data's image_folder)."""
    import numpy as np

    pytest.importorskip("torchvision")
    from PIL import Image

    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    data = load("image_folder", root=root, image_size=8)
    models, paths = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model(
            "cnn", input_shape=data.input_shape, num_classes=2, widths=[4, 8], batch_norm=True
        )
        with torch.no_grad():  # BatchNorm statistics that are not the identity
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        models.append(model.eval())
        paths.append(tmp_path / f"cnn{seed}.safetensors")
        save_state_dict(model, paths[-1])
    out = tmp_path / "cnn1_aligned.safetensors"
    args = ["align", *map(str, paths), "--arch", "cnn", "--arch-option", "widths=[4, 8]"]
    args += ["--arch-option", "batch_norm=true", "--method", "activation_matching", "--batch-size", "8"]
    args += ["--data", "image_folder", "--data-option", f"root={root}", "--data-option", "image_size=8"]
    assert main([*args, "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "activation_matching"
    aligned = create_model("cnn", input_shape=data.input_shape, num_classes=2, widths=[4, 8], batch_norm=True)
    aligned.load_state_dict(load_file(out))
    aligned.eval()
    x = torch.stack([data.train[i][0] for i in range(len(data.train))])
    with torch.no_grad():
        torch.testing.assert_close(aligned(x), models[1](x), atol=1e-5, rtol=0)
    loader = torch.utils.data.DataLoader(data.train, batch_size=8)
    expected = align(models[1], to=models[0], method="activation_matching", data=loader)
    for k, v in expected.state_dict().items():
        assert torch.equal(aligned.state_dict()[k], v), k
