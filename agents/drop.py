"""The Drop directory writer: how a Foreign connector hands mail to a non-SMTP gateway.

Each mail item becomes one file in the Replay format (``X-Sender``/``X-Receiver`` lines,
then the message), so a drop file copied into ``replay/`` is submitted again unchanged.
File names come from the queue's own ids, never from message data; the file appears
exactly once (``hubport.core.file_commit``). Organization and forest X-headers are removed first
(the header firewall). A spooled (large) message is never read whole: the firewall rewrites
its header section only, and the file is written as the envelope lines then the body's chunks.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from hubport.core.api import (
    DeferQueue,
    DeliveryAgent,
    ItemResult,
    MailItem,
    MessageBody,
    RecipientResult,
)
from hubport.core.file_commit import FilePlan, commit_files, response_for
from hubport.core.folder_formats import format_replay
from hubport.core.headers import (
    HeaderField,
    ParsedMessage,
    parse_header_section,
    rebuild,
    rewrite_header_section,
)
from hubport.core.model import NextHop, SmtpResponse

if TYPE_CHECKING:
    from hubport.core.config_fields import FieldReader

log = structlog.get_logger("hubport.drop")

FIREWALLED_PREFIXES = (b"x-ms-exchange-organization-", b"x-ms-exchange-forest-")
QUOTA_EXCEEDED = SmtpResponse(452, "4.3.1", "Drop directory quota exceeded")


def strip_firewalled_headers(data: bytes) -> bytes:
    """Remove organization and forest X-headers; other bytes stay as they are."""
    end = data.find(b"\r\n\r\n")
    head = (data if end < 0 else data[:end]).lower()
    if b"x-ms-exchange-" not in head:
        return data
    return firewall(parse_header_section(data)) or data


def _firewalled(field: HeaderField) -> bool:
    return field.name.lower().encode().startswith(FIREWALLED_PREFIXES)


def firewall(parsed: ParsedMessage) -> bytes | None:
    """``parsed`` without its organization and forest X-headers, or None when it has none
    (the rewrite ``rewrite_header_section`` takes)."""
    if not any(_firewalled(f) for f in parsed.fields):
        return None
    return rebuild(parsed, remove=_firewalled)


def drop_file_name(server: str, store_id: str, item: MailItem, recipient_ids: Sequence[int]) -> str:
    """A name no message can influence and no later message can reuse."""
    return f"{server}-{store_id}-{item.message.id}-{item.queue_id}-{min(recipient_ids)}.eml"


def directory_size(path: Path) -> int:
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total


class DropDirectoryAgent(DeliveryAgent):
    """Writes mail items into the connector's Drop directory."""

    protocol = "DROP"

    @classmethod
    def read_settings(cls, reader: FieldReader) -> Any:
        """Refuse a Delivery Agent connector at load: this agent writes the Drop directory of
        a ``[[foreign_connector]]`` (DropDirectory, DropDirectoryQuota), which a Delivery
        Agent connector does not have; accepted, every delivery would crash to Poison."""
        reader.error("DeliveryProtocol", '"DROP" writes the Drop directory of a Foreign '
                     "connector; configure a [[foreign_connector]] with DropDirectory instead")
        return None

    @property
    def directory(self) -> Path:
        return self.connector.drop_path(self.context.server)

    async def open(self, next_hop: NextHop) -> DeferQueue | None:
        directory = self.directory
        try:
            used = await asyncio.to_thread(self._check_directory, directory)
        except OSError as exc:
            return DeferQueue(response_for(exc, f"Drop directory {directory}"))
        self._used = used
        quota = self.connector.drop_directory_quota
        if quota is not None and used >= quota:
            log.warning("NonSmtpGWQuotaExceeded", event_id=8005, connector=self.connector.name,
                        directory=str(directory), used=used, quota=quota)
            return DeferQueue(QUOTA_EXCEEDED)
        return None

    def _check_directory(self, directory: Path) -> int:
        if self.connector.create_drop_directory:
            directory.mkdir(parents=True, exist_ok=True)
        if not directory.is_dir():
            raise FileNotFoundError(2, "not a directory", str(directory))
        quota = self.connector.drop_directory_quota
        return directory_size(directory) if quota is not None else 0

    async def deliver(self, item: MailItem) -> ItemResult:
        return (await self.deliver_many([item]))[0]

    async def deliver_many(self, items: Sequence[MailItem]) -> list[ItemResult]:
        directory = self.directory
        quota = self.connector.drop_directory_quota
        used = getattr(self, "_used", 0)
        server = self.context.server.name
        plans: list[FilePlan] = []
        results = [ItemResult() for _ in items]
        for index, item in enumerate(items):
            recovering: dict[str, list[int]] = {}
            fresh: list[int] = []
            for r in item.recipients:
                (recovering.setdefault(r.drop_intent, []) if r.drop_intent else fresh).append(r.id)
            for intent, rids in recovering.items():
                plans.append(FilePlan(index, rids, intent, directory / f".{intent}.tmp",
                                      directory / intent, None))
            if not fresh:
                continue
            if quota is not None and used >= quota:
                for rid in fresh:
                    results[index].recipients[rid] = RecipientResult.deferred(QUOTA_EXCEEDED)
                continue
            name = drop_file_name(server, self.context.store_id, item, fresh)
            chosen = [r for r in item.recipients if r.id in fresh]
            envelope = item.envelope
            envelope.recipients = [e for e, r in zip(envelope.recipients, item.recipients)
                                   if r.id in fresh]
            content: bytes | tuple[bytes, MessageBody]
            if item.body.spooled:  # the envelope lines, then the body streamed as it is written
                body = await asyncio.to_thread(rewrite_header_section, item.body, firewall)
                content = (format_replay(envelope, b""), body)  # b"": the envelope lines alone
                used += len(content[0]) + body.size
            else:
                content = format_replay(envelope, strip_firewalled_headers(item.data))
                used += len(content)
            plans.append(FilePlan(index, [r.id for r in chosen], name,
                                  directory / f".{name}.tmp", directory / name, content))
        await commit_files(plans, self.context, f"Drop directory {directory}")
        for plan in plans:
            result = results[plan.item_index]
            if plan.error is None:
                outcome = RecipientResult.delivered(
                    SmtpResponse(250, "2.6.0", f"Written to drop directory as {plan.intent}"))
                result.detail = plan.intent
            else:
                outcome = RecipientResult.deferred(plan.error)
                if plan.void_intent:
                    result.void_intents.update(plan.recipient_ids)
            for rid in plan.recipient_ids:
                result.recipients[rid] = outcome
        return results
