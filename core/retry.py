"""The retry ladder and expiry (docs/exchange.md, "Queues and retry").

After a connection-level failure (the next hop as a whole failed: ``DeferQueue``) the
queue goes to Retry and retries ``QueueGlitchRetryCount`` times at
``QueueGlitchRetryInterval``, then ``TransientFailureRetryCount`` times at
``TransientFailureRetryInterval``, then every ``OutboundConnectionFailureRetryInterval``
until its messages expire; ``attempts`` then counts the queue's failures in a row, and the
queue's messages wait for its next attempt together (``hubport.core.queue.queue_deferred``). A
message-level deferral (a 4xx for one message or recipient while the next hop works) waits
``MessageRetryInterval`` for that message alone. Every interval is configurable, so tests
compress them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hubport.core.model import SmtpResponse

if TYPE_CHECKING:
    from hubport.core.config import TransportServer

EXPIRED = SmtpResponse(550, "4.4.7", "QUEUE.Expired; message expired")


def retry_delay(server: TransportServer, attempts: int, *, queue_level: bool) -> float:
    """Seconds to wait before the next try, ``attempts`` tries having failed so far."""
    if not queue_level:
        return server.message_retry_interval
    glitch = server.queue_glitch_retry_count
    if attempts <= glitch:
        return server.queue_glitch_retry_interval
    if attempts <= glitch + server.transient_failure_retry_count:
        return server.transient_failure_retry_interval
    return server.outbound_connection_failure_retry_interval
