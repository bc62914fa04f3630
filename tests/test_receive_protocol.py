"""Receive connectors against hostile bytes: framing, smuggling, relay, sizes (docs/reliability.md, cases 1–45).

Every test runs a real daemon with a receive connector on a loopback port and talks to it
over a real socket, byte for byte.
"""

from __future__ import annotations

import asyncio
import smtplib

import aiosmtplib
import pytest

from hubport.core.credentials import PasswordStore, mailbox_for_login
from smtp_support import (
    Client,
    body,
    connected,
    free_port,
    queued_count,
    receive_connector,
)
from test_receive_data import SMUGGLED, VECTORS

pytestmark = pytest.mark.timeout(120)

ANONYMOUS = {"PermissionGroups": ["AnonymousUsers"]}


async def queued_data(hub) -> list[bytes]:
    return await hub.store.read(lambda c: [bytes(r[0]) for r in c.execute(
        "SELECT data FROM message ORDER BY id")])


@pytest.fixture
def port() -> int:
    return free_port()


# -- framing and smuggling --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VECTORS))
async def test_one_data_never_yields_two_messages(hub_factory, port: int, name: str) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<alice@contoso.test>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        await client.send(b"Subject: a\r\n\r\nfirst" + VECTORS[name] + SMUGGLED + b".\r\n")
        reply = await client.reply()
        expected = ("5.6.0" if b"\x00" in VECTORS[name] else "5.6.11")
        assert (reply.code, reply.enhanced) == ((554 if expected == "5.6.0" else 550),
                                                expected), reply
        # the next reply belongs to the next command: no second transaction was run
        assert (await client.cmd("NOOP")).code == 250
        assert await queued_count(hub) == 0


async def test_normalize_mode_queues_exactly_one_message(hub_factory, port: int) -> None:
    extra = receive_connector("Legacy", [f"127.0.0.1:{port}"], BareLineEndings="Normalize",
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        reply = await client.transaction(
            "someone@example.org", ["alice@contoso.test"],
            b"Subject: a\r\n\r\nfirst\n.\r\n" + SMUGGLED.rstrip(b"\r\n"))
        assert reply.code == 250, reply
        assert (await client.cmd("NOOP")).code == 250
        (data,) = await queued_data(hub)
        assert b"spoof@victim.example" in data  # the smuggled text stayed content
        assert b"\r\n" in data and b"first\r\n" in data


async def test_vector_sent_one_byte_at_a_time(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        await client.cmd("MAIL FROM:<someone@example.org>")
        await client.cmd("RCPT TO:<alice@contoso.test>")
        assert (await client.cmd("DATA")).code == 354
        for byte in b"Subject: a\r\n\r\nx\n.\r\n" + SMUGGLED + b".\r\n":
            await client.send(bytes([byte]))
        assert (await client.reply()).code == 550
        assert (await client.cmd("NOOP")).code == 250
        assert await queued_count(hub) == 0


async def test_dot_stuffing_and_received_field(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], Fqdn="mx.contoso.test",
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello("client.example")
        reply = await client.transaction("someone@example.org", ["alice@contoso.test"],
                                         b"Subject: dots\r\n\r\n..hello\r\n...\r\nend")
        assert reply.code == 250 and reply.enhanced == "2.6.0", reply
        (data,) = await queued_data(hub)
        unfolded = data.replace(b"\r\n ", b" ")
        assert unfolded.startswith(b"Received: from client.example ([127.0.0.1]) by"
                               b" mx.contoso.test ([127.0.0.1]) with ESMTP id ")
        assert b"for <alice@contoso.test>;" in unfolded
        assert data.endswith(b"\r\n\r\n.hello\r\n..\r\nend\r\n")


@pytest.mark.parametrize(("line", "code", "enhanced"), [
    (b"MAIL FROM:<a@contoso.test>\n", 500, "5.5.2"),  # bare LF ends the command
    (b"RCPT TO:<a@b>\rDATA\r\n", 501, "5.1.3"),
    (b"MAIL FROM:<a\x00b@x.example>\r\n", 501, "5.1.7"),
    (b"EHLO foo\rX-Injected: 1\r\n", 501, "5.5.2"),
    (b"BDAT 100 LAST\r\n", 502, "5.5.1"),
    (b"X" * 600 + b"\r\n", 500, "5.5.2"),
    (b"VRFY postmaster\r\n", 252, "2.1.5"),
    (b"EXPN staff\r\n", 502, "5.5.1"),
    (b"MAIL FROM:<a@example.org> SIZE=abc\r\n", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.org> SIZE=999999999\r\n", 552, "5.3.4"),
    (b"MAIL FROM:<a@example.org> SMTPUTF8\r\n", 555, "5.5.4"),
    (b"MAIL FROM:<J\xc3\xb6rg@example.org>\r\n", 553, "5.6.7"),
    # SMTPUTF8 is judged before the address (docs/reliability.md case 80, RFC 6531 §3.5)
    (b"MAIL FROM:<\xc3\xa9t\xc3\xa9@example.org> SMTPUTF8\r\n", 555, "5.5.4"),
    (b"RCPT TO:<j\xc3\xb6rg@contoso.test>\r\n", 553, "5.6.7"),
    (b"MAIL FROM:<J\xf6rg@example.org>\r\n", 553, "5.6.7"),  # Latin-1, not UTF-8
    (b"MAIL FROM:<\"a\rb\"@example.com>\r\n", 501, "5.1.7"),
    (b"MAIL FROM:<a@example.org> FOO=bar\r\n", 555, "5.5.4"),
])
async def test_byte_exact_command_replies(hub_factory, port: int, line: bytes, code: int,
                                          enhanced: str) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra), connected(port) as client:
        await client.hello()
        if line.startswith((b"RCPT", b"BDAT")):
            assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
        await client.send(line)
        reply = await client.reply()
        assert (reply.code, reply.enhanced) == (code, enhanced), reply
        assert (await client.cmd("NOOP")).code == 250  # the session is still usable


@pytest.mark.parametrize(("line", "code", "enhanced"), [
    (b"MAIL FROM:<\xc3\xa9t\xc3\xa9@example.org> SMTPUTF8\r\n", 250, "2.1.0"),
    (b"MAIL FROM:<\xc3\xa9t\xc3\xa9@example.org>\r\n", 553, "5.6.7"),
    (b"MAIL FROM:<\xe9t\xe9@example.org> SMTPUTF8\r\n", 501, "5.1.7"),  # not UTF-8
    # ESMTP parameters are ASCII: Python's isdigit() and upper() would read these as
    # SIZE=12 and BODY=8BITMIME
    (b"MAIL FROM:<a@example.org> SIZE=\xd9\xa1\xd9\xa2\r\n", 501, "5.5.4"),
    (b"MAIL FROM:<a@example.org> BODY=8bitm\xc4\xb1me\r\n", 501, "5.5.4"),
])
async def test_smtputf8_connector_replies(hub_factory, port: int, line: bytes, code: int,
                                          enhanced: str) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], SmtpUtf8Enabled=True,
                              **ANONYMOUS)
    async with hub_factory(extra=extra), connected(port) as client:
        assert "SMTPUTF8" in (await client.hello()).lines
        await client.send(line)
        reply = await client.reply()
        assert (reply.code, reply.enhanced) == (code, enhanced), reply
        assert (await client.cmd("NOOP")).code == 250


async def test_smtputf8_sender_is_queued_as_given(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], SmtpUtf8Enabled=True,
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        reply = await client.cmd("MAIL FROM:<été@example.org> SMTPUTF8".encode())
        assert reply.code == 250, reply
        assert (await client.cmd("RCPT TO:<alice@contoso.test>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        await client.send(body("utf8") + b"\r\n.\r\n")
        assert (await client.reply()).code == 250
        sender = await hub.store.read(lambda c: c.execute(
            "SELECT sender, smtputf8 FROM message").fetchone())
        assert tuple(sender) == ("été@example.org", 1)


async def test_bare_lf_commands_end_the_session_after_three(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], MaxProtocolErrors=10,
                              **ANONYMOUS)
    async with hub_factory(extra=extra), connected(port) as client:
        await client.hello()
        for _ in range(3):
            await client.send(b"NOOP\n")
            assert (await client.reply()).code == 500
        assert (await client.reply()).code == 421
        assert await client.closed()


async def test_message_sent_before_354_is_refused(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        await client.cmd("MAIL FROM:<someone@example.org>")
        await client.cmd("RCPT TO:<alice@contoso.test>")
        await client.send(b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
        reply = await client.reply()
        assert (reply.code, reply.enhanced) == (554, "5.5.0"), reply
        assert await client.closed()
        assert await queued_count(hub) == 0


async def test_sequence_errors(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], MaxProtocolErrors=20,
                              **ANONYMOUS)
    async with hub_factory(extra=extra), connected(port) as client:
        assert (await client.reply()).code == 220
        assert (await client.cmd("MAIL FROM:<a@example.org>")).text.startswith(
            "5.5.1 Send HELO/EHLO first")
        await client.cmd("EHLO client.test")
        assert (await client.cmd("RCPT TO:<alice@contoso.test>")).code == 503
        assert (await client.cmd("DATA")).code == 503
        await client.cmd("MAIL FROM:<a@example.org>")
        assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 503
        assert (await client.cmd("DATA")).text == "5.5.1 No valid recipients"


async def test_unknown_verbs_end_the_session(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra), connected(port) as client:
        await client.hello()
        for _ in range(5):
            assert (await client.cmd("XYZZY")).code == 500
        reply = await client.cmd("XYZZY")
        assert reply.code == 500
        assert (await client.reply()).code == 421
        assert await client.closed()


# -- sizes and limits --------------------------------------------------------------------------


async def test_oversized_data_is_drained_and_refused(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], MaxMessageSize="64KB",
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        assert (await client.cmd("MAIL FROM:<a@example.org> SIZE=1000")).code == 250
        await client.cmd("RCPT TO:<alice@contoso.test>")
        assert (await client.cmd("DATA")).code == 354
        for _ in range(50):
            await client.send(b"x" * 8000 + b"\r\n")
        await client.send(b".\r\n")
        reply = await client.reply()
        assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
        assert (await client.cmd("NOOP")).code == 250
        assert await queued_count(hub) == 0


async def test_long_line_on_internet_connector(hub_factory, port: int) -> None:
    extra = receive_connector("Internet", [f"127.0.0.1:{port}"], Usage="Internet",
                              GreetingDelay="0s")
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        reply = await client.transaction("a@example.org", ["alice@contoso.test"],
                                         b"Subject: x\r\n\r\n" + b"y" * 2000)
        assert (reply.code, reply.enhanced) == (500, "5.5.2"), reply
        assert await queued_count(hub) == 0


async def test_too_many_recipients_keeps_the_earlier_ones(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], MaxRecipientsPerMessage=2,
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        await client.cmd("MAIL FROM:<a@example.org>")
        assert (await client.cmd("RCPT TO:<alice@contoso.test>")).code == 250
        assert (await client.cmd("RCPT TO:<bob@contoso.test>")).code == 250
        reply = await client.cmd("RCPT TO:<alice.smith@contoso.test>")
        assert (reply.code, reply.enhanced) == (452, "4.5.3"), reply
        assert (await client.cmd("DATA")).code == 354
        await client.send(body() + b"\r\n.\r\n")
        assert (await client.reply()).code == 250
        rows = await hub.store.read(lambda c: c.execute(
            "SELECT address FROM recipient ORDER BY id").fetchall())
        assert [r[0] for r in rows][:2] == ["alice@contoso.test", "bob@contoso.test"]


async def test_header_too_large_and_hop_count(hub_factory, port: int) -> None:
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        big = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"z" * 900) for i in range(110))
        reply = await client.transaction("a@example.org", ["alice@contoso.test"],
                                         big + b"\r\nbody")
        assert (reply.code, reply.enhanced) == (552, "5.3.4"), reply
        hops = b"".join(b"Received: from h%d by relay%d.example; Fri, 27 Nov 2026 10:00:00"
                        b" +0000\r\n" % (i, i) for i in range(31))
        reply = await client.transaction("a@example.org", ["alice@contoso.test"],
                                         hops + b"Subject: loop\r\n\r\nbody")
        assert (reply.code, reply.enhanced) == (554, "5.4.6"), reply
        local = b"".join(b"Received: from x by hub01.contoso.test; Fri, 27 Nov 2026 10:00:00"
                         b" +0000\r\n" for _ in range(9))
        reply = await client.transaction("a@example.org", ["alice@contoso.test"],
                                         local + b"Subject: loop\r\n\r\nbody")
        assert (reply.code, reply.enhanced) == (554, "5.4.6"), reply
        assert await queued_count(hub) == 0


# -- relay matrix ----------------------------------------------------------------------------

RELAY = "550 5.7.1"
UNKNOWN = "550 5.1.1"
SYNTAX = "501 5.1.3"
OK = "250 2.1.5"
MATRIX = [
    # recipient,                               anonymous, authenticated, externally secured
    ("alice@contoso.test", OK, OK, OK),
    ("ALICE@Contoso.Test.", OK, OK, OK),
    ("x@external.example", RELAY, OK, OK),
    ("anyone@fabrikam.test", OK, OK, OK),  # InternalRelay: unknown users pass on
    ("nobody@contoso.test", UNKNOWN, UNKNOWN, UNKNOWN),
    ("x%external.example@contoso.test", UNKNOWN, UNKNOWN, UNKNOWN),
    ("@contoso.test:x@external.example", RELAY, OK, OK),
    ('"x@external.example"@contoso.test', UNKNOWN, UNKNOWN, UNKNOWN),
    ("external.example!x@contoso.test", UNKNOWN, UNKNOWN, UNKNOWN),
    ("x@external.example@contoso.test", SYNTAX, SYNTAX, SYNTAX),
    ("x@[192.0.2.9]", RELAY, OK, OK),
]


async def test_relay_matrix(hub_factory) -> None:
    anon, auth, secured = free_port(), free_port(), free_port()
    extra = (receive_connector("Anonymous", [f"127.0.0.1:{anon}"], **ANONYMOUS)
             + receive_connector("Users", [f"127.0.0.1:{auth}"],
                                 AuthMechanism=["Tls", "BasicAuth"],
                                 PermissionGroups=["ExchangeUsers"])
             + receive_connector("Secured", [f"127.0.0.1:{secured}"],
                                 AuthMechanism=["ExternalAuthoritative"],
                                 PermissionGroups=["ExchangeServers"]))
    async with hub_factory(extra=extra) as hub:
        org = hub.daemon.org
        PasswordStore(hub.daemon.server.password_file_path).set_password(
            mailbox_for_login(org, "alice"), "s3cret pass")
        clients = []
        for port in (anon, auth, secured):
            client = await Client.connect(port)
            await client.hello()
            clients.append(client)
        plain = b"\x00alice\x00s3cret pass"
        import base64
        reply = await clients[1].cmd(b"AUTH PLAIN " + base64.b64encode(plain))
        assert reply.code == 235, reply
        sender = {0: "someone@example.org", 1: "alice@contoso.test", 2: "a@example.org"}
        try:
            for rcpt, *expected in MATRIX:
                for index, client in enumerate(clients):
                    assert (await client.cmd(f"MAIL FROM:<{sender[index]}>")).code == 250
                    reply = await client.cmd(f"RCPT TO:<{rcpt}>")
                    got = f"{reply.code} {reply.enhanced}"
                    assert got == expected[index], (rcpt, index, reply)
                    assert (await client.cmd("RSET")).code == 250
        finally:
            for client in clients:
                await client.close()


# -- ordinary clients --------------------------------------------------------------------------


async def test_smtplib_and_aiosmtplib_deliver_to_a_mailbox(hub_factory, port: int) -> None:
    from support import maildir, wait_for

    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        def with_smtplib() -> dict:
            with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
                return smtp.sendmail("someone@example.org", ["alice@contoso.test"],
                                     body(subject="via smtplib"))

        assert await asyncio.to_thread(with_smtplib) == {}
        errors, _ = await aiosmtplib.send(body(subject="via aiosmtplib"),
                                          sender="someone@example.org",
                                          recipients=["bob@contoso.test"],
                                          hostname="127.0.0.1", port=port, start_tls=False)
        assert errors == {}
        await wait_for(lambda: maildir(hub.root, "Alice") and maildir(hub.root, "Bob"))
        assert b"via smtplib" in maildir(hub.root, "Alice")[0].read_bytes()


async def test_pipelined_commands_get_every_reply_in_order(hub_factory, port: int) -> None:
    """RFC 2920: a client may send MAIL, RCPTs and DATA at once, and after the final dot
    its next commands; every reply comes back, in order, and nothing waits for more input."""
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        await client.send(b"MAIL FROM:<someone@example.org>\r\nRCPT TO:<alice@contoso.test>\r\n"
                          b"RCPT TO:<nobody@contoso.test>\r\nRCPT TO:<bob@contoso.test>\r\n"
                          b"DATA\r\n")
        replies = [await client.reply() for _ in range(5)]
        assert [r.code for r in replies] == [250, 250, 550, 250, 354], replies
        await client.send(body() + b"\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        replies = [await client.reply() for _ in range(4)]
        assert [r.code for r in replies] == [250, 250, 250, 221], replies
        assert replies[0].enhanced == "2.6.0"
        assert await client.closed()
        assert await queued_count(hub) == 1
