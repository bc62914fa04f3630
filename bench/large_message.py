"""Benchmark: the daemon's memory while one very large message passes through each way in and out.

One message of ``--size`` (1 GiB unless told: a number with K, M or G, powers of 1024) takes
each path below, each with a fresh daemon started with ``--workers 1``, so that the one
process doing all the work is the one measured:

1. SMTP receive -> a local mailbox (Maildir);
2. Pickup folder -> the Drop folder of a Foreign connector;
3. Replay folder -> a Send connector -> Postfix's ``smtp-sink`` (which dumps what it gets);
4. SMTP receive -> a Delivery Agent connector with the built-in COMMAND agent (a program
   that hashes its standard input);
5. SMTP receive -> the built-in HTTP agent -> a small HTTP server in this process that
   decodes the posted message as it arrives and keeps none of it.

Per path: the seconds from the first octet sent over SMTP, or from the file's rename into
the folder, until the copy is at its destination and the queue is empty; the daemon's
resident set (VmRSS) just before, its peak while the message passes (VmHWM, reset just
before, and VmRSS polled every 50 ms), and the growth, which should stay within 64 MiB
whatever the size. Each delivered copy is checked: what follows its header section, CRLF
read as LF, must be the body sent, octet for octet (SHA-256), so every figure is that of a
correct delivery. This side streams too: the message is generated in 1 MiB pieces and is
never held whole; at most the folder file, the daemon's spool file and one delivered copy
are on disk at once.

    .venv/bin/python bench/large_message.py [--size 1G] [--runs 1] [--json] [--keep]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from peers import (
    SMTP_SINK,
    Sink,
    bench_org,
    free_port,
    hubport,
    hubport_output,
    prepare_base,
    process_kib,
    queued_messages,
    require_tools,
    reset_peak,
    sink,
)
from report import common_arguments

MIB = 1024 * 1024
ALLOWED_GROWTH = 64  # MiB: the goal, whatever the message's size
LINE = 78  # octets of a body line: 76 characters and CRLF
BLOCK_LINES = MIB // LINE  # the lines of one write: just under 1 MiB
POLL = 0.05
HEAD_ALLOWANCE = 512  # octets the header section is given out of --size
SENDER = "alice@contoso.test"  # a failure's NDR lands in Alice's Maildir: seen at once
FAX = "IMCEAFAX-+2B15551234@contoso.test"

LETTERS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 "
#: the lines every block repeats after its numbered first line (none starts with a dot)
TEMPLATE = b"".join(
    (f"{j:05d} " + (LETTERS * 3)[j % len(LETTERS):][:70]).encode() + b"\r\n"
    for j in range(1, BLOCK_LINES))


def parse_size(text: str) -> int:
    """Octets from ``64M``, ``1G``, ``512K``, ``1.5G`` or a plain number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 64M, 1G)")
    factor = {"": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[match.group(2).upper()]
    size = int(float(match.group(1)) * factor)
    if not 4096 <= size <= 2048 * MIB:  # the receive connector's and folders' ceiling
        raise argparse.ArgumentTypeError(f"{text!r}: give 4K to 2G")
    return size


# -- the message: generated block by block, checked after delivery ---------------------------


class Body:
    """``lines`` body lines of 76 characters, in blocks of just under 1 MiB; each block
    starts with a line naming its number (so no two blocks are alike), then ``TEMPLATE``."""

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.size = lines * LINE
        self._expected: tuple[str, int] | None = None

    def blocks(self) -> Iterator[bytes]:
        left, number = self.lines, 0
        while left > 0:
            block = f"block {number:010d} ".ljust(76, "=").encode() + b"\r\n" + TEMPLATE
            count = min(left, BLOCK_LINES)
            yield block[:count * LINE]
            left -= count
            number += 1

    def expected(self) -> tuple[str, int]:
        """SHA-256 and length of the body as ``BodyCheck`` reads a delivered copy (LF)."""
        if self._expected is None:
            digest = hashlib.sha256()
            for block in self.blocks():
                digest.update(block.replace(b"\r\n", b"\n"))
            self._expected = (digest.hexdigest(), self.lines * (LINE - 1))
        return self._expected


def header_section(*fields: str) -> bytes:
    return "".join(f"{field}\r\n" for field in fields).encode() + b"\r\n"


def message_head(recipient: str, way: str, *envelope: str) -> bytes:
    return header_section(*envelope, f"From: {SENDER}", f"To: {recipient}",
                          f"Subject: large message benchmark ({way})",
                          f"Message-ID: <large-{way}-{time.time_ns()}@contoso.test>",
                          f"Date: {formatdate()}", "MIME-Version: 1.0",
                          "Content-Type: text/plain; charset=us-ascii")


class BodyCheck:
    """SHA-256 and length of what follows the first empty line of a delivered copy, with
    CRLF read as LF (Maildir stores LF; Drop files, SMTP and the agents keep CRLF), fed in
    pieces of any size. ``trailer``: octets a copy ends with after the body (smtp-sink's
    dump ends each transaction with an empty line), held back and compared at the end."""

    def __init__(self, trailer: bytes = b"") -> None:
        self.trailer = trailer
        self.head = b""
        self.in_body = False
        self.carry = b""  # a CR whose LF may start the next piece, or the held trailer
        self.digest = hashlib.sha256()
        self.length = 0

    def feed(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            blank = re.search(rb"\r?\n\r?\n", self.head)
            if blank is None:
                if len(self.head) > MIB:
                    raise ValueError("no end of the header section in the first MiB")
                return
            data, self.head, self.in_body = self.head[blank.end():], b"", True
        data = (self.carry + data).replace(b"\r\n", b"\n")
        keep = len(self.trailer) + data.endswith(b"\r")
        data, self.carry = data[:len(data) - keep], data[len(data) - keep:]
        self.digest.update(data)
        self.length += len(data)

    def result(self) -> tuple[str, int]:
        if not self.in_body:
            raise ValueError("the copy has no end of its header section")
        if self.carry != self.trailer:
            raise ValueError(f"the copy ends with {self.carry!r}, not {self.trailer!r}")
        return self.digest.hexdigest(), self.length


def check_file(path: Path, trailer: bytes = b"") -> tuple[str, int]:
    check = BodyCheck(trailer)
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            check.feed(chunk)
    return check.result()


def digest_stdin(out: Path) -> None:
    """The COMMAND agent's program (this script with ``--digest-stdin``): check the message
    on standard input and write ``<sha256> <length>`` to ``out``, renamed in when whole."""
    check = BodyCheck()
    while chunk := sys.stdin.buffer.read(MIB):
        check.feed(chunk)
    digest, length = check.result()
    temp = out.with_name(f".{out.name}.tmp")
    temp.write_text(f"{digest} {length}\n")
    os.replace(temp, out)


# -- the ways in ----------------------------------------------------------------------------


def smtp_send(port: int, recipient: str, head: bytes, body: Body, timeout: float) -> None:
    """One transaction, the message written in 1 MiB pieces as it is generated."""
    size = len(head) + body.size
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock, \
            sock.makefile("rb") as replies:
        def step(line: str | None, code: int) -> None:
            if line is not None:
                sock.sendall(line.encode() + b"\r\n")
            reply = []
            while True:
                text = replies.readline(4096).decode("latin-1").rstrip("\r\n")
                reply.append(text)
                if text[3:4] != "-":
                    break
            if not text.startswith(str(code)):
                raise RuntimeError(f"SMTP {line or 'greeting'}: {' / '.join(reply)}")

        step(None, 220)
        step("EHLO bench.test", 250)
        step(f"MAIL FROM:<{SENDER}> SIZE={size}", 250)
        step(f"RCPT TO:<{recipient}>", 250)
        step("DATA", 354)
        sock.sendall(head)
        for block in body.blocks():
            sock.sendall(block)
        step(".", 250)
        step("QUIT", 221)


def write_folder_file(folder: Path, head: bytes, body: Body) -> Path:
    """The message as a hidden temp file in ``folder`` (the daemon takes only ``*.eml``),
    synced so that the daemon's figures do not include writing it back."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / ".large.tmp"
    with open(temp, "wb") as f:
        f.write(head)
        for block in body.blocks():
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return temp


# -- the HTTP gateway ---------------------------------------------------------------------------


class Base64Value:
    """The message in the HTTP agent's JSON document as it arrives: its ``message_base64``
    is the document's last value, so the text before it is skipped, the base64 decoded in
    whole quanta, and the closing ``"}`` held back."""

    MARK = b'"message_base64": "'

    def __init__(self, check: BodyCheck) -> None:
        self.check = check
        self.head = b""
        self.open = False
        self.pending = b""

    def feed(self, data: bytes) -> None:
        if not self.open:
            self.head += data
            at = self.head.find(self.MARK)
            if at < 0:
                if len(self.head) > MIB:
                    raise ValueError("no message_base64 in the first MiB")
                return
            data, self.head, self.open = self.head[at + len(self.MARK):], b"", True
        data = self.pending + data
        usable = max(0, len(data) - 2) // 4 * 4
        self.check.feed(base64.b64decode(data[:usable], validate=True))
        self.pending = data[usable:]

    def result(self) -> tuple[str, int]:
        if not self.open or not self.pending.endswith(b'"}'):
            raise ValueError("the document does not end with the message's base64")
        self.check.feed(base64.b64decode(self.pending[:-2], validate=True))
        return self.check.result()


class Gateway(ThreadingHTTPServer):
    """Answers 200 to a POST whose message decodes; keeps only its digest (``result``)."""

    daemon_threads = True
    result: tuple[str, int] | str | None = None


class GatewayHandler(BaseHTTPRequestHandler):
    server: Gateway

    def do_POST(self) -> None:
        value = Base64Value(BodyCheck())
        left = int(self.headers.get("Content-Length") or 0)
        try:
            while left > 0:
                chunk = self.rfile.read(min(MIB, left))
                if not chunk:
                    raise ValueError(f"the request ended {left} octets short")
                value.feed(chunk)
                left -= len(chunk)
            self.server.result = value.result()
            self.send_response(200)
        except ValueError as exc:  # binascii.Error is one too
            self.server.result = f"bad request: {exc}"
            self.send_response(400)  # a failure: hubport NDRs it, and the bench sees that
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def gateway() -> Iterator[Gateway]:
    server = Gateway(("127.0.0.1", 0), GatewayHandler)
    thread = threading.Thread(target=server.serve_forever, name="gateway", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


# -- the daemon ------------------------------------------------------------------------------


SERVER = """PickupDirectoryMaxMessagesPerMinute = "unlimited"
FolderRescanInterval = "1s"
FolderSettleTime = "0s"
PluginDeliverTimeout = "1d"
"""
RECEIVE = """MaxMessageSize = "2GB"
ConnectionTimeout = "1d"
ConnectionInactivityTimeout = "1h"
"""
#: every limit a large message meets, raised; the connectors of the five paths
TAIL = """
[[mailbox]]
Name = "Alice"

[transport_config]
MaxSendSize = "unlimited"
MaxReceiveSize = "unlimited"

[[foreign_connector]]
Name = "Fax Gateway"
AddressSpaces = ["FAX:*;1"]
CreateDropDirectory = true
MaxMessageSize = "unlimited"

[[send_connector]]
Name = "Sink"
AddressSpaces = ["SMTP:fabrikam.example;1"]
DNSRoutingEnabled = false
SmartHosts = ["[127.0.0.1]"]
Port = {sink}
MaxMessageSize = "unlimited"
ConnectionInactivityTimeOut = "1h"

[[delivery_agent_connector]]
Name = "Command"
AddressSpaces = ["SMTP:command.test;1"]
DeliveryProtocol = "COMMAND"
Command = {command}
Timeout = "1d"
ConnectionTimeout = "1d"
MaxMessageSize = "unlimited"

[[delivery_agent_connector]]
Name = "Gateway"
AddressSpaces = ["SMTP:http.test;1"]
DeliveryProtocol = "HTTP"
Url = "http://127.0.0.1:{http}/in"
Timeout = "1h"
ConnectionTimeout = "1d"
MaxMessageSize = "unlimited"
"""


def organization(port: int, *, sink: int = 9, http: int = 9, digest: Path | None = None
                 ) -> str:
    """contoso.test with mailboxes Bob (the SMTP path's) and Alice (the sender), trusted
    SMTP on ``port``; the connectors of every path (a port no path uses is never dialled)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--digest-stdin",
               str(digest or "/dev/null")]
    return bench_org(port, mailbox="Bob", relay=True, server=SERVER, connector=RECEIVE,
                     tail=TAIL.format(sink=sink, http=http, command=json.dumps(command)))


class Peak:
    """The daemon's resident set while one message passes: VmRSS before, then its peak:
    the kernel's VmHWM (reset at the start when allowed) and VmRSS polled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = process_kib(pid)["VmRSS"]
        self.reset = reset_peak(pid)
        self.polled = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="peak", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(POLL):
            self.polled = max(self.polled, process_kib(self.pid)["VmRSS"])

    def stop(self) -> int:
        """The peak in KiB (with no reset, VmHWM may be the start's: an upper bound)."""
        self._stop.set()
        self._thread.join()
        return max(self.polled, process_kib(self.pid)["VmHWM"])


@contextmanager
def daemon(root: Path, org: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``peers.hubport`` with one worker, killed if it outlives a failure (a daemon that
    does not drain within a minute of SIGTERM is killed, and the next path runs)."""
    proc = None
    try:
        with hubport(root, org, port, workers=1) as proc:
            yield proc
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except FileNotFoundError:
        return []


def folder_state(folder: Path) -> str:
    """The files of ``folder``, temp files too, with their sizes: what the bench saw."""
    try:
        files = sorted(folder.iterdir())
    except FileNotFoundError:
        return f"{folder.name}/ missing"
    shown = ", ".join(f"{p.name} {p.stat().st_size / MIB:.1f} MiB" for p in files[:5])
    return f"{folder.name}/: {shown or 'empty'}"


def queued(root: Path) -> int | str:
    try:
        return queued_messages(root)
    except sqlite3.Error as exc:
        return f"unknown ({exc})"


def wait_delivered(root: Path, proc: subprocess.Popen[bytes], arrived: Callable[[], bool],
                   seen: Callable[[], str], timeout: float) -> None:
    """Until ``arrived()`` and the queue is empty; a notification to the sender, the
    daemon's exit or the timeout raise, saying what was seen last."""
    deadline = time.monotonic() + timeout
    while not (arrived() and queued(root) == 0):
        notices = visible(root / "var" / "mailboxes" / "Alice" / "new")
        if notices:
            with open(notices[0], "rb") as f:
                text = f.read(3000).decode("utf-8", "replace")
            raise RuntimeError(f"the sender got a notification:\n{text}")
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({proc.returncode}); see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"not delivered in {timeout:.0f} s; last seen: {queued(root)} queued, "
                f"{seen()}\n{hubport_output(root, 'get-queue')}")
        time.sleep(POLL)


@dataclass
class Outcome:
    path: str
    size: int = 0  # octets of the message submitted
    seconds: float = 0.0
    before: float = 0.0  # MiB
    peak: float = 0.0  # MiB
    copy: str = "not run"  # "ok", or what went wrong

    @property
    def growth(self) -> float:
        return self.peak - self.before

    @property
    def ok(self) -> bool:
        return self.copy == "ok"


@dataclass
class Route:
    """One way in and one way out."""

    name: str
    way_in: str  # smtp, pickup or replay
    recipient: str
    destination: str  # the folder the copy appears in, under the daemon's root, or ""


PATHS = [
    Route("SMTP -> Maildir", "smtp", "bob@contoso.test", "var/mailboxes/Bob/new"),
    Route("Pickup -> Drop (Foreign)", "pickup", FAX, "drop/Fax Gateway"),
    Route("Replay -> Send connector", "replay", "someone@fabrikam.example", ""),
    Route("SMTP -> agent COMMAND", "smtp", "large@command.test", ""),
    Route("SMTP -> agent HTTP", "smtp", "large@http.test", ""),
]


def run_path(path: Route, root: Path, body: Body, timeout: float) -> Outcome:
    """A fresh daemon, the message along ``path``, the copy checked; big files removed."""
    outcome = Outcome(path.name)
    port = free_port()
    envelope = ([f"X-Sender: <{SENDER}>", f"X-Receiver: <{path.recipient}>"]
                if path.way_in == "replay" else [])
    head = message_head(path.recipient, path.way_in, *envelope)
    outcome.size = len(head) + body.size
    digest = root.parent / f"{root.name}.digest"
    digest.unlink(missing_ok=True)
    with _peers(path, root) as (sink_peer, http):
        org = organization(port, sink=sink_peer.port if sink_peer else 9,
                           http=http.server_address[1] if http else 9, digest=digest)
        with daemon(root, org, port) as proc:
            destination = root / path.destination if path.destination else None

            def arrived() -> bool:
                if destination is not None:
                    return bool(visible(destination))
                if sink_peer is not None:
                    return sink_peer.dump.exists() and not visible(root / "replay")
                if http is not None:
                    return http.result is not None
                return digest.exists()

            def seen() -> str:
                if destination is not None:
                    return folder_state(destination)
                if sink_peer is not None:
                    size = sink_peer.dump.stat().st_size if sink_peer.dump.exists() else 0
                    return f"{folder_state(root / 'replay')}; sink dump {size / MIB:.1f} MiB"
                if http is not None:
                    return f"gateway: {http.result or 'no request answered'}"
                return f"command: {'digest written' if digest.exists() else 'no digest'}"

            watch = Peak(proc.pid)
            try:
                if path.way_in == "smtp":
                    started = time.monotonic()
                    smtp_send(port, path.recipient, head, body, timeout)
                else:
                    folder = root / path.way_in
                    temp = write_folder_file(folder, head, body)
                    started = time.monotonic()
                    os.rename(temp, folder / "large.eml")
                wait_delivered(root, proc, arrived, seen, timeout)
                outcome.seconds = time.monotonic() - started
            except (OSError, RuntimeError) as exc:
                outcome.copy = f"failed: {exc}"
            finally:
                outcome.peak = watch.stop() / 1024
                outcome.before = watch.before / 1024
            if outcome.copy == "not run":
                outcome.copy = verify(path, root, body, sink_peer, http, digest)
        if sink_peer is not None:
            sink_peer.dump.unlink(missing_ok=True)
    remove_big_files(root)
    return outcome


@contextmanager
def _peers(path: Route, root: Path) -> Iterator[tuple[Sink | None, Gateway | None]]:
    """The sink for the Send connector's path, the gateway for the HTTP agent's."""
    if path.way_in == "replay":
        with sink(root.parent) as peer:
            yield peer, None
    elif path.recipient.endswith("@http.test"):
        with gateway() as server:
            yield None, server
    else:
        yield None, None


def verify(path: Route, root: Path, body: Body, sink_peer: Sink | None, http: Gateway | None,
           digest: Path) -> str:
    """``ok`` when the delivered copy's body is the one sent, else what differs."""
    try:
        if path.destination:
            got = check_file(visible(root / path.destination)[0])
        elif sink_peer is not None:
            got = check_file(sink_peer.dump, trailer=b"\n")
        elif http is not None:
            if not isinstance(http.result, tuple):
                return f"gateway: {http.result}"
            got = http.result
        else:
            text, length = digest.read_text().split()
            got = (text, int(length))
    except (OSError, ValueError, IndexError) as exc:
        return f"copy unreadable: {exc}"
    want = body.expected()
    if got != want:
        return f"copy differs: {got[1]} octets of body, {want[1]} sent"
    return "ok"


def remove_big_files(root: Path) -> None:
    """Every file of 1 MiB or more under ``root`` (the copies and the spool): at most about
    three copies of the message are ever on the disk; the logs and the queue stay."""
    for folder, _, names in os.walk(root):
        for name in names:
            file = Path(folder) / name
            try:
                if file.stat().st_size >= MIB:
                    file.unlink()
            except OSError:
                pass


# -- the report ---------------------------------------------------------------------------------


def table(title: str, outcomes: list[Outcome]) -> str:
    lines = [title,
             f"  {'path':26} {'MiB':>7} {'s':>7} {'MiB/s':>7} {'RSS before':>10} "
             f"{'peak RSS':>9} {'growth':>7}  <= {ALLOWED_GROWTH} MiB",
             f"  {'':26} {'':>7} {'':>7} {'':>7} {'(MiB)':>10} {'(MiB)':>9} {'(MiB)':>7}"]
    for o in outcomes:
        if not o.ok:
            lines.append(f"  {o.path:26} {o.size / MIB:7.1f}  {o.copy.splitlines()[0][:200]}"
                         f"  (RSS {o.before:.1f} -> peak {o.peak:.1f} MiB)")
            continue
        within = "yes" if o.growth <= ALLOWED_GROWTH else "NO"
        lines.append(f"  {o.path:26} {o.size / MIB:7.1f} {o.seconds:7.1f} "
                     f"{o.size / MIB / o.seconds:7.1f} {o.before:10.1f} {o.peak:9.1f} "
                     f"{o.growth:7.1f}  {within}")
    for o in outcomes:  # what a failed path last saw, in full
        if not o.ok and "\n" in o.copy:
            lines.append(f"\n{o.path}: {o.copy[:4000]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"),
                        help="the message's size: 64M, 1G ... (default 1G)")
    parser.add_argument("--digest-stdin", type=Path, help=argparse.SUPPRESS)
    common_arguments(parser, runs=1)
    args = parser.parse_args()
    if args.digest_stdin:
        digest_stdin(args.digest_stdin)
        return
    require_tools(SMTP_SINK)
    body = Body(max(1, (args.size - HEAD_ALLOWANCE) // LINE))
    timeout = 600 + body.size / MIB  # generous: 1 MiB/s and ten minutes more
    base = prepare_base("hubport-bench-large-")
    outcomes: list[Outcome] = []
    try:
        body.expected()
        for run in range(args.runs):
            for index, path in enumerate(PATHS):
                if not args.json:
                    print(f"run {run + 1}: {path.name} ...", file=sys.stderr, flush=True)
                outcomes.append(run_path(path, base / f"path{index + 1}", body, timeout))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}", file=sys.stderr)
    title = (f"One {body.size / MIB:.0f} MiB message through the daemon (--workers 1): "
             f"the worker's resident set")
    text = table(title, outcomes)
    if args.json:
        runs: dict[str, list[float]] = {}
        for o in outcomes:
            if o.ok:
                runs.setdefault(f"{o.path}: peak RSS growth", []).append(o.growth)
        print(json.dumps({"benchmark": title, "unit": "MiB", "runs": runs, "table": text,
                          "paths": [{**o.__dict__, "growth": o.growth} for o in outcomes]}))
    else:
        print("\n" + text)
    if not all(o.ok for o in outcomes):
        sys.exit(1)


if __name__ == "__main__":
    main()
