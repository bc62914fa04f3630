"""The Send protocol log: the ``SEND*`` files in SendProtocolLogPath
(docs/exchange.md, "Message tracking and protocol logs").

``hubport.core.protocol_log`` formats and writes the files; this module decides when. A connector
(or the intra-organization one) whose ProtocolLoggingLevel is Verbose gets one log session
per TCP connection, opened once the connection is up so that the local and remote
endpoints are the socket's own; a connection that cannot be made is logged as a session of
its own that says why. The logs of one event loop live in `SendProtocolLogs`: each is
flushed by a background task while the daemon runs and closed (one last flush) by the Send
connector service after the pipeline has drained, so the lines of the last deliveries reach
the disk as well. A logging failure never disturbs delivery. AUTH payloads never get here:
the session logs only the mechanism and the reply.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from hubport.core.protocol_log import ProtocolLog
from hubport.core.rotating_log import log_writer
from hubport.core.workers import WorkerSlot

if TYPE_CHECKING:
    from hubport.core.config import TransportServer

log = structlog.get_logger("hubport.send.protocol")

Endpoint = tuple[Any, ...] | None
Opener = Callable[[Endpoint, Endpoint], Any]


class SendProtocolLogs:
    """The Send protocol logs of one event loop, by folder, each with its flusher task."""

    def __init__(self) -> None:
        self._logs: dict[Path, tuple[ProtocolLog, asyncio.Task[None]]] = {}
        #: which worker of its server writes into a folder (the Send service says so); the
        #: workers share the folder, each with a file family of its own
        self._workers: dict[Path, WorkerSlot] = {}

    def use(self, directory: Path, worker: WorkerSlot) -> None:
        """`worker` logs into `directory` (a folder no service named is worker 0 of 1's)."""
        self._workers[directory] = worker

    def log_for(self, server: TransportServer) -> ProtocolLog | None:
        """The log of `server` (opened, and its flusher started, on first use); None when off."""
        directory = server.send_protocol_log_path
        if directory is None:
            return None
        held = self._logs.get(directory)
        if held is None:
            worker = self._workers.get(directory, WorkerSlot())
            plog = ProtocolLog(directory, "SEND", max_age=server.protocol_log_max_age,
                               max_directory_size=server.protocol_log_max_directory_size,
                               max_file_size=server.protocol_log_max_file_size,
                               writer=log_writer(worker), writers=worker.count)
            flusher = asyncio.get_running_loop().create_task(plog.run_flusher(),
                                                             name="protocol-log-send")
            held = self._logs[directory] = (plog, flusher)
        return held[0]

    async def close(self, directories: Iterable[Path | None] | None = None) -> None:
        """Stop the flushers and write what is buffered (all logs, or those of `directories`).

        A log closed here is forgotten: a later connection opens the folder afresh.
        """
        wanted = set(self._logs) if directories is None else {
            d for d in directories if d is not None and d in self._logs}
        for directory in wanted:
            plog, flusher = self._logs.pop(directory)
            flusher.cancel()
            try:
                await flusher  # run_flusher flushes once more when cancelled
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("the Send protocol log flusher failed", directory=str(directory))
            try:
                await asyncio.to_thread(plog.close)
            except Exception:
                log.exception("closing the Send protocol log failed", directory=str(directory))


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SendProtocolLogs] = (
    weakref.WeakKeyDictionary())


def send_logs() -> SendProtocolLogs:
    """The Send protocol logs of the running event loop."""
    loop = asyncio.get_running_loop()
    found = _BY_LOOP.get(loop)
    if found is None:
        found = _BY_LOOP[loop] = SendProtocolLogs()
    return found


class ProtocolSession:
    """The log of one outbound connection attempt; every call is guarded and cheap.

    `opener` (None when logging is off) opens a ``hubport.core.protocol_log`` session for the
    endpoints given to `connected`; `disconnected` ends it, so a reconnection (after a
    failed opportunistic STARTTLS) is a session of its own, as it is on the wire.
    """

    def __init__(self, opener: Opener | None = None) -> None:
        self._opener = opener
        self._inner: Any = None

    @property
    def enabled(self) -> bool:
        return self._opener is not None

    def _call(self, name: str, *args: Any) -> None:
        if self._inner is None:
            return
        try:
            getattr(self._inner, name)(*args)
        except Exception:
            log.warning("protocol log write failed; logging for this session stops",
                        exc_info=True)
            self._inner = None
            self._opener = None

    def _open(self, local: Endpoint, remote: Endpoint) -> None:
        if self._opener is None:
            return
        try:
            self._inner = self._opener(_plain(local), _plain(remote))
        except Exception:
            log.warning("cannot open a Send protocol log session", exc_info=True)
            self._inner = None
            self._opener = None

    def connected(self, local: Endpoint, remote: Endpoint) -> None:
        """The TCP connection is up: a new session with these endpoints starts."""
        self._open(local, remote)
        self._call("connected")

    def connect_failed(self, remote: Endpoint, reason: str) -> None:
        """No connection could be made: a short session that says why."""
        self._open(None, remote)
        self._call("info", f"attempting to connect failed: {reason}")
        self.disconnected()

    def sent(self, line: str) -> None:
        self._call("sent", line)

    def reply(self, code: int, message: str) -> None:
        """A reply from the peer, one record per line (``250-…`` then ``250 …``)."""
        if self._inner is None:
            return
        lines = message.split("\n") if message else [""]
        last = len(lines) - 1
        for i, line in enumerate(lines):
            self._call("received", f"{code}{' ' if i == last else '-'}{line}".rstrip())

    def info(self, text: str) -> None:
        self._call("info", text)

    def disconnected(self) -> None:
        self._call("disconnected")
        self._inner = None


def _plain(endpoint: Endpoint) -> tuple[str, int] | None:
    """(host, port) from a socket address (IPv6 ones carry flow info and scope too)."""
    if not endpoint or len(endpoint) < 2:
        return None
    return str(endpoint[0]), int(endpoint[1])


def open_session(server: TransportServer, connector_id: str, verbose: bool
                 ) -> ProtocolSession:
    """A session on the server's Send protocol log, or a silent one when logging is off."""
    if not verbose or server.send_protocol_log_path is None:
        return ProtocolSession()
    logs = send_logs()

    def opener(local: Endpoint, remote: Endpoint) -> Any:
        plog = logs.log_for(server)
        if plog is None:
            return None
        return plog.session(connector_id, local, remote)

    return ProtocolSession(opener)
