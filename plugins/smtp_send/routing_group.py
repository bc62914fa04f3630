"""Routing Group connectors (New-RoutingGroupConnector; docs/exchange.md,
"Routing Group connectors").

``[[routing_group_connector]]`` joins the organization's hubs (Exchange's own routing group)
to a legacy routing group (``[[routing_group]]``, core/routing_groups.py): Name,
SourceTransportServers (our hubs that send through it), TargetTransportServers (servers of
one legacy routing group, tried in order: failover), Cost (1-100, default 1: the connector's
part of the aggregate cost), Bidirectional (default false: true also creates the reciprocal
connector, the legacy group's way back to our hubs, as an object of its own), MaxMessageSize,
Enabled.

The connector serves the legacy group's AddressSpaces and the recipients homed there; the
queue is ``SmtpRelayToTiRg`` with the routing group's name as NextHopDomain. The legacy group
is part of the organization: its mail keeps the organization's headers (no header firewall).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hubport.core.address_space import AddressSpace
from hubport.core.config_fields import ConfigContext, FieldReader
from hubport.core.connectors import Connector
from hubport.core.routing_groups import EXCHANGE_ROUTING_GROUP, HOME_TYPE, RoutingGroup

DELIVERY_TYPE = "SmtpRelayToTiRg"


@dataclass
class RoutingGroupConnector(Connector):
    """One direction between the organization's hubs and a legacy routing group."""

    section: ClassVar[str] = "routing_group_connector"
    delivery_type: ClassVar[str] = DELIVERY_TYPE
    kind: ClassVar[str] = "RoutingGroupConnector"

    source_routing_group: str = EXCHANGE_ROUTING_GROUP
    target_routing_group: str = ""
    target_transport_servers: tuple[str, ...] = ()
    cost: int = 1
    bidirectional: bool = False
    #: a reciprocal's source servers: legacy servers (its source_transport_servers stay
    #: empty, so the routing table never offers it to a hub)
    legacy_source_servers: tuple[str, ...] = ()
    reciprocal_of: str | None = None
    reciprocal: RoutingGroupConnector | None = field(default=None, repr=False)

    def next_hop_domain(self, space: AddressSpace, address: str = "") -> str:
        return self.target_routing_group

    def summary(self) -> str:
        sources = self.legacy_source_servers or self.source_transport_servers
        line = (f'{self.kind} "{self.name}": {self.source_routing_group} ->'
                f" {self.target_routing_group}, cost {self.cost},"
                f" from {', '.join(sources)} to {', '.join(self.target_transport_servers)}")
        if self.reciprocal_of:
            line += f' (reciprocal of "{self.reciprocal_of}")'
        return line + ("" if self.enabled else "; disabled")

    def companions(self) -> tuple[Connector, ...]:
        return (self.reciprocal,) if self.reciprocal is not None else ()

    @classmethod
    def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> RoutingGroupConnector:
        common = cls.read_common(reader, ctx, address_spaces_required=False)
        if reader.has("AddressSpaces"):
            reader.error("AddressSpaces", "a Routing Group connector serves its target routing"
                                          " group's AddressSpaces and homed recipients; set"
                                          " them on the [[routing_group]]")
        if reader.has("IsScopedConnector"):
            reader.error("IsScopedConnector", "unknown field for a Routing Group connector")
        targets = reader.string_list("TargetTransportServers")
        cost = reader.int("Cost", 1, min=1, max=100)
        bidirectional = reader.bool("Bidirectional", False)
        group = _target_group(reader, ctx, targets)
        if group is None:  # the error is recorded: the organization will not load
            return cls(**common)
        names = tuple(s.name for name in targets if (s := group.server(name)) is not None)
        spaces = tuple(AddressSpace(s.type, s.space, cost) for s in group.address_spaces)
        home = AddressSpace(HOME_TYPE, group.name, cost)
        common["address_spaces"] = (*spaces, home)
        common["is_scoped_connector"] = False
        connector = cls(**common, target_routing_group=group.name,
                        target_transport_servers=names, cost=cost,
                        bidirectional=bidirectional)
        if bidirectional:
            connector.reciprocal = cls(
                name=f"{connector.name} (reciprocal)", enabled=connector.enabled,
                max_message_size=connector.max_message_size,
                source_routing_group=group.name, target_routing_group=EXCHANGE_ROUTING_GROUP,
                target_transport_servers=connector.source_transport_servers, cost=cost,
                bidirectional=True, legacy_source_servers=names,
                reciprocal_of=connector.name)
        return connector

    @classmethod
    def check_all(cls, connectors: Sequence[RoutingGroupConnector], ctx: ConfigContext
                  ) -> None:
        """Two connectors between the same hubs and legacy group are allowed (a cheaper and
        a backup one); a reciprocal name taken by a declared connector is an error."""
        declared = {c.name.lower() for c in connectors if c.reciprocal_of is None}
        for c in connectors:
            if c.reciprocal is not None and c.reciprocal.name.lower() in declared:
                ctx.error(f'routing_group_connector "{c.name}"', "Bidirectional",
                          f'the reciprocal connector "{c.reciprocal.name}" would take the'
                          " name of a declared connector")


def _target_group(reader: FieldReader, ctx: ConfigContext, targets: Sequence[str]
                  ) -> RoutingGroup | None:
    """The one legacy routing group every target server belongs to."""
    if not targets:
        reader.error("TargetTransportServers", "required: the servers of the legacy routing"
                                               " group that receive its mail")
        return None
    groups: list[RoutingGroup] = list(ctx.routing_groups.values())
    found: dict[str, RoutingGroup] = {}
    for name in targets:
        owner = next((g for g in groups if g.server(name) is not None), None)
        if owner is None:
            known = ", ".join(s.name for g in groups for s in g.servers) or "none declared"
            where = " (a transport server of ours: Routing Group connectors lead to a legacy"\
                    " group)" if ctx.server_name(name) is not None else ""
            reader.error("TargetTransportServers",
                         f'"{name}" is no server of a [[routing_group]]{where}'
                         f" (legacy servers: {known})")
            return None
        found[owner.name.lower()] = owner
    if len(found) > 1:
        reader.error("TargetTransportServers", "the target servers belong to different routing"
                     f" groups ({', '.join(g.name for g in found.values())}): one connector"
                     " leads to one routing group")
        return None
    return next(iter(found.values()))


def legacy_targets(org: Any, connector: RoutingGroupConnector) -> list[Any]:
    """The legacy servers a connector delivers to, in its TargetTransportServers order."""
    group = org.routing_group(connector.target_routing_group)
    if group is None:
        return []
    return [s for name in connector.target_transport_servers
            if (s := group.server(name)) is not None]
