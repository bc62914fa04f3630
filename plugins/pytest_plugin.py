"""hubport's pytest plugin for plugin and agent authors (entry point ``pytest11``).

Installed with hubport, it is active in every pytest run of the virtualenv. Fixtures (all
prefixed ``hubport_`` so they never clash with a project's own):

* ``hubport_hub_factory`` — ``async with hubport_hub_factory(extra=TOML) as hub:`` runs an
  in-process daemon on a temporary test organization (``BASE_ORG`` plus your tables);
* ``hubport_smtp_server`` — a fake downstream SMTP server (aiosmtpd) whose replies are
  scripted per command;
* ``hubport_clock`` — a retry clock the test moves forward (``advance(seconds)``);
* ``hubport_agent_harness`` — one delivery agent without a hub: ``AgentHarness`` builds
  ``MailItem``s (``harness.item``) and runs them as its connector would (``harness.run``);
* ``hubport_unwritable_folder`` — folders that refuse writes (a read-only bind mount as
  root), restored at teardown;
* ``hubport_hub_process`` — the real daemon in a subprocess (``HubProcess``): failpoints,
  SIGKILL, restart.

``running_daemon(config, clock=..., plugins=...)`` is the same in-process daemon on an
organization file of your own (``async with ... as daemon:``; ``Hub(root, daemon)`` gives the
helpers below).

Helpers (plain functions and ``Hub`` methods): ``drop_in``/``hub.drop_pickup``,
``replay_file``/``hub.drop_replay``, ``drop_files``, ``maildir``, ``events``/``event_ids``
(message tracking), ``wait_for``/``wait_for_sync``/``wait_for_value`` (a timeout names what
was awaited and what was last seen).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from hubport.core.model import NextHop
from hubport.core.tracking import search

if TYPE_CHECKING:  # the daemon and the agent API are imported only when a test uses them
    from hubport.core.api import DeliveryAgent, ItemResult, MailItem
    from hubport.core.daemon import Daemon

T = TypeVar("T")

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
    """The test organization in ``folder/org.toml``; ``extra`` appends your own tables."""
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
    """A Replay-format file: X-Sender/X-Receiver lines, then the message."""
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
    """Message tracking events of the hub in ``root``, oldest first.

    The filters are Get-MessageTrackingLog's (``hubport.core.tracking.search``): ``event_id``,
    ``source``, ``sender``, ``recipients=[...]`` (any of them), ``message_id``,
    ``internal_message_id``, ``message_subject``, ``start``/``end``. Each event is a dict
    keyed by the log's field names: ``"event-id"``, ``"source"``, ``"recipient-address"`` and
    ``"recipient-status"`` (lists, one entry per recipient), ``"connector-id"``,
    ``"source-context"``, ``"message-subject"``...
    """
    return search(root / "var" / "logs" / "MessageTracking", result_size=None, **filters)


def event_ids(root: Path, **filters: Any) -> list[str]:
    """The ``event-id`` of each event ``events(root, **filters)`` returns, in order."""
    return [e["event-id"] for e in events(root, **filters)]


def _timeout_message(what: str, timeout: float, last: Any,
                     describe: Callable[[], Any] | None) -> str:
    """Say what the wait was for and what it last saw: the condition's own (falsy) value,
    and ``describe()`` when given, so a failure explains itself."""
    text = f"{what} not met within {timeout}s"
    if describe is None or (last is not None and last is not False):
        text += f"; the condition last returned {last!r}"
    if describe is not None:
        try:
            seen = describe()
        except Exception as exc:  # the report must not hide the timeout
            seen = f"<describe() raised {exc!r}>"
        text += f"; last seen: {seen if isinstance(seen, str) else repr(seen)}"
    return text


def _poll(predicate: Callable[[], Any], timeout: float,
          describe: Callable[[], Any] | None = None,
          what: str = "condition") -> Iterator[Any]:
    """Yield None until ``predicate`` is truthy, then its value; fail after ``timeout``
    with what it last saw (``_timeout_message``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            yield value
            return
        if time.monotonic() > deadline:
            raise AssertionError(_timeout_message(what, timeout, value, describe))
        yield None


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0,
                   interval: float = 0.05, *, describe: Callable[[], Any] | None = None,
                   what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy and return that value.

    After ``timeout`` seconds it fails with an ``AssertionError`` naming ``what`` was awaited,
    the value the predicate last returned and, if given, ``describe()`` (called then: e.g.
    ``describe=lambda: hub.event_ids()`` shows the events the hub did log).
    """
    for value in _poll(predicate, timeout, describe, what):
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError("unreachable")


def wait_for_sync(predicate: Callable[[], Any], timeout: float = 10.0,
                  interval: float = 0.05, *, describe: Callable[[], Any] | None = None,
                  what: str = "condition") -> Any:
    """``wait_for`` for code outside an event loop (e.g. a daemon in a subprocess)."""
    for value in _poll(predicate, timeout, describe, what):
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("unreachable")


async def wait_for_value(read: Callable[[], T], enough: Callable[[T], bool], what: str,
                         timeout: float = 30.0) -> T:
    """Poll ``read()`` until ``enough`` says yes to its value and return that value; on
    timeout fail naming ``what`` was awaited and the value last read."""
    seen: list[T] = []

    def check() -> bool:
        seen[:] = [read()]
        return enough(seen[0])

    await wait_for(check, timeout, what=what, describe=lambda: seen[0] if seen else None)
    return seen[0]


# -- the retry clock ---------------------------------------------------------------------


class RetryClock:
    """Real time plus an offset the test moves forward: retries and expiry come due at once.

    It starts equal to ``time.time()``, so installing it in a running pipeline is seamless.
    """

    def __init__(self) -> None:
        self.offset = 0.0
        self._pipelines: list[Any] = []

    def __call__(self) -> float:
        return time.time() + self.offset

    def attach(self, pipeline: Any) -> None:
        pipeline.clock = self
        self._pipelines.append(pipeline)

    def advance(self, seconds: float) -> None:
        """Move time forward and wake the attached pipelines' queues."""
        self.offset += seconds
        for pipeline in self._pipelines:
            pipeline.wake()


# -- the in-process hub ------------------------------------------------------------------


class Hub:
    """A running daemon and the folders of its organization."""

    def __init__(self, root: Path, daemon: Any) -> None:
        self.root = root
        self.daemon = daemon
        self.pickup = root / "pickup"
        self.replay = root / "replay"
        self.drop = root / "drop" / "Fax Gateway"
        self.state = root / "var"
        self._count = 0

    @property
    def pipeline(self) -> Any:
        """The daemon's ``hubport.core.pipeline.Pipeline`` (queues, delivery, tracking)."""
        return self.daemon.pipeline

    @property
    def store(self) -> Any:
        """The queue database (``await hub.store.read(lambda conn: ...)``)."""
        return self.daemon.pipeline.store

    def _name(self, suffix: str) -> str:
        self._count += 1
        return f"t{self._count:05d}{suffix}"

    def drop_pickup(self, data: bytes, name: str | None = None) -> Path:
        """Submit a message through the Pickup directory (From/To headers as envelope)."""
        return drop_in(self.pickup, name or self._name(".eml"), data)

    def drop_replay(self, sender: str, recipients: list[str], content: bytes,
                    name: str | None = None) -> Path:
        """Submit a message with an explicit envelope through the Replay directory."""
        return drop_in(self.replay, name or self._name(".eml"),
                       replay_file(sender, recipients, content))

    def drop_files(self, connector: str = "Fax Gateway") -> list[Path]:
        """The ``.eml`` files in a Foreign connector's Drop directory, sorted by name."""
        return drop_files(self.root / "drop" / connector)

    def maildir(self, alias: str) -> list[Path]:
        """The messages delivered to the mailbox ``alias`` (its Maildir ``new``), by name."""
        return maildir(self.root, alias)

    def events(self, **filters: Any) -> list[dict[str, Any]]:
        """This hub's message tracking events, oldest first, as dicts keyed by field name.

        Filters as Get-MessageTrackingLog: ``event_id="DELIVER"``, ``source="AGENT"``,
        ``recipients=["bob@contoso.test"]``, ``sender``, ``message_id``, ``message_subject``
        (see ``events``). ``e["recipient-address"]`` and ``e["recipient-status"]`` are lists,
        one entry per recipient, in the same order.
        """
        return events(self.root, **filters)

    def event_ids(self, **filters: Any) -> list[str]:
        """The event ids (``"RECEIVE"``, ``"DELIVER"``...) of ``events(**filters)``."""
        return event_ids(self.root, **filters)


PluginsArg = str | ModuleType | Iterable[str | ModuleType]


def _plugin_modules(plugins: PluginsArg) -> tuple[str | ModuleType, ...]:
    """``plugins=`` as the daemon takes it: one module or many, each a dotted path or an
    imported module; anything else is a clear TypeError, not a failure deep in start-up."""
    given = (plugins,) if isinstance(plugins, (str, ModuleType)) else tuple(plugins)
    for plugin in given:
        if not isinstance(plugin, (str, ModuleType)):
            raise TypeError(f"plugins= takes module names or module objects, not {plugin!r}")
    return given


@asynccontextmanager
async def running_daemon(config: Path, *, clock: RetryClock | None = None,
                         plugins: PluginsArg = (),
                         isolated: bool = False) -> AsyncIterator[Daemon]:
    """Run an in-process daemon (``hubport.core.daemon.Daemon``) on any organization file.

    For a test whose organization is not ``BASE_ORG``: it yields once the daemon is ready (a
    start-up error is raised here instead), attaches ``clock`` to its pipeline, and at exit
    stops it, waits for the drain and restores the working directory.

    ``plugins`` are registered after the built-ins and installed plugins: module names or
    module objects (a plugin installed already is registered once). ``isolated=True`` leaves
    out the installed (entry-point) plugins, so only the built-ins, ``plugins`` and those the
    organization file names are loaded: the test sees no other package's plugin.
    """
    from hubport.core.daemon import Daemon

    modules = _plugin_modules(plugins)
    cwd = os.getcwd()
    daemon = Daemon(config, signals=False, extra_plugins=modules, entry_points=not isolated)
    task = asyncio.get_running_loop().create_task(daemon.run())
    ready = asyncio.ensure_future(daemon.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises the start-up error
    if clock is not None:
        clock.attach(daemon.pipeline)
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 30)
        os.chdir(cwd)


@asynccontextmanager
async def running_hub(root: Path, *, clock: RetryClock | None = None,
                      plugins: PluginsArg = (), isolated: bool = False,
                      **org: str) -> AsyncIterator[Hub]:
    """Start a daemon on the test organization in ``root``; stop it (draining) at exit.

    ``plugins`` and ``isolated`` as for ``running_daemon``; ``org`` are ``write_org``'s."""
    async with running_daemon(write_org(root, **org), clock=clock, plugins=plugins,
                              isolated=isolated) as daemon:
        yield Hub(root, daemon)


@pytest.fixture
def hubport_clock() -> RetryClock:
    """A controllable retry clock; pass it to ``hubport_hub_factory(clock=...)``."""
    return RetryClock()


@pytest.fixture
def hubport_hub_factory(tmp_path: Path) -> Callable[..., Any]:
    """``async with hubport_hub_factory(extra=..., clock=..., plugins=..., isolated=...)
    as hub:`` (the options of ``running_hub``)."""

    def factory(**options: Any) -> Any:
        return running_hub(tmp_path, **options)

    return factory


# -- the fake downstream SMTP server -----------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class ScriptedSmtpHandler:
    """aiosmtpd handler: replies come from ``script(command, reply, times)``, else 250."""

    replies: dict[str, list[str]] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def script(self, command: str, reply: str, times: int = 1) -> None:
        """Answer the next ``times`` ``command``s (MAIL, RCPT, DATA) with ``reply``."""
        self.replies.setdefault(command.upper(), []).extend([reply] * times)

    def _next(self, command: str) -> str | None:
        self.commands.append(command)
        queue = self.replies.get(command)
        return queue.pop(0) if queue else None

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self._next("MAIL")
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        reply = self._next("RCPT")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = self._next("DATA")
        if reply:
            return reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      bytes(envelope.original_content or envelope.content)))
        return "250 2.0.0 Queued"


@dataclass
class FakeSmtpServer:
    host: str
    port: int
    handler: ScriptedSmtpHandler

    def script(self, command: str, reply: str, times: int = 1) -> None:
        self.handler.script(command, reply, times)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


@pytest.fixture
def hubport_smtp_server() -> Iterator[FakeSmtpServer]:
    """A fake downstream SMTP server on 127.0.0.1 (a free port); ``.script(...)`` errors."""
    import socket

    from aiosmtpd.controller import Controller

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = ScriptedSmtpHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield FakeSmtpServer("127.0.0.1", port, handler)
    finally:
        controller.stop()


# -- one delivery agent without a hub --------------------------------------------------------


#: the next hop ``mail_item`` and ``AgentHarness`` use unless told otherwise
AGENT_HOP_DOMAIN = "agent.test"


def mail_item(sender: str = "alice@contoso.test",
              recipients: Sequence[str] = ("someone@agent.test",),
              data: bytes | None = None, *, message_id: int = 1,
              recipient_ids: Sequence[int] | None = None,
              drop_intents: Mapping[str, str] | None = None,
              next_hop: NextHop | None = None, queue_id: int = 1,
              default_domain: str | None = "contoso.test") -> MailItem:
    """A ``MailItem`` as the transport hands one to ``deliver``, built from plain values.

    ``data`` defaults to ``message(sender, recipients[0])``; recipient ids default to
    ``message_id * 100 + i`` (the keys of ``ItemResult.recipients``). ``drop_intents`` maps
    an address to the file name a previous attempt recorded for it (a ``FolderWriter``
    recovery after a crash).
    """
    from hubport.core.api import MailItem as Item
    from hubport.core.body import MessageBody
    from hubport.core.headers import (
        MessageFormatError,
        canonicalize_line_endings,
        message_id_of,
        parse_header_section,
        subject_of,
    )
    from hubport.core.model import MailFrom, QueuedMessage, QueuedRecipient, RecipientStatus

    if isinstance(recipients, str):
        raise TypeError("recipients= takes a list of addresses, not one string")
    content = data if data is not None else message(sender, recipients[0] if recipients else
                                                     "undisclosed-recipients:;")
    ids = list(recipient_ids) if recipient_ids is not None else \
        [message_id * 100 + i for i in range(len(recipients))]
    if len(ids) != len(recipients):
        raise ValueError(f"{len(recipients)} recipients but {len(ids)} recipient_ids")
    intents = dict(drop_intents or {})
    rows = [QueuedRecipient(rid, message_id, address, RecipientStatus.READY, queue_id=queue_id,
                            drop_intent=intents.get(address))
            for rid, address in zip(ids, recipients)]
    now = time.time()
    try:  # the Message-ID and Subject as the queue reads them from a submission
        parsed = parse_header_section(canonicalize_line_endings(content))
        header_id, subject = message_id_of(parsed), subject_of(parsed)
    except MessageFormatError:
        header_id, subject = "", ""
    queued = QueuedMessage(message_id, f"kit-{message_id}",
                           header_id or f"<kit-{message_id}@kit.test>", MailFrom(sender),
                           MessageBody.of(content), len(content), "REPLAY", "", subject, now,
                           now + 2 * 86400)
    hop = next_hop or NextHop("DeliveryAgent", AGENT_HOP_DOMAIN, "Agent")
    return Item(queued, rows, hop, queue_id, default_domain)


@dataclass
class AgentRun:
    """What one run of an agent produced, as data.

    ``outcome`` is what the transport got: a list with one ``ItemResult`` per item, or the
    ``DeferQueue``/``FailQueue`` that ``open`` returned (or that a crash of a custom
    ``deliver_many`` became). ``intents`` are the writes ``FolderWriter`` recorded.
    """

    items: list[MailItem]
    outcome: Any
    intents: dict[int, str]

    @property
    def results(self) -> list[ItemResult]:
        """The ``ItemResult`` per item; an ``AssertionError`` when the queue was deferred or
        failed as a whole (look at ``outcome`` for that)."""
        if isinstance(self.outcome, list):
            return self.outcome
        raise AssertionError(f"the agent answered for the whole queue: {self.outcome!r}")

    def statuses(self) -> dict[str, str]:
        """Each recipient address → ``"delivered 250 2.0.0 OK"``, ``"deferred 451 ..."``,
        ``"failed 550 ..."`` or ``"unacknowledged"`` (the transport defers those). After a
        whole-queue answer every recipient shows it, as the transport applies it."""
        from hubport.core.api import DeferQueue, FailQueue

        seen: dict[str, str] = {}
        if isinstance(self.outcome, (DeferQueue, FailQueue)):
            kind = "deferred" if isinstance(self.outcome, DeferQueue) else "failed"
            return {r.address: f"{kind} {self.outcome.response}"
                    for item in self.items for r in item.recipients}
        for item, result in zip(self.items, self.results):
            for r in item.recipients:
                got = result.recipients.get(r.id)
                seen[r.address] = f"{got.kind} {got.response}" if got else "unacknowledged"
        return seen


def _toml_value(key: str, value: Any) -> str:
    """One connector field from a Python value (JSON's strings, numbers, booleans and lists
    are TOML's too); anything else is refused rather than guessed."""
    def ok(v: Any) -> bool:
        return isinstance(v, (str, int, float, bool)) or (
            isinstance(v, (list, tuple)) and all(ok(x) for x in v))
    if isinstance(value, Path):
        value = str(value)
    if not ok(value):
        raise TypeError(f"connector field {key}: write strings, numbers, booleans or lists, "
                        f"not {value!r}")
    return json.dumps(list(value) if isinstance(value, tuple) else value)


class AgentHarness:
    """One delivery agent driven as a Delivery Agent connector drives it, without a hub.

    The connector is read from a real organization (``BASE_ORG``), so ``read_settings``
    checks ``fields`` as the daemon would (a bad field raises ``ConfigErrors``), and the
    context holds that organization, its HUB01 server and its recipient directory.
    """

    def __init__(self, agent_class: type[DeliveryAgent],
                 fields: Mapping[str, Any] | str = "", *, name: str = "Agent",
                 address_space: str = f"SMTP:{AGENT_HOP_DOMAIN};1",
                 base_dir: Path | None = None, extra: str = "",
                 clock: Callable[[], float] = time.time) -> None:
        from hubport.core.config import parse_organization
        from hubport.core.directory import RecipientDirectory
        from hubport.core.hooks import Hooks

        protocol = (agent_class.protocol or "KIT-HARNESS").upper()
        body = fields if isinstance(fields, str) else "".join(
            f"{key} = {_toml_value(key, value)}\n" for key, value in fields.items())
        table = (f"\n[[delivery_agent_connector]]\nName = {json.dumps(name)}\n"
                 f"AddressSpaces = [{json.dumps(address_space)}]\n"
                 f"DeliveryProtocol = {json.dumps(protocol)}\n{body}\n")
        registry = Hooks(entry_points=False).registry
        agents = {**registry.delivery_agents, protocol: agent_class}
        self.organization = parse_organization(
            BASE_ORG.format(server_extra="", foreign_extra="", extra=extra + table),
            source="org.toml", base_dir=base_dir or Path.cwd(),
            connector_types=registry.connector_types, delivery_agents=agents)
        self.agent_class = agent_class
        self.connector: Any = self.organization.connector(name)
        self.next_hop = NextHop("DeliveryAgent", address_space.split(":", 1)[-1]
                                .rsplit(";", 1)[0], name)
        #: recipient id → file name, as ``FolderWriter`` recorded them (the queue's record)
        self.intents: dict[int, str] = {}
        self._ids = 0

        async def record_intent(intents: dict[int, str]) -> None:
            self.intents.update(intents)

        from hubport.core.api import DeliveryContext as Context
        self.context = Context(self.organization, self.organization.server("HUB01"),
                               RecipientDirectory(self.organization), record_intent, clock,
                               store_id="kitstore")

    @property
    def settings(self) -> Any:
        """What the agent's ``read_settings`` returned for ``fields``."""
        return self.connector.settings

    def item(self, sender: str = "alice@contoso.test",
             recipients: Sequence[str] = (f"someone@{AGENT_HOP_DOMAIN}",),
             data: bytes | None = None, **options: Any) -> MailItem:
        """``mail_item`` for this connector's next hop, numbering messages 1, 2, 3..."""
        if "message_id" not in options:
            self._ids += 1
            options["message_id"] = self._ids
        options.setdefault("next_hop", self.next_hop)
        return mail_item(sender, recipients, data, **options)

    async def run(self, items: MailItem | Sequence[MailItem]) -> AgentRun:
        """Deliver ``items`` as the connector does: connections of MaxMessagesPerConnection
        items (at most MaxConcurrentConnections at once), each open → ``deliver`` per item
        (or ``deliver_many``) → close within ConnectionTimeout."""
        from hubport.core.agent_runner import run_connections

        batch = [items] if not isinstance(items, Sequence) else list(items)
        connector = self.connector
        outcome = await run_connections(
            self.agent_class, connector, self.next_hop, batch, self.context,
            per_connection=connector.max_messages_per_connection,
            semaphore=asyncio.Semaphore(connector.max_concurrent_connections),
            timeout=connector.connection_timeout)
        return AgentRun(batch, outcome, dict(self.intents))


@pytest.fixture
def hubport_agent_harness(tmp_path: Path) -> Callable[..., AgentHarness]:
    """``harness = hubport_agent_harness(MyAgent, {"SpoolDirectory": path})`` (the options of
    ``AgentHarness``; relative paths resolve against the test's ``tmp_path``)."""

    def factory(agent_class: type[DeliveryAgent], fields: Mapping[str, Any] | str = "",
                **options: Any) -> AgentHarness:
        options.setdefault("base_dir", tmp_path)
        return AgentHarness(agent_class, fields, **options)

    return factory


# -- faults: a folder that refuses writes, a hub killed mid-delivery -----------------------


class UnwritableFolders:
    """Makes folders refuse writes (``EROFS``/``EACCES``) and restores them at teardown.

    As root (which file modes do not stop) a folder becomes a read-only bind mount of
    itself; the test is skipped, with the reason, where mounting is not permitted (a
    container without CAP_SYS_ADMIN). Otherwise its write permission is taken away.
    """

    def __init__(self) -> None:
        self._undo: dict[Path, Callable[[], None]] = {}

    def make(self, folder: Path | str) -> Path:
        """Make ``folder`` (created if missing) refuse new files until ``restore``."""
        path = Path(folder).resolve()
        path.mkdir(parents=True, exist_ok=True)
        if path in self._undo:
            return path
        if os.geteuid() == 0:
            self._mount_read_only(path)
        else:
            mode = path.stat().st_mode & 0o7777
            path.chmod(mode & ~0o222)
            self._undo[path] = lambda: path.chmod(mode)
        return path

    def _mount_read_only(self, path: Path) -> None:
        def run(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

        bound = run("mount", "--bind", str(path), str(path))
        if bound.returncode != 0:
            pytest.skip(f"cannot make {path} read-only: mount --bind failed "
                        f"({bound.stderr.strip() or bound.returncode}); mounting needs "
                        "CAP_SYS_ADMIN")
        ro = run("mount", "-o", "remount,bind,ro", str(path))
        if ro.returncode != 0:
            run("umount", str(path))
            pytest.skip(f"cannot make {path} read-only: remount ro failed "
                        f"({ro.stderr.strip() or ro.returncode})")

        def unmount() -> None:
            done = run("umount", str(path))
            if done.returncode != 0:  # busy: detach now, the kernel frees it when unused
                run("umount", "-l", str(path))
        self._undo[path] = unmount

    def restore(self, folder: Path | str) -> None:
        """Make ``folder`` writable again (mid-test: the fault is repaired)."""
        undo = self._undo.pop(Path(folder).resolve(), None)
        if undo is not None:
            undo()

    def restore_all(self) -> None:
        """Restore every folder still unwritable (the fixture's teardown)."""
        for path in list(self._undo):
            self.restore(path)


@pytest.fixture
def hubport_unwritable_folder() -> Iterator[UnwritableFolders]:
    """``hubport_unwritable_folder.make(path)`` makes a folder refuse writes, ``.restore(path)``
    repairs it; every folder is restored at teardown, whatever the test did."""
    folders = UnwritableFolders()
    try:
        yield folders
    finally:
        folders.restore_all()


#: what the daemon logs once it serves, and at a clean stop
HUB_RUNNING = "hubport running"
LOG_TAIL = 12_000


class HubProcess:
    """The real ``hubport run`` daemon as a subprocess on the organization in ``root``.

    For crash tests: ``start(failpoints="after_agent_before_commit:kill")`` arms a failpoint
    (``HUBPORT_FAILPOINTS``; see ``hubport.core.failpoints``) at which the process SIGKILLs itself,
    ``wait_exit()`` waits for that, ``kill()`` is a SIGKILL from outside, ``restart()`` starts
    it again on the same queue. ``hub`` has the file helpers (``hub.drop_replay``,
    ``hub.events``, ``hub.maildir``...); each run's output goes to its own log file, printed
    when the test fails.
    """

    def __init__(self, root: Path, config: Path, workers: int = 1) -> None:
        self.root = root
        self.config = config
        #: ``hubport run --workers``: 1 runs one process, so a failpoint's ``kill`` ends the
        #: hub the test sees (with more, the supervisor starts the killed worker again)
        self.workers = workers
        self.hub = Hub(root, None)
        self.logs = root / "hub-logs"
        self.runs: list[tuple[subprocess.Popen[bytes], Path]] = []

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The current (latest) run's process."""
        if not self.runs:
            raise AssertionError("the hub process was never started")
        return self.runs[-1][0]

    def command(self) -> list[str]:
        """The ``hubport`` console script beside this interpreter, else ``-m hubport.core.cli``."""
        script = Path(sys.executable).parent / "hubport"
        base = [str(script)] if script.exists() else [sys.executable, "-m", "hubport.core.cli"]
        return [*base, "run", "--config", str(self.config), "--workers", str(self.workers)]

    def start(self, failpoints: str | None = None, timeout: float = 30.0) -> HubProcess:
        """Start the daemon and wait until it serves; a start-up failure shows its log."""
        if self.runs and self.alive():
            raise AssertionError("the hub process is running already")
        env = {k: v for k, v in os.environ.items()
               if k not in ("HUBPORT_FAILPOINTS", "HUBPORT_TRACE_HOOKS")}
        env["PYTHONUNBUFFERED"] = "1"
        if failpoints:
            env["HUBPORT_FAILPOINTS"] = failpoints
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"run-{len(self.runs) + 1:03d}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(self.command(), cwd=self.root, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    start_new_session=True)
        self.runs.append((proc, log))
        wait_for_sync(lambda: HUB_RUNNING in self.log_text() or not self.alive(), timeout,
                      what="the hub process to start", describe=self._tail)
        if HUB_RUNNING not in self.log_text():
            raise AssertionError(f"the hub process exited ({proc.returncode}) before "
                                 f"serving:\n{self._tail()}")
        return self

    def restart(self, failpoints: str | None = None, timeout: float = 30.0) -> HubProcess:
        """SIGKILL the daemon if it still runs, then start it again on the same queue."""
        self.kill()
        return self.start(failpoints, timeout)

    def alive(self) -> bool:
        """True while the current run's process has not exited."""
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, a crash: no drain, no flush, no clean-up."""
        if self.runs and self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.runs:
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM: the daemon drains and exits; returns its exit code."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the daemon to exit by itself (a failpoint's SIGKILL gives -9)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the hub process did not exit within {timeout}s; events: "
                                 f"{self.hub.event_ids()}\n{self._tail()}") from None

    def log_text(self) -> str:
        """The current run's output (stdout and stderr)."""
        try:
            return self.runs[-1][1].read_text(errors="replace") if self.runs else ""
        except FileNotFoundError:
            return ""

    def _tail(self) -> str:
        return self.log_text()[-LOG_TAIL:]

    def close(self) -> None:
        """Kill what still runs and print every run's log (pytest shows it on failure)."""
        for proc, _ in self.runs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:  # pragma: no cover - nothing more to do
                pass
        for proc, log in self.runs:
            text = log.read_text(errors="replace") if log.exists() else ""
            print(f"===== {log.name} (exit {proc.returncode}) =====\n{text[-LOG_TAIL:]}")


@pytest.fixture
def hubport_hub_process(tmp_path: Path) -> Iterator[Callable[..., HubProcess]]:
    """``proc = hubport_hub_process(extra=TOML)`` writes the test organization (``write_org``'s
    options) and returns a ``HubProcess``, not yet started; every process is gone at
    teardown."""
    made: list[HubProcess] = []

    def factory(**org: str) -> HubProcess:
        made.append(HubProcess(tmp_path, write_org(tmp_path, **org)))
        return made[-1]

    try:
        yield factory
    finally:
        for process in made:
            process.close()
