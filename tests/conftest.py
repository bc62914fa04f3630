"""Fixtures: an in-process hubport daemon on a temporary test organization.

The hub itself is the one hubport's pytest plugin gives plugin authors
(``plugins.pytest_plugin``); hubport's own suite uses it under shorter names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from plugins.pytest_plugin import Hub, running_hub
from tests.support import CORPUS_DIR

CORPUS = CORPUS_DIR
__all__ = ["Hub", "running_hub"]


@pytest.fixture
def hub_factory(tmp_path: Path) -> Callable[..., object]:
    """``async with hub_factory(server_extra=...) as hub:`` starts a daemon in tmp_path."""

    def factory(**org: str):
        return running_hub(tmp_path, **org)

    return factory


@pytest.fixture
def corpus() -> list[Path]:
    files = sorted(CORPUS.glob("*.eml"))
    if not files:
        pytest.skip(f"corpus not found at {CORPUS}")
    return files
