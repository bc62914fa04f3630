"""The queue cmdlets for a server of several workers: the supervising parent's control socket.

``hubport run --workers N`` runs N worker processes, each a full pipeline with its own queue
database and its own control socket (``<state>/workers/<k>/control.sock``, served by
``QueueAdmin``). The administrator still talks to one server: the parent serves
``<state>/control.sock`` with ``ServerAdmin.handle``, which has the same request and response
contract as ``QueueAdmin.handle`` and forwards each request to the workers that hold the
answer:

* Get-Queue asks every worker for all its queues and merges them by queue name (a delivery
  queue has the same number in every worker: the queues live in the database they share);
  the identity and the ``-Filter`` are applied to the merged rows, so ``MessageCount`` is the
  server's.
* A message identity names its worker (``hubport.core.workers.worker_of``): Get-Message with
  an identity and the message cmdlets go to that worker only. Get-Message without one asks
  every worker and lists the items in identity order.
* Retry-, Suspend- and Resume-Queue go to every worker (each wakes its own stages; the
  suspension is shared state) and answer with the merged row.
* Get-BackPressure reports the worst worker's level, the worst reading of each resource,
  and one line per worker.

A read is never answered in part: when a worker cannot be reached (it is restarting, or it
does not answer in time) the request is refused with the worker named, and the administrator
tries again. A worker's own refusal is passed on with its text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from hubport.core import control
from hubport.core.control import ControlError, RequestError
from hubport.core.queue_admin import (
    MESSAGE_FIELDS,
    QUEUE_FIELDS,
    AdminError,
    dispatch,
    identity_of,
    message_of,
    operations_of,
    parse_filter,
    queue_of,
    select_queues,
)
from hubport.core.tracking import search_request
from hubport.core.workers import WorkerSlot, worker_of

log = structlog.get_logger("hubport.server_admin")

#: seconds the parent waits for a worker's answer: longer than Remove-Message's own wait for a
#: message in transmission (queue_admin.REMOVE_WAIT), shorter than the client's (control.call)
#: so the administrator hears which worker is slow rather than a bare timeout
WORKER_TIMEOUT = 90.0

#: a merged queue's status: the first of these any worker reports
_STATUS_ORDER = ("Suspended", "Active", "Retry", "Ready")
_LEVELS = {"Normal": 0, "Medium": 1, "High": 2}
#: what control.call says when the worker's socket answered nothing usable (its other
#: transport failures name the socket's path, or carry ``no_daemon``)
_TRANSPORT = ("the daemon did not answer within", "the daemon closed the connection",
              "the daemon sent an unreadable answer")


#: what the parent's control server must treat as refusals (told to the administrator, not
#: logged as faults): ServerAdmin's own and the workers' relayed ones are AdminError
refusals: tuple[type[BaseException], ...] = (RequestError, ControlError)


@dataclass(frozen=True, slots=True)
class _Reply:
    """One worker's answer: its result, its refusal's text, or why it could not be reached."""

    worker: int
    result: Any = None
    refusal: str | None = None
    down: str | None = None

    @property
    def ok(self) -> bool:
        return self.refusal is None and self.down is None


class ServerAdmin:
    """The queue cmdlets against every worker of one server, through their control sockets."""

    #: the module's ``refusals``: pass them to ``control.start_control`` with ``handle``
    refusals: tuple[type[BaseException], ...] = refusals

    def __init__(self, server_name: str, state: Path, count: int, *,
                 timeout: float = WORKER_TIMEOUT, tracking: Path | None = None) -> None:
        if count < 1:
            raise ValueError(f"a server has at least one worker, not {count}")
        self.server = server_name
        self.state = state
        self.tracking = tracking  # the message tracking log folder every worker writes
        self.count = count
        self.timeout = timeout

    def folder(self, index: int) -> Path:
        """Where worker ``index``'s control socket lives."""
        return WorkerSlot(index, self.count).control_folder(self.state)

    # talking to the workers

    def _not_answering(self, index: int) -> str:
        return f"worker {index} of {self.count} is not answering (restarting?); try again"

    async def _ask(self, index: int, op: str, args: dict[str, Any]) -> _Reply:
        folder = self.folder(index)
        try:
            result = await asyncio.to_thread(control.call, folder, op, args, self.timeout)
        except ControlError as exc:
            if _unreachable(exc, folder):
                log.warning("worker not answering", worker=index, op=op, error=str(exc))
                return _Reply(index, down=self._not_answering(index))
            return _Reply(index, refusal=str(exc))
        return _Reply(index, result=result)

    async def _ask_all(self, op: str, args: dict[str, Any],
                       workers: Iterable[int] | None = None) -> list[_Reply]:
        """``op`` in the given workers (all by default) at once; the replies in worker order."""
        indexes = range(self.count) if workers is None else workers
        return list(await asyncio.gather(*(self._ask(k, op, args) for k in indexes)))

    @staticmethod
    def _one(reply: _Reply) -> Any:
        if reply.down is not None:
            raise AdminError(reply.down)
        if reply.refusal is not None:
            raise AdminError(reply.refusal)
        return reply.result

    @classmethod
    def _every(cls, replies: list[_Reply]) -> list[Any]:
        """Every worker's result, or a refusal: a read is never answered in part."""
        for reply in replies:
            if reply.down is not None:
                raise AdminError(reply.down)
        return [cls._one(reply) for reply in replies]

    def _owner(self, identity: str, number: int) -> int:
        index = worker_of(number)
        if index >= self.count:  # no worker hands out such ids
            raise AdminError(f"no message {identity}")
        return index

    # reads

    async def get_queue(self, identity: str | None = None,
                        filter: str | None = None) -> list[dict[str, Any]]:
        """Get-Queue: the server's queues (every worker's, merged), or one, filtered."""
        wanted = queue_of(self.server, identity) if identity else None
        predicate = parse_filter(filter, QUEUE_FIELDS) if filter else None
        rows = merge_queues(self.server, self._every(await self._ask_all("get-queue", {})))
        return select_queues(rows, self.server, wanted, predicate)

    async def get_message(self, identity: str | None = None, queue: str | None = None,
                          filter: str | None = None,
                          result_size: int = 1000) -> list[dict[str, Any]]:
        """Get-Message: one message (from its worker), or the items of every worker."""
        if filter:
            parse_filter(filter, MESSAGE_FIELDS)  # a bad filter is refused before any worker
        args = _present(identity=identity, queue=queue, filter=filter, result_size=result_size)
        if identity:
            _, number = message_of(self.server, identity)
            owner = self._owner(identity, number)
            return list(self._one(await self._ask(owner, "get-message", args)))
        if queue:
            queue_of(self.server, queue)
        parts = self._every(await self._ask_all("get-message", args))
        items = [item for part in parts for item in part]
        items.sort(key=lambda i: (_queue_rank(str(i.get("queue"))), int(i.get("message") or 0)))
        return items[:result_size]

    # queue actions: every worker

    async def retry_queue(self, identity: str, resubmit: bool = False) -> dict[str, Any]:
        return await self._queue_action("retry-queue", identity, resubmit=resubmit)

    async def suspend_queue(self, identity: str) -> dict[str, Any]:
        return await self._queue_action("suspend-queue", identity)

    async def resume_queue(self, identity: str) -> dict[str, Any]:
        return await self._queue_action("resume-queue", identity)

    async def _queue_action(self, op: str, identity: str, **extra: Any) -> dict[str, Any]:
        """``op`` in every worker; the queue's merged row (with the summed ``retried`` or
        ``resubmitted`` counts). Refused when every worker refuses (their first reason),
        or when a worker cannot be reached (the others did act: trying again is safe)."""
        name = queue_of(self.server, identity)
        replies = await self._ask_all(op, {"identity": identity, **extra})
        done = [r for r in replies if r.ok]
        down = [r for r in replies if r.down is not None]
        refused = [r for r in replies if r.refusal is not None]
        if not done:  # every worker refused (their first reason), or none answered
            first = refused[0] if refused else down[0]
            raise AdminError(first.refusal or first.down or "refused")
        if down:
            acted = ", ".join(str(r.worker) for r in done)
            raise AdminError(f"{down[0].down} (done in worker {acted}; repeating it is safe)")
        rows = [r.result for r in done]
        if refused:  # e.g. Retry-Queue where this worker had nothing waiting: its share
            more = self._every(await self._ask_all(
                "get-queue", {"identity": identity}, [r.worker for r in refused]))
            rows += [row for part in more for row in part]
        merged = merge_queue(self.server, name, rows)
        for key in ("retried", "resubmitted"):
            counts = [r.result[key] for r in done if key in r.result]
            if counts:
                merged[key] = sum(counts)
        return merged

    # message actions: the worker that holds the message

    async def suspend_message(self, identity: str) -> dict[str, Any]:
        return dict(await self._message_action("suspend-message", identity))

    async def resume_message(self, identity: str) -> dict[str, Any]:
        return dict(await self._message_action("resume-message", identity))

    async def remove_message(self, identity: str, with_ndr: bool = False) -> dict[str, Any]:
        return dict(await self._message_action("remove-message", identity, with_ndr=with_ndr))

    async def export_message(self, identity: str) -> dict[str, Any]:
        return dict(await self._message_action("export-message", identity))

    async def _message_action(self, op: str, identity: str, **extra: Any) -> Any:
        _, number = message_of(self.server, identity)
        owner = self._owner(identity, number)
        return self._one(await self._ask(owner, op, {"identity": identity, **extra}))

    # back pressure

    async def get_backpressure(self) -> dict[str, Any]:
        """Get-BackPressure: the worst worker's level, with each worker's own."""
        return merge_backpressure(self._every(await self._ask_all("get-backpressure", {})))

    async def get_failover(self) -> list[dict[str, Any]]:
        """Every worker's failing connectors (each worker judges its own next hops)."""
        parts = self._every(await self._ask_all("get-failover", {}))
        return [f for part in parts for f in part]

    async def get_messagetrackinglog(self, **args: Any) -> list[dict[str, Any]]:
        """Get-MessageTrackingLog over every worker's files (one folder, a family each)."""
        if self.tracking is None:
            raise AdminError("this server's tracking log folder is not known")
        return await search_request(self.tracking, **args)

    # dispatch (the parent's control socket)

    def operations(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        return operations_of(self)

    async def handle(self, request: dict[str, Any]) -> Any:
        """Run one control request ``{"op": ..., "args": {...}}``; AdminError when refused."""
        return await dispatch(self.operations(), request)


# -- merging -------------------------------------------------------------------------------


def merge_queues(server: str, per_worker: Iterable[list[dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
    """Every worker's Get-Queue rows → the server's: one row per queue name, in Get-Queue's
    order (Submission, the delivery queues by number, Unreachable, Poison)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for rows in per_worker:
        for row in rows:
            groups.setdefault(str(row["queue"]), []).append(row)
    return [merge_queue(server, name, groups[name]) for name in sorted(groups, key=_queue_rank)]


def merge_queue(server: str, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One queue's rows from several workers as one: the messages add up; Suspended wins,
    then Active, then Retry; the earliest next retry, the highest retry count, and the error
    of the latest attempt."""
    merged = dict(rows[0])
    merged["queue"] = name
    merged["failover"] = next((r["failover"] for r in rows if r.get("failover")), None)
    merged["identity"] = identity_of(server, name)
    merged["message_count"] = sum(int(r.get("message_count") or 0) for r in rows)
    statuses = {r.get("status") for r in rows}
    merged["status"] = next((s for s in _STATUS_ORDER if s in statuses), merged.get("status"))
    retries = [r["next_retry"] for r in rows if r.get("next_retry") is not None]
    merged["next_retry"] = min(retries) if retries else None
    counts = [r["retry_count"] for r in rows if r.get("retry_count") is not None]
    if counts:
        merged["retry_count"] = max(counts)
    tried = [r for r in rows if r.get("last_retry") is not None]
    if tried:
        latest = max(tried, key=lambda r: r["last_retry"])
        merged["last_retry"] = latest["last_retry"]
        merged["last_error"] = latest.get("last_error")
    else:
        merged["last_error"] = next((r["last_error"] for r in rows if r.get("last_error")),
                                    None)
    return merged


def merge_backpressure(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Every worker's ``BackPressure.snapshot`` → one: the worst worker's level and effect,
    each resource at its worst worker's reading (``worker`` says which), the level changes
    of all (each with its ``worker``), and ``workers``: one entry per worker."""
    def level(name: object) -> int:
        return _LEVELS.get(str(name), 0)

    worst: dict[str, Any] = max(snapshots, key=lambda s: level(s.get("level")))
    merged = dict(worst)
    meters: dict[str, dict[str, Any]] = {}
    for index, snapshot in enumerate(snapshots):
        for meter in snapshot.get("meters", []):
            held = meters.get(meter["resource"])
            if held is None or ((level(meter["current_resource_use"]), meter["pressure"])
                                > (level(held["current_resource_use"]), held["pressure"])):
                meters[meter["resource"]] = {**meter, "worker": index}
    merged["meters"] = [meters[name] for name in sorted(meters)]
    merged["transitions"] = sorted(
        ({**change, "worker": index} for index, snapshot in enumerate(snapshots)
         for change in snapshot.get("transitions", [])), key=lambda c: c.get("at") or 0)
    sampled = [s["sampled_at"] for s in snapshots if s.get("sampled_at") is not None]
    merged["sampled_at"] = min(sampled) if sampled else None  # the oldest figure shown
    merged["workers"] = [
        {"worker": index, "level": s["level"], "effect": s["effect"],
         "sampled_at": s.get("sampled_at"),
         "causes": [f"{m['resource']} {m['current_resource_use']}"
                    for m in s.get("meters", []) if m["current_resource_use"] != "Normal"],
         "meters": s.get("meters", [])}
        for index, s in enumerate(snapshots)]
    return merged


# -- helpers -------------------------------------------------------------------------------


def _queue_rank(name: str) -> tuple[int, int]:
    """Get-Queue's order: Submission, the delivery queues by number, Unreachable, Poison."""
    if name.isdigit():
        return (1, int(name))
    return ({"Submission": 0, "Unreachable": 2, "Poison": 3}.get(name, 4), 0)


def _present(**args: Any) -> dict[str, Any]:
    return {key: value for key, value in args.items() if value is not None}


def _unreachable(exc: ControlError, folder: Path) -> bool:
    """Whether ``control.call`` failed to reach the worker (rather than the worker refusing):
    no socket, a stale one, no answer in time, or a connection that broke."""
    text = str(exc)
    return (exc.no_daemon or text.startswith(_TRANSPORT)
            or control.shown(control.socket_path(folder)) in text)
