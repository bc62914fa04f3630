"""Sites and hub sites with three real hubs on loopback (docs/exchange.md, "Sites and hub
sites"): Paris (HUB01, Pierre), London (HUB02, a hub site: Liz, and the Send connector for
london.example) and Tokyo (HUB03, Kenji, and the Send connector for tokyo.example).

Every hub-facing receive connector has Exchange's defaults for hubs (ExchangeServers only,
no AnonymousUsers); clients submit to HUB01's own Internet connector. One message to all
five recipients leaves Paris as one copy (delayed fan-out: every path starts with London),
London delivers its own and sends one copy on to Tokyo. With Tokyo's hub killed (SIGKILL)
the next message waits in London's queue (the point of failure) and arrives once Tokyo is
back. Each hop is read back from that hub's own tracking log; nothing is lost or doubled.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_process import Daemon, DaemonPool, daemon_pool, hubport
from hubport.core.config import load_organization
from hubport.core.hooks import Hooks
from hubport.core.model import NextHop
from hubport.plugins.smtp_send import resolver
from send_peers import ScriptedSink
from smtp_support import Client, body, free_port, receive_connector
from support import THREE_SITES, wait_for_sync, write_org

pytestmark = pytest.mark.timeout(300)

HUBS = {"HUB01": "Paris", "HUB02": "London", "HUB03": "Tokyo"}
MAILBOXES = {"Pierre": "HUB01", "Liz": "HUB02", "Kenji": "HUB03"}
EVERYONE = ["pierre@contoso.test", "liz@contoso.test", "kenji@contoso.test",
            "ann@london.example", "bob@tokyo.example"]


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def organization(folder: Path, ports: dict[str, int], sink: int, *,
                 hub_site: bool = True) -> Path:
    sites = THREE_SITES if hub_site else THREE_SITES.replace("HubSiteEnabled = true\n", "")
    servers = "".join(f"""
[[transport_server]]
Name = "{name}"
Site = "{HUBS[name]}"
Fqdn = "{name.lower()}.contoso.test"
StateDirectory = "var-{name}"
PickupDirectoryPath = "pickup-{name}"
ReplayDirectoryPath = "replay-{name}"
RootDropDirectoryPath = "drop-{name}"
QueueGlitchRetryInterval = "1s"
TransientFailureRetryInterval = "1s"
OutboundConnectionFailureRetryInterval = "1s"
MessageRetryInterval = "1s"
""" for name in ("HUB02", "HUB03"))
    recipients = "".join(f"""
[[mailbox]]
Name = "{name}"
PrimarySmtpAddress = "{name.lower()}@contoso.test"
Server = "{server}"
""" for name, server in MAILBOXES.items())
    for domain, server in (("london.example", "HUB02"), ("tokyo.example", "HUB03")):
        recipients += f"""
[[accepted_domain]]
Name = "{domain}"
DomainName = "{domain}"
DomainType = "InternalRelay"

[[send_connector]]
Name = "To {domain}"
AddressSpaces = ["{domain}"]
SourceTransportServers = ["{server}"]
SmartHosts = ["[127.0.0.1]"]
Port = {sink}
"""
    connectors = receive_connector(
        "Internet HUB01", [f"127.0.0.1:{ports['client']}"], Server="HUB01",
        PermissionGroups=["AnonymousUsers"])
    for name in HUBS:
        connectors += receive_connector(
            f"Default {name}", [f"127.0.0.1:{ports[name]}"], Server=name,
            AuthMechanism=["Tls", "ExchangeServer"], PermissionGroups=["ExchangeServers"])
    return write_org(folder, server_extra='Site = "Paris"\nFqdn = "hub01.contoso.test"',
                     extra=sites + servers + recipients + connectors)


def query(root: Path, server: str, *args: str) -> list[dict[str, object]]:
    done = hubport(*args, "--config", str(root / "org.toml"), "--server", server,
                   "-format", "json", cwd=root)
    assert done.returncode == 0, done.stderr
    text = done.stdout.strip()
    if text.startswith("["):
        rows: list[dict[str, object]] = json.loads(text)
        return rows
    return [json.loads(line) for line in text.splitlines() if line]


def tracked(root: Path, server: str, subject: str) -> set[str]:
    """The event ids the hub's own tracking log holds for a message."""
    return {str(e["event-id"]) for e in query(root, server, "get-messagetrackinglog")
            if e.get("message-subject") == subject}


def inbox(root: Path, name: str) -> list[bytes]:
    state = "var" if MAILBOXES[name] == "HUB01" else f"var-{MAILBOXES[name]}"
    folder = root / state / "mailboxes" / name / "new"
    return [p.read_bytes() for p in sorted(folder.glob("*"))] if folder.is_dir() else []


def sends(root: Path, server: str, subject: str) -> list[dict[str, object]]:
    return [e for e in query(root, server, "get-messagetrackinglog", "-eventid", "SEND")
            if e.get("message-subject") == subject]


async def submit(port: int, subject: str, recipients: list[str]) -> None:
    client = await Client.connect(port)
    await client.hello("client.example")
    assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
    for rcpt in recipients:
        reply = await client.cmd(f"RCPT TO:<{rcpt}>")
        assert reply.code == 250, reply
    assert (await client.cmd("DATA")).code == 354
    await client.send(body(subject) + b"\r\n.\r\n")
    assert (await client.reply()).code == 250
    await client.close()


def start(pool: DaemonPool, root: Path, name: str) -> Daemon:
    daemon = pool.start("--server", name, config=root / "org.toml")
    daemon.wait_ready(60)
    return daemon


def test_mail_to_every_site_and_connector_takes_its_path_and_waits_at_the_point_of_failure(
        tmp_path: Path, pool: DaemonPool) -> None:
    ports = {name: free_port() for name in (*HUBS, "client")}
    with ScriptedSink() as sink:
        organization(tmp_path, ports, sink.port)
        hubs = {name: start(pool, tmp_path, name) for name in HUBS}

        asyncio.run(submit(ports["client"], "to every site", EVERYONE))
        for name in MAILBOXES:
            wait_for_sync(lambda name=name: inbox(tmp_path, name), 90,  # type: ignore[misc]
                          what=f"{name}'s mail")
        wait_for_sync(lambda: len(sink.received) >= 2, 90, what="both connectors' mail",
                      describe=lambda: [r.rcpt_tos for r in sink.received])
        # each hub stamped the copy it handled, in the order it travelled
        (kenji,) = inbox(tmp_path, "Kenji")
        assert re.findall(rb"\bby (hub0\d)\.contoso\.test", kenji) == \
            [b"hub03", b"hub02", b"hub01"], kenji[:1500]
        (liz,) = inbox(tmp_path, "Liz")
        assert re.findall(rb"\bby (hub0\d)\.contoso\.test", liz) == [b"hub02", b"hub01"]
        (pierre,) = inbox(tmp_path, "Pierre")
        assert re.findall(rb"\bby (hub0\d)\.contoso\.test", pierre) == [b"hub01"]
        by_rcpt = {tuple(r.rcpt_tos): r.data for r in sink.received}
        assert set(by_rcpt) == {("ann@london.example",), ("bob@tokyo.example",)}, by_rcpt

        # Paris sent one copy to London for the four recipients beyond it (delayed fan-out)
        (paris,) = sends(tmp_path, "HUB01", "to every site")
        assert sorted(paris["recipient-address"]) == sorted(EVERYONE[1:])  # type: ignore[arg-type]
        # London: one copy on to Tokyo for Kenji and tokyo.example, one out its connector
        london = {tuple(sorted(e["recipient-address"])): e  # type: ignore[arg-type]
                  for e in sends(tmp_path, "HUB02", "to every site")}
        assert set(london) == {("bob@tokyo.example", "kenji@contoso.test"),
                               ("ann@london.example",)}, london
        assert str(london[("ann@london.example",)]["connector-id"]).endswith(
            "To london.example")
        (tokyo,) = sends(tmp_path, "HUB03", "to every site")
        assert tokyo["recipient-address"] == ["bob@tokyo.example"]
        assert {"RECEIVE", "DELIVER"} <= tracked(tmp_path, "HUB03", "to every site")

        # Tokyo's hub dies: the next message leaves Paris and waits in London for Tokyo
        hubs["HUB03"].signal(signal.SIGKILL)
        hubs["HUB03"].wait(60)
        asyncio.run(submit(ports["client"], "waits in London",
                           ["kenji@contoso.test", "bob@tokyo.example"]))
        london_queues: list[dict[str, object]] = []

        def london_holds_it() -> object:
            london_queues[:] = query(tmp_path, "HUB02", "get-queue")
            rows = [r for r in london_queues
                    if r.get("next_hop") == "Tokyo" and r.get("message_count")]
            return rows and rows[0].get("last_error") and rows[0]

        row = wait_for_sync(london_holds_it, 60, what="London's queue for Tokyo holds it",
                            describe=lambda: london_queues)
        assert "hub03.contoso.test" in str(row), row  # the queue says why it waits
        paris_queues = [r for r in query(tmp_path, "HUB01", "get-queue")
                        if str(r.get("delivery_type", "")).startswith("SmtpRelay")]
        assert all(r["message_count"] == 0 for r in paris_queues), paris_queues

        start(pool, tmp_path, "HUB03")
        wait_for_sync(lambda: len(inbox(tmp_path, "Kenji")) >= 2, 90,
                      what="the waiting mail once Tokyo is back")
        wait_for_sync(lambda: len(sink.received) >= 3, 90, what="tokyo.example's second mail")
        # each message once: nothing lost, nothing doubled, in any mailbox or out any connector
        assert [len(inbox(tmp_path, n)) for n in MAILBOXES] == [1, 1, 2]
        assert sorted(tuple(r.rcpt_tos) for r in sink.received) == [
            ("ann@london.example",), ("bob@tokyo.example",), ("bob@tokyo.example",)]


def test_without_a_hub_site_paris_relays_straight_to_tokyo_and_backs_off_to_london(
        tmp_path: Path, pool: DaemonPool) -> None:
    """London is on the least-cost path but no hub site: Paris relays straight to Tokyo.
    With Tokyo's hub down, Paris moves back along the path and hands the mail to London,
    the closest reachable site, where it waits (Exchange's queue at the point of failure)."""
    ports = {name: free_port() for name in (*HUBS, "client")}
    with ScriptedSink() as sink:
        organization(tmp_path, ports, sink.port, hub_site=False)
        hubs = {name: start(pool, tmp_path, name) for name in HUBS}
        asyncio.run(submit(ports["client"], "straight to Tokyo", ["kenji@contoso.test"]))
        wait_for_sync(lambda: inbox(tmp_path, "Kenji"), 90, what="Kenji's first mail")
        assert re.findall(rb"\bby (hub0\d)\.contoso\.test", inbox(tmp_path, "Kenji")[0]) \
            == [b"hub03", b"hub01"]

        hubs["HUB03"].signal(signal.SIGKILL)
        hubs["HUB03"].wait(60)
        asyncio.run(submit(ports["client"], "backs off to London", ["kenji@contoso.test"]))
        queues: list[dict[str, object]] = []

        def london_holds_it() -> object:
            queues[:] = query(tmp_path, "HUB02", "get-queue")
            return [r for r in queues if r.get("next_hop") == "Tokyo"
                    and r.get("message_count") and r.get("last_error")]

        wait_for_sync(london_holds_it, 60, what="London holds the mail for Tokyo",
                      describe=lambda: queues)
        start(pool, tmp_path, "HUB03")
        wait_for_sync(lambda: len(inbox(tmp_path, "Kenji")) >= 2, 90,
                      what="the mail once Tokyo is back")
        late = [m for m in inbox(tmp_path, "Kenji") if b"backs off to London" in m]
        assert len(late) == 1 and len(inbox(tmp_path, "Kenji")) == 2
        assert re.findall(rb"\bby (hub0\d)\.contoso\.test", late[0]) == \
            [b"hub03", b"hub02", b"hub01"]
        assert sink.received == []


def test_a_relay_that_comes_back_to_its_own_server_fails_with_5_3_5(tmp_path: Path) -> None:
    """HUB02's receive connector is declared on HUB01's own address: relaying there would
    send the mail back to HUB01 itself."""
    extra = """
[[site]]
Name = "Paris"

[[transport_server]]
Name = "HUB02"
Site = "Paris"
StateDirectory = "var2"
""" + receive_connector("Default HUB01", ["127.0.0.1:2701"], Server="HUB01",
                        AuthMechanism=["Tls", "ExchangeServer"],
                        PermissionGroups=["ExchangeServers"]) + receive_connector(
        "Default HUB02", ["127.0.0.1:2701"], Server="HUB02",
        AuthMechanism=["Tls", "ExchangeServer"], PermissionGroups=["ExchangeServers"])
    org = load_organization(write_org(tmp_path, server_extra='Site = "Paris"', extra=extra),
                            Hooks(entry_points=False).registry.connector_types)

    async def lookup(name: str) -> list[str] | None:
        return None

    resolution = asyncio.run(resolver.resolve_hub(
        org, org.server("HUB01"), NextHop("SmtpRelayWithinAdSite", "HUB02", ""), lookup))
    assert resolution.failure is not None, resolution
    assert (resolution.failure.code, resolution.failure.enhanced) == (554, "5.3.5")
    assert "HUB02" in resolution.failure.text
