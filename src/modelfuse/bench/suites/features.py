"""The ``features`` suite: a small VGG-style and a small ResNet-style network trained on digits.

Pool builder ``digits_backbones`` (``vgg_small`` and ``resnet_small`` from
:func:`modelfuse.zoo.build_pool`, cached) and its bench methods: each backbone alone (baseline),
their frozen features fused by each registered operator under one trained head
(:class:`modelfuse.features.FeatureFusion`, feature level), and VGG's early layers stitched to
ResNet's later ones through a trained adapter (:func:`modelfuse.structure.stitch_models`, structure).
Methods are glue: run the API, evaluate on ``pool.data.test`` with :func:`modelfuse.zoo.evaluate`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from modelfuse.bench._api import BenchPool, Outcome, info_of, register_bench_method, register_pool_builder
from modelfuse.bench.suites.seeds import DATASETS, INFERENCE_BATCH, scores
from modelfuse.errors import ConfigError

#: the backbones of the pool, in order, and where feature fusion taps each (its last feature map)
BACKBONES = {"vgg_small": "features", "resnet_small": "layers"}
#: where stitching cuts VGG (front) and ResNet (back): both carry 32 channels at 4 x 4 on digits
STITCH_FRONT = "features.conv1_2"
STITCH_BACK = "layers.layer2"


@register_pool_builder("digits_backbones")
def digits_backbones(
    seed: int = 0,
    *,
    epochs: int = 10,
    widths: list[int] | None = None,
    dataset: str = "digits",
    cache: bool = True,
) -> BenchPool:
    """``vgg_small`` and ``resnet_small`` trained on ``dataset`` (``digits`` or ``digits_hard``) for
    ``epochs`` from seed ``seed * 100`` (the ResNet from ``seed * 100 + 1``); ``widths``: both
    networks' stage widths (default: the zoo's)."""
    from modelfuse.zoo import build_pool

    if dataset not in DATASETS:
        raise ConfigError(
            f"digits_backbones: dataset must be one of {', '.join(DATASETS)}; found {dataset!r}"
        )
    if int(epochs) < 1:
        raise ConfigError(f"digits_backbones: epochs must be at least 1; found {epochs}")
    models: dict[str, torch.nn.Module] = {}
    metrics: dict[str, dict[str, float]] = {}
    data = None
    kwargs = {} if widths is None else {"widths": [int(w) for w in widths]}
    for k, arch in enumerate(BACKBONES):
        pool = build_pool(
            arch,
            dataset,
            seeds=[int(seed) * 100 + k],
            epochs=int(epochs),
            model_kwargs=kwargs,
            cache=cache,
            progress=False,
        )
        models[arch] = pool.members[0].eval()
        metrics[arch] = pool.metrics[0]
        data = pool.data
    assert data is not None
    x_test = torch.stack([data.test[i][0] for i in range(min(INFERENCE_BATCH, len(data.test)))])
    info = info_of(
        {
            "dataset": dataset,
            "backbones": list(BACKBONES),
            "epochs": int(epochs),
            "model_kwargs": kwargs,
            "seeds": [int(seed) * 100 + k for k in range(len(BACKBONES))],
            "backbone_test_accuracy": {a: round(m["test_accuracy"], 4) for a, m in metrics.items()},
        }
    )
    return BenchPool(
        name="digits_backbones",
        seed=int(seed),
        models=models,
        data=data,
        inference_input=x_test,
        info=info,
        extra={"epochs": int(epochs), "backbone_metrics": metrics},
    )


def _backbone(pool: BenchPool, name: str) -> torch.nn.Module:
    if name not in pool.models:
        raise ConfigError(f"no backbone {name!r} in the pool; it has {', '.join(pool.models)}")
    return pool.models[name]


@register_bench_method("backbone", "baseline")
def backbone(pool: BenchPool, *, name: str = "vgg_small") -> Outcome:
    """One backbone of the pool alone, with its own classifier."""
    model = _backbone(pool, name)
    return Outcome(scores(model, pool), model=model, notes=name)


@register_bench_method("feature_fusion", "feature")
def feature_fusion(
    pool: BenchPool,
    *,
    fuse: str = "concat",
    channels: int | None = 64,
    hidden: list[int] | tuple[int, ...] = (256,),
    epochs: int | None = None,
    lr: float = 1e-3,
) -> Outcome:
    """The backbones frozen, their last feature maps projected to ``channels`` (none: as they are),
    fused by the registered operator ``fuse`` and one new head trained on top (``FeatureFusion``)."""
    from modelfuse.features import Branch, FeatureFusion, fit_feature_fusion, get_feature_fusion

    get_feature_fusion(fuse)  # an unknown operator: the registry's error, listing the known ones
    data = pool.data
    epochs = int(epochs if epochs is not None else pool.extra.get("epochs", 10))
    branches = [Branch(m, BACKBONES.get(name, "features"), name=name) for name, m in pool.models.items()]
    model = FeatureFusion(
        branches,
        fuse=fuse,
        num_classes=data.num_classes,
        hidden=tuple(int(h) for h in hidden),
        channels=None if channels is None else int(channels),
        input_shape=data.input_shape,
        seed=pool.seed,
    )
    fit = fit_feature_fusion(model, data, epochs=epochs, seed=pool.seed, lr=float(lr), progress=False)
    model.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = {**scores(model, pool), "trained_parameters": float(trainable)}
    return Outcome(
        metrics,
        model=model,
        notes=f"{fuse} of {' + '.join(pool.models)}, head trained {epochs} epochs"
        + (" on cached features" if fit.cached else ""),
    )


@register_bench_method("backbone_stitching", "structure")
def backbone_stitching(
    pool: BenchPool,
    *,
    front: str = "vgg_small",
    back: str = "resnet_small",
    at: str = STITCH_FRONT,
    at_back: str = STITCH_BACK,
    epochs: int = 3,
    adapter: str = "auto",
) -> Outcome:
    """``front``'s layers up to ``at`` joined to ``back``'s after ``at_back`` through an adapter
    initialised by least squares and trained with both networks frozen (``stitch_models``)."""
    from modelfuse.structure import stitch_models

    a, b = _backbone(pool, front), _backbone(pool, back)
    stitched, report = stitch_models(
        copy.deepcopy(a),
        copy.deepcopy(b),
        at,
        pool.data,
        at_b=at_back,
        adapter=adapter,
        epochs=int(epochs),
        seed=pool.seed,
    )
    metrics: dict[str, Any] = scores(stitched, pool)
    metrics["accuracy_before_training"] = float(report.stitched_init["accuracy"])
    return Outcome(
        metrics, model=stitched, notes=f"{front} up to {at}, {report.adapter} adapter, {back} after {at_back}"
    )
