"""modelfuse: deep-learning model fusion on PyTorch.

The package is laid out by fusion level (see DESIGN.md): ``modelfuse.io``,
``modelfuse.data`` and ``modelfuse.zoo`` form the basement every level uses.
Importing ``modelfuse`` itself is cheap: torch and the other heavy libraries are
imported only by the submodules that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
