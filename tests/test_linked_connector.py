"""Linked connectors (plugins/smtp_send/linked.py; docs/exchange.md, "Linked connectors").

A real daemon takes mail on "From Internet", which is linked to the send connector "To
Scanner"; an aiosmtpd scanner stamps each message and sends it back to "From Scanner"
(ExternalAuthoritative), where it is delivered normally. A misconfigured scanner that sends
it back to the linked connector does not make it go round again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon_process import DaemonPool, daemon_pool, hubport
from hubport.core.config import load_organization
from hubport.core.config_fields import ConfigError
from hubport.core.hooks import Hooks
from send_peers import Scanner
from smtp_support import free_port, receive_connector, send_one
from support import wait_for_sync, write_org

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def organization(folder: Path, inbound: int, back: int, scanner: int) -> Path:
    extra = receive_connector(
        "From Internet", [f"127.0.0.1:{inbound}"], PermissionGroups=["AnonymousUsers"])
    extra += receive_connector(
        "From Scanner", [f"127.0.0.1:{back}"], RemoteIPRanges=["127.0.0.1"],
        AuthMechanism=["ExternalAuthoritative"], PermissionGroups=["ExchangeServers"])
    extra += (f'[[send_connector]]\nName = "To Scanner"\nLinkedReceiveConnector = "From Internet"\n'
              f'SmartHosts = ["[127.0.0.1]"]\nPort = {scanner}\n')
    return write_org(folder, extra=extra)


def mails(root: Path, box: str) -> list[bytes]:
    folder = root / "var" / "mailboxes" / box / "new"
    return [p.read_bytes() for p in sorted(folder.glob("*"))] if folder.is_dir() else []


def test_mail_goes_through_the_scanner_once_whatever_its_recipients(
        tmp_path: Path, pool: DaemonPool) -> None:
    inbound, back = free_port(), free_port()
    with Scanner(back) as scanner:
        config = organization(tmp_path, inbound, back, scanner.port)
        pool.start(config=config).wait_ready(60)
        asyncio.run(send_one(inbound, "staff@contoso.test", "to the group"))
        wait_for_sync(lambda: mails(tmp_path, "Alice") and mails(tmp_path, "Bob"), 60,
                      what="the scanned message in Alice's and Bob's mailboxes")
        time.sleep(1.0)  # nothing else may follow
        # the scanner saw the envelope as it came (the group, not its members), once
        assert [(m, r) for m, r, _ in scanner.seen] == \
            [("someone@example.org", ["staff@contoso.test"])]
        assert scanner.seen[0][2].startswith(b"X-Hubport-Linked: To Scanner; ")
        for box in ("Alice", "Bob"):
            (mail,) = mails(tmp_path, box)
            assert b"X-Scanned: clean" in mail and b"Subject: to the group" in mail


def test_a_scanner_that_sends_back_to_the_linked_connector_does_not_loop(
        tmp_path: Path, pool: DaemonPool) -> None:
    inbound = free_port()
    with Scanner(inbound) as scanner:  # misconfigured: back to the linked connector
        config = organization(tmp_path, inbound, free_port(), scanner.port)
        pool.start(config=config).wait_ready(60)
        asyncio.run(send_one(inbound, "alice@contoso.test", "round and round"))

        def failed() -> Any:
            done = hubport("get-messagetrackinglog", "--config", str(config), "-eventid", "FAIL",
                           "-format", "json", cwd=tmp_path)
            rows = [json.loads(line) for line in done.stdout.splitlines() if line]
            return [r for r in rows if "5.4.6" in str(r.get("recipient-status"))]

        (row,) = wait_for_sync(failed, 60, what="the looping copy fails with 5.4.6")
        assert "To Scanner" in str(row["recipient-status"])
        time.sleep(1.0)
        assert len(scanner.seen) == 1, scanner.seen  # it went round once, not again
        assert mails(tmp_path, "Alice") == []


HOOKS = Hooks(entry_points=False)


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ('AddressSpaces = ["*"]\nSmartHosts = ["[127.0.0.1]"]', "AddressSpaces", "must be empty"),
    ('DNSRoutingEnabled = true', "SmartHosts", "required"),
    ('SmartHosts = ["[127.0.0.1]"]\nMaxMessageSize = "10MB"', "MaxMessageSize", "unlimited"),
    ('SmartHosts = ["[127.0.0.1]"]\nSourceTransportServers = ["HUB02"]',
     "SourceTransportServers", "hosted on the server"),
])
def test_a_linked_connector_that_breaks_a_rule_is_a_config_error(
        tmp_path: Path, fields: str, field: str, reason: str) -> None:
    extra = receive_connector("From Internet", ["127.0.0.1:2600"])
    extra += '[[transport_server]]\nName = "HUB02"\nStateDirectory = "var2"\n'
    extra += '[[send_connector]]\nName = "Scan"\nLinkedReceiveConnector = "From Internet"\n'
    extra += fields + "\n"
    with pytest.raises(ConfigError) as info:
        load_organization(write_org(tmp_path, extra=extra), HOOKS.registry.connector_types)
    text = str(info.value)
    assert "Scan" in text and field in text and reason in text, text


def test_a_receive_connector_links_to_one_send_connector_that_names_it(tmp_path: Path) -> None:
    extra = receive_connector("From Internet", ["127.0.0.1:2600"])
    for name in ("Scan A", "Scan B"):
        extra += (f'[[send_connector]]\nName = "{name}"\nLinkedReceiveConnector ='
                  f' "From Internet"\nSmartHosts = ["[127.0.0.1]"]\n')
    extra += ('[[send_connector]]\nName = "Scan C"\nLinkedReceiveConnector = "Nowhere"\n'
              'SmartHosts = ["[127.0.0.1]"]\n')
    with pytest.raises(ConfigError) as info:
        load_organization(write_org(tmp_path, extra=extra), HOOKS.registry.connector_types)
    text = str(info.value)
    assert "already linked to send connector 'Scan A'" in text, text
    assert "no receive connector is named 'Nowhere'" in text, text


def test_the_loop_guard_sees_a_stamp_made_this_very_second(tmp_path: Path) -> None:
    """The stamp is in whole seconds: a copy back within the same second still counts."""
    from hubport.core.body import MessageBody
    from hubport.core.model import MailFrom, QueuedMessage
    from hubport.plugins.smtp_send.linked import route_through_link, stamp

    extra = receive_connector("From Internet", ["127.0.0.1:2600"])
    extra += ('[[send_connector]]\nName = "Scan"\nLinkedReceiveConnector = "From Internet"\n'
              'SmartHosts = ["[127.0.0.1]"]\n')
    org = load_organization(write_org(tmp_path, extra=extra), HOOKS.registry.connector_types)
    now = 1_800_000_000.9
    stamped = stamp(MessageBody.of(b"Subject: x\r\n\r\nbody\r\n"), "Scan", now=now)
    message = QueuedMessage(1, "i", "<m@x>", MailFrom("a@example.org"), stamped,
                            stamped.size, "SMTP", "From Internet", "x", now, now + 60)
    verdict = route_through_link(message, org, now=now)
    assert type(verdict).__name__ == "Reject", verdict
    fresh = QueuedMessage(2, "j", "<n@x>", MailFrom("a@example.org"),
                          MessageBody.of(b"Subject: y\r\n\r\nbody\r\n"), 20, "SMTP",
                          "From Internet", "y", now, now + 60)
    assert type(route_through_link(fresh, org, now=now)).__name__ == "RouteTo"
    assert type(route_through_link(message, org, now=now + 7200)).__name__ == "RouteTo"



def test_a_malformed_stamp_is_ignored_and_no_stamp_leaves_the_organization(
        tmp_path: Path) -> None:
    from hubport.core.body import MessageBody
    from hubport.core.model import MailFrom, QueuedMessage
    from hubport.plugins.smtp_send.content import apply_firewall
    from hubport.plugins.smtp_send.linked import route_through_link

    extra = receive_connector("From Internet", ["127.0.0.1:2600"])
    extra += ('[[send_connector]]\nName = "Scan"\nLinkedReceiveConnector = "From Internet"\n'
              'SmartHosts = ["[127.0.0.1]"]\n')
    org = load_organization(write_org(tmp_path, extra=extra), HOOKS.registry.connector_types)
    for junk in (b"x; 1.2.3", b"Scan; 99999999999999999999", b"Scan; -5", b"Scan;"):
        data = b"X-Hubport-Linked: " + junk + b"\r\nSubject: x\r\n\r\nbody\r\n"
        message = QueuedMessage(1, "i", "<m@x>", MailFrom("a@example.org"),
                                MessageBody.of(data), len(data), "SMTP", "From Internet",
                                "x", 0.0, 60.0)
        assert type(route_through_link(message, org)).__name__ == "RouteTo", junk
    stamped = b"X-Hubport-Linked: Scan; 1\r\nSubject: x\r\n\r\nbody\r\n"
    for usage in ("Internal", "Internet", "Partner", "Custom"):
        assert b"X-Hubport-Linked" not in apply_firewall(stamped, usage), usage
    assert apply_firewall(stamped, None) == stamped  # hub to hub: kept
