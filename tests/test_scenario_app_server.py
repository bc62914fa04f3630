"""The article's application server (docs/scenarios.md, scenario 4): a custom Receive
connector that takes mail only from one application server's address and lets it relay,
set up with cmdlets only; everyone else is refused there, and the Default connector keeps
its own rules (no relay for anonymous senders)."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest

from daemon_process import daemon_pool
from scenario_support import run
from send_peers import ScriptedSink, free_port
from support import wait_for_sync

pytestmark = pytest.mark.timeout(120)

APP, OTHER = "127.0.0.5", "127.0.0.6"  # the application server, and someone else



def _client(port: int, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP(timeout=20, source_address=(source, 0))
    client.connect("127.0.0.1", port)
    client.ehlo("app.contoso.test")
    return client


def test_the_application_server_relays_through_its_own_connector_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    default_port, app_port = free_port(), free_port()
    internet = ScriptedSink(host="127.0.0.1")
    for line in (
        f"Set-ReceiveConnector 'HUB01\\Default HUB01' -Bindings 127.0.0.1:{default_port}",
        f"Set-ReceiveConnector 'HUB01\\Client HUB01' -Bindings 127.0.0.1:{free_port()}",
        "New-SendConnector -Name 'To Internet' -Usage Custom -AddressSpaces 'SMTP:*;1'"
        " -DNSRoutingEnabled $false -SmartHosts '[127.0.0.1]' -Port"
        f" {internet.port} -SmartHostAuthMechanism None -SourceTransportServers HUB01",
        f"New-ReceiveConnector -Name 'From App' -Usage Custom -Bindings 127.0.0.1:{app_port}"
        f" -RemoteIPRanges {APP} -PermissionGroups AnonymousUsers -Server HUB01",
        "Add-ADPermission -Identity 'From App' -User 'NT AUTHORITY\\ANONYMOUS LOGON'"
        " -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient",
    ):
        run(home, line)
    with internet, daemon_pool(tmp_path) as pool:
        pool.start(cwd=home).wait_ready()

        with _client(app_port, APP) as app:  # the application server relays
            app.sendmail("reports@contoso.test", ["customer@example.org"],
                         b"Subject: nightly report\r\n\r\nFigures.\r\n")
        wait_for_sync(lambda: len(internet.received) == 1, timeout=30,
                      describe=lambda: internet.received, what="the relayed report")
        assert internet.received[0].rcpt_tos == ["customer@example.org"]

        with pytest.raises((smtplib.SMTPException, OSError)) as refused:  # someone else
            with _client(app_port, OTHER) as other:
                other.sendmail("x@example.net", ["customer@example.org"], b"Subject: x\r\n\r\n")
        print("another host on the application connector:", refused.value)

        with _client(default_port, APP) as anonymous:  # the Default connector: no relay
            code, reply = anonymous.mail("reports@contoso.test")
            assert code == 250, reply
            code, reply = anonymous.rcpt("customer@example.org")
            assert code == 550 and b"5.7.1" in reply, (code, reply)
            code, reply = anonymous.rcpt("alice@contoso.test")  # its own recipients: yes
            assert code == 250, reply
        assert len(internet.received) == 1  # nothing else left for the Internet

        events = json.loads(run(home, "Get-MessageTrackingLog -EventId RECEIVE"
                                       " | ConvertTo-Json").stdout)
        assert [e["connector-id"] for e in events] == ["From App"], events
        sent = json.loads(run(home, "Get-MessageTrackingLog -EventId SEND"
                                     " | ConvertTo-Json").stdout)
        assert [e["connector-id"] for e in sent] == ["To Internet"], sent
