"""Shared helpers for hubport's tests: a test organization, file drops, waits and readers."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any, ClassVar

from core.config_fields import ConfigContext, FieldReader
from core.connectors import Connector
from core.tracking import search


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

BASE_ORG = """
[transport_config]
MaxRecipientEnvelopeLimit = 5000

[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
DomainType = "Authoritative"
Default = true

[[accepted_domain]]
Name = "fabrikam.test"
DomainName = "fabrikam.test"
DomainType = "InternalRelay"

[[mailbox]]
Name = "Alice"
PrimarySmtpAddress = "alice@contoso.test"
EmailAddresses = ["smtp:alice.smith@contoso.test"]

[[mailbox]]
Name = "Bob"
PrimarySmtpAddress = "bob@contoso.test"

[[distribution_group]]
Name = "Staff"
PrimarySmtpAddress = "staff@contoso.test"
Members = ["Alice", "bob@contoso.test", "Everyone"]

[[distribution_group]]
Name = "Everyone"
PrimarySmtpAddress = "everyone@contoso.test"
Members = ["Staff", "Alice"]

[[mail_contact]]
Name = "Fax Reception"
ExternalEmailAddress = "FAX:+15551234"

[[transport_server]]
Name = "HUB01"
StateDirectory = "var"
PickupDirectoryPath = "pickup"
ReplayDirectoryPath = "replay"
RootDropDirectoryPath = "drop"
PickupDirectoryMaxMessagesPerMinute = "unlimited"
FolderRescanInterval = "0.3s"
FolderSettleTime = "0.2s"
QueueGlitchRetryInterval = "1s"
TransientFailureRetryInterval = "1s"
OutboundConnectionFailureRetryInterval = "1s"
MessageRetryInterval = "1s"
{server_extra}

[[foreign_connector]]
Name = "Fax Gateway"
AddressSpaces = ["FAX:*;1"]
CreateDropDirectory = true
{foreign_extra}
{extra}
"""


def write_org(folder: Path, *, server_extra: str = "", foreign_extra: str = "",
              extra: str = "") -> Path:
    path = folder / "org.toml"
    path.write_text(BASE_ORG.format(server_extra=server_extra, foreign_extra=foreign_extra,
                                    extra=extra))
    return path


def message(sender: str = "alice@contoso.test", to: str = "bob@contoso.test",
            subject: str = "hello", body: str = "Hello there.\n", extra: str = "",
            message_id: str | None = None) -> bytes:
    mid = f"Message-ID: {message_id}\n" if message_id else ""
    return (f"From: {sender}\nTo: {to}\nSubject: {subject}\n{mid}{extra}\n{body}").encode()


def replay_file(sender: str, recipients: list[str], content: bytes) -> bytes:
    head = f"X-Sender: <{sender}>\n" + "".join(f"X-Receiver: <{r}>\n" for r in recipients)
    return head.encode() + content


def drop_in(folder: Path, name: str, data: bytes) -> Path:
    """Write a file the way a well-behaved producer does: elsewhere, then rename in."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    final = folder / name
    os.rename(tmp, final)
    return final


def maildir(root: Path, alias: str) -> list[Path]:
    new = root / "var" / "mailboxes" / alias / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def read_mail(path: Path) -> Message:
    return message_from_bytes(path.read_bytes())


def drop_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.eml")) if folder.is_dir() else []


def events(root: Path, **filters: Any) -> list[dict[str, Any]]:
    return search(root / "var" / "logs" / "MessageTracking", result_size=None, **filters)


def event_ids(root: Path, **filters: Any) -> list[str]:
    return [e["event-id"] for e in events(root, **filters)]


def _poll(predicate: Callable[[], Any], timeout: float) -> Iterator[Any]:
    """Yield None until ``predicate`` is truthy, then its value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            yield value
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        yield None


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0,
                   interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    for value in _poll(predicate, timeout):
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError("unreachable")


def wait_for_sync(predicate: Callable[[], Any], timeout: float = 10.0,
                  interval: float = 0.05) -> Any:
    for value in _poll(predicate, timeout):
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("unreachable")
