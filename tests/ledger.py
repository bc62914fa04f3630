"""The exactly-once ledger shared by the crash tests and the crash soak (docs/reliability.md, Crash soak).

A harness records what it handed to hubport (each message with a unique Message-ID and a
random body) as *expected* copies keyed by (kind, destination, Message-ID); after the last
daemon has drained, the readers here collect what arrived (Maildirs, a Foreign connector's
drop folder) and ``tally`` counts, per key, the copies: lost, duplicated, phantom (delivered
but never sent) and corrupt (body bytes changed).
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: (kind, destination, Message-ID): kind is "maildir", "drop", "smtp" or "agent"
Key = tuple[str, str, str]
Seen = dict[Key, list[bytes]]

MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)
RECEIVER = re.compile(rb"^x-receiver:[ \t]*<([^>]*)>", re.IGNORECASE | re.MULTILINE)


def random_body(rng: random.Random, n: int) -> bytes:
    """Printable lines (LF) of random length, with the lines that trip naive writers:
    a lone dot, leading dots, ``From `` at the start, trailing blanks, empty lines."""
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
    lines = [f"body of message {n}"]
    for _ in range(rng.randint(1, 60)):
        pick = rng.random()
        if pick < 0.05:
            lines.append(".")
        elif pick < 0.1:
            lines.append(".." + "".join(rng.choices(alphabet, k=rng.randint(0, 30))))
        elif pick < 0.13:
            lines.append("From the harness, with love")
        elif pick < 0.2:
            lines.append("")
        else:
            lines.append("".join(rng.choices(alphabet, k=rng.randint(1, 200))) + " " * (
                rng.random() < 0.1))
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Report:
    """The ledger in numbers; ``ok`` when nothing is lost, doubled, invented or bent."""

    expected: int = 0
    delivered: int = 0
    lost: list[Key] = field(default_factory=list)
    duplicates: list[tuple[str, str, str, int]] = field(default_factory=list)
    phantoms: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicates or self.phantoms or self.corrupt
                    or self.bad_files or self.leftovers)

    def summary(self) -> str:
        return (f"expected={self.expected} delivered={self.delivered} lost={len(self.lost)} "
                f"duplicates={len(self.duplicates)} phantoms={len(self.phantoms)} "
                f"corrupt={len(self.corrupt)} bad={len(self.bad_files)} "
                f"leftovers={len(self.leftovers)}")

    def details(self, limit: int = 20) -> str:
        parts = [self.summary()]
        for name in ("lost", "duplicates", "phantoms", "corrupt", "bad_files", "leftovers"):
            items = getattr(self, name)
            if items:
                parts.append(f"{name}: {items[:limit]}")
        return "\n".join(parts)


def tally(expected: Mapping[Key, bytes], seen: Mapping[Key, Sequence[bytes]], *,
          optional: Collection[Key] = (), report: Report | None = None) -> Report:
    """Compare what arrived with what was expected, key by key.

    Every expected key must arrive exactly once with its exact body; a key in ``optional``
    (sent, but never acknowledged) may arrive or not, and is no phantom if it does.
    ``duplicates`` lists every key that arrived more than once, with its count: whether a
    second copy is allowed is the caller's judgement (the crash tests allow none).
    """
    report = report or Report()
    report.expected += len(expected)
    for key, body in expected.items():
        copies = seen.get(key, [])
        if not copies:
            if key not in optional:
                report.lost.append(key)
            continue
        if key not in optional:
            report.delivered += 1
        if len(copies) > 1:
            report.duplicates.append((*key, len(copies)))
        if any(copy != body for copy in copies):
            report.corrupt.append(key[2])
    report.phantoms.extend(f"{k}:{d}:{m}" for (k, d, m) in seen if (k, d, m) not in expected)
    return report


# -- readers of the destinations ------------------------------------------------------------


def listing(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def split_message(data: bytes, blank: bytes) -> tuple[bytes, bytes]:
    head, sep, body = data.partition(blank)
    if not sep:
        raise ValueError("no header/body separator")
    return head, body


def message_id_of(head: bytes) -> str:
    found = MESSAGE_ID.search(head)
    if found is None:
        raise ValueError("no Message-ID")
    return found.group(1).decode()


def read_maildirs(root: Path, aliases: Iterable[str], seen: Seen, unreadable: list[str]) -> None:
    """Every message in the mailboxes' new/ and cur/ (Maildir stores LF line ends)."""
    for alias in sorted(set(aliases)):
        box = root / "var" / "mailboxes" / alias
        for sub in ("new", "cur"):
            for path in listing(box / sub):
                try:
                    head, body = split_message(path.read_bytes(), b"\n\n")
                    seen[("maildir", alias, message_id_of(head))].append(body)
                except ValueError:
                    unreadable.append(str(path))


def read_drop(folder: Path, seen: Seen, unreadable: list[str]) -> None:
    """Every file in a Foreign connector's drop folder (Replay format, CRLF kept): one copy
    per X-Receiver."""
    for path in sorted(folder.glob("*.eml")) if folder.is_dir() else []:
        try:
            head, body = split_message(path.read_bytes(), b"\r\n\r\n")
            mid = message_id_of(head)
        except ValueError:
            unreadable.append(str(path))
            continue
        for receiver in RECEIVER.findall(head):
            seen[("drop", receiver.decode().lower(), mid)].append(body)


def observed_files(root: Path, aliases: Iterable[str],
                   drop_folder: Path) -> tuple[Seen, list[str]]:
    """What the file destinations hold: (kind, destination, Message-ID) → bodies; and the
    files that could not be read as a message."""
    seen: Seen = defaultdict(list)
    unreadable: list[str] = []
    read_maildirs(root, aliases, seen, unreadable)
    read_drop(drop_folder, seen, unreadable)
    return seen, unreadable


def leftover_files(root: Path, aliases: Iterable[str], drop_folder: Path,
                   folders: Iterable[str] = ("pickup", "replay")) -> tuple[list[str], list[str]]:
    """(bad files, leftovers): ``.bad`` files in Pickup/Replay, and anything a finished run
    must not leave behind (unclaimed or half-claimed files, temporary drop/Maildir files)."""
    bad: list[str] = []
    left: list[str] = []
    for folder in folders:
        bad.extend(str(p) for p in (root / folder).glob("*.bad"))
        left.extend(str(p) for p in (root / folder).glob("*.eml"))
        left.extend(str(p) for p in listing(root / folder / ".work"))
    left.extend(str(p) for p in drop_folder.glob(".*.tmp"))
    for alias in set(aliases):
        left.extend(str(p) for p in listing(root / "var" / "mailboxes" / alias / "tmp"))
    return bad, left


def folders_empty(root: Path, folders: Iterable[str] = ("pickup", "replay")) -> bool:
    """No file waits in Pickup/Replay or in their claim folder (``.work``)."""
    for folder in folders:
        # a kill between the daemon's write-probe and its removal leaves the (ignored) probe
        if any(p.name != ".work" and not p.name.startswith(".hubport-probe-")
               for p in listing(root / folder)):
            return False
        if listing(root / folder / ".work"):
            return False
    return True


def recovery_counts(logs: Iterable[str]) -> dict[str, int]:
    """What the restarts found, from the daemons' logs: messages in flight at a kill, claimed
    files ingested again, claimed files already committed and removed (proof that the kills
    caught work in progress)."""
    counts = {"in_flight": 0, "reingested": 0, "removed": 0}
    for text in logs:
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            event = entry.get("event")
            if event == "messages were in flight when the process stopped":
                counts["in_flight"] += int(entry.get("count", 0))
            elif event == "ingesting files claimed before a stop":
                counts["reingested"] += int(entry.get("count", 0))
            elif event == "removed files committed before a stop":
                counts["removed"] += int(entry.get("count", 0))
    return counts
