"""Connector services: the lifecycle a connector type owns on the server that runs it.

Some connector types need something running while the daemon runs: a Receive connector
listens on its bindings, a Send connector may keep a pool of outbound connections. Such a
type defines ``create_service(runtime)`` (a classmethod) returning a ``ConnectorService``;
the daemon creates one service per type at start, hands it the type's connectors from the
organization (``apply``) at start and after every accepted configuration change, and stops
it before the pipeline drains. The service decides which of the connectors are scoped to
this server (``Server`` for receive connectors, ``SourceTransportServers`` for send ones).

The core knows the service only through this contract and offers it the ``ServiceRuntime``:
the pipeline's ``submit``, the hooks, the current organization and a back-pressure check.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from core.model import SmtpResponse, Submission

if TYPE_CHECKING:
    from core.config import Organization, TransportServer
    from core.hooks import Hooks
    from core.pipeline import Pipeline
    from core.tracking import TrackingLog

#: the reply for new mail while the queue cannot take it (RELIABILITY G53/G54)
INSUFFICIENT_STORAGE = SmtpResponse(452, "4.3.1", "Insufficient system storage")


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
    _free_checked: float = field(default=0.0, repr=False)
    _free_ok: bool = field(default=True, repr=False)

    @property
    def organization(self) -> Organization:
        return self.organization_of()

    @property
    def server(self) -> TransportServer:
        return self.organization.server(self.server_name)

    async def submit(self, submission: Submission) -> int:
        """Commit a message durably (``Pipeline.submit``); acknowledge only after it returns.

        Raises ``core.pipeline.Rejected`` (a receive hook said no) or
        ``core.store.StoreError`` (nothing was committed).
        """
        return await self.pipeline.submit(submission)

    def admission(self) -> SmtpResponse | None:
        """``None`` when new mail may come in, else the 4xx to answer (back pressure).

        New mail is refused while the queue database cannot commit or its volume has less
        free space than ``QueueDatabaseMinimumFreeSpace``; delivery of queued mail goes on.
        The free space is looked at most once a second.
        """
        if not self.pipeline.store.healthy:
            return INSUFFICIENT_STORAGE
        minimum = self.server.queue_database_minimum_free_space
        if minimum is None:
            return None
        now = time.monotonic()
        if now - self._free_checked >= 1.0:
            self._free_checked = now
            try:
                st = os.statvfs(self.pipeline.store.path.parent)
                self._free_ok = st.f_bavail * st.f_frsize >= minimum
            except OSError:
                self._free_ok = False
        return None if self._free_ok else INSUFFICIENT_STORAGE
