"""Output fusion: ensembles of trained models.

- ``Ensemble``: one module over trained members (architectures may differ) and a combiner.
- ``register_combiner`` / ``get_combiner`` / ``list_combiners``: mean of probabilities, mean of
  logits, geometric mean, hard vote, max confidence; mean and median for regression.
- ``LearnedWeights`` (optionally with ``TemperatureScaling``), ``Stacking`` (out-of-fold
  meta-learner), ``GreedySelection``: combiners fitted on cached validation predictions.
- ``pack`` / ``unpack``: K same-architecture members as one module computing all K outputs
  in one pass (grouped convolutions, block-diagonal linear layers, per-member BatchNorm).
- ``bagging``, ``snapshot_ensemble``, ``fast_geometric_ensemble``, ``swa``: ensembles trained
  through the shared training loop.
- ``distill``: an ensemble (any teachers) into one student with the KD loss, and its report.
- ``metrics``: accuracy, NLL, Brier score, ECE (all four: ``prediction_metrics``) and pairwise
  disagreement.
- ``nms``, ``soft_nms``, ``weighted_boxes_fusion`` (``register_box_fusion`` / ``get_box_fusion`` /
  ``list_box_fusions``; ``fuse_boxes_batch`` for a batch of images): detection output fusion;
  ``mean_average_precision`` to score it.
"""

from modelfuse.ensemble import metrics
from modelfuse.ensemble.boxes import (
    fuse_boxes_batch,
    get_box_fusion,
    list_box_fusions,
    nms,
    register_box_fusion,
    soft_nms,
    weighted_boxes_fusion,
)
from modelfuse.ensemble.combiners import Combiner, get_combiner, list_combiners, register_combiner
from modelfuse.ensemble.detection_metrics import average_precision_per_class, mean_average_precision
from modelfuse.ensemble.distill import DistillReport, KDLoss, distill, distill_report, kd_loss
from modelfuse.ensemble.fitted import GreedySelection, LearnedWeights, TemperatureScaling
from modelfuse.ensemble.module import Ensemble, MemberSet, check_weights
from modelfuse.ensemble.packed import PackedEnsemble, pack, supported_modules, unpack
from modelfuse.ensemble.stacked_generalization import StackedEnsemble, Stacking
from modelfuse.ensemble.training import (
    TrainedEnsemble,
    bagging,
    fast_geometric_ensemble,
    snapshot_ensemble,
    swa,
)

__all__ = [
    "Combiner",
    "DistillReport",
    "Ensemble",
    "GreedySelection",
    "KDLoss",
    "LearnedWeights",
    "MemberSet",
    "PackedEnsemble",
    "StackedEnsemble",
    "Stacking",
    "TemperatureScaling",
    "TrainedEnsemble",
    "average_precision_per_class",
    "bagging",
    "check_weights",
    "distill",
    "distill_report",
    "fast_geometric_ensemble",
    "fuse_boxes_batch",
    "get_box_fusion",
    "get_combiner",
    "kd_loss",
    "list_box_fusions",
    "list_combiners",
    "mean_average_precision",
    "metrics",
    "nms",
    "pack",
    "register_box_fusion",
    "register_combiner",
    "snapshot_ensemble",
    "soft_nms",
    "supported_modules",
    "swa",
    "unpack",
    "weighted_boxes_fusion",
]
