"""The article's legacy routing group (docs/scenarios.md, scenario 7), set up with cmdlets
only: a Bidirectional Routing Group connector to a group of two Exchange 2003 servers
(aiosmtpd peers on loopback addresses). With the first server down, mail fails over to the
second; the reciprocal connector makes both servers ExchangeLegacyServers on our Receive
connector, so they may send to our mailboxes, and nobody else gets that right."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest

from daemon_process import daemon_pool
from scenario_support import fresh_home, run
from send_peers import ScriptedSink, free_port
from support import drop_in, maildir, message, wait_for_sync

pytestmark = pytest.mark.timeout(120)



def test_mail_fails_over_inside_the_legacy_group_and_its_servers_may_send_back(
        tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    legacy_in, down = free_port(), free_port("127.0.0.3")
    with ScriptedSink(host="127.0.0.2") as bh2:
        for line in (
            "New-AcceptedDomain -Name legacy.example -DomainName legacy.example"
            " -DomainType InternalRelay",
            "New-RoutingGroup -Name 'First Routing Group' -AddressSpaces legacy.example"
            f" -Servers @{{Name='EX2003BH1'; Address='127.0.0.3'; Port={down}}},"
            f" @{{Name='EX2003BH2'; Address='127.0.0.2'; Port={bh2.port}}}",
            "New-RoutingGroupConnector -Name 'RGCBidirection' -SourceTransportServers HUB01"
            " -TargetTransportServers EX2003BH1,EX2003BH2 -Cost 100 -Bidirectional $true",
            f"New-ReceiveConnector -Name 'From Legacy' -Usage Custom -Bindings"
            f" 127.0.0.1:{legacy_in} -AuthMechanism Tls -PermissionGroups"
            " ExchangeLegacyServers -Server HUB01",
        ):
            run(home, line)
        listed = json.loads(run(home, "Get-RoutingGroupConnector | Select-Object Name"
                                       " | ConvertTo-Json").stdout)
        assert {c["Name"] for c in listed} == {"RGCBidirection"}
        route = run(home, "Test-Route pat@legacy.example").stdout
        assert "chosen: RGCBidirection" in route, route

        with daemon_pool(tmp_path) as pool:
            pool.start(cwd=home).wait_ready()
            drop_in(home / "pickup", "old.eml", message(sender="alice@contoso.test",
                                                        to="pat@legacy.example",
                                                        subject="to the old world"))
            got = wait_for_sync(lambda: bh2.received or None, timeout=60,
                                what="the mail at EX2003BH2 (EX2003BH1 is down)")
            assert [r.rcpt_tos for r in got] == [["pat@legacy.example"]]
            sent = json.loads(run(home, "Get-MessageTrackingLog -EventId SEND"
                                         " | ConvertTo-Json").stdout)
            assert [e["connector-id"] for e in sent] == ["RGCBidirection"], sent

            # EX2003BH2 sends to our mailbox: ExchangeLegacyServers by its address
            with smtplib.SMTP(timeout=20, source_address=("127.0.0.2", 0)) as bh:
                bh.connect("127.0.0.1", legacy_in)
                bh.ehlo("ex2003bh2.contoso.test")
                bh.sendmail("old@legacy.example", ["alice@contoso.test"],
                            b"Subject: from the old world\r\n\r\nHi.\r\n")
            wait_for_sync(lambda: maildir(home, "Alice"), timeout=30, what="Alice's mail")
            # anyone else on that connector has no rights there
            with smtplib.SMTP(timeout=20, source_address=("127.0.0.1", 0)) as other:
                other.connect("127.0.0.1", legacy_in)
                other.ehlo("stranger.example")
                code, reply = other.mail("x@example.net")
                assert code == 530 and b"5.7.1" in reply, (code, reply)
