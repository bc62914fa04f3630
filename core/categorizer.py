"""The categorizer: resolve recipients, expand groups, choose each recipient's next hop.

Accepted-domain logic (docs/exchange.md, "Accepted domains and recipients"): a recipient
that resolves to a mailbox is delivered locally and never uses a connector; an unknown
recipient in an Authoritative domain fails with ``5.1.1``; in an InternalRelay or
ExternalRelay domain, or outside the accepted domains, it is routed by address space. A
non-primary address is rewritten to the primary one and the original kept as ORCPT. Groups
expand without loops or duplicates.

Two passes, in the order of docs/hooks.md: every recipient is resolved first (the
``categorize`` hook, the directory, group expansion), then ``on_resolved`` fires, then each
recipient that needs a connector is routed (the ``route`` hook, address spaces). The
categorizer computes decisions only; the pipeline commits them in one transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from hubport.core.model import (
    EnvelopeRecipient,
    NextHop,
    Notify,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
    SmtpResponse,
)
from hubport.core.routing import (
    RouteDecision,
    RouteExplanation,
    RoutingTable,
    disagreement,
    previous_hub,
)
from hubport.core.routing_groups import HOME_TYPE

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer
    from hubport.core.directory import DirectoryEntry, RecipientDirectory
    from hubport.core.hooks import Hooks

RECIPIENT_NOT_FOUND = SmtpResponse(550, "5.1.1", "RESOLVER.ADR.RecipNotFound; not found")
RECIPIENT_LIMIT = SmtpResponse(550, "5.5.3", "RESOLVER.ADR.RecipLimit; too many recipients")
REDIRECT_LOOP = SmtpResponse(550, "5.4.6", "RESOLVER.FWD.Loop; recipient redirection loop")


# -- results a `categorize` hook implementation may return -------------------------------


@dataclass(frozen=True, slots=True)
class Redirect:
    """Replace the recipient by another address (tracked as REDIRECT)."""

    address: str


@dataclass(frozen=True, slots=True)
class Expand:
    """Replace the recipient by several addresses (tracked as EXPAND)."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Reject:
    """Fail the recipient with this 5xx response; an NDR follows."""

    response: SmtpResponse


@dataclass(frozen=True, slots=True)
class RouteTo:
    """Send the recipient to a fixed next hop (Exchange's SetRoutingOverride)."""

    next_hop: NextHop


#: what a ``categorize`` implementation returns to decide (``None``: no opinion)
CategorizeResult = Redirect | Expand | Reject | RouteTo


# -- decisions ---------------------------------------------------------------------------

ROUTE = "route"
#: resolved to an address that needs a connector, next hop not chosen yet: only seen by
#: ``on_resolved``; routing turns it into ROUTE, UNREACHABLE or FAIL
RESOLVED = "resolved"
UNREACHABLE = "unreachable"
FAIL = "fail"
EXPANDED = "expanded"


@dataclass(slots=True)
class Decision:
    """What happens to one recipient (an existing row, or a new member of a group)."""

    kind: str
    address: str
    recipient: QueuedRecipient | None = None  # None for recipients added by expansion
    envelope: EnvelopeRecipient | None = None  # for added recipients
    next_hop: NextHop | None = None
    response: SmtpResponse | None = None
    orcpt: str | None = None
    source: str = "ROUTING"  # the tracking Source of a failure
    related: str = ""  # the address it was resolved, redirected or expanded from
    event: str = ""  # RESOLVE, REDIRECT or EXPAND when the address changed


@dataclass(slots=True)
class Categorized:
    message: QueuedMessage
    decisions: list[Decision] = field(default_factory=list)
    #: mailbox primary address -> the envelope row naming it directly: that row, with its
    #: own NOTIFY and ORCPT, is the one delivered, even when a group reaches it first
    owners: dict[str, int] = field(default_factory=dict)
    #: RESOLVED decisions waiting for the routing pass: (decision, the recipient the
    #: ``route`` hook sees, address type, address to route)
    unrouted: list[tuple[Decision, QueuedRecipient, str, str]] = field(default_factory=list)
    #: (server, organization version) of the hub that relayed the message here, if any
    previous: tuple[str, int] | None = None

    @property
    def next_hops(self) -> list[NextHop]:
        seen: dict[tuple[str, str, str], NextHop] = {}
        for d in self.decisions:
            if d.kind == ROUTE and d.next_hop is not None:
                seen.setdefault(d.next_hop.key, d.next_hop)
        return list(seen.values())


def mailbox_next_hop(server_name: str) -> NextHop:
    """The mailbox delivery queue of a server (2010: one MapiDelivery queue per database)."""
    return NextHop("MapiDelivery", f"Mailbox Database {server_name}", "")


class Categorizer:
    def __init__(self, org: Organization, server: TransportServer,
                 directory: RecipientDirectory, hooks: Hooks) -> None:
        self.org = org
        self.server = server
        self.directory = directory
        self.routing = RoutingTable(org, server)
        self.hooks = hooks
        #: the connectors routing passes by (failed over: core/connector_failover.py)
        self.avoided: Callable[[], Collection[str]] = frozenset
        #: set by test-route: (routed address, address type, explanation) of each routing
        self.explanations: list[tuple[str, str, RouteExplanation]] | None = None

    async def categorize(self, message: QueuedMessage) -> Categorized:
        result = Categorized(message)
        if message.source == "SMTP" and len(self.org.servers) > 1:
            result.previous = previous_hub(message.body.prefix)
        pending = [r for r in message.recipients if r.status.value == "Submitted"]
        limit = self.org.transport_config.max_recipient_envelope_limit
        # the limit is on the envelope: checked on the first pass only, when every row is an
        # envelope recipient (a resubmission also holds rows that group expansion added)
        first_pass = len(pending) == len(message.recipients)
        if limit is not None and first_pass and len(pending) > limit:
            for r in pending:
                result.decisions.append(Decision(FAIL, r.address, r, response=RECIPIENT_LIMIT,
                                                 source="RESOLVER"))
            await self.hooks.notify("on_resolved", message=message, recipients=result.decisions)
            return result
        # addresses already settled for this message: never deliver twice to one of them
        seen = {r.address.lower() for r in message.recipients if r.status.value != "Submitted"}
        for r in pending:
            entry = self.directory.lookup(r.address)
            if entry is not None and entry.kind == "mailbox":
                result.owners.setdefault(entry.primary.lower(), r.id)
        for r in pending:
            await self._resolve(message, r, r.address, r.orcpt, r.notify, result, seen, set())
        await self.hooks.notify("on_resolved", message=message, recipients=result.decisions)
        for decision, recipient, addr_type, route_address in result.unrouted:
            chosen = await self._route(message, recipient, addr_type, route_address)
            held = chosen.candidate is not None and chosen.candidate.proximity > 0 and \
                self._disagreement(result, chosen.candidate.source_server)
            if chosen.failure is not None:
                decision.kind, decision.response = FAIL, chosen.failure
            elif chosen.candidate is None:
                decision.kind = UNREACHABLE
            elif held:
                decision.kind, decision.response = UNREACHABLE, held
            else:
                decision.kind, decision.next_hop = ROUTE, chosen.candidate.next_hop
        result.unrouted.clear()
        return result

    async def _resolve(self, message: QueuedMessage, row: QueuedRecipient | None, address: str,
                       orcpt: str | None, notify: frozenset[Notify], result: Categorized,
                       seen: set[str], groups: set[str], related: str = "",
                       event: str = "") -> None:
        def decide(kind: str, addr: str, **kw: object) -> None:
            envelope = None if row is not None else EnvelopeRecipient(addr, notify, orcpt)
            kw.setdefault("related", related)
            kw.setdefault("event", event)
            result.decisions.append(Decision(kind, addr, row, envelope, orcpt=orcpt, **kw))  # type: ignore[arg-type]

        # the hook must see the address being resolved now (a redirect or contact target),
        # else a hook redirecting by address is asked about the old one again, forever
        if row is None:
            probe = QueuedRecipient(0, message.id, address, RecipientStatus.SUBMITTED)
        else:
            probe = row if row.address == address else replace(row, address=address)
        override = await self.hooks.call_first(
            "categorize", message=message, recipient=probe, organization=self.org)
        if isinstance(override, Reject):
            return decide(FAIL, address, response=override.response, source="AGENT")
        if isinstance(override, RouteTo):
            return decide(ROUTE, address, next_hop=override.next_hop)
        if isinstance(override, Redirect):
            chain = groups | {"redirect:" + address.lower()}
            if "redirect:" + override.address.lower() in chain:  # hooks redirecting in a ring
                return decide(FAIL, address, response=REDIRECT_LOOP, source="RESOLVER")
            return await self._resolve(message, row, override.address, orcpt or _orcpt(address),
                                       notify, result, seen, chain, address, "REDIRECT")
        if isinstance(override, Expand):
            decide(EXPANDED, address, event="EXPAND")
            key = "expand:" + address.lower()
            if key in groups:  # an expansion that contains itself: expand it once
                return None
            groups = groups | {key}
            for member in override.addresses:
                await self._resolve(message, None, member, None, _member_notify(notify),
                                    result, seen, groups, address, "EXPAND")
            return None

        entry = self.directory.lookup(address)
        if entry is not None:
            return await self._resolve_entry(message, row, address, orcpt, notify, entry,
                                             result, seen, groups, related, event)
        if address.lower() in seen:
            return decide(EXPANDED, address, event="DUPLICATE")
        seen.add(address.lower())
        foreign = self.directory.foreign(address)
        if foreign is not None:
            addr_type, route_address = foreign.type, foreign.address
        else:
            domain = address.rpartition("@")[2]
            accepted = self.org.accepted_domain_for(domain)
            if accepted is not None and accepted.domain_type == "Authoritative":
                return decide(FAIL, address, response=RECIPIENT_NOT_FOUND, source="RESOLVER")
            addr_type, route_address = "SMTP", address
        decide(RESOLVED, address)  # routed after every recipient is resolved
        result.unrouted.append((result.decisions[-1], row or probe, addr_type, route_address))
        return None

    async def _resolve_entry(self, message: QueuedMessage, row: QueuedRecipient | None,
                             address: str, orcpt: str | None, notify: frozenset[Notify],
                             entry: DirectoryEntry, result: Categorized, seen: set[str],
                             groups: set[str], related: str, event: str) -> None:
        rewritten = entry.primary.lower() != address.lower()
        new_orcpt = orcpt or (_orcpt(address) if rewritten else None)
        if entry.kind == "group":
            key = entry.name.lower()
            result.decisions.append(Decision(
                EXPANDED, address, row,
                None if row is not None else EnvelopeRecipient(address, notify, orcpt),
                related=related, event=event or "EXPAND"))
            if key in groups:  # a group nested in itself: expand it once
                return
            groups = groups | {key}
            for member in entry.obj.members:  # type: ignore[union-attr]
                member_entry = self.directory.member(member)
                member_address = member_entry.primary if member_entry is not None else member
                await self._resolve(message, None, member_address, None,
                                    _member_notify(notify), result, seen, groups,
                                    entry.primary, "EXPAND")
            return
        home = getattr(entry.obj, "routing_group", None)
        if entry.kind == "contact" and not home:
            external = entry.obj.external_email_address  # type: ignore[union-attr]
            kind, _, value = external.partition(":") if ":" in external else ("SMTP", "", external)
            kind = kind.upper()
            target = value if kind == "SMTP" else self.directory.encapsulate(kind, value)
            return await self._resolve(message, row, target, new_orcpt or _orcpt(address),
                                       notify, result, seen, groups, address, "RESOLVE")
        primary = entry.primary
        owner = result.owners.get(primary.lower())
        if primary.lower() in seen or (owner is not None and owner != getattr(row, "id", None)):
            result.decisions.append(Decision(
                EXPANDED, address, row,
                None if row is not None else EnvelopeRecipient(address, notify, orcpt),
                related=related, event="DUPLICATE"))
            return
        seen.add(primary.lower())
        if home:  # homed in a legacy routing group: a Routing Group connector takes it
            result.decisions.append(Decision(
                RESOLVED, primary, row,
                None if row is not None else EnvelopeRecipient(primary, notify, new_orcpt),
                orcpt=new_orcpt, related=address if rewritten else related,
                event="RESOLVE" if rewritten else event))
            probe = row or QueuedRecipient(0, message.id, primary, RecipientStatus.SUBMITTED)
            result.unrouted.append((result.decisions[-1], probe, HOME_TYPE, home))
            return
        box_server = getattr(entry.obj, "server", None) or self.server.name
        if box_server.lower() == self.server.name.lower():
            hop = mailbox_next_hop(self.server.name)
        else:
            narrow = self.routing.narrow_link(box_server, message.size)
            if narrow is not None:
                result.decisions.append(Decision(
                    FAIL, primary, row,
                    None if row is not None else EnvelopeRecipient(primary, notify, new_orcpt),
                    response=SmtpResponse(
                        550, "5.3.4", f"ROUTING.SizeLimit; the message is larger than the"
                                      f" {narrow.max_message_size} bytes site link"
                                      f" {narrow.link} takes"),
                    related=address if rewritten else related))
                return
            hop = self.routing.relay_hop(box_server)
            held = self._disagreement(result, box_server)
            if held is not None:
                result.decisions.append(Decision(
                    UNREACHABLE, primary, row,
                    None if row is not None else EnvelopeRecipient(primary, notify, new_orcpt),
                    response=held, orcpt=new_orcpt, related=address if rewritten else related,
                    event="RESOLVE" if rewritten else event))
                return
        result.decisions.append(Decision(
            ROUTE, primary, row,
            None if row is not None else EnvelopeRecipient(primary, notify, new_orcpt),
            next_hop=hop, orcpt=new_orcpt,
            related=address if rewritten else related,
            event="RESOLVE" if rewritten else event))

    def _disagreement(self, result: Categorized, target: str) -> SmtpResponse | None:
        return disagreement(self.server.name, result.previous, target, self.org.version)

    async def _route(self, message: QueuedMessage, recipient: QueuedRecipient, addr_type: str,
                     address: str) -> RouteDecision:
        extra = await self.hooks.call_all(
            "route", message=message, recipient=recipient, organization=self.org,
            server=self.server.name)
        candidates = [c for result in extra if result for c in result]
        if self.explanations is not None:
            explained = self.routing.explain(addr_type, address, message.size, candidates,
                                             self.avoided())
            self.explanations.append((address, addr_type, explained))
            return explained.decision
        return self.routing.choose(addr_type, address, message.size, candidates,
                                   self.avoided())


def _orcpt(address: str) -> str:
    return f"rfc822;{address}"


def _member_notify(notify: frozenset[Notify]) -> frozenset[Notify]:
    """Members of an expanded group do not inherit SUCCESS (RFC 3461 §6.2.7.3)."""
    return frozenset(n for n in notify if n is not Notify.SUCCESS)
