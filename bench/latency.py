"""Benchmark: latency at light load, from the final dot to the message in its Maildir.

One message at a time over one SMTP connection, each sent only after the previous one is
delivered: the clock starts when the final ``.`` has been written to the socket and stops
when the message's file appears in the recipient's Maildir ``new`` folder. The same client,
message and recipient for hubport and for a private Postfix delivering with virtual(8), in
the same run. For hubport the same is measured from a Pickup file's rename into the folder.
Prints p50 and p99 in milliseconds.

    .venv/bin/python bench/latency.py [--messages 200] [--runs 1] [--json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import time
from pathlib import Path

from accept_maildir import RECIPIENT, count_files
from peers import (
    POSTFIX,
    bench_org,
    free_port,
    hubport,
    postfix,
    prepare_base,
    require_tools,
)
from report import BASELINE, common_arguments, emit

BODY = b"Subject: latency\r\nFrom: sender@example.org\r\nTo: bob@contoso.test\r\n\r\n" + \
    b"A short message for the latency benchmark.\r\n" * 10


class Client:
    """A plain SMTP client on a blocking socket: no library between us and the dot."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.file = self.sock.makefile("rb")
        self.expect(220)
        self.command(b"EHLO bench.example", 250)

    def expect(self, code: int) -> None:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("the server closed the connection")
            if line[3:4] != b"-":
                break
        if int(line[:3]) != code:
            raise RuntimeError(f"expected {code}, got {line!r}")

    def command(self, line: bytes, code: int) -> None:
        self.sock.sendall(line + b"\r\n")
        self.expect(code)

    def send(self) -> float:
        """One transaction; the monotonic time the final dot was written."""
        self.command(b"MAIL FROM:<sender@example.org>", 250)
        self.command(f"RCPT TO:<{RECIPIENT}>".encode(), 250)
        self.command(b"DATA", 354)
        self.sock.sendall(BODY + b".\r\n")
        dot = time.monotonic()
        self.expect(250)
        return dot

    def close(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.sock.close()


def wait_count(folder: Path, total: int, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while count_files(folder) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{folder}: message {total} not delivered in {timeout} s")
        time.sleep(0.0005)
    return time.monotonic()


def smtp_latencies(port: int, maildir: Path, messages: int) -> list[float]:
    client = Client(port)
    try:
        client.send()  # warm-up, not counted
        wait_count(maildir, 1)
        latencies = []
        for n in range(2, messages + 2):
            dot = client.send()
            latencies.append(wait_count(maildir, n) - dot)
        return latencies
    finally:
        client.close()


def pickup_latencies(root: Path, maildir: Path, messages: int, start: int) -> list[float]:
    stage = root / "stage"
    stage.mkdir(exist_ok=True)
    latencies = []
    for n in range(messages):
        staged = stage / f"m{n}.eml"
        staged.write_bytes(BODY)
        renamed = time.monotonic()
        os.rename(staged, root / "pickup" / f"m{n}.eml")
        latencies.append(wait_count(maildir, start + n + 1) - renamed)
    return latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200)
    common_arguments(parser, runs=1)
    args = parser.parse_args()
    require_tools(POSTFIX)
    base = prepare_base("hubport-bench-latency-")
    results: dict[str, list[float]] = {}

    def record(path: str, server: str, latencies: list[float]) -> None:
        for name, share in (("p50", 0.5), ("p99", 0.99)):
            results.setdefault(f"{path} {name}: {server}", []).append(
                percentile(latencies, share) * 1000)

    try:
        for _ in range(args.runs):
            port = free_port()
            root = base / "hubport"
            with hubport(root, bench_org(port, mailbox="Bob"), port):
                maildir = root / "var" / "mailboxes" / "Bob" / "new"
                record("SMTP", "hubport", smtp_latencies(port, maildir, args.messages))
                record("Pickup", "hubport", pickup_latencies(root, maildir, args.messages,
                                                             args.messages + 1))
            mail = base / "postfix-mail"
            shutil.rmtree(mail, ignore_errors=True)
            with postfix(base / "postfix", maildir=mail) as port:
                record("SMTP", BASELINE, smtp_latencies(port, mail / "bob" / "new",
                                                        args.messages))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    emit(f"Latency at light load, final dot (or rename) to Maildir, {args.messages} messages",
         "ms", results, as_json=args.json)


if __name__ == "__main__":
    main()
