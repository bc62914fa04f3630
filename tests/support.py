"""Shared helpers for hubport's tests: a test organization, file drops, waits and readers.

Most of them live in ``plugins.pytest_plugin`` (shipped to plugin authors) and are
re-exported here; this module keeps what only hubport's own suite needs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypeVar

from core.config_fields import ConfigContext, FieldReader
from core.connectors import Connector

# the helpers plugin authors use too live in hubport's pytest plugin; re-exported here
from plugins.pytest_plugin import (  # noqa: F401
    BASE_ORG,
    _poll,
    drop_files,
    drop_in,
    event_ids,
    events,
    maildir,
    message,
    read_mail,
    replay_file,
    wait_for,
    wait_for_sync,
    write_org,
)

T = TypeVar("T")


async def wait_for_value(read: Callable[[], T], enough: Callable[[T], bool], what: str,
                         timeout: float = 30.0) -> T:
    """Poll ``read()`` until ``enough`` says yes to its value and return that value; on
    timeout fail naming ``what`` was awaited and the value last read."""
    seen: list[T] = []

    def check() -> bool:
        seen[:] = [read()]
        return enough(seen[0])

    try:
        await wait_for(check, timeout=timeout)
    except AssertionError:
        last = seen[0] if seen else None
        raise AssertionError(f"{what} not seen within {timeout}s; last seen: {last!r}") from None
    return seen[0]


def base_org_text(server: dict[str, str] | None = None, extra: str = "") -> str:
    """``BASE_ORG`` with ``extra`` tables and HUB01's ``server`` keys (TOML values): a key the
    test organization already sets is replaced, any other is added."""
    text = BASE_ORG.format(server_extra="", foreign_extra="", extra=extra)
    for key, value in (server or {}).items():
        line = f"{key} = {value}"
        text, found = re.subn(rf"(?m)^{key} = .*$", line, text, count=1)
        if not found:
            text = text.replace("[[transport_server]]\n", f"[[transport_server]]\n{line}\n", 1)
    return text


class PlainConnector(Connector):
    """A connector type with nothing but the common routing fields (section test_connector)."""

    section: ClassVar[str] = "test_connector"
    delivery_type: ClassVar[str] = "DeliveryAgent"
    kind: ClassVar[str] = "DeliveryAgentConnector"

    @classmethod
    def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> PlainConnector:
        return cls(**cls.read_common(reader, ctx))


def _find_corpus() -> Path:
    """The shared real-world corpus: ``../shared`` beside the checkout (as CI lays it out)."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("HUBPORT_CORPUS"), here.parent / "shared" / "corpus" / "eml",
                      Path("/work/shared/corpus/eml")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise RuntimeError(f"the test corpus is missing: expected {here.parent / 'shared'}/corpus/eml"
                       " (or set HUBPORT_CORPUS)")


CORPUS_DIR = _find_corpus()
