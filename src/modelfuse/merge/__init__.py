"""Parameter fusion: merge the weights of same-shaped models (``modelfuse.merge``).

``modelfuse.merge(recipe, out)`` merges a recipe's checkpoints into a Hugging Face folder;
``merge_state_dicts`` / ``merge_modules`` merge in-memory models with the same registry
of methods (``list_methods()``). Data-driven merging: ``fisher_information`` /
``gram_matrices`` compute statistics on a data loader (``save_statistics`` /
``load_statistics`` store them), ``fisher_merge`` / ``regmean_merge`` use them. The package itself is callable:
``modelfuse.merge(...)``.
"""

import sys
import types

from modelfuse.merge.api import merge, merge_modules, merge_state_dicts, plan_merge
from modelfuse.merge.data_merge import fisher_merge, regmean_merge
from modelfuse.merge.data_recipes import DataRecipe, merge_with_data, parse_data_recipe
from modelfuse.merge.methods import MergeMethod, get_method, list_methods, merge_method
from modelfuse.merge.plan import IgnoredParameterWarning
from modelfuse.merge.recipe import Recipe, load_recipe, parse_recipe
from modelfuse.merge.statistics import (
    Statistics,
    fisher_information,
    gram_matrices,
    load_statistics,
    save_statistics,
    state_fingerprint,
)

__all__ = [
    "DataRecipe",
    "IgnoredParameterWarning",
    "MergeMethod",
    "Recipe",
    "Statistics",
    "fisher_information",
    "fisher_merge",
    "get_method",
    "gram_matrices",
    "list_methods",
    "load_recipe",
    "load_statistics",
    "merge",
    "merge_method",
    "merge_modules",
    "merge_state_dicts",
    "merge_with_data",
    "parse_data_recipe",
    "parse_recipe",
    "plan_merge",
    "regmean_merge",
    "save_statistics",
    "state_fingerprint",
]


class _CallableModule(types.ModuleType):
    """Lets ``modelfuse.merge(recipe, out)`` call :func:`merge` while ``modelfuse.merge`` stays a package."""

    def __call__(self, *args, **kwargs):
        return merge(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
