"""Routing Group connectors and legacy routing groups (core/routing_groups.py,
plugins/smtp_send/routing_group.py; docs/exchange.md, "Routing Group connectors").

A real daemon reaches a legacy routing group of two aiosmtpd servers: the first target is
down, so its mail fails over to the second, one copy for the recipients homed there and the
group's address space. The reciprocal connector (Bidirectional) makes the legacy servers
ExchangeLegacyServers on our receive connector: by their address, or by the certificate
they present; anyone else gets none of those rights.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from daemon_process import DaemonPool, daemon_pool, hubport
from hubport.core.config import load_organization
from hubport.core.config_fields import ConfigError
from hubport.core.hooks import Hooks
from hubport.core.routing import RoutingTable
from send_peers import ScriptedSink
from smtp_support import Client, body, free_port, receive_connector
from support import maildir, wait_for_sync, write_org

pytestmark = pytest.mark.timeout(180)

HOOKS = Hooks(entry_points=False)


def legacy_org(folder: Path, *, a_port: int, b_port: int, b_host: str = "127.0.0.2",
               certificate: Path | None = None, cost: int = 5, extra: str = "") -> Path:
    pin = f', Certificate = "{certificate}"' if certificate else ""
    text = f"""
[[accepted_domain]]
Name = "legacy.example"
DomainName = "legacy.example"
DomainType = "InternalRelay"

[[routing_group]]
Name = "First Routing Group"
Servers = [{{ Name = "ex2003a.contoso.test", Address = "127.0.0.3", Port = {a_port}{pin} }},
           {{ Name = "ex2003b.contoso.test", Address = "{b_host}", Port = {b_port} }}]
AddressSpaces = ["legacy.example"]

[[routing_group_connector]]
Name = "Interop RGC"
TargetTransportServers = ["ex2003a.contoso.test", "ex2003b.contoso.test"]
Cost = {cost}
Bidirectional = true

[[mailbox]]
Name = "Olga"
PrimarySmtpAddress = "olga@contoso.test"
RoutingGroup = "First Routing Group"
""" + extra
    return write_org(folder, extra=text)


def load(path: Path):  # type: ignore[no-untyped-def]
    return load_organization(path, HOOKS.registry.connector_types)


def test_the_reciprocal_is_an_object_of_its_own_and_the_cost_counts(tmp_path: Path) -> None:
    org = load(legacy_org(tmp_path, a_port=2601, b_port=2602, cost=5, extra="""
[[send_connector]]
Name = "Legacy by smart host"
AddressSpaces = ["SMTP:legacy.example;3"]
SmartHosts = ["[127.0.0.1]"]
"""))
    rgc, reciprocal = org.connector("Interop RGC"), org.connector("Interop RGC (reciprocal)")
    assert reciprocal.reciprocal_of == "Interop RGC"  # type: ignore[attr-defined]
    assert reciprocal.legacy_source_servers == (  # type: ignore[attr-defined]
        "ex2003a.contoso.test", "ex2003b.contoso.test")
    assert reciprocal.target_transport_servers == ("HUB01",)  # type: ignore[attr-defined]
    assert rgc.target_routing_group == "First Routing Group"  # type: ignore[attr-defined]
    assert {s.name for s in org.legacy_servers} == {"ex2003a.contoso.test",
                                                    "ex2003b.contoso.test"}
    table = RoutingTable(org, org.server("HUB01"))
    # equally specific: the send connector's cost 3 beats the routing group connector's 5
    assert table.choose("SMTP", "x@legacy.example", 100).candidate.name == \
        "Legacy by smart host"  # type: ignore[union-attr]
    # a homed recipient has one way there, and the reciprocal never carries our mail
    home = table.choose("RoutingGroup", "First Routing Group", 100).candidate
    assert home is not None and home.name == "Interop RGC"
    assert (home.next_hop.delivery_type, home.next_hop.domain) == (
        "SmtpRelayToTiRg", "First Routing Group")
    cheap = load(legacy_org(tmp_path, a_port=2601, b_port=2602, cost=1, extra="""
[[send_connector]]
Name = "Legacy by smart host"
AddressSpaces = ["SMTP:legacy.example;3"]
SmartHosts = ["[127.0.0.1]"]
"""))
    chosen = RoutingTable(cheap, cheap.server("HUB01")).choose("SMTP", "x@legacy.example", 100)
    assert chosen.candidate is not None and chosen.candidate.name == "Interop RGC"

    done = hubport("test-config", "--config", str(tmp_path / "org.toml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert 'RoutingGroupConnector "Interop RGC (reciprocal)": First Routing Group ->' \
        in done.stdout, done.stdout


@pytest.mark.parametrize(("text", "field", "reason"), [
    ('[[routing_group]]\nName = "Empty"\n', "Servers", "at least one server"),
    ('[[routing_group]]\nName = "G"\nServers = [{ Address = "legacy.example" }]\n',
     "Address", "not an IP address"),
    ('[[routing_group]]\nName = "G"\nServers = [{ Address = "127.0.0.1", Colour = 1 }]\n',
     "Colour", "unknown field"),
    ('[[routing_group]]\nName = "G"\nServers = [{ Address = "127.0.0.1" }]\n'
     '[[routing_group_connector]]\nName = "C"\nTargetTransportServers = ["nowhere"]\n',
     "TargetTransportServers", '"nowhere" is no server of a [[routing_group]]'),
    ('[[routing_group]]\nName = "G"\nServers = [{ Address = "127.0.0.1" }]\n'
     '[[routing_group]]\nName = "H"\nServers = [{ Address = "127.0.0.2" }]\n'
     '[[routing_group_connector]]\nName = "C"\n'
     'TargetTransportServers = ["127.0.0.1", "127.0.0.2"]\n',
     "TargetTransportServers", "different routing groups"),
    ('[[routing_group]]\nName = "G"\nServers = [{ Address = "127.0.0.1" }]\n'
     '[[routing_group_connector]]\nName = "C"\nTargetTransportServers = ["127.0.0.1"]\n'
     'SourceTransportServers = ["HUB09"]\n', "SourceTransportServers", "HUB09"),
    ('[[routing_group]]\nName = "G"\nServers = [{ Address = "127.0.0.1" }]\n'
     '[[routing_group_connector]]\nName = "C"\nTargetTransportServers = ["127.0.0.1"]\n'
     'AddressSpaces = ["*"]\n', "AddressSpaces", "set them on the [[routing_group]]"),
    ('[[mailbox]]\nName = "Lost"\nRoutingGroup = "Atlantis"\n', "RoutingGroup",
     'no routing group named "Atlantis"'),
    ('[[routing_group]]\nName = "G"\nServers = [{ Address = "127.0.0.1" }]\n'
     '[[mailbox]]\nName = "Both"\nRoutingGroup = "G"\nServer = "HUB01"\n', "RoutingGroup",
     "not both"),
])
def test_a_routing_group_that_cannot_work_is_a_config_error(
        tmp_path: Path, text: str, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write_org(tmp_path, extra=text))
    message = str(info.value)
    assert field in message and reason in message, message


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def test_mail_reaches_the_legacy_group_with_failover_and_its_servers_get_their_rights(
        tmp_path: Path, pool: DaemonPool) -> None:
    pinned_ca = trustme.CA()
    pinned = pinned_ca.issue_cert("ex2003a.contoso.test")
    certificate = tmp_path / "ex2003a.crt"
    certificate.write_bytes(pinned.cert_chain_pems[0].bytes())
    front, legacy_in = free_port(), free_port()
    down = free_port()  # ex2003a (127.0.0.3): nothing listens there
    with ScriptedSink(host="127.0.0.2") as ex2003b:
        extra = receive_connector("Default HUB01", [f"127.0.0.1:{front}"],
                                  PermissionGroups=["AnonymousUsers"])
        extra += receive_connector("From legacy", [f"127.0.0.1:{legacy_in}"],
                                   AuthMechanism=["Tls"],
                                   PermissionGroups=["ExchangeLegacyServers"])
        config = legacy_org(tmp_path, a_port=down, b_port=ex2003b.port,
                            certificate=certificate, extra=extra)
        hub = pool.start(config=config)
        hub.wait_ready(60)

        # Olga (homed there) and the group's address space travel as one copy, to the
        # second target server since the first does not answer
        asyncio.run(send_two(front))
        got = wait_for_sync(lambda: ex2003b.received or None, 60,
                            what="mail at the legacy group's second server")
        assert len(got) == 1, got
        assert sorted(got[0].rcpt_tos) == ["olga@contoso.test", "pat@legacy.example"]
        assert b"Subject: to the old world" in got[0].data

        done = hubport("get-messagetrackinglog", "--config", str(config), "-eventid", "SEND",
                       "-format", "json", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        sends = [json.loads(line) for line in done.stdout.splitlines() if line]
        assert sends and all(e["connector-id"].endswith("Interop RGC") for e in sends), \
            done.stdout
        assert {a for e in sends for a in e["recipient-address"]} == {
            "olga@contoso.test", "pat@legacy.example"}, done.stdout

        # ex2003b (127.0.0.2) relays through us: ExchangeLegacyServers by its address
        asyncio.run(send_one_from(legacy_in, "127.0.0.2", None, "dora@elsewhere.example",
                                  expect=250))
        # the same from 127.0.0.1, with no certificate: no rights at all
        asyncio.run(send_one_from(legacy_in, "127.0.0.1", None, "alice@contoso.test",
                                  expect=530))
        # ex2003a's pinned certificate proves it from any address
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        pinned.configure_cert(context)
        asyncio.run(send_one_from(legacy_in, "127.0.0.1", context, "alice@contoso.test",
                                  expect=250))
        wait_for_sync(lambda: maildir(tmp_path, "Alice") or None, 60, what="Alice's mail")
        # a certificate for the same name from another CA proves nothing
        stranger = ssl.create_default_context()
        stranger.check_hostname, stranger.verify_mode = False, ssl.CERT_NONE
        trustme.CA().issue_cert("ex2003a.contoso.test").configure_cert(stranger)
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            asyncio.run(send_one_from(legacy_in, "127.0.0.1", stranger,
                                      "alice@contoso.test", expect=250))


async def send_two(port: int) -> None:
    client = await Client.connect(port)
    await client.hello("client.example")
    assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
    for rcpt in ("olga@contoso.test", "pat@legacy.example"):
        reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        assert reply.code == 250, reply
    assert (await client.cmd("DATA")).code == 354
    await client.send(body("to the old world", to="olga@contoso.test") + b"\r\n.\r\n")
    assert (await client.reply()).code == 250
    await client.close()


async def send_one_from(port: int, source: str, tls: ssl.SSLContext | None, rcpt: str, *,
                        expect: int) -> None:
    client = await Client.connect(port, source=source)
    try:
        await client.hello("ex2003.contoso.test")
        if tls is not None:
            assert (await client.cmd("STARTTLS")).code == 220
            await client.writer.start_tls(tls, server_hostname="")
            assert (await client.cmd("EHLO ex2003.contoso.test")).code == 250
        reply = await client.cmd("MAIL FROM:<old@legacy.example>")
        if expect != 250:
            assert (reply.code, reply.enhanced) == (expect, "5.7.1"), reply
            return
        assert reply.code == 250, reply
        reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        assert reply.code == 250, reply
        assert (await client.cmd("DATA")).code == 354
        await client.send(body("from the old world", "old@legacy.example", rcpt)
                          + b"\r\n.\r\n")
        assert (await client.reply()).code == 250
    finally:
        await client.close()
