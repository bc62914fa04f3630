"""Exactly-once file delivery: the protocol shared by the Drop and Maildir writers and by
``hubport.core.delivery.FolderWriter``, its public form for third-party agents.

1. Write each file under a temporary name the consumer ignores; sync them (batched).
2. Commit "written as <intent>" for the recipients in the queue.
3. Rename each temporary file to its final name; fsync the folders.
4. The caller marks the recipients delivered.

Recovery, when a recipient arrives with an intent already recorded: temp present → finish
the rename; temp gone → the rename happened (the consumer may already have taken the
file), so it is delivered. No intent → a stale temp is removed and the file written again.
The consumer taking a file therefore never causes a second copy.

A file's content may name a spooled message body instead of holding it: the writer thread
reads it chunk by chunk (at most ``CHUNK_SIZE`` at a time), so writing a 1 GB message costs
no more memory than a small one. Small messages are plain bytes, written as before.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hubport.core import body as message_body
from hubport.core.body import MessageBody
from hubport.core.durable import fsync_dir, rename_noreplace, sync_many, write_new_file
from hubport.core.failpoints import failpoint
from hubport.core.model import SmtpResponse

if TYPE_CHECKING:  # hubport.core.delivery imports this module for FolderWriter
    from hubport.core.delivery import DeliveryContext


#: One piece of a file: bytes; a message body, read chunk by chunk in the writer thread; or a
#: function that makes the chunks there (a body converted on the way, as Maildir's LF lines)
FilePart = bytes | MessageBody | Callable[[], Iterable[bytes]]


class BodyUnreadable(Exception):
    """A message body's spool file failed to read: not the folder's fault, so the error
    response must not blame the folder."""


@dataclass(slots=True)
class FilePlan:
    """One file to make visible exactly once for a set of recipients."""

    item_index: int
    recipient_ids: list[int]
    intent: str
    temp: Path
    final: Path
    data: bytes | tuple[FilePart, ...] | None  # parts in order; None: recovery (written before)
    error: SmtpResponse | None = None
    recovered: bool = field(default=False)
    #: the recorded intent names a file that never became visible: forget it on retry
    void_intent: bool = field(default=False)


def response_for(exc: OSError, what: str) -> SmtpResponse:
    """A temporary failure describing a filesystem error (never a 5xx: it may clear)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SmtpResponse(452, "4.3.1", f"{what} is full")
    if exc.errno == errno.ENOENT:
        return SmtpResponse(451, "4.3.0", f"{what} does not exist")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        code = errno.errorcode.get(exc.errno, exc.errno)
        return SmtpResponse(451, "4.3.0", f"{what} is not writable ({code})")
    return SmtpResponse(451, "4.3.0", f"{what}: {os.strerror(exc.errno or 0) or 'I/O error'}")


async def commit_files(plans: Sequence[FilePlan], context: DeliveryContext, what: str) -> None:
    """Run the protocol for ``plans``; a plan that fails keeps ``error`` set and no file."""
    await asyncio.to_thread(_write_and_sync, plans, what)
    intents = {rid: p.intent for p in plans if p.error is None and p.data is not None
               for rid in p.recipient_ids}
    if intents:
        try:
            await context.record_intent(intents)
        except Exception:
            await asyncio.to_thread(_remove_temps, [p for p in plans if p.data is not None])
            raise
        failpoint("after_intent_before_rename")
    await asyncio.to_thread(_publish, plans, what)
    failpoint("after_rename_before_delivered")


def _write_and_sync(plans: Sequence[FilePlan], what: str) -> None:
    fds: list[tuple[FilePlan, int]] = []
    try:
        for plan in plans:
            if plan.data is None or plan.error is not None:  # recovery, or failed already
                continue
            try:
                try:
                    fd = _write_new(plan.temp, plan.data)
                except FileExistsError:  # a stale temp from before a crash: never published
                    _unlink_quietly(plan.temp)
                    fd = _write_new(plan.temp, plan.data)
                fds.append((plan, fd))
            except OSError as exc:
                plan.error = response_for(exc, what)
            except BodyUnreadable as exc:
                plan.error = SmtpResponse(451, "4.3.0", f"{what}: message body unreadable"
                                          f" ({exc})")
        try:
            sync_many(fd for _, fd in fds)
        except OSError as exc:
            for plan, _ in fds:
                plan.error = response_for(exc, what)
    finally:
        for plan, fd in fds:
            os.close(fd)
            if plan.error is not None:
                _unlink_quietly(plan.temp)


def _write_new(path: Path, data: bytes | tuple[FilePart, ...]) -> int:
    """``write_new_file`` for a plan's content: bytes at once, else part after part (the
    in-memory ones as they are, a body or a chunk function chunk by chunk). Returns the fd;
    on any error the file is closed and removed."""
    return write_new_file(path, data if isinstance(data, bytes) else _chunks(data))


def _chunks(parts: Iterable[FilePart]) -> Iterator[bytes]:
    """The octets of ``parts`` in order; a read error of a body is ``BodyUnreadable``."""
    for part in parts:
        if isinstance(part, MessageBody):
            pieces: Iterable[bytes] = part.chunks(message_body.CHUNK_SIZE)
        elif callable(part):
            pieces = part()
        else:
            yield part
            continue
        try:
            yield from pieces
        except OSError as exc:
            raise BodyUnreadable(os.strerror(exc.errno) if exc.errno else str(exc)) from exc


def _publish(plans: Sequence[FilePlan], what: str) -> None:
    folders: set[Path] = set()
    for plan in plans:
        if plan.error is not None:
            continue
        try:
            rename_noreplace(plan.temp, plan.final)
            folders.add(plan.final.parent)
        except FileExistsError:
            # never replace a file the consumer has not taken: a name collision is a bug
            plan.error = SmtpResponse(451, "4.3.0", f"{what}: {plan.final.name} already exists")
            plan.void_intent = True
            try:  # never published; the retry writes it anew
                os.unlink(plan.temp)
            except OSError:
                pass
        except FileNotFoundError:
            if plan.data is not None:  # we wrote it moments ago: someone removed our temp
                plan.error = SmtpResponse(451, "4.3.0", f"{what}: temporary file vanished")
                plan.void_intent = True
            else:
                plan.recovered = True  # renamed before the crash; the consumer may have it
        except OSError as exc:
            plan.error = response_for(exc, what)
    for folder in folders:
        try:
            fsync_dir(folder)
        except OSError as exc:
            for plan in plans:
                if plan.error is None and plan.final.parent == folder:
                    plan.error = response_for(exc, what)


def _remove_temps(plans: Sequence[FilePlan]) -> None:
    for plan in plans:
        _unlink_quietly(plan.temp)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
