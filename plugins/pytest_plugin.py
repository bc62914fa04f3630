"""hubport's pytest plugin for plugin and agent authors (entry point ``pytest11``).

Installed with hubport, it is active in every pytest run of the virtualenv. Fixtures (all
prefixed ``hubport_`` so they never clash with a project's own):

* ``hubport_hub_factory`` — ``async with hubport_hub_factory(extra=TOML) as hub:`` runs an
  in-process daemon on a temporary test organization (``BASE_ORG`` plus your tables);
* ``hubport_smtp_server`` — a fake downstream SMTP server (aiosmtpd) whose replies are
  scripted per command;
* ``hubport_clock`` — a retry clock the test moves forward (``advance(seconds)``).

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
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from core.tracking import search

if TYPE_CHECKING:  # the daemon is imported only when a test starts one
    from core.daemon import Daemon

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

    The filters are Get-MessageTrackingLog's (``core.tracking.search``): ``event_id``,
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
        """The daemon's ``core.pipeline.Pipeline`` (queues, delivery, tracking)."""
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
    """Run an in-process daemon (``core.daemon.Daemon``) on any organization file.

    For a test whose organization is not ``BASE_ORG``: it yields once the daemon is ready (a
    start-up error is raised here instead), attaches ``clock`` to its pipeline, and at exit
    stops it, waits for the drain and restores the working directory.

    ``plugins`` are registered after the built-ins and installed plugins: module names or
    module objects (a plugin installed already is registered once). ``isolated=True`` leaves
    out the installed (entry-point) plugins, so only the built-ins, ``plugins`` and those the
    organization file names are loaded: the test sees no other package's plugin.
    """
    from core.daemon import Daemon

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
