"""Structure fusion: whole layers and blocks of several networks joined into one network.

- ``cut(model, at)`` -> ``front, back`` with ``back(front(x)) == model(x)``; ``cut_points(model,
  example)`` lists where a single tensor carries the state, with shapes.
- ``stitch(front_a, back_b, adapter, inputs=, target=)``: an adapter between two networks' cuts
  (1x1 conv, linear, resampling, conv <-> tokens; ``ADAPTERS``), initialised by least squares
  (Lenc & Vedaldi 2015) and trained with the rest frozen (``train_adapter``; Bansal et al. 2021);
  ``stitch_models`` does all of it and returns a ``StitchReport`` next to both endpoints.
- ``Parallel(models, combine=...)``, ``Serial(models)``: compositions whose state dicts keep
  the parts' names (``branches.a.conv1.weight``).
- ``stack_layers([(model_a, (0, 4)), (model_b, (2, 6))], layers="encoder.layer")``: a model from
  layer ranges of models of one family (passthrough, depth up-scaling as in SOLAR).
"""

from modelfuse.structure.compose import COMBINES, Parallel, Serial
from modelfuse.structure.cut import Cut, CutPoint, cut, cut_points, trace
from modelfuse.structure.stacking import find_layer_stack, stack_layers
from modelfuse.structure.stitch import (
    ADAPTERS,
    Adapter,
    AdapterKind,
    Stitched,
    StitchReport,
    auto_adapter,
    least_squares_init,
    list_adapters,
    stitch,
    stitch_models,
    train_adapter,
)

__all__ = [
    "ADAPTERS",
    "COMBINES",
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
    "least_squares_init",
    "list_adapters",
    "stack_layers",
    "stitch",
    "stitch_models",
    "trace",
    "train_adapter",
]
