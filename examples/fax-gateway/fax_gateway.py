#!/usr/bin/env python3
"""A stand-in fax gateway for the Foreign connector walkthrough (docs/scenarios.md, 5).

It does what a real gateway on the other side of a Drop directory does, with the standard
library only:

1. takes each ``.eml`` file hubport's Foreign connector wrote into the drop folder (Replay
   format: ``X-Sender:`` and ``X-Receiver:`` lines, then the message);
2. "sends" the fax to each ``FAX:`` recipient (here: appends a line to ``sent.log``);
3. writes a status message for the sender into hubport's Replay folder (written aside,
   flushed to disk, then renamed in, so hubport never sees half a file);
4. only then moves the drop file into ``<drop folder>.done/`` beside the drop folder:
   nothing is removed before the reply is safely handed over, so a crash at any point
   loses no fax and no reply (at worst a fax is reported twice). ``<drop folder>.sent.log``
   lists what was "sent".

Run it beside a daemon on the embedded default::

    python3 examples/fax-gateway/fax_gateway.py --drop "drop/Fax Gateway" --replay replay

It polls every second and stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import re
import signal
import sys
import time
from pathlib import Path

_ENVELOPE = re.compile(rb"^X-(Sender|Receiver):\s*<([^>]*)>", re.IGNORECASE)
_SUBJECT = re.compile(rb"^Subject:[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
_FAX_NUMBER = re.compile(r"^IMCEAFAX-(.+)@", re.IGNORECASE)

running = True


def envelope(data: bytes) -> tuple[str, list[str]]:
    """The sender and the recipients of a Replay-format file."""
    sender, recipients = "", []
    for line in data.split(b"\n"):
        match = _ENVELOPE.match(line.rstrip(b"\r"))
        if match is None:
            break
        value = match[2].decode("utf-8", "replace")
        if match[1].lower() == b"sender":
            sender = value
        else:
            recipients.append(value)
    return sender, recipients


def fax_number(address: str) -> str:
    """``IMCEAFAX-+2B15551234@contoso.test`` (a FAX: address wrapped for SMTP) -> +15551234."""
    match = _FAX_NUMBER.match(address)
    if match is None:
        return address
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m[1], 16)), match[1])


def status_reply(gateway: str, sender: str, numbers: list[str], subject: str) -> bytes:
    """The delivery report for the sender, in the Replay format."""
    lines = [f"X-Sender: <{gateway}>", f"X-Receiver: <{sender}>",
             f"From: Fax Gateway <{gateway}>", f"To: <{sender}>",
             f"Subject: Fax sent: {subject}",
             f"Date: {email.utils.formatdate(localtime=True)}",
             f"Message-ID: {email.utils.make_msgid(domain='fax-gateway.invalid')}",
             "Content-Type: text/plain; charset=utf-8", "",
             f"Your fax \"{subject}\" was sent to {', '.join(numbers)}.", ""]
    return "\r\n".join(lines).encode()


def write_durably(folder: Path, name: str, data: bytes) -> None:
    """Write aside, flush to disk, rename in: the reader never sees half a file."""
    aside = folder / f".{name}.tmp"
    with open(aside, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.rename(aside, folder / name)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def handle(path: Path, replay: Path, done: Path, log: Path, gateway: str) -> None:
    data = path.read_bytes()
    sender, recipients = envelope(data)
    numbers = [fax_number(r) for r in recipients]
    found = _SUBJECT.search(data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0])
    subject = found[1].decode("utf-8", "replace").strip() if found else "(no subject)"
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} sent {subject!r} to"
                  f" {', '.join(numbers)} for {sender}\n")
    if sender:  # a report to a null sender would go nowhere
        write_durably(replay, f"fax-status-{path.stem}.eml",
                      status_reply(gateway, sender, numbers, subject))
    os.replace(path, done / path.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drop", type=Path, required=True, help="the connector's drop folder")
    parser.add_argument("--replay", type=Path, required=True, help="hubport's Replay folder")
    parser.add_argument("--gateway-address", default="fax-gateway@contoso.test",
                        help="the sender of the status messages")
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    done = args.drop.parent / f"{args.drop.name}.done"
    done.mkdir(exist_ok=True)
    log = args.drop.parent / f"{args.drop.name}.sent.log"

    def stop(_signum: int, _frame: object) -> None:
        global running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"fax gateway: watching {args.drop}, replies into {args.replay}", flush=True)
    while running:
        for path in sorted(args.drop.glob("*.eml")):
            try:
                handle(path, args.replay, done, log, args.gateway_address)
                print(f"fax gateway: sent {path.name}", flush=True)
            except OSError as exc:  # left in place: tried again next round
                print(f"fax gateway: {path.name}: {exc}", file=sys.stderr, flush=True)
        time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
