"""Structure fusion: whole layers and blocks of several networks joined into one network.

- ``cut(model, at)`` -> ``front, back`` with ``back(front(x)) == model(x)``; ``cut_points(model,
  example)`` lists where a single tensor carries the state, with shapes.
- ``stitch(front_a, back_b, adapter, inputs=, target=)``: an adapter between two networks' cuts
  (1x1 conv, linear, resampling, conv <-> tokens; ``list_adapters()``, ``get_adapter``), initialised by least squares
  (Lenc & Vedaldi 2015) and trained with the rest frozen (``train_adapter``; Bansal et al. 2021);
  ``stitch_models`` does all of it and returns a ``StitchReport`` next to both endpoints.
- ``Parallel(models, combine=...)``, ``Serial(models)``: compositions whose state dicts keep
  the parts' names (``branches.a.conv1.weight``); ``register_branch_combine`` /
  ``get_branch_combine`` / ``list_branch_combines``: the ways ``Parallel`` joins its branches.
- ``stack_layers([(model_a, (0, 4)), (model_b, (2, 6))], layers="encoder.layer")``: a model from
  layer ranges of models of one family (passthrough, depth up-scaling as in SOLAR).
"""

from modelfuse.structure.compose import (
    Parallel,
    Serial,
    get_branch_combine,
    list_branch_combines,
    register_branch_combine,
)
from modelfuse.structure.cut import Cut, CutPoint, cut, cut_points, trace
from modelfuse.structure.layer_stacking import find_layer_stack, stack_layers
from modelfuse.structure.stitch import (
    Adapter,
    AdapterKind,
    Stitched,
    StitchReport,
    auto_adapter,
    get_adapter,
    least_squares_init,
    list_adapters,
    stitch,
    stitch_models,
    train_adapter,
)

__all__ = [
    "Adapter",
    "AdapterKind",
    "Cut",
    "CutPoint",
    "Parallel",
    "Serial",
    "StitchReport",
    "Stitched",
    "auto_adapter",
    "cut",
    "cut_points",
    "find_layer_stack",
    "get_adapter",
    "get_branch_combine",
    "least_squares_init",
    "list_adapters",
    "list_branch_combines",
    "register_branch_combine",
    "stack_layers",
    "stitch",
    "stitch_models",
    "trace",
    "train_adapter",
]
