"""Delivery queues against a scripted next hop: per-recipient results, the retry ladder,
expiry, delay DSNs, contained hook crashes, Poison and suspended queues
(docs/exchange.md, "Queues and retry"; docs/exchange.md, "Expiry, DSNs and Poison").

The next hop is a test plugin: it registers a ``[[test_connector]]`` type (a Delivery Agent
connector for ``example.net``) and answers ``deliver`` with whatever the test scripts. It is
registered before the daemon loads its configuration, as an installed plugin would be.
Timings come from the tracking log and are only checked with wide margins.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

import hubport.core.daemon
from hubport.core import hookimpl
from hubport.core import queue as q
from hubport.core.api import (
    DELIVERED,
    DeferQueue,
    ItemResult,
    MailItem,
    RecipientResult,
)
from hubport.core.daemon import Daemon
from hubport.core.hooks import Hooks
from hubport.core.model import (
    Envelope,
    EnvelopeRecipient,
    MailFrom,
    NextHop,
    SmtpResponse,
    Submission,
)
from hubport.core.pipeline import Pipeline
from hubport.core.store import connect
from hubport.plugins.pytest_plugin import running_daemon
from support import (
    PlainConnector,
    base_org_text,
    drop_in,
    events,
    maildir,
    message,
    wait_for,
)

TEMP = SmtpResponse(451, "4.4.1", "Connection timed out (scripted next hop)")
BUSY = SmtpResponse(452, "4.2.2", "Mailbox busy, try later (scripted)")
NO_SUCH_USER = SmtpResponse(550, "5.1.1", "Remote says: no such user here")

SCRIPTED = """
[[test_connector]]
Name = "Scripted"
AddressSpaces = ["example.net"]
"""


ScriptConnector = PlainConnector  # A Delivery Agent connector whose deliveries the test scripts.


@dataclass
class Call:
    at: float
    items: list[tuple[str, list[str]]]  # (subject, recipient addresses) per mail item


def deliver_all(items: list[MailItem]) -> list[ItemResult]:
    return [ItemResult.success(item) for item in items]


class ScriptedHop:
    """The plugin: ``respond(items)`` returns what the hook returns, or raises."""

    def __init__(self) -> None:
        self.respond: Callable[[list[MailItem]], Any] = deliver_all
        self.calls: list[Call] = []
        self.delivered: list[str] = []

    @hookimpl
    def register_connector_types(self, register: Callable[[type], None]) -> None:
        register(ScriptConnector)

    @hookimpl
    def deliver(self, next_hop: NextHop, connector: Any, items: list[MailItem],
                context: Any) -> Any:
        if not isinstance(connector, ScriptConnector):
            return None
        self.calls.append(Call(time.time(), [(i.message.subject, [r.address for r in
                                                                    i.recipients])
                                             for i in items]))
        outcome = self.respond(items)
        if isinstance(outcome, list):
            for item, result in zip(items, outcome):
                self.delivered += [r.address for r in item.recipients
                                   if (rr := result.recipients.get(r.id)) and rr.kind == DELIVERED]
        return outcome

    def attempts_of(self, address: str) -> list[float]:
        return [c.at for c in self.calls if any(address in rcpts for _, rcpts in c.items)]


@pytest.fixture
def hop(monkeypatch: pytest.MonkeyPatch) -> ScriptedHop:
    """The scripted plugin, registered in every Hooks the daemon builds from now on."""
    plugin = ScriptedHop()

    def hooks_with_plugin(extra_modules: Any = (), **kwargs: Any) -> Hooks:
        hooks = Hooks(extra_modules, **kwargs)
        hooks.register(plugin, name="scripted-hop")
        hooks.pm.hook.register_connector_types(register=hooks.registry.add_connector_type)
        return hooks

    monkeypatch.setattr(hubport.core.daemon, "Hooks", hooks_with_plugin)
    return plugin


@asynccontextmanager
async def running(root: Path, server: dict[str, str] | None = None) -> AsyncIterator[Daemon]:
    """The shared test organization plus the scripted connector; ``server`` overrides keys."""
    (root / "org.toml").write_text(base_org_text(server, extra=SCRIPTED))
    async with running_daemon(root / "org.toml") as daemon:
        yield daemon


# -- helpers -------------------------------------------------------------------------------


def replay(root: Path, name: str, sender: str, receivers: list[str], subject: str) -> None:
    """A Replay file; ``receivers`` are X-Receiver values with their NOTIFY/ORCPT params."""
    head = f"X-Sender: <{sender}>\n" + "".join(f"X-Receiver: {r}\n" for r in receivers)
    drop_in(root / "replay", name, head.encode() + message(subject=subject, to="list@x.test"))


def stamps(root: Path, event_id: str, address: str) -> list[float]:
    return [datetime.fromisoformat(e["date-time"]).timestamp()
            for e in events(root, event_id=event_id, recipients=[address])]


def statuses(root: Path, event_id: str, address: str) -> list[str]:
    return [s for e in events(root, event_id=event_id, recipients=[address])
            for s in e["recipient-status"]]



def database(root: Path) -> sqlite3.Connection:
    """The queue as the daemon sees it: its database and the server's shared one."""
    return connect(root / "var" / "queue" / "mail.que", root / "var" / "queue" / "server.db")


def queues(root: Path) -> dict[str, dict[str, Any]]:
    """Get-Queue, read beside the running daemon: rows keyed by connector or queue name."""
    with closing(database(root)) as conn:
        rows = q.queue_summary(conn)
    return {str(r.get("connector") or r["queue"]): r for r in rows}


def sql(root: Path, statement: str, params: tuple[Any, ...] = (), *,
        shared: bool = False) -> list[sqlite3.Row]:
    """A statement on the worker's queue database, or on the server's shared one (where
    the delivery queues' state is)."""
    with closing(database(root)) as conn, conn:
        db = q.shared(conn) if shared else conn
        return db.execute(statement, params).fetchall()


def reports(root: Path, alias: str = "Alice") -> list[dict[str, str]]:
    """The per-recipient blocks of every DSN in a mailbox, lower-case field names."""
    blocks: list[dict[str, str]] = []
    for path in maildir(root, alias):
        report = message_from_bytes(path.read_bytes())
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload()[1].get_payload()
        for block in status[1:]:  # the first block is per message
            fields = {k.lower(): v for k, v in block.items()}
            fields["_text"] = path.read_bytes().decode("ascii", "replace")
            blocks.append(fields)
    return blocks


def by_recipient(blocks: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {b["final-recipient"].partition(";")[2]: b for b in blocks}


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def within(value: float, expected: float, below: float = 0.6, above: float = 1.2) -> bool:
    """Wide timing margins: never early by more than ``below``, late by at most ``above``."""
    return expected - below <= value <= expected + above


# -- per-recipient results -----------------------------------------------------------------


async def test_one_item_delivered_deferred_and_failed_per_recipient(tmp_path: Path,
                                                                    hop: ScriptedHop) -> None:
    tries: Counter[str] = Counter()

    def respond(items: list[MailItem]) -> list[ItemResult]:
        out = []
        for item in items:
            result = ItemResult()
            for r in item.recipients:
                tries[r.address] += 1
                if r.address == "bad@example.net":
                    result.ack(r, RecipientResult.failed(NO_SUCH_USER))
                elif r.address == "later@example.net" and tries[r.address] == 1:
                    result.ack(r, RecipientResult.deferred(BUSY))
                else:
                    result.ack(r, RecipientResult.delivered())
            out.append(result)
        return out

    hop.respond = respond
    async with running(tmp_path):
        replay(tmp_path, "mix.eml", "alice@contoso.test",
               ["<ok@example.net>", "<later@example.net>",
                "<bad@example.net> ORCPT=rfc822;Bad.Person@example.net"], "mixed")
        await wait_for(lambda: "later@example.net" in hop.delivered)
        ndr = await wait_for(lambda: reports(tmp_path))
        await wait_for(lambda: len(events(tmp_path, event_id="DELIVER")) >= 2
                       and events(tmp_path, event_id="DSN"))
    assert sorted(hop.delivered) == ["later@example.net", "ok@example.net"]
    # the first attempt carried all three; the retry only the deferred one, ~1 s later
    assert hop.calls[0].items == [("mixed", ["ok@example.net", "later@example.net",
                                             "bad@example.net"])]
    assert hop.calls[1].items == [("mixed", ["later@example.net"])]
    assert within(hop.calls[1].at - hop.calls[0].at, 1.0)  # MessageRetryInterval
    assert events(tmp_path, event_id="DELIVER", recipients=["ok@example.net"])[0]["source"] \
        == "AGENT"
    assert statuses(tmp_path, "DEFER", "later@example.net") == [str(BUSY)]
    assert len(stamps(tmp_path, "DELIVER", "later@example.net")) == 1
    assert statuses(tmp_path, "FAIL", "bad@example.net") == [str(NO_SUCH_USER)]
    assert not events(tmp_path, event_id="FAIL", recipients=["later@example.net"])
    # the NDR to the sender: only the failed recipient, the remote reply, ORCPT echoed
    [block] = ndr
    assert block["final-recipient"] == "rfc822;bad@example.net"
    assert block["original-recipient"] == "rfc822;Bad.Person@example.net"
    assert block["action"] == "failed"
    assert re.fullmatch(r"5\.\d+\.\d+", block["status"])
    assert "no such user here" in block["diagnostic-code"]
    assert "later@example.net" not in block["_text"].split("Content-Type: message/")[0]


# -- the retry ladder ----------------------------------------------------------------------

LADDER = {"QueueGlitchRetryCount": "2", "QueueGlitchRetryInterval": '"1s"',
          "TransientFailureRetryCount": "1", "TransientFailureRetryInterval": '"2s"',
          "OutboundConnectionFailureRetryInterval": '"3s"'}


async def test_queue_level_deferrals_climb_the_retry_ladder(tmp_path: Path,
                                                            hop: ScriptedHop) -> None:
    hop.respond = lambda items: DeferQueue(TEMP)
    async with running(tmp_path, LADDER):
        replay(tmp_path, "l.eml", "alice@contoso.test", ["<far@example.net>"], "ladder")
        deferred = await wait_for(lambda: stamps(tmp_path, "DEFER", "far@example.net"))
        # Get-Queue while the queue waits: Retry, with the next retry time and last error
        row = await wait_for(lambda: (r := queues(tmp_path).get("Scripted")) and
                             r["status"] == "Retry" and r)
        assert row["last_error"] == str(TEMP)
        assert row["next_retry"] is not None and row["next_retry"] > deferred[0]
        assert row["message_count"] == 1 and row["delivery_type"] == "DeliveryAgent"
        times = await wait_for(lambda: (t := stamps(tmp_path, "DEFER", "far@example.net"))
                               and len(t) >= 5 and t, timeout=20)
    # glitch x2 at 1 s, transient x1 at 2 s, then the outbound interval of 3 s
    spacing = gaps(times[:5])
    for got, expected in zip(spacing, [1.0, 1.0, 2.0, 3.0]):
        assert within(got, expected), spacing
    assert statuses(tmp_path, "DEFER", "far@example.net")[0] == str(TEMP)
    [recipient] = sql(tmp_path, "SELECT attempts, status FROM recipient WHERE address=?",
                      ("far@example.net",))
    assert recipient["status"] == "Retry" and recipient["attempts"] >= 5


async def test_a_queue_in_retry_makes_one_attempt_per_retry_whatever_its_length(
        tmp_path: Path, hop: ScriptedHop, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its messages fill three batches, but a queue whose next hop failed tries one batch
    per retry (the others would only fail the same way): each deliver call is one failure
    of the queue, counted in its RetryCount."""
    monkeypatch.setattr(Pipeline, "DELIVERY_BATCH", 2)
    hop.respond = lambda items: DeferQueue(TEMP)
    async with running(tmp_path):
        replay(tmp_path, "0.eml", "alice@contoso.test", ["<r0@example.net>"], "first")
        await wait_for(lambda: (r := queues(tmp_path).get("Scripted")) and
                       r["status"] == "Retry")
        for n in range(1, 6):
            replay(tmp_path, f"{n}.eml", "alice@contoso.test", [f"<r{n}@example.net>"],
                   f"more {n}")
        await wait_for(lambda: queues(tmp_path)["Scripted"]["retry_count"] >= 4, timeout=30)
    [row] = sql(tmp_path, "SELECT retry_count FROM delivery_queue WHERE connector='Scripted'",
                shared=True)
    assert len(hop.calls) == row["retry_count"], [c.items for c in hop.calls]
    assert max(len(c.items) for c in hop.calls) == 2  # full batches were tried


@pytest.mark.parametrize("level", ["queue", "recipient"])
async def test_retry_in_from_the_agent_overrides_the_ladder(tmp_path: Path, hop: ScriptedHop,
                                                            level: str) -> None:
    def respond(items: list[MailItem]) -> Any:
        if len(hop.calls) > 1:
            return deliver_all(items)
        if level == "queue":
            return DeferQueue(TEMP, retry_in=2.0)
        return [ItemResult.defer(item, BUSY, retry_in=2.0) for item in items]

    hop.respond = respond
    async with running(tmp_path):  # the ladder and MessageRetryInterval say 1 s
        replay(tmp_path, "r.eml", "alice@contoso.test", ["<slow@example.net>"], "retry-in")
        await wait_for(lambda: hop.delivered)
    first, second = hop.attempts_of("slow@example.net")
    assert within(second - first, 2.0), second - first


# -- expiry and DSNs -----------------------------------------------------------------------


async def test_expired_messages_fail_4_4_7_with_an_ndr(tmp_path: Path, hop: ScriptedHop) -> None:
    hop.respond = lambda items: DeferQueue(TEMP)
    server = {"MessageExpirationTimeout": '"5s"', "DelayNotificationTimeout": '"1h"'}
    async with running(tmp_path, server):
        replay(tmp_path, "d.eml", "alice@contoso.test",
               ["<d@example.net> ORCPT=rfc822;D.Person@example.net"], "deferred")
        replay(tmp_path, "u.eml", "alice@contoso.test", ["<u@nowhere.test>"], "unreachable")
        replay(tmp_path, "n.eml", "alice@contoso.test", ["<n@example.net> NOTIFY=NEVER"], "never")
        replay(tmp_path, "z.eml", "", ["<z@example.net>"], "null sender")
        everyone = ["d@example.net", "u@nowhere.test", "n@example.net", "z@example.net"]
        await wait_for(lambda: queues(tmp_path)["Unreachable"]["message_count"] == 1)
        await wait_for(lambda: all(stamps(tmp_path, "FAIL", a) for a in everyone), timeout=20)
        blocks = await wait_for(lambda: len(b := reports(tmp_path)) >= 2 and b)
        assert queues(tmp_path)["Unreachable"]["message_count"] == 0
    for address in everyone:
        assert statuses(tmp_path, "FAIL", address) == ["550 4.4.7 QUEUE.Expired; message expired"]
        [received] = stamps(tmp_path, "RECEIVE", address)
        [failed] = stamps(tmp_path, "FAIL", address)
        assert failed - received >= 5.0 - 0.6, (address, failed - received)  # never early
    assert len(hop.attempts_of("d@example.net")) >= 2  # it was retried until it expired
    # NDRs only where NOTIFY allows and never to the null sender
    dsn = {r for e in events(tmp_path, event_id="DSN") for r in e["recipient-address"]}
    assert dsn == {"d@example.net", "u@nowhere.test"}
    found = by_recipient(blocks)
    assert set(found) == {"d@example.net", "u@nowhere.test"}
    for block in found.values():
        assert block["action"] == "failed"
        assert block["status"] == "4.4.7"
        assert "QUEUE.Expired" in block["diagnostic-code"]
    assert found["d@example.net"]["original-recipient"] == "rfc822;D.Person@example.net"


async def test_one_delay_dsn_only_for_recipients_that_want_it(tmp_path: Path,
                                                              hop: ScriptedHop) -> None:
    hop.respond = lambda items: DeferQueue(TEMP)
    async with running(tmp_path, {"DelayNotificationTimeout": '"2s"'}):
        replay(tmp_path, "d.eml", "alice@contoso.test", ["<d@example.net>"], "default")
        replay(tmp_path, "u.eml", "alice@contoso.test", ["<u@nowhere.test>"], "unreachable")
        replay(tmp_path, "n.eml", "alice@contoso.test", ["<n@example.net> NOTIFY=NEVER"], "never")
        replay(tmp_path, "s.eml", "alice@contoso.test",
               ["<sf@example.net> NOTIFY=SUCCESS,FAILURE"], "no delay")
        replay(tmp_path, "z.eml", "", ["<z@example.net>"], "null sender")
        await wait_for(lambda: len(events(tmp_path, event_id="DSN")) >= 2, timeout=15)
        first = max(datetime.fromisoformat(e["date-time"]).timestamp()
                    for e in events(tmp_path, event_id="DSN"))
        # keep going: two more attempts (and several sweeps) must not send another one
        await wait_for(lambda: len([t for t in stamps(tmp_path, "DEFER", "d@example.net")
                                    if t > first]) >= 2, timeout=15)
        blocks = await wait_for(lambda: len(b := reports(tmp_path)) >= 2 and b)
    dsn = Counter(r for e in events(tmp_path, event_id="DSN") for r in e["recipient-address"])
    assert dsn == {"d@example.net": 1, "u@nowhere.test": 1}
    assert not events(tmp_path, event_id="FAIL")
    found = by_recipient(blocks)
    assert set(found) == {"d@example.net", "u@nowhere.test"}
    for block in found.values():
        assert block["action"] == "delayed"
        assert block["status"].startswith("4.")
        assert block["will-retry-until"]
    assert found["d@example.net"]["status"] == "4.4.1"  # from the last response
    assert len(maildir(tmp_path, "Alice")) == 2


# -- crashes, Poison, suspension ------------------------------------------------------------


async def test_a_raising_deliver_hook_defers_and_the_daemon_keeps_running(
        tmp_path: Path, hop: ScriptedHop) -> None:
    def respond(items: list[MailItem]) -> Any:
        if len(hop.calls) <= 2:
            raise RuntimeError("the agent fell over")
        return deliver_all(items)

    hop.respond = respond
    async with running(tmp_path) as daemon:
        replay(tmp_path, "x.eml", "alice@contoso.test", ["<x@example.net>"], "crashy")
        await wait_for(lambda: (r := queues(tmp_path).get("Scripted")) and
                       r["last_error"] == "451 4.3.0 Local error in processing")
        await wait_for(lambda: hop.delivered == ["x@example.net"])
        assert daemon.pipeline is not None
        assert not any(t.done() for t in daemon.pipeline._tasks)
        # and the rest of the hub is unaffected
        replay(tmp_path, "b.eml", "alice@contoso.test", ["<bob@contoso.test>"], "for bob")
        await wait_for(lambda: maildir(tmp_path, "Bob"))
        await wait_for(lambda: stamps(tmp_path, "DELIVER", "x@example.net"))
    assert statuses(tmp_path, "DEFER", "x@example.net") == ["451 4.3.0 Local error in processing"] * 2
    first, second, third = hop.attempts_of("x@example.net")
    assert within(second - first, 1.0) and within(third - second, 1.0)  # glitch retry


async def test_messages_in_flight_at_a_crash_are_retried_alone_then_cleared(
        tmp_path: Path, hop: ScriptedHop) -> None:
    """Every message in flight at a crash is blamed once, then taken through one attempt
    on its own before normal work starts; surviving it clears its count, so a batch-mate
    of the real culprit never reaches Poison (the kill test in test_daemon_e2e.py shows the
    culprit itself going there)."""
    # per-message deferrals: a queue-level one would hold later arrivals for the hour too
    hop.respond = lambda items: [ItemResult.defer(item, TEMP, retry_in=3600) for item in items]
    async with running(tmp_path):
        for name in ("a", "b", "c"):
            replay(tmp_path, f"{name}.eml", "alice@contoso.test", [f"<{name}@example.net>"],
                   f"message {name}")
        await wait_for(lambda: all(stamps(tmp_path, "DEFER", f"{n}@example.net") for n in "abc"))
    ids = {r["subject"]: r["id"] for r in sql(tmp_path, "SELECT id, subject FROM message")}
    a, b = ids["message a"], ids["message b"]

    # a crash while a and b were in flight: both blamed once, then each tried alone first
    sql(tmp_path, "UPDATE message SET in_flight=1 WHERE id IN (?,?)", (a, b))
    sql(tmp_path, "UPDATE recipient SET next_retry=NULL WHERE message NOT IN (?,?)", (a, b))
    hop.respond = deliver_all
    hop.calls.clear()
    async with running(tmp_path):
        await wait_for(lambda: sorted(hop.delivered) == [f"{n}@example.net" for n in "abc"])
    # a and b (retry due in an hour) had their isolated attempts at start, before c
    first_two = sorted(call.items for call in hop.calls[:2])
    assert first_two == [[("message a", ["a@example.net"])], [("message b", ["b@example.net"])]]
    assert not events(tmp_path, event_id="POISONMESSAGE")
    assert sql(tmp_path, "SELECT id FROM message") == []  # all delivered and removed


def test_recover_counts_crashes_and_poisons_at_the_threshold() -> None:
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.row_factory = sqlite3.Row
        conn.executescript(q.SCHEMA)
        sub = Submission(Envelope(MailFrom("alice@contoso.test"),
                                  [EnvelopeRecipient("x@example.net")]), b"Subject: s\n\nx\n",
                         "PICKUP")
        one, two, three = (q.insert_submission(conn, sub, 0.0, 1e12) for _ in range(3))
        q.set_in_flight(conn, [one, two], True)
        first = q.recover(conn, poison_threshold=2, poison_enabled=True)
        assert (sorted(first.crashed), first.poisoned) == ([one, two], [])
        # a suspect is categorized alone, ahead of the others
        assert q.submitted_message_ids(conn, 100, 1.0) == [one]
        q.set_in_flight(conn, [one], True)
        second = q.recover(conn, poison_threshold=2, poison_enabled=True)
        assert (second.crashed, second.poisoned) == ([one], [one])
        state = conn.execute("SELECT state, suspended FROM message WHERE id=?", (one,)).fetchone()
        assert tuple(state) == ("poison", 1)
        assert one not in q.submitted_message_ids(conn, 100, 1.0)
        assert q.submitted_message_ids(conn, 100, 1.0) == [two]  # still suspect: alone
        # detection off: crashes are counted, nothing is poisoned
        q.set_in_flight(conn, [two, three], True)
        third = q.recover(conn, poison_threshold=2, poison_enabled=False)
        assert third.poisoned == []
        counts = dict(conn.execute("SELECT id, crash_count FROM message").fetchall())
        assert counts == {one: 2, two: 2, three: 1}


async def test_suspended_queue_holds_mail_until_resumed(tmp_path: Path, hop: ScriptedHop) -> None:
    async with running(tmp_path) as daemon:
        assert daemon.pipeline is not None
        replay(tmp_path, "1.eml", "alice@contoso.test", ["<one@example.net>"], "first")
        await wait_for(lambda: hop.delivered == ["one@example.net"])
        sql(tmp_path, "UPDATE delivery_queue SET suspended=1 WHERE connector='Scripted'",
            shared=True)
        replay(tmp_path, "2.eml", "alice@contoso.test", ["<two@example.net>"], "second")
        await wait_for(lambda: (r := queues(tmp_path)["Scripted"])["status"] == "Suspended"
                       and r["message_count"] == 1)
        await asyncio.sleep(0.8)  # a working queue would have delivered by now
        assert hop.delivered == ["one@example.net"] and len(hop.calls) == 1
        sql(tmp_path, "UPDATE delivery_queue SET suspended=0 WHERE connector='Scripted'",
            shared=True)
        daemon.pipeline.wake()
        await wait_for(lambda: hop.delivered == ["one@example.net", "two@example.net"])
        await wait_for(lambda: queues(tmp_path)["Scripted"]["message_count"] == 0)
