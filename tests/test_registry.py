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


# every registry speaks one vocabulary: register_X / get_X / list_X (adapters: a fixed set, get and list)
VOCABULARY = [
    ("modelfuse.ensemble", "combiner", "combiners", "mean_prob"),
    ("modelfuse.ensemble", "box_fusion", "box_fusions", "weighted_boxes_fusion"),
    ("modelfuse.features", "feature_fusion", "feature_fusions", "concat"),
    ("modelfuse.structure", "branch_combine", "branch_combines", "concat"),
    ("modelfuse.structure", "adapter", "adapters", "conv1x1"),
    ("modelfuse.data", "dataset", "datasets", "digits"),
    ("modelfuse.zoo", "model", "models", "cnn"),
    ("modelfuse.align", "aligner", "aligners", "weight_matching"),
    ("modelfuse.losses", "loss_fusion", "loss_fusions", "uncertainty"),
    ("modelfuse.losses", "teacher_weighting", "teacher_weightings", "confidence"),
    ("modelfuse.activations", "activation", "activations", "relu"),
    ("modelfuse.bench", "bench_method", "bench_methods", "loss_fusion"),
    ("modelfuse.bench", "pool_builder", "pool_builders", "digits_multitask"),
]


@pytest.mark.parametrize(("module", "one", "many", "known"), VOCABULARY, ids=[v[1] for v in VOCABULARY])
def test_every_registry_has_register_get_list(module, one, many, known):
    import importlib

    mod = importlib.import_module(module)
    listed = getattr(mod, f"list_{many}")()
    assert known in listed and listed == sorted(listed)
    assert getattr(mod, f"list_{many}")(known[:2] + "*")[0].startswith(known[:2])
    assert getattr(mod, f"get_{one}")(known) is not None
    with pytest.raises(RegistryError, match="Registered:"):
        getattr(mod, f"get_{one}")(known + "_no_such_entry")
    assert hasattr(mod, f"register_{one}") == (one != "adapter")  # adapters: a fixed set


def test_old_registry_names_are_gone():
    import modelfuse.data
    import modelfuse.ensemble
    import modelfuse.ensemble.metrics
    import modelfuse.features
    import modelfuse.structure
    import modelfuse.zoo

    old = {
        modelfuse.ensemble: ["COMBINERS", "BOX_FUSIONS"],
        modelfuse.ensemble.metrics: ["evaluate"],
        modelfuse.features: ["FUSIONS", "register_fusion", "get_fusion"],
        modelfuse.structure: ["ADAPTERS", "COMBINES"],
        modelfuse.data: ["dataset_entrypoint"],
        modelfuse.zoo: ["model_info"],
    }
    for mod, names in old.items():
        for name in names:
            assert not hasattr(mod, name), f"{mod.__name__}.{name}"
