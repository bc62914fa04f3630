"""The HTTP and command delivery agents stream a spooled (large) message instead of holding it.

A small spool threshold and odd chunk sizes stand in for a 1 GB message: the bytes that
arrive must equal the original exactly, and ``MessageBody.read`` (the whole message in
memory) must not be called on the way.
"""

from __future__ import annotations

import base64
import json
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hubport.agents.command import CommandAgent
from hubport.agents.http import HttpAgent, base64_chunks, envelope_json, streamed_envelope
from hubport.core.api import MailItem, MessageBody
from hubport.core.body import SpoolWriter
from hubport.plugins.pytest_plugin import AgentHarness, message

#: not a multiple of 3, so base64 pieces must carry a remainder from chunk to chunk
ODD_CHUNK = 1000


def payload(size: int) -> bytes:
    """A message of about ``size`` octets whose every octet value occurs (binary-safe)."""
    return message(subject="large", body="") + random.Random(size).randbytes(size)


async def spooled(folder: Path, data: bytes) -> tuple[MessageBody, bytes]:
    """``data`` written through a SpoolWriter (threshold 16: all of it goes to a file), then
    its first line rewritten as a header rewrite does, so the body has an odd-sized prefix
    before the file; returns it with the octets it stands for."""
    writer = SpoolWriter(folder, threshold=16)
    for start in range(0, len(data), 7919):
        await writer.write(data[start:start + 7919])
    body = await writer.finish()
    first = data.index(b"\n") + 1
    new = b"X-Rewritten: yes, an odd length\r\n"
    body = body.replace_prefix(first, new)
    expected = new + data[first:]
    assert body.spooled and body.prefix == new and len(body) == len(expected)
    return body, expected


@pytest.fixture
def odd_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spooled bodies stream in ODD_CHUNK pieces (``achunks``'s default size is bound when
    core/body.py loads, so patching CHUNK_SIZE would not reach it)."""
    original = MessageBody.achunks

    def achunks(self: MessageBody, size: int = ODD_CHUNK) -> AsyncIterator[bytes]:
        return original(self, ODD_CHUNK)

    monkeypatch.setattr(MessageBody, "achunks", achunks)


@pytest.fixture
def no_whole_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call the returned function to make reading a spooled body whole an error."""
    original = MessageBody.read

    def read(self: MessageBody) -> bytes:
        assert not self.spooled, "a spooled body was read whole into memory"
        return original(self)

    return lambda: monkeypatch.setattr(MessageBody, "read", read)


async def large_item(harness: AgentHarness, folder: Path,
                     size: int = 300_001) -> tuple[MailItem, bytes]:
    body, expected = await spooled(folder, payload(size))
    item = harness.item(data=message(subject="large"))
    item.message.body = body
    return item, expected


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 1000, 3001, 1 << 20])
async def test_base64_pieces_concatenate_to_the_whole_encoding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    body, expected = await spooled(tmp_path / "mail.spool", payload(5000))
    original = MessageBody.achunks
    monkeypatch.setattr(MessageBody, "achunks", lambda self, size=chunk: original(self, chunk))
    pieces = [p async for p in base64_chunks(body)]
    assert b"".join(pieces) == base64.b64encode(expected)
    assert all(len(p) % 4 == 0 for p in pieces)


async def test_streamed_envelope_is_the_same_document_octet_for_octet(tmp_path: Path,
                                                                      odd_chunks: None) -> None:
    harness = AgentHarness(HttpAgent, {"Url": "http://127.0.0.1:9/in"}, base_dir=tmp_path)
    for size in (0, 1, 2, 3, 10_000):
        small = harness.item(data=payload(size))
        streamed = streamed_envelope(small)
        text = b"".join([p async for p in streamed.pieces])
        assert text == envelope_json(small) and streamed.length == len(text)
    item, _ = await large_item(harness, tmp_path / "mail.spool")
    expected = envelope_json(item)
    streamed = streamed_envelope(item)
    assert b"".join([p async for p in streamed.pieces]) == expected
    assert streamed.length == len(expected)


class Recorder(BaseHTTPRequestHandler):
    """A real (stdlib) HTTP server's handler: reads Content-Length octets, answers 200."""

    requests: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.requests.append((dict(self.headers.items()), self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[int, list[tuple[dict[str, str], bytes]]]]:
    requests: list[tuple[dict[str, str], bytes]] = []
    handler = type("Handler", (Recorder,), {"requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_http_agent_streams_a_spooled_message(
        tmp_path: Path, odd_chunks: None, no_whole_reads: Callable[[], None],
        gateway: tuple[int, list[tuple[dict[str, str], bytes]]]) -> None:
    port, requests = gateway
    harness = AgentHarness(HttpAgent, {"Url": f"http://127.0.0.1:{port}/in", "Timeout": "30s"},
                           base_dir=tmp_path)
    item, expected = await large_item(harness, tmp_path / "mail.spool")
    document = envelope_json(item)
    no_whole_reads()
    run = await harness.run(item)
    assert run.statuses() == {"someone@agent.test": "delivered 250 2.0.0 HTTP 200 OK"}
    [(headers, received)] = requests
    assert received == document and int(headers["Content-Length"]) == len(document)
    sent = json.loads(received)
    assert base64.b64decode(sent["message_base64"]) == expected
    assert sent["recipients"] == ["someone@agent.test"]


async def test_command_agent_streams_a_spooled_message(
        tmp_path: Path, odd_chunks: None, no_whole_reads: Callable[[], None]) -> None:
    out = tmp_path / "out.eml"
    harness = AgentHarness(CommandAgent, {"Command": ["sh", "-c", 'cat > "$0"', str(out)]},
                           base_dir=tmp_path)
    item, expected = await large_item(harness, tmp_path / "mail.spool")
    no_whole_reads()
    run = await harness.run(item)
    assert run.statuses()["someone@agent.test"].startswith("delivered 250")
    assert out.read_bytes() == expected


async def test_command_agent_reads_stderr_while_it_writes_stdin(
        tmp_path: Path, odd_chunks: None) -> None:
    """The program fills its stderr pipe before it reads a byte: both pipes must move."""
    out = tmp_path / "out.eml"
    script = 'head -c 400000 /dev/zero >&2; cat > "$0"'
    harness = AgentHarness(CommandAgent, {"Command": ["sh", "-c", script, str(out)],
                                          "Timeout": "20s"}, base_dir=tmp_path)
    item, expected = await large_item(harness, tmp_path / "mail.spool")
    run = await harness.run(item)
    assert run.statuses()["someone@agent.test"].startswith("delivered 250")
    assert out.read_bytes() == expected


async def test_command_agent_that_stops_reading_early_answers_with_its_status(
        tmp_path: Path, odd_chunks: None) -> None:
    script = "head -c 1000 >/dev/null; echo 'message too large' >&2; exit 1"
    harness = AgentHarness(CommandAgent, {"Command": ["sh", "-c", script]}, base_dir=tmp_path)
    item, _ = await large_item(harness, tmp_path / "mail.spool", size=2_000_000)
    run = await harness.run(item)
    status = run.statuses()["someone@agent.test"]
    assert status.startswith("failed 550 5.3.0") and "message too large" in status


async def test_command_agent_times_out_a_program_that_never_reads(
        tmp_path: Path, odd_chunks: None) -> None:
    harness = AgentHarness(CommandAgent, {"Command": ["sleep", "30"], "Timeout": "1s"},
                           base_dir=tmp_path)
    item, _ = await large_item(harness, tmp_path / "mail.spool", size=2_000_000)
    run = await harness.run(item)
    status = run.statuses()["someone@agent.test"]
    assert status.startswith("deferred 451 4.4.1") and "did not finish within 1s" in status
