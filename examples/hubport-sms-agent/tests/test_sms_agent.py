"""The SMS agent end to end, with the fixtures hubport's pytest plugin ships."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hubport_sms_agent import number_of, sms_text

from plugins.pytest_plugin import message, wait_for

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


def test_numbers_and_text() -> None:
    assert number_of("+15550001@sms.test") == "+15550001"
    assert number_of("SMS:+15550001") == "+15550001"
    assert number_of("alice@sms.test") is None
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
