"""Local mailbox delivery: the MapiDelivery queue, written to Maildir.

Recipients the categorizer resolved to a mailbox of this server land in the server's
mailbox delivery queue; this plugin delivers them with the built-in Maildir agent.
"""

from __future__ import annotations

from typing import Any

from hubport.agents.maildir import MaildirAgent
from hubport.core import hookimpl
from hubport.core.agent_runner import run_agent
from hubport.core.api import DeliveryContext, MailItem
from hubport.core.model import NextHop


@hookimpl
async def deliver(next_hop: NextHop, connector: Any, items: list[MailItem],
                  context: DeliveryContext) -> Any:
    if next_hop.delivery_type != "MapiDelivery":
        return None
    return await run_agent(MaildirAgent, None, next_hop, items, context)
