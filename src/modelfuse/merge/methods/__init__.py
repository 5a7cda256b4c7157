"""Merge methods, one module per method family; importing this package registers them all."""

from modelfuse.merge.methods import (  # noqa: F401  (importing registers the methods)
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    iso,
    karcher,
    linear,
    magmax,
    model_stock,
    nearswap,
    passthrough,
    ram,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv,
)
from modelfuse.merge.methods._base import (
    METHODS,
    MergeMethod,
    NoParams,
    Params,
    get_method,
    list_methods,
    merge_method,
)

__all__ = ["METHODS", "MergeMethod", "NoParams", "Params", "get_method", "list_methods", "merge_method"]
