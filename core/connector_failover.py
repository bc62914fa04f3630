"""Connector failover to the next cost (``[transport_config] ConnectorFailover = "NextCost"``).

Exchange 2010 sends mail through the one connector that routing picks (most specific
address space, then lowest cost) and, when that connector's next hop is down, keeps the mail
queued there until it answers or the mail expires. Administrators who give a second
connector a higher cost for the same address space often expect it to take over; with
``NextCost`` hubport does:

- a connector whose next hop has failed as a whole (every smart host or MX host, the queue
  in Retry) for ``ConnectorFailoverAfter`` is *failed over*: routing passes it by for the
  next candidate of the **same** address-space specificity (so nobody who may not receive
  through the other connector ever does), and the mail queued for it, not in transmission,
  goes back through the categorizer (one RESUBMIT tracking event per message, naming both
  connectors). A message in transmission stays, so none is sent twice;
- every retry interval its next hop is probed (``probe_next_hop``: the connector type's
  plugin opens a session up to MAIL and quits); once it answers, new mail goes to it again.

The state is this worker's, in memory: after a restart a connector is trusted until it fails
for ``ConnectorFailoverAfter`` again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from hubport.core import queue as q
from hubport.core.config_fields import format_duration
from hubport.core.model import NextHop
from hubport.core.queue_view import clock
from hubport.core.retry import retry_delay

if TYPE_CHECKING:
    from hubport.core.pipeline import Pipeline

__all__ = ["ConnectorFailover", "Failing"]

log = structlog.get_logger("hubport.failover")
TICK = 1.0  # seconds between checks of the failing connectors


@dataclass
class Failing:
    """A connector whose next hop has failed as a whole since ``since``."""

    connector: str
    next_hop: NextHop
    since: float
    error: str
    moved_at: float | None = None
    fallback: str = ""  # the connector its mail went to (the first one seen)
    probes: int = 0
    next_probe: float = 0.0
    probing: bool = False

    def describe(self) -> str:
        if self.moved_at is None:
            return f"next hop failing since {clock(self.since)}: {self.error}"
        return (f"failed over to {self.fallback or 'the next-cost connector'} at"
                f" {clock(self.moved_at)} (ConnectorFailover NextCost): {self.error}")


class ConnectorFailover:
    """The failing connectors of one pipeline, and the moves of their mail."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.failing: dict[str, Failing] = {}

    # -- what routing asks ------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.pipeline.org.transport_config.connector_failover == "NextCost"

    def avoided(self) -> frozenset[str]:
        """The connectors routing passes by (lower-case names)."""
        if not self.enabled:
            return frozenset()
        return frozenset(k for k, f in self.failing.items() if f.moved_at is not None)

    def snapshot(self) -> list[dict[str, Any]]:
        """For Get-Queue and Test-Route."""
        return [{"connector": f.connector, "since": f.since, "moved_at": f.moved_at,
                 "fallback": f.fallback, "error": f.error, "next_probe": f.next_probe,
                 "state": "FailedOver" if f.moved_at is not None else "Failing",
                 "describe": f.describe()}
                for f in self.failing.values()]

    # -- what delivery tells -----------------------------------------------------------

    def failed(self, hop: NextHop, now: float, error: str) -> None:
        """The connector's next hop failed as a whole (its queue went to Retry)."""
        key = hop.connector.lower()
        if key and key not in self.failing:
            self.failing[key] = Failing(hop.connector, hop, now, error)
        elif key:
            self.failing[key].error = error

    def answered(self, hop: NextHop) -> None:
        """The next hop took a session: the connector is healthy (unless its mail moved:
        then the probe decides, so mail does not flap on one lucky session)."""
        found = self.failing.get(hop.connector.lower())
        if found is not None and found.moved_at is None:
            del self.failing[hop.connector.lower()]

    def forget_gone(self) -> None:
        """After a reload: connectors that are gone or disabled are nobody's concern."""
        known = {c.name.lower() for c in self.pipeline.org.connectors if c.enabled}
        for key in [k for k in self.failing if k not in known]:
            del self.failing[key]

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        while not self.pipeline.stopping:
            try:
                await self.tick(self.pipeline.clock())
            except Exception:
                log.exception("connector failover check failed")
            await self.pipeline.pause(TICK)

    async def tick(self, now: float) -> None:
        if not self.enabled:
            for f in self.failing.values():
                f.moved_at = None  # failover turned off: routing is Exchange's again
            return
        after = self.pipeline.org.transport_config.connector_failover_after
        for f in list(self.failing.values()):
            if f.moved_at is None and now - f.since >= after:
                await self._move(f, now)
            elif f.moved_at is not None and not f.probing and now >= f.next_probe:
                f.probing = True
                asyncio.get_running_loop().create_task(self._probe(f))

    async def _move(self, f: Failing, now: float) -> None:
        """Fail the connector over: routing avoids it, its queued mail is categorized
        again. Nothing moves when no connector of the same specificity can take the mail."""
        pipeline = self.pipeline
        queues = [qid for qid, hop in (await pipeline.store.read(q.queue_hops)).items()
                  if hop.connector.lower() == f.connector.lower()]
        messages = await pipeline.store.read(lambda c: _waiting(c, queues))
        avoid = self.avoided() | {f.connector.lower()}
        fallback = self._fallback(messages, avoid) if messages else self._any_fallback(avoid)
        if not fallback:
            if f.probes == 0:
                log.warning("connector failing, and no connector of the same address space"
                            " can take its mail: it waits", connector=f.connector,
                            failing_since=f.since, error=f.error)
            f.probes += 1
            f.since = now  # look again after another ConnectorFailoverAfter
            return
        f.moved_at, f.fallback = now, fallback
        f.next_probe = now + self._delay(f)
        movable = [m for m in messages if not pipeline.is_in_flight(m.id)]
        context = (f"ConnectorFailover NextCost: {f.connector} -> {fallback}; its next hop"
                   f" failed for {format_duration(round(now - f.since))}: {f.error}")

        def resubmit(conn: Any) -> int:
            from hubport.core.pipeline import Event

            ids = [m.id for m in movable]
            if not ids:
                return 0
            marks = ",".join("?" * len(ids))
            moved = q.resubmit_recipients(
                conn, f"m.in_flight=0 AND m.id IN ({marks}) AND {_where(queues)}",
                [*ids, *queues])
            pipeline.emit(conn, [Event("RESUBMIT", "ROUTING", m, [r.address for r in
                                                                  m.recipients],
                                       [], connector=f.connector, context=context)
                           for m in movable])
            return moved

        moved = await pipeline.store.write(resubmit)
        pipeline.wake_categorizer()
        log.warning("connector failed over to the next cost", connector=f.connector,
                    to=fallback, failing_for=format_duration(round(now - f.since)),
                    recipients=moved, error=f.error)

    def _fallback(self, messages: list[Any], avoid: frozenset[str]) -> str:
        routing = self.pipeline.categorizer.routing
        for m in messages:
            for r in m.recipients:
                decision = routing.choose("SMTP", r.address, m.size, avoid=avoid)
                if decision.candidate is not None and decision.failover_from:
                    return decision.candidate.name
        return ""

    def _any_fallback(self, avoid: frozenset[str]) -> str:
        """With nothing queued: the connector an address of its SMTP address spaces would
        go to instead, if any."""
        connector = self.pipeline.connectors.get(next(iter(avoid - self.avoided()), ""))
        routing = self.pipeline.categorizer.routing
        for space in getattr(connector, "address_spaces", ()):
            if space.type != "SMTP":
                continue
            domain = "failover-probe.invalid" if space.space == "*" else \
                space.space.replace("*", "failover-probe")
            decision = routing.choose("SMTP", f"postmaster@{domain}", 0, avoid=avoid)
            if decision.candidate is not None and decision.failover_from:
                return decision.candidate.name
        return ""

    def _delay(self, f: Failing) -> float:
        """The queue retry ladder: probes come as often as a failed queue's retries."""
        return retry_delay(self.pipeline.server, f.probes + 1, queue_level=True)

    async def _probe(self, f: Failing) -> None:
        pipeline = self.pipeline
        try:
            connector = pipeline.connectors.get(f.connector.lower())
            answered = connector is not None and bool(await pipeline.hooks.call_first(
                "probe_next_hop", next_hop=f.next_hop, connector=connector,
                context=pipeline.delivery_context()))
        except Exception:
            log.exception("probing a failed-over connector failed", connector=f.connector)
            answered = False
        finally:
            f.probing = False
        now = pipeline.clock()
        if answered:
            self.failing.pop(f.connector.lower(), None)
            log.warning("failed-over connector answers again: new mail returns to it",
                        connector=f.connector, was_with=f.fallback,
                        failed_over_for=format_duration(round(now - (f.moved_at or now))))
            return
        f.probes += 1
        f.next_probe = now + self._delay(f)


def _where(queues: list[int]) -> str:
    return (f"r.queue IN ({','.join('?' * len(queues))}) AND r.status IN ('Ready','Retry')"
            " AND r.suspended=0")


def _waiting(conn: Any, queues: list[int]) -> list[Any]:
    """The messages waiting in ``queues``, with those of their recipients that wait there
    (without their content: routing needs the envelope and the size)."""
    if not queues:
        return []
    ids = [row[0] for row in conn.execute(
        f"SELECT DISTINCT r.message FROM recipient r WHERE {_where(queues)}", queues)]
    return q.load_messages(conn, ids, with_data=False, recipient_filter=_where(queues),
                           params=queues)
