"""Crash tests: SIGKILL the real daemon while mail flows, then prove nothing was lost,
nothing was delivered twice and every body arrived byte for byte (docs/reliability.md, Crash soak).

The harness keeps its own ledger of every file it handed to Pickup or Replay (each with a
unique Message-ID and a random body); after the last daemon has drained, ``check_exactly_once``
reads the destinations (the Maildirs, the Foreign connector's drop folder) and counts, per
(destination, Message-ID), how often it arrived (``tests/ledger.py``, shared with the crash
soak ``tests/soak.py``). The failpoint tests kill at the exact steps
of the folder-claim and drop-write protocols (``hubport.core.failpoints``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemon_process import Daemon, DaemonPool, daemon_pool, hubport, queue_counts
from ledger import (
    Key,
    Report,
    Seen,
    folders_empty,
    leftover_files,
    listing,
    observed_files,
    random_body,
    recovery_counts,
    tally,
)
from support import drop_in, replay_file, write_org

#: HUBPORT_CRASH_SEED replays another schedule (the summary line prints the seed used)
SEED = int(os.environ.get("HUBPORT_CRASH_SEED", "20260515"))
FILES = 600
KILLS = 16
SENDER = "alice@contoso.test"
MAILBOXES = {"alice@contoso.test": "Alice", "bob@contoso.test": "Bob"}
FAX_1 = "IMCEAFAX-+2B15550001@contoso.test"
FAX_2 = "IMCEAFAX-+2B15550002@contoso.test"
#: recipient mixes: Maildir only, drop folder only, and both (the message bifurcates)
MIXES: tuple[tuple[str, ...], ...] = (
    ("alice@contoso.test",), ("bob@contoso.test",), ("alice@contoso.test", "bob@contoso.test"),
    (FAX_1,), (FAX_1, FAX_2), ("bob@contoso.test", FAX_1),
    ("alice@contoso.test", "bob@contoso.test", FAX_2),
)
MAILDIR_ONLY = MIXES[:3]
DROP_ONLY = MIXES[3:5]
# Random kills are not the message's fault: keep poison detection on, but out of their reach.
CRASH_SERVER = "PoisonThreshold = 10"


# -- the ledger: what the harness dropped ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """One file handed to a folder: its Message-ID, envelope recipients and body (LF)."""

    message_id: str
    folder: str  # "pickup" or "replay"
    recipients: tuple[str, ...]
    body: bytes

    def file_bytes(self) -> bytes:
        head = (f"From: Alice <{SENDER}>\nSubject: crash test {self.message_id}\n"
                f"Date: Fri, 15 May 2026 10:00:00 +0000\nMessage-ID: {self.message_id}\n")
        if self.folder == "pickup":
            return (head + f"To: {', '.join(self.recipients)}\n\n").encode() + self.body
        content = (head + "To: Undisclosed recipients:;\n\n").encode() + self.body
        return replay_file(SENDER, list(self.recipients), content)

    def destinations(self) -> list[tuple[str, str]]:
        return [("maildir", MAILBOXES[r]) if r in MAILBOXES else ("drop", r.lower())
                for r in self.recipients]


def make_ledger(rng: random.Random, count: int, mixes: tuple[tuple[str, ...], ...] = MIXES,
                tag: str = "crash") -> list[Sent]:
    return [Sent(f"<{tag}-{n:04d}.{rng.getrandbits(32):08x}@harness.test>",
                 "pickup" if n % 2 == 0 else "replay", rng.choice(mixes), random_body(rng, n))
            for n in range(count)]


def drop_file(root: Path, sent: Sent, index: int) -> None:
    """Temp name the daemon ignores, then rename in: what a well-behaved producer does."""
    drop_in(root / sent.folder, f"m{index:04d}.eml", sent.file_bytes())


# -- the checker ---------------------------------------------------------------------------

DROP_FOLDER = ("drop", "Fax Gateway")


def observed_deliveries(root: Path) -> tuple[Seen, list[str]]:
    """Every delivered copy: (kind, destination, Message-ID) → bodies; and unreadable files."""
    return observed_files(root, MAILBOXES.values(), root.joinpath(*DROP_FOLDER))


def check_exactly_once(root: Path, ledger: list[Sent]) -> Report:
    """Compare the destinations with the ledger: each (destination, Message-ID) exactly once,
    nothing else, every body byte-identical; no bad files, no temporary files left behind."""
    report = Report()
    seen, unreadable = observed_deliveries(root)
    report.phantoms.extend(unreadable)
    expected: dict[Key, bytes] = {}
    for sent in ledger:
        for kind, dest in sent.destinations():
            body = sent.body if kind == "maildir" else sent.body.replace(b"\n", b"\r\n")
            expected[(kind, dest, sent.message_id)] = body
    tally(expected, seen, report=report)
    report.bad_files, report.leftovers = leftover_files(
        root, MAILBOXES.values(), root.joinpath(*DROP_FOLDER))
    return report


# -- draining -----------------------------------------------------------------------------


def drain(root: Path, daemon: Daemon, timeout: float = 60.0) -> None:
    """Wait until every file is taken and the queue is empty; fail fast on Poison."""
    db = root / "var" / "queue" / "mail.que"
    deadline = time.monotonic() + timeout
    while True:
        assert daemon.alive(), f"daemon died while draining:\n{daemon.log_text()[-4000:]}"
        counts = queue_counts(db)
        if counts is not None:
            assert counts["poison"] == 0, f"{counts['poison']} messages went to Poison"
            if counts["total"] == 0 and folders_empty(root):
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"not drained within {timeout}s: queue {counts}, "
                                 f"folders empty {folders_empty(root)}")
        time.sleep(0.1)


def queues_listed(root: Path) -> list[dict[str, object]]:
    done = hubport("get-queue", "--config", str(root / "org.toml"), "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


def stop(daemon: Daemon) -> None:
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


# -- random kills ---------------------------------------------------------------------------


class Writer(threading.Thread):
    """Hands the ledger's files to the folders in bursts, spread over ``duration`` seconds."""

    def __init__(self, root: Path, ledger: list[Sent], rng: random.Random,
                 duration: float) -> None:
        super().__init__(name="crash-writer", daemon=True)
        self.root = root
        self.ledger = ledger
        self.rng = rng
        self.duration = duration
        self.in_burst = threading.Event()
        self.halt = threading.Event()  # set when the test ends early
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            bursts = []
            left = len(self.ledger)
            while left:
                size = min(left, self.rng.randint(15, 60))
                bursts.append(size)
                left -= size
            pause = self.duration / max(1, len(bursts))
            for size in bursts:
                if self.halt.is_set():
                    return
                self.in_burst.set()
                for _ in range(size):
                    drop_file(self.root, self.ledger[self.written], self.written)
                    self.written += 1
                    if self.rng.random() < 0.1:
                        time.sleep(0.005)  # a burst is not instantaneous
                self.in_burst.clear()
                time.sleep(self.rng.uniform(0.3, 1.7) * pause)
        except BaseException as exc:  # reported by the test
            self.error = exc


def kill_plan(rng: random.Random, kills: int) -> list[str]:
    """Where each kill lands: during start-up and recovery, right after the daemon reports
    running, in the middle of a burst, or some time into the run. Each kind at least twice."""
    kinds = ["startup", "early", "burst", "mid"]
    plan = kinds * 2 + [rng.choice(kinds) for _ in range(kills - 2 * len(kinds))]
    rng.shuffle(plan)
    return plan


def wait_then_kill(daemon: Daemon, kind: str, writer: Writer, rng: random.Random) -> str:
    """Sleep according to ``kind``; return what actually happened (for the summary)."""
    if kind == "startup":  # before or during recovery of the previous run's leftovers
        time.sleep(rng.uniform(0.05, 0.45))
    elif kind == "early":
        daemon.wait_ready()
        time.sleep(rng.uniform(0.0, 0.05))
    elif kind == "burst":
        daemon.wait_ready()
        if not writer.in_burst.wait(5.0):
            kind = "mid"  # the writer has finished: the backlog is still flowing
        time.sleep(rng.uniform(0.0, 0.25))  # claim, commit, categorize or deliver
    else:
        daemon.wait_ready()
        time.sleep(rng.uniform(0.2, 1.2))
    daemon.kill()
    return kind


@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_delivers_every_message_exactly_once(
        tmp_path: Path, pool: DaemonPool, figures: Callable[[str], None]) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    ledger = make_ledger(rng, FILES)
    config = write_org(tmp_path, server_extra=CRASH_SERVER)
    (tmp_path / "pickup").mkdir()
    (tmp_path / "replay").mkdir()
    writer = Writer(tmp_path, ledger, random.Random(SEED + 1), duration=12.0)
    daemon = pool.start(config=config)
    daemon.wait_ready()
    writer.start()
    landed: list[str] = []
    try:
        for kind in kill_plan(rng, KILLS):
            landed.append(wait_then_kill(daemon, kind, writer, rng))
            assert daemon.proc.returncode == -signal.SIGKILL
            daemon = pool.start(config=config)
        writer.join(60)
    finally:
        writer.halt.set()
    assert writer.error is None, writer.error
    assert writer.written == FILES
    daemon.wait_ready()
    drain(tmp_path, daemon)
    listed = queues_listed(tmp_path)  # the administrator's view agrees: nothing queued
    assert listed and all(row["message_count"] == 0 for row in listed), listed
    stop(daemon)

    report = check_exactly_once(tmp_path, ledger)
    elapsed = time.monotonic() - started
    recovered = recovery_counts(d.log_text() for d in pool.started)
    figures(f"crash test: seed={SEED} files={FILES} kills={len(landed)} "
            f"({', '.join(f'{k}={landed.count(k)}' for k in sorted(set(landed)))}) "
            f"{report.summary()} recovered={recovered} time={elapsed:.1f}s")
    assert report.ok, report.details()
    assert sum(recovered.values()) > 0  # the kills did catch work in progress
    assert report.delivered == report.expected > FILES
    assert len(landed) >= 8 and {"startup", "early", "mid"} <= set(landed)

    # negative control: the checker must see a loss, a duplicate and a bent body
    victim = sorted((tmp_path / "var" / "mailboxes" / "Bob" / "new").iterdir())[0]
    victim.unlink()
    drops = sorted((tmp_path / "drop" / "Fax Gateway").glob("*.eml"))
    (drops[0].parent / ("copy-" + drops[0].name)).write_bytes(drops[0].read_bytes())
    drops[1].write_bytes(drops[1].read_bytes() + b"tampered\r\n")
    spoiled = check_exactly_once(tmp_path, ledger)
    assert not spoiled.ok
    assert len(spoiled.lost) == 1 and spoiled.lost[0][:2] == ("maildir", "Bob")
    assert spoiled.duplicates and spoiled.corrupt
    assert not spoiled.phantoms


# -- kills at the dangerous steps, deterministically ------------------------------------------


def db_rows(root: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{root / 'var' / 'queue' / 'mail.que'}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def evidence_claimed_but_committed(root: Path) -> None:
    """Killed after the commit, before the unlink: a claimed file the queue already knows."""
    claimed = {p.name.split("~", 1)[0] for f in ("pickup", "replay")
               for p in listing(root / f / ".work")}
    known = {str(r[0]) for r in db_rows(root, "SELECT name FROM claim")}
    assert claimed & known, (claimed, known)


def evidence_claimed_not_committed(root: Path) -> None:
    claimed = {p.name.split("~", 1)[0] for f in ("pickup", "replay")
               for p in listing(root / f / ".work")}
    known = {str(r[0]) for r in db_rows(root, "SELECT name FROM claim")}
    assert claimed - known, (claimed, known)


def _temps(root: Path) -> list[Path]:
    temps = list((root / "drop" / "Fax Gateway").glob(".*.tmp"))
    for alias in set(MAILBOXES.values()):
        temps += listing(root / "var" / "mailboxes" / alias / "tmp")
    return temps


def evidence_intent_not_renamed(root: Path) -> None:
    """Killed after "written as <name>" was committed, before the rename: temp present."""
    intents = db_rows(root, "SELECT drop_intent FROM recipient WHERE drop_intent IS NOT NULL"
                            " AND status <> 'Delivered'")
    assert intents and _temps(root), (intents, _temps(root))


def evidence_renamed_not_delivered(root: Path) -> None:
    """Killed after the rename, before the delivered commit: the file is visible, the
    recipient is not yet marked delivered."""
    intents = [str(r[0]) for r in db_rows(
        root, "SELECT drop_intent FROM recipient WHERE drop_intent IS NOT NULL"
              " AND status <> 'Delivered'")]
    assert intents
    visible = {p.name for p in (root / "drop" / "Fax Gateway").glob("*.eml")}
    for alias in set(MAILBOXES.values()):
        visible |= {f"{alias}/{p.name}" for p in listing(root / "var" / "mailboxes" / alias
                                                          / "new")}
    assert set(intents) & visible, (intents, visible)


FAILPOINTS = [
    pytest.param("after_claim_before_commit", 2, MIXES, evidence_claimed_not_committed,
                 id="claim-before-commit"),
    pytest.param("after_commit_before_unlink", 2, MIXES, evidence_claimed_but_committed,
                 id="commit-before-unlink"),
    pytest.param("after_intent_before_rename", 2, DROP_ONLY, evidence_intent_not_renamed,
                 id="drop-intent-before-rename"),
    pytest.param("after_intent_before_rename", 2, MAILDIR_ONLY, evidence_intent_not_renamed,
                 id="maildir-intent-before-rename"),
    pytest.param("after_rename_before_delivered", 2, DROP_ONLY, evidence_renamed_not_delivered,
                 id="drop-rename-before-delivered"),
    pytest.param("after_rename_before_delivered", 2, MAILDIR_ONLY,
                 evidence_renamed_not_delivered, id="maildir-rename-before-delivered"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "hit", "mixes", "evidence"), FAILPOINTS)
def test_kill_at_failpoint_then_restart_delivers_exactly_once(
        tmp_path: Path, pool: DaemonPool, name: str, hit: int,
        mixes: tuple[tuple[str, ...], ...], evidence: object) -> None:
    ledger = make_ledger(random.Random(f"{SEED}-{name}-{len(mixes)}"), 40, mixes, tag=name)
    config = write_org(tmp_path, server_extra=CRASH_SERVER)
    daemon = pool.start(config=config, failpoints=f"{name}:kill:{hit}")
    daemon.wait_ready()
    for index, sent in enumerate(ledger[:20]):  # the first batches get through ...
        drop_file(tmp_path, sent, index)
    time.sleep(0.6)
    for index, sent in enumerate(ledger[20:], 20):  # ... one of the next ones dies
        drop_file(tmp_path, sent, index)
    try:
        code = daemon.wait(20)
    except Exception:
        raise AssertionError(f"failpoint {name} never fired") from None
    assert code == -signal.SIGKILL
    assert callable(evidence)
    evidence(tmp_path)  # the kill left the state this failpoint is about

    survivor = pool.start(config=config)  # no failpoint: recovery, then the rest
    survivor.wait_ready()
    drain(tmp_path, survivor)
    stop(survivor)
    report = check_exactly_once(tmp_path, ledger)
    assert report.ok, report.details()
    assert report.delivered == report.expected
