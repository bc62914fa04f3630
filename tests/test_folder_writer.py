"""``hubport.core.api.FolderWriter``: a third-party agent's files appear exactly once, even when the
real daemon is SIGKILLed between writing a file and the queue's commit of the delivery
(docs/agents.md, "No loss, no duplicate")."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_process import Daemon, DaemonPool, daemon_pool, queue_counts
from hubport.core.api import DEFERRED, DELIVERED, DeliveryContext, FolderWriter, ItemResult
from hubport.core.model import QueuedRecipient, RecipientStatus, SmtpResponse
from hubport.plugins.pytest_plugin import drop_in, replay_file, write_org
from ledger import folders_empty

#: a quick local agent, beside the organization file, that writes one file per recipient
SPOOL_AGENT = '''
from hubport.core.api import DeliveryAgent, FolderWriter, ItemResult
from hubport.core import hookimpl


class SpoolAgent(DeliveryAgent):
    @classmethod
    def read_settings(cls, reader):
        return reader.path("SpoolDirectory", "spool")

    async def deliver(self, item):
        result = ItemResult()
        spool = FolderWriter(self.context, self.settings, "Test spool")
        for r in item.recipients:
            name = f"{self.context.store_id}-{item.message.id}-{r.id}.txt"
            spool.add(result, [r], name, [item.message.message_id.encode(), b" ",
                                          r.address.encode(), b"\\n"])
        await spool.commit()
        return result


@hookimpl
def register_delivery_agents(register):
    register("SPOOL", SpoolAgent)
'''

CONNECTOR = '''
[hubport]
Plugins = ["spool_agent_plugin"]

[[delivery_agent_connector]]
Name = "Spool"
AddressSpaces = ["SMTP:spool.test;1"]
DeliveryProtocol = "SPOOL"
SpoolDirectory = "{spool}"
'''

MESSAGES = 6
RECIPIENTS = ("a@spool.test", "b@spool.test")


# -- the API on its own ---------------------------------------------------------------------


class Queue:
    """A fake queue: ``record_intent`` keeps what would be committed."""

    def __init__(self) -> None:
        self.intents: dict[int, str] = {}

    async def record_intent(self, intents: dict[int, str]) -> None:
        self.intents.update(intents)

    def context(self) -> DeliveryContext:
        return DeliveryContext(None, None, None,  # type: ignore[arg-type]
                               self.record_intent, time.time, store_id="s1")


def rcpt(rid: int, intent: str | None = None) -> QueuedRecipient:
    return QueuedRecipient(rid, 1, f"r{rid}@spool.test", RecipientStatus.READY,
                           drop_intent=intent)


async def test_writes_records_then_acknowledges_each_file(tmp_path: Path) -> None:
    queue, result = Queue(), ItemResult()
    writer = FolderWriter(queue.context(), tmp_path, "Test spool")
    writer.add(result, [rcpt(1), rcpt(2)], "one.txt", b"for one and two")
    writer.add(result, [rcpt(3)], "three.txt", [b"for ", b"three"],
               SmtpResponse(250, "2.6.0", "Queued as three"))
    await writer.commit()
    assert queue.intents == {1: "one.txt", 2: "one.txt", 3: "three.txt"}
    assert sorted(os.listdir(tmp_path)) == ["one.txt", "three.txt"]
    assert (tmp_path / "three.txt").read_bytes() == b"for three"
    assert {rid: (r.kind, str(r.response)) for rid, r in result.recipients.items()} == {
        1: (DELIVERED, "250 2.0.0 Written as one.txt"),
        2: (DELIVERED, "250 2.0.0 Written as one.txt"),
        3: (DELIVERED, "250 2.6.0 Queued as three")}
    assert not result.void_intents


async def test_a_recorded_write_is_finished_never_written_again(tmp_path: Path) -> None:
    (tmp_path / ".kept.txt.tmp").write_bytes(b"written before the crash")
    queue, result = Queue(), ItemResult()
    writer = FolderWriter(queue.context(), tmp_path)
    # temp still there: renamed now; temp gone: it appeared before (and was taken): no copy
    writer.add(result, [rcpt(1, "kept.txt")], "kept.txt", b"written again")
    writer.add(result, [rcpt(2, "taken.txt")], "taken.txt", b"written again")
    await writer.commit()
    assert os.listdir(tmp_path) == ["kept.txt"]
    assert (tmp_path / "kept.txt").read_bytes() == b"written before the crash"
    assert queue.intents == {}
    assert {r.kind for r in result.recipients.values()} == {DELIVERED}


async def test_a_name_taken_already_defers_and_forgets_the_intent(tmp_path: Path) -> None:
    (tmp_path / "busy.txt").write_bytes(b"not ours")
    queue, result = Queue(), ItemResult()
    writer = FolderWriter(queue.context(), tmp_path, "Test spool")
    writer.add(result, [rcpt(1)], "busy.txt", b"ours")
    await writer.commit()
    assert (tmp_path / "busy.txt").read_bytes() == b"not ours"  # never replaced
    assert os.listdir(tmp_path) == ["busy.txt"]
    assert result.recipients[1].kind == DEFERRED
    assert str(result.recipients[1].response) == (
        "451 4.3.0 Test spool: busy.txt already exists")
    assert result.void_intents == {1}


async def test_a_missing_folder_defers_with_a_4xx_and_records_nothing(tmp_path: Path) -> None:
    queue, result = Queue(), ItemResult()
    writer = FolderWriter(queue.context(), tmp_path / "gone", "Test spool")
    writer.add(result, [rcpt(1)], "a.txt", b"x")
    await writer.commit()
    assert str(result.recipients[1].response) == "451 4.3.0 Test spool does not exist"
    assert queue.intents == {} and not result.void_intents


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../up", "nul\0", "x" * 251])
def test_a_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name: str) -> None:
    writer = FolderWriter(Queue().context(), tmp_path)
    with pytest.raises(ValueError):
        writer.add(ItemResult(), [rcpt(1)], name, b"x")


def test_one_name_for_two_files_is_refused(tmp_path: Path) -> None:
    writer = FolderWriter(Queue().context(), tmp_path)
    writer.add(ItemResult(), [rcpt(1)], "a.txt", b"x")
    with pytest.raises(ValueError, match="planned twice"):
        writer.add(ItemResult(), [rcpt(2)], "a.txt", b"y")


# -- the real daemon, killed ------------------------------------------------------------------


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def submit(root: Path, tag: str) -> set[str]:
    """Replay files for MESSAGES messages to RECIPIENTS; the lines the spool must hold."""
    expected = set()
    for n in range(MESSAGES):
        mid = f"<{tag}-{n}@harness.test>"
        content = (f"From: alice@contoso.test\nSubject: spool {n}\nMessage-ID: {mid}\n\n"
                   f"body {n}\n").encode()
        drop_in(root / "replay", f"m{n}.eml", replay_file("alice@contoso.test",
                                                          list(RECIPIENTS), content))
        expected |= {f"{mid} {r}" for r in RECIPIENTS}
    return expected


def recorded_intents(root: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{root / 'var' / 'queue' / 'mail.que'}?mode=ro", uri=True)
    try:
        return [str(r[0]) for r in conn.execute(
            "SELECT drop_intent FROM recipient WHERE drop_intent IS NOT NULL"
            " AND status <> 'Delivered'")]
    finally:
        conn.close()


def take_files(spool: Path, taken: Path) -> None:
    """What the gateway does: move every published file away (temps are not its to take),
    each under a name of its own, so a second copy of a file is kept, never overwritten."""
    taken.mkdir(exist_ok=True)
    count = len(list(taken.iterdir()))
    for path in sorted(spool.iterdir()):
        if not path.name.startswith("."):
            count += 1
            shutil.move(path, taken / f"{count:04d}-{path.name}")


def drain(root: Path, daemon: Daemon, timeout: float = 60.0) -> None:
    db = root / "var" / "queue" / "mail.que"
    deadline = time.monotonic() + timeout
    counts = None
    while True:
        assert daemon.alive(), f"daemon died while draining:\n{daemon.log_text()[-4000:]}"
        counts = queue_counts(db)
        if counts is not None and counts["total"] == 0 and folders_empty(root):
            return
        assert time.monotonic() < deadline, (
            f"not drained within {timeout}s: queue {counts}, folders empty {folders_empty(root)}")
        time.sleep(0.1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", ["after_intent_before_rename", "after_rename_before_delivered",
                                   "after_agent_before_commit"])
def test_folder_writer_files_appear_exactly_once_across_a_kill(
        tmp_path: Path, pool: DaemonPool, point: str) -> None:
    spool, taken = tmp_path / "spool", tmp_path / "taken"
    spool.mkdir()
    (tmp_path / "spool_agent_plugin.py").write_text(SPOOL_AGENT)
    config = write_org(tmp_path, server_extra="PoisonThreshold = 10",
                       extra=CONNECTOR.format(spool=spool))
    daemon = pool.start(config=config, failpoints=f"{point}:kill:1")
    daemon.wait_ready()
    expected = submit(tmp_path, point)
    try:
        code = daemon.wait(30)
    except Exception:
        raise AssertionError(f"failpoint {point} never fired:\n{daemon.log_text()[-4000:]}"
                             ) from None
    assert code == -signal.SIGKILL
    intents = recorded_intents(tmp_path)
    assert intents, "the kill left no recorded write: the test proves nothing"
    temps = {p.name for p in spool.glob(".*.tmp")}
    if point == "after_intent_before_rename":
        assert {f".{name}.tmp" for name in intents} & temps, (intents, temps)
    else:  # the files are visible, the queue has not marked them delivered
        assert set(intents) & {p.name for p in spool.iterdir()}, intents
    take_files(spool, taken)  # the gateway takes what it sees before hubport comes back

    survivor = pool.start(config=config)
    survivor.wait_ready()
    drain(tmp_path, survivor)
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(15) == 0
    take_files(spool, taken)
    lines = Counter(p.read_text().rstrip("\n") for p in taken.iterdir())
    assert set(lines) == expected, (sorted(expected - set(lines)), sorted(set(lines) - expected))
    duplicates = {line: n for line, n in lines.items() if n > 1}
    assert not duplicates, f"written more than once: {duplicates}"
    assert not list(spool.iterdir()), f"left in the spool: {list(spool.iterdir())}"
