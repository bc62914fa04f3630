"""The message tracking log after a crash: every committed message keeps its events.

A tracking event is committed in the queue transaction it describes (the outbox of
``hubport.core.tracking``) and copied to the MSGTRK files afterwards. These tests SIGKILL the real
daemon at the exact steps where a buffered log used to lose events (``hubport.core.failpoints``):
right after a submission commit, right after a delivery commit, in the middle of the copy to
the files, and after the copy but before the outbox is trimmed. After a restart every message
must have its RECEIVE once and, per recipient, its DELIVER once; no event is written twice.
The first tests drive ``TrackingLog`` directly against a real queue database.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import smtplib
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from daemon_process import Daemon, DaemonPool, daemon_pool, hubport, queue_counts
from hubport.core import queue as q
from hubport.core.store import Store
from hubport.core.tracking import TrackingLog, TrackingSettings, search
from smtp_support import Client, free_port, receive_connector
from support import drop_in, message, write_org

FAX = "IMCEAFAX-+2B15550001@contoso.test"
#: Maildir only, two mailboxes (one message, one queue), and the Foreign connector's drop
MIXES: tuple[tuple[str, ...], ...] = (
    ("bob@contoso.test",), ("alice@contoso.test", "bob@contoso.test"), (FAX,),
)
# The kills are not the messages' fault: poison detection stays out of their reach.
CRASH_SERVER = "PoisonThreshold = 10"
T0 = 1_767_268_800.0  # 2026-01-01T12:00:00Z


# -- TrackingLog and its outbox, in-process -----------------------------------------------


async def open_store(path: Path) -> Store:
    store = Store(path)
    await store.open(q.SCHEMA)
    return store


def tracker(path: Path) -> TrackingLog:
    return TrackingLog(TrackingSettings(path=path), "hub1.example.test")


async def commit_events(store: Store, log: TrackingLog, names: list[str],
                        when: float = T0) -> None:
    """One RECEIVE per name, each committed in a transaction of its own (no flush)."""
    for i, name in enumerate(names):
        await store.write(lambda c, n=name, i=i: log.log(
            "RECEIVE", "SMTP", message_id=n, conn=c, when=when + i))


async def close(log: TrackingLog) -> None:
    await asyncio.to_thread(log.close)


def tracked(path: Path) -> list[str]:
    return [e["message-id"] for e in search(path, result_size=None)]


def outbox_rows(store_path: Path) -> int:
    conn = sqlite3.connect(store_path)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM tracking_outbox").fetchone()[0])
    finally:
        conn.close()


async def test_outbox_left_by_a_crash_is_written_once(tmp_path: Path) -> None:
    """Rows copied but not trimmed are not copied again; rows never copied are."""
    db, logs = tmp_path / "mail.que", tmp_path / "logs"
    store = await open_store(db)
    first = tracker(logs)
    await first.attach(store)
    await commit_events(store, first, ["a1", "a2", "a3"])
    first.flush()  # copied and fsynced; the trim that follows never happens (a crash)
    await commit_events(store, first, ["b1", "b2"], when=T0 + 10)  # committed, never copied
    assert tracked(logs) == ["a1", "a2", "a3"]
    assert outbox_rows(db) == 5
    # the crash: this TrackingLog is abandoned as is, without close()

    second = tracker(logs)
    await second.attach(store)
    assert tracked(logs) == ["a1", "a2", "a3", "b1", "b2"]
    assert outbox_rows(db) == 0  # trimmed once on disk
    numbers = [e["sequence-number"] for e in search(logs, result_size=None)]
    assert numbers == sorted(numbers) and len(set(numbers)) == 5
    await commit_events(store, second, ["c1"], when=T0 + 20)
    await close(second)
    assert tracked(logs) == ["a1", "a2", "a3", "b1", "b2", "c1"]
    await store.close()


async def test_torn_last_line_is_ended_and_skipped(tmp_path: Path) -> None:
    """A line cut short (power loss) stays one malformed line; the next event starts fresh,
    and the cut event, still in the outbox, is written again whole."""
    db, logs = tmp_path / "mail.que", tmp_path / "logs"
    store = await open_store(db)
    first = tracker(logs)
    await first.attach(store)
    await commit_events(store, first, ["a1", "a2"])
    first.flush()
    [file] = logs.iterdir()
    whole = file.read_bytes()
    file.write_bytes(whole[: whole.rindex(b"a2") + 5])  # a2's line loses its end
    assert tracked(logs) == ["a1"]

    second = tracker(logs)
    await second.attach(store)
    await commit_events(store, second, ["b1"], when=T0 + 10)
    await close(second)
    assert tracked(logs) == ["a1", "a2", "b1"]
    assert len(file.read_bytes().splitlines()) == 5 + 4  # header, a1, torn a2, a2, b1
    await store.close()


async def test_a_new_queue_database_numbers_above_the_old_one(tmp_path: Path) -> None:
    """A queue database created afresh (deleted, restored) must not take its first events for
    ones already in the log: its numbers start above the old database's."""
    logs = tmp_path / "logs"
    store = await open_store(tmp_path / "old.que")
    first = tracker(logs)
    await first.attach(store)
    await commit_events(store, first, ["old1", "old2"])
    await close(first)
    await store.close()

    store = await open_store(tmp_path / "new.que")
    second = tracker(logs)
    await second.attach(store)
    await commit_events(store, second, ["new1"], when=T0 + 5)  # then a crash: never copied
    third = tracker(logs)
    await third.attach(store)
    await close(third)
    assert tracked(logs) == ["old1", "old2", "new1"]
    await store.close()


async def test_an_unencodable_event_never_undoes_the_queue_change(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "mail.que")
    log = tracker(tmp_path / "logs")
    await log.attach(store)
    circular: dict[str, Any] = {}
    circular["self"] = circular

    def work(conn: Any) -> int:
        log.log("AGENTINFO", "AGENT", custom_data=circular, conn=conn)
        return int(conn.execute("SELECT 7").fetchone()[0])

    assert await store.write(work) == 7
    assert log.dropped == 1
    await close(log)
    await store.close()


# -- the real daemon, killed at the steps that matter --------------------------------------


def ledger(count: int) -> dict[str, tuple[str, ...]]:
    """Message-ID (without brackets) -> envelope recipients."""
    return {f"trk-{n:04d}@harness.test": MIXES[n % len(MIXES)] for n in range(count)}


def drop_files(root: Path, sent: dict[str, tuple[str, ...]], names: list[str]) -> None:
    for mid in names:
        rcpts = sent[mid]
        drop_in(root / "pickup", f"{mid.split('@')[0]}.eml",
                message(to=", ".join(rcpts), subject=f"tracked {mid}", message_id=f"<{mid}>"))


def copies(root: Path) -> int:
    """Delivered copies: Maildir files of both mailboxes and drop files of the Fax Gateway."""
    found = 0
    for alias in ("Alice", "Bob"):
        new = root / "var" / "mailboxes" / alias / "new"
        found += len(os.listdir(new)) if new.is_dir() else 0
    drop = root / "drop" / "Fax Gateway"
    found += len(list(drop.glob("*.eml"))) if drop.is_dir() else 0
    return found


def drained(root: Path, daemon: Daemon, expected: int, timeout: float = 60.0) -> None:
    """Wait until every copy arrived and the queue is empty; say what was seen last."""
    deadline = time.monotonic() + timeout
    seen: tuple[int, Any] = (0, None)
    while True:
        assert daemon.alive(), f"daemon died while draining:\n{daemon.log_text()[-4000:]}"
        seen = (copies(root), queue_counts(root / "var" / "queue" / "mail.que"))
        if seen[0] == expected and seen[1] is not None and seen[1]["total"] == 0 \
                and not list((root / "pickup").glob("*.eml")):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not drained within {timeout}s: copies/queue {seen},"
                                 f" expected {expected} copies")
        time.sleep(0.1)


def stop(daemon: Daemon) -> None:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0


def killed(daemon: Daemon, failpoint: str) -> None:
    try:
        code = daemon.wait(30)
    except Exception:
        raise AssertionError(f"failpoint {failpoint} never fired:\n"
                             f"{daemon.log_text()[-4000:]}") from None
    assert code == -signal.SIGKILL, code


def tracking_problems(root: Path, sent: dict[str, tuple[str, ...]]) -> list[str]:
    """What the tracking log gets wrong about ``sent``: a RECEIVE not exactly once, a
    recipient's DELIVER not exactly once, a sequence number written twice."""
    receive: Counter[str] = Counter()
    deliver: Counter[tuple[str, str]] = Counter()
    numbers: Counter[int] = Counter()
    for e in search(root / "var" / "logs" / "MessageTracking", result_size=None):
        mid = str(e.get("message-id", "")).strip("<>")
        if e.get("sequence-number") is not None:
            numbers[e["sequence-number"]] += 1
        if e["event-id"] == "RECEIVE":
            receive[mid] += 1
        elif e["event-id"] == "DELIVER":
            for rcpt in e["recipient-address"]:
                deliver[(mid, rcpt.casefold())] += 1
    problems = [f"{mid}: RECEIVE x{receive[mid]}" for mid in sent if receive[mid] != 1]
    problems += [f"{mid} -> {r}: DELIVER x{deliver[(mid, r.casefold())]}"
                 for mid, rcpts in sent.items() for r in rcpts
                 if deliver[(mid, r.casefold())] != 1]
    problems += [f"sequence-number {n} written {k} times" for n, k in numbers.items() if k > 1]
    return problems


@pytest.fixture
def pool(tmp_path: Path) -> Any:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


KILLS = [
    # the submissions of a Pickup batch are committed: their RECEIVE events were in memory
    pytest.param("after_commit_before_unlink", id="after-submission-commit"),
    # a delivery batch's results are committed: its DELIVER events were in memory
    pytest.param("after_delivery_commit", id="after-delivery-commit"),
    # the flusher has read committed events and not written them yet
    pytest.param("tracking_before_write", id="before-log-write"),
    # the flusher has written and fsynced them; the outbox still holds them (no duplicates)
    pytest.param("tracking_after_write", id="after-log-write-before-trim"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("failpoint", KILLS)
def test_kill_after_commit_keeps_every_tracking_event_exactly_once(
        tmp_path: Path, pool: DaemonPool, failpoint: str) -> None:
    sent = ledger(24)
    names = list(sent)
    config = write_org(tmp_path, server_extra=CRASH_SERVER)
    daemon = pool.start(config=config, failpoints=f"{failpoint}:kill:2")
    daemon.wait_ready()
    drop_files(tmp_path, sent, names[:12])  # the first batches get through ...
    time.sleep(0.6)
    drop_files(tmp_path, sent, names[12:])  # ... and a later step dies
    killed(daemon, failpoint)

    survivor = pool.start(config=config)
    survivor.wait_ready()
    drained(tmp_path, survivor, sum(len(r) for r in sent.values()))
    stop(survivor)
    assert tracking_problems(tmp_path, sent) == []


@pytest.mark.timeout(120)
def test_smtp_messages_committed_before_a_kill_are_tracked(tmp_path: Path,
                                                           pool: DaemonPool) -> None:
    """Killed right after the 5th SMTP message is committed, before its 250: that one and
    every acknowledged one have their RECEIVE and DELIVER; Get-MessageTrackingLog finds them."""
    port = free_port()
    config = write_org(tmp_path, server_extra=CRASH_SERVER, extra=receive_connector(
        "Internet", [f"127.0.0.1:{port}"], PermissionGroups=["AnonymousUsers"]))
    daemon = pool.start(config=config, failpoints="after_submit_commit:kill:5")
    daemon.wait_ready()
    sent = {f"smtp-{n:02d}@harness.test": ("bob@contoso.test",) for n in range(10)}
    names = list(sent)
    acknowledged = send_until_cut(port, names)
    assert len(acknowledged) == 4, acknowledged
    killed(daemon, "after_submit_commit")

    survivor = pool.start(config=config)
    survivor.wait_ready()
    assert send_until_cut(port, names[5:]) == names[5:]
    drained(tmp_path, survivor, len(sent))  # the 5th was committed: it is delivered too
    stop(survivor)
    assert tracking_problems(tmp_path, sent) == []

    shown = hubport("get-messagetrackinglog", "--config", str(config), "-eventid", "RECEIVE",
                    "-resultsize", "unlimited", "--format", "json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    rows = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
    assert sorted(r["message-id"].strip("<>") for r in rows) == sorted(sent)
    assert all(r["source"] == "SMTP" for r in rows)


def send_until_cut(port: int, names: list[str]) -> list[str]:
    """Send one message per name on one SMTP session; the names acknowledged with 250."""
    done: list[str] = []
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            for mid in names:
                data = message(sender="someone@example.org", subject=f"tracked {mid}",
                               message_id=f"<{mid}>").replace(b"\n", b"\r\n")
                client.sendmail("someone@example.org", ["bob@contoso.test"], data)
                done.append(mid)
    except (smtplib.SMTPException, OSError):
        pass  # the daemon died mid-transaction
    return done


# -- the receive protocol log at a clean stop -----------------------------------------------


def recv_lines(root: Path) -> list[list[str]]:
    """The RECV protocol log's records (CSV fields), headers left out."""
    folder = root / "var" / "logs" / "ProtocolLog" / "SmtpReceive"
    rows: list[list[str]] = []
    for path in sorted(folder.glob("RECV*.log")):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                rows.append(next(csv.reader([line])))
    return rows


async def test_clean_stop_writes_the_whole_receive_protocol_log(hub_factory: Any) -> None:
    """SIGTERM with a client still connected: the log has its queued 250, the 421 of the
    stop and the disconnection, the last records of every session (they come after the
    listeners close, and used to be dropped)."""
    port = free_port()
    extra = receive_connector("Internet", [f"127.0.0.1:{port}"],
                              PermissionGroups=["AnonymousUsers"], ProtocolLoggingLevel="Verbose")
    async with hub_factory(extra=extra) as hub:
        client = await Client.connect(port)
        assert (await client.hello()).code == 250
        data = message(sender="someone@example.org", subject="logged").replace(b"\n", b"\r\n")
        queued = await client.transaction("someone@example.org", ["bob@contoso.test"], data)
        assert queued.code == 250, queued
    assert await client.closed()
    await client.close()
    rows = recv_lines(hub.root)
    events = [(row[6], row[7]) for row in rows]
    assert ("+", "") == events[0]
    assert any(e == ">" and d.startswith("250") and "Queued" in d for e, d in events), events
    assert any(e == ">" and d.startswith("421") for e, d in events), events
    assert events[-1][0] == "-", events

