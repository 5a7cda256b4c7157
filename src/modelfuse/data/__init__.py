"""Datasets that need no download, and a loader for a user's own image folders.

``load(name, **options)`` returns a :class:`Splits` (train/val/test plus a ``spec`` that
records what determined them); ``list_datasets()`` names what is registered:

- ``digits``: scikit-learn's 8x8 digits (``upsample=True`` for 3x32x32);
- ``digits_hard``: the same with noise, occlusion and less training data;
- ``mnist1d``: MNIST-1D generated locally and cached;
- ``image_folder``: ``root/<class>/<image>`` via torchvision (optional ``vision`` extra).
"""

from __future__ import annotations

from modelfuse.data import digits as _digits
from modelfuse.data import image_folder as _image_folder
from modelfuse.data import mnist_1d as _mnist_1d
from modelfuse.data._cache import cache_dir
from modelfuse.data.registry import get_dataset, list_datasets, load, register_dataset
from modelfuse.data.splits import Splits, labels_of, stratified_fraction, stratified_split

del _digits, _image_folder, _mnist_1d  # imported for their registrations

__all__ = [
    "Splits",
    "cache_dir",
    "get_dataset",
    "labels_of",
    "list_datasets",
    "load",
    "register_dataset",
    "stratified_fraction",
    "stratified_split",
]
