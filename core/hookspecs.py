"""The hook specifications: what a hubport plugin may implement.

Every hook is documented in ``docs/hooks.md``; a test keeps the two in step.

Async policy (one rule for every hook): an implementation may be a plain function or an
``async def``; the core awaits whatever awaitable an implementation returns. An
implementation must not block the event loop: file or CPU-heavy work belongs in a thread
(``await asyncio.to_thread(...)``).

Results are data, not exceptions. Hooks marked *first result* are called in pluggy's order
(``tryfirst``/``trylast``, then last registered first) and the first implementation that
returns something other than ``None`` decides; the others are not called at all
(``hubport.core.hooks.Hooks.call_first``; hook wrappers are refused there). An exception
in an implementation is contained by the core: for ``receive`` it answers a temporary
failure (4.3.0), for ``categorize``/``route`` the message is deferred back to Submission,
for ``deliver`` the item is deferred; repeated crashes send the message to Poison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from hubport.core import hookspec

if TYPE_CHECKING:
    from hubport.core.body import MessageBody
    from hubport.core.categorizer import CategorizeResult, Decision
    from hubport.core.config import Organization, TransportServer
    from hubport.core.connectors import Connector, ConnectorType
    from hubport.core.delivery import (
        DeferQueue,
        DeliveryAgent,
        DeliveryContext,
        FailQueue,
        ItemResult,
        MailItem,
    )
    from hubport.core.headers import ParsedMessage
    from hubport.core.model import (
        EnvelopeRecipient,
        Inspection,
        MailFrom,
        NextHop,
        QueuedMessage,
        QueuedRecipient,
        ReceiveSession,
        SmtpResponse,
        Submission,
    )
    from hubport.core.routing import RouteCandidate

# Every type named below is importable from ``hubport.core.api``.


# -- registries (the tox pattern) ------------------------------------------------------


@hookspec
def register_connector_types(register: Callable[[type[ConnectorType]], None]) -> None:
    """Register connector types: call ``register(cls)`` once per class.

    ``cls`` follows ``ConnectorType`` (usually a ``Connector`` subclass): its ``section``
    names the TOML array of tables it reads (``foreign_connector``), ``from_config`` builds
    an instance. Built-in types register through this same hook.
    """


@hookspec
def register_delivery_agents(register: Callable[[str, type[DeliveryAgent]], None]) -> None:
    """Register delivery agents: call ``register(protocol, cls)``.

    ``protocol`` is the ``DeliveryProtocol`` a Delivery Agent connector names; ``cls``
    subclasses ``DeliveryAgent``.
    """


# -- stage hooks (named by the design card) --------------------------------------------


@hookspec
def receive(submission: Submission) -> SmtpResponse | None:
    """A message is about to be committed to the Submission queue (first result).

    Called for every inbound message: SMTP, Pickup, Replay, agent submissions. Return
    ``None`` for no opinion, a 5xx ``SmtpResponse`` to reject it or a 4xx one to defer it.
    The submission's envelope may be inspected but not changed here.
    """


@hookspec
def categorize(
    message: QueuedMessage, recipient: QueuedRecipient, organization: Organization
) -> CategorizeResult | None:
    """Resolve one recipient before the core's own resolution (first result).

    Return ``None`` to let the core resolve it against the organization, or one of the
    categorizer results (``CategorizeResult``): ``Redirect(address)`` to replace the recipient,
    ``Expand([addresses])`` to replace it by several, ``Reject(SmtpResponse)`` to fail it
    (an NDR follows), ``RouteTo(next_hop)`` to send it to a fixed next hop.
    """


@hookspec
def route(
    message: QueuedMessage,
    recipient: QueuedRecipient,
    organization: Organization,
    server: str,
) -> list[RouteCandidate] | None:
    """Offer extra candidate next hops for a recipient that needs a connector.

    Return a list of ``RouteCandidate`` (or ``None``). The core adds them to
    the candidates of the configured connectors and picks the most specific address space,
    then the lowest cost, then proximity, then the connector name
    (docs/exchange.md, "Address spaces and connector selection").
    """


@hookspec
def deliver(
    next_hop: NextHop,
    connector: Connector | None,
    items: list[MailItem],
    context: DeliveryContext,
) -> list[ItemResult] | DeferQueue | FailQueue | None:
    """Deliver mail items of one delivery queue (first result).

    The plugin that owns the connector type (or the mailbox delivery) returns a list of
    ``ItemResult``, one per item in order, each with a result per recipient: delivered,
    deferred (optionally with a retry time) or failed with an SMTP response; or
    ``DeferQueue``/``FailQueue`` for the whole batch. Return ``None`` when ``connector`` is
    not yours (it is ``None`` for mailbox delivery, which names no connector). ``context``
    is the ``DeliveryContext`` (intent journal for exactly-once writes, clock).
    """


@hookspec
def probe_next_hop(
    next_hop: NextHop,
    connector: Connector,
    context: DeliveryContext,
) -> bool | None:
    """Whether ``connector``'s next hop takes mail again (first result), without sending
    any: asked every retry interval about a connector whose mail moved to the next-cost
    connector (``ConnectorFailover = "NextCost"``), so new mail returns once it answers.
    Return ``None`` when the connector is not yours; a type with no probe never gets its
    mail back before a restart or a configuration reload.
    """


# -- categorizer events (Exchange's RoutingAgent events) --------------------------------


@hookspec
def on_submitted(message: QueuedMessage) -> None:
    """The message was committed to the Submission queue (OnSubmittedMessage)."""


@hookspec
def on_resolved(message: QueuedMessage, recipients: list[Decision]) -> None:
    """Every recipient is resolved, before any ``route`` call (OnResolvedMessage).

    A recipient that needs a connector is a ``Decision`` of kind ``resolved`` without a
    next hop yet; mailbox recipients and ``RouteTo`` results already name theirs.
    """


@hookspec
def on_routed(message: QueuedMessage, recipients: list[Decision]) -> None:
    """Groups are expanded and routes chosen (OnRoutedMessage)."""


@hookspec
def on_categorized(message: QueuedMessage, recipients: list[Decision]) -> None:
    """The categorizer finished, just before the delivery queues (OnCategorizedMessage)."""


# -- SMTP receive events (Exchange's SmtpReceiveAgent events) ----------------------------
#
# Called by receive connectors during an inbound SMTP session, in protocol order. Each is
# *first result*: return ``None`` to let the session go on, or an ``SmtpResponse`` to answer
# with it instead (4xx defers, 5xx refuses; at ``on_connect`` a 4xx/5xx closes the session).
# ``session`` is a ``hubport.core.model.ReceiveSession``. A raising implementation is answered with
# ``451 4.3.0`` and the session goes on; nothing a plugin does yields a 5xx by accident.


@hookspec
def on_connect(session: ReceiveSession) -> SmtpResponse | None:
    """A client connected and a connector was chosen, before the banner (OnConnectEvent)."""


@hookspec
def on_helo(session: ReceiveSession, hostname: str) -> SmtpResponse | None:
    """HELO or EHLO arrived; ``hostname`` is the validated argument (OnHeloCommand)."""


@hookspec
def on_starttls(session: ReceiveSession) -> SmtpResponse | None:
    """The TLS handshake after STARTTLS completed; ``session.tls`` says how (OnStartTlsCommand).

    A reply here refuses every later command except QUIT (the client must not go on).
    """


@hookspec
def on_auth(session: ReceiveSession, mechanism: str, login: str) -> SmtpResponse | None:
    """The client proved its credentials for mailbox ``login`` (OnAuthCommand).

    Return a ``535 5.7.8`` (or any 4xx/5xx) reply to refuse the login all the same.
    """


@hookspec
def on_mail_from(session: ReceiveSession, mail_from: MailFrom) -> SmtpResponse | None:
    """MAIL FROM passed syntax and permission checks (OnMailCommand)."""


@hookspec
def on_rcpt_to(session: ReceiveSession, recipient: EnvelopeRecipient) -> SmtpResponse | None:
    """RCPT TO passed syntax, relay and recipient checks (OnRcptCommand)."""


@hookspec
def on_data(session: ReceiveSession) -> SmtpResponse | None:
    """DATA arrived with at least one accepted recipient, before the 354 (OnDataCommand)."""


@hookspec
def on_end_of_headers(session: ReceiveSession, headers: ParsedMessage) -> SmtpResponse | None:
    """The message's header section as received, before the Received field is added
    (OnEndOfHeaders). ``headers.get(name)`` / ``headers.get_all(name)`` read fields."""


@hookspec
def on_end_of_data(session: ReceiveSession, submission: Submission) -> SmtpResponse | None:
    """The whole message passed every check, just before its durable commit
    (OnEndOfData). A ``None`` from every plugin lets it be queued; the client gets 250 only
    after the commit."""


@hookspec
def on_disconnect(session: ReceiveSession) -> None:
    """The session ended, however it ended (OnDisconnectEvent). The result is ignored."""


# -- mail authentication -------------------------------------------------------------------


@hookspec
def authenticate_sender(
    session: ReceiveSession,
    headers: ParsedMessage,
    body: MessageBody,
    organization: Organization,
    server: TransportServer,
) -> Inspection | None:
    """A message from the Internet arrived whole: check who sent it (every implementation
    is called; their ``Inspection`` results are all applied).

    Called for anonymous sessions on receive connectors whose ``MailAuthentication`` is
    ``Anonymous`` (the default), never for authenticated users, partners or other hubs;
    ``headers`` and ``body`` are the message as received (``body.read()`` in a thread: it
    may be large). The checks are network- and CPU-bound: run them off the event loop. A
    raising implementation is logged and the message is accepted unchanged by it.
    """


@hookspec
def stamp_outbound(
    item: MailItem,
    connector: Connector,
    content: bytes | MessageBody,
    organization: Organization,
    server: TransportServer,
) -> list[bytes] | None:
    """A message leaves the organization through ``connector`` (a Send connector): header
    fields to add at its top (every implementation is called; their lists are joined).

    ``content`` is the message exactly as it will be sent, after every change the transport
    makes, so a signature over it holds (DKIM-Signature, an ARC set). Return complete,
    CRLF-terminated fields in the order they appear. Not called for hops inside the
    organization (hub to hub, a linked connector's scanner, mailbox delivery). A raising
    implementation is logged and the message goes without its fields.
    """
