"""An SMS gateway delivery agent for hubport (DeliveryProtocol ``SMS``).

Registered through the ``hubport`` entry-point group; writes one spool file per recipient,
exactly once (``hubport.core.api.FolderWriter``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

from hubport.core.api import (
    DeferQueue,
    DeliveryAgent,
    FolderWriter,
    ItemResult,
    MailItem,
    NextHop,
    RecipientAddress,
    SmtpResponse,
    hookimpl,
)

__version__ = "0.1.0"

NUMBER = re.compile(r"\+?[0-9]{3,20}")
NOT_A_NUMBER = SmtpResponse(550, "5.1.3", "Not a phone number")
SPOOL_MISSING = SmtpResponse(451, "4.4.0", "SMS gateway spool folder missing")


@dataclass(frozen=True)
class SmsSettings:
    spool: Path
    max_length: int


def sms_text(data: bytes, max_length: int) -> str:
    """Subject, then the plain-text body, on one line, cut to ``max_length``."""
    msg = message_from_bytes(data, policy=policy.default)
    body = msg.get_body(("plain",)) if hasattr(msg, "get_body") else None
    text = body.get_content() if body is not None else ""
    joined = " ".join(f"{msg.get('Subject', '')} {text}".split())
    return joined[:max_length]


def number_of(to: RecipientAddress) -> str | None:
    """The phone number of a recipient, else None.

    ``SMS:+15551234`` (a recipient of an ``SMS:*`` address space, which arrives as
    ``IMCEASMS-+2B15551234@<default domain>``) or ``+15551234@gateway`` (an ``SMTP:``
    address space for the gateway's domain).
    """
    if to.address_type == "SMS":
        value = to.address
    elif to.is_smtp:
        value = to.address.rpartition("@")[0]
    else:
        return None
    return value if NUMBER.fullmatch(value) else None


class SmsAgent(DeliveryAgent):
    protocol = "SMS"

    @classmethod
    def read_settings(cls, reader: Any) -> SmsSettings | None:
        spool = reader.path("SpoolDirectory", None)
        length = reader.int("MaxLength", 160, min=1, max=1600)
        if spool is None:
            reader.error("SpoolDirectory", "required")
            return None
        return SmsSettings(spool, length or 160)

    async def open(self, next_hop: NextHop) -> DeferQueue | None:
        if not await asyncio.to_thread(self.settings.spool.is_dir):
            return DeferQueue(SPOOL_MISSING, retry_in=5)
        return None

    async def deliver(self, item: MailItem) -> ItemResult:
        result = ItemResult()
        text = sms_text(item.data, self.settings.max_length)
        spool = FolderWriter(self.context, self.settings.spool, "SMS spool")
        for r in item.recipients:
            number = number_of(item.address_of(r))
            if number is None:
                result.ack_fail(r, NOT_A_NUMBER)
                continue
            # a name from the queue's ids alone: never reused, the same on every retry
            name = f"{self.context.store_id}-{item.message.id}-{r.id}.sms"
            spool.add(result, [r], name, f"To: {number}\n\n{text}\n".encode(),
                      SmtpResponse(250, "2.0.0", f"Queued for SMS as {name}"))
        # each file appears exactly once, even if hubport is killed midway; only then are
        # the recipients acknowledged (delivered, or deferred on a full or read-only spool)
        await spool.commit()
        return result


@hookimpl
def register_delivery_agents(register: Callable[[str, type], None]) -> None:
    register("SMS", SmsAgent)
