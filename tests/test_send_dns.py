"""MX routing against a real dnsmasq on loopback, reached through ExternalDnsServers."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubport.core.api import DELIVERED, FAILED, DeferQueue
from hubport.core.model import NextHop
from hubport.plugins.smtp_send import resolver
from hubport.plugins.smtp_send.resolver import LocalIdentity, make_resolver, order_mx, resolve_mx
from send_peers import ScriptedDns, ScriptedSink, dnsmasq, free_port
from test_send_connector import context, item, kinds, load_org

pytestmark = pytest.mark.timeout(60)

RECORDS = (
    "--mx-host=example.test,mx1.example.test,10", "--mx-host=example.test,mx2.example.test,20",
    "--host-record=mx1.example.test,127.0.0.1", "--host-record=mx2.example.test,127.0.0.2",
    "--mx-host=nullmx.test,.,0", "--host-record=amx.test,127.0.0.3",
    "--mx-host=loop.test,hub01.contoso.test,10", "--host-record=hub01.contoso.test,127.0.0.9",
    "--mx-host=half.test,hub01.contoso.test,20", "--mx-host=half.test,mx1.example.test,10",
    "--mx-host=backup.test,hub01.contoso.test,10", "--mx-host=backup.test,mx1.example.test,20",
    # --address answers its own type and NXDOMAIN for every other one (MX, AAAA or A)
    "--address=/aonly.test/127.0.0.2", "--address=/v6only.test/::1",
    "--mx-host=viaaonly.test,mx.aonly.test,10",
)
NOBODY = LocalIdentity(frozenset({"hub01.contoso.test"}), frozenset())


@pytest.fixture(scope="module")
def dns_port() -> Iterator[int]:
    with dnsmasq(*RECORDS) as port:
        yield port


def hosts(resolution: resolver.Resolution) -> list[str]:
    return [t.host for t in resolution.targets]


async def test_mx_preference_order(dns_port: int) -> None:
    r = await resolve_mx("example.test", make_resolver([("127.0.0.1", dns_port)]), 25, NOBODY)
    assert r.failure is None and hosts(r) == ["mx1.example.test", "mx2.example.test"]
    assert r.targets[0].addresses == ("127.0.0.1",) and r.targets[1].port == 25


def test_equal_preferences_are_shuffled() -> None:
    seen = {tuple(h for _, h in order_mx([(10, "a"), (10, "b"), (5, "c")], random.Random(s)))
            for s in range(40)}
    assert seen == {("c", "a", "b"), ("c", "b", "a")}


@pytest.mark.parametrize("domain, code, enhanced", [
    ("nullmx.test", 556, "5.1.10"), ("nothere.test", 550, "5.4.4"),
    ("loop.test", 554, "5.4.6"), ("backup.test", 554, "5.4.6")])
async def test_permanent_dns_outcomes(dns_port: int, domain: str, code: int,
                                      enhanced: str) -> None:
    r = await resolve_mx(domain, make_resolver([("127.0.0.1", dns_port)]), 25, NOBODY)
    assert r.failure is not None and (r.failure.code, r.failure.enhanced) == (code, enhanced)


async def test_mx_to_ourselves_keeps_only_more_preferred_hosts(dns_port: int) -> None:
    r = await resolve_mx("half.test", make_resolver([("127.0.0.1", dns_port)]), 25, NOBODY)
    assert r.failure is None and hosts(r) == ["mx1.example.test"]


async def test_implicit_mx(dns_port: int) -> None:
    r = await resolve_mx("amx.test", make_resolver([("127.0.0.1", dns_port)]), 25, NOBODY)
    assert hosts(r) == ["amx.test"] and r.targets[0].addresses == ("127.0.0.3",)


async def test_downgrade_dns_failures(dns_port: int) -> None:
    r = await resolve_mx("nothere.test", make_resolver([("127.0.0.1", dns_port)]), 25, NOBODY,
                         downgrade=True)
    assert r.failure is not None and r.failure.is_transient


async def test_dns_timeout_is_temporary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolver, "DNS_TIMEOUT", 0.3)
    monkeypatch.setattr(resolver, "DNS_LIFETIME", 1.0)
    silent = free_port("127.0.0.1", kind=2)  # SOCK_DGRAM: nobody answers there
    r = await resolve_mx("example.test", make_resolver([("127.0.0.1", silent)]), 25, NOBODY)
    assert r.failure is not None and (r.failure.code, r.failure.enhanced) == (451, "4.4.3")


def mx_connector(port: int) -> str:
    return ('[[send_connector]]\nName = "Internet"\nUsage = "Internet"\nAddressSpaces = ["*"]\n'
            f'UseExternalDNSServersEnabled = true\nPort = {port}\n'
            'ConnectionInactivityTimeOut = "5s"\n')


async def test_mx_delivery_with_failover(tmp_path: Path, dns_port: int) -> None:
    # mx1 (127.0.0.1) has nobody on the port; mx2 (127.0.0.2) runs the sink
    with ScriptedSink(host="127.0.0.2") as sink:
        org = load_org(tmp_path, mx_connector(sink.port),
                       server_extra=f'ExternalDnsServers = ["127.0.0.1:{dns_port}"]')
        connector = org.connector("Internet")
        assert connector.delivery_type == "DnsConnectorDelivery"
        hop = NextHop("DnsConnectorDelivery", "*", "Internet")
        from hubport.plugins.smtp_send.delivery import deliver_items
        it = item(["a@example.test", "b@nullmx.test", "c@nothere.test"])
        [result] = await deliver_items(hop, connector, [it], context(org))
        outcome = await deliver_items(hop, connector, [item(["d@amx.test"])], context(org))
    by = {r.address: result.recipients[r.id] for r in it.recipients}
    assert by["a@example.test"].kind == DELIVERED
    assert by["b@nullmx.test"].kind == FAILED and by["b@nullmx.test"].response.code == 556
    assert by["c@nothere.test"].kind == FAILED
    assert by["c@nothere.test"].response.enhanced == "5.4.4"
    assert sink.received[0].rcpt_tos == ["a@example.test"]
    assert isinstance(outcome, DeferQueue)  # amx.test -> 127.0.0.3: refused, retry later
    assert kinds(result).count(DELIVERED) == 1


# -- A and AAAA judged together (issue 10, finding 3) --------------------------------------


@pytest.mark.parametrize("domain, host, addresses", [
    ("aonly.test", "aonly.test", ("127.0.0.2",)),  # MX and AAAA NXDOMAIN, A answers
    ("viaaonly.test", "mx.aonly.test", ("127.0.0.2",)),  # the MX target's AAAA: NXDOMAIN
    ("v6only.test", "v6only.test", ("::1",)),  # A NXDOMAIN, AAAA answers
])
async def test_nxdomain_for_one_family_is_no_address_of_that_family(
        dns_port: int, domain: str, host: str, addresses: tuple[str, ...]) -> None:
    r = await resolve_mx(domain, make_resolver([("127.0.0.1", dns_port)]), 25, NOBODY)
    assert r.failure is None, r.failure
    assert hosts(r) == [host] and r.targets[0].addresses == addresses


async def test_a_host_whose_aaaa_says_nxdomain_gets_its_mail(tmp_path: Path,
                                                              dns_port: int) -> None:
    """dnsmasq's --address answers A and NXDOMAIN for AAAA and MX: the mail is delivered."""
    with ScriptedSink(host="127.0.0.2") as sink:
        org = load_org(tmp_path, mx_connector(sink.port),
                       server_extra=f'ExternalDnsServers = ["127.0.0.1:{dns_port}"]')
        hop = NextHop("DnsConnectorDelivery", "*", "Internet")
        from hubport.plugins.smtp_send.delivery import deliver_items
        it = item(["a@aonly.test", "b@viaaonly.test"])
        [result] = await deliver_items(hop, org.connector("Internet"), [it], context(org))
    assert kinds(result) == [DELIVERED, DELIVERED], result
    assert sorted(a for r in sink.received for a in r.rcpt_tos) == ["a@aonly.test",
                                                                    "b@viaaonly.test"]


MX = ("mail.test", "MX")


@pytest.mark.parametrize("script, outcome", [
    # the other family's failure does not hide the addresses found
    ({("mx.mail.test", "A"): ["127.0.0.2"], ("mx.mail.test", "AAAA"): "SERVFAIL"},
     ["127.0.0.2"]),
    ({("mx.mail.test", "A"): "SERVFAIL", ("mx.mail.test", "AAAA"): ["::1"]}, ["::1"]),
    ({("mx.mail.test", "A"): ["127.0.0.2"], ("mx.mail.test", "AAAA"): "DROP"},
     ["127.0.0.2"]),
    ({("mx.mail.test", "A"): ["127.0.0.2"], ("mx.mail.test", "AAAA"): "REFUSED"},
     ["127.0.0.2"]),
    ({("mx.mail.test", "A"): ["127.0.0.2"], ("mx.mail.test", "AAAA"): []}, ["127.0.0.2"]),
    # no address, and one family failed: try later, never bounce
    ({("mx.mail.test", "A"): "SERVFAIL", ("mx.mail.test", "AAAA"): "NXDOMAIN"}, "4.4.3"),
    ({("mx.mail.test", "A"): [], ("mx.mail.test", "AAAA"): "DROP"}, "4.4.3"),
    # the name has no address at all: permanent
    ({("mx.mail.test", "A"): "NXDOMAIN", ("mx.mail.test", "AAAA"): "NXDOMAIN"}, "5.4.4"),
    ({("mx.mail.test", "A"): [], ("mx.mail.test", "AAAA"): "NXDOMAIN"}, "5.4.4"),
], ids=["aaaa-servfail", "a-servfail", "aaaa-silent", "aaaa-refused", "aaaa-nodata",
        "a-servfail-aaaa-nxdomain", "a-nodata-aaaa-silent", "both-nxdomain",
        "a-nodata-aaaa-nxdomain"])
async def test_mx_target_families_judged_together(monkeypatch: pytest.MonkeyPatch,
                                                  script: dict, outcome: object) -> None:
    monkeypatch.setattr(resolver, "DNS_TIMEOUT", 0.3)
    monkeypatch.setattr(resolver, "DNS_LIFETIME", 1.0)
    monkeypatch.setattr(resolver, "ADDRESS_GRACE", 0.5, raising=False)
    with ScriptedDns({MX: ["10 mx.mail.test."], **script}) as dns:
        r = await resolve_mx("mail.test", make_resolver([("127.0.0.1", dns.port)]), 25, NOBODY)
    if isinstance(outcome, list):
        assert r.failure is None, r.failure
        assert hosts(r) == ["mx.mail.test"] and list(r.targets[0].addresses) == outcome
    else:
        assert r.failure is not None and r.failure.enhanced == outcome, r.failure
    assert ("mx.mail.test", "A") in dns.queries and ("mx.mail.test", "AAAA") in dns.queries


@pytest.mark.parametrize("script, outcome", [
    ({("mail.test", "A"): ["127.0.0.2"]}, ["127.0.0.2"]),  # MX NXDOMAIN, yet an address
    ({("mail.test", "A"): "SERVFAIL"}, "4.4.3"),  # MX NXDOMAIN, A unknown: try later
    ({}, "5.4.4"),  # NXDOMAIN for everything: the domain does not exist
], ids=["a-answers", "a-servfail", "all-nxdomain"])
async def test_mx_nxdomain_is_checked_against_the_addresses(
        monkeypatch: pytest.MonkeyPatch, script: dict, outcome: object) -> None:
    monkeypatch.setattr(resolver, "DNS_TIMEOUT", 0.3)
    monkeypatch.setattr(resolver, "DNS_LIFETIME", 1.0)
    with ScriptedDns({MX: "NXDOMAIN", **script}) as dns:
        r = await resolve_mx("mail.test", make_resolver([("127.0.0.1", dns.port)]), 25, NOBODY)
    if isinstance(outcome, list):
        assert r.failure is None and hosts(r) == ["mail.test"], r
        assert list(r.targets[0].addresses) == outcome
        assert dns.queries.count(("mail.test", "A")) == 1  # looked up once, not twice
    else:
        assert r.failure is not None and r.failure.enhanced == outcome, r.failure
