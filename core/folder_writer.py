"""``FolderWriter``: an agent's files in a foreign system's folder, each exactly once.

The public face of the commit protocol the Drop and Maildir writers use
(``hubport.core.file_commit``): temp file, fsync, a write intent recorded in the queue,
rename without replacing, fsync of the folder, and only then the acknowledgement.
docs/agents.md, "No loss, no duplicate", says what an agent must do to get it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from hubport.core.body import MessageBody
from hubport.core.delivery import DeliveryContext, ItemResult, RecipientResult
from hubport.core.file_commit import FilePart, FilePlan, commit_files
from hubport.core.model import QueuedRecipient, SmtpResponse

#: the longest file name most filesystems take (bytes), for the ``.<name>.tmp`` temp file too
_NAME_MAX = 255


def _check_file_name(name: str) -> None:
    """A plain name in the folder; dot names are the writer's temps (the consumer skips them)."""
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name \
            or "\0" in name:
        raise ValueError(f"not a plain file name that does not start with '.': {name!r}")
    if len(os.fsencode(f".{name}.tmp")) > _NAME_MAX:
        raise ValueError(f"file name too long (at most {_NAME_MAX - 5} bytes): {name!r}")


class FolderWriter:
    """Writes files into a folder another system consumes, each file exactly once, even when
    the process is killed at any point (the protocol of the Drop and Maildir writers).

    ``add`` plans one file for some recipients; ``commit`` writes every planned file under
    ``.<name>.tmp`` (which the consumer must ignore), makes them durable, records "written
    as <name>" for their recipients in the queue, renames each to its name without ever
    replacing a file, makes the folder durable, and only then acknowledges the recipients in
    their ``ItemResult``: delivered, or deferred with a 4xx naming the filesystem error.
    A recipient that arrives with a recorded write (the process died after the record,
    before the queue marked it delivered) is finished instead of written again: the temp is
    renamed if it is still there, else the file already appeared (and may have been taken).
    """

    def __init__(self, context: DeliveryContext, folder: Path | str, what: str = "") -> None:
        self.context = context
        self.folder = Path(folder)
        #: names the folder in error responses ("SMS spool is full")
        self.what = what or f"Folder {self.folder}"
        self._plans: list[FilePlan] = []
        self._acks: list[tuple[ItemResult, SmtpResponse | None]] = []
        self._names: set[str] = set()
        self._fresh: set[str] = set()

    def add(self, result: ItemResult, recipients: Sequence[QueuedRecipient], name: str,
            data: bytes | MessageBody | Sequence[bytes | MessageBody],
            response: SmtpResponse | None = None) -> None:
        """Plan the file ``name`` holding ``data`` (bytes, or chunks written in order) for
        ``recipients``; ``commit`` acknowledges them in ``result``. A ``MessageBody`` (such
        as ``item.body``) is read and written chunk by chunk during ``commit``, so a large
        message is never held in memory.

        ``name`` must never be used again for another file: build it from the queue's ids
        (``context.store_id``, ``item.message.id``, the lowest recipient id), not from the
        message. ``response`` is the success response (default ``250 2.0.0 Written as
        <name>``). A recipient with a recorded write is recovered under the name it was
        written as; ``data`` is then not used.
        """
        _check_file_name(name)
        fresh: list[int] = []
        recovering: dict[str, list[int]] = {}
        for r in recipients:
            intent = r.drop_intent
            if intent and not intent.startswith(".") and "/" not in intent:
                recovering.setdefault(intent, []).append(r.id)
            else:  # no write recorded (another writer's record names no file here)
                fresh.append(r.id)
        chunks: tuple[FilePart, ...] = (
            (data,) if isinstance(data, (bytes, MessageBody)) else tuple(data))
        for intent, rids in recovering.items():
            self._plan(result, response, rids, intent, None)
        if fresh:
            self._plan(result, response, fresh, name, chunks)

    def _plan(self, result: ItemResult, response: SmtpResponse | None, rids: list[int],
              name: str, data: tuple[FilePart, ...] | None) -> None:
        # one name, one file: a second plan for it would race its temp and final name (two
        # recoveries of one recorded name are fine: the second finds the rename done)
        if name in self._fresh or (data is not None and name in self._names):
            raise ValueError(f"file name {name!r} planned twice in {self.folder}")
        self._names.add(name)
        if data is not None:
            self._fresh.add(name)
        self._plans.append(FilePlan(len(self._acks), rids, name, self.folder / f".{name}.tmp",
                                    self.folder / name, data))
        self._acks.append((result, response))

    async def commit(self) -> None:
        """Write, record and publish every planned file, then acknowledge its recipients.

        A file that cannot be written defers its recipients (4xx) and leaves nothing behind.
        An exception (the queue could not record the writes) leaves no file and no
        acknowledgement: the item is deferred as a crash and written again later.
        """
        plans, acks = self._plans, self._acks
        self._plans, self._acks, self._names, self._fresh = [], [], set(), set()
        await commit_files(plans, self.context, self.what)
        for plan in plans:
            result, response = acks[plan.item_index]
            if plan.error is None:
                outcome = RecipientResult.delivered(
                    response or SmtpResponse(250, "2.0.0", f"Written as {plan.intent}"))
                result.detail = plan.intent
            else:
                outcome = RecipientResult.deferred(plan.error)
                if plan.void_intent:  # the recorded file never appeared: write it anew
                    result.void_intents.update(plan.recipient_ids)
            for rid in plan.recipient_ids:
                result.recipients[rid] = outcome
