"""The deliver hook of Send connectors and of the relay to other hubs.

One call gets up to 250 items of one next-hop queue. They are split into routes (one per
recipient domain for DNS routing, one for smart hosts or a hub relay), each route is
resolved to targets, and its messages are spread over up to MaxPerDomainOutboundConnections
connections per route and MaxOutboundConnections overall. Both limits are the server's:
a semaphore bounds this worker and the server's shared counters (core/counters.py) bound
all workers together (``Limits``). A connection carries up to SmtpMaxMessagesPerConnection
messages.

Results: per recipient from the remote replies; a route that cannot be reached at all (no
connection, a 4xx greeting or hello, a dropped or timed-out session before MAIL) is a
connection-level failure. When every item failed that way, the call returns ``DeferQueue``:
the queue goes to Retry and its messages wait for its next attempt together (the pipeline
keeps the queue's retry ladder). Otherwise those items are deferred with the ladder's delay
computed here. A route's first connection goes alone and the others follow once it is up,
so a next hop that is down sees one connection per attempt.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections import deque
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from hubport.core.api import (
    DEFERRED,
    DeferQueue,
    DeliveryContext,
    ItemResult,
    MailItem,
    MessageBody,
    RecipientResult,
)
from hubport.core.counters import SharedCounters
from hubport.core.delivery import LOCAL_ERROR
from hubport.core.failpoints import failpoint
from hubport.core.internal_tls import InternalTls, internal_tls
from hubport.core.model import NextHop, QueuedRecipient, SmtpResponse
from hubport.core.retry import retry_delay
from hubport.core.routing import RELAY_TYPES, routed_by_line
from hubport.core.tls import TlsConfigError
from hubport.core.workers import WorkerSlot
from hubport.plugins.smtp_send import content, linked, resolver
from hubport.plugins.smtp_send.connector import SendConnector
from hubport.plugins.smtp_send.policy import (
    AuthPolicy,
    TlsPolicy,
    auth_policy,
    intra_org_tls,
    tls_policy,
)
from hubport.plugins.smtp_send.protolog import open_session
from hubport.plugins.smtp_send.resolver import Resolution, Target
from hubport.plugins.smtp_send.routing_group import RoutingGroupConnector, legacy_targets
from hubport.plugins.smtp_send.session import SendOutcome, SessionFailure, SmtpSession

if TYPE_CHECKING:
    from hubport.core.config import TransportServer

log = structlog.get_logger("hubport.send")

INTRA_ORG_MESSAGES_PER_CONNECTION = 20
INTRA_ORG_TIMEOUT = 600.0


@dataclass(frozen=True)
class Profile:
    """How to talk to the next hops of one queue (a Send connector or the intra-org one)."""

    name: str
    usage: str | None  # None: intra-organization (no header firewall)
    ehlo: str
    force_helo: bool
    per_connection: int
    timeout: float
    auth: AuthPolicy | None
    verbose: bool
    downgrade_auth: bool = False
    downgrade_dns: bool = False


@dataclass
class Unit:
    """One message's recipients for one route: what one transaction sends."""

    index: int  # of the item in the call
    item: MailItem
    recipients: list[QueuedRecipient]
    #: the message after the header firewall: bytes when it is small (the path it always
    #: took), the body handle when it is spooled (streamed, never read whole)
    data: bytes | MessageBody


@dataclass
class Route:
    key: str
    tls: TlsPolicy
    units: list[Unit] = field(default_factory=list)
    resolution: Resolution | None = None


#: how often a connection waiting for a server-wide slot looks again
SERVER_WIDE_POLL = 0.1


class _Unlimited:
    async def acquire(self) -> None:
        return None

    def release(self) -> None:
        return None


class _Slot:
    """One connection's place under one limit: this worker's semaphore, then the server's
    count. Entering waits until both have room; leaving (also on an error or a
    cancellation) gives both back. Made per use, so it gives back to the counters it took
    from even if ``Limits.bind`` is called meanwhile."""

    def __init__(self, local: Any, counters: SharedCounters, key: str,
                 size: int | None) -> None:
        self._local = local
        self._counters = counters
        self._key = key
        self._size = size

    async def __aenter__(self) -> None:
        await self._local.acquire()
        try:
            # the other workers' connections count too: wait for one of them to end
            # (counted even without a limit, so a limit set by a reload sees them)
            while not self._counters.try_take(self._key, self._size):
                await asyncio.sleep(SERVER_WIDE_POLL)
        except BaseException:
            self._local.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        try:
            self._counters.release(self._key)
        finally:
            self._local.release()


class Limits:
    """The server's connection limits as this worker sees them (one set per event loop).

    A semaphore per limit bounds this worker's connections; ``counters`` (the Send
    service binds the runtime's, see ``bind``) bounds the server's. With one worker the
    counters never hold a connection the semaphore let through, so the behaviour is the
    semaphores'; with several, a worker whose semaphore has room waits, polling, until
    the server-wide total is below the limit. The check-then-take race between workers
    can overshoot a limit by at most workers - 1 (``SharedCounters.try_take``).
    """

    OVERALL_KEY = "send"

    def __init__(self, counters: SharedCounters | None = None) -> None:
        self.counters = (counters if counters is not None
                         else SharedCounters.attach(None, WorkerSlot()))
        self._global: tuple[int | None, Any] = (None, _Unlimited())
        self._per_hop: dict[str, tuple[int | None, Any]] = {}

    def bind(self, counters: SharedCounters) -> None:
        """Count in ``counters`` from now on (the server's, shared by its workers)."""
        self.counters = counters

    def overall(self, size: int | None) -> _Slot:
        if self._global[0] != size:
            self._global = (size, _Unlimited() if size is None else asyncio.Semaphore(size))
        return _Slot(self._global[1], self.counters, self.OVERALL_KEY, size)

    def per_hop(self, key: str, size: int | None) -> _Slot:
        held = self._per_hop.get(key)
        if held is None or held[0] != size:
            held = self._per_hop[key] = (
                size, _Unlimited() if size is None else asyncio.Semaphore(size))
        return _Slot(held[1], self.counters, f"send|{key}", size)


_LIMITS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Limits] = (
    weakref.WeakKeyDictionary())


def limits() -> Limits:
    loop = asyncio.get_running_loop()
    found = _LIMITS.get(loop)
    if found is None:
        found = _LIMITS[loop] = Limits()
    return found


# -- the hook body -----------------------------------------------------------------------


async def deliver_items(next_hop: NextHop, connector: Any, items: Sequence[MailItem],
                        context: DeliveryContext) -> list[ItemResult] | DeferQueue:
    server = context.server
    relay = next_hop.delivery_type in RELAY_TYPES
    if isinstance(connector, RoutingGroupConnector):
        profile = _legacy_profile(connector, server)
    else:
        profile = _intra_org_profile(server) if relay else _profile(connector, server)
    routes = await _routes(next_hop, connector, items, context, relay, profile)
    per_item: list[dict[int, RecipientResult]] = [{} for _ in items]
    details: list[str] = ["" for _ in items]
    peers: list[Any] = [None for _ in items]  # the SendOutcome naming each item's connection
    connection_level: dict[int, SmtpResponse] = {}  # recipient id -> why
    for route, outcome in zip(routes, await asyncio.gather(
            *(_run_route(r, profile, server, next_hop) for r in routes),
            return_exceptions=True)):
        if isinstance(outcome, BaseException):
            log.error("send route failed; its messages are deferred", route=route.key,
                      error=repr(outcome))
            outcome = _RouteOutcome(failure=LOCAL_ERROR)
        for unit in route.units:
            done = outcome.results.get(id(unit))
            if done is None:
                failure = outcome.failure or LOCAL_ERROR
                for r in unit.recipients:
                    if failure.is_permanent:
                        per_item[unit.index][r.id] = RecipientResult.failed(failure)
                    else:
                        connection_level[r.id] = failure
                continue
            per_item[unit.index].update(done.results)
            if done.detail and not details[unit.index]:
                details[unit.index] = done.detail
            if done.remote_ip and peers[unit.index] is None:
                peers[unit.index] = done
    everyone = [r.id for item in items for r in item.recipients]
    if everyone and all(rid in connection_level for rid in everyone):
        first = connection_level[everyone[0]]
        return DeferQueue(first)
    results: list[ItemResult] = []
    for index, item in enumerate(items):
        got = per_item[index]
        for r in item.recipients:
            if r.id in connection_level:
                delay = retry_delay(server, r.attempts + 1, queue_level=True)
                got[r.id] = RecipientResult.deferred(connection_level[r.id], delay)
            got.setdefault(r.id, RecipientResult(DEFERRED, LOCAL_ERROR))
        result = ItemResult(got, details[index])
        if peers[index] is not None:
            peer = peers[index]
            result.remote_host, result.remote_ip = peer.remote_host, peer.remote_ip
            result.local_ip = peer.local_ip
        results.append(result)
    return results


# -- routes ------------------------------------------------------------------------------


async def _routes(next_hop: NextHop, connector: Any, items: Sequence[MailItem],
                  context: DeliveryContext, relay: bool, profile: Profile) -> list[Route]:
    server = context.server
    if isinstance(connector, RoutingGroupConnector):
        return [_legacy_route(next_hop, connector, items, context,
                              [await _outgoing(item.body, profile.usage) for item in items])]
    link = connector.name if isinstance(connector, SendConnector) and \
        connector.linked_receive_connector else None
    datas = [await _outgoing(item.body, profile.usage) for item in items]
    if link:  # after the firewall, which strips stamps of earlier rounds
        datas = [linked.stamp(data, link) for data in datas]
    elif not relay and context.stamp_outbound is not None:  # leaving the organization
        # the batch at once: the plugins sign in threads, side by side
        datas = list(await asyncio.gather(*(_stamped(context, item, connector, data)
                                             for item, data in zip(items, datas))))
    if relay:  # who routed it, so two hubs that disagree never bounce it to and fro
        line = routed_by_line(server.name, context.organization.version)
        datas = [content.prepend(data, line) for data in datas]
    external = bool(isinstance(connector, SendConnector)
                    and connector.use_external_dns_servers_enabled
                    and server.external_dns_servers)
    dns = resolver.make_resolver(server.external_dns_servers if external else ())
    lookup = resolver.dns_address_lookup(dns) if external else resolver.system_address_lookup
    internal: InternalTls | None = None
    failure: SmtpResponse | None = None
    if relay or getattr(connector, "smart_host_auth_mechanism", None) == "ExchangeServer":
        try:
            internal = await asyncio.to_thread(internal_tls, context.organization, server)
        except (TlsConfigError, OSError) as exc:
            log.error("no internal transport certificate", server=server.name, error=str(exc))
            failure = SmtpResponse(451, "4.7.5", f"SMTPSEND.TLS.Certificate; {exc}")
    if relay or connector.smart_hosts:
        if relay:
            tls = intra_org_tls(internal) if internal is not None else TlsPolicy()
        else:
            tls = tls_policy(connector, server, None, internal)
        one = Route(next_hop.domain, tls, [
            Unit(i, item, list(item.recipients), datas[i]) for i, item in enumerate(items)])
        if failure is not None:
            one.resolution = Resolution(failure=failure)
        elif relay:
            one.resolution = await resolver.resolve_hub(context.organization, server,
                                                        next_hop, lookup)
        else:
            one.resolution = await resolver.resolve_smart_hosts(connector, lookup)
        return [one]
    by_domain: dict[str, Route] = {}
    for i, item in enumerate(items):
        groups: dict[str, list[QueuedRecipient]] = {}
        for r in item.recipients:
            groups.setdefault(r.address.rpartition("@")[2].lower(), []).append(r)
        for domain, recipients in groups.items():
            route = by_domain.get(domain)
            if route is None:
                route = by_domain[domain] = Route(
                    domain, tls_policy(connector, server, domain, internal))
            route.units.append(Unit(i, item, recipients, datas[i]))
    me = resolver.local_identity(context.organization, server, profile.ehlo)
    resolutions = await asyncio.gather(*(
        resolver.resolve_mx(domain, dns, connector.port, me, downgrade=profile.downgrade_dns)
        for domain in by_domain))
    for route, resolution in zip(by_domain.values(), resolutions):
        route.resolution = resolution
    return list(by_domain.values())


async def _stamped(context: DeliveryContext, item: MailItem, connector: SendConnector,
                   data: bytes | MessageBody) -> bytes | MessageBody:
    """The message with the fields the ``stamp_outbound`` hook adds (DKIM, ARC) on top:
    made over the final content, after every change above."""
    assert context.stamp_outbound is not None
    fields = await context.stamp_outbound(item, connector, data)
    if fields and isinstance(data, bytes) and not data.isascii():
        # a peer without 8BITMIME would get it converted, after the signature: convert it
        # now and sign that (RFC 6376 §5.3), so the signature holds on every path
        downgraded = await asyncio.to_thread(content.downgrade_to_7bit, data)
        if downgraded is not None and downgraded != data:
            data = downgraded
            fields = await context.stamp_outbound(item, connector, data)
    for added in reversed(fields):
        data = content.prepend(data, added)
    return data


async def _outgoing(body: MessageBody, usage: str | None) -> bytes | MessageBody:
    """The message as it leaves (header firewall applied): a small one as bytes, as it
    always was; a spooled one stays a handle, only its header section read (in a thread)."""
    if not body.spooled:
        return content.apply_firewall(body.prefix, usage)
    return await asyncio.to_thread(content.apply_firewall_body, body, usage)


def _profile(connector: SendConnector, server: TransportServer) -> Profile:
    return Profile(
        name=connector.name, usage=connector.usage,
        ehlo=connector.fqdn or server.fqdn, force_helo=connector.force_helo,
        per_connection=connector.smtp_max_messages_per_connection,
        timeout=connector.connection_inactivity_timeout,
        auth=auth_policy(connector) if connector.smart_hosts else None,
        verbose=connector.protocol_logging_level == "Verbose",
        downgrade_auth="DowngradeAuthFailures" in connector.error_policies,
        downgrade_dns="DowngradeDnsFailures" in connector.error_policies)


def _legacy_route(next_hop: NextHop, connector: RoutingGroupConnector,
                  items: Sequence[MailItem], context: DeliveryContext,
                  datas: list[bytes | MessageBody]) -> Route:
    """One route to the legacy routing group: its target servers in the connector's order
    (failover), STARTTLS when offered."""
    route = Route(next_hop.domain, TlsPolicy(), [
        Unit(i, item, list(item.recipients), datas[i]) for i, item in enumerate(items)])
    targets = [Target(s.name, (s.address,), s.port)
               for s in legacy_targets(context.organization, connector)]
    route.resolution = Resolution(targets) if targets else Resolution(failure=SmtpResponse(
        451, "4.4.0", f"SMTPSEND.RoutingGroup; no target server of {connector.name} is"
                      " declared in its routing group"))
    return route


def _legacy_profile(connector: RoutingGroupConnector, server: TransportServer) -> Profile:
    """A legacy routing group is part of the organization: no header firewall."""
    return replace(_intra_org_profile(server), name=connector.name)


def _intra_org_profile(server: TransportServer) -> Profile:
    level = getattr(server, "intra_org_connector_protocol_logging_level", "None")
    per_connection = getattr(server, "intra_org_connector_smtp_max_messages_per_connection",
                             INTRA_ORG_MESSAGES_PER_CONNECTION)
    return Profile(name="Intra-Organization SMTP Send Connector", usage=None,
                   ehlo=server.fqdn, force_helo=False,
                   per_connection=per_connection or INTRA_ORG_MESSAGES_PER_CONNECTION,
                   timeout=INTRA_ORG_TIMEOUT, auth=None, verbose=level == "Verbose")


# -- running one route -------------------------------------------------------------------


@dataclass
class _RouteOutcome:
    results: dict[int, Any] = field(default_factory=dict)  # id(unit) -> SendOutcome
    failure: SmtpResponse | None = None  # for the units without a result
    connected: bool = False  # some connection of the route got ready for MAIL


async def _run_route(route: Route, profile: Profile, server: TransportServer,
                     next_hop: NextHop) -> _RouteOutcome:
    outcome = _RouteOutcome()
    assert route.resolution is not None
    if route.resolution.failure is not None:
        outcome.failure = route.resolution.failure
        log.info("next hop not resolved", route=route.key, response=str(outcome.failure))
        return outcome
    pending = deque(route.units)
    lim = limits()
    hop_key = f"{profile.name}|{route.key}".lower()
    wanted = math.ceil(len(pending) / profile.per_connection)
    per_domain = server.max_per_domain_outbound_connections
    workers = min(wanted, per_domain) if per_domain else wanted
    # the first connection goes alone; the others follow once it is up (or give up when it
    # failed), so a next hop that is down sees one connection per queue retry, not one per
    # worker
    first_tried = asyncio.Event()

    async def worker(first: bool) -> None:
        try:
            if not first:
                await first_tried.wait()
            await connections()
        finally:
            first_tried.set()

    async def connections() -> None:
        while pending and outcome.failure is None:
            async with AsyncExitStack() as stack:
                await stack.enter_async_context(
                    lim.per_hop(hop_key, server.max_per_domain_outbound_connections))
                await stack.enter_async_context(lim.overall(server.max_outbound_connections))
                if not pending or outcome.failure is not None:
                    return
                try:
                    session = await _open_any(route, profile, server)
                except SessionFailure as exc:
                    if outcome.connected:
                        # another connection of the route works: the messages this one
                        # did not send are deferred, not bounced
                        log.warning("an extra connection to the next hop failed",
                                    route=route.key, response=str(exc.response))
                        return
                    outcome.failure = _failure_response(exc, profile)
                    log.warning("no connection to the next hop", route=route.key,
                                connector=next_hop.connector, response=str(exc.response))
                    return
                outcome.connected = True
                first_tried.set()
                try:
                    sent = 0
                    while pending and sent < profile.per_connection and session.alive:
                        unit = pending.popleft()
                        outcome.results[id(unit)] = await _send_unit(session, unit, route)
                        sent += 1
                finally:
                    await session.quit()

    try:  # a worker that fails stops its siblings: nothing is sent after the hook returns
        async with asyncio.TaskGroup() as group:
            for n in range(max(1, workers)):
                group.create_task(worker(n == 0))
    except Exception:  # the units already sent keep their results; the rest are deferred
        log.exception("a send worker failed; its route's unsent messages are deferred",
                      route=route.key)
    return outcome


async def _send_unit(session: SmtpSession, unit: Any, route: Route) -> SendOutcome:
    """One message on an open connection; an unexpected fault defers it alone."""
    try:
        outcome = await session.send(unit.item.message.mail_from, unit.recipients, unit.data)
    except Exception:
        log.exception("sending a message failed; it is deferred", route=route.key)
        session.close()
        return SendOutcome(results={r.id: RecipientResult(DEFERRED, LOCAL_ERROR)
                                    for r in unit.recipients})
    # crash tests: the next hop has the message, the queue does not know it yet
    failpoint("after_send_before_commit")
    return outcome


async def _open_any(route: Route, profile: Profile, server: TransportServer) -> SmtpSession:
    """The first target (and address) that gets to MAIL-ready; failover in order."""
    assert route.resolution is not None
    last: SessionFailure | None = None
    for target in route.resolution.targets:
        for address in target.addresses:
            session = _session(target, address, route, profile, server)
            try:
                await session.open()
                return session
            except SessionFailure as exc:
                log.info("next hop host failed", host=target.host, address=address,
                         stage=exc.stage, response=str(exc.response))
                last = exc
    raise last or SessionFailure(LOCAL_ERROR, "connect")


def _session(target: Target, address: str, route: Route, profile: Profile,
             server: TransportServer) -> SmtpSession:
    tls = route.tls
    if target.tls_name and tls.expected_name is None and tls.verify:
        tls = replace(tls, expected_name=target.tls_name)
    plog = open_session(server, profile.name, profile.verbose)
    return SmtpSession(target, address, ehlo_name=profile.ehlo, force_helo=profile.force_helo,
                       tls=tls, auth=profile.auth, timeout=profile.timeout, plog=plog)


def _failure_response(exc: SessionFailure, profile: Profile) -> SmtpResponse:
    """What a route that could not be opened means for its messages (ErrorPolicies)."""
    response = exc.response
    if not response.is_permanent:
        return response
    if exc.stage == "auth" and profile.downgrade_auth:
        return SmtpResponse(451, "4.7.3", f"{response.text} (DowngradeAuthFailures)")
    if exc.stage in ("auth", "greeting", "hello"):
        return response
    return SmtpResponse(451, "4.4.0", response.text)


# -- probes (ConnectorFailover NextCost) -------------------------------------------------


async def probe_next_hop(next_hop: NextHop, connector: SendConnector,
                         context: DeliveryContext) -> bool:
    """Whether the connector's next hop takes mail again: a session to one of its smart
    hosts (or MX hosts for ``next_hop.domain``) gets to MAIL-ready (connect, EHLO, TLS and
    authentication as for mail), then QUIT. Nothing is sent."""
    server = context.server
    profile = _profile(connector, server)
    if connector.smart_hosts:
        [route] = await _routes(next_hop, connector, [], context, False, profile)
    else:
        route = Route(next_hop.domain, tls_policy(connector, server, next_hop.domain, None))
        dns = resolver.make_resolver(
            server.external_dns_servers if connector.use_external_dns_servers_enabled else ())
        me = resolver.local_identity(context.organization, server, profile.ehlo)
        route.resolution = await resolver.resolve_mx(next_hop.domain, dns, connector.port, me,
                                                     downgrade=profile.downgrade_dns)
    if route.resolution is None or not route.resolution.targets:
        return False
    try:
        session = await _open_any(route, profile, server)
    except SessionFailure:
        return False
    try:
        await session.quit()
    finally:
        session.close()
    return True
