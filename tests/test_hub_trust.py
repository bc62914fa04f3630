"""Hub-to-hub trust (core/internal_tls.py): real daemons of one organization on loopback.

HUB02's receive connector has Exchange's defaults for hubs (ExchangeServers only, no
AnonymousUsers), so mail from HUB01 arrives only if HUB01 proves itself with the internal
transport certificate the organization's CA issued it; a certificate from another CA, or
from the organization's CA for a name that is no server of the organization, proves nothing.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from daemon_process import DaemonPool, daemon_pool, hubport
from hubport.core.internal_tls import CertificateAuthority
from smtp_support import Client, body, free_port, receive_connector, send_one
from support import wait_for_sync, write_org

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def organization(folder: Path, port1: int, port2: int, management: int | None = None,
                 command_out: Path | None = None) -> Path:
    """HUB01 takes mail from anyone; HUB02 (Carol's mailbox) only from the hubs, and is
    managed on TCP when ``management`` is given. With ``command_out``, HUB02 hosts a
    Delivery Agent connector for cmd.test that appends each message to that file."""
    bindings = f'ManagementBindings = ["127.0.0.1:{management}"]\n' if management else ""
    hub02 = """
[[transport_server]]
Name = "HUB02"
Fqdn = "hub02.contoso.test"
StateDirectory = "var2"
PickupDirectoryPath = "pickup2"
ReplayDirectoryPath = "replay2"
RootDropDirectoryPath = "drop2"
QueueGlitchRetryInterval = "1s"
MessageRetryInterval = "1s"
{bindings}
[[mailbox]]
Name = "Carol"
PrimarySmtpAddress = "carol@contoso.test"
Server = "HUB02"

[[mailbox]]
Name = "Dora"
PrimarySmtpAddress = "dora@contoso.test"
Server = "HUB01"
""".replace("{bindings}", bindings)
    extra = hub02 + receive_connector(
        "Default HUB01", [f"127.0.0.1:{port1}"], Server="HUB01",
        AuthMechanism=["Tls", "ExchangeServer"],
        PermissionGroups=["AnonymousUsers", "ExchangeServers"]) + receive_connector(
        "Default HUB02", [f"127.0.0.1:{port2}"], Server="HUB02",
        AuthMechanism=["Tls", "ExchangeServer"], PermissionGroups=["ExchangeServers"])
    if command_out is not None:
        extra += f"""
[[accepted_domain]]
Name = "cmd.test"
DomainName = "cmd.test"
DomainType = "InternalRelay"

[[delivery_agent_connector]]
Name = "Cmd"
AddressSpaces = ["SMTP:cmd.test;1"]
SourceTransportServers = ["HUB02"]
DeliveryProtocol = "COMMAND"
Command = ["sh", "-c", "cat >> '{command_out}'"]
"""
    return write_org(folder, server_extra='Fqdn = "hub01.contoso.test"', extra=extra)


def wait_for_file(folder: Path, timeout: float, what: str) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob("*")) if folder.is_dir() else []
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"{what}: nothing in {folder} within {timeout}s")


def test_hubs_of_one_machine_trust_each_other_with_no_manual_step(
        tmp_path: Path, pool: DaemonPool) -> None:
    port1, port2 = free_port(), free_port()
    out = tmp_path / "cmd.out"
    config = organization(tmp_path, port1, port2, command_out=out)
    hub1 = pool.start("--server", "HUB01", config=config)
    hub2 = pool.start("--server", "HUB02", config=config)
    hub1.wait_ready(60)
    hub2.wait_ready(60)
    ca = tmp_path / "org-ca"
    assert (ca / "ca.crt").exists() and (ca / "ca.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "var" / "certs" / "internal" / "hub01.contoso.test.crt").exists()
    assert (tmp_path / "var2" / "certs" / "internal" / "hub02.contoso.test.crt").exists()

    asyncio.run(send_one(port1, "carol@contoso.test", "across hubs"))
    mail = wait_for_file(tmp_path / "var2" / "mailboxes" / "Carol" / "new", 60,
                         "HUB01 relays to Carol's hub")
    content = mail.read_bytes()
    assert b"Subject: across hubs" in content
    assert b"by hub01.contoso.test" in content and b"by hub02.contoso.test" in content

    # HUB02's tracking log: received over SMTP from HUB01, then delivered
    done = hubport("get-messagetrackinglog", "--config", str(config), "--server", "HUB02",
                   "-format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = {json.loads(line)["event-id"] for line in done.stdout.splitlines() if line}
    assert {"RECEIVE", "DELIVER"} <= events, done.stdout

    asyncio.run(strangers_get_no_rights(port2, ca))

    # a Delivery Agent connector hosted on HUB02 serves HUB01 too: HUB01 relays the message
    # (the queue is named for the connector) and HUB02's agent delivers it
    asyncio.run(send_one(port1, "someone@cmd.test", "through the other hub's agent"))
    wait_for_sync(lambda: out.exists() and b"other hub's agent" in out.read_bytes(), 60,
                  what="the command agent's output")
    assert re.findall(rb"\bby (hub0\d)\.contoso\.test", out.read_bytes()) == \
        [b"hub02", b"hub01"], out.read_bytes()[:1500]

    # the envelope survives the hop: HUB02 answers NOTIFY=SUCCESS with a DSN that carries
    # the ENVID and ORCPT given to HUB01, and sends it back to Dora's mailbox on HUB01
    asyncio.run(send_with_dsn(port1))
    report = wait_for_file(tmp_path / "var" / "mailboxes" / "Dora" / "new", 60,
                           "the success DSN back on HUB01").read_bytes()
    assert b"Action: delivered" in report or b"Action: relayed" in report, report[:3000]
    assert b"Original-Envelope-Id: track-42" in report, report[:3000]
    assert b"Original-Recipient: rfc822;Carol.Original@contoso.test" in report, report[:3000]
    assert b"Reporting-MTA: dns; hub02.contoso.test" in report, report[:3000]


async def send_with_dsn(port: int) -> None:
    client = await Client.connect(port)
    await client.hello("client.example")
    reply = await client.cmd("MAIL FROM:<dora@contoso.test> RET=HDRS ENVID=track-42")
    assert reply.code == 250, reply
    reply = await client.cmd("RCPT TO:<carol@contoso.test> NOTIFY=SUCCESS"
                             " ORCPT=rfc822;Carol.Original@contoso.test")
    assert reply.code == 250, reply
    assert (await client.cmd("DATA")).code == 354
    await client.send(body("with a DSN", "dora@contoso.test", "carol@contoso.test")
                      + b"\r\n.\r\n")
    assert (await client.reply()).code == 250
    await client.close()


async def strangers_get_no_rights(port: int, ca_folder: Path) -> None:
    """A certificate from another CA fails the handshake; one from the organization's CA
    that names no transport server gets no ExchangeServers rights (530 5.7.1)."""
    foreign = trustme.CA()
    client = await Client.connect(port)
    await client.hello("hub01.contoso.test")
    assert (await client.cmd("STARTTLS")).code == 220
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    foreign.issue_cert("hub01.contoso.test").configure_cert(context)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await client.writer.start_tls(context, server_hostname="")
        await client.cmd("EHLO hub01.contoso.test")  # TLS 1.3 reports it here
    await client.close()

    cert_pem, key_pem = CertificateAuthority(ca_folder).issue(["stranger.example"])
    pem = ca_folder.parent / "stranger.pem"
    pem.write_bytes(cert_pem + key_pem)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(pem)
    client = await Client.connect(port)
    await client.hello("stranger.example")
    assert (await client.cmd("STARTTLS")).code == 220
    await client.writer.start_tls(context, server_hostname="")
    assert (await client.cmd("EHLO stranger.example")).code == 250
    reply = await client.cmd("MAIL FROM:<a@example.org>")
    assert (reply.code, reply.enhanced) == (530, "5.7.1"), reply
    await client.close()


def test_a_hub_on_another_machine_gets_its_certificate_from_where_the_ca_key_lives(
        tmp_path: Path, pool: DaemonPool) -> None:
    """HUB02 runs from its own copy of the organization file ("another machine"), with the
    CA certificate but never the CA key: its certificate comes from new-servercertificate."""
    port1, port2 = free_port(), free_port()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    config1 = organization(one, port1, port2)
    config2 = two / "org.toml"
    shutil.copy(config1, config2)

    # where there is no CA, new-servercertificate makes none (the hubs would not trust it)
    done = hubport("new-servercertificate", "HUB02", "--config", str(config2), cwd=two)
    assert done.returncode == 1 and "no organization CA here" in done.stderr, done.stderr
    assert not (two / "org-ca" / "ca.crt").exists()
    hub1 = pool.start("--server", "HUB01", config=config1)
    hub1.wait_ready(60)  # the organization's CA is made on machine one
    (two / "org-ca").mkdir()
    shutil.copy(one / "org-ca" / "ca.crt", two / "org-ca" / "ca.crt")
    # with the CA certificate but no certificate of its own, HUB02 says what to run
    lonely = pool.start("--server", "HUB02", config=config2)
    assert lonely.wait(60) == 5
    assert "hubport new-servercertificate HUB02" in lonely.log_text()

    out = tmp_path / "for-hub02"
    done = hubport("new-servercertificate", "HUB02", "--config", str(config1),
                   "--server", "HUB01", "--out", str(out), cwd=one)
    assert done.returncode == 0, done.stderr
    assert "hub02.contoso.test.crt" in done.stdout
    assert (out / "ca.crt").read_bytes() == (two / "org-ca" / "ca.crt").read_bytes()
    internal = two / "var2" / "certs" / "internal"
    internal.mkdir(parents=True, exist_ok=True)
    for name in ("hub02.contoso.test.crt", "hub02.contoso.test.key"):
        shutil.copy(out / name, internal / name)

    hub2 = pool.start("--server", "HUB02", config=config2)
    hub2.wait_ready(60)
    assert not (two / "org-ca" / "ca.key").exists()
    asyncio.run(send_one(port1, "carol@contoso.test", "to the other machine"))
    wait_for_file(two / "var2" / "mailboxes" / "Carol" / "new", 60,
                  "HUB01 relays to HUB02 on the other machine")


def test_an_administrator_manages_a_hub_over_tcp_and_nobody_else_does(
        tmp_path: Path, pool: DaemonPool) -> None:
    """ManagementBindings: Get-Queue reaches HUB02 over mutual TLS with an administrator's
    certificate; a hub's own certificate, another CA's, or none is refused."""
    port1, port2, manage = free_port(), free_port(), free_port()
    config = organization(tmp_path, port1, port2, management=manage)
    pool.start("--server", "HUB01", config=config).wait_ready(60)
    # two workers: the supervisor serves the endpoint with the merged view
    pool.start("--server", "HUB02", config=config, workers=2).wait_ready(60)

    done = hubport("new-admincertificate", "Ana", "--config", str(config), "--out",
                   str(tmp_path / "ana"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    pem = tmp_path / "ana" / "Ana.pem"
    assert pem.stat().st_mode & 0o077 == 0
    remote = ("get-queue", "--config", str(config), "--server", "HUB02", "--json")
    done = hubport(*remote, "--certificate", str(pem), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {r["identity"] for r in json.loads(done.stdout)} >= {"HUB02\\Submission"}
    # every server of the organization at once: HUB02 over TCP, HUB01 (no endpoint) here
    done = hubport("get-queue", "--config", str(config), "--server", "*", "--json",
                   "--certificate", str(pem), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {"HUB01\\Submission", "HUB02\\Submission"} <= \
        {r["identity"] for r in json.loads(done.stdout)}, done.stdout
    # the tracking log search runs on HUB02 itself, over every worker's files
    asyncio.run(send_one(port1, "carol@contoso.test", "managed from afar"))
    wait_for_file(tmp_path / "var2" / "mailboxes" / "Carol" / "new", 60, "Carol's mail")
    done = hubport("get-messagetrackinglog", "--config", str(config), "--server", "HUB02",
                   "-messagesubject", "managed from afar", "-format", "json",
                   "--certificate", str(pem), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line]
    assert {"RECEIVE", "DELIVER"} <= {e["event-id"] for e in events}, done.stdout
    assert all(e["server-hostname"].lower().startswith("hub02") for e in events
               if e.get("server-hostname")), done.stdout

    # a hub's own certificate is no administrator's
    hub = tmp_path / "var" / "certs" / "internal"
    (tmp_path / "hub").mkdir()
    impostor = tmp_path / "hub" / "hub01.pem"
    impostor.write_bytes((hub / "hub01.contoso.test.crt").read_bytes()
                         + (hub / "hub01.contoso.test.key").read_bytes())
    (tmp_path / "hub" / "ca.crt").write_bytes((tmp_path / "org-ca" / "ca.crt").read_bytes())
    done = hubport(*remote, "--certificate", str(impostor), cwd=tmp_path)
    assert done.returncode == 1 and "not an administrator" in done.stderr, done.stderr

    # another CA's certificate, and none at all: no TLS session
    foreign = trustme.CA().issue_cert("Ana")
    stranger = tmp_path / "hub" / "stranger.pem"
    stranger.write_bytes(foreign.cert_chain_pems[0].bytes() + foreign.private_key_pem.bytes())
    done = hubport(*remote, "--certificate", str(stranger), cwd=tmp_path)
    assert done.returncode == 1 and "management endpoint HUB02" in done.stderr, done.stderr
    context = ssl.create_default_context(cafile=str(tmp_path / "org-ca" / "ca.crt"))
    answer = b""
    try:  # TLS 1.2 fails the handshake; TLS 1.3 closes the connection after it
        with socket.create_connection(("127.0.0.1", manage), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="hub02.contoso.test") as sock:
            sock.sendall(b'{"op": "get-queue", "args": {}}\n')
            answer = sock.recv(1024)
    except (ssl.SSLError, ConnectionError):
        pass
    assert answer == b"", answer


def test_hubs_with_different_versions_of_the_organization_neither_loop_nor_lose_mail(
        tmp_path: Path, pool: DaemonPool) -> None:
    """Carol's mailbox moves from HUB02 to HUB01. HUB02 (another machine) has the new file,
    HUB01 still runs the old one: HUB01 relays Carol's mail to HUB02, HUB02 (newer) sends it
    back, HUB01 (older) keeps it as Unreachable and says why; once HUB01 has the new file
    (it watches it), the mail is delivered, once."""
    port1, port2 = free_port(), free_port()
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    old = organization(one, port1, port2)
    pool.start("--server", "HUB01", config=old).wait_ready(60)
    shutil.copytree(one / "org-ca", two / "org-ca")  # the organization's CA, on machine two
    new = organization(two, port1, port2)
    moved = new.read_text().replace('Name = "Carol"\nPrimarySmtpAddress = "carol@contoso.test"'
                                    '\nServer = "HUB02"', 'Name = "Carol"\nPrimarySmtpAddress'
                                    ' = "carol@contoso.test"\nServer = "HUB01"')
    assert moved != new.read_text()
    time.sleep(0.05)  # a version no older than the old file's, whatever the clock
    new.write_text(moved)
    pool.start("--server", "HUB02", config=new).wait_ready(60)

    asyncio.run(send_one(port1, "carol@contoso.test", "moved mailbox"))
    seen: list[str] = []

    def held() -> bool:
        done = hubport("get-message", "--config", str(old), "--server", "HUB01", "--json",
                       cwd=one)
        seen[:] = [done.stdout + done.stderr]
        return "ROUTING.Disagreement" in done.stdout

    wait_for_sync(held, 60, what="HUB01 keeps Carol's mail and says why",
                  describe=lambda: seen)
    assert not list((one / "var" / "mailboxes").glob("Carol/new/*"))
    assert not list((two / "var2" / "mailboxes").glob("Carol/new/*"))

    old.write_text(moved)  # HUB01 gets the new version and reloads it
    mail = wait_for_file(one / "var" / "mailboxes" / "Carol" / "new", 60,
                         "Carol's mail on HUB01 once it has the new file").read_bytes()
    assert re.findall(rb"\bby (hub0\d)\.contoso\.test", mail) == \
        [b"hub01", b"hub02", b"hub01"], mail[:1500]  # there and back once, never again
    time.sleep(2)
    assert len(list((one / "var" / "mailboxes" / "Carol" / "new").iterdir())) == 1
    assert not list((two / "var2" / "mailboxes").glob("Carol/new/*"))
