"""The article's anti-spam loop (docs/scenarios.md, scenario 6), with its connector names,
on unprivileged loopback ports, set up with cmdlets only: mail taken on
``Receiveconnector:25`` leaves through the linked ``Sendconnector:26`` to a scanner, which
stamps it and sends it back to ``Receiveconnector:27`` (ExternalAuthoritative, the
scanner's address only); it reaches the mailbox once, stamped, and what arrives on
``Receiveconnector:27`` never goes round again."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from daemon_process import daemon_pool
from scenario_support import fresh_home, run
from send_peers import Scanner, free_port
from smtp_support import send_one
from support import maildir, wait_for_sync

pytestmark = pytest.mark.timeout(120)



def test_mail_goes_through_the_scanner_once_and_comes_back_stamped(tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    inbound, back = free_port(), free_port()
    with Scanner(back) as scanner:
        for line in (
            f"New-ReceiveConnector -Name 'Receiveconnector:25' -Usage Custom -Bindings"
            f" 127.0.0.1:{inbound} -PermissionGroups AnonymousUsers -Server HUB01",
            # the article's line, with the scanner on loopback instead of the host antispam
            "New-SendConnector -Name \"Sendconnector:26\" -LinkedReceiveConnector"
            " \"HUB01\\Receiveconnector:25\" -SmartHosts '[127.0.0.1]' -Port"
            f" {scanner.port} -SmartHostAuthMechanism ExternalAuthoritative"
            " -DNSRoutingEnabled $False -MaxMessageSize unlimited",
            f"New-Receiveconnector -name « Receiveconnector:27 » -AuthMechanism"
            f" externalAuthoritative -RemoteIPRanges 127.0.0.1 -Bindings 127.0.0.1:{back}"
            " -PermissionGroups ExchangeServers -Server HUB01",
        ):
            run(home, line)
        with daemon_pool(tmp_path) as pool:
            pool.start(cwd=home).wait_ready()
            asyncio.run(send_one(inbound, "alice@contoso.test", "offer"))
            wait_for_sync(lambda: maildir(home, "Alice"), timeout=30,
                          what="the scanned message in Alice's mailbox")
            time.sleep(1.0)  # nothing else may follow
            (mail,) = maildir(home, "Alice")
            assert b"X-Scanned: clean" in mail.read_bytes()
            assert len(scanner.seen) == 1, scanner.seen

            # what the scanner sends in on Receiveconnector:27 is delivered, not scanned
            asyncio.run(send_one(back, "bob@contoso.test", "already scanned"))
            wait_for_sync(lambda: maildir(home, "Bob"), timeout=30, what="Bob's mail")
            time.sleep(1.0)
            assert len(scanner.seen) == 1, scanner.seen

            events = json.loads(run(home, "Get-MessageTrackingLog -EventId RECEIVE"
                                           " | ConvertTo-Json").stdout)
            assert sorted(e["connector-id"] for e in events) == [
                "Receiveconnector:25", "Receiveconnector:27", "Receiveconnector:27"], events
            sent = json.loads(run(home, "Get-MessageTrackingLog -EventId SEND"
                                         " | ConvertTo-Json").stdout)
            assert [e["connector-id"] for e in sent] == ["Sendconnector:26"], sent
