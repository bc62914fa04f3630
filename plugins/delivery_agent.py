"""Delivery Agent connectors: deliver through an agent chosen by DeliveryProtocol
(docs/exchange.md, "Foreign and Delivery Agent connectors").

``[[delivery_agent_connector]]`` (New-DeliveryAgentConnector): AddressSpaces,
DeliveryProtocol, SourceTransportServers, IsScopedConnector, Enabled, MaxMessageSize,
MaxConcurrentConnections (5), MaxMessagesPerConnection (20), plus the hubport extension
ConnectionTimeout (5 minutes: a connection that takes longer defers its items, so a hung
agent cannot hold its queue forever). The agent registered for the DeliveryProtocol reads
its own fields from the same table (``DeliveryAgent.read_settings``). Mail waits in a normal
delivery queue (DeliveryType ``DeliveryAgent``): retry, suspend, expiry and NDRs as usual.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from hubport.core import hookimpl
from hubport.core.agent_runner import run_connections
from hubport.core.api import DeliveryAgent, DeliveryContext, MailItem
from hubport.core.config_fields import ConfigContext, FieldReader
from hubport.core.connectors import Connector
from hubport.core.failpoints import failpoint
from hubport.core.model import NextHop


@dataclass
class DeliveryAgentConnector(Connector):
    delivery_protocol: str = ""
    max_concurrent_connections: int = 5
    max_messages_per_connection: int | None = 20  # None: unlimited
    connection_timeout: float | None = 300.0  # None: no limit
    agent: type[DeliveryAgent] | None = None
    #: what the agent's ``read_settings`` returned
    settings: Any = None

    section: ClassVar[str] = "delivery_agent_connector"
    delivery_type: ClassVar[str] = "DeliveryAgent"
    kind: ClassVar[str] = "DeliveryAgentConnector"

    @classmethod
    def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> DeliveryAgentConnector:
        common = cls.read_common(reader, ctx)
        protocol = (reader.string("DeliveryProtocol", required=True) or "").strip()
        registered = ctx.delivery_agents.get(protocol.upper()) if protocol else None
        agent: type[DeliveryAgent] | None = None
        settings = None
        if protocol and registered is None:
            known = ", ".join(sorted(ctx.delivery_agents)) or "none"
            reader.error("DeliveryProtocol", f'no delivery agent serves "{protocol}" '
                                             f"(registered: {known})")
        elif registered is not None and not issubclass(registered, DeliveryAgent):
            reader.error("DeliveryProtocol", f'the agent registered for "{protocol}" '
                         f"({registered.__qualname__}) does not subclass DeliveryAgent")
        elif registered is not None:
            agent = registered
            settings = agent.read_settings(reader)
        return cls(**common,
                   delivery_protocol=protocol.upper(),
                   max_concurrent_connections=reader.int(
                       "MaxConcurrentConnections", 5, min=1, max=1000) or 5,
                   max_messages_per_connection=reader.int(
                       "MaxMessagesPerConnection", 20, min=1, max=100000, unlimited=True),
                   connection_timeout=reader.duration("ConnectionTimeout", "5m", "1s", "1d"),
                   agent=agent, settings=settings)


#: per event loop: connector name -> the semaphore bounding its open connections
_limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int],
                                   asyncio.Semaphore]] = weakref.WeakKeyDictionary()


def connection_limit(connector: DeliveryAgentConnector) -> asyncio.Semaphore:
    """MaxConcurrentConnections across every batch and queue of the connector."""
    per_loop = _limits.setdefault(asyncio.get_running_loop(), {})
    key = (connector.name.lower(), connector.max_concurrent_connections)
    return per_loop.setdefault(key, asyncio.Semaphore(connector.max_concurrent_connections))


@hookimpl
def register_connector_types(register: Callable[[type], None]) -> None:
    register(DeliveryAgentConnector)


@hookimpl
async def deliver(next_hop: NextHop, connector: Any, items: list[MailItem],
                  context: DeliveryContext) -> Any:
    if not isinstance(connector, DeliveryAgentConnector) or connector.agent is None:
        return None
    outcome = await run_connections(
        connector.agent, connector, next_hop, items, context,
        per_connection=connector.max_messages_per_connection,
        semaphore=connection_limit(connector), timeout=connector.connection_timeout)
    # crash tests: the agent has delivered, the queue does not know it yet
    failpoint("after_agent_before_commit")
    return outcome
