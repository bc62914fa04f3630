"""Connector selection and the categorizer's resolution and hooks
(docs/exchange.md, "Address spaces and connector selection").

The routing table is exercised on organizations parsed from TOML with a tiny test connector
type, so every rule is checked through the same config path the daemon uses. Three sites:
HUB01 and HUB02 share Site-A, HUB03 is in Site-B (link cost 10), HUB04 in Site-C (another
5 beyond Site-B). A site that no link reaches is a config error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hubport.core import hookimpl
from hubport.core.address_space import AddressSpace
from hubport.core.categorizer import (
    EXPANDED,
    FAIL,
    RESOLVED,
    ROUTE,
    UNREACHABLE,
    Categorized,
    Categorizer,
    Decision,
    Expand,
    Redirect,
    Reject,
    RouteTo,
    mailbox_next_hop,
)
from hubport.core.config import Organization, parse_organization
from hubport.core.config_fields import ConfigError
from hubport.core.directory import RecipientDirectory
from hubport.core.hooks import Hooks
from hubport.core.model import (
    MailFrom,
    NextHop,
    Notify,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
    SmtpResponse,
)
from hubport.core.routing import RouteCandidate, RouteDecision, RoutingTable
from support import PlainConnector

LabConnector = PlainConnector  # The test connector type: nothing but the common routing fields.


TOPOLOGY = """
[transport_config]
MaxRecipientEnvelopeLimit = {limit}

[[site]]
Name = "Site-A"
[[site]]
Name = "Site-B"
[[site]]
Name = "Site-C"

[[site_link]]
Name = "A-B"
Sites = ["Site-A", "Site-B"]
Cost = 10
[[site_link]]
Name = "B-C"
Sites = ["Site-B", "Site-C"]
Cost = 5

[[transport_server]]
Name = "HUB01"
Site = "Site-A"
[[transport_server]]
Name = "HUB02"
Site = "Site-A"
[[transport_server]]
Name = "HUB03"
Site = "Site-B"
[[transport_server]]
Name = "HUB04"
Site = "Site-C"

[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
DomainType = "Authoritative"
Default = true

[[accepted_domain]]
Name = "fabrikam.test"
DomainName = "fabrikam.test"
DomainType = "InternalRelay"

[[mailbox]]
Name = "Alice"
PrimarySmtpAddress = "alice@contoso.test"
EmailAddresses = ["smtp:alice.smith@contoso.test"]

[[mailbox]]
Name = "Bob"
PrimarySmtpAddress = "bob@contoso.test"

[[mailbox]]
Name = "Frank"
PrimarySmtpAddress = "frank@fabrikam.test"

[[mailbox]]
Name = "Remote Rita"
Alias = "rita"
PrimarySmtpAddress = "rita@contoso.test"
Server = "HUB03"

[[mailbox]]
Name = "Neighbour Nick"
Alias = "nick"
PrimarySmtpAddress = "nick@contoso.test"
Server = "HUB02"

[[distribution_group]]
Name = "Staff"
PrimarySmtpAddress = "staff@contoso.test"
Members = ["Alice", "bob@contoso.test", "Everyone"]

[[distribution_group]]
Name = "Everyone"
PrimarySmtpAddress = "everyone@contoso.test"
Members = ["Staff", "Alice"]
"""


def connector(name: str, spaces: list[str], *, servers: list[str] | None = None,
              **fields: Any) -> str:
    """A ``[[test_connector]]`` table."""
    lines = ["[[test_connector]]", f'Name = "{name}"',
             "AddressSpaces = [" + ", ".join(f'"{s}"' for s in spaces) + "]"]
    if servers is not None:
        lines.append("SourceTransportServers = [" + ", ".join(f'"{s}"' for s in servers) + "]")
    for key, value in fields.items():
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def org(*connectors: str, limit: int = 5000) -> Organization:
    hooks = Hooks(entry_points=False)
    types = {**hooks.registry.connector_types, LabConnector.section: LabConnector}
    text = TOPOLOGY.format(limit=limit) + "\n".join(connectors)
    return parse_organization(text, source="routing-test.toml", base_dir=Path("/nonexistent"),
                              connector_types=types)


def table(organization: Organization, server: str = "HUB01") -> RoutingTable:
    return RoutingTable(organization, organization.server(server))


def chosen(organization: Organization, address: str, *, server: str = "HUB01",
           size: int = 1000, addr_type: str = "SMTP") -> str | None:
    decision = table(organization, server).choose(addr_type, address, size)
    return decision.candidate.name if decision.candidate else None


# ---------------------------------------------------------------------------------------------
# connector selection


def test_most_specific_address_space_wins_over_cost() -> None:
    o = org(connector("Everything", ["*;1"]),
            connector("Contoso Tree", ["*.contoso.com;50"]),
            connector("Marketing", ["marketing.contoso.com;100"]))
    assert chosen(o, "julia@marketing.contoso.com") == "Marketing"
    assert chosen(o, "julia@sales.contoso.com") == "Contoso Tree"
    assert chosen(o, "julia@contoso.com") == "Contoso Tree"  # *.d covers d itself
    assert chosen(o, "julia@deep.marketing.contoso.com") == "Contoso Tree"  # d: no subdomains
    assert chosen(o, "julia@example.org") == "Everything"


def test_specificity_counts_labels_not_position_in_the_file() -> None:
    o = org(connector("Deep", ["*.b.contoso.com;90"]), connector("Shallow", ["*.contoso.com;1"]))
    assert chosen(o, "x@a.b.contoso.com") == "Deep"


def test_lowest_address_space_cost_breaks_a_specificity_tie() -> None:
    o = org(connector("Dear", ["*;5"]), connector("Cheap", ["*;3"]))
    assert chosen(o, "x@example.org") == "Cheap"


def test_a_connector_uses_its_best_matching_address_space() -> None:
    o = org(connector("Multi", ["*;1", "example.org;40"]), connector("Single", ["example.org;20"]))
    # both match example.org exactly; Multi's exact space costs 40, Single's 20
    assert chosen(o, "x@example.org") == "Single"
    assert chosen(o, "x@elsewhere.org") == "Multi"


def test_aggregate_cost_adds_the_site_link_cost_to_the_source_server() -> None:
    remote = connector("Remote", ["*;1"], servers=["HUB03"])  # 10 (link) + 1
    o = org(remote, connector("Local", ["*;5"], servers=["HUB01"]))
    assert chosen(o, "x@example.org") == "Local"  # 5 < 11
    o = org(remote, connector("Local", ["*;20"], servers=["HUB01"]))
    decision = table(o).choose("SMTP", "x@example.org", 1000)
    assert decision.candidate is not None and decision.candidate.name == "Remote"  # 11 < 20
    assert decision.candidate.cost == 11


def test_aggregate_cost_along_a_two_link_path() -> None:
    far = connector("Far", ["*;1"], servers=["HUB04"])  # 10 + 5 + 1 = 16
    assert chosen(org(far, connector("Near", ["*;15"])), "x@example.org") == "Near"
    assert chosen(org(far, connector("Near", ["*;17"])), "x@example.org") == "Far"


def test_proximity_breaks_a_cost_tie_local_then_same_site_then_remote() -> None:
    local = connector("Zulu Local", ["*;11"], servers=["HUB01"])
    same_site = connector("Mike Same Site", ["*;11"], servers=["HUB02"])  # site cost 0
    remote = connector("Alpha Remote", ["*;1"], servers=["HUB03"])  # 10 + 1
    assert chosen(org(local, same_site, remote), "x@example.org") == "Zulu Local"
    assert chosen(org(same_site, remote), "x@example.org") == "Mike Same Site"
    # without a proximity difference the name decides
    assert chosen(org(remote, connector("Beta Remote", ["*;1"], servers=["HUB03"])),
                  "x@example.org") == "Alpha Remote"


def test_name_sorts_lowest_case_insensitively_when_all_else_ties() -> None:
    o = org(connector("beta", ["*"]), connector("Alpha", ["*"]), connector("gamma", ["*"]))
    assert chosen(o, "x@example.org") == "Alpha"


def test_disabled_connectors_are_ignored() -> None:
    o = org(connector("Specific", ["example.org"], Enabled="false"), connector("Any", ["*"]))
    assert chosen(o, "x@example.org") == "Any"
    o = org(connector("Specific", ["example.org"], Enabled="false"))
    assert table(o).choose("SMTP", "x@example.org", 1000).unreachable


def test_too_small_connectors_are_eliminated_before_specificity() -> None:
    o = org(connector("Specific", ["example.org"], MaxMessageSize='"1KB"'),
            connector("Any", ["*"], MaxMessageSize='"10MB"'))
    assert chosen(o, "x@example.org", size=512) == "Specific"
    assert chosen(o, "x@example.org", size=4096) == "Any"


def test_every_candidate_too_small_fails_with_5_3_4() -> None:
    o = org(connector("Small", ["example.org"], MaxMessageSize='"1KB"'),
            connector("Smaller", ["*"], MaxMessageSize='"512B"'))
    decision = table(o).choose("SMTP", "x@example.org", 4096)
    assert decision.candidate is None and decision.failure is not None
    assert decision.failure.code == 550 and decision.failure.enhanced == "5.3.4"
    # a size problem on a connector that does not match the recipient is no failure
    assert table(o).choose("FAX", "+1555", 4096).failure.enhanced == "5.4.4"  # type: ignore[union-attr]


def test_scoped_connector_serves_only_its_own_site() -> None:
    scoped = connector("Scoped B", ["example.org"], servers=["HUB03"], IsScopedConnector="true")
    fallback = connector("Fallback", ["*;100"])
    o = org(scoped, fallback)
    assert chosen(o, "x@example.org", server="HUB01") == "Fallback"  # out of scope in Site-A
    assert chosen(o, "x@example.org", server="HUB03") == "Scoped B"
    assert chosen(o, "x@example.org", server="HUB04") == "Fallback"
    same_site = connector("Scoped A", ["example.org"], servers=["HUB02"], IsScopedConnector="true")
    assert chosen(org(same_site, fallback), "x@example.org", server="HUB01") == "Scoped A"


def test_non_smtp_recipient_without_connector_fails_5_4_4() -> None:
    o = org(connector("Any", ["*"]))
    decision = table(o).choose("FAX", "+15551234", 1000)
    assert decision.failure is not None and decision.failure.enhanced == "5.4.4"
    assert decision.failure.code == 550


def test_smtp_recipient_without_connector_is_unreachable() -> None:
    o = org(connector("Only Example", ["example.org"]))
    decision = table(o).choose("SMTP", "x@example.net", 1000)
    assert decision == RouteDecision() and decision.unreachable


def test_local_source_server_delivers_itself() -> None:
    o = org(connector("Gateway", ["example.org;1"], servers=["HUB01"]))
    candidate = table(o).choose("SMTP", "x@example.org", 1000).candidate
    assert candidate is not None
    assert candidate.next_hop == NextHop("DeliveryAgent", "example.org", "Gateway")
    assert candidate.proximity == 0 and candidate.cost == 1


def test_connector_on_another_hub_relays_to_that_server() -> None:
    same = org(connector("Gateway", ["example.org"], servers=["HUB02"]))
    hop = table(same).choose("SMTP", "x@example.org", 1000).candidate.next_hop  # type: ignore[union-attr]
    # within the site the queue is named for the connector: its source servers here take it
    assert hop == NextHop("SmtpRelayWithinAdSite", "Gateway", "Gateway")
    assert [s.name for s in table(same).relay_targets(hop)] == ["HUB02"]
    remote = org(connector("Gateway", ["example.org"], servers=["HUB03"]))
    hop = table(remote).choose("SMTP", "x@example.org", 1000).candidate.next_hop  # type: ignore[union-attr]
    # in another site, the queue is the site's: any hub there routes it on
    assert hop == NextHop("SmtpRelayToRemoteAdSite", "Site-B", "")
    assert [s.name for s in table(remote).relay_targets(hop)] == ["HUB03"]
    # on its own source server the same connector is delivered directly
    hop = table(remote, "HUB03").choose("SMTP", "x@example.org", 1000).candidate.next_hop  # type: ignore[union-attr]
    assert hop == NextHop("DeliveryAgent", "example.org", "Gateway")


def test_nearest_of_several_source_servers_is_used() -> None:
    o = org(connector("Gateway", ["example.org"], servers=["HUB04", "HUB03"]))
    candidate = table(o).choose("SMTP", "x@example.org", 1000).candidate
    assert candidate is not None
    assert candidate.next_hop == NextHop("SmtpRelayToRemoteAdSite", "Site-B", "")
    assert candidate.source_server == "HUB03" and candidate.cost == 11


def test_a_relay_to_a_far_site_falls_back_along_the_path_but_never_to_this_server() -> None:
    o = org()
    far = NextHop("SmtpRelayToRemoteAdSite", "Site-C", "")
    # HUB04's site first; when it does not answer, the site before it on the path (Site-B):
    # the mail waits at the closest reachable site (queue at the point of failure)
    assert [s.name for s in table(o).relay_targets(far)] == ["HUB04", "HUB03"]
    assert [s.name for s in table(o, "HUB03").relay_targets(far)] == ["HUB04"]
    assert table(o).relay_targets(NextHop("SmtpRelayWithinAdSite", "HUB01", "")) == []
    assert table(o).relay_targets(NextHop("SmtpRelayToRemoteAdSite", "Site-Z", "")) == []


@pytest.mark.parametrize(("extra", "reason"), [
    ('[[site]]\nName = "Site-D"\n[[transport_server]]\nName = "HUB05"\nSite = "Site-D"\n',
     'site "Site-D": is on no site link'),
    ('[[site]]\nName = "Site-D"\n[[site]]\nName = "Site-E"\n[[site_link]]\nName = "D-E"\n'
     'Sites = ["Site-D", "Site-E"]\n[[transport_server]]\nName = "HUB05"\nSite = "Site-D"\n',
     "no chain of site links joins it to Site-D"),
])
def test_a_site_no_link_reaches_is_a_config_error(extra: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        org(extra)
    assert reason in str(info.value), str(info.value)


def test_non_smtp_address_spaces_route_foreign_types() -> None:
    o = org(connector("Fax Any", ["FAX:*;5"]), connector("Fax US", ["FAX:+1*;5"]))
    assert chosen(o, "+15551234", addr_type="FAX") == "Fax US"
    assert chosen(o, "+445551234", addr_type="FAX") == "Fax Any"
    assert table(o).choose("SMTP", "x@example.org", 1000).unreachable


def test_extra_candidates_compete_by_the_same_rules() -> None:
    o = org(connector("Any", ["*;1"]))
    hop = NextHop("DeliveryAgent", "example.org", "Plugin")
    specific = RouteCandidate(hop, AddressSpace("SMTP", "example.org"), 5, 50, 0, "Plugin")
    vague = RouteCandidate(hop, AddressSpace("SMTP", "*"), 0, 50, 0, "Plugin")
    assert table(o).choose("SMTP", "x@example.org", 1000, [specific]).candidate == specific
    assert table(o).choose("SMTP", "x@example.org", 1000, [vague]).candidate.name == "Any"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# the categorizer


def queued(*addresses: str, notify: frozenset[Notify] = frozenset(),
           size: int = 1000) -> QueuedMessage:
    recipients = [QueuedRecipient(i + 1, 1, a, RecipientStatus.SUBMITTED, notify)
                  for i, a in enumerate(addresses)]
    return QueuedMessage(id=1, internal_id="1", message_id="<m@test>",
                         mail_from=MailFrom("sender@example.org"), body=b"x" * size, size=size,
                         source="PICKUP", source_name="Pickup", subject="s", received_at=0.0,
                         expires_at=1e12, recipients=recipients)


async def categorize(organization: Organization, message: QueuedMessage,
                     *plugins: object, server: str = "HUB01") -> Categorized:
    hooks = Hooks(entry_points=False)
    for plugin in plugins:
        hooks.register(plugin)
    box = organization.server(server)
    return await Categorizer(organization, box, RecipientDirectory(organization),
                             hooks).categorize(message)


def by_address(result: Categorized) -> dict[str, list[Decision]]:
    out: dict[str, list[Decision]] = {}
    for d in result.decisions:
        out.setdefault(d.address.lower(), []).append(d)
    return out


def routed(result: Categorized) -> dict[str, NextHop]:
    out: dict[str, NextHop] = {}
    for d in result.decisions:
        if d.kind == ROUTE:
            assert d.address.lower() not in out, f"{d.address} routed twice"
            assert d.next_hop is not None
            out[d.address.lower()] = d.next_hop
    return out


HOME = mailbox_next_hop("HUB01")


async def test_unknown_recipient_in_authoritative_domain_fails_5_1_1() -> None:
    result = await categorize(org(connector("Any", ["*"])), queued("nobody@contoso.test"))
    [decision] = result.decisions
    assert decision.kind == FAIL and decision.response is not None
    assert (decision.response.code, decision.response.enhanced) == (550, "5.1.1")
    assert "RecipNotFound" in decision.response.text
    assert decision.source == "RESOLVER"


async def test_unknown_recipient_in_internal_relay_domain_routes_by_address_space() -> None:
    o = org(connector("Fabrikam Relay", ["fabrikam.test"]), connector("Any", ["*;100"]))
    result = await categorize(o, queued("someone@fabrikam.test", "frank@fabrikam.test"))
    hops = routed(result)
    assert hops["someone@fabrikam.test"] == NextHop("DeliveryAgent", "fabrikam.test",
                                                    "Fabrikam Relay")
    assert hops["frank@fabrikam.test"] == HOME  # resolved recipients never use a connector
    unreachable = await categorize(org(connector("Other", ["example.org"])),
                                   queued("someone@fabrikam.test"))
    assert [d.kind for d in unreachable.decisions] == [UNREACHABLE]


async def test_external_recipient_routes_and_resolved_one_is_local() -> None:
    o = org(connector("Any", ["*"]))
    hops = routed(await categorize(o, queued("x@example.org", "Alice.Smith@contoso.test")))
    assert hops["x@example.org"] == NextHop("DeliveryAgent", "*", "Any")
    assert hops["alice@contoso.test"] == HOME


async def test_secondary_address_rewritten_to_primary_keeps_orcpt() -> None:
    result = await categorize(org(), queued("Alice.Smith@contoso.test"))
    [decision] = result.decisions
    assert decision.kind == ROUTE and decision.address == "alice@contoso.test"
    assert decision.orcpt == "rfc822;Alice.Smith@contoso.test"
    assert decision.event == "RESOLVE" and decision.related == "Alice.Smith@contoso.test"
    assert decision.recipient is not None and decision.recipient.id == 1


async def test_mailbox_on_another_hub_is_relayed_by_site() -> None:
    hops = routed(await categorize(org(), queued("nick@contoso.test", "rita@contoso.test")))
    assert hops["nick@contoso.test"] == NextHop("SmtpRelayWithinAdSite", "HUB02", "")
    assert hops["rita@contoso.test"] == NextHop("SmtpRelayToRemoteAdSite", "Site-B", "")
    at_home = routed(await categorize(org(), queued("rita@contoso.test"), server="HUB03"))
    assert at_home["rita@contoso.test"] == mailbox_next_hop("HUB03")


async def test_group_expansion_survives_nesting_loops_and_duplicates() -> None:
    result = await categorize(org(), queued("staff@contoso.test", "bob@contoso.test",
                                            "everyone@contoso.test"))
    hops = routed(result)  # asserts each address is routed once
    assert hops == {"alice@contoso.test": HOME, "bob@contoso.test": HOME}
    decisions = by_address(result)
    assert all(d.kind == EXPANDED for d in decisions["staff@contoso.test"])
    assert all(d.kind == EXPANDED for d in decisions["everyone@contoso.test"])
    # bob's second appearance (direct or through a group) is settled as a duplicate
    assert [d.kind for d in decisions["bob@contoso.test"]].count(ROUTE) == 1
    assert any(d.event == "DUPLICATE" for d in decisions["bob@contoso.test"])
    # every envelope row gets exactly one decision
    rows = [d.recipient.id for d in result.decisions if d.recipient is not None]
    assert sorted(rows) == [1, 2, 3]
    # members added by expansion carry an envelope and the group they came from
    alice = next(d for d in decisions["alice@contoso.test"] if d.kind == ROUTE)
    assert alice.recipient is None and alice.envelope is not None
    assert alice.event == "EXPAND" and alice.related == "staff@contoso.test"


async def test_envelope_recipient_reached_first_through_a_group_keeps_its_own_row() -> None:
    """staff@ comes first and expands to bob, but bob is also named in the envelope: his
    own row (its NOTIFY and ORCPT) is the one routed, the group's copy is the duplicate."""
    message = queued("staff@contoso.test", "bob@contoso.test")
    bob_row = message.recipients[1]
    bob_row.notify = frozenset({Notify.NEVER})
    bob_row.orcpt = "rfc822;bob@contoso.test"
    result = await categorize(org(), message)
    bob = by_address(result)["bob@contoso.test"]
    routed_bob = [d for d in bob if d.kind == ROUTE]
    assert len(routed_bob) == 1 and routed_bob[0].recipient is bob_row
    assert [d.event for d in bob if d.recipient is None] == ["DUPLICATE"]


async def test_group_members_do_not_inherit_notify_success() -> None:
    notify = frozenset({Notify.SUCCESS, Notify.FAILURE})
    result = await categorize(org(), queued("staff@contoso.test", notify=notify))
    alice = next(d for d in result.decisions if d.kind == ROUTE and d.address.startswith("alice"))
    assert alice.envelope is not None and alice.envelope.notify == frozenset({Notify.FAILURE})


async def test_recipient_limit_fails_every_recipient_5_5_3() -> None:
    o = org(connector("Any", ["*"]), limit=2)
    result = await categorize(o, queued("a@example.org", "b@example.org", "c@example.org"))
    assert [d.kind for d in result.decisions] == [FAIL] * 3
    assert {d.response.enhanced for d in result.decisions if d.response} == {"5.5.3"}
    within = await categorize(o, queued("a@example.org", "b@example.org"))
    assert [d.kind for d in within.decisions] == [ROUTE, ROUTE]


async def test_recipient_limit_is_not_applied_again_on_resubmission() -> None:
    """Unreachable is resubmitted after a config change: rows added by the first pass's
    group expansion are no envelope recipients and must not trip the limit then."""
    o = org(connector("Any", ["*"]), limit=2)
    message = queued("staff@contoso.test", "x@example.org")
    first = await categorize(o, message)
    assert FAIL not in {d.kind for d in first.decisions}
    settled = [RecipientStatus.EXPANDED, RecipientStatus.SUBMITTED]
    message.recipients = [QueuedRecipient(i + 1, 1, a, status) for i, (a, status) in
                          enumerate(zip(["staff@contoso.test", "x@example.org"], settled))]
    message.recipients += [QueuedRecipient(3, 1, "alice@contoso.test", RecipientStatus.DELIVERED),
                           QueuedRecipient(4, 1, "bob@contoso.test", RecipientStatus.DELIVERED)]
    again = await categorize(o, message)
    assert [(d.kind, d.address) for d in again.decisions] == [(ROUTE, "x@example.org")]


async def test_too_big_for_every_connector_fails_5_3_4() -> None:
    o = org(connector("Small", ["*"], MaxMessageSize='"1KB"'))
    [decision] = (await categorize(o, queued("x@example.org", size=4096))).decisions
    assert decision.kind == FAIL and decision.response is not None
    assert decision.response.enhanced == "5.3.4"


class Overrides:
    """A ``categorize`` plugin answering from a table of addresses (sync, then async)."""

    def __init__(self, table: dict[str, Any]) -> None:
        self.table = table
        self.seen: list[str] = []

    @hookimpl
    def categorize(self, message: QueuedMessage, recipient: QueuedRecipient,
                   organization: Organization) -> Any:
        self.seen.append(recipient.address)
        return self.table.get(recipient.address.lower())


class AsyncOverrides(Overrides):
    @hookimpl
    async def categorize(self, message: QueuedMessage, recipient: QueuedRecipient,
                         organization: Organization) -> Any:
        self.seen.append(recipient.address)
        return self.table.get(recipient.address.lower())


@pytest.mark.parametrize("plugin_cls", [Overrides, AsyncOverrides])
async def test_categorize_hook_redirects_a_recipient(plugin_cls: type[Overrides]) -> None:
    plugin = plugin_cls({"old@contoso.test": Redirect("bob@contoso.test")})
    result = await categorize(org(), queued("old@contoso.test"), plugin)
    [decision] = result.decisions
    assert decision.kind == ROUTE and decision.address == "bob@contoso.test"
    assert decision.next_hop == HOME
    assert decision.recipient is not None and decision.recipient.id == 1  # the same row
    assert decision.orcpt == "rfc822;old@contoso.test"
    assert decision.event == "REDIRECT" and decision.related == "old@contoso.test"
    assert plugin.seen == ["old@contoso.test", "bob@contoso.test"]


async def test_redirect_loop_between_hook_answers_terminates() -> None:
    plugin = Overrides({"a@example.org": Redirect("b@example.org"),
                        "b@example.org": Redirect("a@example.org")})
    result = await categorize(org(connector("Any", ["*"])), queued("a@example.org"), plugin)
    [decision] = result.decisions
    assert decision.kind == FAIL and decision.response is not None
    assert decision.response.enhanced == "5.4.6"
    assert decision.recipient is not None and decision.recipient.id == 1


async def test_expansion_containing_itself_expands_once() -> None:
    plugin = Overrides({"team@example.org": Expand(("team@example.org", "x@example.org"))})
    result = await categorize(org(connector("Any", ["*"])), queued("team@example.org"), plugin)
    assert routed(result) == {"x@example.org": NextHop("DeliveryAgent", "*", "Any")}
    assert {d.kind for d in by_address(result)["team@example.org"]} == {EXPANDED}


async def test_categorize_hook_expands_rejects_and_routes() -> None:
    fixed = NextHop("DeliveryAgent", "special", "Special Gateway")
    plugin = Overrides({
        "team@contoso.test": Expand(("alice@contoso.test", "x@example.org")),
        "spam@contoso.test": Reject(SmtpResponse(550, "5.7.1", "Refused by policy")),
        "vip@contoso.test": RouteTo(fixed),
    })
    o = org(connector("Any", ["*"]))
    result = await categorize(o, queued("team@contoso.test", "spam@contoso.test",
                                        "vip@contoso.test"), plugin)
    decisions = by_address(result)
    assert [d.kind for d in decisions["team@contoso.test"]] == [EXPANDED]
    assert decisions["team@contoso.test"][0].event == "EXPAND"
    hops = routed(result)
    assert hops["alice@contoso.test"] == HOME
    assert hops["x@example.org"] == NextHop("DeliveryAgent", "*", "Any")
    assert hops["vip@contoso.test"] == fixed
    members = [d for d in result.decisions if d.related == "team@contoso.test"]
    assert {d.address for d in members} == {"alice@contoso.test", "x@example.org"}
    assert all(d.recipient is None and d.envelope is not None for d in members)
    [spam] = decisions["spam@contoso.test"]
    assert spam.kind == FAIL and spam.source == "AGENT"
    assert spam.response == SmtpResponse(550, "5.7.1", "Refused by policy")


class ExtraRoute:
    """A ``route`` plugin offering one candidate for one domain."""

    def __init__(self, candidate: RouteCandidate, domain: str) -> None:
        self.candidate = candidate
        self.domain = domain
        self.calls: list[tuple[str, str]] = []

    @hookimpl
    def route(self, message: QueuedMessage, recipient: QueuedRecipient,
              organization: Organization, server: str) -> list[RouteCandidate] | None:
        self.calls.append((recipient.address, server))
        if recipient.address.lower().endswith("@" + self.domain):
            return [self.candidate]
        return None


async def test_route_hook_adds_a_candidate() -> None:
    hop = NextHop("DeliveryAgent", "partner.example", "Partner Plugin")
    candidate = RouteCandidate(hop, AddressSpace("SMTP", "partner.example"), 5, 1, 0,
                               "Partner Plugin")
    plugin = ExtraRoute(candidate, "partner.example")
    o = org(connector("Any", ["*"]))
    result = await categorize(o, queued("x@partner.example", "y@example.org",
                                        "bob@contoso.test"), plugin)
    hops = routed(result)
    assert hops["x@partner.example"] == hop
    assert hops["y@example.org"] == NextHop("DeliveryAgent", "*", "Any")
    assert hops["bob@contoso.test"] == HOME
    # only recipients that need a connector are offered to the hook, with this server's name
    assert sorted(plugin.calls) == [("x@partner.example", "HUB01"), ("y@example.org", "HUB01")]
    # with no configured connector at all the plugin's candidate still routes
    alone = await categorize(org(), queued("x@partner.example"), plugin)
    assert routed(alone) == {"x@partner.example": hop}


class Recorder:
    """Records the categorizer's hook calls in order, and what on_resolved saw."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.at_resolved: dict[str, tuple[str, NextHop | None]] = {}

    @hookimpl
    def categorize(self, message: QueuedMessage, recipient: QueuedRecipient,
                   organization: Organization) -> None:
        self.calls.append("categorize " + recipient.address)

    @hookimpl
    def on_resolved(self, message: QueuedMessage, recipients: list[Decision]) -> None:
        self.calls.append("on_resolved")
        self.at_resolved = {d.address: (d.kind, d.next_hop) for d in recipients}

    @hookimpl
    def route(self, message: QueuedMessage, recipient: QueuedRecipient,
              organization: Organization, server: str) -> None:
        self.calls.append("route " + recipient.address)


async def test_on_resolved_fires_after_every_recipient_is_resolved_before_any_route() -> None:
    """docs/hooks.md: categorize (per recipient) -> on_resolved -> route (per recipient)."""
    plugin = Recorder()
    result = await categorize(org(connector("Any", ["example.org"])),
                              queued("x@example.org", "bob@contoso.test", "y@nowhere.test"),
                              plugin)
    assert plugin.calls == [
        "categorize x@example.org", "categorize bob@contoso.test", "categorize y@nowhere.test",
        "on_resolved", "route x@example.org", "route y@nowhere.test"]
    # next hops were not chosen yet; mailbox delivery needs no routing
    assert plugin.at_resolved == {"x@example.org": (RESOLVED, None),
                                  "bob@contoso.test": (ROUTE, HOME),
                                  "y@nowhere.test": (RESOLVED, None)}
    final = {d.address: (d.kind, d.next_hop) for d in result.decisions}
    assert final == {"x@example.org": (ROUTE, NextHop("DeliveryAgent", "example.org", "Any")),
                     "bob@contoso.test": (ROUTE, HOME),
                     "y@nowhere.test": (UNREACHABLE, None)}
    assert not result.unrouted


def test_a_failed_over_connector_gives_way_to_the_next_cost_of_the_same_specificity() -> None:
    """ConnectorFailover NextCost: the next candidate by Exchange's order, never one of a
    less specific address space (that would change who may receive through it)."""
    o = org(connector("ISP1", ["SMTP:*;1"], servers=["HUB01"]),
            connector("ISP2", ["SMTP:*;2"], servers=["HUB01"]),
            connector("Partner", ["SMTP:partner.example;1"], servers=["HUB01"]))
    t = table(o)
    plain = t.choose("SMTP", "x@example.org", 1000)
    assert plain.candidate is not None and plain.candidate.name == "ISP1"
    moved = t.choose("SMTP", "x@example.org", 1000, avoid={"isp1"})
    assert moved.candidate is not None and moved.candidate.name == "ISP2"
    assert moved.failover_from == "ISP1"
    kept = t.choose("SMTP", "x@partner.example", 1000, avoid={"partner"})
    assert kept.candidate is not None and kept.candidate.name == "Partner"  # not ISP1 (*)
    assert kept.failover_from == ""
    both = t.choose("SMTP", "x@example.org", 1000, avoid={"isp1", "isp2"})
    assert both.candidate is not None and both.candidate.name == "ISP1"  # it waits
    explained = t.explain("SMTP", "x@example.org", 1000, avoid={"isp1"})
    assert "the failover of ISP1" in explained.rule
