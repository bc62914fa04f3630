"""Send connector faults users hit (issue 10): the Send protocol log, relayed DSNs."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path
from typing import Any

import pytest

from hubport.core.protocol_log import FIELDS
from send_peers import ScriptedSink, hub_tls
from support import message, wait_for

pytestmark = pytest.mark.timeout(90)

PASSWORD = "Sm4rt-host-s3cret"


def smart_host(port: int, extra: str = "") -> str:
    return ('[[send_connector]]\nName = "Smart"\nAddressSpaces = ["*"]\n'
            f'SmartHosts = ["[127.0.0.1]"]\nPort = {port}\n'
            f'ConnectionInactivityTimeOut = "10s"\n{extra}\n')


# -- the Send protocol log ---------------------------------------------------------------


def send_log_dir(state: Path) -> Path:
    return state / "logs" / "ProtocolLog" / "SmtpSend"


def send_records(state: Path) -> list[dict[str, str]]:
    """Every data record of the SEND files, as field -> value (strict UTF-8, valid CSV)."""
    rows: list[dict[str, str]] = []
    folder = send_log_dir(state)
    files = sorted(folder.glob("SEND*.log")) if folder.is_dir() else []
    for file in files:
        text = file.read_bytes().decode("utf-8")
        lines = text.splitlines(keepends=True)
        assert lines[0] == "#Software: hubport\n" and "#Log-Type: SMTP Send Protocol Log\n" in \
            lines, lines[:5]
        body = "".join(line for line in lines if not line.startswith("#"))
        for row in csv.reader(io.StringIO(body)):
            assert len(row) == len(FIELDS), row
            rows.append(dict(zip(FIELDS, row, strict=True)))
    return rows


def secrets_of(user: str, password: str) -> list[str]:
    plain = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return [password, plain, base64.b64encode(password.encode()).decode()]


async def test_send_protocol_log_is_written_and_flushed_at_stop(hub_factory: Any,
                                                                tmp_path: Path) -> None:
    """A Verbose connector logs the whole session in SEND files; a clean stop flushes all."""
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    auth = ('ProtocolLoggingLevel = "Verbose"\nSmartHostAuthMechanism = "BasicAuth"\n'
            'AuthenticationCredential = { UserName = "relay", PasswordFile = "pw" }\n')
    with ScriptedSink(users={"relay": PASSWORD}) as sink:
        async with hub_factory(extra=smart_host(sink.port, auth)) as hub:
            hub.drop_pickup(message(to="carol@partner.example"))
            await wait_for(lambda: sink.received, timeout=30)
            # while the daemon runs, the background flusher writes the lines
            rows = await wait_for(lambda: [r for r in send_records(hub.state)
                                           if r["event"] == ">" and r["data"] == "QUIT"],
                                  timeout=30)
            assert rows, send_records(hub.state)
            state = hub.state
    assert sink.received[0].auth == ("PLAIN", "relay")
    records = send_records(state)
    sessions = {r["session-id"] for r in records}
    assert len(sessions) == 1, records
    assert [int(r["sequence-number"]) for r in records] == list(range(len(records)))
    assert {r["connector-id"] for r in records} == {"Smart"}
    assert {r["remote-endpoint"] for r in records} == {f"127.0.0.1:{sink.port}"}
    [local] = {r["local-endpoint"] for r in records}
    assert local.startswith("127.0.0.1:") and int(local.rpartition(":")[2]) > 0
    events = [(r["event"], r["data"].split(" ")[0]) for r in records]
    assert events[0] == ("+", "") and events[-1] == ("-", "")
    assert events[1] == ("<", "220")
    sent = [d for e, d in events if e == ">"]
    assert sent == ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"], events
    assert any(r["data"].startswith("235") for r in records)  # the AUTH reply is logged
    assert any(r["data"].startswith("250 2.0.0 Queued") for r in records)
    mail = next(r["data"] for r in records if r["data"].startswith("MAIL FROM:"))
    assert mail.startswith("MAIL FROM:<alice@contoso.test>")
    stamps = [r["date-time"] for r in records]
    assert all(s.endswith("Z") and "T" in s for s in stamps) and stamps == sorted(stamps)
    text = "".join(p.read_text("utf-8") for p in send_log_dir(state).iterdir())
    leaks = [s for s in secrets_of("relay", PASSWORD) if s in text]
    assert not leaks, f"AUTH secrets in the Send protocol log: {leaks}"


async def test_the_last_session_is_flushed_by_a_clean_stop(hub_factory: Any) -> None:
    """Stopping right after the hand-off still leaves the session's end in the file."""
    with ScriptedSink() as sink:
        async with hub_factory(extra=smart_host(sink.port,
                                                'ProtocolLoggingLevel = "Verbose"')) as hub:
            hub.drop_pickup(message(to="carol@partner.example"))
            await wait_for(lambda: sink.received, timeout=30)
            state = hub.state
        # the daemon has stopped: nothing may still be waiting in a buffer
    records = send_records(state)
    assert records, f"no SEND log in {send_log_dir(state)}"
    assert records[-1]["event"] == "-", records[-3:]
    assert any(r["event"] == ">" and r["data"] == "QUIT" for r in records)


async def test_no_send_log_unless_verbose(hub_factory: Any) -> None:
    with ScriptedSink() as sink:
        async with hub_factory(extra=smart_host(sink.port)) as hub:
            hub.drop_pickup(message(to="carol@partner.example"))
            await wait_for(lambda: sink.received, timeout=30)
            state = hub.state
    assert send_records(state) == []


async def test_a_failed_connection_is_logged(hub_factory: Any) -> None:
    """A smart host that refuses the connection leaves a session saying so."""
    from send_peers import free_port

    port = free_port()  # nobody listens there
    async with hub_factory(extra=smart_host(port, 'ProtocolLoggingLevel = "Verbose"')) as hub:
        hub.drop_pickup(message(to="carol@partner.example"))
        rows = await wait_for(lambda: [r for r in send_records(hub.state)
                                       if "attempting to connect failed" in r["data"]],
                              timeout=30)
    assert rows[0]["remote-endpoint"] == f"127.0.0.1:{port}"
    assert rows[0]["event"] == "*" and rows[0]["local-endpoint"] == ""


async def test_the_hub_relay_logs_with_intra_org_connector_protocol_logging(
        tmp_path: Path) -> None:
    """IntraOrgConnectorProtocolLoggingLevel = Verbose logs the relay to another hub."""
    import dataclasses

    from hubport.core.model import NextHop
    from hubport.plugins.smtp_send.delivery import deliver_items
    from hubport.plugins.smtp_send.protolog import send_logs
    from test_send_connector import FakeReceiveConnector, context, item, kinds, load_org

    hub02 = '[[transport_server]]\nName = "HUB02"\nStateDirectory = "var2"\n'
    org = load_org(tmp_path, hub02,
                   server_extra='IntraOrgConnectorProtocolLoggingLevel = "Verbose"')
    with ScriptedSink(tls=hub_tls(org, "HUB02")) as sink:
        rc = FakeReceiveConnector("Default HUB02", "HUB02", (("127.0.0.1", sink.port),),
                                  frozenset({"ExchangeServers"}))
        org = dataclasses.replace(org, connectors=(*org.connectors, rc))
        hop = NextHop("SmtpRelayWithinAdSite", "HUB02", "")
        [result] = await deliver_items(hop, None, [item(["bob@contoso.test"])], context(org))
        await send_logs().close()  # what the Send service does when the daemon stops
    assert kinds(result) == ["delivered"]
    records = send_records(tmp_path / "var")
    assert {r["connector-id"] for r in records} == {"Intra-Organization SMTP Send Connector"}
    assert records[-1]["event"] == "-" and any(r["data"] == "QUIT" for r in records)


# -- NOTIFY=SUCCESS across a relay (RFC 3461 §5.2.2) ---------------------------------------


def dsn_replay(*receivers: str) -> bytes:
    """A Replay file with DSN parameters: RET and ENVID for the sender, NOTIFY/ORCPT each."""
    head = "X-Sender: <alice@contoso.test> RET=HDRS ENVID=track+2B42\n"
    head += "".join(f"X-Receiver: {r}\n" for r in receivers)
    return head.encode() + message(to="carol@partner.example, dave@partner.example")


RECEIVERS = ("<carol@partner.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Carol@partner.example",
             "<dave@partner.example> NOTIFY=FAILURE",
             "<erin@partner.example>")


def report_fields(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(per-message fields, per-recipient fields) of a DSN file, names in lower case."""
    from email import message_from_bytes

    report = message_from_bytes(path.read_bytes())
    blocks = report.get_payload()[1].get_payload()
    lower = [{k.lower(): v for k, v in block.items()} for block in blocks]
    return lower[0], lower[1:]


async def test_a_peer_without_dsn_makes_us_send_a_relayed_dsn(hub_factory: Any) -> None:
    with ScriptedSink() as sink:  # aiosmtpd: no DSN in its EHLO
        async with hub_factory(extra=smart_host(sink.port)) as hub:
            from support import drop_in

            drop_in(hub.replay, "dsn.eml", dsn_replay(*RECEIVERS))
            [dsn] = await wait_for(lambda: hub.maildir("Alice"), timeout=30)
            await wait_for(lambda: "DSN" in hub.event_ids(), timeout=30)
            tracked = [e for e in hub.events() if e["event-id"] == "DSN"]
    [received] = sink.received
    assert sorted(received.rcpt_tos) == ["carol@partner.example", "dave@partner.example",
                                         "erin@partner.example"]
    assert not any(received.rcpt_options) and not any(
        o.startswith(("RET=", "ENVID=")) for o in received.mail_options)
    per_message, per_recipient = report_fields(dsn)
    assert per_message["original-envelope-id"] == "track+2B42"  # as given, in xtext
    assert per_message["reporting-mta"] == "dns; hub01.contoso.test"
    [carol] = per_recipient  # dave asked for FAILURE only, erin for nothing
    assert carol["action"] == "relayed" and carol["status"] == "2.0.0"
    assert carol["final-recipient"] == "rfc822;carol@partner.example"
    assert carol["original-recipient"] == "rfc822;Carol@partner.example"
    assert [e["recipient-address"] for e in tracked] == [["carol@partner.example"]]
    assert tracked[0]["recipient-status"] == ["relayed"]


async def test_a_dsn_peer_gets_the_parameters_and_we_send_no_dsn(hub_factory: Any) -> None:
    with ScriptedSink(dsn=True) as sink:
        async with hub_factory(extra=smart_host(sink.port)) as hub:
            from support import drop_in

            drop_in(hub.replay, "dsn.eml", dsn_replay(*RECEIVERS))
            await wait_for(lambda: "SEND" in hub.event_ids(), timeout=30)
            ids = hub.event_ids()
            alice = hub.maildir("Alice")
    assert "DSN" not in ids and not alice, (ids, alice)
    [received] = sink.received
    assert "RET=HDRS" in received.mail_options and "ENVID=TRACK+2B42" in received.mail_options
    by_rcpt = dict(zip(received.rcpt_tos, received.rcpt_options, strict=True))
    assert by_rcpt["carol@partner.example"] == ["NOTIFY=SUCCESS,FAILURE",
                                                "ORCPT=RFC822;CAROL@PARTNER.EXAMPLE"]
    assert by_rcpt["dave@partner.example"] == ["NOTIFY=FAILURE"]
    assert by_rcpt["erin@partner.example"] == []
