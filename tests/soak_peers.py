"""The crash soak's downstream peers, in a process of their own that outlives every daemon.

* an SMTP sink (aiosmtpd) for the Send connector's smart host: it answers ``250`` to the
  final dot only after the transaction is appended to ``smtp.jsonl`` and fsynced;
* an HTTP recorder for the HTTP delivery agent: it answers ``200`` only after the POSTed
  item is appended to ``agent.jsonl`` and fsynced.

Each record is one JSON line: arrival time, envelope and the message bytes (base64). The
ports are chosen by the kernel and written to ``ports.json`` once both peers listen, so the
harness never guesses a free port. Run: ``python tests/soak_peers.py FOLDER``; SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_HTTP_HEAD = 64 * 1024


class Recorder:
    """Appends records to one file, each durable (fsync) before the caller acknowledges it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)
            os.fsync(self._fd)

    async def record(self, record: dict[str, Any]) -> None:
        await asyncio.to_thread(self.append, record)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a peer's file (a torn last line is ignored)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def record_data(record: dict[str, Any]) -> bytes:
    return base64.b64decode(record["data"])


class SinkHandler:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self.recorder.record({
            "t": time.time(), "mail_from": envelope.mail_from or "",
            "rcpt": list(envelope.rcpt_tos),
            "data": base64.b64encode(envelope.original_content or b"").decode()})
        return "250 2.0.0 recorded"


async def http_handler(recorder: Recorder, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
    """One request per connection (the agent sends ``Connection: close``)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HTTP_HEAD:
            raise ValueError("head too large")
        length = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        item = json.loads(await reader.readexactly(length))
        await recorder.record({
            "t": time.time(), "mail_from": item["sender"], "rcpt": item["recipients"],
            "message_id": item["message_id"], "data": item["message_base64"]})
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, KeyError):
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    finally:
        writer.close()


async def serve(folder: Path) -> None:
    smtp_rec = Recorder(folder / "smtp.jsonl")
    agent_rec = Recorder(folder / "agent.jsonl")
    loop = asyncio.get_running_loop()
    handler = SinkHandler(smtp_rec)
    smtp = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.soak.test", ident="soak sink"), "127.0.0.1", 0)
    http = await asyncio.start_server(
        lambda r, w: http_handler(agent_rec, r, w), "127.0.0.1", 0)
    ports = {"smtp": smtp.sockets[0].getsockname()[1], "http": http.sockets[0].getsockname()[1]}
    tmp = folder / "ports.json.tmp"
    tmp.write_text(json.dumps(ports))
    os.rename(tmp, folder / "ports.json")
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    smtp.close()
    http.close()


def main() -> None:
    asyncio.run(serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
