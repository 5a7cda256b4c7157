"""The ``modelfuse fuse-features`` recipe: branches, taps, fusion operator, head, data, training.

A recipe is YAML validated by :class:`FeatureRecipe`; errors name the file and the field::

    branches:
      - name: vgg
        model: torchvision:vgg16          # zoo name, torchvision:NAME or package.module:function
        weights: vgg16.pth                # optional local weights (safetensors or PyTorch, weights only)
        tap: features
        policy: frozen                    # frozen | finetune | partial
      - name: resnet
        model: torchvision:resnet18
        tap: layer4
    fuse: concat                          # concat, sum, mean, weighted, gated, attention, bilinear
    data: {name: digits, options: {upsample: true}}
    train: {epochs: 5, lr: 0.001, seed: 0}
    compare: true                         # also train each branch alone with the same head budget
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from modelfuse.config import read_yaml, validate


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BranchSpec(_Strict):
    """One backbone: its architecture, optional weights, the tap and how it trains."""

    model: str
    tap: str
    name: str | None = None
    weights: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    policy: str = "frozen"
    lr: float | None = None
    unfreeze_from: str | None = None
    layout: str = "auto"


class DataSpec(_Strict):
    name: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)


class HeadSpec(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [256])
    dropout: float = 0.0
    norm: bool = False


class TrainSpec(_Strict):
    epochs: int = Field(10, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    seed: int = 0
    cache: bool | str = "auto"
    optimizer: str = "adam"
    weight_decay: float = Field(0.0, ge=0)
    schedule: str = "constant"


class FeatureRecipe(_Strict):
    """A whole ``fuse-features`` recipe."""

    branches: list[BranchSpec] = Field(min_length=1)
    fuse: str = "concat"
    fuse_options: dict[str, Any] = Field(default_factory=dict)
    level: str = "auto"
    spatial: str = "pool"
    size: int | list[int] | None = None
    channels: int | None = None
    head: HeadSpec = Field(default_factory=HeadSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    compare: bool = False

    @model_validator(mode="after")
    def _names_differ(self) -> FeatureRecipe:
        names = [b.name for b in self.branches if b.name is not None]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"branch names must differ; repeated: {', '.join(repeated)}")
        return self


def load_feature_recipe(path: str | os.PathLike) -> FeatureRecipe:
    """Read and validate a ``fuse-features`` recipe file."""
    return validate(FeatureRecipe, read_yaml(path), str(path))
