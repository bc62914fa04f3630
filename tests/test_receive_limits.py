"""Receive connectors over loopback: connector choice, connection limits, local faults, start.

The session tests (STARTTLS, AUTH, permissions) are in ``test_receive_session.py``. Every
wait here has a generous timeout and only lower bounds on time are ever asserted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from hubport.core.daemon import EXIT_SERVICE, StartupError
from hubport.core.store import StoreError
from smtp_support import (
    TIMEOUT,
    Client,
    auth_plain,
    body,
    connected,
    free_port,
    queued_count,
    receive_connector,
    set_password,
)
from support import maildir, wait_for, write_org

pytestmark = pytest.mark.timeout(120)

SWAKS = "/usr/bin/swaks"
ANONYMOUS = {"PermissionGroups": ["AnonymousUsers"]}
RELAY_GRANT = {"User": "NT AUTHORITY\\ANONYMOUS LOGON",
               "ExtendedRights": ["ms-Exch-SMTP-Accept-Any-Recipient"]}


async def _banner(client: Client) -> Any:
    return await client.reply()


async def _served(port: int, *, source: str | None = None, host: str = "127.0.0.1") -> Client:
    """Connect until the server greets (a closed slot is freed a moment after the close)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        client = await Client.connect(port, host, source=source)
        banner = await client.reply()
        if banner.code == 220:
            return client
        await client.close()
        assert time.monotonic() < deadline, f"never served: {banner}"
        await asyncio.sleep(0.1)


# -- 4. which connector answers ----------------------------------------------------------------


async def test_the_narrowest_remote_range_chooses_the_connector(hub_factory) -> None:
    port = free_port()
    extra = (receive_connector("Relay", [f"127.0.0.1:{port}"], RemoteIPRanges=["127.0.0.2"],
                               Fqdn="relay.contoso.test", Permissions=[RELAY_GRANT], **ANONYMOUS)
             + receive_connector("Default", [f"127.0.0.1:{port}"], Fqdn="mx.contoso.test",
                                 **ANONYMOUS))
    async with hub_factory(extra=extra):
        async with connected(port, source="127.0.0.2") as client:
            banner = await client.reply()
            assert banner.code == 220 and "relay.contoso.test" in banner.text, banner
            assert (await client.cmd("EHLO client.test")).code == 250
            assert (await client.cmd("MAIL FROM:<app@example.org>")).code == 250
            assert (await client.cmd("RCPT TO:<friend@example.org>")).code == 250
        async with connected(port, source="127.0.0.1") as client:
            banner = await client.reply()
            assert banner.code == 220 and "mx.contoso.test" in banner.text, banner
            assert (await client.cmd("EHLO client.test")).code == 250
            assert (await client.cmd("MAIL FROM:<app@example.org>")).code == 250
            reply = await client.cmd("RCPT TO:<friend@example.org>")
            assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply


async def test_a_specific_binding_wins_over_the_wildcard(hub_factory) -> None:
    port = free_port("0.0.0.0")
    extra = (receive_connector("Specific", [f"127.0.0.1:{port}"], Fqdn="specific.contoso.test",
                               **ANONYMOUS)
             + receive_connector("Wildcard", [f"0.0.0.0:{port}"], Fqdn="any.contoso.test",
                                 **ANONYMOUS))
    async with hub_factory(extra=extra):
        async with connected(port, host="127.0.0.1") as client:
            banner = await client.reply()
            assert "specific.contoso.test" in banner.text, banner
        async with connected(port, host="127.0.0.3") as client:  # only the wildcard serves it
            banner = await client.reply()
            assert "any.contoso.test" in banner.text, banner


# -- 5. limits ------------------------------------------------------------------------------------


async def test_max_inbound_connection_per_source(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Limited", [f"127.0.0.1:{port}"],
                              MaxInboundConnectionPerSource=2, **ANONYMOUS)
    async with hub_factory(extra=extra):
        first, second = await _served(port), await _served(port)
        try:
            async with connected(port) as third:
                reply = await third.reply()
                assert (reply.code, reply.enhanced) == (421, "4.3.2"), reply
                assert await third.closed()
            async with connected(port, source="127.0.0.2") as other:  # another source is fine
                assert (await other.reply()).code == 220
            assert (await first.cmd("QUIT")).code == 221
            await first.close()
            again = await _served(port)  # the freed slot serves a new client
            await again.close()
        finally:
            await first.close()
            await second.close()


async def test_a_client_that_hangs_up_frees_its_slot(hub_factory) -> None:
    """No QUIT, just a close: the session ends and its per-source slot is free again."""
    port = free_port()
    extra = receive_connector("Limited", [f"127.0.0.1:{port}"],
                              MaxInboundConnectionPerSource=1, **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        async with connected(port) as client:
            await client.hello()
        service = hub.daemon.services["receive_connector"]
        await wait_for(lambda: not service.sessions, TIMEOUT)
        again = await _served(port)
        await again.close()


async def test_max_inbound_connection(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Limited", [f"127.0.0.1:{port}"], MaxInboundConnection=2,
                              **ANONYMOUS)
    async with hub_factory(extra=extra):
        first = await _served(port, source="127.0.0.1")
        second = await _served(port, source="127.0.0.2")
        try:
            async with connected(port, source="127.0.0.3") as third:
                reply = await third.reply()
                assert (reply.code, reply.enhanced) == (421, "4.3.2"), reply
                assert await third.closed()
            await second.cmd("QUIT")
            await second.close()
            again = await _served(port, source="127.0.0.3")
            await again.close()
        finally:
            await first.close()
            await second.close()


async def test_an_idle_client_is_told_and_closed(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Idle", [f"127.0.0.1:{port}"], ConnectionInactivityTimeout="1s",
                              ConnectionTimeout="60s", **ANONYMOUS)
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            reply = await client.reply()
            assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
            assert await client.closed()


async def test_connection_timeout_ends_a_busy_session(hub_factory) -> None:
    """A client that keeps sending NOOP is still thrown out after ConnectionTimeout."""
    port = free_port()
    extra = receive_connector("Busy", [f"127.0.0.1:{port}"], ConnectionTimeout="3s",
                              ConnectionInactivityTimeout="2s", **ANONYMOUS)
    async with hub_factory(extra=extra):
        started = time.monotonic()
        async with connected(port) as client:
            await client.hello()
            while True:
                assert time.monotonic() - started < 60, "ConnectionTimeout never came"
                try:  # the pause between NOOPs doubles as a look for the goodbye
                    reply = await asyncio.wait_for(client.reply(), 0.2)
                    break
                except TimeoutError:
                    pass
                reply = await client.cmd("NOOP")
                if reply.code != 250:
                    break
            assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
            assert time.monotonic() - started >= 2.9  # a lower bound only
            assert await client.closed()


async def test_slow_data_that_makes_progress_is_accepted(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Slow", [f"127.0.0.1:{port}"], ConnectionInactivityTimeout="2s",
                              ConnectionTimeout="120s", **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        async with connected(port) as client:
            await client.hello()
            assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
            assert (await client.cmd("RCPT TO:<alice@contoso.test>")).code == 250
            assert (await client.cmd("DATA")).code == 354
            started = time.monotonic()
            await client.send(b"Subject: slow\r\n\r\n")
            while time.monotonic() - started < 3.0:  # longer than the inactivity timeout
                await asyncio.sleep(0.3)
                await client.send(b"line\r\n")
            await client.send(b".\r\n")
            reply = await client.reply()
            assert reply.code == 250, reply
        await wait_for(lambda: maildir(hub.root, "Alice"), TIMEOUT)


async def test_message_rate_limit(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Rated", [f"127.0.0.1:{port}"], MessageRateLimit=2, **ANONYMOUS)
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            for n in range(2):
                reply = await client.transaction("someone@example.org", ["alice@contoso.test"],
                                                 body(subject=f"m{n}"))
                assert reply.code == 250, reply
            reply = await client.cmd("MAIL FROM:<someone@example.org>")
            assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
            assert await client.closed()


async def test_too_many_noops(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Chatty", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            for _ in range(100):
                assert (await client.cmd("NOOP")).code == 250
            reply = await client.cmd("NOOP")
            assert (reply.code, reply.text) == (421, "4.7.0 NOOP sent too many times"), reply
            assert await client.closed()


async def test_max_protocol_errors(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Strict", [f"127.0.0.1:{port}"], MaxProtocolErrors=2, **ANONYMOUS)
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.hello()
            for _ in range(2):
                reply = await client.cmd("XYZZY")
                assert reply.code == 500, reply
            reply = await client.cmd("XYZZY")
            if reply.code == 500:  # the error's own reply, then the goodbye
                reply = await client.reply()
            assert (reply.code, reply.enhanced) == (421, "4.7.0"), reply
            assert await client.closed()


async def test_early_talker_is_refused_and_a_polite_client_greeted(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Delayed", [f"127.0.0.1:{port}"], GreetingDelay="1s",
                              **ANONYMOUS)
    async with hub_factory(extra=extra):
        async with connected(port) as client:
            await client.send(b"EHLO early.example\r\n")
            reply = await client.reply()
            assert (reply.code, reply.enhanced) == (554, "5.5.1"), reply
            assert await client.closed()
        async with connected(port) as client:
            started = time.monotonic()
            banner = await client.reply()
            assert banner.code == 220, banner
            assert time.monotonic() - started >= 0.9
            assert (await client.cmd("EHLO polite.example")).code == 250


# -- 6. local faults are never a 5xx ------------------------------------------------------------


def _plugin(root: Path, name: str, source: str) -> str:
    """A plugin module beside org.toml; the `[hubport]` table that loads it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.py").write_text("from hubport.core import hookimpl\n"
                                     "from hubport.core.model import SmtpResponse\n\n" + source)
    sys.modules.pop(name, None)
    return f'[hubport]\nPlugins = ["{name}"]\n\n'


async def test_a_raising_agent_answers_451_without_internals(hub_factory, tmp_path) -> None:
    extra = _plugin(tmp_path, "receive_raising_agent",
                    "@hookimpl\n"
                    "def on_end_of_data(session, submission):\n"
                    "    raise RuntimeError('secret-internal-detail')\n")
    port = free_port()
    extra += receive_connector("Agents", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        async with connected(port) as client:
            await client.hello()
            reply = await client.transaction("someone@example.org", ["alice@contoso.test"],
                                             body())
            assert (reply.code, reply.enhanced) == (451, "4.3.0"), reply
            assert "secret-internal-detail" not in reply.text
            assert "RuntimeError" not in reply.text and "Traceback" not in reply.text
            assert (await client.cmd("NOOP")).code == 250  # the session goes on
        assert await queued_count(hub) == 0


async def test_an_agent_refuses_one_recipient(hub_factory, tmp_path) -> None:
    extra = _plugin(tmp_path, "receive_rcpt_agent",
                    "@hookimpl\n"
                    "def on_rcpt_to(session, recipient):\n"
                    "    if recipient.address.startswith('bob@'):\n"
                    "        return SmtpResponse(550, '5.7.1', 'no')\n")
    port = free_port()
    extra += receive_connector("Agents", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        async with connected(port) as client:
            await client.hello()
            assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
            reply = await client.cmd("RCPT TO:<bob@contoso.test>")
            assert (reply.code, reply.text) == (550, "5.7.1 no"), reply
            assert (await client.cmd("RCPT TO:<alice@contoso.test>")).code == 250
            assert (await client.cmd("DATA")).code == 354
            await client.send(body() + b"\r\n.\r\n")
            assert (await client.reply()).code == 250
        await wait_for(lambda: maildir(hub.root, "Alice"), TIMEOUT)
        assert maildir(hub.root, "Bob") == []


async def test_disk_space_back_pressure_answers_452(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Full", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra,
                           server_extra='QueueDatabaseMinimumFreeSpace = "100TB"'):
        async with connected(port) as client:
            await client.hello()
            reply = await client.cmd("MAIL FROM:<someone@example.org>")
            assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply


async def test_a_queue_commit_failure_answers_451(hub_factory, monkeypatch) -> None:
    port = free_port()
    extra = receive_connector("Commit", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        store = hub.store
        original = store.write
        failed: list[bool] = []

        async def write(work: Any) -> Any:
            if not failed and "insert_submission" in work.__code__.co_names:
                failed.append(True)
                raise StoreError("disk I/O error (injected)")
            return await original(work)

        monkeypatch.setattr(store, "write", write)
        async with connected(port) as client:
            await client.hello()
            reply = await client.transaction("someone@example.org", ["alice@contoso.test"],
                                             body())
            assert failed, "the commit was never attempted"
            assert (reply.code, reply.enhanced) == (451, "4.3.0"), reply
        assert await queued_count(hub) == 0
        assert maildir(hub.root, "Alice") == []


async def test_on_disconnect_is_called_once_per_session(hub_factory, tmp_path) -> None:
    name = "receive_disconnect_agent"
    extra = _plugin(tmp_path, name,
                    "SESSIONS = []\n\n"
                    "@hookimpl\n"
                    "def on_disconnect(session):\n"
                    "    SESSIONS.append(session.session_id)\n")
    port = free_port()
    extra += receive_connector("Agents", [f"127.0.0.1:{port}"], MaxProtocolErrors=0,
                               **ANONYMOUS)
    async with hub_factory(extra=extra):
        async with connected(port) as client:  # a polite session
            await client.hello()
            assert (await client.transaction("someone@example.org", ["alice@contoso.test"],
                                             body())).code == 250
            await client.cmd("QUIT")
            assert await client.closed()
        async with connected(port) as client:  # one that just hangs up
            await client.hello()
        async with connected(port) as client:  # one the server throws out
            await client.hello()
            await client.send(b"XYZZY\r\n")
            assert await client.closed()
        sessions = sys.modules[name].SESSIONS
        await wait_for(lambda: len(sessions) >= 3, TIMEOUT)
        await asyncio.sleep(0.5)  # time for a duplicate call to show up
        assert len(sessions) == 3 and len(set(sessions)) == 3, sessions


# -- 7. start-up and reload ----------------------------------------------------------------------


async def test_a_binding_in_use_stops_the_start(hub_factory) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        extra = receive_connector("Busy", [f"127.0.0.1:{port}"], **ANONYMOUS)
        cwd = os.getcwd()
        try:
            with pytest.raises(StartupError) as caught:
                async with hub_factory(extra=extra):
                    pass
        finally:
            os.chdir(cwd)
    assert caught.value.exit_code == EXIT_SERVICE
    assert f"127.0.0.1:{port}" in str(caught.value)


async def test_reload_opens_and_closes_a_connector_port(hub_factory) -> None:
    first, second = free_port(), free_port()
    one = receive_connector("One", [f"127.0.0.1:{first}"], **ANONYMOUS)
    two = receive_connector("Two", [f"127.0.0.1:{second}"], Fqdn="two.contoso.test",
                            **ANONYMOUS)
    async with hub_factory(extra=one) as hub:
        with pytest.raises(OSError):
            await Client.connect(second)
        write_org(hub.root, extra=one + two)
        assert await hub.daemon.reload()
        async with connected(second) as client:
            banner = await client.reply()
            assert banner.code == 220 and "two.contoso.test" in banner.text, banner
        write_org(hub.root, extra=one)
        assert await hub.daemon.reload()
        with pytest.raises(OSError):
            client = await Client.connect(second)
            await client.close()
        async with connected(first) as client:  # the other connector never stopped
            assert (await client.reply()).code == 220


async def test_aiosmtplib_and_swaks_deliver_anonymously(hub_factory) -> None:
    """Ordinary clients on a plain connector: the message reaches the mailbox."""
    port = free_port()
    extra = receive_connector("Plain", [f"127.0.0.1:{port}"], AuthMechanism=["None"],
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        await aiosmtplib.send(body(subject="aiosmtplib"), sender="someone@example.org",
                              recipients=["alice@contoso.test"], hostname="127.0.0.1",
                              port=port, start_tls=False, timeout=TIMEOUT)
        process = await asyncio.create_subprocess_exec(
            SWAKS, "--server", "127.0.0.1", "--port", str(port), "--from",
            "someone@example.org", "--to", "alice@contoso.test", "--header", "Subject: swaks",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, out.decode()
        await wait_for(lambda: len(maildir(hub.root, "Alice")) >= 2, TIMEOUT)


@pytest.mark.timeout(90)
async def test_a_client_that_never_reads_loses_its_slot_after_the_timeout(hub_factory) -> None:
    """A flood of commands from a client that never reads its replies fills the send
    buffer; the timeout must still end the session and free the per-source slot."""
    import socket

    port = free_port()
    extra = receive_connector("Default", [f"127.0.0.1:{port}"],
                              PermissionGroups=["AnonymousUsers"],
                              ConnectionInactivityTimeout="1s", ConnectionTimeout="2s",
                              MaxInboundConnectionPerSource=1)
    async with hub_factory(extra=extra):
        flood = socket.socket()
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood.connect(("127.0.0.1", port))
        flood.setblocking(False)
        payload = b"RSET\r\n" * 20000
        deadline = asyncio.get_running_loop().time() + 4
        while asyncio.get_running_loop().time() < deadline:
            try:
                flood.send(payload)
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except OSError:
                break
        try:
            greeting = b""
            for _ in range(60):  # ConnectionTimeout 2 s + the close grace of 5 s, generously
                await asyncio.sleep(0.5)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                greeting = await asyncio.wait_for(reader.readline(), 10)
                writer.close()
                if greeting.startswith(b"220"):
                    break
            assert greeting.startswith(b"220"), greeting
        finally:
            flood.close()


async def test_starttls_forgets_an_earlier_login(hub_factory) -> None:
    """RFC 3207 §4.2: after STARTTLS the session starts over, its login included."""
    port = free_port()
    extra = receive_connector("Plain", [f"127.0.0.1:{port}"],
                              AuthMechanism=["Tls", "BasicAuth"],
                              PermissionGroups=["AnonymousUsers", "ExchangeUsers"])
    async with hub_factory(extra=extra) as hub:
        await set_password(hub, "alice", "Pass-word-1")
        client = await Client.connect(port)
        await client.hello()
        assert (await client.cmd("AUTH PLAIN " + auth_plain("alice", "Pass-word-1"))).code == 235
        await client.starttls()
        await client.cmd("EHLO client.test")
        assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
        reply = await client.cmd("RCPT TO:<x@external.example>")
        assert (reply.code, reply.enhanced) == (550, "5.7.1"), reply  # anonymous again
        await client.close()
