"""Drive delivery agents through connections: open → deliver items → close.

Connector plugins call ``run_agent`` (one connection) or ``run_connections`` (a batch split
into connections, MaxMessagesPerConnection items each, at most MaxConcurrentConnections at
once) from their ``deliver`` hook. They turn an agent's open result into a queue-level
outcome and contain its exceptions and hangs, so a faulty agent defers its items instead of
taking the daemon (or the queue) down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import structlog

from hubport.core.delivery import (
    LOCAL_ERROR,
    DeferQueue,
    DeliveryAgent,
    DeliveryContext,
    FailQueue,
    ItemResult,
    MailItem,
)
from hubport.core.model import NextHop, SmtpResponse

log = structlog.get_logger("hubport.agents")

AGENT_TIMEOUT = SmtpResponse(451, "4.4.1", "Delivery agent did not finish in time")

Outcome = list[ItemResult] | DeferQueue | FailQueue


async def run_agent(agent_cls: type[DeliveryAgent], connector: Any, next_hop: NextHop,
                    items: Sequence[MailItem], context: DeliveryContext,
                    timeout: float | None = None) -> Outcome:
    """One connection: open → deliver → close, within ``timeout`` seconds if given.

    An agent that keeps the default ``deliver_many`` is driven item by item: an exception
    defers only its item (451 4.3.0), and on a timeout the items already acknowledged keep
    their results while the rest are deferred (451 4.4.1). An agent with its own
    ``deliver_many`` answers for the batch as a whole. ``close`` is always called.
    """
    agent = agent_cls(connector, context)
    done: list[ItemResult] = []
    try:
        async with asyncio.timeout(timeout):
            opened = await agent.open(next_hop)
            if isinstance(opened, (DeferQueue, FailQueue)):
                return opened
            if type(agent).deliver_many is DeliveryAgent.deliver_many:
                for item in items:
                    done.append(await _deliver_one(agent, item, next_hop))
                results: Any = done
            else:
                results = await agent.deliver_many(items)
    except TimeoutError:
        log.error("delivery agent timed out; its items are deferred",
                  agent=agent_cls.__name__, next_hop=next_hop.key, timeout=timeout)
        return done + [ItemResult.defer(i, AGENT_TIMEOUT) for i in items[len(done):]]
    except Exception:
        log.exception("delivery agent raised; its items are deferred",
                      agent=agent_cls.__name__, next_hop=next_hop.key)
        return DeferQueue(LOCAL_ERROR, crashed=True)
    finally:
        await _close(agent, timeout)
    if not isinstance(results, list) or len(results) != len(items) or not all(
            isinstance(r, ItemResult) for r in results):
        log.error("delivery agent returned results of the wrong shape",
                  agent=agent_cls.__name__)
        return DeferQueue(LOCAL_ERROR)
    return list(results)


async def _deliver_one(agent: DeliveryAgent, item: MailItem, next_hop: NextHop) -> ItemResult:
    """One item through ``deliver``; its exception or a malformed result defers it alone."""
    try:
        result = await agent.deliver(item)
    except Exception:
        log.exception("delivery agent raised; the item is deferred",
                      agent=type(agent).__name__, next_hop=next_hop.key,
                      internal_message_id=item.message.id)
        crashed = ItemResult.defer(item, LOCAL_ERROR)
        crashed.crashed = True
        return crashed
    if not isinstance(result, ItemResult):
        log.error("delivery agent returned no ItemResult; the item is deferred",
                  agent=type(agent).__name__, internal_message_id=item.message.id)
        return ItemResult.defer(item, LOCAL_ERROR)
    return result


async def _close(agent: DeliveryAgent, timeout: float | None) -> None:
    try:
        async with asyncio.timeout(timeout):
            await agent.close()
    except Exception:
        log.exception("delivery agent failed to close", agent=type(agent).__name__)


async def run_connections(agent_cls: type[DeliveryAgent], connector: Any, next_hop: NextHop,
                          items: Sequence[MailItem], context: DeliveryContext, *,
                          per_connection: int | None, semaphore: asyncio.Semaphore,
                          timeout: float | None = None) -> Outcome:
    """Split ``items`` into connections of ``per_connection`` items (None: one connection).

    ``semaphore`` bounds the connections open at once across every batch of the connector.
    When every connection answers DeferQueue/FailQueue at open, that answer stands for the
    whole queue (queue-level retry); otherwise it applies to its own connection's items.
    """
    size = per_connection or max(1, len(items))
    chunks = [list(items[i:i + size]) for i in range(0, len(items), size)] or [[]]

    async def one(chunk: list[MailItem]) -> Outcome:
        async with semaphore:
            return await run_agent(agent_cls, connector, next_hop, chunk, context, timeout)

    outcomes = await asyncio.gather(*(one(c) for c in chunks))
    kinds = {type(o) for o in outcomes}
    if kinds in ({DeferQueue}, {FailQueue}) and not any(
            getattr(o, "crashed", False) for o in outcomes):
        return outcomes[0]  # the same answer for every connection: it is the queue's
    results: list[ItemResult] = []
    for chunk, outcome in zip(chunks, outcomes):
        if isinstance(outcome, FailQueue):
            results += [ItemResult.fail(item, outcome.response) for item in chunk]
        elif isinstance(outcome, DeferQueue):
            for item in chunk:
                deferred = ItemResult.defer(item, outcome.response, outcome.retry_in)
                deferred.crashed = outcome.crashed  # only this connection's items crashed
                results.append(deferred)
        else:
            results += outcome
    return results
