"""The command delivery agent (DeliveryProtocol ``COMMAND``): pipe each item into a program.

Connector fields: ``Command`` (a list: program and arguments, run directly, never through
a shell), ``Timeout`` (per item, 60s). The message goes to standard input; the envelope
goes into the environment: ``HUBPORT_SENDER``, ``HUBPORT_RECIPIENTS`` (one address per
line), ``HUBPORT_MESSAGE_ID``, ``HUBPORT_INTERNAL_ID``, ``HUBPORT_NEXT_HOP``. Exit status 0
delivers, 75 (EX_TEMPFAIL) defers, death by a signal or a timeout defers, anything else
fails with 550 5.3.0 and the program's first line of standard error.

A large (spooled) message is streamed to standard input chunk by chunk, waiting for the pipe
to drain between chunks, while standard error is read at the same time (a program that
writes much to standard error before reading its input would otherwise block us both).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hubport.core.api import DeliveryAgent, ItemResult, MailItem, MessageBody
from hubport.core.model import SmtpResponse

if TYPE_CHECKING:
    from hubport.core.config_fields import FieldReader

EX_TEMPFAIL = 75
BAD_ENVELOPE = SmtpResponse(550, "5.1.3", "Envelope address not safe to pass to a command")
#: the environment a command inherits from the daemon; nothing else leaks in
INHERITED = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR")


@dataclass(frozen=True)
class CommandSettings:
    argv: tuple[str, ...]
    timeout: float


def envelope_environment(item: MailItem) -> dict[str, str] | None:
    """HUBPORT_* variables, or None when an address holds a control character."""
    values = {
        "HUBPORT_SENDER": item.message.mail_from.address,
        "HUBPORT_RECIPIENTS": "\n".join(r.address for r in item.recipients),
        "HUBPORT_MESSAGE_ID": item.message.message_id,
        "HUBPORT_INTERNAL_ID": str(item.message.id),
        "HUBPORT_NEXT_HOP": item.next_hop.domain,
    }
    addresses = [item.message.mail_from.address, *(r.address for r in item.recipients)]
    if any(ord(ch) < 32 or ord(ch) == 127 for a in addresses for ch in a):
        return None
    if any("\x00" in v for v in values.values()):
        return None
    base = {k: os.environ[k] for k in INHERITED if k in os.environ}
    return {**base, **values}


class CommandAgent(DeliveryAgent):
    """Runs the connector's ``Command`` once per item."""

    protocol = "COMMAND"

    @classmethod
    def read_settings(cls, reader: FieldReader) -> CommandSettings | None:
        argv = reader.string_list("Command")
        timeout = reader.duration("Timeout", "60s", "1s", "1d") or 60.0
        if not argv or not argv[0].strip():
            reader.error("Command", "required: a list, the program then its arguments")
            return None
        if any("\x00" in a for a in argv):
            reader.error("Command", "contains a NUL character")
            return None
        return CommandSettings(tuple(argv), timeout)

    async def deliver(self, item: MailItem) -> ItemResult:
        settings: CommandSettings = self.settings
        env = envelope_environment(item)
        if env is None:
            return ItemResult.fail(item, BAD_ENVELOPE)
        try:
            proc = await asyncio.create_subprocess_exec(
                *settings.argv, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
                start_new_session=True)  # its own process group: a timeout kills it all
        except OSError as exc:
            return ItemResult.defer(item, SmtpResponse(
                451, "4.3.0", f"cannot run {settings.argv[0]}: {exc.strerror or exc}"))
        try:
            async with asyncio.timeout(settings.timeout):
                err = await communicate(proc, item.body)
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
            if proc.returncode is not None and proc.returncode >= 0 and \
                    proc.returncode != _killed_status():
                # the program itself finished (a child of its own kept stderr open):
                # its exit status is the answer, whatever the leftover child did
                return result_for(item, settings.argv[0], proc.returncode, b"")
            return ItemResult.defer(item, SmtpResponse(
                451, "4.4.1", f"{settings.argv[0]} did not finish within {settings.timeout:g}s"))
        except BaseException:
            _kill_group(proc)  # cancelled (a connection timeout): leave no orphan
            if proc.returncode is None:
                await proc.wait()
            raise
        return result_for(item, settings.argv[0], proc.returncode or 0, err)


async def communicate(proc: asyncio.subprocess.Process, body: MessageBody) -> bytes:
    """Give ``body`` to the program's standard input; its standard error once it exits.

    A small body goes in one piece, as ``Process.communicate`` always did; a spooled one in
    chunks, with standard error and the exit awaited concurrently."""
    if not body.spooled:
        return (await proc.communicate(body.prefix))[1]
    assert proc.stdin is not None and proc.stderr is not None
    _, err, _ = await asyncio.gather(_feed(proc.stdin, body), proc.stderr.read(), proc.wait())
    return err


async def _feed(stdin: asyncio.StreamWriter, body: MessageBody) -> None:
    """Write ``body`` and close the pipe; a program that exits without reading it all is
    no error here (its exit status answers), as with ``Process.communicate``."""
    try:
        async for chunk in body.achunks():
            stdin.write(chunk)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    stdin.close()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the program and everything it started (its own session and group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _killed_status() -> int:
    return -signal.SIGKILL


def result_for(item: MailItem, program: str, status: int, stderr: bytes) -> ItemResult:
    first = next((line.strip() for line in stderr.decode("utf-8", "replace").splitlines()
                  if line.strip()), "")
    why = f"{program} exited with status {status}" + (f": {first[:200]}" if first else "")
    if status == 0:
        return ItemResult.success(item, SmtpResponse(250, "2.0.0", f"Accepted by {program}"),
                                  detail=program)
    if status == EX_TEMPFAIL or status < 0:
        return ItemResult.defer(item, SmtpResponse(451, "4.3.0", why))
    return ItemResult.fail(item, SmtpResponse(550, "5.3.0", why))
