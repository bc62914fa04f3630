"""The routing table: which connector a recipient leaves through
(docs/exchange.md, "Address spaces and connector selection").

Elimination and selection, the same for Send, Foreign and Delivery Agent connectors:
1. drop connectors whose MaxMessageSize is smaller than the message;
2. keep those enabled, in scope, with an address space matching the recipient;
3. most specific address space; 4. lowest aggregate cost (site-link cost to the source
server's site + address-space cost); 5. proximity (source server local, same site, remote);
6. connector name, lowest first.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hubport.core.address_space import AddressSpace
from hubport.core.model import NextHop, SmtpResponse

if TYPE_CHECKING:
    from hubport.core.config import Organization, SiteHop, TransportServer
    from hubport.core.connectors import Connector

NO_CONNECTOR_FOR_TYPE = SmtpResponse(
    550, "5.4.4", "ROUTING.NoConnectorForAddressType; no connector for this address type")
TOO_BIG_FOR_CONNECTORS = SmtpResponse(
    550, "5.3.4", "ROUTING.SizeLimit; message too large for every matching connector")


@dataclass(frozen=True, slots=True)
class RouteCandidate:
    """A next hop that could serve a recipient, with what selection compares."""

    next_hop: NextHop
    address_space: AddressSpace
    specificity: int
    cost: int  # aggregate: site-link cost + address-space cost
    proximity: int  # 0 local server, 1 same site, 2 remote site
    name: str
    connector: Any = None
    #: the transport server that hosts the connector (its site gives the site-link cost)
    source_server: str = ""

    def sort_key(self) -> tuple[int, int, int, str]:
        return (-self.specificity, self.cost, self.proximity, self.name.lower())


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The outcome for one recipient: a candidate, Unreachable, or a failure."""

    candidate: RouteCandidate | None = None
    failure: SmtpResponse | None = None
    #: the connector routing passed by because it is failed over (ConnectorFailover
    #: NextCost): ``candidate`` is the next of the same specificity
    failover_from: str = ""

    @property
    def unreachable(self) -> bool:
        return self.candidate is None and self.failure is None


@dataclass(frozen=True, slots=True)
class RouteExplanation:
    """Why a recipient goes where it goes (``hubport test-route``)."""

    decision: RouteDecision
    candidates: list[RouteCandidate]  # in the order of selection, the chosen one first
    eliminated: list[tuple[str, str]]  # (connector, why it cannot serve this recipient)
    rule: str  # what decided between the first two candidates


#: the queues of mail another hub delivers: the connector such a queue names (if any) is
#: served by that hub, so this one never hands it to a deliver hook
RELAY_TYPES = frozenset({"SmtpRelayWithinAdSite", "SmtpRelayToRemoteAdSite",
                         "SmtpRelayWithinAdSiteToEdge"})

#: stamped by a hub on each message it relays to another hub (an organization header: the
#: receiving hub drops it from anyone but the organization's servers)
ROUTED_BY = b"X-MS-Exchange-Organization-Hubport-RoutedBy"
_ROUTED_BY = re.compile(
    rb"(?im)^x-ms-exchange-organization-hubport-routedby:[ \t]*([^;\r\n]+?)[ \t]*;"
    rb"[ \t]*([0-9]{1,20})[ \t]*\r?$")


def routed_by_line(server: str, version: int) -> bytes:
    """The stamp a relay puts on top: who routed the message here, with which version of
    the organization."""
    return ROUTED_BY + f": {server}; {version}\r\n".encode()


def previous_hub(header: bytes) -> tuple[str, int] | None:
    """(server, organization version) of the hub that relayed a message here: the most
    recent stamp, the first in the header section."""
    section = header.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = _ROUTED_BY.search(section)
    if match is None:
        return None
    return match.group(1).decode("utf-8", "replace").strip(), int(match.group(2))


def disagreement(server: str, previous: tuple[str, int] | None, target: str,
                 version: int) -> SmtpResponse | None:
    """Why a recipient waits instead of going back to the hub that just routed it here, or
    None. Two hubs that route it to each other hold different versions of the organization
    (one reloaded, one not yet): the newer one sends it back, the older one keeps it, as
    Unreachable, until its own reload routes it again. So it neither loops nor bounces."""
    if previous is None or previous[0].lower() != target.lower() or version > previous[1]:
        return None
    return SmtpResponse(
        451, "4.4.6", f"ROUTING.Disagreement; {previous[0]} routed this recipient here and"
                      f" {server} routes it back: {server}'s organization is not newer than"
                      f" {previous[0]}'s, so it waits here until {server} reloads it")


#: the selection rules, in the order of RouteCandidate.sort_key
RULES = ("the most specific address space", "the lowest aggregate cost",
         "proximity (local server, then same site, then a remote site)",
         "the connector name, lowest first")


def _decision(candidates: list[RouteCandidate], too_big: bool, addr_type: str,
              avoid: Collection[str] = ()) -> RouteDecision:
    """The lowest candidate; else 5.3.4 when size alone eliminated a match, 5.4.4 for a
    non-SMTP address, and Unreachable for an SMTP one. A candidate in ``avoid`` (failed
    over) gives way to the next one of the same specificity, never to a less specific
    one (core/connector_failover.py)."""
    if candidates:
        ranked = sorted(candidates, key=RouteCandidate.sort_key)
        best = ranked[0]
        if best.name.lower() in avoid:
            other = next((c for c in ranked[1:] if c.specificity == best.specificity
                          and c.name.lower() not in avoid), None)
            if other is not None:
                return RouteDecision(other, failover_from=best.name)
        return RouteDecision(best)
    if too_big:
        return RouteDecision(failure=TOO_BIG_FOR_CONNECTORS)
    if addr_type != "SMTP":
        return RouteDecision(failure=NO_CONNECTOR_FOR_TYPE)
    return RouteDecision()


def _deciding_rule(ranked: list[RouteCandidate]) -> str:
    if not ranked:
        return "no connector can serve the recipient"
    if len(ranked) == 1:
        return "the only candidate"
    first, second = ranked[0].sort_key(), ranked[1].sort_key()
    index = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), len(RULES) - 1)
    return RULES[index]


class RoutingTable:
    """Connector selection for one server of one organization."""

    def __init__(self, org: Organization, server: TransportServer) -> None:
        self.org = org
        self.server = server
        self.connectors: list[Connector] = [
            c for c in org.connectors if getattr(c, "address_spaces", None)]

    def candidates(self, addr_type: str, address: str, size: int,
                   eliminated: list[tuple[str, str]] | None = None,
                   ) -> tuple[list[RouteCandidate], bool]:
        """Matching candidates and whether some match was dropped only for its size;
        ``eliminated`` (test-route) collects (connector, why) for the others."""
        out: list[RouteCandidate] = []
        too_big = False

        def drop(connector: Connector, why: str) -> None:
            if eliminated is not None:
                eliminated.append((connector.name, why))

        for connector in self.connectors:
            if not connector.enabled:
                drop(connector, "disabled")
                continue
            if not self._in_scope(connector):
                drop(connector, "scoped to another site (IsScopedConnector)")
                continue
            best: tuple[int, AddressSpace] | None = None
            for space in connector.address_spaces:
                score = space.match(addr_type, address)
                if score is None:
                    continue
                if best is None or (score, -space.cost) > (best[0], -best[1].cost):
                    best = (score, space)
            if best is None:
                drop(connector, "no address space matches")
                continue
            if connector.max_message_size is not None and size > connector.max_message_size:
                too_big = True
                drop(connector, f"MaxMessageSize {connector.max_message_size} is below the"
                                f" message's {size} bytes")
                continue
            score, space = best
            site_cost, proximity, via = self._distance(connector)
            if not via:  # no site link reaches any source server: it cannot serve us
                drop(connector, "no site link reaches any of its source servers")
                continue
            narrow = self.narrow_link(via, size)
            if narrow is not None:
                too_big = True
                drop(connector, f"site link {narrow.link} takes at most"
                                f" {narrow.max_message_size} bytes, the message has {size}")
                continue
            if proximity == 0:
                hop = NextHop(connector.delivery_type,
                              connector.next_hop_domain(space, address), connector.name)
            else:  # another hub hosts the connector: relay the message to it
                hop = self.relay_hop(via, connector)
            out.append(RouteCandidate(hop, space, score, site_cost + space.cost, proximity,
                                      connector.name, connector, via))
        return out, too_big

    def choose(self, addr_type: str, address: str, size: int,
               extra: Iterable[RouteCandidate] = (), avoid: Collection[str] = ()
               ) -> RouteDecision:
        candidates, too_big = self.candidates(addr_type, address, size)
        candidates.extend(extra)
        return _decision(candidates, too_big, addr_type, avoid)

    def relay_hop(self, server_name: str, connector: Connector | None = None) -> NextHop:
        """The queue for mail that another hub delivers (docs/exchange.md, "Sites and hub
        sites"). Within this site: that hub, or for a connector its source servers here
        (the queue is named for the connector). In another site: the site, or the first hub
        site on the least-cost path to it; any hub there takes the mail and routes it on.
        Remote relays name no connector, so every recipient whose path starts the same way
        travels as one copy (delayed fan-out)."""
        try:
            target = self.org.server(server_name)
        except KeyError:
            return NextHop("SmtpRelayToRemoteAdSite", server_name, "")
        if target.site.lower() == self.server.site.lower():
            if connector is not None:
                return NextHop("SmtpRelayWithinAdSite", connector.name, connector.name)
            return NextHop("SmtpRelayWithinAdSite", target.name, "")
        hub_site = self.hub_site_on_path(target.site)
        return NextHop("SmtpRelayToRemoteAdSite", hub_site or target.site, "")

    def relay_targets(self, next_hop: NextHop) -> list[TransportServer]:
        """The hubs a relay queue goes to, in order (failover): the hub it names; the
        source servers in this site of the connector it names; or the hubs of the site it
        names, then, walking back along the least-cost path, those of each site before it
        (queue at the point of failure: the mail waits at the closest reachable site).
        This server is never one of them."""
        me = self.server.name.lower()

        def others(servers: Iterable[TransportServer]) -> list[TransportServer]:
            return [s for s in servers if s.name.lower() != me]

        name = next_hop.domain
        try:
            return others([self.org.server(name)])
        except KeyError:
            pass
        connector = next((c for c in self.connectors if c.name.lower() == name.lower()), None)
        if connector is not None:
            return others(s for n in connector.source_transport_servers
                          if (s := self._server(n)) is not None
                          and s.site.lower() == self.server.site.lower())
        path = self.org.site_path(self.server.site, name)
        if path is None:
            return []
        sites = [path[-1].site, *(step.site for step in reversed(path[:-1]))] if path else []
        return others(s for site in sites for s in self._hubs_of(site))

    def _server(self, name: str) -> TransportServer | None:
        try:
            return self.org.server(name)
        except KeyError:
            return None

    def _hubs_of(self, site: str) -> list[TransportServer]:
        return sorted((s for s in self.org.servers if s.site.lower() == site.lower()),
                      key=lambda s: s.name.lower())

    def narrow_link(self, server_name: str, size: int) -> SiteHop | None:
        """The first site link on the way to ``server_name`` whose MaxMessageSize is below
        ``size``, else None."""
        try:
            site = self.org.server(server_name).site
        except KeyError:
            return None
        for step in self.org.site_path(self.server.site, site) or []:
            if step.max_message_size is not None and size > step.max_message_size:
                return step
        return None

    def hub_site_on_path(self, site: str) -> str | None:
        """The first hub site (HubSiteEnabled, with a transport server) strictly between
        this server's site and ``site`` on the least-cost path, else None."""
        path = self.org.site_path(self.server.site, site) or []
        staffed = {s.site.lower() for s in self.org.servers}
        hub_sites = {s.name.lower() for s in self.org.sites if s.hub_site_enabled}
        for step in path[:-1]:
            if step.site.lower() in hub_sites and step.site.lower() in staffed:
                return step.site
        return None

    def explain(self, addr_type: str, address: str, size: int,
                extra: Iterable[RouteCandidate] = (), avoid: Collection[str] = ()
                ) -> RouteExplanation:
        """What ``choose`` decides, with every candidate in the order of selection, the
        connectors eliminated and why, and the rule that decided between the first two."""
        eliminated: list[tuple[str, str]] = []
        candidates, too_big = self.candidates(addr_type, address, size, eliminated)
        candidates.extend(extra)
        ranked = sorted(candidates, key=RouteCandidate.sort_key)
        decision = _decision(candidates, too_big, addr_type, avoid)
        rule = _deciding_rule(ranked)
        if decision.failover_from:
            rule = (f"the failover of {decision.failover_from} (ConnectorFailover NextCost)"
                    " to the next candidate of the same address space")
        return RouteExplanation(decision, ranked, eliminated, rule)

    def _in_scope(self, connector: Connector) -> bool:
        """A scoped connector serves only servers in its source servers' AD site."""
        if not connector.is_scoped_connector:
            return True
        return any(self._site_of(s) == self.server.site for s in connector.source_transport_servers)

    def _site_of(self, server_name: str) -> str | None:
        server = self._server(server_name)
        return server.site if server is not None else None

    def _distance(self, connector: Connector) -> tuple[int, int, str]:
        """(site-link cost, proximity, server) of the nearest source server of a connector."""
        best = (1 << 30, 3, "")
        for name in connector.source_transport_servers or (self.server.name,):
            if name.lower() == self.server.name.lower():
                return (0, 0, self.server.name)
            site = self._site_of(name)
            if site is None:
                continue
            cost = self.org.site_cost(self.server.site, site)
            if cost is None:
                continue
            best = min(best, (cost, 1 if site == self.server.site else 2, name))
        return best
