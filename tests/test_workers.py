"""One server, several worker processes (``hubport run --workers N``, core/supervisor.py).

Real daemons in subprocesses: the workers share the SMTP listener (SO_REUSEPORT), each keeps
its own queue database, and the server stays one server to the administrator (one Get-Queue,
message identities that name their worker, one state lock, one binding). The crash tests
SIGKILL a worker (the supervisor starts it again and it recovers its queue) and the
supervisor itself (the workers drain and exit; the next server takes their queues over),
then prove every message arrived exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiosmtplib import SMTP

from daemon_process import Daemon, DaemonPool, daemon_pool, hubport, process_alive, server_counts
from hubport.core.workers import ID_STRIDE, worker_of
from ledger import folders_empty, recovery_counts
from smtp_support import free_port, receive_connector
from support import write_org
from test_crash import Writer, check_exactly_once, drop_file, make_ledger

WORKERS = 2
SERVER = "PoisonThreshold = 10"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = check()  # type: ignore[operator]
        if seen:
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s (last saw {seen!r})")


def drain_server(root: Path, daemon: Daemon, timeout: float = 90.0) -> None:
    def drained() -> object:
        assert daemon.alive(), f"server died while draining:\n{daemon.log_text()[-4000:]}"
        counts = server_counts(root / "var")
        if counts is not None:
            assert counts["poison"] == 0, counts
        return counts is not None and counts["total"] == 0 and folders_empty(root)
    wait_until(drained, timeout, f"drain (queues {server_counts(root / 'var')})")


def get_json(root: Path, *args: str) -> list[dict[str, object]]:
    done = hubport(*args, "--config", str(root / "org.toml"), "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, object]] = json.loads(done.stdout)
    return rows


# -- crash tests -----------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_killing_workers_and_the_supervisor_loses_and_duplicates_nothing(
        tmp_path: Path, pool: DaemonPool, figures: Callable[[str], None]) -> None:
    rng = random.Random(20261207)
    ledger = make_ledger(rng, 400, tag="workers")
    config = write_org(tmp_path, server_extra=SERVER)
    (tmp_path / "pickup").mkdir()
    (tmp_path / "replay").mkdir()
    writer = Writer(tmp_path, ledger, random.Random(7), duration=10.0)
    daemon = pool.start(config=config, workers=WORKERS)
    daemon.wait_ready(30)
    writer.start()
    restarts = 0
    try:
        for round_ in range(4):  # a worker killed mid-flow, the supervisor starts it again
            if not writer.in_burst.wait(5.0):
                time.sleep(rng.uniform(0.2, 1.0))
            time.sleep(rng.uniform(0.0, 0.25))
            pids = daemon.worker_pids()
            victim = rng.randrange(WORKERS)
            daemon_pid = pids[victim]
            os.kill(daemon_pid, signal.SIGKILL)
            wait_until(lambda v=victim, old=daemon_pid: daemon.worker_pids()[v] != old,  # type: ignore[misc]
                       60, f"worker {victim} started again (round {round_})")
            restarts += 1
        # the supervisor killed: its workers get SIGTERM from the kernel, drain and exit
        time.sleep(rng.uniform(0.3, 1.0))
        orphans = list(daemon.worker_pids().values())
        daemon.kill()
        wait_until(lambda: not any(process_alive(p) for p in orphans), 90,
                   "the workers of a killed supervisor exit")
        daemon = pool.start(config=config, workers=WORKERS)
        writer.join(60)
    finally:
        writer.halt.set()
    assert writer.error is None, writer.error
    daemon.wait_ready(60)
    drain_server(tmp_path, daemon)
    listed = get_json(tmp_path, "get-queue")  # the merged view agrees: nothing queued
    assert listed and all(row["message_count"] == 0 for row in listed), listed
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    report = check_exactly_once(tmp_path, ledger)
    recovered = recovery_counts(d.log_text() for d in pool.started)
    figures(f"workers crash test: {report.summary()} worker restarts={restarts}"
            f" supervisor kills=1 recovered={recovered}")
    assert report.ok, report.details()
    assert report.delivered == report.expected
    log = "".join(d.log_text() for d in pool.started)
    assert log.count('"worker died; starting it again"') >= restarts


# -- one server to the administrator ---------------------------------------------------------


async def send_many(port: int, count: int) -> None:
    """``count`` messages, one connection each (the kernel spreads them over the workers)."""
    async def one(n: int) -> None:
        client = SMTP(hostname="127.0.0.1", port=port, timeout=30)
        await client.connect()
        try:
            await client.sendmail("alice@contoso.test", [f"user{n}@example.net"],
                                  f"Subject: worker test {n}\r\n\r\nbody {n}\r\n")
        finally:
            await client.quit()
    for start in range(0, count, 10):
        await asyncio.gather(*(one(n) for n in range(start, min(count, start + 10))))


def test_workers_share_the_listener_and_answer_as_one_server(
        tmp_path: Path, pool: DaemonPool) -> None:
    port, dead = free_port(), free_port()  # nothing listens on ``dead``: mail waits in Retry
    # a trusted peer may relay (ExternalAuthoritative: the connector vouches for it)
    extra = receive_connector("Internet", [f"127.0.0.1:{port}"],
                              AuthMechanism=["ExternalAuthoritative"],
                              PermissionGroups=["ExchangeServers"],
                              MaxInboundConnectionPerSource="unlimited")
    extra += (f'[[send_connector]]\nName = "Outbound"\nAddressSpaces = ["*"]\n'
              f'SmartHosts = ["[127.0.0.1]"]\nPort = {dead}\n'
              f'ConnectionInactivityTimeOut = "5s"\n')
    config = write_org(tmp_path, server_extra=SERVER, extra=extra)
    daemon = pool.start(config=config, workers=WORKERS)
    daemon.wait_ready(30)
    asyncio.run(send_many(port, 40))

    def queued() -> object:
        rows = {str(r["next_hop"]): r for r in get_json(tmp_path, "get-queue")}
        row = rows.get("Outbound") or next(
            (r for r in rows.values() if r.get("connector") == "Outbound"), None)
        return row if row and row["message_count"] == 40 else rows
    wait_until(queued, 60, "one merged Outbound queue holding all 40")
    messages = get_json(tmp_path, "get-message")
    numbers = sorted(int(str(m["identity"]).rsplit("\\", 1)[1]) for m in messages)
    assert len(numbers) == 40
    owners = {worker_of(n) for n in numbers}
    assert owners == {0, 1}, f"the kernel gave every connection to one worker: {numbers}"
    # a message of worker 1, named by its identity, answers from its worker
    theirs = next(m for m in messages
                  if int(str(m["identity"]).rsplit("\\", 1)[1]) >= ID_STRIDE)
    [one] = get_json(tmp_path, "get-message", "--identity", str(theirs["identity"]))
    assert one["subject"] == theirs["subject"]
    # one tracking log per worker in the same folder; the search reads them all
    names = {p.name for p in (tmp_path / "var" / "logs" / "MessageTracking").iterdir()}
    assert any(re.fullmatch(r"MSGTRK\d{8}-\d+\.log", n, re.I) for n in names), names
    assert any(n.upper().startswith("MSGTRK_W1_") for n in names), names
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0


def test_a_second_server_cannot_take_the_state_folder_or_a_binding(
        tmp_path: Path, pool: DaemonPool) -> None:
    port = free_port()
    extra = receive_connector("Internet", [f"127.0.0.1:{port}"])
    config = write_org(tmp_path, extra=extra)
    first = pool.start(config=config, workers=WORKERS)
    first.wait_ready(30)
    again = pool.start(config=config, workers=WORKERS)
    assert again.wait(30) == 4, again.log_text()  # EXIT_LOCKED: the state folder is held
    other = tmp_path / "other"
    other.mkdir()
    (other / "org.toml").write_text(config.read_text())
    elsewhere = pool.start(config=other / "org.toml", workers=WORKERS, cwd=other)
    assert elsewhere.wait(30) == 5, elsewhere.log_text()  # EXIT_SERVICE: the binding is held
    assert "address already in use" in elsewhere.log_text().lower()
    assert first.alive()
    first.signal(signal.SIGTERM)
    assert first.wait(60) == 0


def test_a_worker_killed_between_commit_and_unlink_is_restarted_and_recovers_its_claims(
        tmp_path: Path, pool: DaemonPool) -> None:
    """A failpoint kills each worker at its first Pickup commit (the file is committed, not
    yet deleted); the supervisor starts it again (without the failpoint) and the new worker
    removes what its predecessor had committed: nothing lost, nothing twice."""
    ledger = [s for s in make_ledger(random.Random(5), 120, tag="claims")
              if s.folder == "pickup"]
    config = write_org(tmp_path, server_extra=SERVER)
    (tmp_path / "pickup").mkdir()
    (tmp_path / "replay").mkdir()
    daemon = pool.start(config=config, workers=WORKERS,
                        failpoints="after_commit_before_unlink:kill:1")
    daemon.wait_ready(30)
    for n, sent in enumerate(ledger):
        drop_file(tmp_path, sent, n)
    wait_until(lambda: daemon.log_text().count('"worker died; starting it again"') >= 1, 60,
               "a worker killed by the failpoint")
    drain_server(tmp_path, daemon)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    report = check_exactly_once(tmp_path, ledger)
    assert report.ok, report.details()
    assert recovery_counts([daemon.log_text()])["removed"] >= 1


# -- start-up rules ---------------------------------------------------------------------------


def test_mail_left_for_a_missing_worker_starts_that_worker(tmp_path: Path) -> None:
    """Fewer workers than last time (``--workers`` lowered, fewer CPUs): a queue database or a
    claimed folder file of a worker beyond the number asked for makes the server start it."""
    from hubport.core import queue as q
    from hubport.core.supervisor import _workers_needed

    state, pickup = tmp_path / "var", tmp_path / "pickup"
    (state / "queue").mkdir(parents=True)
    (pickup / ".work").mkdir(parents=True)
    assert _workers_needed(2, state, "HUB01", [pickup, None]) == 2
    with sqlite3.connect(state / "queue" / "mail-3.que") as db:
        db.executescript(q.SCHEMA)  # an empty queue of worker 3 needs nobody
    assert _workers_needed(2, state, "HUB01", [pickup]) == 2
    with sqlite3.connect(state / "queue" / "mail-3.que") as db:
        db.execute("INSERT INTO message (sender, size, source, received_at, expires_at, data)"
                   " VALUES ('a@b.test', 1, 'SMTP', 0, 0, x'41')")
    assert _workers_needed(2, state, "HUB01", [pickup]) == 4
    (pickup / ".work" / "PHUB01+5.18f00-1~m.eml").write_bytes(b"x")
    assert _workers_needed(2, state, "HUB01", [pickup]) == 6
    assert _workers_needed(2, state, "HUB02", [pickup]) == 4  # another server's claim


def test_a_broken_shared_queue_state_is_named_not_the_mail_queue(
        tmp_path: Path, pool: DaemonPool) -> None:
    config = write_org(tmp_path)
    (tmp_path / "var" / "queue").mkdir(parents=True)
    (tmp_path / "var" / "queue" / "server.db").write_bytes(b"this is not a database" * 100)
    daemon = pool.start(config=config, workers=WORKERS)
    assert daemon.wait(60) == 3, daemon.log_text()
    text = daemon.log_text()
    assert "server.db" in text and "holds no mail" in text, text


def test_a_next_hop_that_is_down_sees_one_attempt_per_retry_from_the_whole_server(
        tmp_path: Path, pool: DaemonPool) -> None:
    """Both workers hold mail for a next hop that hangs up at once: after each Retry only
    one of them tries (the other waits for its outcome), so the next hop sees as many
    connections as the queue counts failures, not one per worker."""
    import socket
    import threading

    port, down = free_port(), free_port()
    connections: list[float] = []
    listener = socket.create_server(("127.0.0.1", down))
    stop = threading.Event()

    def hang_up() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            connections.append(time.monotonic())
            sock.close()  # no greeting: the connection fails as a whole

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    extra = receive_connector("Internet", [f"127.0.0.1:{port}"],
                              AuthMechanism=["ExternalAuthoritative"],
                              PermissionGroups=["ExchangeServers"],
                              MaxInboundConnectionPerSource="unlimited")
    extra += (f'[[send_connector]]\nName = "Outbound"\nAddressSpaces = ["*"]\n'
              f'SmartHosts = ["[127.0.0.1]"]\nPort = {down}\n')
    config = write_org(tmp_path, server_extra=SERVER, extra=extra)
    try:
        daemon = pool.start(config=config, workers=WORKERS)
        daemon.wait_ready(30)
        asyncio.run(send_many(port, 20))

        def queue_row() -> dict[str, object] | None:
            rows = get_json(tmp_path, "get-queue")
            return next((r for r in rows if r.get("connector") == "Outbound"), None)

        wait_until(lambda: (r := queue_row()) and r["message_count"] == 20, 60,
                   "20 messages queued for the dead next hop")
        messages = get_json(tmp_path, "get-message")
        assert {worker_of(int(str(m["identity"]).rsplit("\\", 1)[1])) for m in messages} \
            == {0, 1}

        def failures() -> int:
            row = queue_row()
            return int(row["retry_count"] or 0) if row else 0

        # before the first failure each worker (and each of its batches) may try at once:
        # count from the second failure on, when the queue is in Retry for every worker
        wait_until(lambda: failures() >= 2, 60, "two failures in a row")
        first, before = failures(), len(connections)
        wait_until(lambda: failures() >= first + 3, 60, "three more failures in a row")
        last = failures()
        seen = len(connections) - before
        # one attempt per failure; one more may have been under way at either look
        assert seen <= last - first + 1, (seen, first, last, connections)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    finally:
        stop.set()
        thread.join(5)
        listener.close()
