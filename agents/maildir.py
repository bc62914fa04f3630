"""The Maildir writer: final delivery to local mailboxes.

Each recipient gets one file in ``<StateDirectory>/mailboxes/<alias>/new``, named from the
queue's ids, made visible exactly once (``hubport.core.file_commit``): written in ``tmp/``,
synced, intent committed, renamed into ``new/``. Final delivery adds ``Return-Path`` (RFC
5321 §4.4) and ``Delivered-To``, and stores lines with LF endings as Maildir readers expect.
A spooled (large) message is converted to LF chunk by chunk while each file is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path

from hubport.core import body as message_body
from hubport.core.api import DeliveryAgent, ItemResult, MailItem, MessageBody, RecipientResult
from hubport.core.file_commit import FilePart, FilePlan, commit_files, response_for
from hubport.core.headers import make_field
from hubport.core.model import SmtpResponse

MAILBOX_UNKNOWN = SmtpResponse(550, "5.1.1", "RESOLVER.ADR.RecipNotFound; mailbox not found")


def maildir_root(state_directory: Path, alias: str) -> Path:
    return state_directory / "mailboxes" / alias


def ensure_maildir(root: Path) -> None:
    """Create the Maildir (tmp/new/cur) if missing. Several processes may do it at the
    same moment (the workers of a server delivering a mailbox's first messages, servers
    sharing a mailbox folder): a folder another one made is as good as ours."""
    if (root / "new").is_dir():
        return
    for folder in (root, root / "tmp", root / "new", root / "cur"):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)


def local_header(item: MailItem, address: str) -> bytes:
    """The fields final delivery adds, in the Maildir's LF line endings."""
    head = make_field("Return-Path", f"<{item.message.mail_from.address}>")
    head += make_field("Delivered-To", address)
    return head.replace(b"\r\n", b"\n")


def lf_body(item: MailItem) -> FilePart:
    """The message with LF line endings, for every mailbox of the item: converted once in
    memory when small; when spooled, a function converting it chunk by chunk as each file
    is written (in the writer thread, never the whole message at once)."""
    if not item.body.spooled:
        return item.data.replace(b"\r\n", b"\n")
    return partial(_lf_chunks, item.body)


def _lf_chunks(body: MessageBody) -> Iterator[bytes]:
    return crlf_to_lf(body.chunks(message_body.CHUNK_SIZE))


def crlf_to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The joined ``chunks`` with each CRLF turned into LF, piece by piece (the same octets
    as converting them whole): a CR ending one chunk is held back until the next shows
    whether an LF follows it."""
    held = b""
    for chunk in chunks:
        if held:
            chunk = held + chunk
        chunk, held = (chunk[:-1], b"\r") if chunk.endswith(b"\r") else (chunk, b"")
        yield chunk.replace(b"\r\n", b"\n")
    if held:
        yield held


class MaildirAgent(DeliveryAgent):
    """Delivers each recipient of a mail item into its mailbox's Maildir."""

    protocol = "MAILDIR"

    async def deliver(self, item: MailItem) -> ItemResult:
        return (await self.deliver_many([item]))[0]

    async def deliver_many(self, items: Sequence[MailItem]) -> list[ItemResult]:
        directory = self.context.directory
        server = self.context.server
        results = [ItemResult() for _ in items]
        plans: list[FilePlan] = []
        roots: set[Path] = set()
        for index, item in enumerate(items):
            body: FilePart | None = None
            for r in item.recipients:
                if r.drop_intent:  # recovery: the intent names the mailbox it was written for
                    alias, _, name = r.drop_intent.rpartition("/")
                    root = maildir_root(server.state_directory, alias)
                    roots.add(root)
                    plans.append(FilePlan(index, [r.id], r.drop_intent, root / "tmp" / name,
                                          root / "new" / name, None))
                    continue
                box = directory.mailbox(r.address)
                if box is None:
                    results[index].recipients[r.id] = RecipientResult.failed(MAILBOX_UNKNOWN)
                    continue
                root = maildir_root(server.state_directory, box.alias)
                roots.add(root)
                name = (f"{int(item.message.received_at)}.H{self.context.store_id}"
                        f"M{item.message.id}R{r.id}.{server.name}")
                if body is None:  # one LF message (or its converter) serves every mailbox
                    body = lf_body(item)
                data = (local_header(item, r.address), body)
                plans.append(FilePlan(index, [r.id], f"{box.alias}/{name}", root / "tmp" / name,
                                      root / "new" / name, data))
        unusable = await asyncio.to_thread(_ensure_all, roots)
        for plan in plans:  # a Maildir that cannot be made defers its recipients, no more
            root = plan.final.parent.parent
            if root in unusable:
                plan.error = response_for(unusable[root], f"Mailbox {root.name}")
        await commit_files(plans, self.context, "Mailbox")
        for plan in plans:
            result = results[plan.item_index]
            if plan.error is None:
                outcome = RecipientResult.delivered(SmtpResponse(250, "2.0.0", "Delivered"))
            else:
                outcome = RecipientResult.deferred(plan.error)
                if plan.void_intent:
                    result.void_intents.update(plan.recipient_ids)
            result.recipients[plan.recipient_ids[0]] = outcome
        return results


def _ensure_all(roots: set[Path]) -> dict[Path, OSError]:
    """Make each Maildir; the ones that cannot be made (read-only or full volume, ...)."""
    failed: dict[Path, OSError] = {}
    for root in roots:
        try:
            ensure_maildir(root)
        except OSError as exc:
            failed[root] = exc
    return failed
