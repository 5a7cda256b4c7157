"""The shared registry: names, close-name hints, duplicates, option checking."""

from __future__ import annotations

import pytest

from modelfuse.errors import ConfigError, RegistryError
from modelfuse.registry import Registry, check_options


def test_names_get_and_hints():
    reg: Registry[int] = Registry("merge method")
    reg.register("ties", 1)
    reg.register("dare_ties", 2)
    reg.register("linear", 3)
    assert reg.names() == ["dare_ties", "linear", "ties"]
    assert reg.names("*ties") == ["dare_ties", "ties"]
    assert reg.get("ties") == 1 and "linear" in reg and len(reg) == 3
    with pytest.raises(RegistryError, match=r"unknown merge method 'tie'\. Did you mean 'ties'"):
        reg.get("tie")
    with pytest.raises(KeyError):  # RegistryError is a KeyError too
        reg.get("nothing-like-it")


def test_duplicate_registration_is_refused_but_same_entry_is_fine():
    reg: Registry[object] = Registry("dataset")
    entry = object()
    reg.register("digits", entry)
    reg.register("digits", entry)
    with pytest.raises(RegistryError, match="dataset 'digits' is registered already"):
        reg.register("digits", object())


def test_check_options_lists_valid_options():
    def factory(*, input_shape, num_classes, widths=(32,), dropout=0.0):
        return None

    check_options("model 'cnn'", factory, {"widths": (8,)}, fixed=("input_shape", "num_classes"))
    with pytest.raises(ConfigError, match=r"model 'cnn': .*'width'.*Valid options: widths, dropout"):
        check_options("model 'cnn'", factory, {"width": 8}, fixed=("input_shape", "num_classes"))

    def needs_root(*, root, image_size=224):
        return None

    with pytest.raises(ConfigError, match=r"missing required option.*root"):
        check_options("dataset 'image_folder'", needs_root, {})
