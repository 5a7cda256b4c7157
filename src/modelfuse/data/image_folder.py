"""A user's own images: one sub-folder per class, read lazily with torchvision's ImageFolder.

Either ``root/<class>/<image>`` (val and test carved out by a seeded stratified split) or
``root/train/<class>/...`` and ``root/val/<class>/...`` with an optional ``root/test/``
used as given (without ``test/`` the val folder doubles as the test set).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from modelfuse._optional import require
from modelfuse.data.registry import register_dataset
from modelfuse.data.splits import Splits, stratified_split
from modelfuse.errors import ConfigError, DataError

#: ImageNet channel statistics, the usual normalisation for pretrained image backbones
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transform(image_size: int) -> Any:
    transforms = require("torchvision.transforms", "the image_folder dataset")
    return transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _class_folders(path: Path) -> list[str]:
    if not path.is_dir():
        raise DataError(
            f"image folder {path} does not exist or is not a directory; expected a folder with one sub-folder per class"
        )
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {path} has no class sub-folders; expected {path}/<class name>/<image files> "
            f"(or train/ and val/ folders laid out that way)"
        )
    return classes


def _image_folder(path: Path, transform: Any) -> Any:
    datasets = require("torchvision.datasets", "the image_folder dataset")
    _class_folders(path)
    try:
        ds = datasets.ImageFolder(str(path), transform=transform)
    except FileNotFoundError as exc:
        raise DataError(
            f"image folder {path}: {exc}. Expected image files ({', '.join(datasets.folder.IMG_EXTENSIONS)}) "
            f"inside every class sub-folder"
        ) from None
    if len(ds) == 0:
        raise DataError(
            f"image folder {path} contains no images; expected image files inside its class sub-folders"
        )
    return ds


def _fingerprint(*folders: Any) -> str:
    """A hash of every (relative file, label, size) the splits read, so edits to the folder change the spec."""
    h = hashlib.sha256()
    for ds in folders:
        root = Path(ds.root)
        for file, label in ds.samples:
            h.update(
                f"{Path(file).relative_to(root).as_posix()}\0{label}\0{os.path.getsize(file)}\n".encode()
            )
    return h.hexdigest()[:16]


@register_dataset("image_folder")
def image_folder(
    *,
    root: str | os.PathLike[str],
    image_size: int = 224,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
) -> Splits:
    """Images under ``root`` resized and center-cropped to ``image_size``, ImageNet-normalised.

    Datasets read files lazily, item by item. ``val_fraction``/``test_fraction``/``split_seed``
    apply only when ``root`` has no ``train/`` and ``val/`` folders.
    """
    require("torchvision", "the image_folder dataset")
    path = Path(root).expanduser().resolve()
    if int(image_size) <= 0:
        raise ConfigError(f"image_size must be a positive integer; found {image_size}")
    transform = _transform(int(image_size))
    spec: dict[str, Any] = {"name": "image_folder", "root": str(path), "image_size": int(image_size)}
    if (path / "train").is_dir() and (path / "val").is_dir():
        train = _image_folder(path / "train", transform)
        val = _image_folder(path / "val", transform)
        test = _image_folder(path / "test", transform) if (path / "test").is_dir() else val
        for name, ds in (("val", val), ("test", test)):
            if ds.classes != train.classes:
                raise DataError(
                    f"image folder {path}/{name} has classes {ds.classes}, but {path}/train has {train.classes}; "
                    "every split needs the same class sub-folders"
                )
        classes = train.classes
        spec["layout"] = "train/val/test" if test is not val else "train/val"
        spec["files"] = _fingerprint(*dict.fromkeys([train, val, test]))
        train_set: Dataset = train
        val_set: Dataset = val
        test_set: Dataset = test
    else:
        if (path / "train").is_dir() != (path / "val").is_dir():
            raise DataError(
                f"image folder {path} has only one of train/ and val/; give both (test/ optional) "
                "or put the class sub-folders directly under the root"
            )
        full = _image_folder(path, transform)
        classes = full.classes
        fractions = [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]
        if min(fractions) < 0 or val_fraction <= 0 or test_fraction <= 0:
            raise ConfigError(
                f"val_fraction and test_fraction must be positive and sum to less than 1; found {val_fraction}, {test_fraction}"
            )
        parts = stratified_split(full.targets, fractions, split_seed)
        if min(len(p) for p in parts) == 0:
            raise DataError(
                f"image folder {path} has {len(full)} images, too few for train/val/test fractions {fractions}; "
                "add images, raise val_fraction/test_fraction, or give train/ and val/ folders"
            )
        train_set, val_set, test_set = (Subset(full, p.tolist()) for p in parts)
        spec.update(
            layout="split",
            val_fraction=float(val_fraction),
            test_fraction=float(test_fraction),
            split_seed=int(split_seed),
            files=_fingerprint(full),
        )
    return Splits(
        name="image_folder",
        train=train_set,
        val=val_set,
        test=test_set,
        num_classes=len(classes),
        input_shape=(3, int(image_size), int(image_size)),
        spec=spec,
        classes=list(classes),
    )
