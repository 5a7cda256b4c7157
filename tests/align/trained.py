"""Trained zoo models for issue 16's alignment figures, memoised for the whole test session.

The issue asks that every pair of seeds pass, so each figure test runs over ``PAIRS`` (every
pair of ``SEEDS``). A model is trained once per session for each ``Recipe`` and seed, however
many tests and pairs use it; :func:`trained` hands out a copy, so a test may change what it
gets without affecting the others. Training goes through the one loop, ``zoo.train``.
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from modelfuse import data, zoo

SEEDS = (0, 1, 2)
PAIRS = tuple(itertools.combinations(SEEDS, 2))


@dataclass(frozen=True)
class Recipe:
    """What to train: a zoo architecture on a dataset (optionally a label subset), and how.

    ``init_scale`` multiplies every parameter of the freshly initialised model before training
    (PyTorch's default Linear/Conv init has a standard deviation of 1/sqrt(3 fan_in), which is
    about 1/2.4 of He's); ``model`` and ``dataset`` are option tuples ``((name, value), ...)`` so
    that the recipe is hashable.
    """

    arch: str
    dataset: str = "digits"
    model: tuple[tuple[str, object], ...] = ()
    dataset_options: tuple[tuple[str, object], ...] = ()
    labels: tuple[int, ...] | None = None
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    init_scale: float = 1.0


@functools.cache
def splits(name: str, options: tuple[tuple[str, object], ...] = ()) -> data.Splits:
    """The dataset's splits, built once per session (the tests only read them)."""
    return data.load(name, **dict(options))


@functools.cache
def _train(recipe: Recipe, seed: int) -> nn.Module:
    full = splits(recipe.dataset, recipe.dataset_options)
    task = full.subset(labels=recipe.labels) if recipe.labels is not None else full
    x = full.train[0][0]
    torch.manual_seed(seed)
    model = zoo.create_model(
        recipe.arch, input_shape=tuple(x.shape), num_classes=full.num_classes, **dict(recipe.model)
    )
    if recipe.init_scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(recipe.init_scale)
    zoo.train(
        model,
        task,
        epochs=recipe.epochs,
        seed=seed,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        weight_decay=recipe.weight_decay,
        eval_every_epoch=False,
        progress=False,
    )
    return model.eval()


def trained(recipe: Recipe, seed: int) -> nn.Module:
    """A copy of the model ``recipe`` trains from ``seed`` (in eval mode); trained once per session."""
    return copy.deepcopy(_train(recipe, seed))


def accuracy(model: nn.Module, split: data.Splits) -> float:
    """Test accuracy in points (0-100)."""
    return 100 * float(zoo.evaluate(model, split.test)["accuracy"])
