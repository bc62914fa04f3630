"""Linked connectors (docs/exchange.md, "Linked connectors"): every message a linked
receive connector takes leaves through its send connector, whatever its recipients, to an
external scanner that sends it back through another receive connector.

The send connector stamps each message it sends with ``X-Hubport-Linked: <connector>;
<unix time>``. A message that arrives on the linked receive connector again with a fresh
stamp of that connector went round once already (the scanner sent it back to the wrong
connector): it fails with 5.4.6 instead of going round again. A forged stamp gains
nothing, since it only bounces the forger's own message, and a stamp older than
``LOOP_WINDOW`` is ignored, so mail that legitimately comes back later (a forward from
outside) is scanned again.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from hubport.core.body import MessageBody
from hubport.core.categorizer import Reject, RouteTo
from hubport.core.model import NextHop, QueuedMessage, SmtpResponse
from hubport.plugins.smtp_send.content import prepend

if TYPE_CHECKING:
    from hubport.core.config import Organization
    from hubport.plugins.smtp_send.connector import SendConnector

HEADER = b"X-Hubport-Linked"
LOOP_WINDOW = 3600.0  # seconds a stamp counts as "this message went round just now"
_STAMP = re.compile(rb"(?im)^x-hubport-linked:[ \t]*([^;\r\n]+?)[ \t]*;[ \t]*([0-9]{1,12})\b")


def linked_send_connector(org: Organization, receive_connector: str) -> SendConnector | None:
    """The enabled send connector linked to the receive connector of this name, if any."""
    wanted = receive_connector.lower()
    for connector in org.connectors_of("send_connector"):
        linked = getattr(connector, "linked_receive_name", None)
        if linked is not None and linked.lower() == wanted and connector.enabled:
            return connector  # type: ignore[return-value]
    return None


def route_through_link(message: QueuedMessage, org: Organization,
                       now: float | None = None) -> RouteTo | Reject | None:
    """The categorizer's decision for a recipient of ``message``: through the linked send
    connector when the message came in on a linked receive connector, a loop failure when
    it has just been through it, else None (the organization decides)."""
    if message.source != "SMTP" or not message.source_name:
        return None
    connector = linked_send_connector(org, message.source_name)
    if connector is None:
        return None
    if _went_round(message.body.prefix, connector.name, time.time() if now is None else now):
        return Reject(SmtpResponse(
            554, "5.4.6", f"ROUTING.Loop; the message came back to {message.source_name},"
                          f" the receive connector linked to {connector.name}, after it"
                          " had left through it"))
    smart_hosts = ",".join(str(h) for h in connector.smart_hosts)
    return RouteTo(NextHop(connector.delivery_type, smart_hosts, connector.name))


def stamp(data: bytes | MessageBody, connector: str,
          now: float | None = None) -> bytes | MessageBody:
    """The message with the linked connector's stamp as its first header field."""
    when = int(time.time() if now is None else now)  # whole seconds, never ahead of now
    return prepend(data, HEADER + f": {connector}; {when}\r\n".encode())


def _went_round(header: bytes, connector: str, now: float) -> bool:
    section = header.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    for match in _STAMP.finditer(section):
        name = match.group(1).decode("utf-8", "replace").strip()
        if name.lower() != connector.lower():
            continue
        when = int(match.group(2))  # at most 12 digits: always a number
        # a second of slack: the stamp is in whole seconds (and never from the future
        # beyond that, or a forged far-future stamp would bounce mail for ever)
        if -1 <= now - when <= LOOP_WINDOW:
            return True
    return False
