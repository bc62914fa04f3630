"""Pickup and Replay against real-world files and the organization's limits (issue 10).

- Real message files (the shared test corpus, see ``tests/support.py``): mbox ``From `` lines and a missing blank
  line after the header are repaired as Postfix's sendmail and cleanup repair them, the
  repair is recorded in the tracking log, and every other body byte arrives unchanged.
- The organization's MaxSendSize/MaxReceiveSize apply to folder files: an oversized file
  gets an NDR (552 5.3.4) to its sender, or ``.bad`` when nobody can be told, and its body
  is never read into memory.
- A batch holds a bounded number of message bytes; an NDR lists a bounded number of
  recipients.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

import hubport.core.folders as folders_module
from daemon_process import DaemonPool, daemon_pool
from hubport.plugins import pytest_plugin
from support import (
    CORPUS_DIR,
    drop_files,
    drop_in,
    events,
    maildir,
    message,
    read_mail,
    replay_file,
    wait_for,
    wait_for_sync,
    write_org,
)

HubFactory = Callable[..., Any]
CORPUS = sorted(CORPUS_DIR.glob("*.eml"))
MB = 1024 * 1024

# every external address goes to one Drop folder, so what Pickup and Replay took can be
# compared byte for byte with what was dropped
CORPUS_DROP = """
[[foreign_connector]]
Name = "Corpus"
AddressSpaces = ["SMTP:*;1"]
CreateDropDirectory = true
"""

# the five corpus files that begin with an mbox "From " line and the one whose header has
# no blank line after it (issue 10, finding 7)
MBOX_FROM = {"flanker__torture-part.eml", "mailman2__newmailru_01.eml",
             "mailman2__qmail_08.eml", "rustpython__msg_25.eml", "rustpython__msg_43.eml"}
NO_BLANK_LINE = {"cpython__msg_35.eml": b"counter to RFC 5322"}  # where its body starts

# what Exchange's Pickup rules make of the corpus files that give no usable envelope (none
# of them for a reason Postfix would repair): the reason in .bad.reason, or an NDR
PICKUP_REFUSED = {
    "cpython__msg_15.eml": "bad recipient address 'XX'",
    "flanker__attached-pdf.eml": "no sender",
    "flanker__enclosed-bad-encoding.eml": "not an RFC 5322 header line: line 1",
    "flanker__long-header.eml": "NDR",  # header over PickupDirectoryMaxHeaderSize
    "flanker__mailformed-headers.eml": "bad recipient address",
    "haraka__base64-root-part.eml": "no sender",
    "haraka__varied-fold-lengths-preserve-data.eml": "no sender",
    "php-imap__undisclosed_recipients.eml": "no recipient",
    "rustpython__msg_43.eml": "no sender",  # From: MAILER DAEMON <>, after the repair
    "rustpython__msg_47.eml": "no recipient",
}


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def expected_body(name: str, data: bytes) -> bytes:
    """The body the file's author meant, in LF form: after the first blank line, the mbox
    line aside; for the file without a blank line, from its first non-header line."""
    data = lf(data)
    if name in MBOX_FROM:
        assert data.startswith(b"From "), name
        data = data.split(b"\n", 1)[1]
    if name in NO_BLANK_LINE:
        return data[data.index(NO_BLANK_LINE[name]):]
    return data.split(b"\n\n", 1)[1] if b"\n\n" in data else b""


def dropped(root: Path) -> list[tuple[bytes, bytes]]:
    """(Replay header block, LF body) of each file in the Corpus drop folder."""
    out = []
    for path in drop_files(root / "drop" / "Corpus"):
        head, _, body = lf(path.read_bytes()).partition(b"\n\n")
        out.append((head, body))
    return out


def receivers(head: bytes) -> list[str]:
    return re.findall(rb"^X-Receiver: <([^>]*)>", head, re.MULTILINE)  # type: ignore[return-value]


def bad_reason(folder: Path, stem: str) -> str | None:
    reason = folder / f"{stem}.bad.reason"
    return reason.read_text() if reason.exists() and (folder / f"{stem}.bad").exists() else None


# -- real files (finding 7) ---------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_every_corpus_file_through_replay_arrives_with_its_body_unchanged(
        hub_factory: HubFactory) -> None:
    assert len(CORPUS) == 50
    async with hub_factory(extra=CORPUS_DROP) as hub:
        for index, path in enumerate(CORPUS):
            drop_in(hub.replay, path.name, replay_file(
                "alice@contoso.test", [f"r{index}@corpus.test"], path.read_bytes()))
        got = await wait_for(lambda: len(dropped(hub.root)) >= len(CORPUS) and
                             dropped(hub.root), timeout=60)
        by_receiver = {}
        for head, body in got:
            (receiver,) = receivers(head)
            by_receiver[receiver.decode()] = body
        assert sorted(by_receiver) == sorted(f"r{i}@corpus.test" for i in range(len(CORPUS)))
        wrong = [path.name for index, path in enumerate(CORPUS)
                 if by_receiver[f"r{index}@corpus.test"]
                 != expected_body(path.name, path.read_bytes())]
        assert wrong == []
        assert sorted(os.listdir(hub.replay)) == [".work"]  # nothing moved aside
        received = await wait_for(lambda: len(events(hub.root, event_id="RECEIVE")) >= 50
                                  and events(hub.root, event_id="RECEIVE"))
        context = {e["recipient-address"][0]: e["source-context"] for e in received}
        for index, path in enumerate(CORPUS):
            text = context[f"r{index}@corpus.test"]
            assert text.endswith(f"file={path.name}"), text
            if path.name in MBOX_FROM:
                assert text.startswith('repaired=removed 1 mbox "From " line;'), text
            elif path.name in NO_BLANK_LINE:
                # line 4 of the message is line 6 of the file (after X-Sender, X-Receiver)
                assert text.startswith("repaired=inserted the missing blank line after the"
                                       " header (before line 6);"), text
            else:
                assert "repaired" not in text, (path.name, text)


@pytest.mark.timeout(90)
async def test_every_corpus_file_through_pickup_arrives_or_gets_the_exchange_outcome(
        hub_factory: HubFactory) -> None:
    async with hub_factory(extra=CORPUS_DROP) as hub:
        for path in CORPUS:
            drop_in(hub.pickup, path.name, path.read_bytes())
        taken = [p for p in CORPUS if p.name not in PICKUP_REFUSED]
        assert {p.name for p in taken} >= MBOX_FROM - {"rustpython__msg_43.eml"} | {
            "cpython__msg_35.eml"}

        def messages() -> list[tuple[bytes, bytes]]:  # the NDRs (X-Sender: <>) aside
            return [(h, b) for h, b in dropped(hub.root) if not h.startswith(b"X-Sender: <>")]

        got = await wait_for(lambda: len(messages()) >= len(taken) and messages(), timeout=60)
        bodies = [body for _, body in got]
        missing = []
        for path in taken:
            body = expected_body(path.name, path.read_bytes())
            if body in bodies:
                bodies.remove(body)
            else:
                missing.append(path.name)
        assert missing == [] and bodies == []
        for name, outcome in PICKUP_REFUSED.items():
            if outcome != "NDR":
                text = await wait_for(lambda n=name: bad_reason(hub.pickup, n[:-4]))
                assert outcome in text, (name, text)
        ndr = await wait_for(lambda: [h for h, _ in dropped(hub.root)
                                      if h.startswith(b"X-Sender: <>")])
        assert len(ndr) == 1  # flanker__long-header's, to its external sender
        received = await wait_for(lambda: len(events(hub.root, event_id="RECEIVE"))
                                  == len(taken) + 1 and events(hub.root, event_id="RECEIVE"))
        repaired = sorted(e["source-context"].rsplit("file=", 1)[1] for e in received
                          if e["source-context"].startswith("repaired="))
        assert repaired == sorted(MBOX_FROM - {"rustpython__msg_43.eml"}
                                  | set(NO_BLANK_LINE))


# -- the organization's size limits (findings 8 and 9) -----------------------------------------


def limited_org(limit: str = '"1MB"', send: str | None = None) -> str:
    """BASE_ORG with MaxReceiveSize (and MaxSendSize) set in its transport_config."""
    settings = f"MaxReceiveSize = {limit}\n"
    if send is not None:
        settings += f"MaxSendSize = {send}\n"
    base = pytest_plugin.BASE_ORG
    assert "MaxRecipientEnvelopeLimit = 5000\n" in base
    return base.replace("MaxRecipientEnvelopeLimit = 5000\n",
                        "MaxRecipientEnvelopeLimit = 5000\n" + settings)


def big_message(size: int, sender: str = "alice@contoso.test", subject: str = "big",
                extra: str = "") -> bytes:
    head = message(sender=sender, subject=subject, body="", extra=extra)
    line = b"x" * 99 + b"\n"
    return head + line * ((size - len(head)) // len(line) + 1)


def ndr_blocks(path: Path) -> tuple[Any, list[dict[str, str]]]:
    report = message_from_bytes(path.read_bytes())
    assert report.get_content_type() == "multipart/report"
    status = report.get_payload()[1].get_payload()
    return report, [{k.lower(): v for k, v in block.items()} for block in status[1:]]


async def test_oversized_pickup_and_replay_files_get_an_ndr_with_5_3_4(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pytest_plugin, "BASE_ORG", limited_org('"1MB"', send='"unlimited"'))
    async with hub_factory() as hub:
        assert hub.daemon.folders[0].size_limit() == MB
        drop_in(hub.pickup, "big.eml", big_message(2 * MB, subject="big pickup"))
        drop_in(hub.replay, "big.eml", replay_file(
            "alice@contoso.test", ["bob@contoso.test", "staff@contoso.test"],
            big_message(2 * MB, subject="big replay")))
        # 1,000,000 bytes as LF, about 1,010,000 as CRLF: under the limit either way
        drop_in(hub.pickup, "small.eml", big_message(1_000_000, subject="just under"))
        ndrs = await wait_for(lambda: len(maildir(hub.root, "Alice")) >= 2
                              and maildir(hub.root, "Alice"))
        subjects = sorted(read_mail(p)["Subject"] for p in ndrs)
        assert subjects == ["Undeliverable: big pickup", "Undeliverable: big replay"]
        for path in ndrs:
            report, blocks = ndr_blocks(path)
            assert {b["status"] for b in blocks} == {"5.3.4"}
            assert all(b["diagnostic-code"].startswith("smtp; 552 5.3.4 message size ")
                       for b in blocks)
            returned = report.get_payload()[2]
            assert returned.get_content_type() == "text/rfc822-headers"  # never the body
            assert len(path.read_bytes()) < 64 * 1024
            if "replay" in report["Subject"]:
                assert sorted(b["final-recipient"] for b in blocks) == [
                    "rfc822;bob@contoso.test", "rfc822;staff@contoso.test"]
            else:
                assert [b["final-recipient"] for b in blocks] == ["rfc822;bob@contoso.test"]
        delivered = await wait_for(lambda: maildir(hub.root, "Bob"))
        assert [read_mail(p)["Subject"] for p in delivered] == ["just under"]
        # consumed once the NDR was committed: not .bad, not left behind
        await wait_for(lambda: sorted(os.listdir(hub.pickup)) == [".work"]
                       and sorted(os.listdir(hub.replay)) == [".work"])
        receive = await wait_for(lambda: len(events(hub.root, event_id="RECEIVE")) == 3
                                 and events(hub.root, event_id="RECEIVE"))
        refused = [e for e in receive if e["recipient-status"]]
        assert len(refused) == 2
        assert all(s.startswith("552 5.3.4") for e in refused for s in e["recipient-status"])
        # each refusal is tracked from where the file came in: its FAIL events carry the
        # source of its RECEIVE (PICKUP, or ADMIN for Replay as in Exchange)
        fails = await wait_for(lambda: len(events(hub.root, event_id="FAIL")) == 3
                               and events(hub.root, event_id="FAIL"))
        sources = sorted((e["message-subject"], e["event-id"], e["source"])
                         for e in refused + fails)
        assert sources == [
            ("big pickup", "FAIL", "PICKUP"), ("big pickup", "RECEIVE", "PICKUP"),
            ("big replay", "FAIL", "ADMIN"), ("big replay", "FAIL", "ADMIN"),
            ("big replay", "RECEIVE", "ADMIN")], sources
        assert not events(hub.root, event_id="BADMAIL")


async def test_oversized_file_without_a_sender_to_notify_is_bad(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pytest_plugin, "BASE_ORG", limited_org('"1MB"'))
    async with hub_factory() as hub:
        data = big_message(2 * MB)
        no_from = data.replace(b"From: alice@contoso.test\n", b"")
        drop_in(hub.pickup, "nofrom.eml", no_from)
        null = replay_file("", ["bob@contoso.test"], data)
        drop_in(hub.replay, "null.eml", null)
        for folder, stem, why in ((hub.pickup, "nofrom", "no sender"),
                                  (hub.replay, "null", "the null sender cannot be notified")):
            text = await wait_for(lambda f=folder, s=stem: bad_reason(f, s))
            assert "message size" in text and "limit of 1048576 bytes" in text, text
            assert why in text, text
        assert (hub.pickup / "nofrom.bad").read_bytes() == no_from  # kept as it was
        assert (hub.replay / "null.bad").read_bytes() == null
        await wait_for(lambda: len(events(hub.root, event_id="BADMAIL")) == 2)
        assert not maildir(hub.root, "Bob") and not maildir(hub.root, "Alice")


async def test_lf_file_that_grows_over_the_limit_as_crlf_is_refused(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file fits, the stored message (CRLF) does not: the limit is on the message."""
    monkeypatch.setattr(pytest_plugin, "BASE_ORG", limited_org("1000000"))
    async with hub_factory() as hub:
        head = message(subject="grows", body="")
        lines = b"y\n" * ((990_000 - len(head)) // 2)  # 990 kB as LF, ~1.5 MB as CRLF
        drop_in(hub.pickup, "grows.eml", head + lines)
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        _, blocks = ndr_blocks(ndr[0])
        assert [b["status"] for b in blocks] == ["5.3.4"]
        assert not maildir(hub.root, "Bob")


def test_size_limit_is_the_smaller_organization_limit(tmp_path: Path) -> None:
    from hubport.core.daemon import load, make_hooks

    cases = [('"2MB"', '"3MB"', 2 * MB), ('"unlimited"', '"3MB"', 3 * MB),
             ('"unlimited"', '"unlimited"', folders_module.MAX_FILE_SIZE)]
    for receive, send, expected in cases:
        path = tmp_path / "org.toml"
        path.write_text(limited_org(receive, send).format(server_extra="", foreign_extra="",
                                                          extra=""))
        org = load(path, make_hooks(path))
        pipeline = type("P", (), {"org": org})()
        folder = folders_module.PickupDirectory(tmp_path / "pickup", pipeline)  # type: ignore[arg-type]
        assert folder.size_limit() == expected, (receive, send)


async def test_oversized_file_left_claimed_by_a_crash_gets_its_ndr(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Recovery at start reads what a crash left in ``.work`` under the same bounds."""
    monkeypatch.setattr(pytest_plugin, "BASE_ORG", limited_org('"1MB"'))
    async with hub_factory():
        pass  # creates the folders and the queue
    work = tmp_path / "pickup" / ".work"
    (work / "PHUB01.17f0c0ffee-9~big.eml").write_bytes(big_message(2 * MB, subject="left"))
    (work / "PHUB01.17f0c0ffee-10~small.eml").write_bytes(message(subject="left small"))
    async with hub_factory() as hub:
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        _, blocks = ndr_blocks(ndr[0])
        assert [b["status"] for b in blocks] == ["5.3.4"]
        got = await wait_for(lambda: maildir(hub.root, "Bob"))
        assert [read_mail(p)["Subject"] for p in got] == ["left small"]
        await wait_for(lambda: os.listdir(work) == [])


def test_a_file_that_grows_after_its_size_was_taken_is_not_read_past_the_limit(
        tmp_path: Path) -> None:
    path = tmp_path / "growing.eml"
    path.write_bytes(message(subject="small at first"))
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with open(path, "ab") as fh:  # a writer that ignored the rules appends 3 MB
            fh.write(b"z" * 3 * MB)
        claimed = folders_module._take(fd, size, MB, folders_module.Claimed("k", b"w", b"o"))
    finally:
        os.close(fd)
    assert claimed.oversize is not None and claimed.oversize >= 3 * MB
    assert claimed.data is not None and len(claimed.data) == folders_module.HEAD_LIMIT


async def test_a_batch_holds_a_bounded_number_of_bytes(
        hub_factory: HubFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """40 files of 30 kB with a 100 kB budget: every batch holds at most 100 kB (a file
    that does not fit waits for the next batch), and every file arrives exactly once."""
    monkeypatch.setattr(folders_module, "BATCH_BYTES", 100_000)
    held: list[int] = []
    real = folders_module.PickupDirectory._parse_all

    def counting(self: Any, claimed: list[Any]) -> None:
        held.append(sum(len(c.data or b"") for c in claimed))
        real(self, claimed)

    monkeypatch.setattr(folders_module.PickupDirectory, "_parse_all", counting)
    async with hub_factory() as hub:
        for folder in hub.daemon.folders:
            folder._next_scan = float("inf")  # one burst of events, no rescans
        staging = hub.root / "staging"
        staging.mkdir()
        for i in range(40):
            (staging / f"m{i:02d}.eml").write_bytes(
                big_message(30_000, subject=f"part {i}", extra=f"Message-ID: <p{i}@x>\n"))
        for i in range(40):
            os.rename(staging / f"m{i:02d}.eml", hub.pickup / f"m{i:02d}.eml")
        got = await wait_for(lambda: len(maildir(hub.root, "Bob")) >= 40
                             and maildir(hub.root, "Bob"), timeout=30)
        assert sorted(read_mail(p)["Subject"] for p in got) == sorted(
            f"part {i}" for i in range(40))
        assert max(held) <= 100_000, held
        assert len(held) >= 12  # 40 x 30 kB in batches of at most three
        await wait_for(lambda: sorted(os.listdir(hub.pickup)) == [".work"])


# -- memory: an oversized file is never read (finding 9) ----------------------------------------


def vm_hwm(pid: int) -> int:
    """Peak resident memory of a process in bytes (VmHWM in /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


@pytest.mark.timeout(90)
def test_oversized_files_are_refused_without_reading_them(
        tmp_path: Path, pool: DaemonPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 30 MB file in each folder against a 1 MB limit: NDRs, and the daemon's peak memory
    grows by far less than one file (before: the file was read whole, twice over)."""
    monkeypatch.setattr(pytest_plugin, "BASE_ORG", limited_org('"1MB"'))
    config = write_org(tmp_path)
    daemon = pool.start(config=config)
    daemon.wait_ready()

    def ndrs() -> int:
        return len(maildir(tmp_path, "Alice"))

    # warm up the NDR path (imports, caches, the queue database) with small oversized files
    drop_in(tmp_path / "pickup", "warm.eml", big_message(2 * MB, subject="warm pickup"))
    drop_in(tmp_path / "replay", "warm.eml", replay_file(
        "alice@contoso.test", ["bob@contoso.test"], big_message(2 * MB, subject="warm")))
    wait_for_sync(lambda: ndrs() == 2, timeout=30)
    before = vm_hwm(daemon.pid)
    size = 30 * MB
    drop_in(tmp_path / "pickup", "huge.eml", big_message(size, subject="huge pickup"))
    drop_in(tmp_path / "replay", "huge.eml", replay_file(
        "alice@contoso.test", ["bob@contoso.test"], big_message(size, subject="huge")))
    wait_for_sync(lambda: ndrs() == 4, timeout=30)
    grown = vm_hwm(daemon.pid) - before
    assert grown < size // 4, f"peak memory grew by {grown} bytes for two {size}-byte files"
    wait_for_sync(lambda: sorted(os.listdir(tmp_path / "pickup")) == [".work"]
                  and sorted(os.listdir(tmp_path / "replay")) == [".work"])
    assert not maildir(tmp_path, "Bob")


# -- one recipient cap for every NDR (finding 11a) ---------------------------------------------


@pytest.mark.timeout(90)
async def test_ndr_for_a_10000_recipient_replay_file_lists_at_most_100(
        hub_factory: HubFactory) -> None:
    recipients = [f"user{i}@contoso.test" for i in range(10_000)]
    async with hub_factory() as hub:  # MaxRecipientEnvelopeLimit 5000: all are refused
        drop_in(hub.replay, "many.eml", replay_file("alice@contoso.test", recipients,
                                                     message(subject="to everyone")))
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"), timeout=60)
        size = len(ndr[0].read_bytes())
        report, blocks = ndr_blocks(ndr[0])
        assert len(blocks) == 100 and size < 100_000, (len(blocks), size)
        assert {b["status"] for b in blocks} == {"5.5.3"}
        assert blocks[0]["final-recipient"] == "rfc822;user0@contoso.test"
        text = report.get_payload()[0].get_payload(decode=True).decode()
        assert "10,000 recipients and lists the first 100; the other 9,900" in " ".join(
            text.split())


async def test_ndr_for_a_pickup_file_over_its_recipient_limit_uses_the_same_cap(
        hub_factory: HubFactory) -> None:
    to = ", ".join(f"user{i}@contoso.test" for i in range(150))
    async with hub_factory() as hub:  # PickupDirectoryMaxRecipientsPerMessage: 100
        drop_in(hub.pickup, "many.eml", message(to=to, subject="150"))
        ndr = await wait_for(lambda: maildir(hub.root, "Alice"))
        report, blocks = ndr_blocks(ndr[0])
        assert len(blocks) == 100 and {b["status"] for b in blocks} == {"5.5.3"}
        text = report.get_payload()[0].get_payload(decode=True).decode()
        assert "150 recipients and lists the first 100; the other 50" in " ".join(text.split())
        failed = await wait_for(lambda: len(events(hub.root, event_id="FAIL")) == 150
                                and events(hub.root, event_id="FAIL"))
        assert len({e["recipient-address"][0] for e in failed}) == 150  # every one tracked
