"""Fuzzing the SMTP receive side: random sessions against a live listener, and the
MAIL/RCPT parameter parser on its own.

The sessions run against the real ``hubport run`` daemon (a subprocess, so its log and
its memory are its own) on two Receive connectors on 127.0.0.1: one with Exchange's
defaults (five protocol errors and out), one with SMTPUTF8, bare line endings normalized
and no error limit, so a session can get deep. Each hypothesis example is one session:
commands in any order with random arguments, over-long lines, 8-bit and NUL bytes, bare
CR and LF, pipelined bursts, STARTTLS and AUTH anywhere (with a TLS handshake, garbage or
a hang-up after the 220), DATA content of every kind, and a disconnect at any point.

Properties, per session: every complete command line gets exactly one reply (the reply
to DATA's content counts for the content; lines behind STARTTLS are discarded, RFC 3207
§4.2; a closing 221/421/554 5.5.0 may end the session early and is followed by the
close); every 4xx/5xx reply carries an enhanced status code of its class (RFC 3463); the
server never closes silently after a positive reply. For the run: no error or traceback
in the daemon's log, its resident memory stays bounded, and a well-behaved client still
gets a message delivered afterwards.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import smtplib
import socket
import ssl
import struct
import subprocess
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from daemon_process import Daemon, child_env, daemon_pool, hubport_command
from fuzzing import fuzz_settings, log_problems, proc_status
from hubport.core.config import parse_organization
from hubport.core.hooks import Hooks
from hubport.core.model import EnvelopeRecipient, MailFrom, SmtpResponse
from hubport.plugins.smtp_receive.protocol import (
    BAD_PARAMETERS,
    _mail_parameter,
    _parse_params,
    _recipient,
    _split_command,
)
from smtp_support import free_port, receive_connector
from support import BASE_ORG, maildir, wait_for_sync, write_org

pytestmark = pytest.mark.timeout(300)

TIMEOUT = 20.0  # seconds a reply may take on a busy machine before it counts as missing
PASSWORD = "Fuzz-Otter-4471"
GOOD_PLAIN = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
CLOSING = {221, 421}
_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?: |$)")


# -- the byte-exact client ----------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection (or reset it)."""


@dataclasses.dataclass
class Reply:
    code: int
    lines: list[bytes]

    @property
    def text(self) -> str:
        return self.lines[-1][4:].decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<{b' | '.join(self.lines)[:200]!r}>"


class Wire:
    """A raw SMTP client socket: sends bytes as given, reads whole replies."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.buffer = b""

    def send(self, data: bytes) -> bool:
        """False when the server has gone (its last replies may still be readable)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _line(self) -> bytes:
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as exc:
                raise Closed(str(exc)) from None
            if not chunk:
                raise Closed("end of stream")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> Reply:
        lines = []
        while True:
            line = self._line()
            assert re.fullmatch(rb"[2-5]\d\d([ -].*)?", line, re.S), \
                f"malformed reply line {line[:200]!r}"
            lines.append(line)
            if len(line) < 4 or line[3:4] == b" ":
                return Reply(int(line[:3]), lines)

    def expect_close(self) -> None:
        """After a closing reply nothing but the end of the stream may come."""
        try:
            extra = self.reply()
        except Closed:
            return
        raise AssertionError(f"a reply after the closing one: {extra}")

    def starttls(self) -> bool:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        assert not self.buffer, f"bytes before the TLS handshake: {self.buffer!r}"
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname="fuzz.test")
        except (OSError, ssl.SSLError):
            return False
        return True

    def close(self, reset: bool = False) -> None:
        if reset:  # an abortive close: RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# -- a session and its accounting -----------------------------------------------------------


@dataclasses.dataclass
class Session:
    """Drives one session and checks that each complete line is answered once."""

    wire: Wire
    #: what the client does after a 354 (content, hang up in it) and after a 220 to
    #: STARTTLS (handshake, garbage, hang-up), taken in order; drawn with the session
    contents: list[tuple[bytes, bool]] = dataclasses.field(default_factory=list)
    tls: list[bytes | str] = dataclasses.field(default_factory=list)
    pending: deque[bytes] = dataclasses.field(default_factory=deque)
    partial: bytes = b""
    transcript: list[str] = dataclasses.field(default_factory=list)
    last: Reply | None = None
    over: bool = False
    delivered: int = 0

    def note(self, text: str) -> None:
        self.transcript.append(text[:300])

    def fail(self, why: str) -> None:
        raise AssertionError(why + "\ntranscript:\n" + "\n".join(self.transcript[-40:]))

    def send_commands(self, data: bytes) -> None:
        """Send command-mode bytes; each LF completes a line that is owed a reply."""
        self.note(f">> {data[:200]!r}{' ...' if len(data) > 200 else ''} ({len(data)} bytes)")
        joined = self.partial + data
        *lines, self.partial = joined.split(b"\n")
        self.pending.extend(line + b"\n" for line in lines)
        if not self.wire.send(data):
            self.note("   (send failed: the server has gone)")
        self.drain()

    def drain(self) -> None:
        """Read replies until every pending line is answered (or the session closed)."""
        while self.pending and not self.over:
            try:
                reply = self.wire.reply()
            except Closed as exc:
                self.closed_early(str(exc))
                return
            except TimeoutError:
                self.fail(f"no reply within {TIMEOUT}s to {self.pending[0][:100]!r}")
            self.note(f"<< {reply!r}")
            self.check_reply(reply)
            self.last = reply
            if reply.code in CLOSING or (reply.code == 554 and "5.5.0" in reply.text[:5]):
                self.over = True
                self.pending.clear()
                self.wire.expect_close()
                return
            line = self.pending.popleft()
            verb = line[:8].upper()
            if reply.code == 354 and verb.startswith(b"DATA"):
                self.in_data()
            elif reply.code == 220 and verb.startswith(b"STARTTLS"):
                self.after_starttls()
            elif reply.code == 250 and verb.startswith(b"<CONTENT"):
                self.delivered += 1

    def check_reply(self, reply: Reply) -> None:
        if reply.code >= 400:
            match = _ENHANCED.match(reply.text)
            if not match or int(match[1]) != reply.code // 100:
                self.fail(f"{reply.code} reply without an enhanced status code of its class:"
                          f" {reply!r}")

    def closed_early(self, why: str) -> None:
        """The connection ended with lines unanswered: allowed only where RFC 5321 lets
        the server drop them, i.e. right after a reply that may be followed by a closing
        421 we could not read any more (the client wrote into a closed socket: RST)."""
        self.over = True
        self.note(f"   closed: {why}")
        if self.last is not None and self.last.code >= 400:
            return
        self.fail(f"the server closed ({why}) leaving {len(self.pending)} line(s) unanswered,"
                  f" the first {self.pending[0][:100]!r}; last reply {self.last!r}")

    def in_data(self) -> None:
        if self.pending:  # DATA inside a burst found an empty buffer: the rest is content
            self.note("   (354 inside a burst: the rest was content)")
            self.pending.clear()
            self.wire.send(b"\r\n.\r\n")
            self.over = True  # what the server makes of it is no longer countable
            return
        content, hang_up = (self.contents.pop(0) if self.contents
                            else (b"Subject: fuzz\r\n\r\nbody", False))
        if hang_up:
            self.note(f">> content {len(content)} bytes, then hang-up")
            self.wire.send(content)
            self.hang_up(False)
            return
        stream = content + b"\r\n.\r\n"
        # the message ends at the first CRLF.CRLF (with the CRLF before the first line)
        framed = b"\r\n" + stream
        end = framed.find(b"\r\n.\r\n")
        after = framed[end + 5:]
        self.note(f">> content {len(content)} bytes; {len(after)} bytes after the end")
        self.pending.append(b"<CONTENT>")
        lines = (self.partial + after).split(b"\n")
        self.partial = lines.pop()
        self.pending.extend(line + b"\n" for line in lines)
        if not self.wire.send(stream):
            self.note("   (send failed)")
        self.drain()

    def after_starttls(self) -> None:
        discarded = len(self.pending)
        self.pending.clear()  # plaintext behind STARTTLS is discarded (RFC 3207 §4.2)
        how = self.tls.pop(0) if self.tls else "handshake"
        self.note(f"   after 220: {how!r} ({discarded} lines discarded)")
        if isinstance(how, bytes):  # plaintext garbage where the ClientHello belongs
            self.wire.send(how)
            self.hang_up(False)
        elif how == "hang-up":
            self.hang_up(False)
        elif not self.wire.starttls():
            if not discarded:  # a clean handshake must work
                self.fail("TLS handshake failed after 220")
            self.over = True
        self.partial = b""

    def hang_up(self, reset: bool) -> None:
        self.note(f"   client hangs up ({'RST' if reset else 'FIN'})")
        self.wire.close(reset)
        self.over = True


# -- strategies for sessions --------------------------------------------------------------

ADDRESSES = [b"<alice@contoso.test>", b"<bob@contoso.test>", b"<Postmaster>", b"<>",
             b"<postmaster@contoso.test>", b"<someone@example.org>", b"<staff@contoso.test>",
             b"<\"a b\"@contoso.test>", b"<@relay.test:bob@contoso.test>", b"bob@contoso.test",
             b"<bob@contoso.test.>", b"<b\xc3\xa9b@contoso.test>", b"<bob@[127.0.0.1]>",
             b"<" + b"x" * 70 + b"@contoso.test>", b"<bob@" + b"d." * 130 + b"test>", b"<",
             b"<<bob@contoso.test>>", b"<bob@contoso.test"]
PARAMETERS = [b"SIZE=100", b"SIZE=99999999999", b"SIZE=", b"SIZE", b"BODY=8BITMIME",
              b"BODY=BINARYMIME", b"BODY=7BIT", b"SMTPUTF8", b"RET=HDRS", b"RET=full",
              b"ENVID=abc+2B", b"NOTIFY=SUCCESS,FAILURE", b"NOTIFY=NEVER,DELAY", b"NOTIFY",
              b"ORCPT=rfc822;bob@contoso.test", b"ORCPT=;", b"AUTH=<>", b"AUTH=x\xff",
              b"X-UNKNOWN=1", b"=", b"SIZE=\xc2\xb2", b"NOTIFY=\xc5\xbfuccess"]
VERBS = [b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT", b"VRFY",
         b"EXPN", b"HELP", b"STARTTLS", b"AUTH", b"BDAT", b"TURN", b"ehlo", b"MaIl", b"X"]
AUTH_ARGS = [b"PLAIN", b"LOGIN", b"PLAIN " + GOOD_PLAIN, b"PLAIN =", b"PLAIN *",
             b"LOGIN " + base64.b64encode(b"alice"), b"CRAM-MD5", b"PLAIN AAAA AAAA",
             b"PLAIN " + base64.b64encode(b"\0bob\0wrong"), b"plain", b"PLAIN !!!!"]
ANSWERS = [GOOD_PLAIN, base64.b64encode(b"alice"), base64.b64encode(PASSWORD.encode()),
           b"*", b"=", b"not base64", b""]
LONG = [513, 999, 2049, 12300, 16384, 17000, 70000]
SENDERS = [b"someone@example.org", b"alice@contoso.test", b"", b"b\xc3\xa9a@example.org"]
RECIPIENTS = [b"bob@contoso.test", b"Postmaster", b"staff@contoso.test", b"alice@contoso.test",
              b"someone@example.net"]


@st.composite
def arguments(draw: st.DrawFn, verb: bytes) -> bytes:
    upper = verb.upper()
    if upper in (b"HELO", b"EHLO"):
        return draw(st.sampled_from([b" client.test", b" [127.0.0.1]", b"", b" a b",
                                     b" caf\xc3\xa9.test", b" -bad-.test"]))
    if upper in (b"MAIL", b"RCPT"):
        key = b"FROM:" if upper == b"MAIL" else b"TO:"
        key = draw(st.sampled_from([key, key.lower(), key[:-1], key + b" ", b""]))
        params = draw(st.lists(st.sampled_from(PARAMETERS), max_size=3))
        return b" " + key + draw(st.sampled_from(ADDRESSES)) + b"".join(b" " + p for p in params)
    if upper == b"AUTH":
        return b" " + draw(st.sampled_from(AUTH_ARGS))
    if upper in (b"VRFY", b"EXPN"):
        return b" " + draw(st.sampled_from(ADDRESSES))
    return draw(st.sampled_from([b"", b"", b" extra"]))


@st.composite
def command_lines(draw: st.DrawFn) -> bytes:
    """One line with its ending: mostly a plausible command, sometimes mangled."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        body = draw(st.binary(max_size=40))
    elif kind == 1:
        body = draw(st.sampled_from(ANSWERS))  # for an AUTH challenge, or as a command
    else:
        verb = draw(st.sampled_from(VERBS))
        body = verb + draw(arguments(verb))
    mangle = draw(st.integers(0, 11))
    if mangle == 0:  # a NUL, an 8-bit byte, a bare CR or a tab somewhere in it
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.sampled_from([b"\x00", b"\xff", b"\r", b"\t", b"\x1b"])) + \
            body[at:]
    elif mangle == 1:  # over-long
        size = draw(st.sampled_from(LONG))
        body = (body + b" " + b"x" * size)[:size]
    ending = draw(st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b""]))
    return body + ending


@st.composite
def actions(draw: st.DrawFn) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if draw(st.integers(0, 4)):  # most sessions start properly, so later states get visited
        out.append(("line", b"EHLO fuzz.test\r\n"))
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["line"] * 5 + ["burst", "burst", "mail", "mail",
                                                    "hang-up"]))
        if kind == "line":
            out.append(("line", draw(command_lines())))
        elif kind == "mail":  # a plausible transaction, one by one or pipelined (RFC 2920)
            lines = [b"MAIL FROM:<" + draw(st.sampled_from(SENDERS)) + b">\r\n",
                     *(b"RCPT TO:<" + r + b">\r\n"
                       for r in draw(st.lists(st.sampled_from(RECIPIENTS), min_size=1,
                                              max_size=3))),
                     b"DATA\r\n"]
            if draw(st.booleans()):
                out.append(("burst", lines))
            else:
                out.extend(("line", line) for line in lines)
        elif kind == "burst":
            out.append(("burst", draw(st.lists(command_lines(), min_size=2, max_size=6))))
        else:
            out.append(("hang-up", draw(st.booleans())))
            break
    return out


@st.composite
def contents_(draw: st.DrawFn) -> tuple[bytes, bool]:
    """DATA content (without the final CRLF.CRLF) and whether the client hangs up in it."""
    parts = draw(st.lists(st.one_of(
        st.sampled_from([b"From: a@example.org\r\n", b"To: bob@contoso.test\r\n",
                         b"Subject: fuzz\r\n", b"\r\n", b"body line\r\n", b".\r\n", b"..\r\n",
                         b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\x00", b"\xff\xfe",
                         b"\r", b"\n", b"x" * 1200 + b"\r\n", b"Received: x\r\n" * 40,
                         b"MAIL FROM:<x@example.org>\r\n"]),
        st.binary(max_size=30)), max_size=12))
    content = b"".join(parts)
    if draw(st.integers(0, 15)) == 0:
        content += b"y" * 70_000  # over the connector's 64 KB MaxMessageSize
    return content, draw(st.integers(0, 9)) == 0


contents = contents_()
after_starttls = st.one_of(st.sampled_from(["handshake", "handshake", "hang-up"]),
                           st.binary(min_size=1, max_size=64))


# -- the daemon ----------------------------------------------------------------------------


@dataclasses.dataclass
class Listener:
    daemon: Daemon
    root: Path
    strict: int  # Exchange's defaults: five protocol errors and out
    lenient: int  # SMTPUTF8, bare line endings normalized, no error limit

    def rss(self) -> int:
        return proc_status(self.daemon.pid, "VmRSS")


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    root = tmp_path_factory.mktemp("fuzz-smtp")
    strict, lenient = free_port(), free_port()
    common = {"AuthMechanism": ["Tls", "BasicAuth"],
              "PermissionGroups": ["AnonymousUsers", "ExchangeUsers"],
              "ProtocolLoggingLevel": "Verbose", "MaxMessageSize": "64KB",
              "TlsHandshakeTimeout": "2s"}
    extra = (receive_connector("Fuzz Strict", [f"127.0.0.1:{strict}"], **common)
             + receive_connector("Fuzz Lenient", [f"127.0.0.1:{lenient}"], **common,
                                 SmtpUtf8Enabled=True, BareLineEndings="Normalize",
                                 MaxProtocolErrors="unlimited", MaxLineLength="998"))
    config = write_org(root, extra=extra)
    done = subprocess.run([*hubport_command(), "set-password", "alice", "--config", str(config),
                           "--password-stdin"], input=PASSWORD + "\n", cwd=root, env=child_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    with daemon_pool(root) as pool:
        daemon = pool.start(config=config)
        daemon.wait_ready(60)
        yield Listener(daemon, root, strict, lenient)


def deliver_cleanly(listener: Listener, port: int, subject: str) -> None:
    """A well-behaved client (smtplib) still gets a message delivered."""
    before = len(maildir(listener.root, "Bob"))
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as client:
        client.ehlo("clean.test")
        refused = client.sendmail("someone@example.org", ["bob@contoso.test"],
                                  f"From: someone@example.org\r\nTo: bob@contoso.test\r\n"
                                  f"Subject: {subject}\r\n\r\nStill serving.\r\n")
        assert not refused
    wait_for_sync(lambda: len(maildir(listener.root, "Bob")) > before, timeout=30)


# -- the session property ------------------------------------------------------------------


def run_session(listener: Listener, lenient: bool, steps: list[tuple[str, Any]],
                data: list[tuple[bytes, bool]], tls: list[bytes | str]) -> Session:
    session = Session(Wire(listener.lenient if lenient else listener.strict), list(data),
                      list(tls))
    try:
        session.pending.append(b"<BANNER>")
        session.drain()
        for kind, value in steps:
            if session.over:
                break
            if kind == "line":
                session.send_commands(value)
            elif kind == "burst":
                session.send_commands(b"".join(value))
            else:
                session.hang_up(value)
        if not session.over:
            if session.partial:  # an unterminated line: leave it so, and go
                session.hang_up(False)
            else:
                session.pending.clear()
                if session.last is not None and session.last.code == 334:
                    session.send_commands(b"*\r\n")  # cancel the AUTH exchange (RFC 4954)
                session.send_commands(b"QUIT\r\n")
                if not session.over:
                    session.fail("QUIT did not end the session")
    finally:
        session.wire.close()
    # how deep the sessions got (printed by the test; see it with -s or on failure)
    STATS[f"last reply {session.last.code if session.last else None}"] += 1
    STATS["messages accepted"] += session.delivered
    STATS["sessions in TLS"] += isinstance(session.wire.sock, ssl.SSLSocket)
    STATS["sessions"] += 1
    return session


STATS: Counter[str] = Counter()


def test_random_sessions_are_answered_and_the_listener_keeps_serving(
        listener: Listener) -> None:
    deliver_cleanly(listener, listener.strict, "before")
    baseline = listener.rss()
    peak = [baseline]

    @fuzz_settings(60)
    @given(st.booleans(), actions(), st.lists(contents, max_size=3),
           st.lists(after_starttls, max_size=2))
    @example(True, [("line", b"EHLO a\r\n"), ("line", b"AUTH LOGIN\r\n"),
                    ("line", b"x" * 17000 + b"\r\n"), ("line", b"NOOP\r\n")], [], [])
    @example(False, [("burst", [b"EHLO a\r\n", b"STARTTLS\r\n", b"NOOP\r\n"])], [], [])
    @example(False, [("line", b"EHLO a\r\n"), ("line", b"AUTH PLAIN\r\n")], [], [])
    @example(False, [("line", b"EHLO a\r\n"), ("line", b"STARTTLS\r\n")], [],
             [b"EHLO plain.test\r\n"])  # bug: two tracebacks and a leaked connection slot
    @example(True, [("line", b"EHLO a\r\n"), ("line", b"MAIL FROM:<a@example.org>\r\n"),
                    ("line", b"RCPT TO:<bob@contoso.test>\r\n"),
                    ("burst", [b"DATA\r\n", b"Subject: x\r\n", b".\r\n"])], [], [])
    def session(lenient: bool, steps: list[tuple[str, Any]], data: list[tuple[bytes, bool]],
                tls: list[bytes | str]) -> None:
        run_session(listener, lenient, steps, data, tls)
        peak[0] = max(peak[0], listener.rss())

    session()
    print("session statistics:", dict(sorted(STATS.items())))
    deliver_cleanly(listener, listener.strict, "after")
    deliver_cleanly(listener, listener.lenient, "after, lenient")
    assert listener.daemon.alive()
    assert not log_problems(listener.daemon), "\n".join(log_problems(listener.daemon))
    growth = peak[0] - baseline
    assert growth < 64 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MB during the run"


def test_huge_lines_and_data_do_not_grow_the_daemons_memory(listener: Listener) -> None:
    """128 MB through one session (a 64 MB command line, a 64 MB message over the 64 KB
    limit): the peak resident size may move by buffers, not by the input."""
    deliver_cleanly(listener, listener.strict, "warm-up")
    Path(f"/proc/{listener.daemon.pid}/clear_refs").write_text("5")  # resets VmHWM
    before = listener.rss()
    wire = Wire(listener.lenient)
    try:
        assert wire.reply().code == 220
        chunk = b"A" * (1 << 20)
        for _ in range(64):
            assert wire.send(chunk)
        wire.send(b"\r\n")
        assert wire.reply().code == 500
        wire.send(b"EHLO big.test\r\nMAIL FROM:<someone@example.org>\r\n"
                  b"RCPT TO:<bob@contoso.test>\r\n")
        assert [wire.reply().code for _ in range(3)] == [250, 250, 250]
        wire.send(b"DATA\r\n")
        assert wire.reply().code == 354
        line = b"B" * 1000 + b"\r\n"
        chunk = line * (1 << 10)
        for _ in range(64):
            assert wire.send(chunk)
        wire.send(b".\r\n")
        reply = wire.reply()
        assert (reply.code, reply.text[:5]) == (552, "5.3.4"), reply
    finally:
        wire.close()
    peak = proc_status(listener.daemon.pid, "VmHWM")
    print(f"resident before {before / 2**20:.1f} MB, peak during {peak / 2**20:.1f} MB")
    assert peak - before < 24 * 2**20, \
        f"peak resident memory rose by {(peak - before) / 2**20:.1f} MB for 128 MB of input"
    deliver_cleanly(listener, listener.strict, "after the flood")
    assert not log_problems(listener.daemon), "\n".join(log_problems(listener.daemon))


# -- the MAIL/RCPT parameter parser --------------------------------------------------------


def _connectors() -> list[Any]:
    """Real Receive connectors with the switches the parameters depend on, both ways."""
    types = Hooks(entry_points=False).registry.connector_types
    root = Path("/nonexistent-fuzz")
    text = (BASE_ORG.format(server_extra="", foreign_extra="", extra="")
            + receive_connector("P", ["127.0.0.1:1"]))
    org = parse_organization(text, source="fuzz", base_dir=root, connector_types=types)
    base = next(c for c in org.connectors if c.name == "P")
    out = []
    for size in ("Enabled", "Disabled", "EnabledWithoutValue"):
        for flags in ((True, True, True), (False, False, False), (True, False, True)):
            out.append(dataclasses.replace(
                base, size_enabled=size, smtp_utf8_enabled=flags[0],
                delivery_status_notification_enabled=flags[1], eight_bit_mime_enabled=flags[2],
                max_message_size=65536))
    return out


CONNECTORS = _connectors()
KEYWORDS = ["SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "NOTIFY", "ORCPT", "AUTH", "size",
            "Notify", "X-FOO", "MT-PRIORITY", "BY", "HOLDFOR", "", "-", "SIZE-"]
PARAM_VALUES = ["", "0", "65536", "65537", "99999999999999999999", "999999999999999999999",
                "-1", "1e3", "²", "١٢", "7BIT", "8bitmime", "BINARYMIME", "FULL", "hdrs",
                "hdrſ", "NEVER", "SUCCESS,FAILURE", "NEVER,DELAY", "success,,", "ſuccess",
                "rfc822;bob@contoso.test", "rfc822;", ";x", "utf-8;b\\x{E9}b@c.test", "<>",
                "a+2Bb", "=", "x=y", "a b", "é", "x" * 120, "x" * 600]
parameter_texts = st.one_of(
    st.lists(st.tuples(st.sampled_from(KEYWORDS), st.booleans(),
                       st.sampled_from(PARAM_VALUES) | st.text(max_size=8)), max_size=5).map(
        lambda items: " ".join(k + ("=" + v if eq else "") for k, eq, v in items)),
    st.text(max_size=40),
)


def parse_envelope_argument(verb: str, arg: str, connector: Any, esmtp: bool
                            ) -> MailFrom | EnvelopeRecipient | SmtpResponse:
    """What ``cmd_mail``/``cmd_rcpt`` do with their argument before the address checks."""
    parsed = _split_command(arg, "FROM:" if verb == "MAIL" else "TO:")
    if parsed is None:
        return SmtpResponse(501, "5.5.4", "Syntax")
    _path, text = parsed
    params = _parse_params(text, esmtp)
    if params is None:
        return BAD_PARAMETERS
    if verb == "RCPT":
        return _recipient("bob@contoso.test", params, connector)
    mail_from = MailFrom("")
    for key, value in params.items():
        problem = _mail_parameter(mail_from, key, value, connector, False)
        if problem is not None:
            return problem
    return mail_from


def supported(verb: str, connector: Any) -> set[str]:
    """The parameters a connector announces for MAIL or RCPT."""
    dsn = connector.delivery_status_notification_enabled
    if verb == "RCPT":
        return {"NOTIFY", "ORCPT"} if dsn else set()
    return ({"BODY", "AUTH"} | ({"SIZE"} if connector.size_enabled != "Disabled" else set())
            | ({"SMTPUTF8"} if connector.smtp_utf8_enabled else set())
            | ({"RET", "ENVID"} if dsn else set()))


@fuzz_settings(300)
@given(st.sampled_from(["MAIL", "RCPT"]), st.sampled_from(["FROM:", "TO:", "from:", ""]),
       st.sampled_from(["<a@b.test>", "<>", "<\"x >\"@b.test>", "a@b.test", "<a@b"]),
       parameter_texts, st.sampled_from(CONNECTORS), st.booleans())
@example("MAIL", "FROM:", "<a@b.test>", "SIZE=²", CONNECTORS[0], True)
@example("RCPT", "TO:", "<a@b.test>", "NOTIFY", CONNECTORS[0], True)  # was 555, not 501
@example("RCPT", "TO:", "<a@b.test>", "ORCPT", CONNECTORS[0], True)  # was 555, not 501
@example("MAIL", "FROM:", "<a@b.test>", "RET=hdrſ", CONNECTORS[0], True)
def test_envelope_parameters_parse_or_give_501_552_555_with_enhanced_codes(
        verb: str, key: str, path: str, params: str, connector: Any, esmtp: bool) -> None:
    result = parse_envelope_argument(verb, f"{key}{path} {params}", connector, esmtp)
    if isinstance(result, SmtpResponse):
        assert result.code in (501, 552, 555), result
        assert _ENHANCED.match(f"{result.enhanced} ") and result.enhanced[0] == "5", result
        assert result.enhanced in ("5.5.4", "5.5.2", "5.3.4"), result
        if result.code == 552:
            assert verb == "MAIL" and "SIZE=" in params.upper()
        if result.code == 555:  # only for what this connector does not offer (RFC 5321
            # §4.1.1.11: 555 is "not recognized or not implemented"); bad syntax is 501
            keys = {item.partition("=")[0].upper() for item in params.split(" ")}
            assert keys - supported(verb, connector) or keys & {"BODY", "SMTPUTF8"}, \
                f"{result} for parameters this connector supports: {params!r}"
        return
    if isinstance(result, MailFrom):
        assert result.ret in (None, "FULL", "HDRS")
        assert result.body in (None, "7BIT", "8BITMIME")
        assert result.envid is None or (result.envid.isascii() and len(result.envid) <= 100)
        assert not result.smtputf8 or connector.smtp_utf8_enabled
    else:
        assert isinstance(result, EnvelopeRecipient)
        assert result.orcpt is None or (result.orcpt.isascii() and ";" in result.orcpt)
    # whatever was accepted was written in ASCII with the RFC's keywords
    assert params.isascii(), f"non-ASCII parameters accepted: {params!r}"
    assert esmtp or not params.split(), "parameters accepted after HELO"


# -- found by the session fuzzing ------------------------------------------------------------


async def test_failed_starttls_handshakes_are_quiet_and_free_their_connection_slots(
        hub_factory: Any) -> None:
    """Garbage where the ClientHello belongs: the handshake fails, and that must be all.
    It used to log two tracebacks per session (closing the dead TLS transport twice) and,
    as the TLS layer never reports the loss of a connection it did not finish, keep the
    session counted: after MaxInboundConnectionPerSource of them the source was refused."""
    import asyncio

    from structlog.testing import capture_logs

    from smtp_support import Client

    port = free_port()
    extra = receive_connector("Tls", [f"127.0.0.1:{port}"], PermissionGroups=["AnonymousUsers"],
                              MaxInboundConnectionPerSource=3, TlsHandshakeTimeout="1s")
    with capture_logs() as logs:
        async with hub_factory(extra=extra) as hub:
            # refused at once, or (the last two: a record begun) at the handshake timeout
            for garbage in (b"EHLO plain.test\r\n", b"\x00" * 64, b"GET / HTTP/1.0\r\n\r\n",
                            b"\x16\x03\x01\x00\x05hello", b"\x80"):
                client = await Client.connect(port)
                await client.hello()
                assert (await client.cmd("STARTTLS")).code == 220
                await client.send(garbage)
                assert await client.closed()
                await client.close()
            service = hub.daemon.services["receive_connector"]
            await asyncio.sleep(0.1)
            client = await Client.connect(port)
            banner = await client.reply()
            assert banner.code == 220, f"refused after failed handshakes: {banner}"
            await client.cmd("QUIT")
            await client.close()
            assert len(service.sessions) <= 1, service.sessions
    errors = [e for e in logs if e.get("log_level") in ("error", "critical") or e.get("exc_info")]
    assert not errors, errors
