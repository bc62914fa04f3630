"""Settings and helpers shared by the fuzz tests (``test_fuzz_*.py``): small and reproducible.

By default every fuzz test runs a fixed, small number of examples from a derandomized seed
(no example database), so a CI run is reproducible and adds seconds, not minutes. With
``HYPOTHESIS_PROFILE=long`` (registered in ``tests/conftest.py``) they take the profile's
example count, fresh random seeds, and keep failing examples in ``.hypothesis/`` for the
next run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

from daemon_process import Daemon

LONG_PROFILE = "long"
LONG_EXAMPLES = 2000


def long_run() -> bool:
    """True when the long profile is loaded (by the variable or ``--hypothesis-profile``)."""
    return settings.get_current_profile_name() == LONG_PROFILE


def fuzz_settings(examples: int, **overrides: Any) -> settings:
    """``examples`` derandomized examples, or the long profile's count and randomness."""
    common: dict[str, Any] = {
        "deadline": None,  # the machine is busy: never fail an example on its duration
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                  HealthCheck.filter_too_much],
        **overrides,
    }
    if long_run():
        return settings(**common)
    return settings(max_examples=examples, derandomize=True, database=None, **common)


def proc_status(pid: int, field: str) -> int:
    """A /proc/<pid>/status figure in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing for {pid}")


def log_problems(daemon: Daemon) -> list[str]:
    """Error-level records, exceptions and tracebacks in the daemon's log."""
    problems = []
    for line in daemon.log_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            # stdlib logging (asyncio among it): errors, and asyncio's warnings of misuse
            if "Traceback" in line or re.match(r"(ERROR|CRITICAL|WARNING asyncio)\b", line):
                problems.append(line)
            continue
        if not isinstance(record, dict):
            continue
        if record.get("level") in ("error", "critical") or "exception" in record:
            problems.append(line[:3000])
    return problems
