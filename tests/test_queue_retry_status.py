"""Queue Retry after a connection failure: the next-hop queue retries, not each message
(docs/exchange.md, "Queues and retry").

A real Send connector delivers to a smart host on 127.0.0.1: first a port nobody listens on
or a peer that answers ``421`` at the greeting, later a real aiosmtpd sink on that port. The
retry clock (``hubport_clock``) is moved forward to bring retries due, so the intervals can be
realistic (minutes) and nothing is retried behind the test's back.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from daemon_process import child_env, hubport_command
from hubport.core.api import DeferQueue, DeliveryContext, MailItem
from hubport.core.config import load_organization
from hubport.core.directory import RecipientDirectory
from hubport.core.hooks import Hooks
from hubport.core.model import MailFrom, NextHop, QueuedMessage, QueuedRecipient, RecipientStatus
from hubport.core.queue_admin import QueueAdmin
from hubport.core.routing import RoutingTable
from hubport.plugins.pytest_plugin import Hub, RetryClock, running_daemon
from hubport.plugins.smtp_send.delivery import deliver_items
from send_peers import Script, ScriptedSink
from support import base_org_text, maildir, message

pytestmark = pytest.mark.timeout(120)

#: no glitch stage; two quick retries 5 minutes apart, then every 10 minutes
LADDER = {"QueueGlitchRetryCount": "0", "TransientFailureRetryCount": "2",
          "TransientFailureRetryInterval": '"5m"',
          "OutboundConnectionFailureRetryInterval": '"10m"',
          "MessageRetryInterval": '"1m"'}


def org_text(port: int, server: dict[str, str]) -> str:
    connector = (f'[[send_connector]]\nName = "Partner"\nAddressSpaces = ["partner.example"]\n'
                 f'SmartHosts = ["[127.0.0.1]"]\nPort = {port}\n'
                 'ConnectionInactivityTimeOut = "10s"\n')
    return base_org_text(server, extra=connector)


@asynccontextmanager
async def running(root: Path, clock: RetryClock, port: int,
                  server: dict[str, str]) -> AsyncIterator[Hub]:
    """An in-process daemon on the organization above, on the test's retry clock."""
    (root / "org.toml").write_text(org_text(port, server))
    async with running_daemon(root / "org.toml", clock=clock) as daemon:
        yield Hub(root, daemon)


async def poll(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    """Await ``probe`` until it returns something truthy; fail with what it last saw."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        value, last = await probe()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s; last seen: {last!r}")
        await asyncio.sleep(0.05)


def partner(hub: Hub, **wanted: Any) -> Callable[[], Awaitable[Any]]:
    """A probe for the Partner queue's Get-Queue row having every ``wanted`` value."""
    async def probe() -> tuple[Any, Any]:
        rows = await QueueAdmin(hub.pipeline).get_queue()
        row = next((r for r in rows if r.get("connector") == "Partner"), None)
        ok = row is not None and all(row.get(k) == v for k, v in wanted.items())
        return (row if ok else None), row
    return probe


async def items_of(hub: Hub, identity: str) -> list[dict[str, Any]]:
    return await QueueAdmin(hub.pipeline).get_message(queue=identity)


async def cli(root: Path, *args: str) -> str:
    """A ``hubport`` queue command against the in-process daemon's control socket."""
    proc = await asyncio.create_subprocess_exec(
        *hubport_command(), *args, "--config", str(root / "org.toml"), cwd=root,
        env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return out.decode()


class GreetingRefuser:
    """An SMTP peer that is up but refuses service: ``421`` at the greeting, then hangs up."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", port)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"421 4.3.2 peer.test Service not available, closing channel\r\n")
        await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def subjects(sink: ScriptedSink) -> list[str]:
    return sorted(message_from_bytes(r.data)["Subject"] for r in sink.received)


# -- the queue retries, not each message ----------------------------------------------------


async def test_a_refusing_next_hop_is_tried_once_per_queue_retry_then_all_mail_goes(
        tmp_path: Path, hubport_clock: RetryClock) -> None:
    sink = ScriptedSink()  # its port, not listening yet
    refuser = GreetingRefuser()
    await refuser.start(sink.port)
    async with running(tmp_path, hubport_clock, sink.port, LADDER) as hub:
        hub.drop_pickup(message(to="u1@partner.example", subject="m1"))
        row = await poll(partner(hub, status="Retry"), "the Partner queue in Retry")
        assert refuser.connections == 1
        # more mail for the next hop while its queue is in Retry: it waits for the queue
        for n in range(2, 6):
            hub.drop_pickup(message(to=f"u{n}@partner.example", subject=f"m{n}"))
        row = await poll(partner(hub, message_count=5), "five messages in the queue")
        await asyncio.sleep(1.0)  # a queue that tried each arrival would have connected now
        assert refuser.connections == 1, "a new message made a connection to a queue in Retry"
        assert row["status"] == "Retry" and row["retry_count"] == 1
        assert "421 4.3.2" in row["last_error"]
        assert row["next_retry"] == pytest.approx(row["last_retry"] + 300)  # transient
        items = await items_of(hub, row["identity"])
        assert sorted(i["subject"] for i in items) == [f"m{n}" for n in range(1, 6)]
        assert {i["status"] for i in items} == {"Retry"}
        assert {i["next_retry"] for i in items} == {row["next_retry"]}

        # each queue retry is one connection for all five messages
        hubport_clock.advance(301)
        row = await poll(partner(hub, retry_count=2, status="Retry"), "the second failure")
        assert refuser.connections == 2
        assert row["next_retry"] == pytest.approx(row["last_retry"] + 300)  # still transient
        hubport_clock.advance(301)
        row = await poll(partner(hub, retry_count=3, status="Retry"), "the third failure")
        assert refuser.connections == 3
        # TransientFailureRetryCount (2) quick retries are spent: OutboundConnection...Interval
        assert row["next_retry"] == pytest.approx(row["last_retry"] + 600)
        listing = await cli(tmp_path, "get-queue", "--identity", row["identity"],
                            "--format", "list")
        assert re.search(r"(?m)^Status\s*: Retry$", listing), listing
        assert re.search(r"(?m)^RetryCount\s*: 3$", listing), listing
        assert re.search(r"(?m)^LastError\s*: 421 4\.3\.2 ", listing), listing
        assert re.search(r"(?m)^NextRetryTime\s*: \d{4}-", listing), listing

        # the next hop comes back: at the queue's next retry every message goes, together
        await refuser.stop()
        with sink:
            hubport_clock.advance(601)
            await poll(lambda: _value(len(sink.received) == 5, subjects(sink)),
                       "all five messages at the sink")
            row = await poll(partner(hub, message_count=0, status="Ready"), "an empty queue")
            assert sink.handler.connections == 1
        assert subjects(sink) == [f"m{n}" for n in range(1, 6)]
        assert row["retry_count"] == 0 and row["next_retry"] is None
        assert row["last_error"] is None
    assert refuser.connections == 3


async def _value(ok: bool, seen: Any) -> tuple[Any, Any]:
    return ok, seen


SLOW_LADDER = {"QueueGlitchRetryCount": "0", "TransientFailureRetryCount": "0",
               "OutboundConnectionFailureRetryInterval": '"2h"',
               "DelayNotificationTimeout": '"1h"'}


async def test_a_dead_next_hop_keeps_its_queue_in_retry_across_a_restart(
        tmp_path: Path, hubport_clock: RetryClock) -> None:
    """Nobody listens on the port. Mail that arrives while the queue is in Retry is never
    tried on its own; a restart keeps the queue's retry time (no burst of connections);
    a delay DSN still counts from each message's arrival; Retry-Queue sends it all."""
    sink = ScriptedSink()  # its port, not listening
    async with running(tmp_path, hubport_clock, sink.port, SLOW_LADDER) as hub:
        hub.drop_pickup(message(to="a@partner.example", subject="first"))
        row = await poll(partner(hub, status="Retry"), "the Partner queue in Retry")
        hub.drop_pickup(message(to="b@partner.example", subject="second"))
        hub.drop_pickup(message(to="c@partner.example", subject="third"))
        await poll(partner(hub, message_count=3), "three messages in the queue")
        await asyncio.sleep(1.0)  # a queue that tried each arrival would have done so now
        attempts = {r["address"]: r["attempts"] for i in await items_of(hub, row["identity"])
                    for r in i["recipients"]}
        assert attempts == {"a@partner.example": 1, "b@partner.example": 0,
                            "c@partner.example": 0}
        assert row["retry_count"] == 1
        assert "4.4.1" in row["last_error"] and "cannot connect" in row["last_error"]

    async with running(tmp_path, hubport_clock, sink.port, SLOW_LADDER) as hub:
        after = await poll(partner(hub, status="Retry"), "the queue in Retry after a restart")
        assert after["next_retry"] == pytest.approx(row["next_retry"])
        await asyncio.sleep(1.0)  # a restart that forgot the queue's state would retry now
        after = (await partner(hub)())[1]
        assert after["retry_count"] == 1 and after["status"] == "Retry"
        attempts = {r["address"]: r["attempts"] for i in await items_of(hub, row["identity"])
                    for r in i["recipients"]}
        assert attempts == {"a@partner.example": 1, "b@partner.example": 0,
                            "c@partner.example": 0}

        # an hour after arrival (the queue retries in two): every message gets its delay
        # DSN, also those still waiting for their first try, with the queue's last error
        hubport_clock.advance(3601)
        await hub.store.write(hub.pipeline._sweep)  # the sweeper's pass, now
        reports = await poll(lambda: _value(len(m := maildir(tmp_path, "Alice")) == 3 and m,
                                            m), "three delay DSNs")
        delayed = {}
        for path in reports:
            text = path.read_bytes().decode("ascii", "replace")
            assert "Action: delayed" in text
            found = re.search(r"Final-Recipient: rfc822;(\S+)", text)
            assert found is not None
            delayed[found[1]] = text
        assert sorted(delayed) == ["a@partner.example", "b@partner.example",
                                   "c@partner.example"]
        assert all("Status: 4.4.1" in text for text in delayed.values())

        with sink:
            await cli(tmp_path, "retry-queue", "--identity", row["identity"])
            await poll(lambda: _value(len(sink.received) == 3, subjects(sink)),
                       "all three messages at the sink")
            await poll(partner(hub, message_count=0, retry_count=0), "an empty queue")
        assert sink.handler.connections == 1
        assert subjects(sink) == ["first", "second", "third"]


# -- a per-recipient deferral keeps the message ladder --------------------------------------


async def test_a_recipient_4xx_on_a_live_next_hop_retries_that_message_only(
        tmp_path: Path, hubport_clock: RetryClock) -> None:
    script = Script(rcpt={"busy@partner.example": "451 4.2.1 Mailbox busy, try later"})
    with ScriptedSink(script=script) as sink:
        async with running(tmp_path, hubport_clock, sink.port, LADDER) as hub:
            hub.drop_pickup(message(to="busy@partner.example, ok@partner.example",
                                    subject="mixed"))
            await poll(lambda: _value(len(sink.received) == 1, subjects(sink)), "ok@")
            assert sink.received[0].rcpt_tos == ["ok@partner.example"]
            identity = (await partner(hub)())[1]["identity"]

            async def deferred() -> tuple[Any, Any]:
                items = await items_of(hub, identity)
                return (items if items and items[0]["status"] == "Retry" else None), items

            [item] = await poll(deferred, "the message in Retry")
            assert "451 4.2.1" in item["last_error"]
            # the message waits on its own ladder; the queue itself is not in Retry
            row = await poll(partner(hub, message_count=1, status="Ready"),
                             "the queue Ready (its batch over)")
            assert row["retry_count"] == 0 and row["next_retry"] is None
            [busy] = item["recipients"]
            assert busy["next_retry"] == pytest.approx(hubport_clock() + 60, abs=30)

            # the queue is not held: a new message goes at once
            hub.drop_pickup(message(to="new@partner.example", subject="new"))
            await poll(lambda: _value(len(sink.received) == 2, subjects(sink)), "new@")
            # and the deferred recipient is retried after MessageRetryInterval
            script.rcpt.clear()
            hubport_clock.advance(61)
            await poll(lambda: _value(len(sink.received) == 3, subjects(sink)), "busy@ again")
            await poll(partner(hub, message_count=0, status="Ready"), "an empty queue")
        assert sink.received[2].rcpt_tos == ["busy@partner.example"]


# -- the Send connector's side: one connection per attempt, a queue-level answer ------------


async def test_a_refusing_smart_host_sees_one_connection_for_a_full_batch(
        tmp_path: Path) -> None:
    """100 messages make five connections' worth (20 each); against a next hop that refuses
    at the greeting only the first is tried, and the answer is for the queue as a whole."""
    refuser = GreetingRefuser()
    await refuser.start(0)
    assert refuser.server is not None
    port = refuser.server.sockets[0].getsockname()[1]
    path = tmp_path / "org.toml"
    path.write_text(org_text(port, {}))
    org = load_organization(path, Hooks(entry_points=False).registry.connector_types)
    connector = org.connector("Partner")
    hop = NextHop(connector.delivery_type, "[127.0.0.1]", connector.name)
    items = []
    for n in range(100):
        data = message(to=f"u{n}@partner.example").replace(b"\n", b"\r\n")
        rows = [QueuedRecipient(n + 1000, n + 1, f"u{n}@partner.example", RecipientStatus.READY)]
        msg = QueuedMessage(n + 1, str(n + 1), f"<{n}@test>", MailFrom("alice@contoso.test"),
                            data, len(data), "PICKUP", "", "hello", time.time(),
                            time.time() + 3600, recipients=rows)
        items.append(MailItem(msg, rows, hop))

    async def no_intent(_: dict[int, str]) -> None:
        return None

    context = DeliveryContext(org, org.server("HUB01"), RecipientDirectory(org), no_intent,
                              time.time)
    try:
        outcome = await deliver_items(hop, connector, items, context)
    finally:
        await refuser.stop()
    assert isinstance(outcome, DeferQueue), outcome
    assert str(outcome.response).startswith("421 4.3.2")
    assert refuser.connections == 1


# -- DNS routing: one queue per recipient domain --------------------------------------------


def test_dns_routed_recipients_get_one_queue_per_domain(tmp_path: Path) -> None:
    """Exchange keys a DNS-routed queue by the recipient's domain, so one dead domain puts
    only its own queue in Retry; a smart-host queue stays one queue for every domain."""
    connectors = ('[[send_connector]]\nName = "Internet"\nAddressSpaces = ["*"]\n'
                  '[[send_connector]]\nName = "Relay"\nAddressSpaces = ["relay.example"]\n'
                  'SmartHosts = ["[127.0.0.1]"]\n')
    path = tmp_path / "org.toml"
    path.write_text(base_org_text(extra=connectors))
    org = load_organization(path, Hooks(entry_points=False).registry.connector_types)
    table = RoutingTable(org, org.server("HUB01"))

    def hop(address: str) -> NextHop:
        candidate = table.choose("SMTP", address, 100).candidate
        assert candidate is not None
        return candidate.next_hop

    assert hop("a@One.Example") == NextHop("DnsConnectorDelivery", "one.example", "Internet")
    assert hop("b@two.example") == NextHop("DnsConnectorDelivery", "two.example", "Internet")
    assert hop("c@relay.example") == hop("d@relay.example") == NextHop(
        "SmartHostConnectorDelivery", "[127.0.0.1]", "Relay")
