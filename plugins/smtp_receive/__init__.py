"""Receive connectors: SMTP into hubport with Exchange's bindings, ranges, auth and rights.

``[[receive_connector]]`` (New-ReceiveConnector; docs/exchange.md, "Receive connectors and
permission groups"). The connector type parses its section (``connector``), the service
listens on the bindings of this server's connectors (``service``), each session runs on
aiosmtpd with hubport's protocol rules (``protocol``, ``data``), and the decisions without
sockets are in ``policy`` and ``permissions``.
"""

from __future__ import annotations

from collections.abc import Callable

from hubport.core import hookimpl
from hubport.plugins.smtp_receive.connector import ReceiveConnector

__all__ = ["ReceiveConnector"]


@hookimpl
def register_connector_types(register: Callable[[type], None]) -> None:
    register(ReceiveConnector)
