"""The article's partner domain (docs/scenarios.md, scenario 2): ``SMTP:partner.example;1``
beside ``*``, set up with cmdlets only. Only that domain takes the dedicated smart host; its
subdomains take ``*.partner.example``'s; everything else the Internet's; a connector scoped
to a site serves only the hubs of that site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon_process import daemon_pool
from scenario_support import fresh_home, run
from send_peers import ScriptedSink
from support import drop_in, message, wait_for_sync

pytestmark = pytest.mark.timeout(120)



def _connector(name: str, space: str, sink: ScriptedSink) -> str:
    return (f"New-SendConnector -Name '{name}' -Usage Custom -AddressSpaces '{space}'"
            f" -DNSRoutingEnabled $false -SmartHosts '[127.0.0.1]' -Port {sink.port}"
            " -SmartHostAuthMechanism None -SourceTransportServers HUB01")


def test_only_the_partner_domain_takes_the_dedicated_smart_host(tmp_path: Path) -> None:
    home = fresh_home(tmp_path)
    internet, partner, branches = (ScriptedSink(host="127.0.0.1") for _ in range(3))
    for line in (
        _connector("To Internet", "SMTP:*;1", internet),
        _connector("To Partner", "SMTP:partner.example;1", partner),
        _connector("To Partner Branches", "SMTP:*.partner.example;1", branches),
    ):
        run(home, line)
    with internet, partner, branches, daemon_pool(tmp_path) as pool:
        pool.start(cwd=home).wait_ready()
        for name, to in (("p", "orders@partner.example"), ("b", "sales@eu.partner.example"),
                         ("i", "someone@example.org"), ("n", "x@notpartner.example")):
            drop_in(home / "pickup", f"{name}.eml", message(to=to, subject=name))
        wait_for_sync(lambda: len(internet.received) + len(partner.received)
                      + len(branches.received) == 4, timeout=30,
                      describe=lambda: [s.received for s in (internet, partner, branches)],
                      what="the four messages at their smart hosts")
        assert [r.rcpt_tos for r in partner.received] == [["orders@partner.example"]]
        assert [r.rcpt_tos for r in branches.received] == [["sales@eu.partner.example"]]
        assert sorted(r.rcpt_tos[0] for r in internet.received) == [
            "someone@example.org", "x@notpartner.example"]
        sent = json.loads(run(home, "Get-MessageTrackingLog -EventId SEND"
                                     " | ConvertTo-Json").stdout)
        assert sorted((e["recipient-address"][0], e["connector-id"]) for e in sent) == [
            ("orders@partner.example", "To Partner"),
            ("sales@eu.partner.example", "To Partner Branches"),
            ("someone@example.org", "To Internet"),
            ("x@notpartner.example", "To Internet")]

    # scoped to its site: a hub of another site passes it by (Test-Route, no mail needed)
    for line in ("Set-SendConnector 'To Partner' -IsScopedConnector $true",
                 "New-AdSite -Name Paris",
                 "New-AdSiteLink -Name Default-Paris -Sites Default-First-Site-Name,Paris"
                 " -Cost 10",
                 "New-TransportServer -Name HUB02 -Site Paris -Fqdn hub02.contoso.test"):
        run(home, line)
    here = run(home, "Test-Route orders@partner.example -Server HUB01").stdout
    assert "chosen: To Partner," in here, here
    paris = run(home, "Test-Route orders@partner.example -Server HUB02").stdout
    assert "eliminated To Partner: scoped to another site (IsScopedConnector)" in paris, paris
    assert "chosen: To Partner Branches" in paris, paris
