"""Fixtures: an in-process hubport daemon on a temporary test organization."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from core.daemon import Daemon
from tests.support import CORPUS_DIR, write_org

CORPUS = CORPUS_DIR


class Hub:
    """A running daemon and the folders of its organization."""

    def __init__(self, root: Path, daemon: Daemon) -> None:
        self.root = root
        self.daemon = daemon
        self.pickup = root / "pickup"
        self.replay = root / "replay"
        self.drop = root / "drop" / "Fax Gateway"
        self.state = root / "var"

    @property
    def pipeline(self):
        return self.daemon.pipeline

    @property
    def store(self):
        return self.daemon.pipeline.store


@asynccontextmanager
async def running_hub(root: Path, **org: str) -> AsyncIterator[Hub]:
    config = write_org(root, **org)
    cwd = os.getcwd()
    daemon = Daemon(config, signals=False)
    task = asyncio.get_running_loop().create_task(daemon.run())
    ready = asyncio.ensure_future(daemon.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises the start-up error
    try:
        yield Hub(root, daemon)
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)
        os.chdir(cwd)


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
