"""Next-hop resolution: which hosts a queue's mail goes to, in the order to try them.

MX routing (RFC 5321 §5.1, RFC 7505), smart hosts (names or ``[IP]`` literals, in the
order configured) and the SMTP relay to another hub's receive connector. Every outcome is
data: a list of targets, or an SMTP response saying why there is none (5xx = permanent,
4xx = try later). DNS timeouts, SERVFAIL and unreachable servers are always temporary
(docs/reliability.md cases 66–67): a DNS outage must never bounce mail.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import structlog

from hubport.core.dns_resolver import resolver_for
from hubport.core.model import NextHop, SmtpResponse
from hubport.core.routing import RoutingTable

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer
    from hubport.plugins.smtp_send.connector import SendConnector

log = structlog.get_logger("hubport.send.dns")

NXDOMAIN = SmtpResponse(550, "5.4.4", "SMTPSEND.DNS.NonExistentDomain; nonexistent domain")
NULL_MX = SmtpResponse(556, "5.1.10", "SMTPSEND.DNS.NullMx; the domain accepts no mail"
                                      " (RFC 7505 null MX)")
MX_LOOP = SmtpResponse(554, "5.4.6", "SMTPSEND.DNS.MxLoopback; the MX record points back to"
                                     " this server (routing loop)")
NO_ADDRESS = SmtpResponse(550, "5.4.4", "SMTPSEND.DNS.NoAddress; no mail host of the domain"
                                        " has an address")
DNS_TEMPORARY = SmtpResponse(451, "4.4.3", "SMTPSEND.DNS.Temporary; DNS query failed, will"
                                           " retry")
DNS_DOWNGRADED = SmtpResponse(451, "4.4.4", "SMTPSEND.DNS.NonExistentDomain; treated as"
                                            " temporary (DowngradeDnsFailures)")
SMART_HOST_UNRESOLVED = SmtpResponse(451, "4.4.0", "SMTPSEND.DNS.SmartHost; no smart host"
                                                   " could be resolved")
NO_TARGET_HUB = SmtpResponse(451, "4.4.0", "SMTPSEND.Relay; the target hub is unknown")

DNS_TIMEOUT = 3.0  # per query to one server
#: once A or AAAA has addresses, how long the other family may still take
ADDRESS_GRACE = 2.0
DNS_LIFETIME = 10.0  # the whole lookup; an asyncio backstop sits above it (dnspython #1152)


@dataclass(frozen=True)
class Target:
    """One host to try: its name (for TLS and logs), its addresses, and the port."""

    host: str
    addresses: tuple[str, ...]
    port: int
    #: the name a DomainValidation certificate must carry, when not the host itself
    tls_name: str | None = None


@dataclass
class Resolution:
    targets: list[Target] = field(default_factory=list)
    failure: SmtpResponse | None = None


class _Temporary(Exception):
    """A lookup failed in a way that may work later (timeout, SERVFAIL, no server)."""


# -- resolvers ---------------------------------------------------------------------------


AddressLookup = Callable[[str], Awaitable[list[str] | None]]


def make_resolver(servers: Sequence[tuple[str, int]]) -> dns.asyncresolver.Resolver:
    """A dnspython resolver: the listed servers (ExternalDnsServers) or the system's."""
    return resolver_for(dns.asyncresolver.Resolver, servers, timeout=DNS_TIMEOUT,
                        lifetime=DNS_LIFETIME)


async def _query(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> Any:
    """An answer, None for NoAnswer; raises NXDOMAIN, or _Temporary for the rest."""
    try:
        return await asyncio.wait_for(
            resolver.resolve(name, rdtype, search=False), DNS_LIFETIME + 2.0)
    except dns.resolver.NoAnswer:
        return None
    except dns.resolver.NXDOMAIN:
        raise
    except (dns.resolver.NoNameservers, dns.exception.Timeout, TimeoutError,
            dns.resolver.YXDOMAIN, dns.resolver.NoResolverConfiguration, OSError) as exc:
        raise _Temporary(f"{rdtype} {name}: {type(exc).__name__}") from exc
    except dns.exception.DNSException as exc:
        raise _Temporary(f"{rdtype} {name}: {type(exc).__name__}") from exc


def dns_address_lookup(resolver: dns.asyncresolver.Resolver) -> AddressLookup:
    """A and AAAA through dnspython, asked together and judged together.

    Each family answers for itself: addresses, none (no records, or an NXDOMAIN for that
    type alone, as broken authoritative servers and some middleboxes answer AAAA queries),
    or a temporary failure. Addresses of either family are used whatever the other said
    (once one family has them, the other gets `ADDRESS_GRACE` seconds more). Without any
    address the name has none (None: NXDOMAIN or no records for both), unless a family
    failed temporarily: then the lookup is temporary, so a DNS outage never bounces mail.
    """

    async def lookup(name: str) -> list[str] | None:
        tasks = {asyncio.ensure_future(_family(resolver, name, rdtype)): rdtype
                 for rdtype in ("A", "AAAA")}
        got: dict[str, list[str] | _Temporary] = {}
        pending = set(tasks)
        try:
            while pending:
                have = any(isinstance(v, list) and v for v in got.values())
                done, pending = await asyncio.wait(
                    pending, timeout=ADDRESS_GRACE if have else None,
                    return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the other family is late; what we have is enough
                    log.info("address lookup: one family did not answer in time",
                             name=name, rdtype=[tasks[t] for t in pending])
                    break
                for task in done:
                    got[tasks[task]] = task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            answer = got.get(rdtype)
            if isinstance(answer, list):
                found.extend(answer)
        if found:
            for rdtype, v in got.items():
                if isinstance(v, _Temporary):
                    log.info("address lookup: one family failed; the other's addresses are"
                             " used", name=name, rdtype=rdtype, error=str(v))
            return found
        temporary = next((v for v in got.values() if isinstance(v, _Temporary)), None)
        if temporary is not None:
            raise temporary
        return None

    return lookup


async def _family(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
                  ) -> list[str] | _Temporary:
    """The addresses of one family ([] for none or NXDOMAIN), or the temporary failure."""
    try:
        answer = await _query(resolver, name, rdtype)
    except dns.resolver.NXDOMAIN:
        return []
    except _Temporary as exc:
        return exc
    return [r.address for r in answer] if answer is not None else []


async def system_address_lookup(name: str) -> list[str] | None:
    """getaddrinfo: the system's view (hosts file included), for hosts not routed by MX."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
            return None
        raise _Temporary(f"{name}: {exc}") from exc
    out: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in out:
            out.append(address)
    return out or None


# -- MX routing --------------------------------------------------------------------------


def order_mx(records: Iterable[tuple[int, str]], rng: random.Random | None = None
             ) -> list[tuple[int, str]]:
    """By preference, shuffled among equal preferences (RFC 5321 §5.1)."""
    rng = rng or random.Random()
    by_pref: dict[int, list[str]] = {}
    for pref, host in records:
        by_pref.setdefault(pref, []).append(host)
    out: list[tuple[int, str]] = []
    for pref in sorted(by_pref):
        hosts = by_pref[pref]
        rng.shuffle(hosts)
        out.extend((pref, h) for h in hosts)
    return out


@dataclass(frozen=True)
class LocalIdentity:
    """What counts as "this server" for loop detection: its names and listening endpoints."""

    names: frozenset[str]
    endpoints: frozenset[tuple[str, int]]  # (ip, port); ip "0.0.0.0"/"::" = any local address
    local_addresses: frozenset[str] = frozenset()

    def is_self(self, host: str, addresses: Iterable[str], port: int) -> bool:
        if host.lower().rstrip(".") in self.names:
            return True
        for address in addresses:
            if (address, port) in self.endpoints:
                return True
            wildcard = ("::", port) in self.endpoints or ("0.0.0.0", port) in self.endpoints
            if wildcard and (address in self.local_addresses
                             or ipaddress.ip_address(address).is_loopback):
                return True
        return False


def local_identity(org: Organization, server: TransportServer, ehlo: str | None
                   ) -> LocalIdentity:
    names = {server.fqdn.lower(), *([ehlo.lower()] if ehlo else [])}
    endpoints: set[tuple[str, int]] = set()
    for rc in receive_connectors_of(org, server.name):
        for ip, port in getattr(rc, "bindings", ()):
            endpoints.add((str(ip), int(port)))
    return LocalIdentity(frozenset(names), frozenset(endpoints), _host_addresses())


@functools.lru_cache(maxsize=1)
def _host_addresses() -> frozenset[str]:
    """This host's own addresses, looked up once (a blocking call: never per delivery)."""
    local: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            local.add(str(info[4][0]))
    except OSError:
        pass
    return frozenset(local)


async def resolve_mx(domain: str, resolver: dns.asyncresolver.Resolver, port: int,
                     me: LocalIdentity, *, downgrade: bool = False,
                     rng: random.Random | None = None) -> Resolution:
    """Targets for a recipient domain by its MX records (or its own address)."""
    lookup = dns_address_lookup(resolver)
    known: dict[str, list[str]] = {}  # addresses already looked up
    try:
        answer = await _query(resolver, domain, "MX")
    except dns.resolver.NXDOMAIN:
        # Nothing is there (RFC 8020), unless the server answers NXDOMAIN for a type it
        # does not serve while the name has addresses: those decide, as an implicit MX.
        try:
            found = await lookup(domain)
        except _Temporary as exc:
            log.warning("MX lookup said NXDOMAIN, the address lookup failed; deferred",
                        domain=domain, error=str(exc))
            return Resolution(failure=DNS_TEMPORARY)
        if not found:
            return Resolution(failure=DNS_DOWNGRADED if downgrade else NXDOMAIN)
        log.info("MX lookup said NXDOMAIN but the domain has addresses; using them",
                 domain=domain)
        known[domain] = found
        answer = None
    except _Temporary as exc:
        log.warning("MX lookup failed; deferred", domain=domain, error=str(exc))
        return Resolution(failure=DNS_TEMPORARY)
    if answer is None:  # no MX: the domain itself is the mail host (implicit MX)
        records = [(0, domain)]
    else:
        records = [(int(r.preference), r.exchange.to_text(omit_final_dot=True))
                   for r in answer]
        real = [(p, h) for p, h in records if h not in ("", ".")]
        if not real:
            return Resolution(failure=NULL_MX)
        records = real  # a null MX among others is a misconfiguration: ignore it
    targets: list[tuple[int, Target]] = []
    temporary = False
    loop_pref: int | None = None
    for pref, host in order_mx(records, rng):
        try:
            addresses = known.get(host) or await lookup(host)
        except _Temporary:
            temporary = True
            continue
        if not addresses:
            continue
        if me.is_self(host, addresses, port):
            loop_pref = pref if loop_pref is None else min(loop_pref, pref)
            continue
        targets.append((pref, Target(host, tuple(addresses), port)))
    if loop_pref is not None:  # RFC 5321 §5.1: only hosts more preferred than ourselves
        targets = [(p, t) for p, t in targets if p < loop_pref]
        if not targets:
            return Resolution(failure=MX_LOOP)
    if not targets:
        return Resolution(failure=DNS_TEMPORARY if temporary or downgrade else NO_ADDRESS)
    return Resolution([t for _, t in targets])


# -- smart hosts and hub relays ----------------------------------------------------------


async def resolve_smart_hosts(connector: SendConnector, lookup: AddressLookup
                              ) -> Resolution:
    """Every smart host, in the configured order; the ones that do not resolve are skipped."""
    targets: list[Target] = []
    for host in connector.smart_hosts:
        if host.literal:
            targets.append(Target(host.host, (host.host,), connector.port))
            continue
        try:
            addresses = await lookup(host.host)
        except _Temporary:
            addresses = None
        if addresses:
            targets.append(Target(host.host, tuple(addresses), connector.port))
        else:
            log.warning("smart host does not resolve", connector=connector.name,
                        smart_host=host.host)
    return Resolution(targets) if targets else Resolution(failure=SMART_HOST_UNRESOLVED)


def receive_connectors_of(org: Organization, server_name: str) -> list[Any]:
    """The enabled receive connectors of a server (whatever type provides them)."""
    return [rc for rc in org.connectors_of("receive_connector")
            if str(getattr(rc, "server", "")).lower() == server_name.lower()
            and getattr(rc, "enabled", True)]


async def resolve_hub(org: Organization, server: TransportServer, next_hop: NextHop,
                      lookup: AddressLookup) -> Resolution:
    """The hubs a relay queue goes to, in failover order (``RoutingTable.relay_targets``:
    the hub, the connector's source servers here, or a site's hubs and then those of the
    sites before it on the path). Each target is a hub's receive connector that grants
    ExchangeServers (else its FQDN on port 25), and carries the hub's FQDN: its certificate
    must name it. A target that is this server's own listening address is a loop (5.3.5)."""
    hubs = RoutingTable(org, server).relay_targets(next_hop)
    if not hubs:
        return Resolution(failure=NO_TARGET_HUB)
    mine = {(str(ip), int(port)) for rc in receive_connectors_of(org, server.name)
            for ip, port in getattr(rc, "bindings", ())}
    targets: list[Target] = []
    unresolved: list[str] = []
    looped: list[str] = []
    for hub in hubs:
        target = await _hub_target(org, hub, lookup)
        if target is None:
            unresolved.append(hub.fqdn)
        elif any((address, target.port) in mine for address in target.addresses):
            looped.append(hub.name)
        else:
            targets.append(target)
    if targets:
        return Resolution(targets)
    if looped:
        return Resolution(failure=SmtpResponse(
            554, "5.3.5", f"ROUTING.Loop; the receive connector of {', '.join(looped)} is"
                          f" this server's own ({server.name}): the organization's"
                          " configuration sends the mail back here"))
    return Resolution(failure=SmtpResponse(
        451, "4.4.0", f"SMTPSEND.Relay; the target hub {', '.join(unresolved)} does not"
                      " resolve"))


def takes_hubs(rc: Any) -> bool:
    """A receive connector other hubs relay to: ExchangeServers rights, proven by the
    ExchangeServer mechanism (it presents the internal transport certificate)."""
    groups = {str(g).lower() for g in getattr(rc, "permission_groups", ())}
    return "exchangeservers" in groups and "ExchangeServer" in getattr(rc, "auth_mechanism", ())


async def _hub_target(org: Organization, hub: Any, lookup: AddressLookup) -> Target | None:
    port = 25
    address: str | None = None
    linked = {str(getattr(c, "linked_receive_name", "") or "").lower()
              for c in org.connectors_of("send_connector")}
    # never a linked connector (its mail goes to a scanner); the hubs' own connector first
    connectors = [c for c in receive_connectors_of(org, hub.name)
                  if c.name.lower() not in linked]
    for rc in sorted(connectors, key=lambda c: not takes_hubs(c)):
        groups = {str(g).lower() for g in getattr(rc, "permission_groups", ())}
        bindings = tuple(getattr(rc, "bindings", ()))
        if "exchangeservers" in groups and bindings:
            ip, port = str(bindings[0][0]), int(bindings[0][1])
            if not ipaddress.ip_address(ip).is_unspecified:
                address = ip
            break
    if address is not None:
        return Target(hub.fqdn, (address,), port, tls_name=hub.fqdn)
    try:
        addresses = await lookup(hub.fqdn)
    except _Temporary:
        addresses = None
    if not addresses:
        return None
    return Target(hub.fqdn, tuple(addresses), port, tls_name=hub.fqdn)
