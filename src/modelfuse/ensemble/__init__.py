"""Output fusion: ensembles of trained models.

- ``Ensemble``: one module over trained members (architectures may differ) and a combiner.
- ``COMBINERS`` / ``register_combiner``: mean of probabilities, mean of logits, geometric
  mean, hard vote, max confidence; mean and median for regression.
- ``metrics``: accuracy, NLL, Brier score, ECE and pairwise disagreement.
"""

from modelfuse.ensemble import metrics
from modelfuse.ensemble.combiners import COMBINERS, Combiner, get_combiner, register_combiner
from modelfuse.ensemble.module import Ensemble, check_weights

__all__ = [
    "COMBINERS",
    "Combiner",
    "Ensemble",
    "check_weights",
    "get_combiner",
    "metrics",
    "register_combiner",
]
