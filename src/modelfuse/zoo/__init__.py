"""Small reference architectures, the one seeded training loop, and pools of trained models.

- ``create_model(name, input_shape=..., num_classes=...)``, ``list_models("cnn*")``,
  ``register_model(name)``: architectures by name (``mlp``, ``cnn``, ``cnn1d``,
  ``vgg_small``, ``resnet_small``).
- ``train(model, data, epochs=..., seed=...)``, ``evaluate``, ``predict``: the training
  loop every part of modelfuse that learns goes through.
- ``compare_predictions(logits_a, logits_b, labels)``: whether A really beats B on the same test
  samples (paired bootstrap intervals of the accuracy and NLL differences);
  ``room_for_fusion(logits, labels)``: how many of the best model's errors the others get right.
- ``build_pool`` / ``build_finetune_pool``: K trained models (from K seeds, or fine-tuned
  from one shared base on K tasks), cached on disk keyed by everything that made them.
"""

from __future__ import annotations

from modelfuse.zoo import models as _models
from modelfuse.zoo.compare import FusionRoom, PairedComparison, compare_predictions, room_for_fusion
from modelfuse.zoo.models import MLP, BasicBlock, ConvBlock, ConvNet, ResNet
from modelfuse.zoo.pool import Pool, build_finetune_pool, build_pool, code_hash, member_key, member_spec
from modelfuse.zoo.registry import (
    ModelInfo,
    build_architecture,
    create_model,
    get_model,
    list_models,
    register_model,
)
from modelfuse.zoo.train import (
    Callback,
    TrainResult,
    TrainState,
    cross_entropy,
    evaluate,
    make_optimizer,
    make_schedule,
    predict,
    train,
)

del _models  # imported for its registrations

__all__ = [
    "MLP",
    "BasicBlock",
    "Callback",
    "ConvBlock",
    "ConvNet",
    "FusionRoom",
    "ModelInfo",
    "PairedComparison",
    "Pool",
    "ResNet",
    "TrainResult",
    "TrainState",
    "build_architecture",
    "build_finetune_pool",
    "build_pool",
    "code_hash",
    "compare_predictions",
    "create_model",
    "cross_entropy",
    "evaluate",
    "get_model",
    "list_models",
    "make_optimizer",
    "make_schedule",
    "member_key",
    "member_spec",
    "predict",
    "register_model",
    "room_for_fusion",
    "train",
]
