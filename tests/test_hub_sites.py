"""Sites and hub sites with three real hubs on loopback (docs/exchange.md, "Sites and hub
sites"): Paris (HUB01), London (HUB02, a hub site) and Tokyo (HUB03, Kenji's mailbox).

Every hub-facing receive connector has Exchange's defaults for hubs (ExchangeServers only),
so each hop also proves hub-to-hub trust. Paris → Tokyo mail is staged in London; with
Tokyo's hub down it waits in London's queue (the point of failure) and arrives once Tokyo
is back. Each hop is read back from that hub's own tracking log.
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
from smtp_support import free_port, receive_connector, send_one
from support import THREE_SITES, wait_for_sync, write_org

pytestmark = pytest.mark.timeout(240)

HUBS = {"HUB01": "Paris", "HUB02": "London", "HUB03": "Tokyo"}


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def organization(folder: Path, ports: dict[str, int]) -> Path:
    sites = THREE_SITES
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
    mailbox = """
[[mailbox]]
Name = "Kenji"
PrimarySmtpAddress = "kenji@contoso.test"
Server = "HUB03"
"""
    connectors = receive_connector(
        "Default HUB01", [f"127.0.0.1:{ports['HUB01']}"], Server="HUB01",
        AuthMechanism=["Tls", "ExchangeServer"],
        PermissionGroups=["AnonymousUsers", "ExchangeServers"])
    for name in ("HUB02", "HUB03"):
        connectors += receive_connector(
            f"Default {name}", [f"127.0.0.1:{ports[name]}"], Server=name,
            AuthMechanism=["Tls", "ExchangeServer"], PermissionGroups=["ExchangeServers"])
    return write_org(folder, server_extra='Site = "Paris"\nFqdn = "hub01.contoso.test"',
                     extra=sites + servers + mailbox + connectors)


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


def inbox(root: Path) -> list[bytes]:
    folder = root / "var-HUB03" / "mailboxes" / "Kenji" / "new"
    return [p.read_bytes() for p in sorted(folder.glob("*"))] if folder.is_dir() else []


def start(pool: DaemonPool, root: Path, name: str) -> Daemon:
    daemon = pool.start("--server", name, config=root / "org.toml")
    daemon.wait_ready(60)
    return daemon


def test_paris_to_tokyo_is_staged_in_the_london_hub_site_and_waits_there_for_tokyo(
        tmp_path: Path, pool: DaemonPool) -> None:
    ports = {name: free_port() for name in HUBS}
    organization(tmp_path, ports)
    hubs = {name: start(pool, tmp_path, name) for name in HUBS}

    asyncio.run(send_one(ports["HUB01"], "kenji@contoso.test", "staged in London"))
    wait_for_sync(lambda: any(b"staged in London" in m for m in inbox(tmp_path)), 60,
                  what="Kenji's mail from Paris")
    (mail,) = inbox(tmp_path)
    # three hubs stamped it, in the order it travelled
    order = re.findall(rb"\bby (hub0\d)\.contoso\.test", mail)
    assert order == [b"hub03", b"hub02", b"hub01"], mail[:1500]
    assert {"RECEIVE", "SEND"} <= tracked(tmp_path, "HUB01", "staged in London")
    assert {"RECEIVE", "SEND"} <= tracked(tmp_path, "HUB02", "staged in London")
    assert {"RECEIVE", "DELIVER"} <= tracked(tmp_path, "HUB03", "staged in London")

    # Tokyo's hub goes down: the next message leaves Paris and waits in London
    hubs["HUB03"].signal(signal.SIGTERM)
    assert hubs["HUB03"].wait(60) == 0
    asyncio.run(send_one(ports["HUB01"], "kenji@contoso.test", "waits in London"))

    london: list[dict[str, object]] = []

    def london_holds_it() -> object:
        london[:] = query(tmp_path, "HUB02", "get-queue")
        rows = [r for r in london
                if r.get("next_hop") == "HUB03" and r.get("message_count")]
        return rows and rows[0].get("last_error") and rows[0]

    row = wait_for_sync(london_holds_it, 60, what="London's queue for HUB03 holds the message",
                        describe=lambda: london)
    assert "hub03.contoso.test" in str(row), row  # the queue says why it waits
    paris = [r for r in query(tmp_path, "HUB01", "get-queue")
             if str(r.get("delivery_type", "")).startswith("SmtpRelay")]
    assert all(r["message_count"] == 0 for r in paris), paris  # nothing waits in Paris

    start(pool, tmp_path, "HUB03")
    wait_for_sync(lambda: any(b"waits in London" in m for m in inbox(tmp_path)), 90,
                  what="the waiting mail once Tokyo is back")
    assert len(inbox(tmp_path)) == 2  # each message once
