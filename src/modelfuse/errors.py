"""Errors that modelfuse raises on purpose.

Every error a user can cause is a :class:`FusionError` whose message says what was
wrong (which file, tensor, key or field), what was expected versus found, and how to
fix it. The CLI prints such errors as one line; anything else is a bug.
"""

from __future__ import annotations


class FusionError(Exception):
    """Base class of every error modelfuse raises for bad input or settings."""


class CheckpointError(FusionError):
    """A checkpoint could not be found, parsed or trusted."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need to execute code (unpickle a non-allow-listed global) to load."""


class OutputExistsError(FusionError):
    """The output path exists already and overwriting was not asked for."""


class OutputError(FusionError):
    """The output could not be written where it was asked to be written."""


class ConfigError(FusionError):
    """A configuration (YAML recipe, command-line option, keyword argument) is invalid."""


class MissingExtraError(FusionError, ImportError):
    """A feature needs an optional dependency that is not installed."""


class DataError(FusionError):
    """A dataset could not be built or loaded."""


class RegistryError(FusionError, KeyError):
    """A name is not registered in a registry."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EnsembleError(FusionError):
    """Members of an ensemble do not fit together (their outputs differ in shape or kind)."""


class StructureError(FusionError):
    """Networks cannot be cut, stitched, composed or stacked as asked (no such node, shapes that do not fit)."""


class FeatureError(FusionError):
    """Backbone features cannot be tapped, aligned or fused as asked (no such tap, shapes that do not fit)."""


class AlignmentError(FusionError):
    """Two networks cannot be aligned as asked (different architectures, an untraceable model, bad permutations)."""


class LossFusionError(FusionError):
    """Task losses or gradients cannot be combined as asked (wrong count, non-finite values, no gradient)."""


class ActivationError(FusionError):
    """Activation functions cannot be mixed or replaced as asked (unknown names, nothing to replace)."""
