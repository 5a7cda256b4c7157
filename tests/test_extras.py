"""The core works without the optional extras; a feature that needs one names it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_EXTRAS = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torchvision", "transformers", "timm"}:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, BlockExtras())
    """
)

CORE_WITHOUT_EXTRAS = textwrap.dedent(
    """
    import tempfile, pathlib, torch
    from modelfuse.data import load
    from modelfuse.errors import MissingExtraError
    from modelfuse.io import open_checkpoint, write_checkpoint
    from modelfuse.zoo import create_model, evaluate, list_models, get_model, train
    from modelfuse.cli import main

    assert load("digits", upsample=True).input_shape == (3, 32, 32)
    data = load("digits")
    for name in list_models():
        for shape in get_model(name).input_shapes:
            model = create_model(name, input_shape=shape, num_classes=10).eval()
            assert model(torch.zeros(2, *shape)).shape == (2, 10), (name, shape)
    model = create_model("mlp", input_shape=data.input_shape, num_classes=10)
    train(model, data, epochs=1, seed=0)
    assert evaluate(model, data.test)["accuracy"] > 0.5
    with tempfile.TemporaryDirectory() as tmp:
        out = write_checkpoint(model.state_dict(), pathlib.Path(tmp) / "mlp")
        with open_checkpoint(out) as ckpt:
            for key, value in model.state_dict().items():
                assert torch.equal(ckpt.get(key), value), key
        assert main(["--quiet", "inspect", str(out), "--summary"]) == 0
        try:
            load("image_folder", root=tmp)
        except MissingExtraError as exc:
            assert "modelfuse[vision]" in str(exc), exc
        else:
            raise AssertionError("image_folder worked without torchvision")
    for extra in ("torchvision", "transformers", "timm"):
        assert extra not in sys.modules, extra
    print("core ok")
    """
)


def test_core_works_without_torchvision_and_transformers():
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_EXTRAS + CORE_WITHOUT_EXTRAS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "core ok" in out.stdout
