"""Output fusion: ensembles of trained models.

- ``Ensemble``: one module over trained members (architectures may differ) and a combiner.
- ``COMBINERS`` / ``register_combiner``: mean of probabilities, mean of logits, geometric
  mean, hard vote, max confidence; mean and median for regression.
- ``LearnedWeights`` (optionally with ``TemperatureScaling``), ``Stacking`` (out-of-fold
  meta-learner), ``GreedySelection``: combiners fitted on cached validation predictions.
- ``metrics``: accuracy, NLL, Brier score, ECE and pairwise disagreement.
- ``nms``, ``soft_nms``, ``weighted_boxes_fusion`` (``BOX_FUSIONS``, ``fuse_boxes_batch`` for a
  batch of images): detection output fusion; ``mean_average_precision`` to score it.
"""

from modelfuse.ensemble import metrics
from modelfuse.ensemble.boxes import BOX_FUSIONS, fuse_boxes_batch, nms, soft_nms, weighted_boxes_fusion
from modelfuse.ensemble.combiners import COMBINERS, Combiner, get_combiner, register_combiner
from modelfuse.ensemble.detection_metrics import average_precision_per_class, mean_average_precision
from modelfuse.ensemble.fitted import GreedySelection, LearnedWeights, TemperatureScaling
from modelfuse.ensemble.module import Ensemble, MemberSet, check_weights
from modelfuse.ensemble.stacking import StackedEnsemble, Stacking

__all__ = [
    "BOX_FUSIONS",
    "COMBINERS",
    "Combiner",
    "Ensemble",
    "GreedySelection",
    "LearnedWeights",
    "MemberSet",
    "StackedEnsemble",
    "Stacking",
    "TemperatureScaling",
    "average_precision_per_class",
    "check_weights",
    "fuse_boxes_batch",
    "get_combiner",
    "mean_average_precision",
    "metrics",
    "nms",
    "register_combiner",
    "soft_nms",
    "weighted_boxes_fusion",
]
