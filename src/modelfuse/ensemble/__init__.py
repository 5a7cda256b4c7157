"""Output fusion: ensembles of trained models.

- ``Ensemble``: one module over trained members (architectures may differ) and a combiner.
- ``COMBINERS`` / ``register_combiner``: mean of probabilities, mean of logits, geometric
  mean, hard vote, max confidence; mean and median for regression.
- ``LearnedWeights`` (optionally with ``TemperatureScaling``), ``Stacking`` (out-of-fold
  meta-learner), ``GreedySelection``: combiners fitted on cached validation predictions.
- ``metrics``: accuracy, NLL, Brier score, ECE and pairwise disagreement.
"""

from modelfuse.ensemble import metrics
from modelfuse.ensemble.combiners import COMBINERS, Combiner, get_combiner, register_combiner
from modelfuse.ensemble.fitted import GreedySelection, LearnedWeights, TemperatureScaling
from modelfuse.ensemble.module import Ensemble, MemberSet, check_weights
from modelfuse.ensemble.stacking import StackedEnsemble, Stacking

__all__ = [
    "COMBINERS",
    "Combiner",
    "Ensemble",
    "GreedySelection",
    "LearnedWeights",
    "MemberSet",
    "StackedEnsemble",
    "Stacking",
    "TemperatureScaling",
    "check_weights",
    "get_combiner",
    "metrics",
    "register_combiner",
]
