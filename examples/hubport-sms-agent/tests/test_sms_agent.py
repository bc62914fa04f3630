"""The SMS agent end to end, with the fixtures hubport's pytest plugin ships."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hubport_sms_agent import number_of, sms_text

from hubport.core.api import recipient_address
from hubport.plugins.pytest_plugin import message, wait_for

README = Path(__file__).resolve().parents[1] / "README.md"
README_SPOOL = '"/var/spool/sms/outgoing"'

CONNECTOR = """
[[mail_contact]]
Name = "Pager"
ExternalEmailAddress = "SMS:+15550001"

[[delivery_agent_connector]]
Name = "SMS Gateway"
AddressSpaces = ["SMTP:sms.test;1"]
DeliveryProtocol = "SMS"
SpoolDirectory = "{spool}"
MaxLength = 40
"""


def readme_config(spool: Path) -> str:
    """The README's configuration block, word for word, with a test spool folder."""
    block = README.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    assert README_SPOOL in block, block
    return block.replace(README_SPOOL, json.dumps(str(spool)))


def test_numbers_and_text() -> None:
    assert number_of(recipient_address("+15550001@sms.test", "contoso.test")) == "+15550001"
    # an SMS:* address space is handed the IMCEA form of SMS:+15550001
    assert number_of(recipient_address("IMCEASMS-+2B15550001@contoso.test", "contoso.test")
                     ) == "+15550001"
    assert number_of(recipient_address("alice@sms.test", "contoso.test")) is None
    assert number_of(recipient_address("IMCEASMS-pager@contoso.test", "contoso.test")) is None
    assert number_of(recipient_address("IMCEAFAX-+2B15550001@contoso.test", "contoso.test")
                     ) is None
    assert sms_text(b"Subject: Disk full\r\n\r\nserver db1 is at 99%\r\n", 20) == \
        "Disk full server db1"


async def test_delivers_into_the_spool_and_fails_non_numbers(
        hubport_hub_factory: Any, hubport_clock: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    extra = CONNECTOR.format(spool=spool)
    async with hubport_hub_factory(extra=extra, clock=hubport_clock) as hub:
        hub.drop_replay("alice@contoso.test", ["+15550001@sms.test", "alice@sms.test"],
                        message(subject="Disk full", body="db1 at 99%\n"))
        await wait_for(lambda: hub.events(event_id="DEFER"))  # no spool yet: queue deferred
        spool.mkdir()
        hubport_clock.advance(60)  # the retry comes due now
        files = await wait_for(lambda: sorted(spool.glob("*.sms")), timeout=20)
        ndr = await wait_for(lambda: hub.maildir("Alice"), timeout=20)
    assert files[0].read_text() == "To: +15550001\n\nDisk full db1 at 99%\n"
    assert b"Not a phone number" in ndr[0].read_bytes()
    assert hub.events(event_id="DELIVER", source="AGENT")


async def test_the_readme_configuration_delivers(
        hubport_hub_factory: Any, tmp_path: Path) -> None:
    """The README's own setup: the contact's SMS:+15551234 and a hand-written IMCEA address
    reach the agent IMCEA-encoded in the default domain and both become spool files."""
    spool = tmp_path / "spool"
    spool.mkdir()
    async with hubport_hub_factory(extra=readme_config(spool)) as hub:
        hub.drop_replay("alice@contoso.test",
                        ["On-callpager@contoso.test", "IMCEASMS-+2B15559876@contoso.test"],
                        message(subject="Disk full", body="db1 at 99%\n"))
        files = await wait_for(lambda: len(found := sorted(spool.glob("*.sms"))) == 2 and found,
                               timeout=20, describe=lambda: hub.event_ids(), what="2 SMS files")
        delivered = await wait_for(
            lambda: len(got := [a.lower() for e in hub.events(event_id="DELIVER", source="AGENT")
                                for a in e["recipient-address"]]) == 2 and got,
            timeout=20, describe=lambda: hub.event_ids(), what="2 delivered recipients")
    assert sorted(f.read_text() for f in files) == [
        "To: +15551234\n\nDisk full db1 at 99%\n", "To: +15559876\n\nDisk full db1 at 99%\n"]
    assert sorted(delivered) == [
        "imceasms-+2b15551234@contoso.test", "imceasms-+2b15559876@contoso.test"]
    assert not hub.events(event_id="FAIL")


async def test_a_read_only_spool_defers_then_delivers(
        hubport_agent_harness: Any, hubport_unwritable_folder: Any, tmp_path: Path) -> None:
    """The agent alone (no hub): a spool that refuses writes defers with a 4xx and leaves
    no file; once repaired, the next attempt writes the SMS."""
    from hubport_sms_agent import SmsAgent

    harness = hubport_agent_harness(SmsAgent, {"SpoolDirectory": "spool"})
    spool = hubport_unwritable_folder.make(tmp_path / "spool")
    item = harness.item(recipients=["+15550001@sms.test"],
                        data=message(subject="Disk full", body="db1 at 99%\n"))
    run = await harness.run(item)
    assert run.statuses()["+15550001@sms.test"].startswith("deferred 4"), run.statuses()
    assert list(spool.iterdir()) == []
    hubport_unwritable_folder.restore(spool)
    run = await harness.run(item)
    assert run.statuses()["+15550001@sms.test"].startswith("delivered 250"), run.statuses()
    [sms] = spool.glob("*.sms")
    assert sms.read_text() == "To: +15550001\n\nDisk full db1 at 99%\n"
