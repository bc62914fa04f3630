"""An SMS gateway delivery agent for hubport (DeliveryProtocol ``SMS``).

Registered through the ``hubport`` entry-point group; writes one spool file per recipient.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

from agents.api import DeferQueue, DeliveryAgent, ItemResult, MailItem
from core import hookimpl
from core.model import NextHop, SmtpResponse

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


def number_of(address: str) -> str | None:
    """``SMS:+1555...`` or ``+1555...@anything`` -> the number, else None."""
    value = address.split(":", 1)[1] if address.upper().startswith("SMS:") else address
    value = value.split("@", 1)[0]
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
        for r in item.recipients:
            number = number_of(r.address)
            if number is None:
                result.ack_fail(r, NOT_A_NUMBER)
                continue
            name = f"{self.context.store_id}-{item.message.id}-{r.id}.sms"
            await asyncio.to_thread(self._write, name, f"To: {number}\n\n{text}\n")
            result.ack_success(r, SmtpResponse(250, "2.0.0", f"Queued for SMS as {name}"))
            result.detail = name
        return result

    def _write(self, name: str, content: str) -> None:
        tmp = self.settings.spool / f".{name}.tmp"
        tmp.write_text(content)
        os.replace(tmp, self.settings.spool / name)  # the gateway never sees half a file


@hookimpl
def register_delivery_agents(register: Callable[[str, type], None]) -> None:
    register("SMS", SmsAgent)
