"""Tests of modelfuse.data: the registry, digits / digits_hard / mnist1d / image_folder, Splits.subset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from modelfuse.data import Splits, cache_dir, labels_of, list_datasets, load, stratified_split
from modelfuse.data import mnist_1d as mnist_1d_module
from modelfuse.errors import ConfigError, DataError, MissingExtraError, RegistryError


def _all_x(s: Splits) -> torch.Tensor:
    return torch.cat([s.train.tensors[0], s.val.tensors[0], s.test.tensors[0]])


def _counts(labels: torch.Tensor, k: int = 10) -> np.ndarray:
    return np.bincount(labels.numpy(), minlength=k)


# --- registry and cache dir ---------------------------------------------------------


def test_registry_lists_every_dataset():
    assert list_datasets() == ["digits", "digits_hard", "image_folder", "mnist1d"]
    assert list_datasets("digits*") == ["digits", "digits_hard"]


def test_unknown_dataset_names_close_matches():
    with pytest.raises(RegistryError) as err:
        load("digit")
    assert "'digits'" in str(err.value) and "Did you mean" in str(err.value)


def test_bad_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="upsample"):
        load("digits", upsampel=True)


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELFUSE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MODELFUSE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "modelfuse"


def test_tests_use_a_temporary_cache(modelfuse_cache):
    assert cache_dir() == modelfuse_cache


# --- digits -------------------------------------------------------------------------


def test_digits_shapes_range_and_split():
    s = load("digits")
    assert (s.name, s.num_classes, s.input_shape) == ("digits", 10, (1, 8, 8))
    assert (len(s.train), len(s.val), len(s.test)) == (1078, 360, 359)
    x = _all_x(s)
    assert x.dtype == torch.float32 and x.min() == 0.0 and x.max() == 1.0
    # stratified: every class holds about 60/20/20 of its images in train/val/test
    train, val = _counts(labels_of(s.train)), _counts(labels_of(s.val))
    total = train + val + _counts(labels_of(s.test))
    assert total.sum() == 1797
    assert np.all(np.abs(train - 0.6 * total) <= 1) and np.all(np.abs(val - 0.2 * total) <= 1)
    json.dumps(s.spec)
    assert s.spec == {
        "name": "digits",
        "upsample": False,
        "split_seed": 0,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
    }


def test_digits_is_deterministic_and_split_seed_changes_the_split():
    a, b, c = load("digits"), load("digits"), load("digits", split_seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert a.spec != c.spec


def test_stratified_split_is_a_partition():
    labels = np.repeat(np.arange(5), [7, 10, 3, 12, 1])
    parts = stratified_split(labels, [0.6, 0.2, 0.2], seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))
    assert [len(p) for p in parts] == [20, 6, 7]  # round(0.6 * 33), round(0.8 * 33) - 20, the rest
    for part, f in zip(parts, [0.6, 0.2, 0.2]):
        assert np.all(np.abs(np.bincount(labels[part], minlength=5) - f * np.bincount(labels)) < 1 + 1e-9)
    assert all(np.array_equal(a, b) for a, b in zip(parts, stratified_split(labels, [0.6, 0.2, 0.2], seed=3)))
    assert [len(p) for p in stratified_split(np.repeat([0, 1], 5), [0.8, 0.1, 0.1], seed=0)] == [8, 1, 1]
    with pytest.raises(ConfigError):
        stratified_split(labels, [0.5, 0.2], seed=0)


def test_digits_upsampled_matches_plain_digits():
    plain, up = load("digits"), load("digits", upsample=True)
    assert up.input_shape == (3, 32, 32) and up.spec["upsample"] is True
    x = up.train.tensors[0]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert torch.equal(up.train.tensors[1], plain.train.tensors[1])
    # bilinear upsampling preserves each image's mean intensity up to border effects
    assert torch.allclose(x[:, 0].mean((1, 2)), plain.train.tensors[0][:, 0].mean((1, 2)), atol=0.03)
    assert x.min() >= 0.0 and x.max() <= 1.0


# --- digits_hard ----------------------------------------------------------------------


def test_digits_hard_without_corruption_is_digits():
    hard = load("digits_hard", noise=0.0, occlusion=0, train_fraction=1.0)
    plain = load("digits")
    for name in ("train", "val", "test"):
        for a, b in zip(getattr(hard, name).tensors, getattr(plain, name).tensors):
            assert torch.equal(a, b)


def test_digits_hard_is_fixed_and_occluded():
    a, b = load("digits_hard"), load("digits_hard")
    assert torch.equal(_all_x(a), _all_x(b))
    other = load("digits_hard", corruption_seed=1)
    assert not torch.equal(_all_x(a), _all_x(other))
    # noise-free, every image contains an all-zero square of the occlusion size
    k = 3
    x = _all_x(load("digits_hard", noise=0.0, occlusion=k))
    windows = x[:, 0].unfold(1, k, 1).unfold(2, k, 1)  # (N, 8-k+1, 8-k+1, k, k)
    assert bool((windows.abs().amax((-1, -2)) == 0).flatten(1).any(1).all())


def test_digits_hard_train_fraction_thins_only_train():
    full = load("digits_hard", train_fraction=1.0)
    half = load("digits_hard", train_fraction=0.5)
    assert half.spec["train_fraction"] == 0.5
    assert abs(len(half.train) - len(full.train) / 2) <= 10
    assert torch.equal(half.test.tensors[0], full.test.tensors[0])
    assert torch.equal(half.val.tensors[0], full.val.tensors[0])
    assert np.all(np.abs(_counts(labels_of(half.train)) - _counts(labels_of(full.train)) / 2) <= 1)
    with pytest.raises(ConfigError):
        load("digits_hard", train_fraction=0.0)


def test_digits_hard_upsample():
    s = load("digits_hard", upsample=True)
    assert s.input_shape == (3, 32, 32) and s.spec["upsample"] is True


# --- Splits.subset --------------------------------------------------------------------


def test_subset_by_labels_restricts_train_and_val_keeps_test():
    s = load("digits")
    sub = s.subset(labels=[3, 1, 1])
    assert set(labels_of(sub.train).tolist()) == {1, 3}
    assert set(labels_of(sub.val).tolist()) == {1, 3}
    assert torch.equal(sub.test.tensors[0], s.test.tensors[0])
    assert sub.num_classes == 10  # labels are not remapped
    assert sub.spec["subsets"] == [{"labels": [1, 3], "fraction": None, "seed": 0}]
    assert "subsets" not in s.spec
    assert len(sub.train) == int((labels_of(s.train) == 1).sum() + (labels_of(s.train) == 3).sum())


def test_subset_fraction_is_seeded_and_stratified():
    s = load("digits")
    a, b, c = s.subset(fraction=0.25), s.subset(fraction=0.25), s.subset(fraction=0.25, seed=1)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert np.all(np.abs(_counts(labels_of(a.train)) - _counts(labels_of(s.train)) / 4) <= 1)
    assert len(a.val) == len(s.val)
    chained = s.subset(labels=[0, 1]).subset(fraction=0.5)
    assert len(chained.spec["subsets"]) == 2
    assert set(labels_of(chained.train).tolist()) == {0, 1}


def test_subset_rejects_bad_arguments():
    s = load("digits")
    with pytest.raises(ConfigError):
        s.subset(labels=[10])
    with pytest.raises(ConfigError):
        s.subset(labels=[])
    with pytest.raises(ConfigError):
        s.subset(fraction=1.5)


def test_subset_of_lazy_dataset_uses_subset():
    s = load("digits")
    lazy = Splits("lazy", Subset(s.train, list(range(100))), s.val, s.test, 10, (1, 8, 8), {"name": "lazy"})
    sub = lazy.subset(labels=[2])
    assert isinstance(sub.train, Subset)
    assert set(labels_of(sub.train).tolist()) == {2}
    assert len(sub.train) == int((s.train.tensors[1][:100] == 2).sum())


# --- mnist1d --------------------------------------------------------------------------


def test_mnist1d_matches_the_generator_and_is_cached(monkeypatch):
    from mnist1d.data import get_dataset_args, make_dataset

    before = np.random.get_state()[1].copy()
    s = load("mnist1d", num_samples=1000, seed=7)
    assert np.array_equal(np.random.get_state()[1], before)  # the generator's np.random.seed is undone
    assert (s.input_shape, s.num_classes) == ((1, 40), 10)
    assert (len(s.train), len(s.val), len(s.test)) == (640, 160, 200)
    args = get_dataset_args()
    args.num_samples, args.seed = 1000, 7
    ref = make_dataset(args)
    np.testing.assert_allclose(s.test.tensors[0][:, 0].numpy(), ref["x_test"], rtol=1e-6, atol=1e-6)
    assert torch.equal(s.test.tensors[1], torch.as_tensor(ref["y_test"]))
    assert sorted(torch.cat([s.train.tensors[1], s.val.tensors[1]]).tolist()) == sorted(ref["y"].tolist())
    files = list((cache_dir() / "data").glob("mnist1d-*.npz"))
    assert files and not list((cache_dir() / "data").glob(".*tmp"))

    def no_generation(args):
        raise AssertionError("generated again instead of loading the cache")

    monkeypatch.setattr(mnist_1d_module, "_generate", no_generation)
    again = load("mnist1d", num_samples=1000, seed=7)
    assert torch.equal(again.train.tensors[0], s.train.tensors[0])
    assert again.spec == s.spec and again.spec["generator"]["num_samples"] == 1000


def test_mnist1d_rebuilds_a_damaged_cache_file():
    s = load("mnist1d", num_samples=500, seed=3)
    (path,) = [p for p in (cache_dir() / "data").glob("mnist1d-*.npz") if _holds(p, 400)]
    path.write_bytes(b"not a zip file")
    again = load("mnist1d", num_samples=500, seed=3)
    assert torch.equal(again.test.tensors[0], s.test.tensors[0])
    assert _holds(path, 400)


def _holds(path: Path, n_train: int) -> bool:
    try:
        with np.load(path) as npz:
            return len(npz["y"]) == n_train
    except Exception:
        return False


def test_mnist1d_generator_options_are_validated_and_in_the_spec():
    with pytest.raises(ConfigError, match="shear_scale"):
        load("mnist1d", num_samples=500, generator={"shear": 0.1})
    s = load("mnist1d", num_samples=500, generator={"shear_scale": 0.5}, cache=False)
    assert s.spec["generator"]["shear_scale"] == 0.5


# --- image_folder ---------------------------------------------------------------------


def _write_images(folder: Path, classes: dict[str, int], size: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate(classes.items()):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.full((size, size, 3), 40 * c, dtype=np.uint8) + rng.integers(
                0, 30, (size, size, 3), dtype=np.uint8
            )
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_image_folder_splits_a_flat_folder(tmp_path):
    _write_images(tmp_path, {"cat": 10, "dog": 10, "eel": 10})
    s = load("image_folder", root=tmp_path, image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert (s.num_classes, s.input_shape, s.classes) == (3, (3, 8, 8), ["cat", "dog", "eel"])
    assert (len(s.train), len(s.val), len(s.test)) == (18, 6, 6)
    assert isinstance(s.train, Subset)
    x, y = s.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert _counts(labels_of(s.val), 3).tolist() == [2, 2, 2]
    all_idx = sorted(s.train.indices + s.val.indices + s.test.indices)
    assert all_idx == list(range(30))
    # ImageNet normalisation: class-0 pixels are at most 29/255, below every channel mean
    dark = next(i for i in s.train.indices if s.train.dataset.targets[i] == 0)
    assert float(s.train.dataset[dark][0].max()) < 0
    assert s.spec["layout"] == "split" and json.dumps(s.spec)
    again = load("image_folder", root=tmp_path, image_size=8, val_fraction=0.2, test_fraction=0.2)
    assert again.spec == s.spec and again.train.indices == s.train.indices
    _write_images(tmp_path, {"fox": 3})
    assert load("image_folder", root=tmp_path, image_size=8).spec["files"] != s.spec["files"]


def test_image_folder_uses_given_train_val_test(tmp_path):
    _write_images(tmp_path / "train", {"a": 4, "b": 4})
    _write_images(tmp_path / "val", {"a": 2, "b": 2})
    s = load("image_folder", root=tmp_path, image_size=6)
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 4)
    assert s.test is s.val and s.spec["layout"] == "train/val"
    _write_images(tmp_path / "test", {"a": 1, "b": 1})
    s = load("image_folder", root=tmp_path, image_size=6)
    assert len(s.test) == 2 and s.spec["layout"] == "train/val/test"
    sub = s.subset(labels=[1])
    assert set(labels_of(sub.train).tolist()) == {1} and len(sub.test) == 2


def test_image_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)):
        load("image_folder", root=missing)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders"):
        load("image_folder", root=tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="Expected image files"):
        load("image_folder", root=tmp_path / "empty")
    _write_images(tmp_path / "few", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="too few"):
        load("image_folder", root=tmp_path / "few")
    _write_images(tmp_path / "split" / "train", {"a": 2, "b": 2})
    _write_images(tmp_path / "split" / "val", {"a": 2, "c": 2})
    with pytest.raises(DataError, match="same class sub-folders"):
        load("image_folder", root=tmp_path / "split")


def test_image_folder_without_torchvision_names_the_extra(monkeypatch, tmp_path):
    for name in list(sys.modules):
        if name == "torchvision" or name.startswith("torchvision."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(MissingExtraError, match=r"modelfuse\[vision\]"):
        load("image_folder", root=tmp_path)


def test_in_memory_splits_are_tensor_datasets():
    s = load("digits")
    assert all(isinstance(d, TensorDataset) for d in (s.train, s.val, s.test))
    assert "digits" in repr(s) and "train=1078" in repr(s)


# --- the shared battery over every registered dataset ------------------------------------


@pytest.fixture(scope="module")
def tiny_image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _write_images(root, {"a": 5, "b": 5})
    return root


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_honours_the_splits_contract(name, tiny_image_root):
    options = {"root": tiny_image_root, "image_size": 8} if name == "image_folder" else {}
    s = load(name, **options)
    assert isinstance(s, Splits) and s.name == name and s.spec["name"] == name
    assert json.loads(json.dumps(s.spec)) == s.spec
    assert load(name, **options).spec == s.spec
    assert s.classes is not None and len(s.classes) == s.num_classes
    for split in (s.train, s.val, s.test):
        assert len(split) > 0
        x, y = split[0]
        assert tuple(x.shape) == s.input_shape and x.dtype == torch.float32
        labels = labels_of(split)
        assert len(labels) == len(split) and int(labels.min()) >= 0 and int(labels.max()) < s.num_classes
        assert int(y) == int(labels[0])
