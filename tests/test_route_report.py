"""``hubport test-route``: the categorizer's result, every candidate with its cost made of
site links, the eliminated connectors and the rule that chose (core/route_report.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from daemon_process import hubport
from support import THREE_SITES

ORG = THREE_SITES + """

[[transport_server]]
Name = "HUB01"
Site = "Paris"
StateDirectory = "var1"
[[transport_server]]
Name = "HUB02"
Site = "London"
StateDirectory = "var2"
[[transport_server]]
Name = "HUB03"
Site = "Tokyo"
StateDirectory = "var3"

[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
DomainType = "Authoritative"
Default = true

[[mailbox]]
Name = "Administrator"
PrimarySmtpAddress = "administrator@contoso.test"
EmailAddresses = ["smtp:postmaster@contoso.test"]
[[mailbox]]
Name = "Kenji"
PrimarySmtpAddress = "kenji@contoso.test"
Server = "HUB03"

[[send_connector]]
Name = "Internet via London"
AddressSpaces = ["SMTP:*;1"]
SourceTransportServers = ["HUB02"]
SmartHosts = ["[127.0.0.1]"]
[[send_connector]]
Name = "Internet via Tokyo"
AddressSpaces = ["SMTP:*;1"]
SourceTransportServers = ["HUB03"]
SmartHosts = ["[127.0.0.1]"]
[[send_connector]]
Name = "Partner"
AddressSpaces = ["SMTP:partner.example;50"]
SmartHosts = ["[127.0.0.1]"]
MaxMessageSize = "1MB"
"""


def run(tmp_path: Path, *args: str) -> str:
    config = tmp_path / "org.toml"
    config.write_text(ORG)
    done = hubport("test-route", *args, "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_cheapest_path_wins_and_the_report_says_which_links_make_its_cost(
        tmp_path: Path) -> None:
    report = json.loads(run(tmp_path, "someone@example.org", "--json"))
    assert report["server"] == "HUB01" and report["site"] == "Paris"
    (routing,) = report["routing"]
    assert routing["chosen"] == "Internet via London"
    assert routing["rule"] == "the lowest aggregate cost"
    london, tokyo = routing["candidates"]
    assert (london["connector"], london["cost"], london["site_cost"]) == \
        ("Internet via London", 11, 10)
    assert london["next_hop"]["delivery_type"] == "SmtpRelayToRemoteAdSite"
    # Paris-Tokyo directly costs 30; through London 20: the path says so, link by link
    assert (tokyo["connector"], tokyo["cost"]) == ("Internet via Tokyo", 21)
    assert tokyo["next_hop"]["domain"] == "London"  # staged through the hub site
    assert [(s["link"], s["site"], s["cost"]) for s in tokyo["path"]] == \
        [("Paris-London", "London", 10), ("London-Tokyo", "Tokyo", 10)]
    assert {"connector": "Partner", "why": "no address space matches"} in routing["eliminated"]


def test_specificity_beats_cost_and_size_eliminates(tmp_path: Path) -> None:
    text = run(tmp_path, "bob@partner.example", "--sender", "kenji@contoso.test")
    assert "chosen: Partner, by the most specific address space" in text, text
    assert "*1. Partner: address space SMTP:partner.example" in text
    too_big = json.loads(run(tmp_path, "bob@partner.example", "--size", "2MB", "--json"))
    (routing,) = too_big["routing"]
    assert routing["chosen"] == "Internet via London"
    (partner,) = [e for e in routing["eliminated"] if e["connector"] == "Partner"]
    assert "MaxMessageSize" in partner["why"]


def test_a_remote_mailbox_shows_its_relay_and_site_path(tmp_path: Path) -> None:
    text = run(tmp_path, "kenji@contoso.test", "--server", "HUB01")
    # London, a hub site, is on the least-cost path to Tokyo: the mail is staged there
    assert "next hop SmtpRelayToRemoteAdSite London" in text, text
    assert "mailbox on HUB03" in text, text
    assert "site path: Paris -[Paris-London 10]-> London -[London-Tokyo 10]-> Tokyo (cost 20)" \
        in text, text
    onward = run(tmp_path, "kenji@contoso.test", "--server", "HUB02")
    assert "next hop SmtpRelayToRemoteAdSite Tokyo" in onward, onward
    local = run(tmp_path, "kenji@contoso.test", "--server", "HUB03")
    assert "next hop MapiDelivery Mailbox Database HUB03" in local


def test_a_bad_address_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "org.toml"
    config.write_text(ORG)
    done = hubport("test-route", "not an address", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 2 and "not an address" in done.stderr, done.stderr


def test_a_site_link_too_narrow_for_the_message_eliminates_and_fails(tmp_path: Path) -> None:
    narrow = ORG.replace('Name = "London-Tokyo"\nSites = ["London", "Tokyo"]\nCost = 10\n',
                         'Name = "London-Tokyo"\nSites = ["London", "Tokyo"]\nCost = 10\n'
                         'MaxMessageSize = "1MB"\n')
    assert narrow != ORG
    config = tmp_path / "org.toml"
    config.write_text(narrow)

    def route(*args: str) -> dict[str, Any]:
        done = hubport("test-route", *args, "--json", "--config", str(config), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    (kenji,) = route("kenji@contoso.test", "--size", "2MB")["categorizer"]
    assert kenji["outcome"] == "fail" and "5.3.4" in kenji["response"], kenji
    assert "London-Tokyo" in kenji["response"]
    assert route("kenji@contoso.test", "--size", "10KB")["categorizer"][0]["outcome"] == "route"
    (routing,) = route("x@example.org", "--size", "2MB")["routing"]
    assert routing["chosen"] == "Internet via London"
    (tokyo,) = [e for e in routing["eliminated"] if e["connector"] == "Internet via Tokyo"]
    assert "site link London-Tokyo" in tokyo["why"], tokyo
