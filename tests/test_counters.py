"""The server's shared connection counters (core/counters.py) and the limits that use them.

Real processes attach rows of one file; the receive and send limits are checked with two
"workers" in this process, each attached to its own row of one file (a mapping is shared
whether the two rows are in one process or two).
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hubport.core.counters import SharedCounters
from hubport.core.hooks import Hooks
from hubport.core.services import ServiceRuntime
from hubport.core.workers import WorkerSlot
from hubport.plugins.smtp_receive.service import (
    TOO_MANY_CONNECTIONS,
    TOO_MANY_FROM_SOURCE,
    ReceiveService,
)
from hubport.plugins.smtp_send import delivery

pytestmark = pytest.mark.timeout(60)

#: worker 1 of 2 in another interpreter: adds what stdin says, answers with totals
CHILD = r"""
import os, sys
from pathlib import Path
from hubport.core.counters import SharedCounters
from hubport.core.workers import WorkerSlot
counters = SharedCounters.attach(Path(sys.argv[1]), WorkerSlot(1, 2), int(sys.argv[2]))
print("attached", counters.total("k"), counters.mine("k"), flush=True)
for line in sys.stdin:
    op, *args = line.split()
    if op == "add":
        counters.add(args[0], int(args[1]))
    elif op == "take":
        print(counters.try_take(args[0], int(args[1])), flush=True)
        continue
    elif op == "crash":  # dies without closing: its row keeps its counts
        os._exit(0)
    elif op == "quit":
        counters.close()
        break
    print("total", args[0], counters.total(args[0]), flush=True)
"""


class Child:
    """Worker 1 of 2 running in its own interpreter."""

    def __init__(self, path: Path, buckets: int = 4096) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(buckets)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.first = self._line()

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line, f"the child process ended ({self.process.wait()})"
        return line

    def ask(self, command: str) -> str:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._line()

    def end(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0


def test_create_makes_a_private_zeroed_file_of_the_right_size(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    SharedCounters.create(path, 3, buckets=64)
    info = path.stat()
    assert info.st_size == 3 * 64 * 8
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert path.read_bytes() == bytes(3 * 64 * 8)
    assert [p.name for p in tmp_path.iterdir()] == ["counters"]  # no temporary file left


def test_create_replaces_and_resizes_an_older_file(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    SharedCounters.create(path, 2, buckets=64)
    with SharedCounters.attach(path, WorkerSlot(0, 2), buckets=64) as old:
        old.add("k", 5)
        SharedCounters.create(path, 4, buckets=64)
        assert old.total("k") == 5  # a mapping of the old file stays what it was
    assert path.stat().st_size == 4 * 64 * 8
    with SharedCounters.attach(path, WorkerSlot(3, 4), buckets=64) as new:
        assert new.total("k") == 0


def test_two_processes_see_each_others_counts(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    SharedCounters.create(path, 2)
    with SharedCounters.attach(path, WorkerSlot(0, 2)) as mine:
        assert mine.shared
        mine.add("k", 2)
        child = Child(path)
        try:
            assert child.first == "attached 2 0"  # sees worker 0's count, its own is zero
            assert child.ask("add k 3") == "total k 5"
            assert (mine.total("k"), mine.mine("k")) == (5, 2)
            assert mine.total("other") == 0
            mine.add("k", -1)
            assert child.ask("add other 1") == "total other 1"
            assert child.ask("add k 0") == "total k 4"
            child.end("quit")  # a clean close zeroes its row
        finally:
            child.process.kill()
        assert mine.total("k") == 1


def test_a_restarted_worker_zeroes_its_row(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    SharedCounters.create(path, 2)
    with SharedCounters.attach(path, WorkerSlot(0, 2)) as mine:
        mine.add("k", 1)
        crashed = Child(path)
        try:
            assert crashed.ask("add k 4") == "total k 5"
            crashed.end("crash")
        finally:
            crashed.process.kill()
        assert mine.total("k") == 5  # its connections are counted until it comes back
        again = Child(path)  # the supervisor restarts worker 1
        try:
            assert again.first == "attached 1 0"
            assert mine.total("k") == 1
            again.end("quit")
        finally:
            again.process.kill()


def test_try_take_stops_at_the_limit_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    SharedCounters.create(path, 2)
    with SharedCounters.attach(path, WorkerSlot(0, 2)) as mine:
        assert mine.try_take("slot", 3)
        child = Child(path)
        try:
            assert child.ask("take slot 3") == "True"
            assert child.ask("take slot 3") == "True"
            assert child.ask("take slot 3") == "False"  # 3 of 3 taken
            assert not mine.try_take("slot", 3)
            mine.release("slot")
            assert child.ask("take slot 3") == "True"
            assert not mine.try_take("slot", 3)
            assert mine.try_take("slot", None)  # no limit: always taken (and counted)
            assert mine.total("slot") == 4
            child.end("quit")
        finally:
            child.process.kill()
        assert mine.total("slot") == 1


def test_in_memory_counters_need_no_file(tmp_path: Path) -> None:
    for counters in (SharedCounters.attach(None, WorkerSlot()),
                     SharedCounters.attach(tmp_path / "absent", WorkerSlot()),
                     SharedCounters.attach(None, WorkerSlot(1, 3))):
        assert not counters.shared
        assert counters.try_take("k", 2) and counters.try_take("k", 2)
        assert not counters.try_take("k", 2)
        assert (counters.total("k"), counters.mine("k")) == (2, 2)
        counters.release("k")
        assert counters.try_take("k", 2)
        counters.close()
        counters.close()
    assert not (tmp_path / "absent").exists()
    assert ServiceRuntime.__dataclass_fields__["counters"].default_factory().count == 1


def test_a_file_of_the_wrong_size_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    SharedCounters.create(path, 2)
    with pytest.raises(ValueError, match=str(path)) as caught:
        SharedCounters.attach(path, WorkerSlot(0, 3))
    assert "expected" in str(caught.value)
    with pytest.raises(ValueError, match=str(path)):
        SharedCounters.attach(path, WorkerSlot(0, 2), buckets=1024)
    with pytest.raises(FileNotFoundError) as missing:
        SharedCounters.attach(tmp_path / "absent", WorkerSlot(0, 2))
    assert missing.value.filename == str(tmp_path / "absent")


def test_hashing_is_stable_and_collisions_only_overcount(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    SharedCounters.create(path, 2, buckets=8)  # so small that every key collides
    with SharedCounters.attach(path, WorkerSlot(0, 2), buckets=8) as mine:
        child = Child(path, buckets=8)
        try:
            expected: dict[str, int] = {}
            for n in range(40):
                key = f"recv|Default|192.0.2.{n}"
                mine.add(key, n % 3)
                child.ask(f"add {key} {n % 2}")
                expected[key] = n % 3 + n % 2
            assert all(mine.total(k) >= v for k, v in expected.items())
            assert any(mine.total(k) > v for k, v in expected.items())
            # the child hashes a key to the same buckets (no per-process hash seed)
            code = ("from hubport.core.counters import SharedCounters as S\n"
                    "from hubport.core.workers import WorkerSlot as W\n"
                    "print(S.attach(None, W(), 4096).cells('recv|Default|192.0.2.7'))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True, env={**os.environ, "PYTHONHASHSEED": "random"})
            assert out.stdout.strip() == str(
                SharedCounters.attach(None, WorkerSlot()).cells("recv|Default|192.0.2.7"))
            child.end("quit")
        finally:
            child.process.kill()


# -- the receive limits over two workers ------------------------------------------------------


class _Session:
    def __init__(self, connector: Any, ip: str) -> None:
        self.connector = connector
        self.info = SimpleNamespace(remote_ip=ip)
        self.source_key = ""


def _worker_service(counters: SharedCounters) -> ReceiveService:
    hooks = Hooks(builtins=False, entry_points=False)
    return ReceiveService(SimpleNamespace(hooks=hooks, counters=counters))  # type: ignore[arg-type]


def _open(service: ReceiveService, connector: Any, ip: str) -> tuple[_Session, Any]:
    session = _Session(connector, ip)
    session.source_key, refusal = service.opened(session)  # type: ignore[arg-type]
    return session, refusal


def test_receive_limits_count_every_worker(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    SharedCounters.create(path, 2)
    with SharedCounters.attach(path, WorkerSlot(0, 2)) as row0, \
            SharedCounters.attach(path, WorkerSlot(1, 2)) as row1:
        first, second = _worker_service(row0), _worker_service(row1)
        connector = SimpleNamespace(name="Limited", max_inbound_connection=3,
                                    max_inbound_connection_per_source=2,
                                    max_inbound_connection_percentage_per_source=100)
        a, refused = _open(first, connector, "192.0.2.1")
        assert refused is None
        b, refused = _open(second, connector, "192.0.2.1")
        assert refused is None
        c, refused = _open(first, connector, "192.0.2.1")  # the source has 2, on 2 workers
        assert refused == TOO_MANY_FROM_SOURCE
        first.closed(c)  # type: ignore[arg-type]
        d, refused = _open(second, connector, "192.0.2.2")
        assert refused is None
        e, refused = _open(first, connector, "192.0.2.3")  # 3 of 3 on the connector
        assert refused == TOO_MANY_CONNECTIONS
        first.closed(e)  # type: ignore[arg-type]
        second.closed(b)  # type: ignore[arg-type]
        f, refused = _open(first, connector, "192.0.2.3")  # a slot freed by worker 1
        assert refused is None
        for service, session in ((first, a), (second, d), (first, f)):
            service.closed(session)  # type: ignore[arg-type]
        assert row0.total("recv|Limited") == 0
        assert row1.total("recv|Limited|192.0.2.1") == 0


# -- the send limits over two workers ---------------------------------------------------------


async def test_send_limits_wait_for_a_server_wide_slot(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "SERVER_WIDE_POLL", 0.01)
    path = tmp_path / "counters"
    SharedCounters.create(path, 2)
    with SharedCounters.attach(path, WorkerSlot(0, 2)) as row0, \
            SharedCounters.attach(path, WorkerSlot(1, 2)) as row1:
        worker0, worker1 = delivery.Limits(row0), delivery.Limits()
        worker1.bind(row1)
        entered = asyncio.Event()

        async def connect(limits: delivery.Limits, hop: str) -> None:
            async with limits.per_hop(hop, 1), limits.overall(2):
                entered.set()
                await asyncio.sleep(3600)

        held = asyncio.create_task(connect(worker0, "x|a.example"))
        await entered.wait()
        entered.clear()
        # worker 1's own semaphore for the hop is free, the server's count is not
        waiting = asyncio.create_task(connect(worker1, "x|a.example"))
        await asyncio.sleep(0.1)
        assert not entered.is_set()
        assert row1.total("send|x|a.example") == 1
        other = asyncio.create_task(connect(worker1, "x|b.example"))  # another hop: fine
        await entered.wait()
        entered.clear()
        assert row0.total("send") == 2
        held.cancel()  # a cancelled connection gives its slots back
        await asyncio.gather(held, return_exceptions=True)
        await asyncio.wait_for(entered.wait(), 10)
        assert (row0.total("send|x|a.example"), row1.mine("send|x|a.example")) == (1, 1)
        for task in (waiting, other):
            task.cancel()
        await asyncio.gather(waiting, other, return_exceptions=True)
        assert row0.total("send") == 0 and row0.total("send|x|a.example") == 0


async def test_a_waiting_send_connection_can_be_cancelled(tmp_path: Path) -> None:
    counters = SharedCounters.attach(None, WorkerSlot())
    limits = delivery.Limits(counters)
    counters.add("send", 1)  # as if another worker held the only slot
    waiting = asyncio.create_task(limits.overall(1).__aenter__())
    await asyncio.sleep(0.05)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert counters.total("send") == 1  # nothing taken, the semaphore given back
    counters.add("send", -1)
    async with limits.overall(1):
        assert counters.total("send") == 1
    assert counters.total("send") == 0
