"""Receive connector sessions over loopback: STARTTLS, AUTH and permission groups.

Real clients (aiosmtplib, smtplib in a thread, Debian's swaks) where the bytes do not
matter; the raw ``Client`` of ``tests/smtp_support.py`` where they do
(docs/exchange.md, "Receive connectors and permission groups";
docs/reliability.md groups C, D, F, G). Limits, connector choice and local faults are in
``test_receive_limits.py``; framing and smuggling in ``test_receive_protocol.py``.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtp_support import (
    TIMEOUT,
    Client,
    auth_plain,
    b64,
    body,
    connected,
    free_port,
    insecure_context,
    queued_data,
    receive_connector,
    set_password,
)
from support import maildir, wait_for

pytestmark = pytest.mark.timeout(120)

PASSWORD = "Zebra-Quartz-7719"  # unusual enough to search logs for
SWAKS = "/usr/bin/swaks"
SUBMISSION = {"AuthMechanism": ["Tls", "BasicAuth", "BasicAuthRequireTLS"],
              "PermissionGroups": ["ExchangeUsers", "AnonymousUsers"]}


def _unfold(data: bytes) -> bytes:
    return re.sub(rb"\r?\n[ \t]+", b" ", data)


async def _queued(hub: Any, count: int = 1) -> list[bytes]:
    """Wait until ``count`` messages are in the queue; their unfolded content."""
    async def enough() -> list[bytes] | None:
        data = await queued_data(hub)
        return data if len(data) >= count else None

    deadline = time.monotonic() + TIMEOUT
    while (found := await enough()) is None:
        assert time.monotonic() < deadline, "message not queued"
        await asyncio.sleep(0.05)
    return [_unfold(d) for d in found]


async def _swaks(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        SWAKS, "--server", "127.0.0.1", "--timeout", "30", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, out.decode("utf-8", "replace")


async def _tls_client(port: int) -> Client:
    client = await Client.connect(port)
    await client.hello()
    await client.starttls()
    assert (await client.cmd("EHLO client.test")).code == 250
    return client


# -- 1. STARTTLS ---------------------------------------------------------------------------


async def test_starttls_is_offered_only_with_the_tls_mechanism(hub_factory) -> None:
    tls, plain = free_port(), free_port()
    extra = (receive_connector("Tls", [f"127.0.0.1:{tls}"], PermissionGroups=["AnonymousUsers"])
             + receive_connector("Plain", [f"127.0.0.1:{plain}"], AuthMechanism=["None"],
                                 PermissionGroups=["AnonymousUsers"]))
    async with hub_factory(extra=extra):
        async with connected(tls) as client:
            assert "STARTTLS" in (await client.hello()).lines
        async with connected(plain) as client:
            assert "STARTTLS" not in (await client.hello()).lines
            assert (await client.cmd("STARTTLS")).code == 500


async def test_after_starttls_the_client_must_say_ehlo_again(hub_factory) -> None:
    """RFC 3207 §4.2: the session is reset; MAIL before a new EHLO is out of sequence."""
    port = free_port()
    extra = receive_connector("Tls", [f"127.0.0.1:{port}"], PermissionGroups=["AnonymousUsers"])
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            await client.starttls()
            reply = await client.cmd("MAIL FROM:<someone@example.org>")
            assert (reply.code, reply.enhanced) == (503, "5.5.1"), reply
            ehlo = await client.cmd("EHLO client.test")
            assert ehlo.code == 250 and "STARTTLS" not in ehlo.lines
            assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250


async def test_starttls_command_injection_is_discarded(hub_factory) -> None:
    """Catalogue D28: plaintext behind STARTTLS must not be answered inside TLS."""
    port = free_port()
    extra = receive_connector("Tls", [f"127.0.0.1:{port}"], PermissionGroups=["AnonymousUsers"])
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            await client.send(b"STARTTLS\r\nHELP\r\n")
            ready = await client.reply()
            assert ready.code == 220, ready
            await client.writer.start_tls(insecure_context(), server_hostname="")
            reply = await client.cmd("NOOP")
            assert reply.code == 250 and reply.enhanced == "2.0.0", reply
            assert (await client.cmd("QUIT")).code == 221  # nothing else was waiting


async def test_received_field_names_tls_and_the_authenticated_user(hub_factory) -> None:
    """RFC 3848 protocol names: ESMTPS with the cipher; ESMTPSA with the user's alias."""
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                               timeout=TIMEOUT)
        await smtp.connect()
        await smtp.starttls(tls_context=insecure_context())
        await smtp.sendmail("someone@example.org", ["partner@fabrikam.test"],
                            body(subject="anonymous tls", to="partner@fabrikam.test"))
        await smtp.quit()
        first = (await _queued(hub, 1))[0]
        assert re.search(rb"Received: from \S+ \(\[127\.0\.0\.1\]\) by .* with ESMTPS"
                         rb" \(TLSv1\.[23] [A-Z0-9_-]+\)", first), first[:400]

        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                               timeout=TIMEOUT)
        await smtp.connect()
        await smtp.starttls(tls_context=insecure_context())
        await smtp.login("Alice", PASSWORD)
        await smtp.sendmail("alice@contoso.test", ["someone@example.org"],
                            body(subject="authenticated", sender="alice@contoso.test",
                                 to="someone@example.org"))
        await smtp.quit()
        second = next(d for d in await _queued(hub, 2) if b"authenticated" in d)
        assert re.search(rb"with ESMTPSA \(TLSv1\.[23] [A-Z0-9_-]+; authenticated as Alice\)",
                         second), second[:400]


async def test_require_tls_refuses_mail_before_starttls(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Tls", [f"127.0.0.1:{port}"], RequireTLS=True,
                              PermissionGroups=["AnonymousUsers"])
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            reply = await client.cmd("MAIL FROM:<someone@example.org>")
            assert (reply.code, reply.enhanced) == (530, "5.7.0"), reply
            await client.starttls()
            await client.cmd("EHLO client.test")
            assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250


async def test_implicit_tls_listener_with_auth(hub_factory) -> None:
    """Catalogue D35: TLS from the first byte (port 465 style); AUTH works there."""
    port = free_port()
    extra = receive_connector("Implicit", [f"127.0.0.1:{port}"], ImplicitTls=True,
                              AuthMechanism=["Tls", "BasicAuth", "BasicAuthRequireTLS"],
                              PermissionGroups=["ExchangeUsers"])
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)

        def submit() -> tuple[Any, Any]:
            with smtplib.SMTP_SSL("127.0.0.1", port, context=insecure_context(),
                                  timeout=TIMEOUT) as smtp:
                code, text = smtp.ehlo("client.test")
                assert code == 250
                assert b"STARTTLS" not in text and b"AUTH LOGIN PLAIN" in text, text
                login = smtp.login("alice@contoso.test", PASSWORD)
                refused = smtp.sendmail("alice@contoso.test", ["someone@example.org"],
                                        body(sender="alice@contoso.test",
                                             to="someone@example.org"))
                return login, refused

        login, refused = await asyncio.to_thread(submit)
        assert login[0] == 235 and refused == {}
        data = (await _queued(hub))[0]
        assert b"with ESMTPSA (TLSv1." in data and b"authenticated as Alice" in data


async def test_a_silent_tls_client_is_closed_by_the_handshake_timeout(hub_factory) -> None:
    port, implicit = free_port(), free_port()
    extra = (receive_connector("Tls", [f"127.0.0.1:{port}"], TlsHandshakeTimeout="2s",
                               PermissionGroups=["AnonymousUsers"])
             + receive_connector("Implicit", [f"127.0.0.1:{implicit}"], ImplicitTls=True,
                                 TlsHandshakeTimeout="2s", PermissionGroups=["AnonymousUsers"]))
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            assert (await client.cmd("STARTTLS")).code == 220
            assert await client.closed()  # no ClientHello: the server gives up
        async with connected(implicit) as client:  # plain TCP to an implicit-TLS port
            assert await client.closed()


async def test_swaks_tls_auth_submission_and_plain_anonymous_delivery(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        code, out = await _swaks("--port", str(port), "--tls", "--auth", "LOGIN",
                                 "--auth-user", "Alice", "--auth-password", PASSWORD,
                                 "--from", "alice@contoso.test", "--to", "friend@example.org",
                                 "--header", "Subject: swaks submission")
        assert code == 0, out
        assert "235 2.7.0" in out and "250 2.6.0" in out, out
        code, out = await _swaks("--port", str(port), "--from", "someone@example.org",
                                 "--to", "bob@contoso.test", "--header", "Subject: swaks plain")
        assert code == 0, out
        assert "250 2.6.0" in out, out
        await wait_for(lambda: maildir(hub.root, "Bob"), TIMEOUT)
        submitted = next(d for d in await _queued(hub) if b"swaks submission" in d)
        assert b"authenticated as Alice" in submitted


# -- 2. AUTH ----------------------------------------------------------------------------------


async def test_basic_auth_require_tls_hides_auth_until_tls(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        async with connected(port) as client:
            ehlo = await client.hello()
            assert not any(line.startswith("AUTH") for line in ehlo.lines), ehlo
            reply = await client.cmd(f"AUTH PLAIN {auth_plain('Alice', PASSWORD)}")
            assert (reply.code, reply.enhanced) == (538, "5.7.11"), reply
            await client.starttls()
            ehlo = await client.cmd("EHLO client.test")
            assert "AUTH LOGIN PLAIN" in ehlo.lines, ehlo


@pytest.mark.parametrize("login", ["Alice", "alice@contoso.test"])
async def test_auth_plain_and_login_with_alias_or_address(hub_factory, login: str) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)

        async def plain_initial(client: Client) -> Any:
            return await client.cmd(f"AUTH PLAIN {auth_plain(login, PASSWORD)}")

        async def plain_challenge(client: Client) -> Any:
            challenge = await client.cmd("AUTH PLAIN")
            assert challenge.code == 334, challenge
            return await client.cmd(auth_plain(login, PASSWORD))

        async def login_initial(client: Client) -> Any:
            challenge = await client.cmd(f"AUTH LOGIN {b64(login)}")
            assert challenge.code == 334, challenge
            return await client.cmd(b64(PASSWORD))

        async def login_challenge(client: Client) -> Any:
            user = await client.cmd("AUTH LOGIN")
            assert user.code == 334 and user.text == b64("Username:"), user
            password = await client.cmd(b64(login))
            assert password.code == 334 and password.text == b64("Password:"), password
            return await client.cmd(b64(PASSWORD))

        for way in (plain_initial, plain_challenge, login_initial, login_challenge):
            client = await _tls_client(port)
            try:
                reply = await way(client)
                assert (reply.code, reply.enhanced) == (235, "2.7.0"), (way.__name__, reply)
                # proof that it counts: Alice may now relay
                assert (await client.cmd("MAIL FROM:<alice@contoso.test>")).code == 250
                assert (await client.cmd("RCPT TO:<friend@example.org>")).code == 250
            finally:
                await client.close()


async def test_auth_failures_wrong_password_and_bad_base64(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], MaxLogonFailures=5,
                              **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        client = await _tls_client(port)
        try:
            reply = await client.cmd(f"AUTH PLAIN {auth_plain('Alice', 'wrong')}")
            assert (reply.code, reply.enhanced) == (535, "5.7.8"), reply
            reply = await client.cmd(f"AUTH PLAIN {auth_plain('nobody', PASSWORD)}")
            assert (reply.code, reply.enhanced) == (535, "5.7.8"), reply
            reply = await client.cmd("AUTH PLAIN !!!")
            assert (reply.code, reply.enhanced) == (501, "5.5.2"), reply
            reply = await client.cmd(f"AUTH PLAIN {auth_plain('Alice', PASSWORD)}")
            assert reply.code == 235, reply  # the session is still usable
        finally:
            await client.close()


async def test_max_logon_failures_closes_the_session(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], MaxLogonFailures=3,
                              **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        client = await _tls_client(port)
        try:
            for _ in range(2):
                reply = await client.cmd(f"AUTH PLAIN {auth_plain('Alice', 'wrong')}")
                assert reply.code == 535, reply
            reply = await client.cmd(f"AUTH PLAIN {auth_plain('Alice', 'wrong')}")
            assert reply.code == 535, reply
            goodbye = await client.reply()
            assert (goodbye.code, goodbye.enhanced) == (421, "4.7.0"), goodbye
            assert await client.closed()
        finally:
            await client.close()


async def test_tarpit_slows_the_second_logon_failure(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], TarpitInterval="1s",
                              MaxLogonFailures=5, **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        client = await _tls_client(port)
        try:
            assert (await client.cmd(f"AUTH PLAIN {auth_plain('Alice', 'x')}")).code == 535
            started = time.monotonic()
            assert (await client.cmd(f"AUTH PLAIN {auth_plain('Alice', 'y')}")).code == 535
            assert time.monotonic() - started >= 0.95  # a lower bound only
        finally:
            await client.close()


async def test_the_password_never_reaches_a_log(hub_factory, capfd, caplog) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"],
                              ProtocolLoggingLevel="Verbose", **SUBMISSION)
    secrets = [PASSWORD, auth_plain("Alice", PASSWORD), b64(PASSWORD),
               auth_plain("Alice", PASSWORD + "x"), b64(PASSWORD + "x")]
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        for command in (f"AUTH PLAIN {auth_plain('Alice', PASSWORD + 'x')}",
                        f"AUTH PLAIN {auth_plain('Alice', PASSWORD)}"):
            client = await _tls_client(port)
            await client.cmd(command)
            await client.close()
        client = await _tls_client(port)
        assert (await client.cmd("AUTH LOGIN")).code == 334
        assert (await client.cmd(b64("Alice"))).code == 334
        assert (await client.cmd(b64(PASSWORD + "x"))).code == 535
        assert (await client.cmd(f"AUTH LOGIN {b64('Alice')}")).code == 334
        assert (await client.cmd(b64(PASSWORD))).code == 235
        await client.cmd("QUIT")
        await client.close()
        state = hub.state
    logs = [p for p in (state / "logs" / "ProtocolLog" / "SmtpReceive").rglob("*") if p.is_file()]
    text = "".join(p.read_text("utf-8", "replace") for p in logs)
    assert "AUTH" in text  # the sessions were logged
    everything = [p for p in Path(state).rglob("*") if p.is_file() and p.suffix != ".db"]
    captured = capfd.readouterr()
    sources = {"protocol log": text, "log output": captured.out + captured.err,
               "logging": caplog.text}
    sources.update({str(p): p.read_bytes().decode("latin-1") for p in everything})
    leaks = [(secret, where) for secret in secrets for where, content in sources.items()
             if secret in content]
    assert not leaks, f"secrets written out: {leaks}"

async def test_authenticated_users_relay_anonymous_users_do_not(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        async with connected(port) as client:
            await client.hello()
            assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
            reply = await client.cmd("RCPT TO:<friend@example.org>")
            assert (reply.code, reply.enhanced, reply.text) == (550, "5.7.1",
                                                                "5.7.1 Unable to relay"), reply
        client = await _tls_client(port)
        try:
            assert (await client.cmd(f"AUTH PLAIN {auth_plain('Alice', PASSWORD)}")).code == 235
            reply = await client.transaction("alice@contoso.test", ["friend@example.org"],
                                             body(sender="alice@contoso.test",
                                                  to="friend@example.org"))
            assert reply.code == 250, reply
        finally:
            await client.close()


async def test_authenticated_user_may_not_send_as_someone_else(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Submission", [f"127.0.0.1:{port}"], **SUBMISSION)
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        client = await _tls_client(port)
        try:
            assert (await client.cmd(f"AUTH PLAIN {auth_plain('Alice', PASSWORD)}")).code == 235
            reply = await client.cmd("MAIL FROM:<bob@contoso.test>")
            assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
            reply = await client.cmd("MAIL FROM:<someone@example.org>")
            assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
            # her own secondary address is hers
            assert (await client.cmd("MAIL FROM:<alice.smith@contoso.test>")).code == 250
        finally:
            await client.close()


async def test_auth_on_a_connector_without_basic_auth(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Anonymous", [f"127.0.0.1:{port}"],
                              PermissionGroups=["AnonymousUsers"])
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "Alice", PASSWORD)
        async with connected(port) as client:
            ehlo = await client.hello()
            assert not any(line.startswith("AUTH") for line in ehlo.lines)
            reply = await client.cmd(f"AUTH PLAIN {auth_plain('Alice', PASSWORD)}")
            assert (reply.code, reply.enhanced) == (504, "5.7.4"), reply


# -- 3. permission groups ---------------------------------------------------------------------

FOREIGN_HEADERS = (b"Received: from evil.example ([192.0.2.1]) by relay.example;"
                   b" Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                   b"X-MS-Exchange-Organization-Foo: injected\r\n"
                   b"X-MS-Exchange-Forest-Bar: injected\r\n")


async def test_externally_secured_connector_relays_for_anyone(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Secured", [f"127.0.0.1:{port}"],
                              AuthMechanism=["ExternalAuthoritative"],
                              PermissionGroups=["ExchangeServers"])
    async with hub_factory(extra=extra) as hub:
        async with connected(port) as client:
            await client.hello()
            reply = await client.transaction("alice@contoso.test", ["friend@example.org"],
                                             FOREIGN_HEADERS + body(to="friend@example.org"))
            assert reply.code == 250, reply
        data = (await _queued(hub))[0]
        assert b"Received: from evil.example" in data  # routing headers are kept
        assert b"X-MS-Exchange-Organization-Foo" not in data
        assert b"X-MS-Exchange-Forest-Bar" not in data


async def test_connector_without_anonymous_users_refuses_anonymous_mail(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Users", [f"127.0.0.1:{port}"],
                              AuthMechanism=["Tls", "BasicAuth"],
                              PermissionGroups=["ExchangeUsers"])
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            reply = await client.cmd("MAIL FROM:<someone@example.org>")
            assert (reply.code, reply.text) == (530, "5.7.1 Client was not authenticated"), reply


async def test_anonymous_relay_by_permission_entry(hub_factory) -> None:
    """Exchange's anonymous relay recipe: Add-ADPermission ANONYMOUS LOGON Accept-Any-Recipient."""
    relay, closed = free_port(), free_port()
    grant = {"User": "NT AUTHORITY\\ANONYMOUS LOGON",
             "ExtendedRights": ["ms-Exch-SMTP-Accept-Any-Recipient"]}
    extra = (receive_connector("Relay", [f"127.0.0.1:{relay}"],
                               PermissionGroups=["AnonymousUsers"], Permissions=[grant])
             + receive_connector("Closed", [f"127.0.0.1:{closed}"],
                                 PermissionGroups=["AnonymousUsers"]))
    async with hub_factory(extra=extra) as hub:
        async with connected(relay) as client:
            await client.hello()
            reply = await client.transaction("app@example.org", ["friend@example.org"],
                                             body(to="friend@example.org"))
            assert reply.code == 250, reply
        async with connected(closed) as client:
            await client.hello()
            assert (await client.cmd("MAIL FROM:<app@example.org>")).code == 250
            reply = await client.cmd("RCPT TO:<friend@example.org>")
            assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply
        assert len(await _queued(hub)) == 1


async def test_header_firewall_strips_organization_headers_of_anonymous(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Anonymous", [f"127.0.0.1:{port}"],
                              PermissionGroups=["AnonymousUsers"])
    async with hub_factory(extra=extra) as hub:
        async with connected(port) as client:
            await client.hello()
            reply = await client.transaction("someone@example.org", ["partner@fabrikam.test"],
                                             FOREIGN_HEADERS + body(to="partner@fabrikam.test"))
            assert reply.code == 250, reply
        data = (await _queued(hub))[0]
        assert b"X-MS-Exchange-Organization-Foo" not in data
        assert b"X-MS-Exchange-Forest-Bar" not in data
        assert b"Received: from evil.example" in data  # AnonymousUsers may bring routing
        assert b"Subject: test" in data



async def test_tracking_records_both_ends_of_the_smtp_connection(hub_factory) -> None:
    """RECEIVE names the client (address and HELO) and the listener's own address: a
    listener on 127.0.0.2 is not 127.0.0.1 (issue 10, finding 4)."""
    port = free_port("127.0.0.2")
    extra = receive_connector("Second address", [f"127.0.0.2:{port}"],
                              PermissionGroups=["AnonymousUsers"])
    async with hub_factory(extra=extra) as hub:
        async with connected(port, host="127.0.0.2", source="127.0.0.3") as client:
            await client.hello("sender.example")
            reply = await client.transaction("someone@example.org", ["alice@contoso.test"],
                                             body("ends"))
            assert reply.code == 250, reply
        seen: list[dict[str, Any]] = []

        def received() -> bool:
            seen[:] = hub.events(event_id="RECEIVE")
            return bool(seen)

        await wait_for(received, timeout=30)
        (event,) = seen
        assert (event["client-ip"], event["client-hostname"]) == ("127.0.0.3", "sender.example")
        assert event["server-ip"] == "127.0.0.2"
        assert event["server-hostname"] == hub.daemon.server.fqdn
        assert (event["source"], event["connector-id"]) == ("SMTP", "Second address")
