"""Send connector: a large (spooled) message streams through DATA instead of being held.

The message is built so that every read chunk (``CHUNK_SIZE`` patched to ``CHUNK``) starts
with a dot: on a new line, as a lone ``.`` line, right after a CR that ended the chunk before
(its LF opens this one), or in the middle of a line cut at the boundary (not to be doubled):
exactly where a per-chunk dot-stuffer goes wrong. What the peer receives must be
byte-identical to the in-memory path.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from aiosmtplib import SMTPTimeoutError

from hubport.core import body as message_body
from hubport.core.api import DELIVERED, FAILED
from hubport.core.body import MessageBody, SpoolWriter
from hubport.plugins.smtp_send.pipelining import (
    DotStuffer,
    ReplyReader,
    data_block,
    send_body,
)
from send_peers import Script, ScriptedSink, make_ca
from test_send_connector import item, kinds, load_org, send, smart_host
from test_send_pipelining import pipelining_peer

pytestmark = pytest.mark.timeout(120)

CHUNK = 1000
FIREWALLED = (  # one chunk: what Usage Custom and Internet strip
    b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"X-MS-Exchange-Organization-SCL: -1\r\n")
HEADER = (b"From: alice@contoso.test\r\nTo: x@partner.example\r\nSubject: large\r\n")
#: how each chunk of the body begins, and how the chunk before it ends
OPENINGS = [(b".a dot at a chunk boundary\r\n", b"x\r\n"), (b".\r\n", b"x\r\n"),
            (b"..two dots\r\n", b"x\r\n"),
            (b"\n.right after a CR that ended the last chunk\r\n", b"x\r"),
            (b".in the middle of a line cut at the boundary\r\n", b"x")]


def _padded(start: bytes, end: bytes, field: bytes = b"") -> bytes:
    """``start`` + filler + ``end``, exactly CHUNK octets, every line ending in CRLF."""
    room = CHUNK - len(start) - len(end) - len(field)
    assert room > 10
    if field:  # a header field as filler
        return start + field + b"x" * room + end
    middle = b".a dot line inside a chunk\r\nplain text\r\n"
    count = room // len(middle)
    return start + middle * count + b"y" * (room - count * len(middle)) + end


def big_message(blocks: int = 300, eight_bit: bool = False) -> tuple[bytes, bytes]:
    """(the message, what a Custom connector sends): a few hundred KB, chunk-aligned."""
    firewalled = _padded(FIREWALLED, b"\r\n", b"X-MS-Exchange-Organization-Pad: ")
    header = _padded(HEADER, b"\r\n\r\n", b"X-Pad: ")
    body = []
    for i in range(blocks):
        start = OPENINGS[i % len(OPENINGS)][0]
        end = OPENINGS[(i + 1) % len(OPENINGS)][1] if i + 1 < blocks else b"x\r\n"
        if eight_bit and i == blocks // 2:
            start += "caf\u00e9 \u00fcber\r\n".encode()
        body.append(_padded(start, end))
    rest = header + b"".join(body)
    assert len(firewalled) == CHUNK and len(header) == CHUNK
    assert all(len(b) == CHUNK for b in body)
    return firewalled + rest, rest


async def spooled(folder: Path, data: bytes) -> MessageBody:
    writer = SpoolWriter(folder, threshold=16)
    for start in range(0, len(data), 7919):
        await writer.write(data[start:start + 7919])
    body = await writer.finish()
    assert body.spooled and body.prefix == b""
    return body


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(message_body, "CHUNK_SIZE", CHUNK)


@pytest.fixture
def no_whole_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a spooled body whole is an error (the in-memory path may still read)."""
    original = MessageBody.read

    def read(self: MessageBody) -> bytes:
        assert not self.spooled, "a spooled body was read whole into memory"
        return original(self)

    monkeypatch.setattr(MessageBody, "read", read)


def _by_recipient(received: list[Any]) -> dict[str, bytes]:
    return {r.rcpt_tos[0]: r.data for r in received}


# -- the stuffer alone -------------------------------------------------------------------------


def test_the_dot_stuffer_matches_data_block_however_the_message_is_cut() -> None:
    rng = random.Random(5321)
    alphabet = [b".", b"\r", b"\n", b"a", b"\r\n", b"..", b"\xe9"]
    for _ in range(5000):
        message = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        cuts = sorted(rng.sample(range(len(message) + 1), min(len(message) + 1,
                                                              rng.randint(0, 6))))
        pieces = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)])]
        stuffer = DotStuffer()
        wire = b"".join(stuffer.feed(p) for p in pieces) + stuffer.end()
        assert wire == data_block(message), (message, pieces)


# -- against real peers ------------------------------------------------------------------------


@pytest.mark.parametrize("usage, tls", [("Internal", False), ("Custom", False),
                                        ("Custom", True)])
async def test_a_spooled_message_arrives_byte_identical(
        tmp_path: Path, small_chunks: None, no_whole_reads: None, usage: str,
        tls: bool) -> None:
    whole, without_firewalled = big_message()
    expected = whole if usage == "Internal" else without_firewalled
    large = item(["large@partner.example"], await spooled(tmp_path / "spool", whole))
    small = item(["small@partner.example"], whole)
    context = make_ca(tmp_path).server_context("smarthost.test") if tls else None
    with ScriptedSink(tls=context) as sink:
        org = load_org(tmp_path, smart_host(sink.port, extra=f'Usage = "{usage}"'))
        results = await send(org, [large, small])
    assert [kinds(r) for r in results] == [[DELIVERED], [DELIVERED]]
    got = _by_recipient(sink.received)
    assert got["small@partner.example"] == expected  # the in-memory path, as always
    assert got["large@partner.example"] == expected
    assert all(r.tls == tls for r in sink.received)
    assert (b"\r\nReceived:" in b"\r\n" + got["large@partner.example"]) == (usage == "Internal")
    assert f"SIZE={len(expected)}" in sink.received[0].mail_options


async def test_a_spooled_message_streams_in_a_pipelined_transaction(
        tmp_path: Path, small_chunks: None, no_whole_reads: None) -> None:
    whole, expected = big_message()
    async with pipelining_peer("separate") as peer:
        org = load_org(tmp_path, smart_host(peer.port, extra='Usage = "Custom"'))
        results = await send(org, [
            item(["large@partner.example"], await spooled(tmp_path / "spool", whole)),
            item(["small@partner.example"], whole)])
    assert [kinds(r) for r in results] == [[DELIVERED], [DELIVERED]]
    got = {t.recipients[0]: t.data for t in peer.transactions}
    assert got["small@partner.example"] == got["large@partner.example"] == expected


@pytest.mark.parametrize("eight_bit_peer", [True, False])
async def test_8bit_spooled_message(tmp_path: Path, small_chunks: None, no_whole_reads: None,
                                    eight_bit_peer: bool) -> None:
    """Declared by the scan (BODY=8BITMIME) to a peer that has it; refused for one that
    has not, since converting would cost the whole message in memory."""
    whole, _ = big_message(eight_bit=True)
    ascii_whole, _ = big_message()
    removed = set() if eight_bit_peer else {"8BITMIME"}
    with ScriptedSink(script=Script(ehlo_extensions_removed=removed)) as sink:
        org = load_org(tmp_path, smart_host(sink.port, extra='Usage = "Internal"'))
        eight, seven = await send(org, [
            item(["eight@partner.example"], await spooled(tmp_path / "a", whole)),
            item(["seven@partner.example"], await spooled(tmp_path / "b", ascii_whole))])
    got = {r.rcpt_tos[0]: r for r in sink.received}
    assert kinds(seven) == [DELIVERED]
    assert got["seven@partner.example"].data == ascii_whole
    assert "BODY=8BITMIME" not in got["seven@partner.example"].mail_options
    if eight_bit_peer:
        assert kinds(eight) == [DELIVERED]
        assert got["eight@partner.example"].data == whole
        assert "BODY=8BITMIME" in got["eight@partner.example"].mail_options
    else:
        [refused] = eight.recipients.values()
        assert refused.kind == FAILED
        assert str(refused.response).startswith("554 5.6.3 ")
        assert "too large to convert" in str(refused.response)
        assert "eight@partner.example" not in got


# -- backpressure ------------------------------------------------------------------------------


class _SlowTransport(asyncio.WriteTransport):
    """Takes every write, then asks its protocol to pause until ``resume``."""

    def __init__(self) -> None:
        super().__init__()
        self.reader: ReplyReader | None = None
        self.written = bytearray()
        self.unacknowledged = 0
        self.most_unacknowledged = 0

    def write(self, data: Any) -> None:
        self.written.extend(data)
        self.unacknowledged += len(data)
        self.most_unacknowledged = max(self.most_unacknowledged, self.unacknowledged)
        assert self.reader is not None
        self.reader.pause_writing()

    def resume(self) -> None:
        self.unacknowledged = 0
        assert self.reader is not None
        self.reader.resume_writing()

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def test_send_body_waits_for_the_transport_between_chunks(
        tmp_path: Path, small_chunks: None) -> None:
    whole, _ = big_message(blocks=40)
    transport = _SlowTransport()
    reader = transport.reader = ReplyReader(transport)
    sending = asyncio.create_task(send_body(reader, await spooled(tmp_path, whole), 5))
    while not sending.done():
        await asyncio.sleep(0.001)
        transport.resume()
    await sending
    assert bytes(transport.written) == data_block(whole)
    # never more than one (stuffed) chunk written before the transport drained
    assert transport.most_unacknowledged <= CHUNK + CHUNK // 2


async def test_a_peer_that_stops_reading_times_the_message_out(
        tmp_path: Path, small_chunks: None) -> None:
    whole, _ = big_message(blocks=10)
    transport = _SlowTransport()
    reader = transport.reader = ReplyReader(transport)
    with pytest.raises(SMTPTimeoutError):
        await send_body(reader, await spooled(tmp_path, whole), 0.2)
    assert len(transport.written) <= CHUNK + CHUNK // 2
