"""Activation fusion: learnable mixtures of activation functions.

- ``ActivationMix(candidates, granularity=..., weights=..., init=...)``: y = sum_i w_i f_i(x).
- ``fuse_activations(model, candidates)``: a copy of a model with every activation a mixture,
  starting exactly at the activation it replaces.
- ``collapse(model, tol)``: mixtures near one-hot back to plain activations;
  ``report(model)`` / ``summarize(model)``: what each mixture learnt.
- ``register_activation`` / ``get_activation`` / ``list_activations``: the candidates by name.
"""

from modelfuse.activations._registry import get_activation, list_activations, register_activation
from modelfuse.activations.fuse import (
    DEFAULT_CANDIDATES,
    ActivationWarning,
    MixtureSummary,
    collapse,
    fuse_activations,
    report,
    summarize,
)
from modelfuse.activations.mix import GRANULARITIES, WEIGHTINGS, ActivationMix, MixingWeights

__all__ = [
    "DEFAULT_CANDIDATES",
    "GRANULARITIES",
    "WEIGHTINGS",
    "ActivationMix",
    "ActivationWarning",
    "MixingWeights",
    "MixtureSummary",
    "collapse",
    "fuse_activations",
    "get_activation",
    "list_activations",
    "register_activation",
    "report",
    "summarize",
]
