"""SMTP protocol logs (docs/exchange.md, "Message tracking and protocol logs"):
one CSV line per command, reply and connection event.

Receive and Send connectors open a `ProtocolSession` per SMTP connection, at rates of thousands
per second, so the per-event cost on the event loop is one tuple appended to a buffer: the
CSV formatting, decoding and escaping happen in `flush()`, in a worker thread, through the
shared `RotatingLog` (files ``RECVyyyymmdd-n.log`` / ``SENDyyyymmdd-n.log``, rotation, pruning,
bounded buffering while the disk fails). The workers of one server share the folders, each
writing a file family of its own (``RECV_W1_yyyymmdd-n.log`` for worker 1, see
core/rotating_log.py).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hubport.core.rotating_log import Entry, RotatingLog, day_of, iso_ms

__all__ = ["FIELDS", "LOG_TYPES", "ProtocolLog", "ProtocolSession"]

FIELDS: tuple[str, ...] = (
    "date-time", "connector-id", "session-id", "sequence-number", "local-endpoint",
    "remote-endpoint", "event", "data", "context",
)  # fmt: skip

LOG_TYPES = {"RECV": "SMTP Receive Protocol Log", "SEND": "SMTP Send Protocol Log"}

#: what a secret (an AUTH payload) is logged as
SECRET = "****"

# Session ids: a random per-process prefix and a counter, so both logs of a process (and its
# restarts, with near certainty) never reuse one; cheaper than uuid4 at thousands per second.
_ID_PREFIX = f"{int.from_bytes(os.urandom(4), 'big'):08X}"
_ID_COUNTER = itertools.count()

# Characters that could end or garble a line in a reader (str.splitlines splits on more than
# CR/LF) or drive a terminal: written as backslash escapes.
_LINE_BREAKERS = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _LINE_BREAKERS}
_ESCAPES.update({0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t"})


def _clean(text: str) -> str:
    """`text` as one CSV field: no line breaks or control characters, quoted when needed."""
    if not text.isprintable():
        text = text.translate(_ESCAPES)
    if "," in text or '"' in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def _data_text(data: str | bytes) -> str:
    """The logged form of a line: bytes decoded leniently, one trailing line ending dropped."""
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="backslashreplace")
    if data.endswith("\n"):
        data = data[:-2] if data.endswith("\r\n") else data[:-1]
    return data


def _endpoint(ep: tuple[Any, ...] | None) -> str:
    """``ip:port``, IPv6 in brackets (``[::1]:25``); empty when unknown."""
    if not ep:
        return ""
    host, port = str(ep[0]), ep[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ProtocolFile(RotatingLog):
    """The rotating CSV files of one protocol log folder."""

    def _encode(self, entry: Entry) -> tuple[str, bytes]:
        ts, session, seq, event, data, context = entry
        stamp = iso_ms(ts)
        line = (
            f"{stamp},{session.csv_prefix()},{seq},{session.csv_endpoints()},{event},"
            f"{_clean(_data_text(data))},{_clean(context)}\n"
        )
        return day_of(stamp), line.encode("utf-8", errors="backslashreplace")


class ProtocolLog:
    """The Receive (``RECV``) or Send (``SEND``) protocol log of one server.

    `directory` None turns logging off: sessions still work, every call is a no-op.
    `max_age` None keeps files forever; `max_directory_size` None sets no folder limit.
    `writer` names this process's file family ("" = the ``RECV<date>-<n>.log`` names; see
    ``rotating_log.log_writer``) and `writers` is how many processes log into the folder
    (each keeps its family within max_directory_size / writers).
    """

    def __init__(
        self,
        directory: Path | None,
        kind: str,
        *,
        max_age: float | None,
        max_directory_size: int | None,
        max_file_size: int,
        clock: Callable[[], float] = time.time,
        writer: str = "",
        writers: int = 1,
    ) -> None:
        if kind not in LOG_TYPES:
            raise ValueError(f"protocol log kind must be RECV or SEND, not {kind!r}")
        self.kind = kind
        self.clock = clock
        self._file: _ProtocolFile | None = None
        if directory is not None:
            label = "SMTP receive protocol log" if kind == "RECV" else "SMTP send protocol log"
            self._file = _ProtocolFile(
                Path(directory),
                prefix=kind,
                log_type=LOG_TYPES[kind],
                fields=FIELDS,
                max_age=max_age,
                max_directory_size=max_directory_size,
                max_file_size=max_file_size,
                label=label,
                clock=clock,
                writer=writer,
                writers=writers,
            )

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def session(
        self,
        connector_id: str,
        local: tuple[str, int] | None,
        remote: tuple[str, int] | None,
    ) -> ProtocolSession:
        """A new session (one SMTP connection) with a fresh id and sequence numbers from 0."""
        return ProtocolSession(self, connector_id, local, remote)

    # -- health (for status reporting and tests) -------------------------------------------

    @property
    def last_error(self) -> Exception | None:
        """The error of the latest flush; None when healthy or off."""
        return self._file.last_error if self._file is not None else None

    @property
    def dropped(self) -> int:
        """Events lost for good (buffer overflow while the disk failed, or unencodable)."""
        return self._file.dropped if self._file is not None else 0

    @property
    def buffered(self) -> int:
        return self._file.buffered if self._file is not None else 0

    # -- flushing --------------------------------------------------------------------------

    async def run_flusher(self, interval: float = 0.5) -> None:
        """Flush every `interval` seconds in a worker thread until cancelled, then once more."""
        if self._file is None:
            await asyncio.get_running_loop().create_future()  # nothing to do until cancelled
        else:
            await self._file.run_flusher(interval)

    def flush(self) -> None:
        """Write what is buffered now (blocking: call it from a thread, or at shutdown)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Final flush; later events are ignored."""
        if self._file is not None:
            self._file.close()


class ProtocolSession:
    """The protocol log of one SMTP connection; each call buffers one CSV record."""

    __slots__ = (
        "_append",
        "_clock",
        "_csv_endpoints",
        "_csv_prefix",
        "_seq",
        "connector_id",
        "local",
        "remote",
        "session_id",
    )  # fmt: skip

    def __init__(
        self,
        log: ProtocolLog,
        connector_id: str,
        local: tuple[str, int] | None,
        remote: tuple[str, int] | None,
    ) -> None:
        self.session_id = f"{_ID_PREFIX}{next(_ID_COUNTER):08X}"
        self.connector_id = connector_id
        self.local = local
        self.remote = remote
        file = log._file
        self._append: Callable[[Entry], None] | None = file._append if file is not None else None
        self._clock = log.clock
        self._seq = 0
        self._csv_prefix: str | None = None  # built by the flush thread on first use
        self._csv_endpoints: str | None = None

    def connected(self, context: str = "") -> None:
        self._emit("+", "", context)

    def received(self, data: str | bytes, context: str = "", *, secret: bool = False) -> None:
        """A line from the peer; `secret` (AUTH payloads) logs ``****`` instead of the data."""
        self._emit("<", SECRET if secret else data, context)

    def sent(self, data: str | bytes, context: str = "") -> None:
        self._emit(">", data, context)

    def info(self, data: str, context: str = "") -> None:
        self._emit("*", data, context)

    def disconnected(self, context: str = "") -> None:
        self._emit("-", "", context)

    def _emit(self, event: str, data: str | bytes, context: str) -> None:
        append = self._append
        if append is None:
            return
        if not isinstance(data, str | bytes):  # a bytearray or memoryview may change later
            data = bytes(data)
        seq = self._seq
        self._seq = seq + 1
        append((self._clock(), self, seq, event, data, context))

    # -- used by the flush thread only -------------------------------------------------------

    def csv_prefix(self) -> str:
        """``connector-id,session-id`` as CSV, built once per session."""
        if self._csv_prefix is None:
            self._csv_prefix = f"{_clean(self.connector_id)},{self.session_id}"
        return self._csv_prefix

    def csv_endpoints(self) -> str:
        if self._csv_endpoints is None:
            local, remote = _endpoint(self.local), _endpoint(self.remote)
            self._csv_endpoints = f"{_clean(local)},{_clean(remote)}"
        return self._csv_endpoints
