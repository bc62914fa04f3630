"""The supervising parent's control socket (core/server_admin.py) over real Unix sockets.

Small fake workers (``ControlServer``s at the worker control folders, answering with rows
shaped as ``queue_summary`` and ``queue_items`` make them) stand in for the worker
processes; ``ServerAdmin`` is served on the parent's socket and asked through
``control.call`` exactly as the ``hubport`` command asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hubport.core import control
from hubport.core.cli import format_backpressure
from hubport.core.control import ControlError, ControlServer, RequestError
from hubport.core.server_admin import ServerAdmin
from hubport.core.workers import ID_STRIDE, WorkerSlot

SERVER = "HUB01"


def named(queue: str, count: int, status: str = "Ready") -> dict[str, Any]:
    """A Submission / Unreachable / Poison row as queue_summary makes it."""
    kind = "Unreachable" if queue == "Unreachable" else "Undefined"
    return {"queue": queue, "delivery_type": kind, "next_hop": queue, "status": status,
            "message_count": count, "next_retry": None, "last_error": None,
            "identity": f"{SERVER}\\{queue}"}


def delivery(queue: int, count: int, status: str = "Ready", *, next_retry: float | None = None,
             last_retry: float | None = None, retry_count: int = 0,
             last_error: str | None = None) -> dict[str, Any]:
    """A delivery queue's row as queue_summary makes it."""
    return {"queue": str(queue), "delivery_type": "SmtpRelayToRemoteAdSite",
            "next_hop": "example.net", "connector": "Outbound", "status": status,
            "message_count": count, "next_retry": next_retry, "last_retry": last_retry,
            "retry_count": retry_count, "last_error": last_error,
            "identity": f"{SERVER}\\{queue}"}


def item(queue: str, number: int, status: str = "Ready") -> dict[str, Any]:
    """A Get-Message item as queue_items (and QueueAdmin) make it."""
    return {"queue": queue, "message": number, "message_id": f"<{number}@contoso.test>",
            "from": "alice@contoso.test", "subject": f"message {number}", "size": 1200,
            "source": "SMTP", "received": 1000.0, "expires": 9000.0,
            "recipients": [{"address": "bob@example.net", "status": status,
                            "suspended": False, "attempts": 1, "last_error": None,
                            "next_retry": None}],
            "status": status, "last_error": None, "next_retry": None,
            "identity": f"{SERVER}\\{queue}\\{number}", "queue_identity": f"{SERVER}\\{queue}"}


def snapshot(level: str, meters: list[dict[str, Any]],
             transitions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"server": SERVER, "enabled": True, "interval": 2.0, "level": level,
            "effect": f"{level.lower()}: effect", "sampled_at": 500.0, "meters": meters,
            "transitions": transitions or []}


def meter(resource: str, use: str, pressure: float) -> dict[str, Any]:
    return {"resource": resource, "pressure": pressure, "unit": "%",
            "current_resource_use": use, "previous_resource_use": "Normal", "since": 100.0,
            "thresholds": {"Normal": 70.0, "Medium": 80.0, "High": 90.0},
            "pressure_transitions": "-", "detail": f"{resource} detail"}


class FakeWorker:
    """A worker's control socket: canned answers per op, every request recorded."""

    def __init__(self, index: int, queues: list[dict[str, Any]],
                 items: list[dict[str, Any]] | None = None) -> None:
        self.index = index
        self.queues = queues
        self.items = items or []
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse: dict[str, str] = {}  # op -> the refusal's text
        self.answers: dict[str, Any] = {}  # op -> a canned answer
        self.hold: asyncio.Event | None = None  # set: answer only once it is set

    async def handle(self, request: dict[str, Any]) -> Any:
        op, args = request["op"], request.get("args") or {}
        self.calls.append((op, args))
        if self.hold is not None:
            await self.hold.wait()
        if op in self.refuse:
            raise RequestError(self.refuse[op])
        if op in self.answers:
            return self.answers[op]
        if op == "get-queue":
            rows = self.queues
            if args.get("identity"):
                rows = [r for r in rows if r["identity"] == args["identity"]]
            return rows
        if op == "get-message":
            if args.get("identity"):
                found = [i for i in self.items if i["identity"] == args["identity"]]
                if not found:
                    raise RequestError(f"no message {args['identity']}")
                return found
            return self.items[: args.get("result_size", 1000)]
        if op.endswith("-message"):
            return {"identity": args["identity"], "worker": self.index}
        if op.endswith("-queue"):
            row = next(r for r in self.queues if r["identity"] == args["identity"])
            return {**row, "status": "Suspended"} if op == "suspend-queue" else row
        raise RequestError(f"unknown operation {op!r}")

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]


class Server:
    """The parent's socket and the workers' sockets, all in one event loop."""

    def __init__(self, state: Path, workers: list[FakeWorker],
                 servers: list[ControlServer]) -> None:
        self.state = state
        self.workers = workers
        self.servers = servers

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """As the hubport command asks (a blocking client, here in a thread)."""
        return await asyncio.to_thread(control.call, self.state, op, args, 10.0)

    async def refused(self, op: str, args: dict[str, Any] | None = None) -> str:
        with pytest.raises(ControlError) as caught:
            await self.call(op, args)
        assert not caught.value.no_daemon
        return str(caught.value)


@asynccontextmanager
async def running(state: Path, workers: list[FakeWorker],
                  timeout: float = 5.0) -> AsyncIterator[Server]:
    servers: list[ControlServer] = []
    try:
        for worker in workers:
            folder = WorkerSlot(worker.index, len(workers)).control_folder(state)
            folder.mkdir(parents=True)
            server = ControlServer(folder, worker.handle)
            await server.start()
            servers.append(server)
        admin = ServerAdmin(SERVER, state, len(workers), timeout=timeout)
        parent = await control.start_control(state, admin.handle, refusals=admin.refusals)
        assert parent is not None
        servers.append(parent)
        yield Server(state, workers, servers)
    finally:
        for worker in workers:
            if worker.hold is not None:
                worker.hold.set()
        for server in servers:
            await server.stop()


def two_workers() -> list[FakeWorker]:
    w0 = FakeWorker(0, [named("Submission", 2),
                        delivery(1, 3, "Retry", next_retry=2000.0, last_retry=1000.0,
                                 retry_count=2, last_error="451 4.4.1 first"),
                        delivery(2, 1), named("Unreachable", 0), named("Poison", 0, "Suspended")],
                    [item("Submission", 7), item("1", 3), item("1", 9)])
    w1 = FakeWorker(1, [named("Submission", 4, "Active"),
                        delivery(1, 5, "Retry", next_retry=1500.0, last_retry=1200.0,
                                 retry_count=3, last_error="451 4.4.1 latest"),
                        delivery(2, 0, "Active"), named("Unreachable", 1),
                        named("Poison", 0, "Suspended")],
                    [item("1", ID_STRIDE + 5), item("Submission", ID_STRIDE + 1)])
    return [w0, w1]


async def test_get_queue_merges_counts_status_and_retry_by_queue(tmp_path: Path) -> None:
    async with running(tmp_path, two_workers()) as s:
        rows = await s.call("get-queue")
        assert [r["identity"] for r in rows] == [
            "HUB01\\Submission", "HUB01\\1", "HUB01\\2", "HUB01\\Unreachable", "HUB01\\Poison"]
        by = {r["queue"]: r for r in rows}
        assert by["Submission"]["message_count"] == 6
        assert by["Submission"]["status"] == "Active"
        assert by["1"]["message_count"] == 8
        assert by["1"]["status"] == "Retry"
        assert by["1"]["next_retry"] == 1500.0  # the earliest
        assert by["1"]["retry_count"] == 3
        assert by["1"]["last_error"] == "451 4.4.1 latest"  # of the latest attempt
        assert by["2"]["status"] == "Active" and by["2"]["message_count"] == 1
        assert by["Unreachable"]["message_count"] == 1
        assert by["Poison"]["status"] == "Suspended"
        for worker in s.workers:  # each asked for all its rows, nothing filtered there
            assert worker.calls == [("get-queue", {})]


async def test_identity_and_filter_apply_to_the_merged_rows(tmp_path: Path) -> None:
    async with running(tmp_path, two_workers()) as s:
        one = await s.call("get-queue", {"identity": "hub01\\1"})
        assert [(r["identity"], r["message_count"]) for r in one] == [("HUB01\\1", 8)]
        assert [r["queue"] for r in await s.call("get-queue", {"identity": "2"})] == ["2"]
        # no worker alone holds more than 5 messages of any queue; the server does
        rows = await s.call("get-queue", {"filter": "MessageCount -gt 5"})
        assert sorted(r["queue"] for r in rows) == ["1", "Submission"]
        rows = await s.call("get-queue", {"filter": "Status -eq 'Retry' -and RetryCount -ge 3"})
        assert [r["queue"] for r in rows] == ["1"]
        assert await s.refused("get-queue", {"identity": "HUB01\\9"}) == "no queue HUB01\\9"
        assert "names server 'HUB02'" in await s.refused("get-queue",
                                                          {"identity": "HUB02\\1"})
        assert "unknown filter field 'Colour'" in await s.refused(
            "get-queue", {"filter": "Colour -eq red"})
        for worker in s.workers:
            assert all(args == {} for _, args in worker.calls)


async def test_message_identity_goes_to_its_worker_only(tmp_path: Path) -> None:
    async with running(tmp_path, two_workers()) as s:
        w0, w1 = s.workers
        identity = f"HUB01\\1\\{ID_STRIDE + 5}"
        found = await s.call("get-message", {"identity": identity})
        assert [i["message"] for i in found] == [ID_STRIDE + 5]
        assert await s.call("suspend-message", {"identity": identity}) == {
            "identity": identity, "worker": 1}
        removed = await s.call("remove-message", {"identity": identity, "with_ndr": True})
        assert removed["worker"] == 1
        assert w0.calls == []
        assert w1.calls[-1] == ("remove-message", {"identity": identity, "with_ndr": True})
        # an id no worker hands out, and one its worker does not hold
        beyond = f"HUB01\\1\\{2 * ID_STRIDE + 1}"
        assert await s.refused("get-message", {"identity": beyond}) == f"no message {beyond}"
        assert await s.refused("resume-message", {"identity": beyond}) == f"no message {beyond}"
        missing = "HUB01\\1\\4"
        assert await s.refused("get-message", {"identity": missing}) == f"no message {missing}"
        assert w0.ops() == ["get-message"]
        assert "must end in a message number" in await s.refused(
            "suspend-message", {"identity": "HUB01\\1\\x"})


async def test_get_message_lists_every_worker_in_identity_order(tmp_path: Path) -> None:
    async with running(tmp_path, two_workers()) as s:
        items = await s.call("get-message")
        assert [i["identity"] for i in items] == [
            "HUB01\\Submission\\7", f"HUB01\\Submission\\{ID_STRIDE + 1}",
            "HUB01\\1\\3", "HUB01\\1\\9", f"HUB01\\1\\{ID_STRIDE + 5}"]
        assert len(await s.call("get-message", {"result_size": 2})) == 2
        for worker in s.workers:
            assert worker.calls[-1] == ("get-message", {"result_size": 2})


async def test_queue_actions_reach_every_worker(tmp_path: Path) -> None:
    async with running(tmp_path, two_workers()) as s:
        row = await s.call("suspend-queue", {"identity": "HUB01\\1"})
        assert row["identity"] == "HUB01\\1"
        assert row["status"] == "Suspended" and row["message_count"] == 8
        for worker in s.workers:
            assert worker.calls == [("suspend-queue", {"identity": "HUB01\\1"})]
        # Retry-Queue: one worker has nothing waiting and says so; the other retried
        w0, w1 = s.workers
        w0.answers["retry-queue"] = {**w0.queues[1], "retried": 3}
        w1.refuse["retry-queue"] = "queue HUB01\\1 is Ready, not in Retry; Retry-Queue only" \
                                   " acts on queues in Retry"
        row = await s.call("retry-queue", {"identity": "HUB01\\1"})
        assert row["retried"] == 3 and row["message_count"] == 8
        assert w1.calls[-1] == ("get-queue", {"identity": "HUB01\\1"})
        # every worker refuses: the refusal is the answer
        w0.refuse["retry-queue"] = w1.refuse["retry-queue"]
        assert await s.refused("retry-queue", {"identity": "HUB01\\1"}) == \
            w1.refuse["retry-queue"]


async def test_a_stopped_worker_refuses_reads_by_name(tmp_path: Path) -> None:
    async with running(tmp_path, two_workers()) as s:
        await s.servers[1].stop()  # worker 1 is restarting
        expected = "worker 1 of 2 is not answering (restarting?); try again"
        assert await s.refused("get-queue") == expected
        assert await s.refused("get-message") == expected
        assert await s.refused("get-backpressure") == expected
        # a message of the live worker is still reached; one of the stopped one is not
        found = await s.call("get-message", {"identity": "HUB01\\1\\3"})
        assert [i["message"] for i in found] == [3]
        assert await s.refused("suspend-message",
                               {"identity": f"HUB01\\1\\{ID_STRIDE + 5}"}) == expected
        # a queue action is done where it can be, and says it is not done everywhere
        text = await s.refused("suspend-queue", {"identity": "HUB01\\1"})
        assert text.startswith(expected) and "done in worker 0" in text


async def test_a_worker_that_does_not_answer_in_time_is_named(tmp_path: Path) -> None:
    workers = two_workers()
    workers[0].hold = asyncio.Event()
    async with running(tmp_path, workers, timeout=0.5) as s:
        assert await s.refused("get-queue") == \
            "worker 0 of 2 is not answering (restarting?); try again"


async def test_worker_refusals_keep_their_text(tmp_path: Path) -> None:
    async with running(tmp_path, two_workers()) as s:
        identity = f"HUB01\\1\\{ID_STRIDE + 5}"
        text = (f"message {identity} must be suspended before it is exported"
                " (Suspend-Message)")
        s.workers[1].refuse["export-message"] = text
        assert await s.refused("export-message", {"identity": identity}) == text
        s.workers[0].refuse["get-message"] = "no queue HUB01\\7"
        assert await s.refused("get-message", {"queue": "HUB01\\7"}) == "no queue HUB01\\7"


async def test_unknown_operation_and_bad_arguments_as_a_worker_refuses_them(
        tmp_path: Path) -> None:
    async with running(tmp_path, two_workers()) as s:
        assert await s.refused("frobnicate") == "unknown operation 'frobnicate'"
        assert await s.refused("remove-message", {"identity": "HUB01\\1\\3",
                                                  "with_ndr": "false"}) == \
            "argument with_ndr must be bool"
        assert "bad arguments for suspend-queue" in await s.refused("suspend-queue")
        assert all(w.calls == [] for w in s.workers)


async def test_backpressure_is_the_worst_worker_with_each_one_shown(tmp_path: Path) -> None:
    workers = two_workers()
    workers[0].answers["get-backpressure"] = snapshot(
        "Normal", [meter("PrivateBytes", "Normal", 40.0), meter("UsedDiskSpace", "Normal", 50)])
    change = {"at": 400.0, "resource": "PrivateBytes", "from": "Normal", "to": "Medium",
              "pressure": 85.0, "unit": "%"}
    workers[1].answers["get-backpressure"] = snapshot(
        "Medium", [meter("PrivateBytes", "Medium", 85.0), meter("UsedDiskSpace", "Normal", 50)],
        [change])
    async with running(tmp_path, workers) as s:
        state = await s.call("get-backpressure")
        assert state["level"] == "Medium" and state["effect"] == "medium: effect"
        assert [(m["resource"], m["current_resource_use"], m["worker"])
                for m in state["meters"]] == [("PrivateBytes", "Medium", 1),
                                              ("UsedDiskSpace", "Normal", 0)]
        assert [(w["worker"], w["level"], w["causes"]) for w in state["workers"]] == [
            (0, "Normal", []), (1, "Medium", ["PrivateBytes Medium"])]
        shown = format_backpressure(state)
        assert "worker 0: Normal" in shown
        assert "worker 1: Medium (PrivateBytes Medium)" in shown
        assert "PrivateBytes: Normal -> Medium at 85 % (worker 1)" in shown
