"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def modelfuse_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point MODELFUSE_CACHE at a per-session temporary folder, so tests never touch the user's cache."""
    path = tmp_path_factory.mktemp("modelfuse-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELFUSE_CACHE", str(path))
        yield path
