"""Shared helpers for hubport's tests: a test organization, file drops, waits and readers.

Most of them live in ``hubport.plugins.pytest_plugin`` (shipped to plugin authors) and are
re-exported here; this module keeps what only hubport's own suite needs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar

from hubport.core.config_fields import ConfigContext, FieldReader
from hubport.core.connectors import Connector

# the helpers plugin authors use too live in hubport's pytest plugin; re-exported here
from hubport.plugins.pytest_plugin import (  # noqa: F401
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
    wait_for_value,
    write_org,
)

#: three sites, London a hub site on the least-cost path between Paris and Tokyo (Paris-Tokyo
#: directly costs 30, through London 20): the article's hub-site example
THREE_SITES = """
[[site]]
Name = "Paris"
[[site]]
Name = "London"
HubSiteEnabled = true
[[site]]
Name = "Tokyo"

[[site_link]]
Name = "Paris-London"
Sites = ["Paris", "London"]
Cost = 10
[[site_link]]
Name = "London-Tokyo"
Sites = ["London", "Tokyo"]
Cost = 10
[[site_link]]
Name = "Paris-Tokyo"
Sites = ["Paris", "Tokyo"]
Cost = 30
"""


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


def undocumented_members(cls: type, text: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Public members of ``cls`` (methods, properties, dataclass fields) that ``text`` never
    names as ```name`` or ``.name(``: the docs tests' check that a page keeps up with the API."""
    import dataclasses
    import inspect

    names = {n for n, _ in inspect.getmembers(cls)}
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    return sorted(n for n in names if not n.startswith("_") and n not in skip
                  and f"`{n}" not in text and f".{n}(" not in text)


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
