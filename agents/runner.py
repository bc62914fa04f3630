"""Drive one delivery agent through a connection: open → deliver items → close.

Connector plugins call ``run_agent`` from their ``deliver`` hook; it turns the agent's
open result into a queue-level outcome and contains the agent's exceptions, so a faulty
agent defers its items instead of taking the daemon down.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog

from agents.api import (
    LOCAL_ERROR,
    DeferQueue,
    DeliveryAgent,
    DeliveryContext,
    FailQueue,
    ItemResult,
    MailItem,
)
from core.model import NextHop

log = structlog.get_logger("hubport.agents")


async def run_agent(agent_cls: type[DeliveryAgent], connector: Any, next_hop: NextHop,
                    items: Sequence[MailItem], context: DeliveryContext,
                    ) -> list[ItemResult] | DeferQueue | FailQueue:
    agent = agent_cls(connector, context)
    try:
        opened = await agent.open(next_hop)
        if isinstance(opened, (DeferQueue, FailQueue)):
            return opened
        results = await agent.deliver_many(items)
    except Exception:
        log.exception("delivery agent raised; its items are deferred",
                      agent=agent_cls.__name__, next_hop=next_hop.key)
        return DeferQueue(LOCAL_ERROR)
    finally:
        try:
            await agent.close()
        except Exception:
            log.exception("delivery agent failed to close", agent=agent_cls.__name__)
    if len(results) != len(items):
        log.error("delivery agent returned a wrong number of results", agent=agent_cls.__name__)
        return DeferQueue(LOCAL_ERROR)
    return list(results)
