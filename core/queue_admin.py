"""The queue cmdlets' operations on a running pipeline (docs/exchange.md, "Queue cmdlets").

``QueueAdmin`` is what the control socket (``hubport.core.control``) exposes: Get-Queue, Retry-,
Suspend-, Resume-Queue, Get-, Suspend-, Resume-, Remove- and Export-Message, and the back
pressure state (``get-backpressure``, core/backpressure.py). It runs in the
daemon's event loop and changes the queue only through the store's group-committed writes,
then wakes the stage that must act on the change.

Identities follow Exchange: ``Server\\Submission``, ``Server\\<n>`` (a delivery queue),
``Server\\Unreachable``, ``Server\\Poison``; a message is ``Server\\<queue>\\<n>`` where ``n`` is
its internal id. The server part may be left out; when given it must be this daemon's.

Decisions (see also the functions):
* Suspension holds mail but not the clock: suspended messages and messages in a suspended
  queue still expire (an NDR after ``MessageExpirationTimeout``), as in Exchange; only Poison
  is never expired. Messages already being transmitted when their queue is suspended finish.
* A delivery or Unreachable item is suspended per queue (a bifurcated message goes on in its
  other queues); a Submission item is the whole message.
* Remove-Message waits (briefly) for a message being transmitted to be released, then fails
  the item's recipients: with ``-WithNDR`` as FAIL events (Source ADMIN) and an NDR, else a
  DROP event (Source ADMIN) and nothing to the sender.
* Export-Message needs the item suspended first (Exchange's rule: nothing is delivering it
  while it is copied); it returns the Replay-format bytes, the client writes the file.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from hubport.core import opath
from hubport.core import queue as q
from hubport.core.body import CHUNK_SIZE, MessageBody
from hubport.core.control import RequestError
from hubport.core.folder_formats import format_replay
from hubport.core.model import RecipientStatus, SmtpResponse
from hubport.core.opath import Predicate
from hubport.core.queue import RecipientUpdate
from hubport.core.tracking import search_request

if TYPE_CHECKING:
    from hubport.core.backpressure import BackPressure
    from hubport.core.pipeline import Pipeline

log = structlog.get_logger("hubport.queue_admin")

#: the response an administrator's removal gives the recipients (Exchange writes
#: ``QUEUE.Admin; message deleted by administrative action``; 5.3.2 keeps the DSN consistent)
REMOVED = SmtpResponse(550, "5.3.2", "QUEUE.Admin; message deleted by administrative action")
REMOVE_WAIT = 30.0  # seconds Remove-Message waits for a message in transmission


class AdminError(RequestError):
    """A refused request (unknown identity, wrong state, bad filter): told to the caller."""


class _Busy(Exception):
    """The message was taken for processing between the check and the write."""


# -- identities --------------------------------------------------------------------------


def _queue_name(text: str) -> str:
    for name in q.NAMED_QUEUES:
        if text.lower() == name.lower():
            return name
    if text.isdigit():
        return str(int(text))
    raise AdminError(f"{text!r} is not a queue name (Submission, Unreachable, Poison or a"
                     " delivery queue number)")


def split_identity(server: str, identity: str, parts: int) -> list[str]:
    """``[Server\\]A[\\B]`` → the parts after the server (which must be ``server``)."""
    bits = [b for b in identity.strip().split("\\")]
    if len(bits) == parts + 1:
        if bits[0].lower() != server.lower():
            raise AdminError(f"identity {identity!r} names server {bits[0]!r}; this daemon"
                             f" runs {server}")
        bits = bits[1:]
    if len(bits) != parts or not all(bits):
        shape = "Server\\Queue" if parts == 1 else "Server\\Queue\\MessageId"
        raise AdminError(f"identity {identity!r} is not of the form {shape}")
    return bits


def queue_of(server: str, identity: str) -> str:
    """The queue name a queue identity of ``server`` names."""
    return _queue_name(split_identity(server, identity, 1)[0])


def message_of(server: str, identity: str) -> tuple[str, int]:
    """The queue name and message number a message identity of ``server`` names."""
    queue, number = split_identity(server, identity, 2)
    if not number.isdigit():
        raise AdminError(f"message identity {identity!r} must end in a message number")
    return _queue_name(queue), int(number)


def identity_of(server: str, *parts: object) -> str:
    return "\\".join([server, *(str(p) for p in parts)])


# -- filters -----------------------------------------------------------------------------

QUEUE_FIELDS = {"identity": "identity", "status": "status", "nexthopdomain": "next_hop",
                "deliverytype": "delivery_type", "messagecount": "message_count",
                "lasterror": "last_error", "nexthopconnector": "connector",
                "retrycount": "retry_count"}
MESSAGE_FIELDS = {"identity": "identity", "status": "status", "fromaddress": "from",
                  "subject": "subject", "size": "size", "queue": "queue_identity",
                  "lasterror": "last_error", "internetmessageid": "message_id",
                  "source": "source"}

def parse_filter(text: str, fields: dict[str, str]) -> Predicate:
    """Get-Queue's and Get-Message's -Filter (core/opath.py), refused as a request error."""
    try:
        return opath.parse_filter(text, fields)
    except opath.FilterError as exc:
        raise AdminError(str(exc)) from None


#: the control socket's operations and the method of an admin object that serves each
#: (a worker's ``QueueAdmin``, the supervisor's ``ServerAdmin``)
OPERATIONS = {op: op.replace("-", "_") for op in (
    "get-queue", "retry-queue", "suspend-queue", "resume-queue", "get-message",
    "suspend-message", "resume-message", "remove-message", "export-message",
    "get-backpressure", "get-messagetrackinglog", "get-failover")}


def operations_of(admin: object) -> dict[str, Callable[..., Awaitable[Any]]]:
    """The operations ``admin`` serves, by name."""
    return {op: getattr(admin, method) for op, method in OPERATIONS.items()}


def select_queues(rows: list[dict[str, Any]], server: str, wanted: str | None,
                  predicate: Predicate | None) -> list[dict[str, Any]]:
    """Get-Queue's answer from its rows: the one queue asked for (refused when there is no
    such queue), then the filter."""
    if wanted is not None:
        rows = [r for r in rows if r["queue"] == wanted]
        if not rows:
            raise AdminError(f"no queue {identity_of(server, wanted)}")
    if predicate is not None:
        rows = [r for r in rows if predicate(r)]
    return rows


# -- the operations ----------------------------------------------------------------------


class QueueAdmin:
    """The queue cmdlets against one running pipeline."""

    def __init__(self, pipeline: Pipeline, *,
                 backpressure: BackPressure | None = None) -> None:
        self.pipeline = pipeline
        self.backpressure = backpressure

    @property
    def server(self) -> str:
        return self.pipeline.server_name

    # identities

    def queue_of(self, identity: str) -> str:
        return queue_of(self.server, identity)

    def message_of(self, identity: str) -> tuple[str, int]:
        return message_of(self.server, identity)

    def _identity(self, *parts: object) -> str:
        return identity_of(self.server, *parts)

    # reads

    async def get_queue(self, identity: str | None = None,
                        filter: str | None = None) -> list[dict[str, Any]]:
        """Get-Queue: every queue (or one), optionally filtered."""
        wanted = self.queue_of(identity) if identity else None
        predicate = parse_filter(filter, QUEUE_FIELDS) if filter else None
        active = [name for name, count in self.pipeline.active.items() if count > 0]
        now = self.pipeline.clock()
        rows = await self.pipeline.store.read(lambda c: q.queue_summary(c, now, active))
        failing = {f["connector"].lower(): f for f in self.pipeline.failover.snapshot()}
        carrying = {f["fallback"].lower(): f for f in failing.values() if f["fallback"]}
        for row in rows:
            row["identity"] = self._identity(row["queue"])
            connector = str(row.get("connector") or "").lower()
            if connector in failing:  # Get-Queue says why its mail went elsewhere
                row["failover"] = failing[connector]["describe"]
                if failing[connector]["moved_at"] is not None:
                    row["last_error"] = row["failover"]
            elif connector in carrying:
                f = carrying[connector]
                row["failover"] = (f"carrying the mail of {f['connector']}, failed over"
                                   " (ConnectorFailover NextCost)")
        return select_queues(rows, self.server, wanted, predicate)

    async def get_message(self, identity: str | None = None, queue: str | None = None,
                          filter: str | None = None,
                          result_size: int = 1000) -> list[dict[str, Any]]:
        """Get-Message: the items of one queue, of every queue, or one message."""
        predicate = parse_filter(filter, MESSAGE_FIELDS) if filter else None
        message: int | None = None
        if identity:
            name, message = self.message_of(identity)
            names = [name]
        elif queue:
            names = [self.queue_of(queue)]
        else:
            names = [str(r["queue"]) for r in await self.get_queue()]
        now = self.pipeline.clock()
        items: list[dict[str, Any]] = []
        for name in names:
            if not await self.pipeline.store.read(partial(q.queue_exists, queue=name)):
                raise AdminError(f"no queue {self._identity(name)}")
            found = await self.pipeline.store.read(partial(
                q.queue_items, queue=name, now=now, message_id=message, limit=result_size))
            for item in found:
                item["identity"] = self._identity(name, item["message"])
                item["queue_identity"] = self._identity(name)
            items.extend(found)
        if identity and not items:
            raise AdminError(f"no message {identity}")
        if predicate is not None:
            items = [i for i in items if predicate(i)]
        return items[:result_size]

    # queue actions

    async def _queue_row(self, name: str) -> dict[str, Any]:
        return (await self.get_queue(name))[0]

    async def retry_queue(self, identity: str, resubmit: bool = False) -> dict[str, Any]:
        """Retry-Queue: a queue in Retry tries now; ``resubmit`` sends a delivery queue's or
        Unreachable's items back through the categorizer (after a routing change)."""
        name = self.queue_of(identity)
        row = await self._queue_row(name)
        if name in ("Submission", "Poison"):
            raise AdminError(f"Retry-Queue does not act on {row['identity']}")
        if resubmit:
            clause, params = ("r.status='Unreachable'", []) if name == "Unreachable" else (
                "r.queue=? AND r.status IN ('Ready','Retry')", [int(name)])
            moved = await self.pipeline.store.write(lambda c: q.resubmit_recipients(
                c, f"m.in_flight=0 AND {clause}", params))
            self.pipeline.wake_categorizer()
            log.info("queue resubmitted", queue=row["identity"], recipients=moved)
            return {**await self._queue_row(name), "resubmitted": moved}
        if name == "Unreachable":
            raise AdminError("the Unreachable queue is retried with -Resubmit")
        now = self.pipeline.clock()
        # the queue in Retry, or (an Active/Ready queue) messages waiting on their own retry
        if row["status"] != "Retry" and (row["status"] == "Suspended" or not await
                                         self.pipeline.store.read(lambda c: q.retry_pending(
                                             c, int(name), now))):
            # with several workers another one may have ended the shared Retry a moment
            # ago: a wake costs nothing and lets this worker's items go too
            self.pipeline.wake_queue(int(name), retry_now=True)
            raise AdminError(f"queue {row['identity']} is {row['status']}, not in Retry;"
                             " Retry-Queue only acts on queues in Retry")
        count = await self.pipeline.store.write(lambda c: q.retry_now(c, int(name), now))
        self.pipeline.wake_queue(int(name), retry_now=True)
        log.info("queue retried", queue=row["identity"], recipients=count)
        return {**await self._queue_row(name), "retried": count}

    async def suspend_queue(self, identity: str) -> dict[str, Any]:
        """Suspend-Queue: no new transmissions (Submission: the categorizer pauses)."""
        return await self._set_queue(identity, True)

    async def resume_queue(self, identity: str) -> dict[str, Any]:
        return await self._set_queue(identity, False)

    async def _set_queue(self, identity: str, suspended: bool) -> dict[str, Any]:
        name = self.queue_of(identity)
        await self._queue_row(name)  # it exists
        if name == "Poison":
            raise AdminError("the Poison queue is always suspended; resume or remove its"
                             " messages one by one")
        await self.pipeline.store.write(lambda c: q.set_queue_suspended(c, name, suspended))
        if not suspended:
            self._wake(name)
        log.info("queue suspended" if suspended else "queue resumed",
                 queue=self._identity(name))
        return await self._queue_row(name)

    def _wake(self, name: str) -> None:
        if name.isdigit():
            self.pipeline.wake_queue(int(name))
        elif name in ("Submission", "Poison"):
            self.pipeline.wake_categorizer()

    # message actions

    async def _item(self, identity: str) -> dict[str, Any]:
        return (await self.get_message(identity=identity))[0]

    async def suspend_message(self, identity: str) -> dict[str, Any]:
        """Suspend-Message: the item is held until resumed (it still expires)."""
        name, number = self.message_of(identity)
        await self._item(identity)
        if name != "Poison":
            await self.pipeline.store.write(
                lambda c: q.set_item_suspended(c, name, number, True))
            log.info("message suspended", message=identity)
        return await self._item(identity)

    async def resume_message(self, identity: str) -> dict[str, Any]:
        """Resume-Message; a Poison message goes back to the categorizer, processed alone."""
        name, number = self.message_of(identity)
        item = await self._item(identity)
        if name == "Poison":
            await self.pipeline.store.write(lambda c: q.release_poison(c, number))
            self.pipeline.wake_categorizer()
            log.info("message released from Poison", message=identity)
            return {**item, "status": "Resubmitted"}
        await self.pipeline.store.write(lambda c: q.set_item_suspended(c, name, number, False))
        self._wake(name)
        log.info("message resumed", message=identity)
        return await self._item(identity)

    async def remove_message(self, identity: str, with_ndr: bool = False) -> dict[str, Any]:
        """Remove-Message: fail the item's recipients (NDR with ``with_ndr``), tracked."""
        name, number = self.message_of(identity)
        await self._item(identity)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REMOVE_WAIT
        while True:
            if not self.pipeline.is_in_flight(number):
                try:
                    events, removed = await self.pipeline.store.write(
                        lambda c: self._remove_in_conn(c, name, number, with_ndr))
                    break
                except _Busy:
                    pass
            if loop.time() > deadline:
                raise AdminError(f"message {identity} is being processed; try again")
            await asyncio.sleep(0.1)
        log.info("message removed", message=identity, with_ndr=with_ndr, recipients=len(removed))
        return {"identity": identity, "removed": removed, "with_ndr": with_ndr,
                "ndr_sent": any(e.event_id == "DSN" for e in events)}

    def _remove_in_conn(self, conn: Any, name: str, number: int,
                        with_ndr: bool) -> tuple[list[Any], list[str]]:
        from hubport.core.pipeline import Event

        if q.item_in_flight(conn, number):
            raise _Busy()
        message = q.item_recipients(conn, name, number)
        if message is None:
            raise AdminError(f"no message {self._identity(name, number)}")
        recipients = message.recipients
        q.update_recipients(conn, [RecipientUpdate(r.id, RecipientStatus.FAILED,
                                                   last_response=str(REMOVED))
                                   for r in recipients])
        addresses = [r.address for r in recipients]
        if with_ndr:
            events = self.pipeline.fail_in_conn(conn, message,
                                                [(r, REMOVED, "ADMIN") for r in recipients])
        else:
            events = [Event("DROP", "ADMIN", message, addresses,
                            [str(REMOVED)] * len(addresses))]
        q.settle_submitted(conn, number)
        q.finish_if_done(conn, number)
        self.pipeline.emit(conn, events)  # tracked in the same transaction
        return events, addresses

    async def export_message(self, identity: str) -> dict[str, Any]:
        """Export-Message: the item as a Replay file (its envelope and the stored bytes)."""
        name, number = self.message_of(identity)
        await self._item(identity)

        def read(conn: Any) -> tuple[bool, Any]:
            return (q.item_suspended(conn, name, number),
                    q.item_recipients(conn, name, number, with_data=True))

        suspended, message = await self.pipeline.store.read(read)
        if message is None:
            raise AdminError(f"no message {identity}")
        if not suspended:
            raise AdminError(f"message {identity} must be suspended before it is exported"
                             " (Suspend-Message)")
        try:  # b"": the envelope lines alone; the body is encoded after them, piece by piece
            head = format_replay(q.envelope_of(message, message.recipients), b"")
        except ValueError as exc:
            raise AdminError(f"message {identity} cannot be written as a Replay file: {exc}"
                             ) from None
        try:
            encoded = await asyncio.to_thread(_base64_of, head, message.body)
        except OSError as exc:  # its spool file: the message was removed meanwhile
            raise AdminError(f"message {identity} cannot be read: {exc}") from None
        return {"identity": identity, "size": len(head) + message.body.size, "data": encoded}

    # dispatch (the control socket)

    def operations(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        return operations_of(self)

    async def get_failover(self) -> list[dict[str, Any]]:
        """The connectors whose next hop is failing or failed over (Test-Route)."""
        return self.pipeline.failover.snapshot()

    async def get_backpressure(self) -> dict[str, Any]:
        """Get-BackPressure: the level of each watched resource, as Exchange's
        ``Get-ExchangeDiagnosticInfo -Component ResourceThrottling`` lists them."""
        if self.backpressure is None:
            raise AdminError("this daemon runs no resource monitor")
        return self.backpressure.snapshot()

    async def get_messagetrackinglog(self, **args: Any) -> list[dict[str, Any]]:
        """Get-MessageTrackingLog on this server's log (for a management endpoint)."""
        path = self.pipeline.server.message_tracking_log_path
        return await search_request(path, **args)

    async def handle(self, request: dict[str, Any]) -> Any:
        """Run one control request ``{"op": ..., "args": {...}}``; AdminError when refused."""
        return await dispatch(self.operations(), request)


def _base64_of(head: bytes, body: MessageBody, size: int = CHUNK_SIZE) -> str:
    """Base64 of ``head`` then ``body``, encoded chunk by chunk (a thread's blocking reads):
    the raw file is never held whole beside its encoding."""
    encoded = bytearray()
    rest = b""
    for chunk in itertools.chain((head,), body.chunks(size)):
        chunk = rest + chunk
        cut = len(chunk) - len(chunk) % 3  # whole 3-octet groups encode on their own
        encoded += base64.b64encode(chunk[:cut])
        rest = chunk[cut:]
    encoded += base64.b64encode(rest)
    return encoded.decode("ascii")


async def dispatch(operations: dict[str, Callable[..., Awaitable[Any]]],
                   request: dict[str, Any]) -> Any:
    """Run one control request against ``operations``: the op is known and each argument has
    its JSON type, or AdminError."""
    op = operations.get(str(request.get("op", "")))
    if op is None:
        raise AdminError(f"unknown operation {request.get('op')!r}")
    args = request.get("args") or {}
    if not isinstance(args, dict):
        raise AdminError("args must be an object")
    for key, value in args.items():  # "false" must never mean true
        wanted = _ARGUMENT_TYPES.get(key)
        if wanted is not None and value is not None and type(value) not in wanted:
            names = " or ".join(t.__name__ for t in wanted)
            raise AdminError(f"argument {key} must be {names}")
    try:
        return await op(**args)
    except TypeError as exc:
        raise AdminError(f"bad arguments for {request['op']}: {exc}") from None


#: the JSON types each control argument may have (None is always allowed)
_ARGUMENT_TYPES: dict[str, tuple[type, ...]] = {
    "with_ndr": (bool,), "resubmit": (bool,), "result_size": (int,),
    "identity": (str,), "queue": (str,), "filter": (str,), "path": (str,),
    "start": (str,), "end": (str,), "recipients": (list,), "event_id": (str,),
    "message_id": (str,), "internal_message_id": (str,), "message_subject": (str,),
    "sender": (str,), "reference": (str,), "source": (str,),
}


# -- the client's side of Export-Message ---------------------------------------------------


def write_export(path: Path, data: bytes) -> None:
    """Write an exported message at ``path``: never over an existing file, never half.

    The bytes go to a temp file beside it (a name no watched folder takes), are synced, then
    linked to the final name (``link`` fails if the name exists, so nothing is overwritten
    even in a race), and the folder is synced.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists; Export-Message does not overwrite")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; Export-Message does not overwrite") from None
    finally:
        os.unlink(tmp)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
