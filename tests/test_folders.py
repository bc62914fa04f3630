"""Hostile input in the Pickup and Replay folders (docs/reliability.md cases 69–71).

Every case runs against a real in-process daemon and checks the exact outcome: where the
file went (``name.bad`` + ``name.bad.reason``, left in place, or gone after commit), what
reached a Maildir, and which tracking events were written.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import socket
import sqlite3
import stat
import time
from collections.abc import Callable
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

import hubport.core.folders as folders_module
import support
from hubport.core.folders import display_name
from hubport.plugins import pytest_plugin
from support import (
    drop_in,
    event_ids,
    events,
    maildir,
    message,
    read_mail,
    replay_file,
    wait_for,
)

HubFactory = Callable[..., Any]  # conftest's hub_factory: async context manager of a Hub

# -- helpers --------------------------------------------------------------------------------


def bpath(folder: Path, name: bytes) -> bytes:
    """A bytes path inside ``folder`` (names need not be UTF-8)."""
    return os.fsencode(folder) + b"/" + name


def drop_in_bytes(folder: Path, name: bytes, data: bytes) -> bytes:
    """``drop_in`` for bytes names: write a hidden temp file, then rename it in."""
    tmp = bpath(folder, b".incoming.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    final = bpath(folder, name)
    os.rename(tmp, final)
    return final


def work_entries(folder: Path) -> list[str]:
    work = folder / ".work"
    return sorted(os.listdir(work)) if work.is_dir() else []


def reason_of(folder: Path, stem: bytes) -> str | None:
    """The text of ``<stem>.bad.reason`` once both it and ``<stem>.bad`` exist."""
    bad = bpath(folder, stem + b".bad")
    reason = bad + b".reason"
    if os.path.lexists(bad) and os.path.exists(reason):
        with open(reason, "rb") as fh:
            return fh.read().decode()
    return None


def badmail(root: Path) -> dict[str, str]:
    """BADMAIL events keyed by the file name as the log shows it (``display_name``): the
    reason."""
    return {e["custom-data"]["file"]: e["custom-data"]["reason"]
            for e in events(root, event_id="BADMAIL")}


async def expect_bad(hub: Any, folder: Path, name: bytes, reason: str) -> str:
    """Wait until ``name`` became ``<stem>.bad`` with a reason file and a BADMAIL event."""
    stem = name[:-4]
    text = await wait_for(lambda: reason_of(folder, stem))
    assert reason in text, (name, text)
    assert text.endswith("\n") and text.count("\n") == 1  # one line, even for odd names
    assert not os.path.lexists(bpath(folder, name))
    tracked = await wait_for(lambda: badmail(hub.root).get(display_name(name)))
    assert reason in tracked
    assert "\\udc" not in text and "\\udc" not in tracked, (name, text)
    return text


def ndr_fields(path: Path) -> list[dict[str, str]]:
    """The per-recipient blocks of a DSN's delivery-status part."""
    report = message_from_bytes(path.read_bytes())
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1].get_payload()
    return [{k.lower(): v for k, v in block.items()} for block in status[1:]]


async def emptied(folder: Path, *left: bytes) -> None:
    """Wait until only ``.work`` (empty) and ``left`` remain in ``folder``: the files that
    were taken are unlinked just after their commit, in a worker thread."""
    want = sorted([b".work", *left])
    await wait_for(lambda: sorted(os.listdir(os.fsencode(folder))) == want
                   and work_entries(folder) == [])


async def settle_passes(seconds: float = 1.0) -> None:
    """Proving a negative: several rescans (0.3 s) and settle times (0.2 s) go by."""
    await asyncio.sleep(seconds)


# -- malformed content ----------------------------------------------------------------------

_rng = random.Random(20240501)
JUNK = bytes(b for b in _rng.randbytes(6000) if b not in (0, 13))  # no NUL, no CR: pure junk

PICKUP_BAD = [
    (b"junk.eml", JUNK, "not an RFC 5322 header line: line 1"),
    (b"nul-junk.eml", _rng.randbytes(512) + b"\x00", "NUL byte at offset"),
    (b"no-sender.eml", b"To: bob@contoso.test\nSubject: s\n\nbody\n",
     "no sender: From or Sender required"),
    (b"no-rcpt.eml", b"From: alice@contoso.test\nSubject: s\n\nbody\n",
     "no recipient: To, Cc or Bcc required"),
    (b"nul.eml", message(body="a\x00b\n"), "NUL byte at offset"),
    (b"bare-cr.eml", message(body="one\rtwo\n"), "bare CR in line 5"),
    (b"empty.eml", b"", "no header section"),
    # bytes that are not UTF-8 are shown as \xNN, never as Python's surrogate escapes
    (b"raw-rcpt.eml", b"From: alice@contoso.test\nTo: \xff\xfe@contoso.test\n\nbody\n",
     "bad recipient address '\\xff\\xfe@contoso.test'"),
]
REPLAY_BAD = [
    (b"bad-rcpt.eml", replay_file("alice@contoso.test", ["bob@@contoso.test"], message()),
     "bad X-Receiver address"),
    (b"late-x.eml", message(extra="X-Sender: <alice@contoso.test>\n"
                                  "X-Receiver: <bob@contoso.test>\n"),
     "replay X-headers must precede normal headers"),
    (b"no-xsender.eml", message(), "no X-Sender"),
    (b"junk.eml", JUNK, "not an RFC 5322 header line: line 1"),
    (b"empty.eml", b"", "no header section"),
]


async def test_malformed_files_become_bad_with_their_reason(hub_factory: HubFactory) -> None:
    async with hub_factory() as hub:
        for name, data, _ in PICKUP_BAD:
            drop_in_bytes(hub.pickup, name, data)
        for name, data, _ in REPLAY_BAD:
            drop_in_bytes(hub.replay, name, data)
        for folder, cases in ((hub.pickup, PICKUP_BAD), (hub.replay, REPLAY_BAD)):
            for name, data, reason in cases:
                await expect_bad(hub, folder, name, reason)
                with open(bpath(folder, name[:-4] + b".bad"), "rb") as fh:
                    assert fh.read() == data, name  # the bad file keeps the original bytes
        await wait_for(lambda: len(events(hub.root, event_id="BADMAIL"))
                       == len(PICKUP_BAD) + len(REPLAY_BAD))
        # the folders still work, and nothing bad was delivered or queued
        drop_in(hub.pickup, "good.eml", message(subject="after the junk"))
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        assert len(got) == 1 and read_mail(got[0])["Subject"] == "after the junk"
        assert not maildir(hub.root, "Alice")
        await emptied(hub.pickup, *(n[:-4] + s for n, _, _ in PICKUP_BAD
                                    for s in (b".bad", b".bad.reason")))
        await emptied(hub.replay, *(n[:-4] + s for n, _, _ in REPLAY_BAD
                                    for s in (b".bad", b".bad.reason")))
        received = await wait_for(lambda: events(hub.root, event_id="RECEIVE"))
        assert len(received) == 1


async def test_header_over_pickup_limit_is_ndred_not_bad(hub_factory: HubFactory) -> None:
    filler = "".join(f"X-Filler-{i}: {'a' * 900}\n" for i in range(80))  # ~72 KB > 64 KB
    async with hub_factory() as hub:
        drop_in(hub.pickup, "big.eml", message(subject="too big", extra=filler))
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        blocks = ndr_fields(ndr[0])
        assert [b["status"] for b in blocks] == ["5.3.4"]
        assert blocks[0]["final-recipient"] == "rfc822;bob@contoso.test"
        await wait_for(lambda: {"RECEIVE", "FAIL", "DSN"} <= set(event_ids(hub.root)))
        receive = events(hub.root, event_id="RECEIVE", source="PICKUP")
        assert receive[0]["recipient-status"][0].startswith("550 5.3.4")
        assert not maildir(hub.root, "Bob")
        await emptied(hub.pickup)  # gone, not .bad
        assert "BADMAIL" not in event_ids(hub.root)


async def test_too_many_recipients_is_ndred(hub_factory: HubFactory) -> None:
    async with hub_factory(server_extra="PickupDirectoryMaxRecipientsPerMessage = 2") as hub:
        to = "bob@contoso.test, staff@contoso.test, nobody@contoso.test"
        drop_in(hub.pickup, "many.eml", message(to=to, subject="three"))
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        blocks = ndr_fields(ndr[0])
        assert {b["status"] for b in blocks} == {"5.5.3"}
        assert sorted(b["final-recipient"] for b in blocks) == [
            "rfc822;bob@contoso.test", "rfc822;nobody@contoso.test", "rfc822;staff@contoso.test"]
        await wait_for(lambda: {"RECEIVE", "FAIL", "DSN"} <= set(event_ids(hub.root)))
        assert len(maildir(hub.root, "Alice")) == 1  # the NDR only: the group was not expanded
        assert not maildir(hub.root, "Bob")
        await emptied(hub.pickup)
        # at the limit the message goes through
        drop_in(hub.pickup, "two.eml", message(to="bob@contoso.test, alice@contoso.test"))
        await wait_for(lambda: maildir(hub.root, "Bob") and len(maildir(hub.root, "Alice")) == 2)


# -- entries that are not plain files ---------------------------------------------------------


async def test_symlink_is_quarantined_itself_and_target_never_read(
        hub_factory: HubFactory, tmp_path: Path) -> None:
    secret = tmp_path / "secret.eml"  # a valid message: following the link would mail it
    secret.write_bytes(message(subject="secret"))
    before = secret.stat()
    passwd = Path("/etc/passwd")
    passwd_before = passwd.read_bytes() if passwd.exists() else None
    async with hub_factory() as hub:
        os.symlink("/etc/passwd", hub.pickup / "evil.eml")
        os.symlink(secret, hub.pickup / "leak.eml")
        for name in (b"evil.eml", b"leak.eml"):
            await expect_bad(hub, hub.pickup, name, "symlink")
        assert os.readlink(hub.pickup / "evil.bad") == "/etc/passwd"  # the link itself moved
        assert os.readlink(hub.pickup / "leak.bad") == str(secret)
        await settle_passes()
        assert not maildir(hub.root, "Bob") and not maildir(hub.root, "Alice")
        assert "RECEIVE" not in event_ids(hub.root)
    after = secret.stat()
    assert secret.read_bytes() == message(subject="secret")
    assert (after.st_ino, after.st_mtime_ns, after.st_nlink) == (
        before.st_ino, before.st_mtime_ns, before.st_nlink)
    if passwd_before is not None:
        assert passwd.read_bytes() == passwd_before


@pytest.mark.timeout(30)
async def test_fifo_is_bad_without_hanging(hub_factory: HubFactory) -> None:
    async with hub_factory() as hub:
        os.mkfifo(hub.pickup / "x.eml")
        await expect_bad(hub, hub.pickup, b"x.eml", "not a regular file")
        assert stat.S_ISFIFO(os.lstat(hub.pickup / "x.bad").st_mode)
        drop_in(hub.pickup, "after.eml", message(subject="after the fifo"))
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        assert read_mail(got[0])["Subject"] == "after the fifo"


async def test_socket_is_bad_not_retried_forever(hub_factory: HubFactory) -> None:
    async with hub_factory() as hub:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.bind(str(hub.pickup / "s.eml"))  # open() on it fails with ENXIO
            await expect_bad(hub, hub.pickup, b"s.eml", "not a regular file")
            assert stat.S_ISSOCK(os.lstat(hub.pickup / "s.bad").st_mode)
        finally:
            sock.close()


async def test_long_named_bad_file_is_moved_aside(hub_factory: HubFactory, tmp_path: Path) -> None:
    long_name = b"x" * 251 + b".eml"  # 255 bytes: "<name>.bad.reason" would not fit
    async with hub_factory() as hub:
        staged = tmp_path / "staged"
        staged.write_bytes(b"junk junk\n")
        os.rename(staged, bpath(hub.pickup, long_name))
        stem = b"x" * folders_module.MAX_BAD_STEM
        text = await wait_for(lambda: reason_of(hub.pickup, stem))
        assert "not an RFC 5322 header line" in text
        assert sorted(os.listdir(os.fsencode(hub.pickup))) == [
            b".work", stem + b".bad", stem + b".bad.reason"]
        assert work_entries(hub.pickup) == []  # not stuck in .work
        await wait_for(lambda: badmail(hub.root).get(display_name(long_name)))


async def test_directory_named_eml_is_skipped(hub_factory: HubFactory) -> None:
    async with hub_factory() as hub:
        (hub.pickup / "d.eml").mkdir()
        (hub.pickup / "d.eml" / "inner.eml").write_bytes(message(subject="inner"))
        drop_in(hub.pickup, "a.eml", message(subject="beside the directory"))
        await wait_for(lambda: maildir(hub.root, "Bob"))
        await settle_passes()
        assert (hub.pickup / "d.eml").is_dir()
        assert os.listdir(hub.pickup / "d.eml") == ["inner.eml"]  # not recursed into
        assert sorted(os.listdir(hub.pickup)) == [".work", "d.eml"]
        assert len(maildir(hub.root, "Bob")) == 1
        assert "BADMAIL" not in event_ids(hub.root)


async def test_hard_link_is_bad(hub_factory: HubFactory, tmp_path: Path) -> None:
    other = tmp_path / "someone-elses.eml"
    other.write_bytes(message(subject="not yours"))
    async with hub_factory() as hub:
        os.link(other, hub.pickup / "h.eml")
        await expect_bad(hub, hub.pickup, b"h.eml", "hard link")
        assert os.path.samefile(hub.pickup / "h.bad", other)
        await settle_passes()
        assert not maildir(hub.root, "Bob")
    assert other.read_bytes() == message(subject="not yours")


async def test_non_utf8_names_are_processed_and_kept_as_bytes(hub_factory: HubFactory) -> None:
    async with hub_factory() as hub:
        drop_in_bytes(hub.pickup, b"\xff\xfe.eml", message(subject="latin junk name"))
        drop_in_bytes(hub.replay, b"\xff\xfe.eml",
                      replay_file("alice@contoso.test", ["bob@contoso.test"],
                                  message(subject="replayed with junk name")))
        drop_in_bytes(hub.pickup, b"\xfe-bad.eml", b"no header at all\n")
        got = await wait_for(
            lambda: len(maildir(hub.root, "Bob")) == 2 and maildir(hub.root, "Bob"))
        assert sorted(read_mail(p)["Subject"] for p in got) == [
            "latin junk name", "replayed with junk name"]
        await expect_bad(hub, hub.pickup, b"\xfe-bad.eml", "not an RFC 5322 header line")
        await emptied(hub.pickup, b"\xfe-bad.bad", b"\xfe-bad.bad.reason")
        await emptied(hub.replay)
        sources = await wait_for(lambda: [e["source"] for e in events(hub.root, event_id="RECEIVE")]
                                 if len(events(hub.root, event_id="RECEIVE")) == 2 else None)
        assert sorted(sources) == ["ADMIN", "PICKUP"]


async def test_newline_in_file_name(hub_factory: HubFactory) -> None:
    async with hub_factory() as hub:
        drop_in_bytes(hub.pickup, b"new\nline.eml", message(subject="newline name"))
        drop_in_bytes(hub.pickup, b"bad\nname.eml", b"\x01\x02 junk\n")
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        assert read_mail(got[0])["Subject"] == "newline name"
        await expect_bad(hub, hub.pickup, b"bad\nname.eml", "not an RFC 5322 header line")
        bad = events(hub.root, event_id="BADMAIL")[0]
        assert "\n" not in bad["custom-data"]["file"]  # escaped, never a raw newline
        assert bad["custom-data"]["file"] == "bad\\x0aname.eml"
        receive = await wait_for(lambda: events(hub.root, event_id="RECEIVE"))
        assert receive[0]["source-context"] == "file=new\\x0aline.eml"


async def test_file_names_are_logged_as_readable_text(hub_factory: HubFactory) -> None:
    """Finding 4 of issue 10: names were written as Python ``b'...'`` reprs."""
    async with hub_factory() as hub:
        drop_in_bytes(hub.pickup, "naïve €.eml".encode(), message(subject="utf-8 name"))
        drop_in_bytes(hub.replay, b"latin-\xe9.eml",
                      replay_file("alice@contoso.test", ["bob@contoso.test"],
                                  message(subject="latin-1 name")))
        drop_in_bytes(hub.pickup, b"junk-\xe9.eml", b"no header at all\n")
        await expect_bad(hub, hub.pickup, b"junk-\xe9.eml", "not an RFC 5322 header line")
        received = await wait_for(lambda: len(events(hub.root, event_id="RECEIVE")) == 2
                                  and events(hub.root, event_id="RECEIVE"))
        assert sorted(e["source-context"] for e in received) == [
            "file=latin-\\xe9.eml", "file=naïve €.eml"]
        assert list(badmail(hub.root)) == ["junk-\\xe9.eml"]
        for record in [*received, *events(hub.root, event_id="BADMAIL")]:
            assert "b'" not in str(record) and 'b"' not in str(record)


# -- timing and races ---------------------------------------------------------------------------


async def test_file_written_in_place_slowly_is_taken_only_when_closed(
        hub_factory: HubFactory) -> None:
    body = b"".join(b"line %04d of a slowly written message\n" % i for i in range(400))
    data = message(subject="slow").replace(b"Hello there.\n", b"") + body
    half = len(data) // 2
    async with hub_factory() as hub:
        path = hub.pickup / "slow.eml"
        with open(path, "wb") as fh:
            fh.write(data[:half])
            fh.flush()
            await settle_passes(1.2)  # > settle time (0.2 s) and several rescans (0.3 s)
            assert os.listdir(hub.pickup) == [".work", "slow.eml"]  # not taken
            assert work_entries(hub.pickup) == []
            assert not maildir(hub.root, "Bob")
            fh.write(data[half:])
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        delivered = got[0].read_bytes()
        assert delivered.split(b"\n\n", 1)[1] == body  # byte-identical body
        assert read_mail(got[0])["Subject"] == "slow"
        await emptied(hub.pickup)


async def test_file_removed_between_scan_and_claim(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    async with hub_factory() as hub:
        folder = hub.daemon.folders[0]
        original = folder._claim_and_read
        raced: list[bytes] = []

        def remove_then_claim(names: list[bytes], unsure: set[bytes]) -> Any:
            for name in names:
                if name.startswith(b"gone"):
                    os.unlink(folder.bpath + b"/" + name)  # another process took it
                    raced.append(name)
            return original(names, unsure)

        monkeypatch.setattr(folder, "_claim_and_read", remove_then_claim)
        drop_in(hub.pickup, "gone.eml", message(subject="gone"))
        await wait_for(lambda: raced)
        await settle_passes()
        await emptied(hub.pickup)
        assert not maildir(hub.root, "Bob")
        assert not {"RECEIVE", "BADMAIL"} & set(event_ids(hub.root))
        # the loop survived and still delivers
        drop_in(hub.pickup, "next.eml", message(subject="next"))
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        assert [read_mail(p)["Subject"] for p in got] == ["next"]


async def test_file_removed_while_being_opened(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unlinked after our open, before the claim rename: skipped quietly, never .bad."""
    real_no_writer = folders_module._writer_gone
    removed: list[str] = []

    def remove_then_check(fd: int) -> bool | None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.basename(path).startswith("gone"):
            os.unlink(path)
            removed.append(path)
        return real_no_writer(fd)

    monkeypatch.setattr(folders_module, "_writer_gone", remove_then_check)
    async with hub_factory() as hub:
        drop_in(hub.pickup, "gone.eml", message(subject="gone"))
        await wait_for(lambda: removed)
        drop_in(hub.pickup, "kept.eml", message(subject="kept"))
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        await settle_passes()
        assert [read_mail(p)["Subject"] for p in maildir(hub.root, "Bob")] == ["kept"]
        await emptied(hub.pickup)
        assert "BADMAIL" not in event_ids(hub.root)
        assert len(got) == 1


async def test_rename_in_burst_delivered_exactly_once(
        hub_factory: HubFactory, tmp_path: Path) -> None:
    count = 300
    staging = tmp_path / "staging"
    staging.mkdir()
    expected = set()
    for i in range(count):
        mid = f"<burst-{i}@contoso.test>"
        expected.add(mid)
        (staging / f"m{i:03d}.eml").write_bytes(message(subject=f"burst {i}", message_id=mid))
    async with hub_factory() as hub:
        for i in range(count):
            os.rename(staging / f"m{i:03d}.eml", hub.pickup / f"m{i:03d}.eml")
        await wait_for(lambda: len(maildir(hub.root, "Bob")) >= count, timeout=40)
        await settle_passes()
        got = maildir(hub.root, "Bob")
        ids = [read_mail(p)["Message-ID"] for p in got]
        assert len(got) == count
        assert sorted(ids) == sorted(expected)  # every one, none twice
        await emptied(hub.pickup)
        received = await wait_for(
            lambda: len(events(hub.root, event_id="RECEIVE")) >= count
            and events(hub.root, event_id="RECEIVE"))
        assert len(received) == count
        assert len({e["message-id"] for e in received}) == count


# -- the queue cannot commit ----------------------------------------------------------------


async def test_commit_failure_keeps_the_file_then_delivers(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    async with hub_factory() as hub:
        store = hub.store
        pipeline = hub.pipeline

        def disk_full(works: list[Any]) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        attempts: list[float] = []
        real_submit = pipeline.submit

        async def counting_submit(sub: Any) -> int:
            attempts.append(time.monotonic())
            return await real_submit(sub)

        monkeypatch.setattr(pipeline, "submit", counting_submit)
        monkeypatch.setattr(folders_module, "BACKOFF_AFTER_STORE_ERROR", 2.0)  # test speed
        monkeypatch.setattr(store, "_commit_batch", disk_full)
        drop_in(hub.pickup, "a.eml", message(subject="survives ENOSPC"))
        await wait_for(lambda: attempts)
        # the claimed file goes back under its own name: not .bad, not lost, not in .work
        await wait_for(lambda: sorted(os.listdir(hub.pickup)) == [".work", "a.eml"])
        await wait_for(lambda: work_entries(hub.pickup) == [])
        await settle_passes(1.0)
        assert sorted(os.listdir(hub.pickup)) == [".work", "a.eml"]
        assert len(attempts) <= 2, "the folder must back off while the queue cannot commit"
        assert not maildir(hub.root, "Bob")
        assert not {"RECEIVE", "BADMAIL"} & set(event_ids(hub.root))
        claims = await store.read(lambda c: c.execute("SELECT count(*) FROM claim").fetchone()[0])
        assert claims == 0  # nothing acknowledged
        monkeypatch.undo()  # the disk has room again
        got = await wait_for(lambda: maildir(hub.root, "Bob"), timeout=15)
        assert read_mail(got[0])["Subject"] == "survives ENOSPC"
        await settle_passes(0.5)
        assert len(maildir(hub.root, "Bob")) == 1
        await emptied(hub.pickup)
        await wait_for(lambda: "RECEIVE" in event_ids(hub.root))


# -- crash leftovers --------------------------------------------------------------------------


async def test_claimed_files_left_by_a_crash(hub_factory: HubFactory, tmp_path: Path) -> None:
    async with hub_factory():
        pass  # creates the queue database
    db = tmp_path / "var" / "queue" / "mail.que"
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO claim (name, message, at) VALUES (?,?,?)",
                     ("PHUB01.17f0c0ffee-1", 1, time.time()))
    conn.close()
    work = tmp_path / "pickup" / ".work"
    (work / "PHUB01.17f0c0ffee-1~committed.eml").write_bytes(message(subject="already committed"))
    (work / "PHUB01.17f0c0ffee-2~unknown.eml").write_bytes(message(subject="claimed, not committed"))
    async with hub_factory() as hub:
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        await settle_passes()
        assert [read_mail(p)["Subject"] for p in maildir(hub.root, "Bob")] == [
            "claimed, not committed"]
        assert work_entries(hub.pickup) == []
        assert os.listdir(hub.pickup) == [".work"]
        received = await wait_for(lambda: events(hub.root, event_id="RECEIVE"))
        assert [e["message-subject"] for e in received] == ["claimed, not committed"]
        assert len(got) == 1
        stale = await hub.store.read(
            lambda c: c.execute("SELECT name FROM claim WHERE name LIKE 'P%'").fetchall())
        assert [r[0] for r in stale] in ([], ["PHUB01.17f0c0ffee-1"])  # the ingested one forgotten


# -- throttle ----------------------------------------------------------------------------------


async def test_messages_per_minute_throttle(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pytest_plugin, "BASE_ORG", pytest_plugin.BASE_ORG.replace(
        'PickupDirectoryMaxMessagesPerMinute = "unlimited"',
        "PickupDirectoryMaxMessagesPerMinute = 5"))
    async with hub_factory() as hub:
        assert hub.pipeline.server.pickup_directory_max_messages_per_minute == 5
        for i in range(8):
            drop_in(hub.pickup, f"t{i}.eml", message(subject=f"throttled {i}"))
        await wait_for(lambda: len(maildir(hub.root, "Bob")) >= 5)
        await settle_passes(1.2)
        assert len(maildir(hub.root, "Bob")) == 5
        left = sorted(n for n in os.listdir(hub.pickup) if n.endswith(".eml"))
        assert len(left) == 3  # waiting for the next minute, untouched
        assert work_entries(hub.pickup) == []
        received = await wait_for(lambda: len(events(hub.root, event_id="RECEIVE")) == 5)
        assert received


async def test_file_renamed_in_from_another_folder_is_taken_before_the_rescan(
        hub_factory: HubFactory, tmp_path: Path) -> None:
    """A rename from outside the watched folder reaches watchdog as a created event, not a
    move: it must still be taken at once (the lease proves no writer holds it), not only at
    the next rescan."""
    async with hub_factory(server_extra="") as hub:
        hub.pipeline.server  # noqa: B018 - the hub is up
        outside = tmp_path / "outside.eml"
        outside.write_bytes(message(subject="from outside"))
        folders = hub.daemon.folders
        for folder in folders:  # push the next full rescan far away
            folder._next_scan = float("inf")
        os.rename(outside, hub.pickup / "moved-in.eml")
        got = await wait_for(lambda: maildir(hub.root, "Bob"), timeout=3)
        assert read_mail(got[0])["Subject"] == "from outside"


# -- two hubs sharing one folder ---------------------------------------------------------------


async def test_two_hubs_sharing_a_pickup_folder_take_each_file_once(tmp_path: Path) -> None:
    """HUB01 and HUB02 watch the same Pickup and Replay folders (each with its own queue):
    every file is ingested by exactly one of them, and a restart of one never re-ingests the
    other's claims (docs/reliability.md case 72)."""
    import asyncio

    from hubport.core.daemon import Daemon

    config = support.write_org(tmp_path, foreign_extra='SourceTransportServers = ["HUB01", "HUB02"]',
                               extra="""
[[transport_server]]
Name = "HUB02"
StateDirectory = "var2"
PickupDirectoryMaxMessagesPerMinute = "unlimited"
FolderRescanInterval = "0.3s"
FolderSettleTime = "0.2s"
""")
    hubs = [Daemon(config, name, signals=False) for name in ("HUB01", "HUB02")]
    tasks = [asyncio.get_running_loop().create_task(h.run()) for h in hubs]
    try:
        await wait_for(lambda: all(h.ready.is_set() for h in hubs))
        for i in range(150):
            target = tmp_path / ("pickup" if i % 2 else "replay")
            data = message(to="IMCEAFAX-+2B15551234@contoso.test", subject=f"shared {i}",
                           message_id=f"<shared-{i}@contoso.test>")
            if target.name == "replay":
                data = support.replay_file("alice@contoso.test",
                                           ["IMCEAFAX-+2B15551234@contoso.test"], data)
            drop_in(target, f"m{i:03d}.eml", data)
        drop = tmp_path / "drop" / "Fax Gateway"
        await wait_for(lambda: len(support.drop_files(drop)) >= 150, timeout=30)
        await settle_passes()
        ids = [read_mail_id(p) for p in support.drop_files(drop)]
        assert len(ids) == 150 and len(set(ids)) == 150
        taken = [sum(f.ingested for f in h.folders) for h in hubs]
        assert sum(taken) == 150
    finally:
        for h in hubs:
            h.stop()
        await asyncio.gather(*tasks)
    # restart HUB02 only: it must not touch what HUB01 might have left in .work
    assert not [p for p in (tmp_path / "pickup" / ".work").iterdir()]


def read_mail_id(path: Path) -> str:
    for line in path.read_bytes().split(b"\r\n"):
        if line.lower().startswith(b"message-id:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError(f"no Message-ID in {path}")
