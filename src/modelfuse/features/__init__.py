"""Feature fusion: features of several backbones, aligned and fused, under one trained head.

The classic request, VGG16 and ResNet18 features concatenated under one classifier::

    import torchvision
    from modelfuse.features import Branch, FeatureFusion, fit_feature_fusion

    fusion = FeatureFusion(
        [Branch(torchvision.models.vgg16(weights=None), "features"),   # 512 x 1 x 1 at 32 px
         Branch(torchvision.models.resnet18(weights=None), "layer4")], # 512 x 1 x 1 at 32 px
        fuse="concat",
        num_classes=10,
    )
    fit = fit_feature_fusion(fusion, splits, epochs=5, seed=0)  # frozen backbones: cached features

API:

- ``taps(model, input_shape, method="auto") -> Taps``: every tap (module or torch.fx node) in the
  order it runs, with its output shape for that input size (``print`` it for a table).
- ``Branch(model, tap, policy="frozen" | "finetune" | "partial", lr=None, unfreeze_from=None,
  name=None, layout="auto", prefix_tokens=None, token_pool="mean", method="auto")``: one backbone,
  where to tap it and how it trains. Frozen: no gradients, always eval mode (BatchNorm statistics
  kept). Finetune: its own ``lr``. Partial: the modules from ``unfreeze_from`` on train.
- ``FeatureFusion(branches, fuse="concat", head=None, *, num_classes=None, hidden=(256,),
  dropout=0.0, head_norm=False, level="auto" | "map" | "vector", spatial="pool" | "interpolate", size=None,
  channels=None, fuse_options=None, input_shape=None, seed=0)``: taps each branch, aligns the
  outputs (layout, spatial size, optional 1x1 projection to ``channels``), fuses them with the
  operator ``fuse`` and applies the head (global pooling + MLP unless ``head`` is given). Built for
  an input shape by ``input_shape=``, ``.build(shape)`` or the first forward pass. Methods:
  ``param_groups(base_lr)`` (per-branch optimizer groups), ``tap_outputs``, ``prepare``,
  ``forward_prepared``, ``forward_features``, ``probe(shape)``, ``describe()``. State dict keys:
  ``branches.<name>.*``, ``align.<name>.*``, ``fuse.*``, ``head.*``.
- ``register_feature_fusion`` / ``get_feature_fusion`` / ``list_feature_fusions`` / ``build_fusion``: the operators ``concat``, ``sum``, ``mean``,
  ``weighted`` (softmax-normalised learned scalars), ``gated`` (per-channel softmax gates across
  branches), ``attention`` (attention over branches, each a token), ``bilinear`` (low-rank, MLB);
  each fuses maps position by position and pooled vectors alike.
- ``fit_feature_fusion(model, data, *, epochs, seed, cache="auto", lr=1e-3, batch_size=64,
  cache_batch_size=None, device="cpu", callbacks=(), **train_options) -> FeatureFusionFit``: trains
  through ``modelfuse.zoo.train.train`` with ``param_groups``; with every branch frozen, on features
  cached once (``cache_features``, ``CachedHead``), which gives the same head as recomputing them.
- Alignment helpers (``modelfuse.features.align``): ``resize``, ``tokens_to_map``,
  ``map_to_tokens``, ``global_pool``, ``Projection``.

Errors are :class:`modelfuse.errors.FeatureError` (a tap that does not exist, with the closest
names; shapes an operator cannot fuse, with the option that would) or ``ConfigError`` (bad settings).
torchvision is optional: without it, or for models torch.fx cannot trace, taps are read by forward hooks.
"""

from __future__ import annotations

from modelfuse.features.align import (
    Alignment,
    Projection,
    global_pool,
    map_to_tokens,
    plan_alignment,
    resize,
    tokens_to_map,
)
from modelfuse.features.cache import CachedHead, cache_features, evaluate_cached
from modelfuse.features.fuse import (
    FusionOp,
    build_fusion,
    get_feature_fusion,
    list_feature_fusions,
    register_feature_fusion,
)
from modelfuse.features.model import POLICIES, Branch, FeatureFusion, PoolMLPHead
from modelfuse.features.taps import TapExtractor, TapInfo, Taps, taps
from modelfuse.features.train import FeatureFusionFit, fit_feature_fusion

__all__ = [
    "POLICIES",
    "Alignment",
    "Branch",
    "CachedHead",
    "FeatureFusion",
    "FeatureFusionFit",
    "FusionOp",
    "PoolMLPHead",
    "Projection",
    "TapExtractor",
    "TapInfo",
    "Taps",
    "build_fusion",
    "cache_features",
    "evaluate_cached",
    "fit_feature_fusion",
    "get_feature_fusion",
    "global_pool",
    "list_feature_fusions",
    "map_to_tokens",
    "plan_alignment",
    "register_feature_fusion",
    "resize",
    "taps",
    "tokens_to_map",
]
