"""Large Pickup and Replay files stream into a spool file (issue 12, part 4).

A file over ``body.SPOOL_THRESHOLD`` is never held whole: its header section is parsed as
any file's and the rest is copied, with CRLF line endings, into the queue's spool folder.
The tests shrink the threshold and the read size so that a few hundred kB take that path
across many reads, and compare what gets queued and delivered octet for octet with the
same file taken whole. A large file that is not committed leaves no spool file behind.
"""

from __future__ import annotations

import asyncio
import os
import random
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import hubport.core.body as body_module
import hubport.core.folder_formats as formats_module
import hubport.core.folders as folders_module
from hubport.core import hookimpl
from hubport.core.body import spool_folder
from hubport.core.folder_formats import LineEndings
from hubport.core.headers import MessageFormatError, canonicalize_line_endings
from hubport.core.model import SmtpResponse, Submission
from hubport.plugins import pytest_plugin
from support import drop_in, maildir, message, read_mail, replay_file, wait_for

HubFactory = Callable[..., Any]
CHUNK = 997  # a prime: the reads fall everywhere in the lines
NOW = 1_700_000_000.0  # the parsers' clock, so that both ways write the same Received field


# -- the line endings of a file read in pieces -------------------------------------------------


def streamed(data: bytes, sizes: list[int]) -> bytes | str:
    """``data`` through ``LineEndings`` in pieces of the given sizes (cycled): the CRLF
    octets, or the reason it was refused."""
    endings = LineEndings()
    out = []
    pos = 0
    try:
        for n in range(len(data)):
            if pos >= len(data):
                break
            size = sizes[n % len(sizes)]
            out.append(endings.feed(data[pos:pos + size]))
            pos += size
        endings.end()
    except MessageFormatError as exc:
        return exc.reason
    return b"".join(out)


def whole(data: bytes) -> bytes | str:
    try:
        return canonicalize_line_endings(data)
    except MessageFormatError as exc:
        return exc.reason


def test_line_endings_in_pieces_are_those_of_the_whole_file() -> None:
    rng = random.Random(12)
    alphabet = [b"a", b"b", b" ", b"\n", b"\r\n", b"\xc3\xa9"]
    cases = [b"a\r\nb\nc\r\n", b"a\r", b"\r", b"\r\n", b"a\rb\n", b"x\n\x00\r", b"x\r\x00",
             b"a\n\rb\x00", b"\n\n\r\n\r\n"]
    for _ in range(400):
        text = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
        if rng.random() < 0.2:  # a bare CR or a NUL somewhere
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice([b"\r", b"\x00", b"\rx"]) + text[at:]
        cases.append(text)
    for data in cases:
        expected = whole(data)
        for sizes in ([1], [2], [3, 1], [5, 2, 7], [len(data)]):
            assert streamed(data, sizes) == expected, (data, sizes)


def test_a_crlf_split_between_two_reads_is_kept_once() -> None:
    endings = LineEndings()
    assert endings.feed(b"one\r") == b"one"  # the CR waits for the next read
    assert endings.feed(b"\ntwo\n") == b"\r\ntwo\r\n"
    endings.end()
    endings = LineEndings()
    endings.feed(b"one\n\r")
    with pytest.raises(MessageFormatError, match="bare CR in line 2"):
        endings.end()  # the last octet was a CR after all


# -- whole files through the daemon ------------------------------------------------------------


def large_message(size: int, subject: str) -> bytes:
    """A message of about ``size`` octets: LF lines, a CRLF across many read boundaries
    (the file is read from offset 0 in ``CHUNK`` octets), 8-bit text far from the header."""
    head = message(subject=subject, body="", extra="Date: Tue, 14 Nov 2023 22:13:20 +0000\n",
                   message_id=f"<{subject.replace(' ', '.')}@contoso.test>")
    rng = random.Random(size)
    lines: list[bytes] = []
    total = 0
    while total < size:
        lines.append(b"%06d " % len(lines) + b"z" * rng.randrange(0, 150) + b"\n")
        total += len(lines[-1])
    body = bytearray(b"".join(lines))
    body[-5000:-4990] = "é è ü ".encode()[:10]  # 8-bit only in the rest, not the header
    data = bytearray(head + body)
    for k in range(len(head) // CHUNK + 2, len(data) // CHUNK, 7):
        boundary = k * CHUNK
        data[boundary - 1:boundary + 1] = b"\r\n"  # CR ends one read, LF starts the next
    return bytes(data)


def freeze_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats_module, "time", types.SimpleNamespace(time=lambda: NOW))


def spool_files(hub: Any) -> list[str]:
    folder = spool_folder(hub.store.path)
    return sorted(os.listdir(folder)) if folder.is_dir() else []


class Captured:
    """Every Submission the folders hand to the pipeline, with its octets read at once."""

    def __init__(self, hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: dict[str, tuple[bool, int, str | None, bytes]] = {}
        submit = hub.pipeline.submit

        async def spy(sub: Submission) -> Any:
            data = await asyncio.to_thread(sub.body.read)
            assert len(data) == sub.body.size
            self.seen[sub.subject] = (sub.body.spooled, len(sub.body.prefix),
                                      sub.envelope.mail_from.body, data)
            return await submit(sub)

        monkeypatch.setattr(hub.pipeline, "submit", spy)


async def emptied(folder: Path) -> None:
    await wait_for(lambda: os.listdir(folder) == [".work"] and not os.listdir(folder / ".work"))


@pytest.mark.timeout(60)
async def test_a_large_file_is_queued_and_delivered_as_it_would_be_whole(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze_parsers(monkeypatch)
    async with hub_factory() as hub:
        captured = Captured(hub, monkeypatch)
        files = {"pickup": large_message(300_000, "big pickup"),
                 "replay": replay_file("alice@contoso.test", ["bob@contoso.test"],
                                       large_message(250_000, "big replay"))}
        folders = {"pickup": hub.pickup, "replay": hub.replay}
        for kind in files:  # taken whole: the default threshold is 1 MiB
            drop_in(folders[kind], "whole.eml", files[kind])
        got = await wait_for(lambda: len(maildir(hub.root, "Bob")) == 2
                             and maildir(hub.root, "Bob"))
        delivered = {read_mail(p)["Subject"]: p.read_bytes() for p in got}
        queued = dict(captured.seen)
        await emptied(hub.pickup)
        await emptied(hub.replay)

        monkeypatch.setattr(body_module, "SPOOL_THRESHOLD", 1024)
        monkeypatch.setattr(body_module, "CHUNK_SIZE", CHUNK)
        captured.seen.clear()
        for kind in files:
            drop_in(folders[kind], "streamed.eml", files[kind])
        got = await wait_for(lambda: len(maildir(hub.root, "Bob")) == 4
                             and maildir(hub.root, "Bob"))
        for subject in ("big pickup", "big replay"):
            spooled, prefix, body_param, data = captured.seen[subject]
            was_spooled, _, was_body_param, was_data = queued[subject]
            assert (spooled, was_spooled) == (True, False), subject
            assert prefix < 1024, prefix  # only the header section is held in memory
            assert data == was_data, subject  # queued octet for octet the same
            assert body_param == was_body_param
            assert b"\r\n\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
        assert captured.seen["big pickup"][2] == "8BITMIME"  # the 8-bit text is in the rest
        for path in got:  # each file delivered twice, the same octets
            assert path.read_bytes() == delivered[read_mail(path)["Subject"]]
        await emptied(hub.pickup)
        await emptied(hub.replay)
        # delivered: the queue removes the spool files once the messages are gone
        await wait_for(lambda: spool_files(hub) == [], timeout=20)


class RefuseBig:
    """A receive agent refusing the messages whose subject says so."""

    @hookimpl
    def receive(self, submission: Submission) -> SmtpResponse | None:
        if submission.subject.startswith("refuse"):
            return SmtpResponse(550, "5.7.1", "refused by a test agent")
        return None


def bad_reason(folder: Path, stem: str) -> str | None:
    reason = folder / f"{stem}.bad.reason"
    return reason.read_text() if reason.exists() and (folder / f"{stem}.bad").exists() else None


@pytest.mark.timeout(60)
async def test_a_large_file_not_committed_leaves_no_spool_file(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(body_module, "SPOOL_THRESHOLD", 1024)
    monkeypatch.setattr(body_module, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(folders_module, "HEADER_SCAN", 8192)
    async with hub_factory() as hub:
        hub.pipeline.hooks.register(RefuseBig(), name="refuse-big")
        refused = large_message(200_000, "refuse me")
        drop = hub.pickup / "refused.eml"
        drop.write_bytes(refused)
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        assert read_mail(ndr[0])["Subject"] == "Undeliverable: refuse me"
        # the NDR returned the whole original, read from the spool file before it went
        assert refused.splitlines()[-1] in ndr[0].read_bytes()
        await emptied(hub.pickup)

        nul = large_message(200_000, "has a NUL")
        nul = nul[:150_000] + b"\x00" + nul[150_001:]
        cr = large_message(200_000, "has a bare CR")
        cr = cr[:150_000] + b"x\rx" + cr[150_003:]
        lines = cr.count(b"\n", 0, 150_001) + 1
        both = cr[:160_000] + b"\x00" + cr[160_001:]  # the NUL is named, as for a whole file
        long_head = replay_file("alice@contoso.test",
                                [f"r{i}@contoso.test" for i in range(400)],
                                large_message(50_000, "long header"))
        (hub.pickup / "nul.eml").write_bytes(nul)
        (hub.pickup / "cr.eml").write_bytes(cr)
        (hub.pickup / "both.eml").write_bytes(both)
        (hub.replay / "long.eml").write_bytes(long_head)
        expected = {(hub.pickup, "nul"): "NUL byte at offset 150000",
                    (hub.pickup, "cr"): f"bare CR in line {lines}",
                    (hub.pickup, "both"): "NUL byte at offset 160000",
                    (hub.replay, "long"): "header section exceeds 8192 bytes"}
        for (folder, stem), reason in expected.items():
            text = await wait_for(partial(bad_reason, folder, stem))
            assert text.split(" ", 1)[1] == reason + "\n", (stem, text)
        assert (hub.pickup / "cr.bad").read_bytes() == cr  # kept as it was
        assert spool_files(hub) == []
        assert not maildir(hub.root, "Bob")


@pytest.mark.timeout(60)
async def test_a_large_file_over_the_limit_once_crlf_gets_an_ndr_and_no_spool_file(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    base = pytest_plugin.BASE_ORG
    monkeypatch.setattr(pytest_plugin, "BASE_ORG", base.replace(
        "MaxRecipientEnvelopeLimit = 5000\n",
        "MaxRecipientEnvelopeLimit = 5000\nMaxReceiveSize = 300000\n"))
    monkeypatch.setattr(body_module, "SPOOL_THRESHOLD", 1024)
    monkeypatch.setattr(body_module, "CHUNK_SIZE", CHUNK)
    async with hub_factory() as hub:
        head = message(subject="grows", body="")
        hub.pickup.joinpath("grows.eml").write_bytes(head + b"y\n" * 140_000)  # 280 kB as LF
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        report: Any = read_mail(ndr[0])
        status = report.get_payload()[1].get_payload()[1]
        assert status["Diagnostic-Code"].startswith("smtp; 552 5.3.4 message size 42")
        assert report.get_payload()[2].get_content_type() == "text/rfc822-headers"
        assert not maildir(hub.root, "Bob")
        await emptied(hub.pickup)
        assert spool_files(hub) == []


@pytest.mark.timeout(60)
async def test_a_large_file_left_claimed_by_a_crash_is_streamed_at_start(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(body_module, "SPOOL_THRESHOLD", 1024)
    monkeypatch.setattr(body_module, "CHUNK_SIZE", CHUNK)
    async with hub_factory():
        pass  # creates the folders and the queue
    streamed: list[int] = []
    real = folders_module._take_spooled

    def counting(fd: int, limit: int, claimed: Any, folder: Path) -> Any:
        streamed.append(fd)
        return real(fd, limit, claimed, folder)

    monkeypatch.setattr(folders_module, "_take_spooled", counting)
    data = large_message(120_000, "left behind")
    work = tmp_path / "pickup" / ".work"
    (work / "PHUB01.17f0c0ffee-9~left.eml").write_bytes(data)
    async with hub_factory() as hub:
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        body = data.split(b"\n\n", 1)[1].replace(b"\r\n", b"\n")  # a Maildir keeps LF
        assert got[0].read_bytes().endswith(b"\n\n" + body)
        assert len(streamed) == 1
        await wait_for(lambda: os.listdir(work) == [])
