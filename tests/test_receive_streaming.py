"""SMTP receive streams a large message into a spool file (core/body.py) and keeps no file
of a message it does not queue.

Each test runs a real daemon and sends a few-MB message over a real socket: larger than
``SPOOL_THRESHOLD`` (1 MiB), so its body goes to the queue's spool folder while it arrives.
"""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

import pytest

from hubport.core.body import SPOOL_SUFFIX, SPOOL_THRESHOLD, SpoolWriter, spool_folder
from hubport.core.model import SmtpResponse, SubmitResult
from hubport.plugins.pytest_plugin import wait_for
from hubport.plugins.smtp_receive.protocol import _keep_if_queued
from smtp_support import Client, connected, free_port, queued_count, receive_connector

pytestmark = pytest.mark.timeout(120)

ANONYMOUS = {"PermissionGroups": ["AnonymousUsers"]}

# a Delivery Agent connector whose agent holds each message until the test lets it go, and
# then reads the body as every delivery does (in chunks) and keeps what it read
AGENT = '''
import asyncio
from hubport.core.api import DeliveryAgent, ItemResult
from hubport.core import hookimpl
from hubport.core.model import SmtpResponse

GATE = asyncio.Event()
DELIVERED = []

class HoldingAgent(DeliveryAgent):
    async def deliver(self, item):
        await GATE.wait()
        DELIVERED.append(b"".join([piece async for piece in item.body.achunks(65536)]))
        return ItemResult.success(item, SmtpResponse(250, "2.0.0", "taken"))

@hookimpl
def register_delivery_agents(register):
    register("HOLD", HoldingAgent)

@hookimpl
def on_end_of_data(session, submission):
    if submission.envelope.recipients[0].address.startswith("refuse@"):
        return SmtpResponse(550, "5.7.1", "refused by the test agent")

@hookimpl
def receive(submission):
    if submission.envelope.recipients[0].address.startswith("later@"):
        return SmtpResponse(451, "4.7.1", "not now")
'''

CONNECTOR = '''
[[accepted_domain]]
Name = "hold.test"
DomainName = "hold.test"
DomainType = "InternalRelay"

[[delivery_agent_connector]]
Name = "Hold"
AddressSpaces = ["SMTP:hold.test;1"]
DeliveryProtocol = "HOLD"
'''


def holding_agent() -> types.ModuleType:
    module = types.ModuleType("receive_streaming_agent")
    exec(compile(AGENT, "<receive_streaming_agent>", "exec"), module.__dict__)
    return module


def large_message(size: int = 3 * SPOOL_THRESHOLD) -> bytes:
    """A message of about ``size`` octets whose lines start with dots now and then (stuffed
    on the wire) and vary in length, so the terminator search and the unstuffing meet
    every kind of block boundary; with a field the header firewall removes."""
    head = (b"From: someone@example.org\r\nTo: x@hold.test\r\nSubject: large\r\n"
            b"X-MS-Exchange-Organization-Scl: -1\r\n\r\n")
    lines = []
    total, n = len(head), 0
    while total < size:
        line = (b"." if n % 7 == 0 else b"") + (b"%06d " % n) * (1 + n % 13) + b"\r\n"
        lines.append(line)
        total += len(line)
        n += 1
    return head + b"".join(lines)


def stuffed(content: bytes) -> bytes:
    """``content`` as a client sends it in DATA (RFC 5321 §4.5.2), with the terminator."""
    return (b"\r\n" + content).replace(b"\r\n.", b"\r\n..")[2:] + b".\r\n"


def spool_files(hub: Any) -> list[Path]:
    folder = spool_folder(hub.store.path)
    return sorted(folder.glob(f"*{SPOOL_SUFFIX}")) if folder.exists() else []


async def start_data(client: Client, recipient: str) -> None:
    await client.hello()
    assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
    assert (await client.cmd(f"RCPT TO:<{recipient}>")).code == 250
    assert (await client.cmd("DATA")).code == 354


async def stored_body(hub: Any) -> tuple[bytes, Path | None]:
    """The one queued message's octets as the queue holds them (prefix + spool file)."""
    data, spool, offset = await hub.store.read(lambda c: c.execute(
        "SELECT data, spool, spool_offset FROM message").fetchone())
    if spool is None:
        return bytes(data), None
    path = spool_folder(hub.store.path) / spool
    return bytes(data) + path.read_bytes()[offset:], path


async def test_a_large_message_is_queued_from_a_spool_file_byte_for_byte(hub_factory) -> None:
    port = free_port()
    agent = holding_agent()
    extra = CONNECTOR + receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    content = large_message()
    async with hub_factory(extra=extra, plugins=agent) as hub, connected(port) as client:
        await start_data(client, "x@hold.test")
        await client.send(stuffed(content))
        reply = await client.reply()
        assert reply.code == 250, reply
        # queued: the body is in a spool file, named by the message row
        stored, path = await stored_body(hub)
        assert path is not None and path.exists() and spool_files(hub) == [path]
        # what arrived, unstuffed, behind the Received field; the firewalled field is gone
        expected = content.replace(b"X-MS-Exchange-Organization-Scl: -1\r\n", b"")
        assert stored.endswith(expected)
        received = stored[:-len(expected)]
        assert received.startswith(b"Received: from client.test ") and received.endswith(b"\r\n")
        assert all(line[:1] in b" \t" for line in received.split(b"\r\n")[1:-1])
        # delivered exactly as queued; then the queue removes the spool file
        agent.GATE.set()
        delivered = await wait_for(lambda: agent.DELIVERED, timeout=30)
        assert delivered == [stored]
        await wait_for(lambda: not spool_files(hub), timeout=30, what="spool file removed")


async def test_a_small_message_never_touches_the_spool_folder(hub_factory) -> None:
    port = free_port()
    agent = holding_agent()
    extra = CONNECTOR + receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    content = large_message(SPOOL_THRESHOLD // 4)
    async with hub_factory(extra=extra, plugins=agent) as hub, connected(port) as client:
        await start_data(client, "x@hold.test")
        await client.send(stuffed(content))
        assert (await client.reply()).code == 250
        stored, path = await stored_body(hub)
        assert path is None and spool_files(hub) == []
        assert stored.endswith(content.replace(b"X-MS-Exchange-Organization-Scl: -1\r\n", b""))
        agent.GATE.set()


REFUSALS = ["too-big", "line-too-long", "bare-lf", "header-too-big", "agent-refuses",
            "receive-hook-defers"]


def refused_case(case: str) -> tuple[bytes, str, tuple[int, str]]:
    """The content, recipient and expected reply of one refusal of a spooled message."""
    content = large_message(SPOOL_THRESHOLD * 3 // 2)  # spooled, within 2 MB
    if case == "too-big":
        return large_message(3 * SPOOL_THRESHOLD), "x@hold.test", (552, "5.3.4")
    if case == "line-too-long":  # after the body went to the spool file
        return content + b"y" * 70000 + b"\r\n", "x@hold.test", (500, "5.5.2")
    if case == "bare-lf":  # at the very end, after everything else was spooled
        return content + b"bare\nline\r\n", "x@hold.test", (550, "5.6.11")
    if case == "header-too-big":  # 64 KB by default: read back from the spool file
        return b"X-Filler: abcdefgh\r\n" * 4000 + content, "x@hold.test", (552, "5.3.4")
    if case == "agent-refuses":
        return content, "refuse@hold.test", (550, "5.7.1")
    return content, "later@hold.test", (451, "4.7.1")


async def test_a_refused_large_message_leaves_no_spool_file(hub_factory) -> None:
    port = free_port()
    extra = CONNECTOR + receive_connector("Default", [f"127.0.0.1:{port}"],
                                          MaxMessageSize="2MB", MaxLineLength=65536,
                                          **ANONYMOUS)
    async with hub_factory(extra=extra, plugins=holding_agent()) as hub:
        for case in REFUSALS:  # one server, a session per refusal
            content, recipient, expected = refused_case(case)
            async with connected(port) as client:
                await start_data(client, recipient)
                await client.send(stuffed(content))
                reply = await client.reply()
                assert (reply.code, reply.enhanced) == expected, (case, reply)
                assert spool_files(hub) == [], case  # gone before the reply was sent
                assert (await client.cmd("NOOP")).code == 250
                assert await queued_count(hub) == 0, case


async def test_a_client_leaving_mid_data_leaves_no_spool_file(hub_factory) -> None:
    port = free_port()
    extra = CONNECTOR + receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra, plugins=holding_agent()) as hub:
        async with connected(port) as client:
            await start_data(client, "x@hold.test")
            await client.send(stuffed(large_message())[:-3])  # no terminator
            await wait_for(lambda: spool_files(hub), what="the body being spooled")
        await wait_for(lambda: not spool_files(hub), what="spool file removed")
        await asyncio.sleep(0.1)
        assert await queued_count(hub) == 0


async def test_a_commit_the_session_stopped_waiting_for_decides_the_spool_file(
        tmp_path: Path) -> None:
    """A client that leaves during the (shielded) commit: the file goes only when a hook
    refused the message; a commit that failed or was cancelled may have named it, so the
    start-up sweep decides (it removes the file only if no message row names it)."""

    async def run(outcome: Any) -> bool:
        writer = SpoolWriter(tmp_path, threshold=4)
        await writer.write(b"0123456789")
        await writer.finish()
        assert writer.path is not None
        path = writer.path
        commit: asyncio.Future[SubmitResult] = asyncio.get_running_loop().create_future()
        if outcome == "cancelled":
            commit.cancel()
        elif isinstance(outcome, Exception):
            commit.set_exception(outcome)
        else:
            commit.set_result(outcome)
        _keep_if_queued(writer, commit)
        return path.exists()

    assert await run(SubmitResult(7)) is True
    assert await run(SubmitResult(response=SmtpResponse(550, "5.7.1", "no"))) is False
    assert await run(OSError("store gone")) is True
    assert await run("cancelled") is True
