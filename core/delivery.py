"""The delivery-agent API: what a custom delivery agent implements.

Shaped like Exchange's ``DeliveryAgent`` (docs/exchange.md, "Foreign and Delivery Agent
connectors"): for each connection to a next hop the transport calls ``open`` → ``deliver``
(once per mail item) → ``close``. Results are data:

* ``open`` returns ``None`` when the connection is up, ``DeferQueue`` to put the whole queue
  into Retry (with an optional retry interval), or ``FailQueue`` to fail every item.
* ``deliver`` returns an ``ItemResult``: one ``RecipientResult`` per recipient — delivered,
  deferred (optionally with a retry interval) or failed with an SMTP response. Helpers
  acknowledge the whole item at once (``ItemResult.success(item)``, ``.defer``, ``.fail``).

An exception raised by an agent is contained by the core: the item is deferred with
``451 4.3.0``, and a message that crashes the process repeatedly goes to Poison.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hubport.core.addresses import imcea_decode
from hubport.core.body import MessageBody
from hubport.core.model import (
    Envelope,
    EnvelopeRecipient,
    NextHop,
    QueuedMessage,
    QueuedRecipient,
    SmtpResponse,
)

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer
    from hubport.core.config_fields import FieldReader
    from hubport.core.directory import RecipientDirectory

DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"

OK = SmtpResponse(250, "2.0.0", "OK")
LOCAL_ERROR = SmtpResponse(451, "4.3.0", "Local error in processing")


@dataclass(frozen=True, slots=True)
class RecipientAddress:
    """A recipient's address as the system behind the connector knows it.

    A non-SMTP recipient (``SMS:+15551234``, ``TICKET:support``) crosses the transport
    IMCEA-encapsulated in the organization's default domain
    (``IMCEASMS-+2B15551234@contoso.test``; docs/exchange.md, "Accepted domains and
    recipients"): that SMTP form is what routing, the queue and the tracking log use, and
    it is what ``QueuedRecipient.address`` holds. This is the address unwrapped again, for
    the agent that hands it to the foreign system. An ordinary recipient has type ``SMTP``
    and its own address.
    """

    #: the address type, upper case: ``SMS``, ``TICKET`` ... or ``SMTP``
    address_type: str
    #: the address in that type's own form (``+15551234``); for SMTP the address itself
    address: str
    #: the envelope form the transport uses (``IMCEASMS-+2B15551234@contoso.test``)
    smtp_address: str

    @property
    def proxy_address(self) -> str:
        """``TYPE:address`` (``SMS:+15551234``), the form of an address space or of a mail
        contact's ExternalEmailAddress."""
        return f"{self.address_type}:{self.address}"

    @property
    def is_smtp(self) -> bool:
        """True for an ordinary SMTP recipient (no encapsulated foreign address)."""
        return self.address_type == "SMTP"


def recipient_address(smtp_address: str, default_domain: str | None = None
                      ) -> RecipientAddress:
    """Unwrap an envelope address into the address the foreign system knows.

    ``IMCEA<TYPE>-<encoded>@<default_domain>`` gives ``TYPE`` and the decoded address, as
    routing does; anything else, an IMCEA-looking address in another domain included (routing
    treats that as SMTP too), gives type ``SMTP`` and the address unchanged. With
    ``default_domain=None`` (no organization at hand) an IMCEA address in any domain is
    unwrapped.
    """
    domain = smtp_address.rpartition("@")[2]
    if default_domain is None or domain.lower() == default_domain.lower():
        decoded = imcea_decode(smtp_address)
        if decoded is not None:
            return RecipientAddress(decoded[0], decoded[1], smtp_address)
    return RecipientAddress("SMTP", smtp_address, smtp_address)


@dataclass(slots=True)
class MailItem:
    """One message for one next hop, with the recipients routed there."""

    message: QueuedMessage
    recipients: list[QueuedRecipient]
    next_hop: NextHop
    queue_id: int = 0
    #: the organization's default domain, the one IMCEA addresses are encapsulated in (set
    #: by the transport; None unwraps IMCEA addresses in any domain, see ``address_of``)
    default_domain: str | None = None

    @property
    def body(self) -> MessageBody:
        """The message's octets as a handle (core/body.py): stream ``body.achunks()`` (or
        ``body.chunks()`` in a thread) so that a large message costs bounded memory."""
        return self.message.body

    @property
    def data(self) -> bytes:
        """The whole message in memory: simple, but a 1 GB message costs 1 GB. Built-in
        agents stream ``body`` instead."""
        return self.message.body.read()

    def address_of(self, recipient: QueuedRecipient) -> RecipientAddress:
        """The recipient as the foreign system knows it: ``SMS:+15551234`` for
        ``IMCEASMS-+2B15551234@contoso.test``, type ``SMTP`` for an ordinary address.

        An agent for an address space such as ``SMS:*`` is handed the IMCEA form in
        ``recipient.address``; this is the address to give the foreign system.
        """
        return recipient_address(recipient.address, self.default_domain)

    @property
    def envelope(self) -> Envelope:
        return Envelope(self.message.mail_from, [
            EnvelopeRecipient(r.address, r.notify, r.orcpt) for r in self.recipients])


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The acknowledgement of one recipient: delivered, deferred or failed."""

    kind: str  # DELIVERED, DEFERRED or FAILED
    response: SmtpResponse
    retry_in: float | None = None  # seconds; for DEFERRED only; None = the retry ladder
    #: the remote server that gave ``response`` (the NDR's Remote-MTA field), if any
    remote_mta: str | None = None
    #: DELIVERED to a next hop that makes no delivery status notifications (an SMTP server
    #: without DSN): NOTIFY=SUCCESS then asks us for a "relayed" DSN (RFC 3461 §5.2.2)
    relayed: bool = False

    @classmethod
    def delivered(cls, response: SmtpResponse = OK, *, relayed: bool = False
                  ) -> RecipientResult:
        return cls(DELIVERED, response, relayed=relayed)

    @classmethod
    def deferred(cls, response: SmtpResponse, retry_in: float | None = None) -> RecipientResult:
        if not response.is_transient:
            raise ValueError(f"a deferral needs a 4xx response, not {response}")
        return cls(DEFERRED, response, retry_in)

    @classmethod
    def failed(cls, response: SmtpResponse, remote_mta: str | None = None) -> RecipientResult:
        """A permanent failure; ``remote_mta`` (a host name) when a remote server refused."""
        if not response.is_permanent:
            raise ValueError(f"a failure needs a 5xx response, not {response}")
        return cls(FAILED, response, remote_mta=remote_mta)


@dataclass(slots=True)
class ItemResult:
    """Per-recipient results for one mail item, keyed by recipient row id."""

    recipients: dict[int, RecipientResult] = field(default_factory=dict)
    #: set when the agent delivered the item somewhere nameable (a drop file, a mailbox)
    detail: str = ""
    #: recipients whose recorded write intent must be forgotten (the file never appeared)
    void_intents: set[int] = field(default_factory=set)
    #: set by the transport when the agent raised on this item: the item is deferred and the
    #: crash counts toward the server's PoisonThreshold (agents never set it themselves)
    crashed: bool = False
    #: for delivery over a network connection: the remote server (host name and address)
    #: and the local address used, the server-* and client-ip fields of the SEND event
    remote_host: str = ""
    remote_ip: str = ""
    local_ip: str = ""

    def ack(self, recipient: QueuedRecipient, result: RecipientResult) -> None:
        """Acknowledge one recipient (the generic form of the three below)."""
        self.recipients[recipient.id] = result

    def ack_success(self, recipient: QueuedRecipient, response: SmtpResponse = OK) -> None:
        """AckRecipientSuccess: this recipient is delivered."""
        self.ack(recipient, RecipientResult.delivered(response))

    def ack_defer(self, recipient: QueuedRecipient, response: SmtpResponse,
                  retry_in: float | None = None) -> None:
        """AckRecipientDefer: try this recipient again (after ``retry_in`` seconds if given)."""
        self.ack(recipient, RecipientResult.deferred(response, retry_in))

    def ack_fail(self, recipient: QueuedRecipient, response: SmtpResponse) -> None:
        """AckRecipientFail: this recipient fails permanently; an NDR follows."""
        self.ack(recipient, RecipientResult.failed(response))

    @classmethod
    def for_all(cls, item: MailItem, result: RecipientResult, detail: str = "") -> ItemResult:
        return cls({r.id: result for r in item.recipients}, detail)

    @classmethod
    def success(cls, item: MailItem, response: SmtpResponse = OK, detail: str = "") -> ItemResult:
        return cls.for_all(item, RecipientResult.delivered(response), detail)

    @classmethod
    def defer(cls, item: MailItem, response: SmtpResponse,
              retry_in: float | None = None) -> ItemResult:
        return cls.for_all(item, RecipientResult.deferred(response, retry_in))

    @classmethod
    def fail(cls, item: MailItem, response: SmtpResponse) -> ItemResult:
        return cls.for_all(item, RecipientResult.failed(response))


@dataclass(frozen=True, slots=True)
class DeferQueue:
    """``open`` result: the next hop is not reachable now; retry the whole queue later."""

    response: SmtpResponse
    retry_in: float | None = None
    #: set by the transport when the agent raised: a crash, counted toward PoisonThreshold
    crashed: bool = False


@dataclass(frozen=True, slots=True)
class FailQueue:
    """``open`` result: every item of the queue fails permanently with this response."""

    response: SmtpResponse


@dataclass
class DeliveryContext:
    """What the transport offers an agent during delivery."""

    organization: Organization
    server: TransportServer
    directory: RecipientDirectory
    #: commit "written as <name>" for recipients before making a file visible (exactly
    #: once; ``FolderWriter`` runs the whole protocol around it)
    record_intent: Callable[[dict[int, str]], Awaitable[None]]
    clock: Callable[[], float]
    #: a random id of this queue database: with queue ids it makes file names unique forever
    store_id: str = ""
    log: Any = None
    #: the header fields to add to a message leaving the organization through a connector
    #: (the ``stamp_outbound`` hook: DKIM signatures, an ARC set); a connector type that
    #: sends mail out of the organization calls it on the final content
    stamp_outbound: Callable[[MailItem, Any, bytes | MessageBody], Awaitable[list[bytes]]] \
        | None = None


class DeliveryAgent:
    """Base class of delivery agents; subclass it and override ``deliver``.

    One instance serves one connection to a next hop; the transport creates it per
    connection with the connector it serves and the delivery context, and drives it with
    ``run_agent``: ``open``, then ``deliver`` per item (or ``deliver_many``), then ``close``.
    The obligations every method shares:

    * **async only.** ``open``, ``deliver``, ``deliver_many`` and ``close`` are ``async
      def``; a plain ``def`` returns nothing to await, which defers the items as a crash
      (in ``close``: an error in the log). They run on the daemon's event loop, so any
      call that may block (files, a blocking client library, CPU-heavy work) goes to a
      thread with ``await asyncio.to_thread(...)``.
    * **timeout.** A Delivery Agent connector's ``ConnectionTimeout`` bounds the whole
      connection. At the timeout the coroutine is cancelled: items already acknowledged
      keep their results, the rest are deferred with ``451 4.4.1``, and ``close`` still
      runs. A thread started with ``to_thread`` cannot be cancelled and may still finish
      its work afterwards.
    * **idempotence.** Delivery is at least once: an item is offered again after a
      deferral, a timeout, a crash of the agent, or a crash of the process after the agent
      delivered but before the queue recorded it. A retried item must not harm the
      destination (use a key such as ``item.message.internal_id`` and the recipient ids to
      recognise it); an agent that writes files into a folder uses ``FolderWriter``, which
      records each write in the queue first and so writes every file exactly once.
    """

    #: the DeliveryProtocol this agent serves (informational; registration names it)
    protocol: str = ""

    def __init__(self, connector: Any, context: DeliveryContext) -> None:
        self.connector = connector
        self.context = context

    @classmethod
    def read_settings(cls, reader: FieldReader) -> Any:
        """Read this agent's own fields from its connector's table (at config load).

        A Delivery Agent connector hands its table to the agent class serving its
        DeliveryProtocol; the agent reads what it needs with ``reader`` (``string``,
        ``duration``, ``string_list`` ... record errors that name file, object and field)
        and returns an object the agent later finds as ``self.settings``. A field nobody
        reads is an "unknown field" error. An agent that cannot serve this kind of connector
        refuses it here with ``reader.error(field, reason)``. Default: the agent has no fields.
        """
        return None

    @property
    def settings(self) -> Any:
        """What ``read_settings`` returned for this connector (None without one)."""
        return getattr(self.connector, "settings", None)

    async def open(self, next_hop: NextHop) -> DeferQueue | FailQueue | None:
        """Open the connection (OnOpenConnection). Default: nothing to open.

        Return ``None`` when the next hop can take mail, ``DeferQueue`` when it cannot now
        (every item of this connection is deferred; when every connection says so, the
        queue goes to Retry), ``FailQueue`` to fail every item permanently (NDRs follow).
        ``deliver`` is not called after either. An exception defers this connection's items
        with ``451 4.3.0`` as a crash, counted toward PoisonThreshold; ``close`` still runs.
        """
        return None

    async def deliver(self, item: MailItem) -> ItemResult:
        """Deliver one mail item (OnDeliverMailItem); subclasses must override it.

        Return an ``ItemResult`` that acknowledges every recipient in ``item.recipients``
        (``ack_success``/``ack_defer``/``ack_fail``, or ``ItemResult.success(item)`` ...):
        a recipient left unacknowledged is deferred with ``451 4.3.0``. Return only after the
        destination has taken the message: ``delivered`` is final and never retried. An
        exception defers this item alone with ``451 4.3.0`` as a crash (repeated crashes
        send the message to Poison); other items of the connection carry on. Anything that
        is not an ``ItemResult`` defers the item.
        """
        raise NotImplementedError

    async def deliver_many(self, items: Sequence[MailItem]) -> list[ItemResult]:
        """Deliver several items; agents that can batch their I/O override this.

        Return one ``ItemResult`` per item, in the order of ``items``, each acknowledging
        its recipients as in ``deliver``. An override answers for the batch as a whole: an
        exception, or a list of the wrong length or type, defers every item of the batch
        (``451 4.3.0``), and at the timeout every item is deferred (``451 4.4.1``), so
        whatever it already delivered will be offered again: it must be idempotent.
        """
        return [await self.deliver(item) for item in items]

    async def close(self) -> None:
        """Close the connection (OnCloseConnection); always called, whatever ``open`` and
        ``deliver`` did.

        Called after every outcome (results, ``DeferQueue``, exception, timeout), within its
        own ``ConnectionTimeout``. It cannot change any item's result; an exception here is
        logged and ignored. Release what ``open`` acquired.
        """
        return None
