"""Benchmark: sustained SMTP accept + local Maildir delivery, hubport vs Postfix virtual(8).

The same load for both, in the same run: Postfix's ``smtp-source`` sends ``--messages`` 2 KB
messages over ``--sessions`` reused connections to one local recipient, and the clock stops
when the last message is in the recipient's Maildir (not when the client is done), so
queueing, categorizing and delivery all count.

* hubport: the real daemon in a subprocess; the 250 after DATA follows the queue's group
  commit, delivery writes and fsyncs each Maildir file (``var/mailboxes/Bob/new``).
* Postfix: a private instance (``bench/peers.py``): smtpd, cleanup (fsync of the queue
  file before the 250), qmgr and virtual(8) writing each message to ``mail/bob/new``
  (fsync'd), as the user nobody.

    .venv/bin/python bench/accept_maildir.py [--messages 4000] [--sessions 20] [--runs 3]
           [--json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from peers import (
    POSTFIX,
    SMTP_SOURCE,
    bench_org,
    free_port,
    hubport,
    postfix,
    prepare_base,
    require_tools,
    smtp_source,
)
from report import BASELINE, collect, common_arguments, emit

RECIPIENT = "bob@contoso.test"


def count_files(folder: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(folder))
    except FileNotFoundError:
        return 0


def wait_files(folder: Path, total: int, timeout: float = 900.0) -> float:
    """Block until ``folder`` holds ``total`` files; the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while (seen := count_files(folder)) < total:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{folder}: {seen} of {total} messages delivered")
        time.sleep(0.02)
    return time.monotonic()


def hubport_rate(root: Path, messages: int, sessions: int) -> float:
    port = free_port()
    with hubport(root, bench_org(port, mailbox="Bob"), port):
        started = time.monotonic()
        smtp_source(port, messages, sessions, RECIPIENT)
        done = wait_files(root / "var" / "mailboxes" / "Bob" / "new", messages)
    return messages / (done - started)


def postfix_rate(root: Path, messages: int, sessions: int) -> float:
    mail = root.parent / f"{root.name}-mail"
    shutil.rmtree(mail, ignore_errors=True)
    with postfix(root, maildir=mail) as port:
        started = time.monotonic()
        smtp_source(port, messages, sessions, RECIPIENT)
        done = wait_files(mail / "bob" / "new", messages)
    return messages / (done - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--sessions", type=int, default=20)
    common_arguments(parser)
    args = parser.parse_args()
    require_tools(SMTP_SOURCE, POSTFIX)
    results = collect(args, prepare_base("hubport-bench-maildir-"), {
        "hubport": lambda root: hubport_rate(root, args.messages, args.sessions),
        BASELINE: lambda root: postfix_rate(root, args.messages, args.sessions)})
    emit(f"Sustained accept + Maildir (until the last file), {args.sessions} sessions, 2 KB"
         " (Postfix: virtual(8))", "msg/s", results, as_json=args.json)


if __name__ == "__main__":
    main()
