"""The message model: envelope, recipients and their per-recipient delivery state.

The message bytes are held once (a ``MessageBody``: in memory when small, in a spool file
beside the queue when large; core/body.py) and never re-serialized; every stage works on
the envelope and on per-recipient state, so a message can be delivered to some recipients,
deferred for others and failed for the rest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from hubport.core.body import MessageBody


class RecipientStatus(str, enum.Enum):
    """Where a recipient stands; stored as text in the queue database."""

    SUBMITTED = "Submitted"  # committed, waiting for the categorizer
    READY = "Ready"  # routed to a delivery queue, due now
    RETRY = "Retry"  # deferred, next_retry holds the time
    UNREACHABLE = "Unreachable"  # no route; re-evaluated after a config change
    DELIVERED = "Delivered"
    FAILED = "Failed"  # permanent failure, NDR issued (or suppressed)
    EXPANDED = "Expanded"  # a group or alias replaced by its members
    POISON = "Poison"  # the message crashed processing too often


FINAL_STATUSES = frozenset(
    {RecipientStatus.DELIVERED, RecipientStatus.FAILED, RecipientStatus.EXPANDED}
)


class Notify(str, enum.Enum):
    """RFC 3461 NOTIFY values."""

    NEVER = "NEVER"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    DELAY = "DELAY"


@dataclass(frozen=True, slots=True)
class SmtpResponse:
    """An SMTP reply with its enhanced status code: the currency of every result."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @classmethod
    def parse(cls, text: str) -> SmtpResponse:
        """Parse '550 5.1.1 text' (the enhanced code is optional)."""
        parts = text.strip().split(" ", 2)
        code = int(parts[0])
        if len(parts) > 1 and _looks_enhanced(parts[1]):
            return cls(code, parts[1], parts[2] if len(parts) > 2 else "")
        default = f"{code // 100}.0.0"
        return cls(code, default, " ".join(parts[1:]))


def _looks_enhanced(token: str) -> bool:
    bits = token.split(".")
    return len(bits) == 3 and all(b.isdigit() for b in bits) and bits[0] in "245"


@dataclass(slots=True)
class MailFrom:
    """The envelope sender with its RFC 1652/3461/4954 parameters. '' is the null sender."""

    address: str
    body: str | None = None  # 7BIT, 8BITMIME, BINARYMIME
    ret: str | None = None  # HDRS or FULL
    envid: str | None = None
    auth: str | None = None
    smtputf8: bool = False


@dataclass(slots=True)
class EnvelopeRecipient:
    """One envelope recipient as submitted, with RFC 3461 NOTIFY/ORCPT."""

    address: str
    notify: frozenset[Notify] = frozenset()  # empty = default (FAILURE, DELAY)
    orcpt: str | None = None  # as given: 'rfc822;a@b' or 'a@b'

    def wants(self, kind: Notify) -> bool:
        if Notify.NEVER in self.notify:
            return False
        if not self.notify:
            return kind in (Notify.FAILURE, Notify.DELAY)
        return kind in self.notify


@dataclass(slots=True)
class Envelope:
    mail_from: MailFrom
    recipients: list[EnvelopeRecipient]


@dataclass(slots=True)
class Submission:
    """A message on its way into the Submission queue (not yet committed).

    `source` is the tracking Source (SMTP, PICKUP, ADMIN, DSN, AGENT) and `source_name`
    the receive connector or folder name. `claim` names the folder file whose removal
    waits for this commit (the exactly-once folder protocol). ``body`` may be given as
    ``bytes`` (it becomes an in-memory ``MessageBody``).
    """

    envelope: Envelope
    body: MessageBody
    source: str
    source_name: str = ""
    message_id: str = ""
    subject: str = ""
    client_ip: str = ""
    client_hostname: str = ""
    #: the local address of the connection it came in on ('' for Pickup, Replay, DSNs)
    server_ip: str = ""
    claim: str | None = None
    reference: str | None = None  # for a DSN: the Message-Id it reports on
    #: the RECEIVE event's source-context (a folder file's name and what was repaired in it)
    context: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.body, (bytes, bytearray, memoryview)):
            self.body = MessageBody.of(bytes(self.body))

    @property
    def data(self) -> bytes:
        """The whole message in memory (``body.read()``): costs its size when spooled."""
        return self.body.read()


@dataclass(frozen=True, slots=True)
class Inspection:
    """What a plugin decided about a message from the Internet (the ``authenticate_sender``
    hook), applied by the receive connector before the message is queued.

    Every field is optional. ``prepend`` are complete header fields (CRLF-terminated) added
    at the top, in order (an ``Authentication-Results``); ``remove`` are the positions, in
    the received header section, of fields to drop first (a forged
    ``Authentication-Results`` claiming this server). Then one outcome, the strictest of
    all plugins' winning: ``response`` answers the client instead of queuing (5xx refuses,
    4xx defers); ``discard`` accepts the message and delivers it to nobody (tracked as a
    DROP); ``redirect_to`` delivers it to these addresses instead of its recipients (a
    quarantine mailbox). ``summary`` goes to the message tracking log (the RECEIVE event's
    source context), e.g. ``spf=pass dkim=pass dmarc=pass``.
    """

    prepend: tuple[bytes, ...] = ()
    remove: tuple[int, ...] = ()
    response: SmtpResponse | None = None
    discard: bool = False
    redirect_to: tuple[str, ...] = ()
    summary: str = ""

    @classmethod
    def merge(cls, found: list[Inspection]) -> Inspection:
        """Several plugins' verdicts as one: every field added and removed; of the
        outcomes, a refusal (5xx before 4xx) before a discard before a redirection."""
        responses = sorted((i.response for i in found if i.response is not None),
                           key=lambda r: -r.code)
        return cls(
            prepend=tuple(f for i in found for f in i.prepend),
            remove=tuple(sorted({n for i in found for n in i.remove})),
            response=responses[0] if responses else None,
            discard=any(i.discard for i in found),
            redirect_to=tuple(dict.fromkeys(a for i in found for a in i.redirect_to)),
            summary=" ".join(i.summary for i in found if i.summary),
        )


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """What submitting a message did: committed to the Submission queue as ``message_id``
    (acknowledge it now), or refused by a ``receive`` hook with ``response`` (4xx: the
    sender may try again later; 5xx: refused for good). Exactly one of the two is set."""

    message_id: int | None = None
    response: SmtpResponse | None = None

    @property
    def queued(self) -> bool:
        return self.message_id is not None


@dataclass(slots=True)
class NextHop:
    """A NextHopSolutionKey: one delivery queue per distinct value."""

    delivery_type: str  # e.g. NonSmtpGatewayDelivery, MapiDelivery, SmartHostConnectorDelivery
    domain: str  # NextHopDomain: the address space, smart hosts or mailbox database
    connector: str  # connector name ('' for mailbox delivery)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.delivery_type, self.domain, self.connector)


@dataclass(slots=True)
class QueuedRecipient:
    """A recipient row of the durable queue."""

    id: int
    message_id: int
    address: str
    status: RecipientStatus
    notify: frozenset[Notify] = frozenset()
    orcpt: str | None = None
    queue_id: int | None = None
    attempts: int = 0
    last_response: str | None = None
    next_retry: float | None = None
    first_attempt: float | None = None
    delay_notified: bool = False
    drop_intent: str | None = None

    def wants(self, kind: Notify) -> bool:
        return EnvelopeRecipient(self.address, self.notify).wants(kind)


@dataclass(slots=True)
class QueuedMessage:
    """A message row of the durable queue with the recipients the caller asked for."""

    id: int
    internal_id: str
    message_id: str
    mail_from: MailFrom
    body: MessageBody
    size: int
    source: str
    source_name: str
    subject: str
    received_at: float
    expires_at: float
    crash_count: int = 0
    recipients: list[QueuedRecipient] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.body, (bytes, bytearray, memoryview)):
            self.body = MessageBody.of(bytes(self.body))

    @property
    def data(self) -> bytes:
        """The whole message in memory (``body.read()``): costs its size when spooled;
        deliveries stream ``body.chunks()`` / ``body.achunks()`` instead."""
        return self.body.read()


@dataclass(slots=True)
class ReceiveSession:
    """What receive-side agents see of one inbound SMTP session (read it, do not change it).

    Filled in by the receive connector as the session goes on: the HELO name after HELO/EHLO,
    ``tls`` ("TLSv1.3 TLS_AES_256_GCM_SHA384") after STARTTLS, ``authenticated_as`` (the
    mailbox alias) after AUTH, the envelope after MAIL and RCPT.
    """

    session_id: str
    connector: str
    server: str
    remote_ip: str
    remote_port: int
    local_ip: str
    local_port: int
    helo: str = ""
    esmtp: bool = False
    tls: str | None = None
    #: the subject of a verified client certificate (mutual TLS)
    peer_certificate: str | None = None
    authenticated_as: str | None = None
    #: the security principal, e.g. "NT AUTHORITY\\ANONYMOUS LOGON"
    principal: str = ""
    #: the transport extended rights it holds here, e.g. "ms-Exch-SMTP-Submit"
    rights: frozenset[str] = frozenset()
    mail_from: MailFrom | None = None
    recipients: list[EnvelopeRecipient] = field(default_factory=list)
    #: messages accepted in this session so far
    messages: int = 0
