"""Send connector: config, sessions against real SMTP peers, TLS, AUTH, content, relay."""

from __future__ import annotations

import asyncio
import dataclasses
import email
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from hubport.core.api import DEFERRED, DELIVERED, FAILED, DeferQueue, DeliveryContext, MailItem
from hubport.core.config import Organization, load_organization
from hubport.core.config_fields import ConfigError
from hubport.core.directory import RecipientDirectory
from hubport.core.hooks import Hooks
from hubport.core.model import (
    MailFrom,
    NextHop,
    Notify,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
)
from hubport.plugins.smtp_send import SendConnector, content
from hubport.plugins.smtp_send.delivery import deliver_items
from send_peers import Script, ScriptedSink, hub_tls, make_ca, silent_server, smtp_sink
from support import maildir, message, wait_for, write_org

pytestmark = pytest.mark.timeout(60)

HOOKS = Hooks(entry_points=False)


def load_org(folder: Path, connector: str, server_extra: str = "") -> Organization:
    path = write_org(folder, extra=connector, server_extra=server_extra)
    return load_organization(path, HOOKS.registry.connector_types)


def smart_host(port: int, *, name: str = "Smart", extra: str = "",
               hosts: str = '"[127.0.0.1]"') -> str:
    return (f'[[send_connector]]\nName = "{name}"\nAddressSpaces = ["*"]\n'
            f"SmartHosts = [{hosts}]\nPort = {port}\nConnectionInactivityTimeOut = \"5s\"\n"
            f"{extra}\n")


def context(org: Organization) -> DeliveryContext:
    async def no_intent(_: dict[int, str]) -> None:
        return None

    return DeliveryContext(org, org.server("HUB01"), RecipientDirectory(org), no_intent,
                           time.time)


_ids = iter(range(1, 1_000_000))


def item(recipients: list[str], data: bytes | None = None, *, sender: str = "alice@contoso.test",
         mail_from: MailFrom | None = None, notify: frozenset[Notify] = frozenset(),
         orcpt: str | None = None) -> MailItem:
    mid = next(_ids)
    data = data if data is not None else message(to=", ".join(recipients)).replace(b"\n",
                                                                                   b"\r\n")
    rows = [QueuedRecipient(next(_ids), mid, r, RecipientStatus.READY, notify, orcpt)
            for r in recipients]
    msg = QueuedMessage(mid, str(mid), f"<{mid}@test>", mail_from or MailFrom(sender), data,
                        len(data), "PICKUP", "", "hello", time.time(), time.time() + 3600,
                        recipients=rows)
    return MailItem(msg, rows, NextHop("SmartHostConnectorDelivery", "x", "Smart"))


async def send(org: Organization, items: list[MailItem], name: str = "Smart") -> Any:
    connector = org.connector(name)
    hop = NextHop(connector.delivery_type, "x", connector.name)
    return await deliver_items(hop, connector, items, context(org))


def kinds(result: Any) -> list[str]:
    return [r.kind for r in result.recipients.values()]


# -- configuration -------------------------------------------------------------------------


def test_registered_as_builtin() -> None:
    assert HOOKS.registry.connector_types["send_connector"] is SendConnector


def test_config_reads_every_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "relay").write_text("s3cret\n")
    org = load_org(tmp_path, smart_host(2525, extra=(
        'Usage = "Internal"\nSmartHostAuthMechanism = "BasicAuthRequireTLS"\n'
        'AuthenticationCredential = { UserName = "relay", PasswordFile = "secrets/relay" }\n'
        'RequireTLS = true\nTlsAuthLevel = "CertificateValidation"\nFqdn = "mail.contoso.test"\n'
        'SmtpMaxMessagesPerConnection = 3\nErrorPolicies = "DowngradeAuthFailures"\n'
        'ProtocolLoggingLevel = "Verbose"\nMaxMessageSize = "1MB"'),
        hosts='"relay.example.net", "[192.0.2.7]"'))
    c = org.connector("Smart")
    assert isinstance(c, SendConnector)
    assert c.delivery_type == "SmartHostConnectorDelivery"
    assert [str(h) for h in c.smart_hosts] == ["relay.example.net", "[192.0.2.7]"]
    assert not c.dns_routing_enabled and c.port == 2525 and c.require_tls
    assert c.authentication_credential is not None
    assert c.authentication_credential.password() == "s3cret"
    assert "s3cret" not in repr(c)
    assert c.smtp_max_messages_per_connection == 3 and c.max_message_size == 1024 * 1024
    assert c.error_policies == {"DowngradeAuthFailures"}


@pytest.mark.parametrize("extra, field", [
    ('SmartHosts = ["[127.0.0.1]"]\nDNSRoutingEnabled = true', "DNSRoutingEnabled"),
    ("DNSRoutingEnabled = false", "SmartHosts"),
    ('SmartHosts = ["[127.0.0.1]"]\nRequireTLS = true\nIgnoreSTARTTLS = true', "IgnoreSTARTTLS"),
    ('SmartHosts = ["[127.0.0.1]"]\nSmartHostAuthMechanism = "BasicAuth"',
     "AuthenticationCredential"),
    ('SmartHosts = ["[127.0.0.1]"]\nSmartHostAuthMechanism = "BasicAuth"\n'
     'AuthenticationCredential = { UserName = "u", Password = "plain" }',
     "AuthenticationCredential"),
    ('TlsAuthLevel = "DomainValidation"', "TlsAuthLevel"),
    ('SmartHosts = ["127.0.0.1"]', "SmartHosts"),
])
def test_config_rules(tmp_path: Path, extra: str, field: str) -> None:
    text = f'[[send_connector]]\nName = "Bad"\nAddressSpaces = ["*"]\n{extra}\n'
    with pytest.raises(ConfigError) as info:
        load_org(tmp_path, text)
    assert field in str(info.value)


def test_credential_is_never_in_error_text(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_PW", raising=False)
    org = load_org(tmp_path, smart_host(25, extra=(
        'SmartHostAuthMechanism = "BasicAuth"\n'
        'AuthenticationCredential = { UserName = "relay", PasswordEnvironmentVariable = '
        '"RELAY_PW" }')))
    cred = org.connector("Smart").authentication_credential  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="RELAY_PW is not set"):
        cred.password()
    monkeypatch.setenv("RELAY_PW", "hunter2")
    assert cred.password() == "hunter2" and "hunter2" not in repr(cred)


# -- delivery against a scripted aiosmtpd sink -------------------------------------------------


async def test_delivers_and_reuses_connections(tmp_path: Path) -> None:
    with ScriptedSink() as sink:
        org = load_org(tmp_path, smart_host(sink.port,
                                            extra="SmtpMaxMessagesPerConnection = 2"))
        items = [item([f"user{i}@partner.example"]) for i in range(5)]
        results = await send(org, items)
    assert all(kinds(r) == [DELIVERED] for r in results)
    assert sorted(r.rcpt_tos[0] for r in sink.received) == [
        f"user{i}@partner.example" for i in range(5)]
    assert sink.handler.connections == 3  # 2 + 2 + 1 messages
    assert all("SIZE=" in " ".join(r.mail_options) for r in sink.received)
    assert "127.0.0.1" in results[0].detail


async def test_per_recipient_results(tmp_path: Path) -> None:
    script = Script(rcpt={"gone@partner.example": "550 5.1.1 No such user here",
                          "later@partner.example": "451 4.2.0 Try again later"})
    with ScriptedSink(script=script) as sink:
        org = load_org(tmp_path, smart_host(sink.port))
        it = item(["ok@partner.example", "gone@partner.example", "later@partner.example"])
        [result] = await send(org, [it])
    by_address = {r.address: result.recipients[r.id] for r in it.recipients}
    assert by_address["ok@partner.example"].kind == DELIVERED
    assert by_address["gone@partner.example"].kind == FAILED
    assert str(by_address["gone@partner.example"].response) == "550 5.1.1 No such user here"
    assert by_address["later@partner.example"].kind == DEFERRED
    assert by_address["later@partner.example"].response.code == 451
    assert sink.received[0].rcpt_tos == ["ok@partner.example"]


async def test_drop_after_final_dot_defers(tmp_path: Path) -> None:
    with ScriptedSink(script=Script(drop_after_data=True)) as sink:
        org = load_org(tmp_path, smart_host(sink.port))
        [result] = await send(org, [item(["x@partner.example"])])
    [r] = result.recipients.values()
    assert r.kind == DEFERRED and r.response.enhanced == "4.4.2"


async def test_data_rejection_fails_accepted_recipients(tmp_path: Path) -> None:
    with ScriptedSink(script=Script(data_reply="554 5.7.1 Content rejected")) as sink:
        org = load_org(tmp_path, smart_host(sink.port))
        [result] = await send(org, [item(["x@partner.example", "y@partner.example"])])
    assert kinds(result) == [FAILED, FAILED]
    assert all("Content rejected" in str(r.response) for r in result.recipients.values())


async def test_silent_server_times_out_and_defers_queue(tmp_path: Path) -> None:
    async with silent_server() as port:
        org = load_org(tmp_path, smart_host(port, extra='ConnectionInactivityTimeOut = "1s"')
                       .replace('ConnectionInactivityTimeOut = "5s"\n', ""))
        outcome = await asyncio.wait_for(send(org, [item(["x@partner.example"])]), 30)
    assert isinstance(outcome, DeferQueue)
    assert outcome.response.is_transient


async def test_smart_host_failover(tmp_path: Path) -> None:
    with ScriptedSink(host="127.0.0.2") as sink:
        # 127.0.0.3 has nobody listening on the port: refused, then the second host
        org = load_org(tmp_path, smart_host(sink.port, hosts='"[127.0.0.3]", "[127.0.0.2]"'))
        [result] = await send(org, [item(["x@partner.example"])])
    assert kinds(result) == [DELIVERED] and len(sink.received) == 1


async def test_connection_refused_everywhere_defers_queue(tmp_path: Path) -> None:
    org = load_org(tmp_path, smart_host(9, hosts='"[127.0.0.3]"'))
    outcome = await send(org, [item(["x@partner.example"]), item(["y@partner.example"])])
    assert isinstance(outcome, DeferQueue) and outcome.response.enhanced == "4.4.1"


async def test_dsn_parameters_reach_a_dsn_peer(tmp_path: Path) -> None:
    """smtp-sink offers DSN: MAIL gets RET/ENVID, RCPT gets NOTIFY/ORCPT."""
    with smtp_sink("-v") as (port, _folder):
        org = load_org(tmp_path, smart_host(port, extra='ProtocolLoggingLevel = "Verbose"'))
        it = item(["x@partner.example"], mail_from=MailFrom("alice@contoso.test", ret="HDRS",
                                                            envid="id+1"),
                  notify=frozenset({Notify.FAILURE, Notify.DELAY}),
                  orcpt="rfc822;X@partner.example")
        [result] = await send(org, [it])
    assert kinds(result) == [DELIVERED]
    mail = content.mail_options(it.message.mail_from, 10, body=None, smtputf8=False,
                                dsn=True, size_ext=True)
    assert "RET=HDRS" in mail and "ENVID=id+2B1" in mail
    assert content.rcpt_options(it.recipients[0].notify, it.recipients[0].orcpt, dsn=True) == [
        "NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;X@partner.example"]


@pytest.mark.parametrize("option, expected", [("-r", DEFERRED), ("-f", FAILED)])
async def test_smtp_sink_rcpt_failures(tmp_path: Path, option: str, expected: str) -> None:
    with smtp_sink(option, "rcpt") as (port, _folder):
        org = load_org(tmp_path, smart_host(port))
        [result] = await send(org, [item(["x@partner.example"])])
    assert kinds(result) == [expected]


async def test_smtp_sink_hangup_after_dot(tmp_path: Path) -> None:
    with smtp_sink("-q", ".") as (port, _folder):
        org = load_org(tmp_path, smart_host(port))
        [result] = await send(org, [item(["x@partner.example"])])
    [r] = result.recipients.values()
    assert r.kind == DEFERRED and r.response.enhanced == "4.4.2"


# -- TLS and AUTH ------------------------------------------------------------------------------


async def test_opportunistic_starttls(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    with ScriptedSink(tls=ca.server_context("smarthost.test")) as sink:
        org = load_org(tmp_path, smart_host(sink.port))
        [result] = await send(org, [item(["x@partner.example"])])
    assert kinds(result) == [DELIVERED] and sink.received[0].tls


async def test_require_tls_validates_the_certificate(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    tls = (f'RequireTLS = true\nTlsAuthLevel = "DomainValidation"\nTlsDomain = "{{}}"\n'
           f'TlsCertificateAuthorityFile = "{ca.ca_file}"')
    with ScriptedSink(tls=ca.server_context("smarthost.test")) as sink:
        good = load_org(tmp_path, smart_host(sink.port, extra=tls.format("smarthost.test")))
        [result] = await send(good, [item(["x@partner.example"])])
        assert kinds(result) == [DELIVERED] and sink.received[0].tls
        bad = load_org(tmp_path, smart_host(sink.port, extra=tls.format("other.test")))
        outcome = await send(bad, [item(["y@partner.example"])])
    assert isinstance(outcome, DeferQueue) and outcome.response.enhanced.startswith("4.7.")
    assert len(sink.received) == 1


async def test_require_tls_never_falls_back_to_plaintext(tmp_path: Path) -> None:
    with ScriptedSink() as sink:  # no STARTTLS offered
        org = load_org(tmp_path, smart_host(sink.port, extra="RequireTLS = true"))
        outcome = await send(org, [item(["x@partner.example"])])
    assert isinstance(outcome, DeferQueue) and outcome.response.enhanced.startswith("4.7.")
    assert sink.received == []


async def test_ignore_starttls(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    with ScriptedSink(tls=ca.server_context("smarthost.test")) as sink:
        org = load_org(tmp_path, smart_host(sink.port, extra="IgnoreSTARTTLS = true"))
        await send(org, [item(["x@partner.example"])])
    assert not sink.received[0].tls


@pytest.mark.parametrize("policy, expected", [("Default", "fail"),
                                              ("DowngradeAuthFailures", "defer")])
async def test_basic_auth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str,
                          expected: str) -> None:
    ca = make_ca(tmp_path)
    (tmp_path / "pw").write_text("right-password\n")
    auth = ('SmartHostAuthMechanism = "BasicAuthRequireTLS"\n'
            'AuthenticationCredential = { UserName = "relay", PasswordFile = "pw" }\n'
            f'ErrorPolicies = "{policy}"')
    with ScriptedSink(tls=ca.server_context("smarthost.test"), users={"relay": "right-password"},
                      auth_require_tls=True) as sink:
        org = load_org(tmp_path, smart_host(sink.port, extra=auth))
        [result] = await send(org, [item(["x@partner.example"])])
        assert kinds(result) == [DELIVERED]
        assert sink.received[0].auth == ("PLAIN", "relay")
        (tmp_path / "pw").write_text("wrong-password\n")
        outcome = await send(org, [item(["y@partner.example"])])
    if expected == "fail":
        [r] = outcome[0].recipients.values()
        assert r.kind == FAILED and r.response.code == 535
        assert "wrong-password" not in str(r.response)
    else:
        assert isinstance(outcome, DeferQueue) and outcome.response.enhanced == "4.7.3"


# -- content -----------------------------------------------------------------------------------


EIGHT_BIT = (b"From: alice@contoso.test\r\nTo: x@partner.example\r\nSubject: caf\xc3\xa9?\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
             b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xc3\xa9 cr\xc3\xa8me\r\n"
             b"--b\r\nContent-Type: application/octet-stream\r\n"
             b"Content-Transfer-Encoding: binary\r\n\r\n\x00\xff\xfe\r\n--b--\r\n")


async def test_8bit_downgraded_for_a_peer_without_8bitmime(tmp_path: Path) -> None:
    body = EIGHT_BIT.replace(b"caf\xc3\xa9?", b"cafe?")  # ASCII headers: convertible
    with ScriptedSink(script=Script(ehlo_extensions_removed={"8BITMIME"})) as sink:
        org = load_org(tmp_path, smart_host(sink.port))
        [result] = await send(org, [item(["x@partner.example"], body)])
        [bad] = await send(org, [item(["y@partner.example"], EIGHT_BIT)])
    assert kinds(result) == [DELIVERED]
    got = sink.received[0].data
    assert got.isascii()
    parts = email.message_from_bytes(got).get_payload()
    assert parts[0]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[0].get_payload(decode=True).decode() == "café crème"
    assert parts[1]["Content-Transfer-Encoding"] == "base64"
    assert parts[1].get_payload(decode=True) == b"\x00\xff\xfe"
    [r] = bad.recipients.values()
    assert r.kind == FAILED and str(r.response).startswith("554 5.6.3")


async def test_8bit_sent_as_8bitmime(tmp_path: Path) -> None:
    with ScriptedSink() as sink:
        org = load_org(tmp_path, smart_host(sink.port))
        await send(org, [item(["x@partner.example"], EIGHT_BIT)])
    assert "BODY=8BITMIME" in sink.received[0].mail_options
    assert b"caf\xc3\xa9 cr\xc3\xa8me" in sink.received[0].data


async def test_smtputf8_needed_but_missing(tmp_path: Path) -> None:
    with ScriptedSink() as sink:
        org = load_org(tmp_path, smart_host(sink.port))
        [result] = await send(org, [item(["jörg@partner.example"])])
    [r] = result.recipients.values()
    assert r.kind == FAILED and str(r.response).startswith("553 5.6.7")
    assert sink.received == []


async def test_control_characters_never_reach_the_wire(tmp_path: Path) -> None:
    with ScriptedSink() as sink:
        org = load_org(tmp_path, smart_host(sink.port))
        it = item(["a\r\nRCPT TO:<evil@x>@partner.example", "ok@partner.example"])
        [result] = await send(org, [it])
        [bad_sender] = await send(org, [item(["ok2@partner.example"],
                                             sender="x\r\nDATA@contoso.test")])
    assert sorted(kinds(result)) == [DELIVERED, FAILED]
    assert [r.rcpt_tos for r in sink.received] == [["ok@partner.example"]]
    assert kinds(bad_sender) == [FAILED]


@pytest.mark.parametrize("usage, kept", [
    ("Internet", {"received"}), ("Custom", set()),
    ("Internal", {"received", "x-ms-exchange-organization-scl"}),
    ("Partner", {"received", "x-ms-exchange-organization-scl"})])
async def test_header_firewall_by_usage(tmp_path: Path, usage: str, kept: set[str]) -> None:
    data = (b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            b"X-MS-Exchange-Organization-SCL: -1\r\nFrom: alice@contoso.test\r\n"
            b"Subject: fw\r\n\r\nbody\r\n")
    extra = f'Usage = "{usage}"' + ('\nRequireTLS = false' if usage == "Partner" else "")
    with ScriptedSink() as sink:
        org = load_org(tmp_path, smart_host(sink.port, extra=extra))
        await send(org, [item(["x@partner.example"], data)])
    names = {k.lower() for k in email.message_from_bytes(sink.received[0].data).keys()}
    assert names & {"received", "x-ms-exchange-organization-scl"} == kept


# -- relay to another hub ----------------------------------------------------------------------


@dataclasses.dataclass
class FakeReceiveConnector:
    name: str
    server: str
    bindings: tuple[tuple[str, int], ...]
    permission_groups: frozenset[str]
    enabled: bool = True
    address_spaces: tuple = ()
    section: ClassVar[str] = "receive_connector"


async def test_relay_to_the_source_server(tmp_path: Path) -> None:
    hub02 = '[[transport_server]]\nName = "HUB02"\nStateDirectory = "var2"\n'
    org = load_org(tmp_path, hub02)
    with ScriptedSink(tls=hub_tls(org, "HUB02")) as sink:
        rc = FakeReceiveConnector("Default HUB02", "HUB02", (("127.0.0.1", sink.port),),
                                  frozenset({"ExchangeServers"}))
        org = dataclasses.replace(org, connectors=(*org.connectors, rc))
        data = (b"X-MS-Exchange-Organization-SCL: -1\r\nFrom: alice@contoso.test\r\n"
                b"Subject: relay\r\n\r\nbody\r\n")
        hop = NextHop("SmtpRelayWithinAdSite", "HUB02", "")
        [result] = await deliver_items(hop, None, [item(["bob@contoso.test"], data)],
                                       context(org))
    assert kinds(result) == [DELIVERED]
    assert b"X-MS-Exchange-Organization-SCL" in sink.received[0].data  # no firewall inside


# -- end to end through the daemon -------------------------------------------------------------


async def test_pickup_to_smart_host_end_to_end(hub_factory: Any) -> None:
    with ScriptedSink() as sink:
        async with hub_factory(extra=smart_host(sink.port)) as hub:
            from support import drop_in
            drop_in(hub.pickup, "m1.eml", message(to="carol@partner.example"))
            await wait_for(lambda: sink.received, timeout=30)
    assert sink.received[0].rcpt_tos == ["carol@partner.example"]
    assert sink.received[0].mail_from == "alice@contoso.test"


async def test_send_event_names_the_remote_server(hub_factory: Any) -> None:
    """SEND is tracked as Exchange does: server-ip/-hostname are the smart host's, client-ip
    our end of the connection (issue 10, finding 4): never the default 127.0.0.1."""
    with ScriptedSink(host="127.0.0.2") as sink:
        async with hub_factory(extra=smart_host(sink.port, hosts='"[127.0.0.2]"')) as hub:
            hub.drop_pickup(message(to="carol@partner.example"))
            await wait_for(lambda: sink.received, timeout=30)
            [event] = await wait_for(lambda: hub.events(event_id="SEND"), timeout=30)
            [receive] = hub.events(event_id="RECEIVE")
    assert (event["server-ip"], event["connector-id"]) == ("127.0.0.2", "Smart")
    assert event["server-hostname"] in ("127.0.0.2", "[127.0.0.2]")
    assert event["client-ip"].startswith("127.")
    assert event["client-hostname"] == "hub01.contoso.test"
    assert receive["server-ip"] == "127.0.0.1"  # Pickup: no connection, the server's own


async def test_remote_failure_makes_an_ndr(hub_factory: Any, tmp_path: Path) -> None:
    script = Script(rcpt={"gone@partner.example": "550 5.1.1 <gone@partner.example> unknown"})
    with ScriptedSink(script=script) as sink:
        async with hub_factory(extra=smart_host(sink.port)) as hub:
            from support import drop_in
            drop_in(hub.pickup, "m1.eml", message(to="gone@partner.example, ok@partner.example"))
            [ndr] = await wait_for(lambda: maildir(tmp_path, "Alice"), timeout=30)
    report = ndr.read_bytes().decode("utf-8", "replace")
    assert "Action: failed" in report and "Status: 5.1.1" in report
    assert "Final-Recipient: rfc822;gone@partner.example" in report
    assert "Diagnostic-Code: smtp; 550 5.1.1 <gone@partner.example> unknown" in report
    assert "Reporting-MTA: dns; hub01.contoso.test" in report
    assert sink.received[0].rcpt_tos == ["ok@partner.example"]


RETRY_SERVER = 'MessageExpirationTimeout = "6s"\nDelayNotificationTimeout = "2s"'


async def test_retry_delay_dsn_and_expiry(hub_factory: Any, tmp_path: Path) -> None:
    """451 to RCPT: retried on the compressed ladder, a delay DSN, then the expiry NDR."""
    script = Script(rcpt={"slow@partner.example": "451 4.2.1 Mailbox busy, try later"})
    with ScriptedSink(script=script) as sink:
        async with hub_factory(extra=smart_host(sink.port), server_extra=RETRY_SERVER) as hub:
            from support import drop_in
            drop_in(hub.pickup, "m1.eml", message(to="slow@partner.example"))
            reports = await wait_for(lambda: len(maildir(tmp_path, "Alice")) >= 2 and [
                p.read_bytes().decode("utf-8", "replace") for p in maildir(tmp_path, "Alice")],
                timeout=45)
    delayed = next(r for r in reports if "Action: delayed" in r)
    failed = next(r for r in reports if "Action: failed" in r)
    for report in (delayed, failed):
        assert "Reporting-MTA: dns; hub01.contoso.test" in report
        assert "Final-Recipient: rfc822;slow@partner.example" in report
    assert "Status: 4.2.1" in delayed
    assert "Diagnostic-Code: smtp; 451 4.2.1 Mailbox busy, try later" in delayed
    assert "Will-Retry-Until:" in delayed
    assert "Status: 4.4.7" in failed or "Status: 5.4.7" in failed
    assert "QUEUE.Expired" in failed
    assert sink.handler.connections >= 2  # it was retried


async def test_ndr_names_the_remote_mta(hub_factory: Any, tmp_path: Path) -> None:
    script = Script(rcpt={"gone@partner.example": "550 5.1.1 unknown"})
    with ScriptedSink(script=script) as sink:
        async with hub_factory(extra=smart_host(sink.port)) as hub:
            from support import drop_in
            drop_in(hub.pickup, "m1.eml", message(to="gone@partner.example"))
            [ndr] = await wait_for(lambda: maildir(tmp_path, "Alice"), timeout=30)
    assert "Remote-MTA: dns; 127.0.0.1" in ndr.read_text(errors="replace")


class PipeliningPeer:
    """A raw SMTP server offering PIPELINING: records each read, answers per command."""

    def __init__(self, rcpt: dict[str, str]) -> None:
        self.rcpt = rcpt
        self.reads: list[bytes] = []
        self.messages: list[bytes] = []
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 peer.test ESMTP\r\n")
        buffer = b""
        in_data = False
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            self.reads.append(chunk)
            buffer += chunk
            replies = []
            while True:
                if in_data:
                    end = buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        break
                    self.messages.append(buffer[:end + 2])
                    buffer, in_data = buffer[end + 5:], False
                    replies.append(b"250 2.0.0 queued")
                    continue
                line, sep, rest = buffer.partition(b"\r\n")
                if not sep:
                    break
                buffer = rest
                verb = line[:4].upper()
                if verb == b"EHLO":
                    replies.append(b"250-peer.test\r\n250-PIPELINING\r\n250 8BITMIME")
                elif verb == b"RCPT":
                    address = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    replies.append(self.rcpt.get(address, "250 2.1.5 ok").encode())
                elif verb == b"DATA":
                    in_data = True
                    replies.append(b"354 go ahead")
                elif verb == b"QUIT":
                    replies.append(b"221 bye")
                else:
                    replies.append(b"250 2.0.0 ok")
            if replies:  # one write for every reply this read produced, as servers do
                writer.write(b"".join(r + b"\r\n" for r in replies))
                await writer.drain()
        writer.close()


async def test_a_peer_offering_pipelining_gets_per_recipient_replies_right(
        tmp_path: Path) -> None:
    peer = PipeliningPeer({"gone@partner.example": "550 5.1.1 no such user"})
    await peer.start()
    try:
        org = load_org(tmp_path, smart_host(peer.port))
        first = item(["ok@partner.example", "gone@partner.example"])
        second = item(["also@partner.example"])
        results = await send(org, [first, second])
    finally:
        peer.server.close()
    assert sum(1 for r in peer.reads if r.startswith(b"MAIL FROM:")) == 2
    outcome = {r.address: results[0].recipients[r.id] for r in first.recipients}
    assert outcome["ok@partner.example"].kind == DELIVERED
    assert outcome["gone@partner.example"].kind == FAILED
    assert str(outcome["gone@partner.example"].response) == "550 5.1.1 no such user"
    assert outcome["gone@partner.example"].remote_mta == "127.0.0.1"
    assert [r.kind for r in results[1].recipients.values()] == [DELIVERED]
    assert len(peer.messages) == 2


async def test_a_malformed_reply_defers_only_its_message(tmp_path: Path) -> None:
    """A reply aiosmtplib cannot parse ends that connection: the message it concerned is
    deferred; messages the peer already accepted stay delivered (no duplicates)."""
    peer = PipeliningPeer({"broken@partner.example": "XYZ this is not SMTP"})
    await peer.start()
    try:
        org = load_org(tmp_path, smart_host(peer.port, extra="SmtpMaxMessagesPerConnection = 20")
                       , server_extra="MaxPerDomainOutboundConnections = 1")
        good = item(["ok@partner.example"])
        bad = item(["broken@partner.example"])
        results = await send(org, [good, bad])
    finally:
        peer.server.close()
    assert not isinstance(results, DeferQueue)
    assert [r.kind for r in results[0].recipients.values()] == [DELIVERED]
    assert [r.kind for r in results[1].recipients.values()] == [DEFERRED]
    assert len(peer.messages) == 1
