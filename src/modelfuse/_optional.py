"""Import optional dependencies with an error that says which extra installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from modelfuse.errors import MissingExtraError

#: which ``pip install modelfuse[EXTRA]`` provides a module
EXTRA_OF = {
    "torchvision": "vision",
    "timm": "vision",
    "transformers": "hf",
    "ensemble_boxes": "dev",
    "ot": "align",
    "torchjd": "mtl",
    "cvxpy": "mtl",
    "clarabel": "mtl",
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = EXTRA_OF.get(top)
        how = f"pip install 'modelfuse[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(
            f"{feature} needs the '{top}' package, which is not installed ({exc}). Install it with: {how}"
        ) from exc
