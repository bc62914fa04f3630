"""Fixtures: an in-process hubport daemon on a temporary test organization.

The hub itself is the one hubport's pytest plugin gives plugin authors
(``hubport.plugins.pytest_plugin``); hubport's own suite uses it under shorter names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from fuzzing import LONG_EXAMPLES, LONG_PROFILE
from hubport.plugins.pytest_plugin import Hub, running_hub
from support import CORPUS_DIR

# HYPOTHESIS_PROFILE=long: the fuzz tests (test_fuzz_*.py) run LONG_EXAMPLES examples each
# from fresh random seeds and keep failures in .hypothesis/ (see docs/reliability.md)
settings.register_profile(
    LONG_PROFILE, max_examples=LONG_EXAMPLES, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

CORPUS = CORPUS_DIR
__all__ = ["Hub", "running_hub"]


FIGURES = "figures"
_figures: list[str] = []


@pytest.fixture
def figures(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    """``figures(line)``: a line a long test wants in every CI log (the crash tests' ledgers).

    Recorded as a test property, so it reaches the summary from xdist's test processes too,
    where a print would be lost."""
    return lambda line: record_property(FIGURES, line)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _figures.extend(str(value) for name, value in report.user_properties
                        if name == FIGURES)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _figures:
        terminalreporter.section("figures of the crash tests")
        for line in _figures:
            terminalreporter.write_line(line)


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
