"""The pipeline: Submission → categorizer → delivery queues → deliver hook.

It drives the stages as asyncio tasks around the durable queue:

* ``submit`` runs the ``receive`` hooks and commits a message to the Submission queue
  (group commit); the caller acknowledges only after it returns.
* the categorizer task resolves and routes submitted messages in batches, forking one
  queued item per (message, next hop), and commits each message's decisions atomically
  with any NDR they cause;
* one worker per delivery queue hands due items to the ``deliver`` hook and commits the
  per-recipient results (retry ladder, expiry, NDRs);
* a sweeper expires messages and sends delay DSNs.

Before a batch is processed its messages are marked in flight (committed); a process that
dies leaves the mark, and at start those messages count one crash (``hubport.core.queue.recover``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from hubport.core import queue as q
from hubport.core.body import SPOOL_SUFFIX, MessageBody, make_durable_folder, spool_folder
from hubport.core.categorizer import EXPANDED, FAIL, ROUTE, UNREACHABLE, Categorized, Categorizer
from hubport.core.connector_failover import ConnectorFailover
from hubport.core.delivery import (
    DEFERRED,
    DELIVERED,
    FAILED,
    LOCAL_ERROR,
    DeferQueue,
    DeliveryContext,
    FailQueue,
    ItemResult,
    MailItem,
    RecipientResult,
)
from hubport.core.directory import RecipientDirectory
from hubport.core.dsn import DsnRecipient, build_dsn
from hubport.core.failpoints import failpoint
from hubport.core.headers import parse_header_section, subject_of
from hubport.core.model import (
    Envelope,
    EnvelopeRecipient,
    MailFrom,
    NextHop,
    Notify,
    QueuedMessage,
    QueuedRecipient,
    RecipientStatus,
    SmtpResponse,
    Submission,
    SubmitResult,
)
from hubport.core.queue import RecipientUpdate
from hubport.core.retry import EXPIRED, retry_delay
from hubport.core.routing import RELAY_TYPES
from hubport.core.store import Store
from hubport.core.workers import WorkerSlot

#: seconds between reads of the server's shared queue state while a queue waits (workers)
SHARED_STATE_POLL = 5.0
#: seconds one worker's attempt at a queue after its Retry holds off the others when the
#: worker dies before recording its outcome
ATTEMPT_HOLD = 120.0
#: seconds between removals of the spool files of finished messages
SPOOL_SWEEP_INTERVAL = 2.0
#: an original larger than this comes back in an NDR as its header section only
DSN_RETURN_LIMIT = 10 * 1024 * 1024
#: how much of such an original is read to find that header section
DSN_HEADER_SCAN = 1024 * 1024

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer
    from hubport.core.hooks import Hooks
    from hubport.core.tracking import TrackingLog

S = RecipientStatus
log = structlog.get_logger("hubport.pipeline")

NO_DELIVERY_PLUGIN = SmtpResponse(451, "4.4.0", "No delivery plugin serves this next hop")
SOURCE_OF_DELIVERY = {"MapiDelivery": "STOREDRIVER", "NonSmtpGatewayDelivery": "GATEWAY",
                      "DeliveryAgent": "AGENT"}


#: (recipient, response, tracking source) or with a fourth item: the remote MTA that refused
Failure = tuple[QueuedRecipient, SmtpResponse, str] | tuple[QueuedRecipient, SmtpResponse,
                                                            str, str | None]


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Both ends of an SMTP connection, for the tracking log's client-*/server-* fields."""

    client_ip: str = ""
    client_hostname: str = ""
    server_ip: str = ""
    server_hostname: str = ""


@dataclass(slots=True)
class Event:
    """A tracking event waiting for its commit."""

    event_id: str
    source: str
    message: QueuedMessage
    recipients: list[str]
    statuses: list[str]
    related: str = ""
    connector: str = ""
    reference: str = ""
    context: str = ""
    #: the connection the event is about (client and server ends), when there was one
    endpoints: Endpoints | None = None


def _received_over(sub: Submission) -> Endpoints:
    return Endpoints(sub.client_ip, sub.client_hostname, sub.server_ip)


class Pipeline:
    CATEGORIZE_BATCH = 200
    DELIVERY_BATCH = 250
    BATCHES_IN_FLIGHT = 2

    def __init__(self, org: Organization, server_name: str, hooks: Hooks, store: Store,
                 tracking: TrackingLog, *, clock: Callable[[], float] = time.time,
                 worker: WorkerSlot = WorkerSlot()) -> None:
        self.hooks = hooks
        #: this process's place among the server's workers (core/workers.py)
        self.worker = worker
        self.store = store
        self.tracking = tracking
        self.clock = clock
        self.server_name = server_name
        self.store_id = ""
        self._tasks: list[asyncio.Task[Any]] = []
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._queue_wake: dict[int, asyncio.Event] = {}
        self._hops: dict[int, NextHop] = {}
        self._categorizer_wake = asyncio.Event()
        self._dispatch_wake = asyncio.Event()
        self._stopping = False
        self._recovering = False
        self._stopped = asyncio.Event()
        self._in_flight: set[int] = set()
        #: released in memory but still marked in flight in the database (a failed write)
        self._stranded: set[int] = set()
        #: queue id -> monotonic time before which its worker takes no new batch
        self._queue_backoff: dict[int, float] = {}
        #: queue name ('Submission' or a delivery queue id) -> batches in progress (Active)
        self.active: Counter[str] = Counter()
        #: bumped by every reload: decisions computed under an older config are not final
        self.generation = 0
        #: connectors failed over to the next cost (ConnectorFailover NextCost)
        self.failover = ConnectorFailover(self)
        self.apply_config(org)

    # -- configuration -----------------------------------------------------------------

    def apply_config(self, org: Organization) -> None:
        """Adopt a new organization (live reload); Unreachable is re-evaluated by ``reload``."""
        self.org = org
        self.server: TransportServer = org.server(self.server_name)
        # one plugin's hung hook defers its own message, not everyone's (core/hooks.py)
        self.hooks.hook_timeout = self.server.plugin_hook_timeout
        self.hooks.deliver_timeout = self.server.plugin_deliver_timeout
        self.directory = RecipientDirectory(org)
        self.categorizer = Categorizer(org, self.server, self.directory, self.hooks)
        self.categorizer.avoided = self.failover.avoided
        self.connectors = {c.name.lower(): c for c in org.connectors}
        self.failover.forget_gone()

    async def reload(self, org: Organization) -> int:
        """Apply a new config; resubmit the Unreachable queue (unless it is suspended) and
        the queues of connectors that are gone or disabled now."""
        old = {c.name.lower() for c in self.org.connectors if c.enabled}
        self.apply_config(org)
        self.generation += 1
        gone = sorted(old - {c.name.lower() for c in org.connectors if c.enabled})
        moved = await self.store.write(self._resubmit_unreachable)
        if gone:
            marks = ",".join("?" * len(gone))
            moved += await self.store.write(lambda c: q.resubmit_recipients(
                c, "r.status IN ('Ready','Retry') AND r.queue IN (SELECT id FROM delivery_queue"
                   f" WHERE lower(connector) IN ({marks}))", gone))
        if moved:
            self._categorizer_wake.set()
        return moved

    @staticmethod
    def _resubmit_unreachable(conn: sqlite3.Connection) -> int:
        if q.flag(conn, "Unreachable"):
            return 0
        return q.resubmit_recipients(conn, "r.status='Unreachable'", ())  # not suspended ones

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> q.Recovery:
        poison = self.server.poison_threshold
        enabled = self.server.poison_message_detection_enabled
        self._loop = asyncio.get_running_loop()
        added = await self.store.write(q.upgrade)
        if added:
            log.info("queue database upgraded", added=added)
        await self._sweep_spool_orphans()
        renumbered = await self.store.write(q.adopt_queues)
        if renumbered:
            log.warning("delivery queues took the server's ids", queues=renumbered)
        first_id = self.worker.first_id
        await self.store.write(lambda c: q.start_ids_at(c, first_id))

        def recover(conn: sqlite3.Connection) -> tuple[q.Recovery, list[QueuedMessage]]:
            found = q.recover(conn, poison, enabled)
            poisoned = q.load_messages(conn, found.poisoned, with_data=False)
            for m in poisoned:
                self._track(conn, "POISONMESSAGE", "POISONMESSAGE", m,
                            [r.address for r in m.recipients], ["Poison"] * len(m.recipients))
            return found, poisoned

        recovery, poisoned = await self.store.write(recover)
        self.store_id = await self.store.write(_store_id)
        self._hops = await self.store.read(q.queue_hops)
        for m in poisoned:
            log.error("message moved to Poison", internal_message_id=m.id,
                      message_id=m.message_id, crashes=m.crash_count)
        if recovery.crashed:
            log.warning("messages were in flight when the process stopped",
                        count=len(recovery.crashed), poisoned=len(recovery.poisoned))
        self._recovering = True
        try:
            for msg_id in sorted(set(recovery.crashed) - set(recovery.poisoned)):
                await self._process_alone(msg_id)
        finally:
            self._recovering = False
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._categorizer_loop(), name="categorizer"),
                       loop.create_task(self._dispatch_loop(), name="dispatcher"),
                       loop.create_task(self._sweep_loop(), name="sweeper"),
                       loop.create_task(self._spool_loop(), name="spool"),
                       loop.create_task(self.failover.run(), name="failover")]
        self._categorizer_wake.set()
        self._dispatch_wake.set()
        return recovery

    async def _process_alone(self, msg_id: int) -> None:
        """Take a message that was in flight at a crash through categorization and one
        delivery attempt with nothing else in flight, before normal work starts.

        A crash in a batch blames every message of the batch once; if the process dies
        again now, only this message was being processed, so only it is blamed a second
        time (and goes to Poison). If it survives, its crash count starts again from zero.
        """
        state = await self.store.read(lambda c: c.execute(
            "SELECT state FROM message WHERE id=?", (msg_id,)).fetchone())
        if state is None or state[0] == "poison":
            return
        failpoint("during_startup_recovery")  # crash tests: die again while recovering
        if state[0] == "submitted":
            await self._categorize_batch([msg_id])
        queues = await self.store.read(lambda c: [r[0] for r in c.execute(
            "SELECT DISTINCT queue FROM recipient WHERE message=? AND queue IS NOT NULL"
            " AND status IN ('Ready','Retry')", (msg_id,))])
        for queue_id in queues:  # due or not: this is its one isolated attempt
            self._in_flight.add(msg_id)
            await self._deliver_batch(queue_id, [msg_id], float("inf"))
        await self.store.write(lambda c: c.execute(
            "UPDATE message SET crash_count=0, suspect=0 WHERE id=?", (msg_id,)))

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish the batches in progress (up to ``timeout``), then stop every task."""
        self._stopping = True
        self._stopped.set()
        self._categorizer_wake.set()
        self._dispatch_wake.set()
        for event in self._queue_wake.values():
            event.set()
        tasks = [*self._tasks, *self._workers.values()]
        _, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._in_flight:  # cancelled mid-batch by our own stop: that is not a crash
            ids = list(self._in_flight)
            await self.store.write(lambda c: q.set_in_flight(c, ids, False))
            self._in_flight.clear()
        self._tasks.clear()
        self._workers.clear()

    def wake(self) -> None:
        self._categorizer_wake.set()
        self._dispatch_wake.set()

    def wake_categorizer(self) -> None:
        self._categorizer_wake.set()

    def wake_queue(self, queue_id: int, *, retry_now: bool = False) -> None:
        """Wake a delivery queue's worker (Resume-/Retry-Queue); ``retry_now`` also ends
        the pause after a failed batch."""
        if retry_now:
            self._queue_backoff.pop(queue_id, None)
        self._wake_queue(queue_id)

    def is_in_flight(self, message_id: int) -> bool:
        return message_id in self._in_flight

    def fail_in_conn(self, conn: sqlite3.Connection, message: QueuedMessage,
                     failures: Sequence[tuple[QueuedRecipient, SmtpResponse, str]]
                     ) -> list[Event]:
        """Track failures and commit the NDR when one is due (Remove-Message -WithNDR)."""
        return self._fail_in_conn(conn, message, failures)

    def emit(self, conn: sqlite3.Connection, events: Iterable[Event]) -> None:
        """Commit tracking events with the transaction of ``conn`` (Remove-Message)."""
        self._emit(conn, events)

    # -- submission --------------------------------------------------------------------

    async def submit(self, sub: Submission) -> SubmitResult:
        """Commit a message to the Submission queue: its internal id, or the response of the
        ``receive`` hook that refused it (results as data).

        Raises ``StoreError`` when the queue cannot commit: a fault of this server, not a
        verdict on the message. The caller acknowledges only a result with a message id.
        """
        verdict = await self.hooks.call_first("receive", submission=sub)
        if isinstance(verdict, SmtpResponse) and verdict.code >= 400:
            return SubmitResult(response=verdict)
        now = self.clock()
        expires = now + self.server.message_expiration_timeout

        def work(conn: sqlite3.Connection) -> QueuedMessage:
            message = _message_of(q.insert_submission(conn, sub, now, expires), sub, now, expires)
            self._track(conn, "RECEIVE", sub.source, message,
                        [r.address for r in sub.envelope.recipients],
                        [], connector=sub.source_name, reference=sub.reference or "",
                        context=sub.context, endpoints=_received_over(sub))
            return message

        message = await self.store.write(work)
        failpoint("after_submit_commit")  # crash tests: committed, not yet acknowledged
        msg_id = message.id
        self._categorizer_wake.set()
        await self.hooks.notify("on_submitted", message=message)
        return SubmitResult(msg_id)

    async def track_unqueued(self, sub: Submission, response: SmtpResponse, *,
                             dropped: bool) -> None:
        """Track a message an agent refused at the end of DATA (``response`` went to the
        client: FAIL) or accepted and deleted (DROP), which was never queued: a RECEIVE and
        the event that ended it, nothing else (the client has its answer; no NDR)."""
        now = self.clock()
        message = _message_of(0, sub, now, now)
        recipients = [r.address for r in sub.envelope.recipients]
        statuses = [str(response)] * len(recipients)

        def work(conn: sqlite3.Connection) -> None:
            self._track(conn, "RECEIVE", sub.source, message, recipients, statuses,
                        connector=sub.source_name, context=sub.context,
                        endpoints=_received_over(sub))
            self._track(conn, "DROP" if dropped else "FAIL", "AGENT", message, recipients,
                        statuses, connector=sub.source_name, context=sub.context,
                        endpoints=_received_over(sub))

        await self.store.write(work)

    async def bounce(self, sub: Submission, response: SmtpResponse) -> None:
        """Commit an NDR for a message refused before it was queued (Pickup limits, hooks).

        The NDR carries the original; the folder claim is committed with it, so the file
        can go once the NDR is durable.
        """
        now = self.clock()
        message = _message_of(0, sub, now, now)
        recipients = [QueuedRecipient(0, 0, r.address, S.FAILED, r.notify, r.orcpt)
                      for r in sub.envelope.recipients]

        def work(conn: sqlite3.Connection) -> None:
            self._track(conn, "RECEIVE", sub.source, message, [r.address for r in recipients],
                        [str(response)] * len(recipients), connector=sub.source_name,
                        context=sub.context, endpoints=_received_over(sub))
            # the FAIL comes from where the RECEIVE did: PICKUP, or ADMIN for Replay
            self._emit(conn, self._fail_in_conn(conn, message,
                                                [(r, response, sub.source) for r in recipients]))
            if sub.claim is not None:
                conn.execute("INSERT OR REPLACE INTO claim (name, message, at) VALUES (?,?,?)",
                             (sub.claim, None, now))

        await self.store.write(work)

    # -- categorizer -------------------------------------------------------------------

    async def _categorizer_loop(self) -> None:
        while not self._stopping:
            await self._categorizer_wake.wait()
            self._categorizer_wake.clear()
            while not self._stopping:
                try:
                    # a batch whose commit and release failed left in-flight marks: clear
                    # them first (retried each second while the disk fails), or those
                    # messages would wait for the sweeper
                    await self._release_stranded()
                    ids = await self.store.read(lambda c: q.submitted_message_ids(
                        c, self.CATEGORIZE_BATCH, self.clock()))
                    if not ids:
                        break
                    await self._categorize_batch(ids)
                except Exception:  # the stage must outlive a failing disk or a bug
                    log.exception("categorizer pass failed; retrying")
                    await self._pause(1.0)
                    self._categorizer_wake.set()
                    break

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def pause(self, seconds: float) -> None:
        await self._pause(seconds)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the pipeline stops."""
        try:
            await asyncio.wait_for(self._stopped.wait(), seconds)
        except TimeoutError:
            pass

    async def _categorize_batch(self, ids: list[int]) -> None:
        self.active["Submission"] += 1
        try:
            await self._categorize_ids(ids)
        finally:
            self.active["Submission"] -= 1

    async def _categorize_ids(self, ids: list[int]) -> None:
        await self._mark_in_flight(ids)
        messages = await self.store.read(lambda c: q.load_messages(c, ids))
        generation = self.generation
        results: list[Categorized] = []
        for message in messages:
            try:
                result = await self.categorizer.categorize(message)  # fires on_resolved
                await self.hooks.notify("on_routed", message=message,
                                        recipients=result.decisions)
                results.append(result)
            except Exception:
                log.exception("categorizer failed; the message stays in Submission",
                              internal_message_id=message.id)
                retry_in = self.server.message_retry_interval
                await self._release([message.id], retry_in=retry_in)
                # due then, not at the sweeper's next pass (up to 30 s later)
                self._loop.call_later(retry_in, self._categorizer_wake.set)
        # one write per message (its decisions and NDRs are atomic), all in one group commit
        # a reload during this batch: Unreachable decisions are not final (the new config
        # may route them; its resubmission of Unreachable has already run)
        stale = generation != self.generation
        committed = await asyncio.gather(*(
            self.store.write(partial(self._commit_categorized, result=r, stale=stale))
            for r in results), return_exceptions=True)
        touched: set[int] = set()
        for result, outcome in zip(results, committed):
            if isinstance(outcome, BaseException):
                # nothing of it is durable: it goes back to Submission with the leftovers
                # below (left marked in flight, it would wait for a restart and count a crash)
                log.error("committing categorizer results failed", error=str(outcome),
                          internal_message_id=result.message.id)
                continue
            self._in_flight.discard(result.message.id)
            _, queue_ids = outcome
            touched.update(queue_ids)
            await self.hooks.notify("on_categorized", message=result.message,
                                    recipients=result.decisions)
        leftover = [i for i in ids if i in self._in_flight]
        if leftover:
            try:
                await self._release(leftover)
            except Exception:  # the disk still fails: the sweeper clears the marks later
                self._in_flight.difference_update(leftover)
                self._stranded.update(leftover)
                raise
        for queue_id in touched:
            self._wake_queue(queue_id)

    def _commit_categorized(self, conn: sqlite3.Connection, result: Categorized,
                            stale: bool = False) -> tuple[list[Event], set[int]]:
        message = result.message
        events: list[Event] = []
        updates: list[RecipientUpdate] = []
        failures: list[Failure] = []
        hops: dict[tuple[str, str, str], int] = {}
        resubmit = False
        for d in result.decisions:
            row = d.recipient
            if row is None:  # added by expansion or redirect: a new recipient row
                assert d.envelope is not None
                new_id = q.add_recipients(conn, message.id, [d.envelope])[0]
                row = QueuedRecipient(new_id, message.id, d.address, S.SUBMITTED,
                                      d.envelope.notify, d.envelope.orcpt)
            address = d.address if d.address != row.address else None
            orcpt = d.orcpt if d.orcpt != row.orcpt else None
            if d.event in ("RESOLVE", "REDIRECT", "EXPAND") and d.related:
                events.append(Event(d.event, "ROUTING" if d.event == "REDIRECT" else "RESOLVER",
                                    message, [d.address], [], related=d.related))
            if d.kind == ROUTE:
                assert d.next_hop is not None
                queue_id = hops.get(d.next_hop.key)
                if queue_id is None:
                    queue_id = hops[d.next_hop.key] = q.ensure_queue(conn, d.next_hop)
                    self._hops[queue_id] = d.next_hop
                updates.append(RecipientUpdate(row.id, S.READY, queue_id=queue_id,
                                               address=address, orcpt=orcpt))
            elif d.kind == UNREACHABLE and stale:
                updates.append(RecipientUpdate(row.id, S.SUBMITTED, address=address, orcpt=orcpt))
                resubmit = True
            elif d.kind == UNREACHABLE:
                why = str(d.response) if d.response else "Unreachable: no connector matches"
                updates.append(RecipientUpdate(row.id, S.UNREACHABLE, address=address, orcpt=orcpt,
                                               last_response=why))
            elif d.kind == EXPANDED:
                updates.append(RecipientUpdate(row.id, S.EXPANDED, address=address))
            elif d.kind == FAIL:
                assert d.response is not None
                updates.append(RecipientUpdate(row.id, S.FAILED, address=address,
                                               last_response=str(d.response)))
                row.address = d.address
                failures.append((row, d.response, d.source))
        q.update_recipients(conn, updates)
        if len(hops) > 1:  # bifurcation: one queued item per next hop
            for key in list(hops)[1:]:
                events.append(Event("TRANSFER", "ROUTING", message, [], [], connector=key[2],
                                    context=f"{key[0]}:{key[1]}"))
        events.extend(self._fail_in_conn(conn, message, failures))
        q.set_message_state(conn, message.id, "submitted" if resubmit else "active")
        if resubmit:
            self._loop.call_soon_threadsafe(self._categorizer_wake.set)
        q.finish_if_done(conn, message.id)
        self._emit(conn, events)
        return events, set(hops.values())

    # -- delivery ----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            await self._dispatch_wake.wait()
            self._dispatch_wake.clear()
            if self._stopping:
                break
            for queue_id in await self.store.read(q.queue_ids_with_work):
                self._wake_queue(queue_id)

    def _wake_queue(self, queue_id: int) -> None:
        if self._stopping or self._recovering:  # start() dispatches every queue afterwards
            return
        event = self._queue_wake.setdefault(queue_id, asyncio.Event())
        event.set()
        worker = self._workers.get(queue_id)
        if worker is None or worker.done():
            self._workers[queue_id] = asyncio.get_running_loop().create_task(
                self._queue_worker(queue_id), name=f"queue-{queue_id}")

    async def _queue_worker(self, queue_id: int) -> None:
        """Feed a delivery queue's batches to the deliver hook.

        Up to ``BATCHES_IN_FLIGHT`` batches overlap, so one batch's file and network waits
        do not hold up the next; a message is reserved before it is read as due, so two
        batches never hold the same message. A queue whose next hop failed waits in Retry
        for its next attempt, then tries one batch at a time until the next hop answers.
        """
        wake = self._queue_wake[queue_id]
        running: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping:
                wake.clear()
                if len(running) >= self.BATCHES_IN_FLIGHT:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                backoff = self._queue_backoff.get(queue_id, 0.0) - time.monotonic()
                if backoff > 0:  # a batch failed outside the deliver hook: no hot loop
                    await self._pause(backoff)
                    continue
                try:
                    ids, later, suspended, probing = await self._due(queue_id)
                except Exception:
                    log.exception("reading delivery queue failed; retrying", queue=queue_id)
                    self._queue_backoff[queue_id] = time.monotonic() + 1.0
                    continue
                if ids and probing and running:  # one attempt at a dead next hop at a time
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                if ids:
                    self._in_flight.update(ids)
                    task = asyncio.get_running_loop().create_task(
                        self._guarded_batch(queue_id, ids, self.clock()))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    continue
                timeout = None if later is None else max(0.0, later - self.clock())
                if timeout is not None and self.worker.count > 1:
                    # another worker may end the queue's Retry (its next hop answered):
                    # the shared state is read again now and then
                    timeout = min(timeout, SHARED_STATE_POLL)
                if running:  # a batch in progress may free messages or make some due
                    waiter = asyncio.ensure_future(wake.wait())
                    await asyncio.wait({*running, waiter}, timeout=timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                if timeout is None and not suspended:
                    # idle: the worker ends after QueueMaxIdleTime; a wake restarts it
                    try:
                        await asyncio.wait_for(wake.wait(), self.server.queue_max_idle_time)
                    except TimeoutError:
                        if wake.is_set():  # woken while the wait was being cancelled
                            continue
                        return
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _due(self, queue_id: int) -> tuple[list[int], float | None, bool, bool]:
        """The next batch of due messages not held by another batch, the next retry time
        after that, whether the queue is suspended, and whether its next hop failed last
        time (then batches go one at a time).

        A queue in Retry has nothing due before its next attempt, whatever its messages'
        own times: mail that arrives meanwhile waits for that attempt too
        (docs/exchange.md, "Queues and retry").
        """
        now = self.clock()
        state = await self.store.read(lambda c: q.queue_state(c, queue_id))
        if state.suspended:
            return [], None, True, False
        if state.next_retry is not None and state.next_retry > now:
            return [], state.next_retry, False, True
        busy = set(self._in_flight)
        ids, later = await self.store.read(lambda c: q.due_for_delivery(
            c, queue_id, now, self.DELIVERY_BATCH, exclude=busy))
        ids = [i for i in ids if i not in self._in_flight]
        if ids and state.retry_count > 0 and self.worker.count > 1:
            index = self.worker.index
            if not await self.store.read(lambda c: q.take_attempt(
                    c, queue_id, index, now, ATTEMPT_HOLD)):
                # another worker makes the attempt after the Retry: wait for its outcome
                return [], now + SHARED_STATE_POLL, False, True
        return ids, later, False, state.retry_count > 0

    async def _guarded_batch(self, queue_id: int, ids: list[int], now: float) -> None:
        """A batch that fails outside the deliver hook (the queue could not commit) gives
        its messages back; the retry comes with the next wake or sweep."""
        self.active[str(queue_id)] += 1
        try:
            await self._deliver_batch(queue_id, ids, now)
        except Exception:
            log.exception("delivery batch failed; its messages stay queued", queue=queue_id)
            self._queue_backoff[queue_id] = time.monotonic() + self.server.message_retry_interval
            try:
                await self._release(ids)
            except Exception:
                self._in_flight.difference_update(ids)
                self._stranded.update(ids)  # the sweeper clears the database marks later
        finally:
            self.active[str(queue_id)] -= 1

    async def _deliver_batch(self, queue_id: int, ids: list[int], now: float) -> None:
        hop = self._hops.get(queue_id)
        if hop is None:
            self._hops = await self.store.read(q.queue_hops)
            hop = self._hops[queue_id]
        await self._mark_in_flight(ids)
        due = ("r.queue=? AND r.status IN ('Ready','Retry') AND COALESCE(r.next_retry,0)<=?"
               " AND r.suspended=0")
        messages = await self.store.read(
            lambda c: q.load_messages(c, ids, recipient_filter=due, params=(queue_id, now)))
        # removed (Remove-Message) between the reservation and the load: nothing to hold
        self._in_flight.difference_update(set(ids) - {m.id for m in messages})
        # the default domain lets agents unwrap IMCEA recipients (MailItem.address_of)
        items = [MailItem(m, m.recipients, hop, queue_id, self.directory.default_domain)
                 for m in messages if m.recipients]
        outcome = await self._call_deliver(hop, items)
        error: str | None
        if isinstance(outcome, (DeferQueue, FailQueue)):
            results = [self._queue_outcome(item, outcome) for item in items]
            error = str(outcome.response)
        else:
            results = outcome
            # a recipient the next hop deferred (a read-only or full mailbox or drop folder,
            # a 4xx reply) is why the queue still holds mail: Get-Queue's LastError says so
            deferrals = [r.response for result in results if isinstance(result, ItemResult)
                         for r in result.recipients.values() if r.kind == DEFERRED]
            error = str(deferrals[-1]) if deferrals else None
        retry_at: float | None = None
        writes: list[Awaitable[object]] = []
        if items and isinstance(outcome, DeferQueue):
            # the next hop failed as a whole: the queue goes to Retry, and its messages
            # (these and any that arrive meanwhile) wait for the queue's next attempt
            delay = self._queue_delay(outcome)
            retry_at = await self.store.write(lambda c: q.queue_deferred(
                c, queue_id, now, self.clock(), error or "", delay))
            log.info("queue in Retry: its next hop failed", queue=queue_id,
                     next_hop=hop.domain, connector=hop.connector, error=error,
                     next_retry=retry_at)
            if hop.connector and hop.delivery_type not in RELAY_TYPES:
                self.failover.failed(hop, now, error or "")
        elif items:  # the next hop answered: the queue leaves Retry
            self.failover.answered(hop)
            writes.append(self.store.write(
                lambda c: q.queue_attempted(c, queue_id, self.clock(), error)))
        writes += [self.store.write(partial(self._commit_delivery, item=item, result=result,
                                            retry_at=retry_at))
                   for item, result in zip(items, results)]
        committed = await asyncio.gather(*writes, return_exceptions=True)
        committed = committed[len(committed) - len(items):]
        if items:
            failpoint("after_delivery_commit")  # crash tests: results and events are durable
        leftover = [m.id for m in messages if not m.recipients]
        for item, events in zip(items, committed):
            if isinstance(events, BaseException):
                log.error("committing delivery results failed", error=str(events),
                          internal_message_id=item.message.id)
                leftover.append(item.message.id)  # not held in flight until a restart
                continue
            self._in_flight.discard(item.message.id)
        if leftover:
            await self._release(leftover)
        # other queues skipped these messages while they were in flight here: wake them
        others = await self.store.read(
            lambda c: q.other_queues_of(c, [m.id for m in messages], queue_id))
        for other in others:
            self._wake_queue(other)

    def delivery_context(self) -> DeliveryContext:
        """What a deliver (or probe) hook gets besides the mail."""
        return DeliveryContext(self.org, self.server, self.directory, self._record_intent,
                               self.clock, self.store_id, log, self._stamp_outbound)

    async def _stamp_outbound(self, item: MailItem, connector: Any,
                              content: bytes | MessageBody) -> list[bytes]:
        """The ``stamp_outbound`` fields of every plugin; a failing one adds none (the
        message goes unsigned rather than not at all)."""
        try:
            lists = await self.hooks.call_all(
                "stamp_outbound", item=item, connector=connector, content=content,
                organization=self.org, server=self.server)
        except Exception:
            log.exception("a stamp_outbound implementation failed; the message goes without"
                          " its fields", message=item.message.internal_id)
            return []
        return [field for fields in lists for field in fields]

    async def _call_deliver(self, hop: NextHop, items: list[MailItem]) -> Any:
        # a relay names the connector the other hub delivers through: not one for this hub
        relay = hop.delivery_type in RELAY_TYPES
        connector = self.connectors.get(hop.connector.lower()) \
            if hop.connector and not relay else None
        context = self.delivery_context()
        try:
            outcome = await self.hooks.call_first("deliver", next_hop=hop, connector=connector,
                                                  items=items, context=context)
        except Exception:
            log.exception("deliver hook raised; the items are deferred", next_hop=hop.key)
            return DeferQueue(LOCAL_ERROR, crashed=True)
        if outcome is None:
            return DeferQueue(NO_DELIVERY_PLUGIN)
        if isinstance(outcome, (DeferQueue, FailQueue)):
            return outcome
        if len(outcome) != len(items):
            log.error("deliver hook returned a wrong number of results", next_hop=hop.key)
            return DeferQueue(LOCAL_ERROR)
        return outcome

    def _queue_delay(self, outcome: DeferQueue) -> Callable[[int], float]:
        """The wait after a queue's n-th failure in a row: the agent's ``retry_in``, else
        the ladder (QueueGlitchRetry…, TransientFailureRetry…, then
        OutboundConnectionFailureRetryInterval)."""
        if outcome.retry_in is not None:
            fixed = outcome.retry_in
            return lambda _failures: fixed
        server = self.server
        return lambda failures: retry_delay(server, failures, queue_level=True)

    @staticmethod
    def _queue_outcome(item: MailItem, outcome: DeferQueue | FailQueue) -> ItemResult:
        if isinstance(outcome, FailQueue):
            return ItemResult.fail(item, outcome.response)
        result = ItemResult.defer(item, outcome.response, outcome.retry_in)
        result.crashed = outcome.crashed
        return result

    async def _record_intent(self, intents: dict[int, str]) -> None:
        await self.store.write(lambda c: q.record_intent(c, intents))

    def _commit_delivery(self, conn: sqlite3.Connection, item: MailItem, result: ItemResult,
                         retry_at: float | None = None) -> list[Event]:
        """Commit one item's results; ``retry_at`` is set when its queue went to Retry (its
        deferred recipients wait for the queue's next attempt, not their own ladder)."""
        message = item.message
        now = self.clock()
        events: list[Event] = []
        updates: list[RecipientUpdate] = []
        failures: list[Failure] = []
        source = SOURCE_OF_DELIVERY.get(item.next_hop.delivery_type, "SMTP")
        delivered: list[QueuedRecipient] = []
        delivered_status: list[str] = []  # each recipient's own response (RecipientStatus)
        for r in item.recipients:
            outcome = result.recipients.get(r.id) or RecipientResult.deferred(LOCAL_ERROR)
            attempts = r.attempts + 1
            if outcome.kind == DELIVERED:
                updates.append(RecipientUpdate(r.id, S.DELIVERED, attempts=attempts,
                                               last_response=str(outcome.response)))
                delivered.append(r)
                delivered_status.append(str(outcome.response))
            elif outcome.kind == FAILED:
                updates.append(RecipientUpdate(r.id, S.FAILED, attempts=attempts,
                                               last_response=str(outcome.response)))
                failures.append((r, outcome.response, "QUEUE", outcome.remote_mta))
            elif now >= message.expires_at:
                updates.append(RecipientUpdate(r.id, S.FAILED, attempts=attempts,
                                               last_response=str(EXPIRED)))
                failures.append((r, EXPIRED, "QUEUE"))
            else:
                if retry_at is not None:
                    next_retry = retry_at
                else:
                    next_retry = now + (outcome.retry_in if outcome.retry_in is not None
                                        else retry_delay(self.server, attempts,
                                                         queue_level=False))
                updates.append(RecipientUpdate(
                    r.id, S.RETRY, attempts=attempts, last_response=str(outcome.response),
                    next_retry=next_retry, first_attempt=r.first_attempt or now,
                    clear_intent=r.id in result.void_intents))
                events.append(Event("DEFER", "QUEUE", message, [r.address],
                                    [str(outcome.response)], connector=item.next_hop.connector))
        q.update_recipients(conn, updates)
        if delivered:
            event_id = "DELIVER" if source in ("STOREDRIVER", "GATEWAY", "AGENT") else "SEND"
            # over a connection (SMTP), Exchange's SEND names the remote end as the server
            ends = Endpoints(result.local_ip, self.server.fqdn, result.remote_ip,
                             result.remote_host) if result.remote_ip else None
            events.append(Event(event_id, source, message, [r.address for r in delivered],
                                delivered_status, connector=item.next_hop.connector,
                                context=result.detail,
                                endpoints=ends))
            events.extend(self._success_dsn(conn, message, item, delivered, result))
        events.extend(self._fail_in_conn(conn, message, failures))
        conn.execute("UPDATE message SET in_flight=0, suspect=0 WHERE id=?", (message.id,))
        if result.crashed:
            events.extend(self._count_crash(conn, item))
        elif message.crash_count:
            conn.execute("UPDATE message SET crash_count=0 WHERE id=?", (message.id,))
        q.finish_if_done(conn, message.id)
        self._emit(conn, events)
        return events

    def _count_crash(self, conn: sqlite3.Connection, item: MailItem) -> list[Event]:
        """An agent raised on this item: one crash. More consecutive crashes than
        PoisonThreshold make the message poison (held in the Poison queue until an
        administrator resumes it); a clean attempt in between starts the count again."""
        message = item.message
        count = conn.execute("UPDATE message SET crash_count=crash_count+1 WHERE id=?"
                             " RETURNING crash_count", (message.id,)).fetchone()[0]
        if not self.server.poison_message_detection_enabled or \
                count <= self.server.poison_threshold:
            return []
        conn.execute("UPDATE message SET state='poison', suspended=1 WHERE id=?", (message.id,))
        log.error("message moved to Poison: its delivery agent raised repeatedly",
                  internal_message_id=message.id, crashes=count,
                  connector=item.next_hop.connector)
        return [Event("POISONMESSAGE", "POISONMESSAGE", message,
                      [r.address for r in item.recipients], ["Poison"] * len(item.recipients),
                      connector=item.next_hop.connector)]

    # -- failures, NDRs and DSNs -------------------------------------------------------

    def _fail_in_conn(self, conn: sqlite3.Connection, message: QueuedMessage,
                      failures: Sequence[Failure]) -> list[Event]:
        """Track failures and commit the NDR (in the same transaction) when one is due.

        A failure is (recipient, response, tracking source[, remote MTA that refused]).
        """
        if not failures:
            return []
        events = [Event("FAIL", f[2], message, [f[0].address], [str(f[1])]) for f in failures]
        notify = [(f[0], f[1], f[3] if len(f) > 3 else None) for f in failures
                  if f[0].wants(Notify.FAILURE)]
        if message.mail_from.address and notify:
            _, dsn_msgid = self._insert_dsn(conn, message, [
                DsnRecipient(final_recipient=r.address, original_recipient=r.orcpt,
                             action="failed", status=resp.enhanced, diagnostic=str(resp),
                             remote_mta=mta, last_attempt=self.clock())
                for r, resp, mta in notify])
            events.append(Event("DSN", "DSN", message, [r.address for r, _, _ in notify],
                                [str(resp) for _, resp, _ in notify], reference=dsn_msgid))
        return events

    def _success_dsn(self, conn: sqlite3.Connection, message: QueuedMessage, item: MailItem,
                     delivered: list[QueuedRecipient], result: ItemResult) -> list[Event]:
        """NOTIFY=SUCCESS: 'delivered' for final delivery (a mailbox, an agent), 'relayed'
        for a hand-off to a system that sends no DSNs itself: a Foreign connector's drop
        folder, only when that connector has RelayDsnRequired
        (docs/exchange.md, "Foreign and Delivery Agent connectors"), or a next hop
        whose result says ``relayed`` (an SMTP server without DSN, RFC 3461 §5.2.2)."""
        wanted = [r for r in delivered if r.wants(Notify.SUCCESS)]
        if not wanted or not message.mail_from.address:
            return []
        flagged = {rid for rid, res in result.recipients.items() if res.relayed}
        if item.next_hop.delivery_type == "NonSmtpGatewayDelivery":
            connector = self.connectors.get(item.next_hop.connector.lower())
            if not getattr(connector, "relay_dsn_required", False):
                return []
            action = "relayed"
        elif item.next_hop.delivery_type in ("MapiDelivery", "DeliveryAgent"):
            action = "delivered"
        else:  # an SMTP next hop with DSN got the NOTIFY and owns the DSN from now on
            wanted = [r for r in wanted if r.id in flagged]
            if not wanted:
                return []
            action = "relayed"
        actions = ["relayed" if r.id in flagged else action for r in wanted]
        _, ref = self._insert_dsn(conn, message, [
            DsnRecipient(final_recipient=r.address, original_recipient=r.orcpt, action=a,
                         status="2.0.0", last_attempt=self.clock())
            for r, a in zip(wanted, actions, strict=True)])
        return [Event("DSN", "DSN", message, [r.address for r in wanted], actions,
                      reference=ref)]

    def _insert_dsn(self, conn: sqlite3.Connection, message: QueuedMessage,
                    recipients: list[DsnRecipient]) -> tuple[int, str]:
        body = message.body
        if body.size < message.size:  # loaded without its body
            loaded = q.load_messages(conn, [message.id], recipient_filter="0")
            body = loaded[0].body if loaded else body
        # only a failure returns the whole original (RET=FULL), and a large one is returned
        # as its header section only (build_dsn's limit): read no more of it than that
        returned = any(r.action == "failed" for r in recipients) and \
            (message.mail_from.ret or "").strip().upper() != "HDRS"
        whole = returned and body.size <= DSN_RETURN_LIMIT
        try:
            original = body.read() if whole else body.read_prefix(DSN_HEADER_SCAN)
        except OSError as exc:  # a spool file lost (a restore without it): the NDR still goes
            log.error("message body unreadable; the DSN returns what is left of it",
                      internal_message_id=message.id, error=str(exc))
            original = body.prefix
        domain = self.org.default_domain.domain_name
        dsn, dsn_msgid = build_dsn(
            original=original, original_size=body.size, max_return_size=DSN_RETURN_LIMIT,
            mail_from=message.mail_from, recipients=recipients,
            reporting_mta=self.server.fqdn, postmaster=self.org.postmaster,
            arrival_date=message.received_at, message_id_domain=domain, now=self.clock())
        sub = Submission(
            envelope=Envelope(MailFrom(""), [EnvelopeRecipient(message.mail_from.address,
                                                               frozenset({Notify.NEVER}))]),
            body=MessageBody.of(dsn), source="DSN", source_name="DSN", message_id=dsn_msgid,
            subject=subject_of(parse_header_section(dsn)), reference=message.message_id)
        now = self.clock()
        dsn_id = q.insert_submission(conn, sub, now, now + self.server.message_expiration_timeout)
        self._loop.call_soon_threadsafe(self._categorizer_wake.set)  # we are in the db thread
        return dsn_id, dsn_msgid

    # -- expiry and delay notifications ------------------------------------------------

    async def _sweep_spool_orphans(self) -> None:
        """Make the spool folder durable, then remove the spool files no message row names:
        bodies written for commits that never happened (a crash, a refused message). Only
        at start: while running, a file being received is named by no row yet."""
        folder = spool_folder(self.store.path)
        await asyncio.to_thread(make_durable_folder, folder)
        named = await self.store.read(q.spool_names)
        orphans = await asyncio.to_thread(_remove_unnamed, folder, named)
        if orphans:
            log.info("spool files of uncommitted messages removed", count=orphans)

    async def _spool_loop(self) -> None:
        """Remove the spool files of messages the queue is done with (``spool_garbage``),
        after the commit that removed the last message naming them."""
        folder = spool_folder(self.store.path)
        while not self._stopping:
            try:
                remove, seen = await self.store.read(q.spool_garbage)
                if seen:
                    await asyncio.to_thread(_unlink_all, folder, remove)
                    await self.store.write(partial(q.forget_spool_garbage, names=seen))
            except Exception:
                log.exception("spool clean-up failed")
            await asyncio.sleep(SPOOL_SWEEP_INTERVAL)

    async def _sweep_loop(self) -> None:
        while not self._stopping:
            interval = min(self.server.message_expiration_timeout / 20,
                           self.server.delay_notification_timeout / 4)
            interval = min(30.0, max(0.2, interval))
            try:
                await self.store.write(self._sweep)
                self._categorizer_wake.set()  # picks up Submission items whose retry came due
                self._dispatch_wake.set()  # revives a queue worker that died or went idle
                await self._release_stranded()
            except Exception:
                log.exception("sweeper failed")
            try:
                await asyncio.wait_for(self._stopped.wait(), interval)
            except TimeoutError:
                pass

    def _sweep(self, conn: sqlite3.Connection) -> list[Event]:
        now = self.clock()
        events: list[Event] = []
        expired = [r[0] for r in conn.execute(
            "SELECT DISTINCT m.id FROM message m JOIN recipient r ON r.message=m.id"
            " WHERE m.state IN ('active','submitted') AND m.in_flight=0 AND m.expires_at<=?"
            " AND r.status IN ('Ready','Retry','Unreachable','Submitted')", (now,))]
        for message in q.load_messages(conn, expired, recipient_filter=(
                "r.status IN ('Ready','Retry','Unreachable','Submitted')")):
            q.update_recipients(conn, [RecipientUpdate(r.id, S.FAILED, last_response=str(EXPIRED))
                                       for r in message.recipients])
            events += self._fail_in_conn(conn, message, [(r, EXPIRED, "QUEUE")
                                                         for r in message.recipients])
            conn.execute("UPDATE message SET state='active' WHERE id=?", (message.id,))
            q.finish_if_done(conn, message.id)
        if self.server.delay_notification_timeout and self._delay_dsn_enabled():
            # delayed: deferred, unreachable, or never tried because its queue is in Retry
            in_retry = q.queues_in_retry(conn)
            marks = ",".join(str(int(i)) for i in in_retry)
            waiting = ("(r.status IN ('Retry','Unreachable') OR (r.status='Ready' AND r.queue"
                       f" IN ({marks})))" " AND r.delay_notified=0")
            queue_errors = {i: e for i, e in in_retry.items() if e is not None}
            due = [r[0] for r in conn.execute(
                "SELECT DISTINCT m.id FROM message m JOIN recipient r ON r.message=m.id"
                f" WHERE m.state='active' AND m.sender<>'' AND m.received_at<=? AND {waiting}",
                (now - self.server.delay_notification_timeout,))]
            for message in q.load_messages(conn, due, recipient_filter=waiting):
                wanted = [r for r in message.recipients if r.wants(Notify.DELAY)]
                conn.executemany("UPDATE recipient SET delay_notified=1 WHERE id=?",
                                 [(r.id,) for r in message.recipients])
                if not wanted:
                    continue
                for r in wanted:  # never tried: its queue's last error says why
                    if not r.last_response and r.queue_id in queue_errors:
                        r.last_response = queue_errors[r.queue_id]
                _, ref = self._insert_dsn(conn, message, [
                    DsnRecipient(final_recipient=r.address, original_recipient=r.orcpt,
                                 action="delayed", status=_delay_status(r),
                                 diagnostic=r.last_response,
                                 will_retry_until=message.expires_at) for r in wanted])
                events.append(Event("DSN", "DSN", message, [r.address for r in wanted],
                                    ["delayed"] * len(wanted), reference=ref))
        self._emit(conn, events)
        return events

    def _delay_dsn_enabled(self) -> bool:
        tc = self.org.transport_config
        return tc.external_delay_dsn_enabled or tc.internal_delay_dsn_enabled

    # -- helpers -----------------------------------------------------------------------

    async def _mark_in_flight(self, ids: list[int]) -> None:
        await self.store.write(lambda c: q.set_in_flight(c, ids, True))
        self._in_flight.update(ids)

    async def _release_stranded(self) -> None:
        """Clear the in-flight marks a failed release left in the database."""
        if self._stranded:
            ids = list(self._stranded)
            await self.store.write(lambda c: q.release(c, ids, None))
            self._stranded.difference_update(ids)

    async def _release(self, ids: list[int], retry_in: float | None = None) -> None:
        """Clear the in-flight mark; ``retry_in`` keeps a Submission item back that long."""
        not_before = None if retry_in is None else self.clock() + retry_in
        await self.store.write(lambda c: q.release(c, ids, not_before))
        self._in_flight.difference_update(ids)

    def _track(self, conn: sqlite3.Connection, event_id: str, source: str,
               message: QueuedMessage, recipients: list[str],
               statuses: list[str], *, related: str = "", connector: str = "",
               reference: str = "", context: str = "",
               endpoints: Endpoints | None = None) -> None:
        """Record one event in the transaction of the queue change it describes (``conn``):
        the outbox of the tracking log keeps it through a crash (``hubport.core.tracking``)."""
        ends = endpoints or Endpoints()
        self.tracking.log(
            event_id, source, internal_message_id=str(message.id),
            message_id=message.message_id, recipients=recipients, recipient_status=statuses,
            total_bytes=message.size, related_recipient_address=related, reference=reference,
            subject=message.subject, sender=message.mail_from.address,
            return_path=message.mail_from.address or "<>", connector_id=connector,
            source_context=context, client_ip=ends.client_ip,
            client_hostname=ends.client_hostname, server_ip=ends.server_ip,
            server_hostname=ends.server_hostname, when=self.clock(), conn=conn)

    def _emit(self, conn: sqlite3.Connection, events: Iterable[Event]) -> None:
        """Commit ``events`` with the transaction of ``conn`` (in the database thread)."""
        for e in events:
            self._track(conn, e.event_id, e.source, e.message, e.recipients, e.statuses,
                        related=e.related, connector=e.connector, reference=e.reference,
                        context=e.context, endpoints=e.endpoints)


def _store_id(conn: sqlite3.Connection) -> str:
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = conn.execute("SELECT value FROM meta WHERE key='store_id'").fetchone()
    if row:
        return str(row[0])
    value = uuid.uuid4().hex[:12]
    conn.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?)", (value,))
    return value


def _remove_unnamed(folder: Path, named: set[str]) -> int:
    """Remove the files of ``folder`` not in ``named``; how many went."""
    try:
        present = [p for p in folder.iterdir() if p.name.endswith(SPOOL_SUFFIX)]
    except FileNotFoundError:
        return 0
    unnamed = [p.name for p in present if p.name not in named]
    _unlink_all(folder, unnamed)
    return len(unnamed)


def _unlink_all(folder: Path, names: Iterable[str]) -> None:
    for name in names:
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass


def _delay_status(r: QueuedRecipient) -> str:
    if r.last_response:
        try:
            return SmtpResponse.parse(r.last_response).enhanced.replace("5.", "4.", 1)
        except ValueError:
            pass
    return "4.4.7"


def _message_of(msg_id: int, sub: Submission, now: float, expires: float) -> QueuedMessage:
    return QueuedMessage(
        id=msg_id, internal_id=str(msg_id), message_id=sub.message_id,
        mail_from=sub.envelope.mail_from, body=sub.body, size=sub.body.size, source=sub.source,
        source_name=sub.source_name, subject=sub.subject, received_at=now, expires_at=expires,
        recipients=[QueuedRecipient(0, msg_id, r.address, S.SUBMITTED, r.notify, r.orcpt)
                    for r in sub.envelope.recipients])
