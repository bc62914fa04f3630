"""Fuzzing the Pickup and Replay folders of a running daemon with whole files.

Each hypothesis example drops a few files into the folders of the real ``hubport run``
(a subprocess): random header fields (the envelope ones among them, valid or not), random
line endings mixed within a file, NUL and 8-bit bytes, huge lines, a leading mbox
``From `` line, a missing blank line or missing headers, or plain random bytes.

Properties: each file ends either taken (gone from the folder and from ``.work``, its
message queued or bounced, so it shows up as a RECEIVE in the tracking log) or moved aside
as ``<name>.bad`` with a ``<name>.bad.reason`` beside it; none is lost or left stuck; the
daemon logs no error or traceback; and afterwards it still delivers a good Pickup file
and a good Replay file.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from daemon_process import Daemon, daemon_pool
from fuzzing import fuzz_settings, log_problems, proc_status
from support import drop_in, events, maildir, message, replay_file, wait_for_sync, write_org

pytestmark = pytest.mark.timeout(300)

SETTLE = 30.0  # seconds a file may take to be taken or moved aside on a busy machine


@dataclasses.dataclass
class Folders:
    daemon: Daemon
    root: Path
    dropped: int = 0

    @property
    def pickup(self) -> Path:
        return self.root / "pickup"

    @property
    def replay(self) -> Path:
        return self.root / "replay"

    def rss(self) -> int:
        return proc_status(self.daemon.pid, "VmRSS")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Folders]:
    root = tmp_path_factory.mktemp("fuzz-folders")
    config = write_org(root)
    with daemon_pool(root) as pool:
        daemon = pool.start(config=config)
        daemon.wait_ready(60)
        yield Folders(daemon, root)


# -- what a file may hold ------------------------------------------------------------------

ADDRESSES = [b"bob@contoso.test", b"Bob <bob@contoso.test>", b"alice@contoso.test",
             b"someone@fabrikam.test", b"<>", b"", b"not an address", b"@", b"a@",
             b"b\xc3\xa9b@contoso.test", b"bob@contoso.test, , alice@contoso.test",
             b"\"quoted, name\" <alice@contoso.test>", b"bob@[127.0.0.1]", b"x" * 300,
             b"undisclosed-recipients:;", b"bob@contoso.test\x00", b"\xff\xfe@contoso.test"]
FIELD_NAMES = [b"From", b"To", b"Cc", b"Bcc", b"Sender", b"Reply-To", b"Subject",
               b"Message-ID", b"Date", b"Received", b"Return-Path", b"X-Sender", b"X-Receiver",
               b"X-EndOfInjectedXHeaders", b"Content-Type", b"MIME-Version", b"to", b"FROM",
               b"X-Junk", b"Bad Name", b"", b"\xc3\xa9t\xc3\xa9"]
ENDINGS = [b"\r\n"] * 3 + [b"\n"] * 3 + [b"\r", b"\r\r\n", b"\n\r"]
# text with 8-bit characters, and now and then raw bytes (NUL, lone CR, invalid UTF-8)
noise = st.one_of(
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40).map(str.encode),
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40).map(str.encode),
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=40).map(str.encode),
    st.binary(max_size=40),
)


@st.composite
def header_lines(draw: st.DrawFn) -> list[bytes]:
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.sampled_from(FIELD_NAMES))
        value = draw(st.sampled_from(ADDRESSES) | noise)
        sep = draw(st.sampled_from([b": ", b":", b" : ", b"", b":\r\n "]))
        lines.append(name + sep + value)
    return lines


@st.composite
def messages(draw: st.DrawFn, replay: bool) -> bytes:
    """A file: envelope lines (Replay), header fields, maybe a blank line, a body."""
    lines: list[bytes] = []
    if draw(st.integers(0, 9)) == 0:
        lines.append(b"From MAILER-DAEMON Thu Jan  1 00:00:00 2026")
    if replay:
        if draw(st.integers(0, 5)):
            lines.append(b"X-Sender: <" + draw(st.sampled_from(ADDRESSES)) + b">")
        for _ in range(draw(st.integers(0, 3))):
            lines.append(b"X-Receiver: " + draw(st.sampled_from(
                [b"<bob@contoso.test>", b"<alice@contoso.test>", b"bob@contoso.test",
                 b"<>", b"<nobody@contoso.test>", b""]) | noise))
    if draw(st.integers(0, 3)):  # usually a plausible message under the noise
        to = draw(st.sampled_from([b"bob@contoso.test", b"Bob <bob@contoso.test>",
                                   b"alice@contoso.test, bob@contoso.test", *ADDRESSES]))
        lines += [b"From: someone@example.org", b"To: " + to, b"Subject: fuzz"]
    lines += draw(header_lines())
    if draw(st.integers(0, 4)):
        lines.append(b"")
    lines += draw(st.lists(noise | st.sampled_from(
        [b".", b"..", b"From the body", b">From x", b"\x00\x00", b"--boundary--"]),
        max_size=6))
    huge = draw(st.integers(0, 12))
    if huge == 0:  # one huge line, in the header or the body
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, b"X-Huge: " + b"h" * draw(st.sampled_from([1000, 70_000, 1_200_000])))
    ending = draw(st.sampled_from([*ENDINGS, None]))  # None: each line its own
    return b"".join(line + (ending or draw(st.sampled_from(ENDINGS))) for line in lines)


@st.composite
def files(draw: st.DrawFn) -> tuple[str, bytes]:
    folder = draw(st.sampled_from(["pickup", "replay"]))
    if draw(st.integers(0, 9)) == 0:
        return folder, draw(st.binary(max_size=300))
    return folder, draw(messages(folder == "replay"))


# -- the property --------------------------------------------------------------------------


def outcome(folder: Path, name: str) -> str | None:
    """'taken', 'bad', or None while the file is still waiting or being worked on.

    A file only moves forward (folder, then ``.work``, then deleted or ``.bad``), so it is
    looked for in that order: a move between two looks is then never mistaken for a loss.
    """
    if (folder / name).exists():
        return None
    work = folder / ".work"
    if work.is_dir() and any(n.endswith("~" + name) for n in os.listdir(work)):
        return None
    stem = name[:-4]
    if (folder / f"{stem}.bad").exists():  # its reason is written before it is renamed
        return "bad" if (folder / f"{stem}.bad.reason").exists() else None
    return "taken"


def folder_receipts(root: Path) -> list[dict[str, object]]:
    """RECEIVE events of files taken from Pickup (source PICKUP) and Replay (ADMIN)."""
    return [e for e in events(root) if e.get("event-id") == "RECEIVE"
            and e.get("source") in ("PICKUP", "ADMIN")]


def unreceived(root: Path, taken: list[str]) -> list[str]:
    """Taken files no RECEIVE event names (for the failure message)."""
    text = "\n".join(repr(e) for e in folder_receipts(root))
    return [name for name in taken if name not in text]


def drop_and_settle(folders: Folders, batch: list[tuple[str, bytes]]) -> dict[str, str]:
    names = []
    for folder, data in batch:
        folders.dropped += 1
        name = f"fz{folders.dropped:05d}.eml"
        drop_in(getattr(folders, folder), name, data)
        names.append((folder, name))

    def settled() -> dict[str, str] | None:
        found = {name: outcome(getattr(folders, folder), name) for folder, name in names}
        return found if all(found.values()) else None

    try:
        return wait_for_sync(settled, timeout=SETTLE, interval=0.02)
    except AssertionError:
        state = {name: outcome(getattr(folders, folder), name) for folder, name in names}
        raise AssertionError(f"files neither taken nor moved aside within {SETTLE}s: {state};"
                             f" daemon alive: {folders.daemon.alive()}") from None


def test_random_folder_files_are_taken_or_moved_aside_never_lost(folders: Folders) -> None:
    tally = {"taken": 0, "bad": 0}
    taken: list[str] = []
    baseline = folders.rss()
    peak = [baseline]

    @fuzz_settings(40)
    @given(st.lists(files(), min_size=1, max_size=3))
    @example([("pickup", b"From a@b Thu Jan  1 00:00:00 2026\nTo: bob@contoso.test\n\nhi\n")])
    @example([("replay", b"X-Sender: <>\r\nX-Receiver: <bob@contoso.test>\r\n\r\n")])
    @example([("pickup", b"To: bob@contoso.test\r\nSubject: no blank line\r\nbody\r\n")])
    @example([("pickup", b""), ("replay", b"\x00" * 100)])
    def drop(batch: list[tuple[str, bytes]]) -> None:
        for name, result in drop_and_settle(folders, batch).items():
            tally[result] += 1
            if result == "taken":
                taken.append(name)
        peak[0] = max(peak[0], folders.rss())

    drop()
    # every file taken reached the queue: one RECEIVE each (the log is written in batches)
    try:
        wait_for_sync(lambda: len(folder_receipts(folders.root)) >= len(taken), timeout=SETTLE)
    except AssertionError:
        raise AssertionError(
            f"{len(taken)} files taken but only {len(folder_receipts(folders.root))} RECEIVE"
            f" events; none names {unreceived(folders.root, taken)[:50]}") from None
    assert len(folder_receipts(folders.root)) == len(taken), (tally, unreceived(
        folders.root, taken))
    # and the daemon still takes a good file from each folder
    before = len(maildir(folders.root, "Bob"))
    drop_in(folders.pickup, "good-pickup.eml", message(subject="after the fuzzing"))
    drop_in(folders.replay, "good-replay.eml",
            replay_file("someone@example.org", ["bob@contoso.test"], message(subject="replay")))
    wait_for_sync(lambda: len(maildir(folders.root, "Bob")) >= before + 2, timeout=SETTLE)
    assert folders.daemon.alive()
    problems = log_problems(folders.daemon)
    assert not problems, "\n".join(problems)
    growth = peak[0] - baseline
    assert growth < 96 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MB"
    print("folder fuzzing:", tally)
