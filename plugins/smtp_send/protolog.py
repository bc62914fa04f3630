"""The Send protocol log, through a small adapter (EXCHANGE §9).

``core.protocol_log`` writes the files; this adapter opens a session on it when the
connector's ProtocolLoggingLevel is Verbose, and is a no-op otherwise (or while that module
is missing). A logging failure never disturbs delivery. AUTH payloads never get here: the
session logs only "AUTH <mechanism>" and the reply.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from core.config import TransportServer

log = structlog.get_logger("hubport.send.protocol")

_LOGS: dict[Path, Any] = {}


class ProtocolSession:
    """One connection's log lines; every call is guarded."""

    def __init__(self, inner: Any = None) -> None:
        self._inner = inner

    def _call(self, name: str, *args: Any) -> None:
        if self._inner is None:
            return
        try:
            getattr(self._inner, name)(*args)
        except Exception:
            log.warning("protocol log write failed; logging for this session stops",
                        exc_info=True)
            self._inner = None

    def connected(self) -> None:
        self._call("connected")

    def sent(self, line: str) -> None:
        self._call("sent", line)

    def received(self, line: str) -> None:
        self._call("received", line)

    def info(self, text: str) -> None:
        self._call("info", text)

    def disconnected(self) -> None:
        self._call("disconnected")


def open_session(server: TransportServer, connector_id: str, verbose: bool,
                 local: str, remote: str) -> ProtocolSession:
    """A session on the server's Send protocol log, or a silent one."""
    directory = server.send_protocol_log_path
    if not verbose or directory is None:
        return ProtocolSession()
    try:
        module = importlib.import_module("core.protocol_log")
    except ImportError:
        return ProtocolSession()
    try:
        plog = _LOGS.get(directory)
        if plog is None:
            plog = _LOGS[directory] = module.ProtocolLog(
                directory, "SEND", max_age=server.protocol_log_max_age,
                max_directory_size=server.protocol_log_max_directory_size,
                max_file_size=server.protocol_log_max_file_size)
        return ProtocolSession(plog.session(connector_id, local, remote))
    except Exception:
        log.warning("cannot open the Send protocol log", directory=str(directory),
                    exc_info=True)
        return ProtocolSession()
