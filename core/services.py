"""Connector services: the lifecycle a connector type owns on the server that runs it.

Some connector types need something running while the daemon runs: a Receive connector
listens on its bindings, a Send connector may keep a pool of outbound connections. Such a
type defines ``create_service(runtime)`` (a classmethod) returning a ``ConnectorService``;
the daemon creates one service per type at start, hands it the type's connectors from the
organization (``apply``) at start and after every accepted configuration change, and stops
it before the pipeline drains. A service that also defines ``async def close()`` has it
called once the pipeline has drained, for what deliveries use until their end (the Send
protocol log's last lines). The service decides which of the connectors are scoped to
this server (``Server`` for receive connectors, ``SourceTransportServers`` for send ones).

The core knows the service only through this contract and offers it the ``ServiceRuntime``:
the pipeline's ``submit``, the hooks, the current organization and a back-pressure check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from hubport.core.backpressure import INSUFFICIENT_RESOURCES, BackPressure
from hubport.core.body import SpoolWriter, spool_folder
from hubport.core.counters import SharedCounters
from hubport.core.model import SmtpResponse, Submission, SubmitResult
from hubport.core.workers import WorkerSlot

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer
    from hubport.core.hooks import Hooks
    from hubport.core.pipeline import Pipeline
    from hubport.core.tracking import TrackingLog

class ServiceError(Exception):
    """A service could not start or apply its connectors (a port in use, a bad certificate)."""


class ConnectorService(Protocol):
    """What ``create_service`` returns."""

    async def apply(self, connectors: Sequence[Any]) -> None:
        """Adopt the configured connectors of this type (at start and after a reload).

        Raise ``ServiceError`` when they cannot be served; at start the daemon then exits,
        after a reload it logs the error and the service keeps what it had.
        """

    async def stop(self) -> None:
        """Stop accepting work and finish (or abandon safely) what is in progress."""


@dataclass
class ServiceRuntime:
    """What the daemon offers connector services."""

    server_name: str
    hooks: Hooks
    pipeline: Pipeline
    tracking: TrackingLog
    #: the organization in force (it changes on a reload)
    organization_of: Callable[[], Organization]
    clock: Callable[[], float] = time.time
    #: the daemon's resource monitor (None: only the store's health is looked at)
    backpressure: BackPressure | None = None
    #: this process's place among the server's workers (limits that are per server are
    #: counted across all of them)
    worker: WorkerSlot = field(default_factory=WorkerSlot)
    #: True for the process that opens the server's listeners first: with several workers
    #: (listeners shared with SO_REUSEPORT) it checks that no other process holds a binding
    first_bind: bool = True
    #: connection counts shared by the server's workers (core/counters.py); the daemon
    #: attaches the server's file, the default is worker 0 of 1's in-memory counters
    counters: SharedCounters = field(
        default_factory=lambda: SharedCounters.attach(None, WorkerSlot()))

    @property
    def organization(self) -> Organization:
        return self.organization_of()

    @property
    def server(self) -> TransportServer:
        return self.organization.server(self.server_name)

    def spool_writer(self) -> SpoolWriter:
        """A writer for a body being received (core/body.py): in memory while small, in
        this worker's spool folder when large. Give its ``finish()`` to a ``Submission``;
        ``discard()`` it when the message is not queued (the writer owns the file until a
        queued result)."""
        return SpoolWriter(spool_folder(self.pipeline.store.path))

    async def submit(self, submission: Submission) -> SubmitResult:
        """Commit a message durably (``Pipeline.submit``): queued with its id, or refused by a
        ``receive`` hook with its response. Acknowledge only a queued result.

        Raises ``hubport.core.store.StoreError`` when nothing could be committed.
        """
        return await self.pipeline.submit(submission)

    async def track_unqueued(self, submission: Submission, response: SmtpResponse, *,
                             dropped: bool = False) -> None:
        """Track a message refused (or, ``dropped``, accepted and deleted) by an agent at the
        end of DATA, which is never queued (``Pipeline.track_unqueued``)."""
        await self.pipeline.track_unqueued(submission, response, dropped=dropped)

    def admission(self, sender: str | None = None, *, internal: bool = False
                  ) -> SmtpResponse | None:
        """``None`` when a new message may come in, else the 452 4.3.1 to answer at MAIL.

        Back pressure (``hubport.core.backpressure``): at High every sender is refused, at Medium a
        ``sender`` outside the authoritative domains unless the session is ``internal`` (an
        authenticated user or another hub). ``sender`` None asks before the sender is known.
        Queued mail is delivered whatever this says. Costs no I/O: the monitor samples.
        """
        if self.backpressure is not None:
            return self.backpressure.admission(sender, internal=internal)
        return None if self.pipeline.store.healthy else INSUFFICIENT_RESOURCES
