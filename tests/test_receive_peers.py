"""Server-to-server trust and the README's default configuration, with real peers.

* ExchangeServer authentication: mutual TLS with a client certificate from the
  organization's CA naming another transport server of the organization (trustme makes the
  CA); such a peer is an Exchange server (relay, organization headers kept), a certificate
  naming anyone else earns nothing, and no certificate at all is anonymous.
* The embedded default daemon (``hubport run`` with no arguments, as the README starts it)
  takes a mail from Debian's ``swaks`` on its Default connector and delivers it to a
  mailbox.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trustme

from smtp_support import Client, body, free_port, queued_data, receive_connector

pytestmark = pytest.mark.timeout(120)

HUB02 = """
[[transport_server]]
Name = "HUB02"
Fqdn = "hub02.contoso.test"
StateDirectory = "var2"
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA, name: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if name is not None:
        ca.issue_cert(name).configure_cert(context)
    return context


async def start_tls_session(port: int, context: ssl.SSLContext) -> Client:
    client = await Client.connect(port)
    await client.hello("hub02.contoso.test")
    reply = await client.cmd("STARTTLS")
    assert reply.code == 220, reply
    await client.writer.start_tls(context, server_hostname="")
    assert (await client.cmd("EHLO hub02.contoso.test")).code == 250
    return client


async def test_exchange_server_authentication_by_client_certificate(
        hub_factory, tmp_path: Path, ca: trustme.CA) -> None:
    """The administrator's own CA (InternalTransportCertificate* on the transport server)
    proves the hubs; a partner CA the connector also trusts proves no hub, whatever name
    its certificate carries."""
    ca_file = tmp_path / "org-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    mine = ca.issue_cert("hub01.contoso.test")
    mine.cert_chain_pems[0].write_to_path(str(tmp_path / "hub01.crt"))
    mine.private_key_pem.write_to_path(str(tmp_path / "hub01.key"))
    server_extra = (f'InternalTransportCertificateFile = "{tmp_path / "hub01.crt"}"\n'
                    f'InternalTransportCertificateKeyFile = "{tmp_path / "hub01.key"}"\n'
                    f'InternalTransportCertificateAuthorityFile = "{ca_file}"\n')
    partners = trustme.CA()
    partner_file = tmp_path / "partner-ca.pem"
    partners.cert_pem.write_to_path(str(partner_file))
    port = free_port()
    extra = HUB02 + receive_connector(
        "Internal", [f"127.0.0.1:{port}"], AuthMechanism=["Tls", "ExchangeServer"],
        PermissionGroups=["ExchangeServers", "Partners"],
        TlsClientCertificateAuthorityFile=str(partner_file))
    async with hub_factory(extra=extra, server_extra=server_extra) as hub:
        impostor = await start_tls_session(port, client_context(partners, "hub02.contoso.test"))
        # a partner may not send as the organization's own domain (and may not relay)
        reply = await impostor.cmd("MAIL FROM:<alice@contoso.test>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        assert (await impostor.cmd("MAIL FROM:<someone@partner.example>")).code == 250
        reply = await impostor.cmd("RCPT TO:<x@external.example>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        await impostor.close()

        server = await start_tls_session(port, client_context(ca, "hub02.contoso.test"))
        assert (await server.cmd("MAIL FROM:<alice@contoso.test>")).code == 250
        assert (await server.cmd("RCPT TO:<x@external.example>")).code == 250  # may relay
        assert (await server.cmd("DATA")).code == 354
        await server.send(b"X-MS-Exchange-Organization-Scl: 1\r\n" + body() + b"\r\n.\r\n")
        assert (await server.reply()).code == 250
        await server.close()
        (data,) = await queued_data(hub)
        assert b"X-MS-Exchange-Organization-Scl: 1" in data  # a server's org headers stay

        # the hubs' CA, but no server of the organization: a partner at most, no relay
        stranger = await start_tls_session(port, client_context(ca, "stranger.example"))
        assert (await stranger.cmd("MAIL FROM:<a@example.org>")).code == 250
        reply = await stranger.cmd("RCPT TO:<x@external.example>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        await stranger.close()

        anonymous = await start_tls_session(port, client_context(ca, None))
        reply = await anonymous.cmd("MAIL FROM:<a@example.org>")
        assert (reply.code, reply.enhanced) == (530, "5.7.1"), reply
        await anonymous.close()


async def test_a_certificate_from_another_ca_fails_the_handshake(
        hub_factory, tmp_path: Path, ca: trustme.CA) -> None:
    ca_file = tmp_path / "org-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    port = free_port()
    extra = HUB02 + receive_connector(
        "Internal", [f"127.0.0.1:{port}"], AuthMechanism=["Tls", "ExchangeServer"],
        PermissionGroups=["ExchangeServers"], TlsClientCertificateAuthorityFile=str(ca_file))
    async with hub_factory(extra=extra) as hub:
        client = await Client.connect(port)
        await client.hello()
        assert (await client.cmd("STARTTLS")).code == 220
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await client.writer.start_tls(client_context(trustme.CA(), "hub02.contoso.test"),
                                          server_hostname="")
            await client.cmd("EHLO hub02.contoso.test")  # TLS 1.3 reports it here
        await client.close()
        assert await queued_data(hub) == []


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the default connector never listened on {port}")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks (Debian package) missing")
def test_swaks_to_the_embedded_default_reaches_a_mailbox(tmp_path: Path) -> None:
    """The README's `hubport run` (no arguments) takes SMTP on 127.0.0.1:2525."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 2525)) == 0:
            pytest.skip("something else listens on 127.0.0.1:2525")
    hubport = Path(sys.executable).with_name("hubport")
    daemon = subprocess.Popen([str(hubport), "run"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**os.environ})
    try:
        _wait_port(2525)
        done = subprocess.run(
            ["swaks", "--server", "127.0.0.1:2525", "--from", "someone@example.org",
             "--to", "alice@contoso.test", "--header", "Subject: hello from swaks",
             "--body", "Sent by swaks."], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "250 2.6.0" in done.stdout
        inbox = tmp_path / "var" / "mailboxes" / "Alice" / "new"
        deadline = time.monotonic() + 30
        while not (inbox.is_dir() and any(inbox.iterdir())):
            assert time.monotonic() < deadline, "the mail never reached Alice's Maildir"
            time.sleep(0.1)
        (mail,) = list(inbox.iterdir())
        content = mail.read_bytes()
        assert b"Subject: hello from swaks" in content
        assert b"by hub01.contoso.test" in content
        logs = tmp_path / "var" / "logs" / "ProtocolLog" / "SmtpReceive"
        deadline = time.monotonic() + 10
        while not any(logs.glob("RECV*.log")):
            assert time.monotonic() < deadline, "no protocol log was written"
            time.sleep(0.1)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
