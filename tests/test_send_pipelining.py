"""Outbound command pipelining (RFC 2920): every reply is read, however the server writes it.

The peer is a small ESMTP server on a loopback socket that advertises PIPELINING and answers
a pipelined group in one of two ways: each reply in its own write, some split mid-line with
pauses between ("separate"), or every reply of the group in one write once DATA arrives
("together"). A client that waits for the MAIL reply before sending RCPT deadlocks against
"together", so passing there proves the group went out in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from support import message, wait_for
from test_send_reliability import send_records, smart_host

pytestmark = pytest.mark.timeout(120)


@dataclass
class Transaction:
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class PipeliningPeer:
    """A minimal ESMTP server with PIPELINING; ``nobody…@`` recipients and ``refuse@``
    senders are refused, ``busy@`` recipients get a 421 while the session goes on.
    ``careless`` answers DATA with 354 even with no recipient; ``hang_up_after_rcpts=N``
    answers N RCPTs, then sends 421 and closes (Postfix's hard error limit);
    ``vanish_after_message`` takes the message and closes without a reply."""

    mode: str
    careless: bool = False
    hang_up_after_rcpts: int | None = None
    vanish_after_message: bool = False
    port: int = 0
    transactions: list[Transaction] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending: list[bytes] = []

        async def reply(text: str, *, flush: bool = False) -> None:
            pending.append(text.encode() + b"\r\n")
            if self.mode == "together" and not flush:
                return  # held until the group ends (DATA) or a lone command
            for chunk in pending:
                if self.mode == "separate":
                    half = max(1, len(chunk) // 2)
                    for part in (chunk[:half], chunk[half:]):
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(0.005)
                else:
                    writer.write(chunk)
            pending.clear()
            await writer.drain()

        await reply("220 peer.test ESMTP pipelining test peer", flush=True)
        sender, recipients = "", []
        mail_ok = False
        rcpts_answered = 0
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                command = line.decode().rstrip("\r\n")
                verb = command.split(" ", 1)[0].upper()
                self.commands.append(verb)
                if verb == "EHLO":
                    await reply("250-peer.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                                "250 SIZE 10485760", flush=True)
                elif verb == "MAIL":
                    sender = command.split(":", 1)[1].split(">")[0].lstrip("<")
                    mail_ok = not sender.startswith("refuse@")
                    recipients = []
                    await reply("250 2.1.0 sender ok" if mail_ok
                                else "550 5.7.1 sender refused here")
                elif verb == "RCPT":
                    address = command.split(":", 1)[1].split(">")[0].lstrip("<")
                    if rcpts_answered == self.hang_up_after_rcpts:
                        await reply("421 4.7.0 too many errors", flush=True)
                        break
                    rcpts_answered += 1
                    if not mail_ok:
                        await reply("503 5.5.1 MAIL first")
                    elif address.startswith("nobody"):
                        await reply("550 5.1.1 no such user here")
                    elif address.startswith("busy@"):
                        await reply("421 4.3.2 try this one later")
                    else:
                        recipients.append(address)
                        await reply("250 2.1.5 recipient ok")
                elif verb == "DATA":
                    if not mail_ok or (not recipients and not self.careless):
                        await reply("554 5.5.1 no valid recipients", flush=True)
                        continue
                    await reply("354 go ahead", flush=True)
                    lines = []
                    while (body := await reader.readline()) != b".\r\n":
                        if not body:
                            return
                        lines.append(body[1:] if body.startswith(b"..") else body)
                    self.transactions.append(Transaction(sender, recipients, b"".join(lines)))
                    if self.vanish_after_message:
                        break
                    await reply(f"250 2.0.0 queued as {len(self.transactions)}", flush=True)
                elif verb == "RSET":
                    mail_ok, recipients = False, []
                    await reply("250 2.0.0 reset", flush=True)
                elif verb == "QUIT":
                    await reply("221 2.0.0 bye", flush=True)
                    break
                else:
                    await reply("502 5.5.2 not implemented", flush=True)
        writer.close()


@contextlib.asynccontextmanager
async def pipelining_peer(mode: str, **options: Any) -> AsyncIterator[PipeliningPeer]:
    peer = PipeliningPeer(mode, **options)
    server = await asyncio.start_server(peer.handle, "127.0.0.1", 0)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        server.close()
        await server.wait_closed()


def recipient_statuses(hub: Any) -> dict[str, str]:
    """Each partner.example recipient's last SEND or FAIL status from the tracking log
    (not the NDRs' own events)."""
    seen: dict[str, str] = {}
    for event in hub.events():
        if event["event-id"] in ("SEND", "FAIL"):
            for address, status in zip(event["recipient-address"], event["recipient-status"]):
                if address.endswith("@partner.example"):
                    seen[address] = f'{event["event-id"]} {status}'
    return seen


BODY = ".a line that starts with a dot\n..and one with two\nthe end\n"


@pytest.mark.parametrize("mode", ["separate", "together"])
async def test_a_pipelined_transaction_reads_every_reply(hub_factory: Any, mode: str) -> None:
    async with pipelining_peer(mode) as peer, \
            hub_factory(extra=smart_host(peer.port, 'ProtocolLoggingLevel = "Verbose"')) as hub:
        rcpts = ["carol@partner.example", "nobody@partner.example", "dave@partner.example"]
        hub.drop_replay("alice@contoso.test", rcpts,
                        message(to=", ".join(rcpts), subject="piped", body=BODY))
        statuses = await wait_for(lambda: (s := recipient_statuses(hub)) and len(s) == 3 and s,
                                  timeout=60, describe=hub.event_ids, what="3 outcomes")
        assert statuses["carol@partner.example"].startswith("SEND 250 2.0.0 queued as 1")
        assert statuses["dave@partner.example"].startswith("SEND 250 2.0.0 queued as 1")
        assert statuses["nobody@partner.example"].startswith("FAIL 550 5.1.1"), statuses
        [sent] = peer.transactions
        assert sent.recipients == ["carol@partner.example", "dave@partner.example"]
        assert b"\r\n.a line that starts with a dot\r\n..and one with two\r\n" in sent.data
        # the protocol log shows every command and every reply, in protocol order
        records = await wait_for(lambda: [r for r in send_records(hub.state) if
                                          r["event"] in "<>" and r["data"]] or None, timeout=30)
        flow = [(r["event"], r["data"][:4]) for r in records if r["data"][:4] in
                ("MAIL", "RCPT", "DATA", "250 ", "550 ", "354 ")]
        flow = flow[flow.index((">", "MAIL")):]  # after EHLO
        assert [e for e, _ in flow[:5]] == [">"] * 5, flow  # MAIL, 3 RCPT, DATA: one group
        assert [d for e, d in flow[5:10]] == ["250 ", "250 ", "550 ", "250 ", "354 "], flow


async def test_a_refused_sender_fails_every_recipient_and_the_connection_goes_on(
        hub_factory: Any) -> None:
    async with pipelining_peer("together") as peer, \
            hub_factory(extra=smart_host(peer.port)) as hub:
        hub.drop_replay("refuse@contoso.test", ["erin@partner.example", "frank@partner.example"],
                        message(sender="refuse@contoso.test", to="erin@partner.example"))
        statuses = await wait_for(lambda: (s := recipient_statuses(hub)) and len(s) == 2 and s,
                                  timeout=60, describe=hub.event_ids, what="2 outcomes")
        assert all(s.startswith("FAIL 550 5.7.1") for s in statuses.values()), statuses
        assert not peer.transactions
        # the group's 503s and the 554 to DATA were read, so the next message goes through
        hub.drop_replay("alice@contoso.test", ["gina@partner.example"], message())
        await wait_for(lambda: peer.transactions, timeout=60, describe=hub.event_ids)
        assert peer.transactions[0].recipients == ["gina@partner.example"]


async def test_data_taken_with_no_recipient_is_ended_empty(hub_factory: Any) -> None:
    """A careless server answers DATA with 354 after refusing every RCPT: the client ends
    the transaction with a lone dot, and every recipient keeps its own 550."""
    async with pipelining_peer("together", careless=True) as peer, \
            hub_factory(extra=smart_host(peer.port)) as hub:
        hub.drop_replay("alice@contoso.test", ["nobody@partner.example"], message())
        statuses = await wait_for(lambda: recipient_statuses(hub) or None, timeout=60,
                                  describe=hub.event_ids)
        assert statuses["nobody@partner.example"].startswith("FAIL 550 5.1.1"), statuses
        [empty] = peer.transactions
        assert (empty.recipients, empty.data) == ([], b"")


async def test_a_hang_up_midway_keeps_the_refusals_already_read(hub_factory: Any) -> None:
    """The peer refuses two recipients, then says 421 and closes before the third reply (a
    hard error limit): the two refusals are final, only the unanswered ones are retried."""
    async with pipelining_peer("separate", hang_up_after_rcpts=2) as peer, \
            hub_factory(extra=smart_host(peer.port)) as hub:
        rcpts = ["nobody@partner.example", "nobody2@partner.example", "hank@partner.example"]
        hub.drop_replay("alice@contoso.test", rcpts, message())
        fails = await wait_for(lambda: [e for e in hub.events(event_id="FAIL")
                                        if "partner.example" in str(e["recipient-address"])]
                               or None, timeout=60, describe=hub.event_ids)
        failed = {a: s for e in fails for a, s in zip(e["recipient-address"],
                                                      e["recipient-status"])}
        assert failed["nobody@partner.example"].startswith("550 5.1.1"), failed
        assert failed["nobody2@partner.example"].startswith("550 5.1.1"), failed
        assert "hank@partner.example" not in failed
        [defer] = await wait_for(lambda: hub.events(event_id="DEFER") or None, timeout=60,
                                 describe=hub.event_ids)
        assert defer["recipient-address"] == ["hank@partner.example"], defer
        assert defer["recipient-status"][0].startswith("421 4.7.0 too many errors")
        # a retry (if one came yet) carries hank alone
        assert not peer.transactions or peer.transactions[0].recipients == [
            "hank@partner.example"]


async def test_a_drop_after_the_message_keeps_the_refusals_and_defers_the_rest(
        hub_factory: Any) -> None:
    async with pipelining_peer("together", vanish_after_message=True) as peer, \
            hub_factory(extra=smart_host(peer.port)) as hub:
        hub.drop_replay("alice@contoso.test", ["ivy@partner.example", "nobody@partner.example"],
                        message())
        defers = await wait_for(lambda: hub.events(event_id="DEFER") or None, timeout=60,
                                describe=hub.event_ids)
        status = dict(zip(defers[0]["recipient-address"], defers[0]["recipient-status"]))
        assert status["ivy@partner.example"].startswith("451 4.4.2"), status  # may have it
        statuses = await wait_for(lambda: recipient_statuses(hub) or None, timeout=60)
        assert statuses["nobody@partner.example"].startswith("FAIL 550 5.1.1"), statuses
        assert len(peer.transactions) == 1


async def test_a_421_to_one_recipient_does_not_undo_the_250_to_the_message(
        hub_factory: Any) -> None:
    async with pipelining_peer("together") as peer, \
            hub_factory(extra=smart_host(peer.port)) as hub:
        hub.drop_replay("alice@contoso.test", ["jan@partner.example", "busy@partner.example"],
                        message())
        sent = await wait_for(lambda: [e for e in hub.events(event_id="SEND")] or None,
                              timeout=60, describe=hub.event_ids)
        assert sent[0]["recipient-address"] == ["jan@partner.example"], sent
        assert sent[0]["recipient-status"][0].startswith("250 2.0.0 queued as 1")
        defers = await wait_for(lambda: hub.events(event_id="DEFER") or None, timeout=60)
        assert defers[0]["recipient-address"] == ["busy@partner.example"], defers
        assert [t.recipients for t in peer.transactions] == [["jan@partner.example"]]


# -- the reply reader alone ------------------------------------------------------------------


class _Transport(asyncio.WriteTransport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.extend(data)

    def is_closing(self) -> bool:
        return False


REPLIES = b"250 2.1.0 ok\r\n250-first\r\n250 second\r\n550 5.1.1 no\r\n354 go ahead\r\n"


@pytest.mark.parametrize("split", ["together", "bytewise", "by line"])
async def test_the_reply_reader_returns_every_reply_in_order_however_it_arrives(
        split: str) -> None:
    from hubport.plugins.smtp_send.pipelining import ReplyReader

    reader = ReplyReader(_Transport())
    if split == "together":
        chunks = [REPLIES]
    elif split == "bytewise":
        chunks = [REPLIES[i:i + 1] for i in range(len(REPLIES))]
    else:
        chunks = [line + b"\n" for line in REPLIES.split(b"\n")[:-1]]

    async def feed() -> None:
        for chunk in chunks:
            reader.data_received(chunk)
            await asyncio.sleep(0)

    feeding = asyncio.create_task(feed())
    got = [await reader.read(5) for _ in range(4)]
    await feeding
    assert [(r.code, r.message) for r in got] == [
        (250, "2.1.0 ok"), (250, "first\nsecond"), (550, "5.1.1 no"), (354, "go ahead")]
    reader.connection_lost(None)
    with pytest.raises(Exception, match="Connection lost"):
        await reader.read(5)


async def test_the_reply_reader_refuses_a_malformed_or_endless_reply() -> None:
    from aiosmtplib import SMTPResponseException

    from hubport.plugins.smtp_send.pipelining import MAX_BUFFERED, MAX_REPLY_LINE, ReplyReader

    bad = ReplyReader(_Transport())
    bad.data_received(b"hello there\r\n")
    with pytest.raises(SMTPResponseException, match="Malformed"):
        await bad.read(5)
    endless = ReplyReader(_Transport())
    endless.data_received(b"250-" + b"x" * MAX_REPLY_LINE)
    with pytest.raises(SMTPResponseException, match="too long"):
        await endless.read(5)
    # a flood of short lines is cut off as it arrives, before anyone reads
    flood = _Transport()
    flooded = ReplyReader(flood)
    for _ in range(MAX_BUFFERED // 10 + 2):
        flooded.data_received(b"250-flood\r\n")
    assert flood.closed
    with pytest.raises(SMTPResponseException, match="too long"):
        await flooded.read(5)
