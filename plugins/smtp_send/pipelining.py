"""RFC 2920 PIPELINING on an aiosmtplib connection: MAIL, every RCPT and DATA in one write.

aiosmtplib sends one command and waits for its reply before the next; a transaction then
costs four round trips, and on a busy hub the system calls of those round trips are most
of the outbound work. With a peer that offers PIPELINING, the envelope and DATA go out in
one write and the replies are read back in order, as Postfix's smtp client does.

aiosmtplib has no public API for a group of commands, so this module reads replies through
its protocol object (``write``, ``read_response``, and the reply buffer that may already hold
the next reply when several arrive in one segment). ``supported`` checks that those members
exist, so a future aiosmtplib without them falls back to one command at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiosmtplib import SMTPServerDisconnected
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    PERIOD_REGEX,
    normalize_message_line_endings,
)

_MEMBERS = ("_command_lock", "_response_pending", "_read_response_from_buffer", "write",
            "read_response")


def supported(smtp: Any) -> bool:
    """True when ``smtp`` (an aiosmtplib.SMTP) is connected and its protocol can pipeline."""
    protocol = getattr(smtp, "protocol", None)
    return protocol is not None and all(hasattr(protocol, m) for m in _MEMBERS)


def check_command(*args: bytes) -> None:
    """What aiosmtplib's execute_command refuses: a control character in an argument."""
    for arg in args:
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")


async def exchange(smtp: Any, commands: Sequence[bytes], timeout: float | None) -> list[Any]:
    """Write ``commands`` (without CRLF) at once; their replies, in order."""
    protocol = smtp.protocol
    if protocol._command_lock is None:
        raise SMTPServerDisconnected("Server not connected")
    async with protocol._command_lock:
        protocol._response_pending = True
        protocol.write(b"".join(c + b"\r\n" for c in commands))
        return [await _next_reply(protocol, timeout) for _ in commands]


async def send_content(smtp: Any, data: bytes, timeout: float | None) -> Any:
    """After a 354: the message, dot-stuffed and terminated; the reply to it."""
    protocol = smtp.protocol
    if protocol._command_lock is None:
        raise SMTPServerDisconnected("Server not connected")
    message = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    async with protocol._command_lock:
        protocol._response_pending = True
        protocol.write(message)
        return await _next_reply(protocol, timeout)


async def _next_reply(protocol: Any, timeout: float | None) -> Any:
    """A reply that arrived with an earlier one is already buffered; else wait for it."""
    buffered = protocol._read_response_from_buffer()
    if buffered is not None:
        return buffered
    return await protocol.read_response(timeout=timeout)
