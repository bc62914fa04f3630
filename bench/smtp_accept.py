"""Benchmark: SMTP messages accepted per second with a durable commit, hubport vs Postfix.

The load is Postfix's ``smtp-source`` (20 sessions that reuse their connections, one 2 KB
message per transaction, one recipient), the same for both servers, in the same run:

* hubport: the real daemon in a subprocess with one receive connector on a loopback port.
  The 250 after DATA comes after the queue's group commit (SQLite WAL, synchronous=FULL).
  Measured twice: with the Submission queue suspended (the receive path alone: what a
  client waits for) and with the whole pipeline running (categorizer and Maildir delivery
  competing for the same two cores).
* Postfix: a private instance (``bench/peers.py``) whose smtpd hands each message to
  cleanup, which fsyncs the queue file before smtpd answers 250; the messages are then
  discarded.

Each figure is the median of ``--runs`` runs. Needs Debian's ``postfix`` package (for
``smtp-source`` and the Postfix daemons), installed by ``./dev test``.

    .venv/bin/python bench/smtp_accept.py [--messages 6000] [--sessions 20] [--runs 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from peers import (
    POSTFIX,
    SMTP_SOURCE,
    bench_org,
    free_port,
    hubport,
    hubport_command,
    postfix,
    prepare_base,
    queued_messages,
    require_tools,
    smtp_source,
)
from report import BASELINE, collect, common_arguments, emit

RECIPIENT = "alice@contoso.test"


def hubport_rate(root: Path, messages: int, sessions: int, *, paused: bool
                 ) -> tuple[float, int]:
    """Messages per second, and the messages found afterwards (queued or delivered)."""
    port = free_port()
    with hubport(root, bench_org(port), port):
        if paused:
            hubport_command(root, "suspend-queue", "--identity", "HUB01\\Submission")
        elapsed = smtp_source(port, messages, sessions, RECIPIENT)
    queued = queued_messages(root)
    mailbox = root / "var" / "mailboxes" / "Alice" / "new"
    delivered = len(list(mailbox.iterdir())) if mailbox.is_dir() else 0
    return messages / elapsed, queued + delivered


def postfix_rate(root: Path, messages: int, sessions: int) -> float:
    with postfix(root) as port:
        return messages / smtp_source(port, messages, sessions, RECIPIENT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--sessions", type=int, default=20)
    common_arguments(parser)
    args = parser.parse_args()
    require_tools(SMTP_SOURCE, POSTFIX)

    def hub(paused: bool) -> Callable[[Path], float]:
        def measure(root: Path) -> float:
            rate, found = hubport_rate(root, args.messages, args.sessions, paused=paused)
            assert found == args.messages, f"{found} found of {args.messages}"
            return rate
        return measure

    results = collect(args, prepare_base("hubport-bench-smtp-"), {
        "hubport (receive path)": hub(True),
        "hubport + categorizer + Maildir": hub(False),
        BASELINE: lambda root: postfix_rate(root, args.messages, args.sessions)})
    emit(f"SMTP accept, {args.sessions} sessions, 2 KB (the 250 after the durable commit;"
         " Postfix: smtpd + cleanup fsync, then discard)", "msg/s", results,
         as_json=args.json)


if __name__ == "__main__":
    main()
