"""The Send connectors' service: what outbound delivery keeps while the daemon runs.

Outbound connections belong to the deliveries the pipeline runs, so there is nothing to
start; what outlives a delivery is the Send protocol log (``protolog``), whose lines are
buffered and written by a background flusher. The daemon stops services before it drains
the pipeline, while deliveries may still be logging; so `stop` leaves the log alone and
`close`, called once the pipeline has drained, writes the last lines and stops the flusher.
`apply` also hands delivery the runtime's shared counters, so the outbound connection
limits count the connections of every worker of the server (``delivery.Limits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hubport.core.services import ServiceRuntime
from hubport.plugins.smtp_send.delivery import limits
from hubport.plugins.smtp_send.protolog import send_logs


class SendService:
    """Implements ``hubport.core.services.ConnectorService`` for ``[[send_connector]]``."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        #: every SendProtocolLogPath this server has had (a reload may change it)
        self._directories: set[Path] = set()
        # made before the pipeline starts (core/daemon.py), so the deliveries of recovered
        # mail already count server-wide and write this worker's protocol log files
        self._adopt()

    async def apply(self, connectors: Sequence[Any]) -> None:
        self._adopt()

    def _adopt(self) -> None:
        # MaxOutboundConnections and MaxPerDomainOutboundConnections count server-wide
        limits().bind(self.runtime.counters)
        directory = self.runtime.server.send_protocol_log_path
        if directory is not None:
            self._directories.add(directory)
            send_logs().use(directory, self.runtime.worker)

    async def stop(self) -> None:
        """Nothing to stop: deliveries still running finish while the pipeline drains."""

    async def close(self) -> None:
        """The pipeline has drained: flush and close this server's Send protocol logs."""
        await send_logs().close(self._directories)
