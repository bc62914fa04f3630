"""Cases of the hostile-input catalogue that no other test file exercised the way it is written.

Each test names its case number (docs/reliability.md, "Hostile inputs and failure modes: the
catalogue"); the case text there says what is sent and what hubport must answer. Everything
runs against real sockets on loopback: an in-process daemon, a subprocess daemon where a
SIGKILL or a start-up matters, aiosmtpd and tiny scripted peers on the other side.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import hubport.plugins.smtp_receive.protocol as receive_protocol
from daemon_process import child_env, daemon_pool, hubport_command, queue_counts
from hubport.core.api import DELIVERED, DeferQueue
from hubport.plugins.smtp_send.resolver import LocalIdentity, make_resolver, resolve_mx
from send_peers import ScriptedDns, ScriptedSink, make_ca
from smtp_support import (
    TIMEOUT,
    Client,
    Reply,
    body,
    connected,
    free_port,
    queued_count,
    receive_connector,
)
from support import (
    drop_files,
    drop_in,
    events,
    maildir,
    message,
    read_mail,
    replay_file,
    wait_for,
    wait_for_value,
    write_org,
)
from test_send_connector import PipeliningPeer, item, kinds, load_org, send, smart_host

pytestmark = pytest.mark.timeout(120)

ANONYMOUS = {"PermissionGroups": ["AnonymousUsers"]}


# -- B17: SIZE= without a number ----------------------------------------------------------------


@pytest.mark.parametrize("parameter", ["SIZE=", "SIZE=-1", "SIZE=+1", "SIZE=1e3"])
async def test_17_size_without_a_plain_number_is_a_syntax_error(hub_factory,
                                                                parameter: str) -> None:
    port = free_port()
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    async with hub_factory(extra=extra), connected(port) as client:
        await client.hello()
        reply = await client.cmd(f"MAIL FROM:<a@example.org> {parameter}")
        assert (reply.code, reply.enhanced) == (501, "5.5.4"), reply
        assert (await client.cmd("MAIL FROM:<a@example.org> SIZE=10")).code == 250


# -- C27: the greeting delay is per connector: a trusted range has none -----------------------


async def test_27_early_talker_refused_on_the_internet_connector_not_from_a_trusted_range(
        hub_factory) -> None:
    port = free_port()
    extra = (receive_connector("Trusted", [f"127.0.0.1:{port}"], RemoteIPRanges=["127.0.0.2"],
                               GreetingDelay="0s", **ANONYMOUS)
             + receive_connector("Internet", [f"127.0.0.1:{port}"], Usage="Internet",
                                 GreetingDelay="1s"))
    async with hub_factory(extra=extra):
        async with connected(port, source="127.0.0.2") as client:
            await client.send(b"EHLO early.trusted.test\r\n")  # before the banner
            assert (await client.reply()).code == 220
            assert (await client.reply()).code == 250  # its EHLO is answered
        async with connected(port, source="127.0.0.1") as client:
            await client.send(b"EHLO early.example\r\n")
            reply = await client.reply()
            assert (reply.code, reply.enhanced) == (554, "5.5.1"), reply
            assert await client.closed()


# -- F46: a connection flood from one address ----------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_46_a_connection_flood_is_refused_and_leaves_no_descriptors(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Limited", [f"127.0.0.1:{port}"], MaxInboundConnectionPerSource=2,
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        held = [await Client.connect(port) for _ in range(2)]
        for client in held:
            assert (await client.reply()).code == 220
        baseline = _open_fds()  # the daemon and this test share the process
        flood = [await Client.connect(port) for _ in range(60)]
        refusals = [await client.reply() for client in flood]
        assert {(r.code, r.enhanced) for r in refusals} == {(421, "4.3.2")}, refusals[:3]
        for client in flood:
            assert await client.closed()
            await client.close()
        service = hub.daemon.services["receive_connector"]
        await wait_for_value(lambda: (_open_fds(), len(service.sessions)),
                             lambda seen: seen[0] <= baseline + 2 and seen[1] == 2,
                             f"descriptors/sessions back to ({baseline}+2, 2)", TIMEOUT)
        assert (await held[0].cmd("NOOP")).code == 250  # the admitted clients are served
        for client in held:
            await client.close()


# -- F47, F48: dribbling bytes ------------------------------------------------------------------


async def _dribble(client: Client, chunk: bytes, what: str) -> Reply:
    """Send ``chunk`` every 0.3 s until the server answers; fail if it never does (60 s)."""
    started = time.monotonic()
    while True:
        assert time.monotonic() - started < 60, f"{what} was never ended"
        try:
            await client.send(chunk)
            return await client.reply(timeout=0.3)
        except TimeoutError:
            continue


async def test_47_a_command_dribbled_byte_by_byte_is_cut_421(hub_factory) -> None:
    """Bytes without a line end are no activity: the line must be complete within
    ConnectionInactivityTimeout, however steadily the bytes come."""
    port = free_port()
    extra = receive_connector("Dribble", [f"127.0.0.1:{port}"], ConnectionTimeout="120s",
                              ConnectionInactivityTimeout="2s", **ANONYMOUS)
    async with hub_factory(extra=extra), connected(port) as client:
        await client.hello()
        started = time.monotonic()
        reply = await _dribble(client, b"N", "the dribbling session")  # never a line end
        assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
        assert time.monotonic() - started >= 1.9  # a lower bound only
        assert await client.closed()


async def test_48_data_below_the_minimum_rate_is_cut_and_nothing_is_queued(
        hub_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receive_protocol, "DATA_GRACE", 1.0)  # 60 s in service
    port = free_port()
    extra = receive_connector("Slow", [f"127.0.0.1:{port}"], MinimumDataRate="1KB",
                              ConnectionInactivityTimeout="5s", ConnectionTimeout="120s",
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub, connected(port) as client:
        await client.hello()
        assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<alice@contoso.test>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        await client.send(b"Subject: slow\r\n\r\n")
        # about 30 bytes a second, far below 1 KB/s
        reply = await _dribble(client, b"slow line\r\n", "the slow transfer")
        assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
        assert await client.closed()
        assert await queued_count(hub) == 0


# -- F50: a reset in the middle of DATA ---------------------------------------------------------


async def test_50_a_reset_during_data_queues_nothing_and_frees_the_session(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Default", [f"127.0.0.1:{port}"], MaxInboundConnectionPerSource=1,
                              **ANONYMOUS)
    async with hub_factory(extra=extra) as hub:
        client = await Client.connect(port)
        await client.hello()
        assert (await client.cmd("MAIL FROM:<someone@example.org>")).code == 250
        assert (await client.cmd("RCPT TO:<alice@contoso.test>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        await client.send(b"Subject: cut\r\n\r\n" + b"half a message\r\n" * 2000)
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.transport.abort()  # RST, not FIN
        service = hub.daemon.services["receive_connector"]
        await wait_for(lambda: not service.sessions, TIMEOUT)
        async with connected(port) as again:  # the per-source slot is free again
            reply = await again.hello()
            assert reply.code == 250, reply
            assert (await again.transaction("someone@example.org", ["alice@contoso.test"],
                                            body("whole"))).code == 250
        assert await queued_count(hub) == 1  # only the whole message
        await wait_for(lambda: maildir(hub.root, "Alice"), TIMEOUT)
        assert [read_mail(p)["Subject"] for p in maildir(hub.root, "Alice")] == ["whole"]


# -- 92 (found by the session fuzzing): an over-long line inside the AUTH exchange -------------


async def test_92_an_over_long_auth_response_line_is_answered_not_dropped(hub_factory) -> None:
    port = free_port()
    extra = receive_connector("Users", [f"127.0.0.1:{port}"], AuthMechanism=["Tls", "BasicAuth"],
                              PermissionGroups=["AnonymousUsers", "ExchangeUsers"])
    async with hub_factory(extra=extra), connected(port) as client:
        await client.hello()
        assert (await client.cmd("AUTH LOGIN")).code == 334
        reply = await client.cmd(b"x" * 17000)
        assert (reply.code, reply.enhanced) == (500, "5.5.6"), reply  # RFC 4954 §4
        assert (await client.cmd("NOOP")).code == 250  # the session goes on


# -- A5 (outbound half): a leading dot is stuffed on the wire -------------------------------------


async def test_5_a_line_starting_with_a_dot_is_stuffed_when_sent(tmp_path: Path) -> None:
    peer = PipeliningPeer({})
    await peer.start()
    content = (b"From: alice@contoso.test\r\nTo: x@partner.example\r\nSubject: dots\r\n\r\n"
               b".hello\r\n.\r\n..\r\nend\r\n")
    try:
        org = load_org(tmp_path, smart_host(peer.port))
        [result] = await send(org, [item(["x@partner.example"], content)])
    finally:
        peer.server.close()
    assert kinds(result) == [DELIVERED]
    [wire] = peer.messages  # the raw DATA bytes, before any unstuffing
    assert wire.endswith(b"\r\n\r\n..hello\r\n..\r\n...\r\nend\r\n"), wire[-80:]


# -- H65: the connection drops during QUIT, after the 250 to DATA ----------------------------------


async def test_65_a_tls_connection_lost_during_quit_still_counts_as_delivered(
        tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    quits: list[bool] = []

    async def drop_at_quit(server: Any, session: Any, envelope: Any) -> str:
        quits.append(True)
        server.transport.abort()  # no close_notify, no 221
        return "221 never seen"

    with ScriptedSink(tls=ca.server_context("smarthost.test")) as sink:
        sink.handler.handle_QUIT = drop_at_quit  # type: ignore[attr-defined]
        org = load_org(tmp_path, smart_host(sink.port))
        [result] = await send(org, [item(["x@partner.example"])])
    assert quits, "the session never reached QUIT"
    assert kinds(result) == [DELIVERED]
    assert len(sink.received) == 1 and sink.received[0].tls


# -- H66, H67: DNS that fails or truncates ------------------------------------------------------

NOBODY = LocalIdentity(frozenset({"hub01.contoso.test"}), frozenset())


async def test_66_mx_servfail_defers_never_bounces() -> None:
    with ScriptedDns({("mail.test", "MX"): "SERVFAIL"}) as dns:
        r = await resolve_mx("mail.test", make_resolver([("127.0.0.1", dns.port)]), 25, NOBODY)
    assert r.failure is not None and r.failure.is_transient, r.failure
    assert (r.failure.code, r.failure.enhanced) == (451, "4.4.3"), r.failure


class TruncatingDns:
    """Answers every UDP query with TC set and no records; the full answer only over TCP on the
    same port (what a server does when the answer does not fit in a datagram)."""

    def __init__(self, answers: dict[tuple[str, str], list[str]]) -> None:
        self.answers = answers
        self.udp_queries: list[tuple[str, str]] = []
        self.tcp_queries: list[tuple[str, str]] = []
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", 0))
        self.port = int(self.tcp.getsockname()[1])
        self.tcp.listen(8)
        self.tcp.settimeout(0.1)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        self.udp.settimeout(0.1)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]

    def _response(self, wire: bytes, seen: list[tuple[str, str]], full: bool) -> bytes:
        import dns.flags
        import dns.message
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        query = dns.message.from_wire(wire)
        question = query.question[0]
        key = (question.name.to_text(omit_final_dot=True).lower(),
               dns.rdatatype.to_text(question.rdtype))
        seen.append(key)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not full:
            response.flags |= dns.flags.TC
        elif self.answers.get(key):
            response.answer.append(dns.rrset.from_text_list(
                question.name, 60, dns.rdataclass.IN, question.rdtype, self.answers[key]))
        return response.to_wire()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.udp.sendto(self._response(wire, self.udp_queries, full=False), peer)

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    while True:
                        head = conn.recv(2, socket.MSG_WAITALL)
                        if len(head) < 2:
                            break
                        wire = conn.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
                        out = self._response(wire, self.tcp_queries, full=True)
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    pass

    def __enter__(self) -> TruncatingDns:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self.udp.close()
        self.tcp.close()


async def test_67_a_truncated_udp_answer_is_asked_again_over_tcp() -> None:
    answers = {("tc.test", "MX"): ["10 mx.tc.test."], ("mx.tc.test", "A"): ["127.0.0.2"]}
    with TruncatingDns(answers) as dns:
        r = await resolve_mx("tc.test", make_resolver([("127.0.0.1", dns.port)]), 25, NOBODY)
    assert r.failure is None, r.failure
    assert [t.host for t in r.targets] == ["mx.tc.test"]
    assert r.targets[0].addresses == ("127.0.0.2",)
    assert ("tc.test", "MX") in dns.udp_queries and ("tc.test", "MX") in dns.tcp_queries


# -- G53: intake refused, queued mail still delivered --------------------------------------------


async def test_53_queued_mail_is_delivered_while_intake_is_refused(hub_factory,
                                                                   tmp_path: Path) -> None:
    gateway = ('[[foreign_connector]]\nName = "Fabrikam Gateway"\n'
               'AddressSpaces = ["fabrikam.test"]\nDropDirectory = "fabrikam"\n')
    port = free_port()
    extra = gateway + receive_connector("Default", [f"127.0.0.1:{port}"], **ANONYMOUS)
    target = tmp_path / "drop" / "fabrikam"  # missing: the message waits in its queue
    async with hub_factory(extra=extra) as hub:
        async with connected(port) as client:
            await client.hello()
            assert (await client.transaction("someone@example.org", ["x@fabrikam.test"],
                                             body("queued before"))).code == 250
        await wait_for(lambda: events(hub.root, event_id="DEFER"), TIMEOUT)
        write_org(tmp_path, server_extra='QueueDatabaseMinimumFreeSpace = "100TB"', extra=extra)
        assert await hub.daemon.reload()
        pressure = hub.daemon.backpressure
        await wait_for(lambda: pressure.level.name == "HIGH", TIMEOUT)
        async with connected(port) as client:
            await client.hello()
            reply = await client.cmd("MAIL FROM:<alice@contoso.test>")  # even our own sender
            assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply
        target.mkdir(parents=True)  # the next retry can deliver
        files = await wait_for(lambda: drop_files(target), TIMEOUT)
        assert pressure.level.name == "HIGH"  # delivered while intake was still refused
    assert len(files) == 1 and b"Subject: queued before" in files[0].read_bytes()


# -- H64: a next hop that swallows the connection attempt -----------------------------------------


async def test_64_a_blackholed_next_hop_times_out_and_defers_its_queue(tmp_path: Path) -> None:
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)  # never accepted: once its backlog is full the kernel drops every SYN
    port = hole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(1.0)
        try:
            with pytest.raises(TimeoutError):  # the port now behaves as if firewalled (DROP)
                probe.connect(("127.0.0.1", port))
        finally:
            probe.close()
        org = load_org(tmp_path, smart_host(port).replace(
            'ConnectionInactivityTimeOut = "5s"', 'ConnectionInactivityTimeOut = "2s"'))
        outcome = await asyncio.wait_for(send(org, [item(["x@partner.example"])]), 30)
    finally:
        for filler in fillers:
            filler.close()
        hole.close()
    assert isinstance(outcome, DeferQueue), outcome  # the worker is back, the queue waits
    assert outcome.response.is_transient, outcome.response


# -- G57: SIGKILL after the next hop's 250, before the queue knows -------------------------------


@pytest.mark.timeout(120)
def test_57_kill_after_the_next_hop_accepted_sends_again_never_loses(tmp_path: Path) -> None:
    with ScriptedSink() as sink, daemon_pool(tmp_path) as pool:
        config = tmp_path / "org.toml"
        write_org(tmp_path, server_extra="PoisonThreshold = 10",
                  extra=smart_host(sink.port))
        daemon = pool.start(config=config, failpoints="after_send_before_commit:kill:1")
        daemon.wait_ready()
        drop_in(tmp_path / "pickup", "out.eml",
                message(to="carol@partner.example", subject="handed over",
                        message_id="<handoff-1@contoso.test>"))
        assert daemon.wait(60) < 0, "the failpoint never fired"  # killed by SIGKILL
        assert len(sink.received) == 1  # the next hop has it; our queue does not know yet
        survivor = pool.start(config=config)
        survivor.wait_ready()
        db = tmp_path / "var" / "queue" / "mail.que"
        seen: list[Any] = []

        def drained() -> bool:
            seen[:] = [len(sink.received), queue_counts(db)]
            return seen[0] >= 2 and seen[1] is not None and seen[1]["total"] == 0

        deadline = time.monotonic() + 60
        while not drained():
            assert time.monotonic() < deadline, f"copies at the sink / queue: {seen}"
            time.sleep(0.1)
    ids = [re.search(rb"Message-ID: (\S+)", r.data, re.I) for r in sink.received]
    assert [m.group(1) for m in ids if m] == [b"<handoff-1@contoso.test>"] * 2  # again, not lost
    assert all(r.rcpt_tos == ["carol@partner.example"] for r in sink.received)


# -- G58: a damaged queue database ----------------------------------------------------------------


def _damaged(kind: str, db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    if kind == "garbage":
        db.write_bytes(b"this is not a database\n" * 400)
        return
    import sqlite3

    from hubport.core import queue as q

    conn = sqlite3.connect(db)
    conn.executescript(q.SCHEMA)
    conn.execute("CREATE TABLE ballast (x BLOB)")
    conn.executemany("INSERT INTO ballast VALUES (?)", [(b"x" * 500,)] * 2000)
    conn.commit()
    conn.close()
    with open(db, "r+b") as fh:  # cut in the middle, as a torn copy or a bad restore leaves it
        fh.truncate(db.stat().st_size // 2)


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_58_a_damaged_queue_database_stops_the_start_with_a_clear_error(tmp_path: Path,
                                                                        kind: str) -> None:
    config = write_org(tmp_path)
    db = tmp_path / "var" / "queue" / "mail.que"
    _damaged(kind, db)
    before = db.read_bytes()
    done = subprocess.run([*hubport_command(), "run", "--config", str(config)], cwd=tmp_path,
                          env=child_env(), capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 3, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert str(db) in done.stderr and "move it aside" in done.stderr, done.stderr[-3000:]
    assert db.read_bytes() == before  # left exactly as it was, for recovery


# -- I69: the kernel's event queue overflowed ----------------------------------------------------


async def test_69_an_event_queue_overflow_makes_the_folder_rescan_at_once(
        hub_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    async with hub_factory() as hub:
        folder = next(f for f in hub.daemon.folders if f.path == hub.pickup)
        for f in hub.daemon.folders:
            f._next_scan = float("inf")  # no periodic rescan: only events or the overflow
        monkeypatch.setattr(folder, "_hint", lambda *args: None)  # the events are lost
        drop_in(hub.pickup, "lost.eml", message(subject="event lost"))
        await asyncio.sleep(1.0)
        assert (hub.pickup / "lost.eml").exists() and not maildir(hub.root, "Bob")
        folder._observer.on_queue_overflow()  # what the inotify reader reports (IN_Q_OVERFLOW)
        got = await wait_for(lambda: maildir(hub.root, "Bob"), TIMEOUT)
        assert read_mail(got[0])["Subject"] == "event lost"


async def test_69_an_overflow_the_inotify_reader_reports_leaves_the_reader_running(
        hub_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    inotify = pytest.importorskip("watchdog.observers.inotify_c")
    async with hub_factory() as hub:
        folder = next(f for f in hub.daemon.folders if f.path == hub.pickup)
        watch = folder._observer
        if not hasattr(watch, "reader"):
            pytest.skip("the generic observer: no inotify reader")
        rescans: list[str] = []
        monkeypatch.setattr(folder, "_overflowed", lambda: rescans.append("rescan"))
        # the event the reader's dispatch thread hands on when the kernel queue overflowed
        watch.reader.handle_event(inotify.InotifyEvent(
            -1, inotify.InotifyConstants.IN_Q_OVERFLOW, 0, b""))
        await wait_for(lambda: rescans, TIMEOUT)
        assert watch.is_alive()
        drop_in(hub.pickup, "after.eml", message(subject="after the overflow"))
        got = await wait_for(lambda: maildir(hub.root, "Bob"), TIMEOUT)
        assert read_mail(got[0])["Subject"] == "after the overflow"


# -- I71: a file the daemon may not read ----------------------------------------------------------


async def test_71_an_unreadable_file_stays_in_place_and_is_taken_once_readable(
        hub_factory, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # the suite runs as root, which reads a mode-000 file anyway: the open is refused with the
    # EACCES an unprivileged daemon gets
    real_open = os.open
    refused: list[bytes] = []

    def open_as_unprivileged(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == b"locked.eml":
            refused.append(path)
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    async with hub_factory() as hub:
        drop_in(hub.pickup, "locked.eml", message(subject="locked"))
        os.chmod(hub.pickup / "locked.eml", 0)
        monkeypatch.setattr(os, "open", open_as_unprivileged)
        await wait_for(lambda: len(refused) >= 3, TIMEOUT)  # several passes tried it
        assert sorted(os.listdir(hub.pickup)) == [".work", "locked.eml"]  # not .bad, not moved
        assert not maildir(hub.root, "Bob")
        monkeypatch.undo()
        os.chmod(hub.pickup / "locked.eml", 0o644)
        got = await wait_for(lambda: maildir(hub.root, "Bob"), TIMEOUT)
        assert read_mail(got[0])["Subject"] == "locked"
    captured = capfd.readouterr()
    warnings = [line for line in (captured.out + captured.err).splitlines()
                if "cannot read file" in line]
    assert len(warnings) == 1, warnings  # rate-limited, not one line per pass


# -- I72: a drop-folder recipient that looks like a path; the observer thread dies ---------------


async def test_72_a_path_like_recipient_never_names_the_drop_file(hub_factory,
                                                                 tmp_path: Path) -> None:
    gateway = ('[[foreign_connector]]\nName = "Fabrikam Gateway"\n'
               'AddressSpaces = ["fabrikam.test"]\nDropDirectory = "fabrikam"\n')
    target = tmp_path / "drop" / "fabrikam"
    target.mkdir(parents=True)
    rcpt = '"../../etc/cron.d/x"@fabrikam.test'
    async with hub_factory(extra=gateway) as hub:
        drop_in(hub.replay, "path.eml", replay_file("alice@contoso.test", [rcpt], message(
            to="someone@fabrikam.test", subject="path-like recipient")))
        files = await wait_for(lambda: drop_files(target), TIMEOUT)
    assert len(files) == 1 and re.fullmatch(r"HUB01-[0-9a-f]+-\d+-\d+-\d+\.eml", files[0].name)
    assert f"X-Receiver: <{rcpt}>".encode() in files[0].read_bytes()
    outside = [p for p in tmp_path.rglob("*") if "cron" in p.name or p.name == "x"]
    assert outside == []


def test_72_a_connector_name_that_walks_out_of_the_drop_root_is_refused_at_load(
        tmp_path: Path) -> None:
    from hubport.core.config import load_organization
    from hubport.core.config_fields import ConfigError
    from hubport.core.hooks import Hooks

    config = write_org(tmp_path, extra='[[foreign_connector]]\nName = "..\\\\x"\n'
                                        'AddressSpaces = ["x.test"]\n'
                                        '[[foreign_connector]]\nName = "Escape"\n'
                                        'AddressSpaces = ["y.test"]\nDropDirectory = "../../etc"\n')
    with pytest.raises(ConfigError) as caught:
        load_organization(config, Hooks(entry_points=False).registry.connector_types)
    text = str(caught.value)
    assert 'foreign_connector "..\\x": Name: must not contain / or \\' in text, text
    assert 'foreign_connector "Escape": DropDirectory: must name a folder inside' in text, text


async def test_72_a_dead_folder_observer_is_restarted_and_its_events_flow_again(
        hub_factory) -> None:
    async with hub_factory() as hub:
        folder = next(f for f in hub.daemon.folders if f.path == hub.pickup)
        dead = folder._observer
        dead.reader.stop()  # the reader thread ends as if an exception had killed it
        await asyncio.to_thread(dead.reader.join, 10)
        assert not dead.is_alive()
        await wait_for(lambda: folder._observer is not dead and folder._observer.is_alive(),
                       TIMEOUT)
        for f in hub.daemon.folders:
            f._next_scan = float("inf")  # from here on only the new observer's events count
        drop_in(hub.pickup, "after.eml", message(subject="seen by the new observer"))
        got = await wait_for(lambda: maildir(hub.root, "Bob"), TIMEOUT)
        assert read_mail(got[0])["Subject"] == "seen by the new observer"


# -- the table itself -------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
SECTION = "## Hostile inputs and failure modes: the catalogue"


def _catalogue_rows() -> tuple[list[tuple[int, str, str]], str]:
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1]
    section = re.split(r"^## ", section, maxsplit=1, flags=re.M)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows.append((int(cells[0]), cells[2], line))
    return rows, section


def test_catalogue_table_names_only_tests_that_exist() -> None:
    """Every catalogued case has a row; every test a row names exists; the counts
    at the end match the rows."""
    import ast

    rows, section = _catalogue_rows()
    numbers = [n for n, _, _ in rows]
    assert numbers == list(range(1, len(rows) + 1)) and len(rows) >= 72, numbers
    statuses = [status for _, status, _ in rows]
    assert set(statuses) <= {"covered", "not applicable", "open"}, set(statuses)
    counts = re.search(r"\*\*Counts:\*\* (\d+) covered, (\d+) not applicable, (\d+) open"
                       r" \((\d+) cases\)", section)
    assert counts, "the counts line is missing"
    assert [int(g) for g in counts.groups()] == [
        statuses.count("covered"), statuses.count("not applicable"), statuses.count("open"),
        len(rows)]
    root = DOC.parents[1]
    defined: dict[str, set[str]] = {}
    missing = []
    for number, status, line in rows:
        names = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", line)
        if status == "covered":
            assert names, f"row {number} is covered by no named test"
        for path, name in names:
            if path not in defined:
                source = (root / path).read_text(encoding="utf-8") if (root / path).exists() \
                    else ""
                defined[path] = {node.name for node in ast.walk(ast.parse(source))
                                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if name not in defined[path]:
                missing.append(f"row {number}: {path}::{name}")
    assert not missing, "tests named in docs/reliability.md that do not exist:\n" + "\n".join(
        missing)
