"""MNIST-1D (Greydanus & Kobak, 2020): 1-D signals of ten digit templates, generated locally.

The ``mnist1d`` package's generator is run here (never its download path) and its arrays
are cached under ``cache_dir()/data`` as an ``.npz`` keyed by the generator arguments.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from modelfuse.data._cache import atomic_write, cache_dir
from modelfuse.data.registry import register_dataset
from modelfuse.data.splits import Splits, stratified_split, tensor_splits
from modelfuse.errors import ConfigError

#: generator arguments that do not change the generated arrays
_IGNORED_ARGS = ("url",)


def generator_args(**overrides: Any) -> dict[str, Any]:
    """The ``mnist1d`` generator's default arguments with ``overrides`` applied (JSON-ready)."""
    from mnist1d.data import get_dataset_args

    args = {k: v for k, v in get_dataset_args(as_dict=True).items() if k not in _IGNORED_ARGS}
    unknown = sorted(set(overrides) - set(args))
    if unknown:
        raise ConfigError(f"unknown mnist1d generator arguments {unknown}; valid: {', '.join(sorted(args))}")
    args.update(overrides)
    return json.loads(json.dumps(args))


def _generate(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run the generator, leaving the global ``random`` and NumPy RNG states as they were."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {
        "x": np.asarray(data["x"], dtype=np.float32),
        "y": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.asarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


def generated_arrays(args: dict[str, Any], *, cache: bool = True) -> dict[str, np.ndarray]:
    """The generator's train/test arrays for ``args``, from the cache or generated (then cached)."""
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "data" / f"mnist1d-{key}.npz"
    if cache and path.exists():
        try:
            with np.load(path) as npz:
                return {k: npz[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # unreadable cache entry: regenerate and overwrite it
    arrays = _generate(args)
    if cache:
        _write_npz(path, arrays)
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


@register_dataset("mnist1d")
def mnist1d(
    *,
    num_samples: int = 5000,
    seed: int = 42,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    generator: dict[str, Any] | None = None,
    cache: bool = True,
) -> Splits:
    """MNIST-1D signals of shape (1, 40), 10 classes, generated with ``num_samples`` and ``seed``.

    The generator's own test split (its last 20 %) is the test set; ``val_fraction`` of its
    train split becomes the validation set (seeded, stratified). ``generator`` overrides
    further generator arguments (``shear_scale``, ``iid_noise_scale``, ...).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1); found {val_fraction}")
    args = generator_args(**{**(generator or {}), "num_samples": int(num_samples), "seed": int(seed)})
    arrays = generated_arrays(args, cache=cache)
    n_train = len(arrays["y"])
    x = np.concatenate([arrays["x"], arrays["x_test"]])[:, None, :]
    y = np.concatenate([arrays["y"], arrays["y_test"]])
    train, val = stratified_split(arrays["y"], [1.0 - val_fraction, val_fraction], split_seed)
    test = np.arange(n_train, len(y))
    spec = {
        "name": "mnist1d",
        "generator": args,
        "val_fraction": float(val_fraction),
        "split_seed": int(split_seed),
    }
    return tensor_splits(
        "mnist1d", x, y, [train, val, test], num_classes=10, spec=spec, classes=[str(i) for i in range(10)]
    )
