"""One outbound SMTP connection: connect, EHLO, STARTTLS, AUTH, then transactions.

Built on aiosmtplib with explicit control of every step (no automatic STARTTLS, no
``sendmail``): MAIL and RCPT carry the address exactly as queued, so the per-recipient
replies are kept and nothing is re-parsed. A next hop that offers PIPELINING (RFC 2920)
gets MAIL, every RCPT and DATA in one write, and every reply is read back in order
(``pipelining.ReplyReader``); others get one command at a time. Every outcome is
data (``SmtpResponse`` per recipient); only ``open`` raises, with ``SessionFailure``.

A small message (bytes) goes exactly as it always did. A large one (a spooled
``MessageBody``) is never held whole: its 8-bit check scans it in chunks and DATA streams it
(``pipelining.send_body``) over the connection lent to a ``ReplyReader``, pipelined or not.

Rules (docs/reliability.md 63–65): success is the 250 after DATA, whatever QUIT does (QUIT has a
short deadline and its failure is ignored); a drop or a timeout after the final dot defers
with 4.4.2 (the peer may have the message: a possible duplicate, never a loss).
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosmtplib
import structlog
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from hubport.core.api import RecipientResult
from hubport.core.body import MessageBody
from hubport.core.model import MailFrom, QueuedRecipient, SmtpResponse
from hubport.plugins.smtp_send import content
from hubport.plugins.smtp_send.connector import CredentialError
from hubport.plugins.smtp_send.pipelining import (
    ReplyReader,
    data_block,
    lent_connection,
    send_body,
)
from hubport.plugins.smtp_send.policy import (
    AUTH_NEEDS_TLS,
    AUTH_NOT_OFFERED,
    CREDENTIAL_UNAVAILABLE,
    TLS_FAILED,
    TLS_REQUIRED,
    AuthPolicy,
    TlsPolicy,
)
from hubport.plugins.smtp_send.protolog import ProtocolSession
from hubport.plugins.smtp_send.resolver import Target

log = structlog.get_logger("hubport.send.session")

CONNECT_FAILED = "451 4.4.1 SMTPSEND.Connect; cannot connect to {host}[{ip}]:{port}"
DROPPED = SmtpResponse(421, "4.4.2", "SMTPSEND.Dropped; the connection was dropped")
DROPPED_AFTER_DATA = SmtpResponse(
    451, "4.4.2", "SMTPSEND.Dropped; the connection dropped after the message was sent,"
                  " before the reply (the next hop may have it)")
TIMED_OUT = SmtpResponse(451, "4.4.1", "SMTPSEND.Timeout; no reply within"
                                       " ConnectionInactivityTimeOut")
BAD_SENDER = SmtpResponse(553, "5.1.7", "SMTPSEND.Envelope; a control character in the"
                                        " sender address")
BAD_RECIPIENT = SmtpResponse(553, "5.1.3", "SMTPSEND.Envelope; a control character in the"
                                           " recipient address")
NEEDS_SMTPUTF8 = SmtpResponse(553, "5.6.7", "SMTPSEND.SmtpUtf8; the next hop does not support"
                                            " SMTPUTF8, needed by this message")
CANNOT_DOWNGRADE = SmtpResponse(554, "5.6.3", "SMTPSEND.8BitMime; the next hop does not accept"
                                              " 8-bit data and the message cannot be"
                                              " converted to 7 bits")
#: RFC 3463 X.6.3 "Conversion required but not supported": converting is not practical here
TOO_LARGE_TO_CONVERT = SmtpResponse(554, "5.6.3", "SMTPSEND.8BitMime; conversion to 7-bit"
                                                  " required but the message is too large"
                                                  " to convert")
TOO_BIG = SmtpResponse(552, "5.3.4", "SMTPSEND.SizeLimit; the message exceeds the next hop's"
                                     " SIZE limit")
PROTOCOL = SmtpResponse(451, "4.5.0", "SMTPSEND.Protocol; unexpected reply")
QUIT_DEADLINE = 5.0
CONNECT_DEADLINE = 60.0  # docs/reliability.md 64: a blackholed host frees the worker within 60 s


class SessionFailure(Exception):
    """The connection could not be made ready; ``stage`` says where it failed."""

    def __init__(self, response: SmtpResponse, stage: str) -> None:
        super().__init__(str(response))
        self.response = response
        self.stage = stage  # connect, greeting, hello, tls, auth


def response_of(code: int, message: str) -> SmtpResponse:
    """An aiosmtplib reply as an SmtpResponse (one line, bounded)."""
    text = " ".join(message.split())[:500]
    try:
        return SmtpResponse.parse(f"{code} {text}")
    except ValueError:
        return PROTOCOL


@dataclass
class SendOutcome:
    """Per-recipient results of one transaction; ``detail`` names the host for tracking."""

    results: dict[int, RecipientResult] = field(default_factory=dict)
    detail: str = ""
    #: the connection's ends, for the SEND event's server-* and client-ip fields
    remote_host: str = ""
    remote_ip: str = ""
    local_ip: str = ""


def _classify(response: SmtpResponse, remote_mta: str | None = None) -> RecipientResult:
    if response.is_permanent:
        return RecipientResult.failed(response, remote_mta)
    if response.is_transient:
        return RecipientResult.deferred(response)
    return RecipientResult.deferred(PROTOCOL)


class SmtpSession:
    """An open connection to one target; carries several transactions in turn."""

    def __init__(self, target: Target, address: str, *, ehlo_name: str, force_helo: bool,
                 tls: TlsPolicy, auth: AuthPolicy | None, timeout: float,
                 plog: ProtocolSession) -> None:
        self.target = target
        self.address = address
        self.ehlo_name = ehlo_name
        self.force_helo = force_helo
        self.tls = tls
        self.auth = auth
        self.timeout = timeout
        self.plog = plog
        self.smtp: aiosmtplib.SMTP | None = None
        self.tls_active = False
        self.messages = 0

    # -- opening -----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.smtp is not None and self.smtp.is_connected

    @property
    def extensions(self) -> dict[str, str]:
        return self.smtp.esmtp_extensions if self.smtp is not None else {}

    async def open(self) -> None:
        """Connect and get ready for MAIL; raises SessionFailure (nothing left open)."""
        try:
            await self._open(plaintext=False)
        except _PlaintextRetry:
            self.close()
            await self._open(plaintext=True)

    async def _open(self, *, plaintext: bool) -> None:
        t = self.target
        self.smtp = aiosmtplib.SMTP(hostname=self.address, port=t.port,
                                    local_hostname=self.ehlo_name, timeout=self.timeout,
                                    start_tls=False)
        try:
            greeting = await self.smtp.connect(timeout=min(self.timeout, CONNECT_DEADLINE))
            self._log_connected()
            self.plog.reply(greeting.code, greeting.message)
            await self._hello()
            if not plaintext:
                await self._starttls()
            elif self.tls.require:
                raise SessionFailure(TLS_FAILED, "tls")
            await self._authenticate()
        except SessionFailure:
            self.close()
            raise
        except _PlaintextRetry:
            raise
        except SMTPConnectResponseError as exc:
            self._log_connected()
            self.plog.reply(exc.code, exc.message)
            self.close()
            raise SessionFailure(response_of(exc.code, exc.message), "greeting") from None
        except (SMTPConnectTimeoutError, aiosmtplib.SMTPConnectError, OSError) as exc:
            if self.alive:  # connected, then the greeting never came
                self.plog.info(f"no greeting: {type(exc).__name__}")
            else:
                self.plog.connect_failed((self.address, t.port), type(exc).__name__)
            self.close()
            raise SessionFailure(SmtpResponse.parse(CONNECT_FAILED.format(
                host=t.host, ip=self.address, port=t.port) + f" ({type(exc).__name__})"),
                "connect") from None
        except SMTPTimeoutError:
            self.close()
            raise SessionFailure(TIMED_OUT, "hello") from None
        except SMTPServerDisconnected:
            self.close()
            raise SessionFailure(DROPPED, "hello") from None
        except SMTPResponseException as exc:
            self.close()
            raise SessionFailure(response_of(exc.code, exc.message), "hello") from None

    def _log_connected(self) -> None:
        """Start the connection's protocol log session with the socket's endpoints."""
        if not self.plog.enabled:
            return
        local = remote = None
        try:
            if self.smtp is not None:
                local = self.smtp.get_transport_info("sockname")
                remote = self.smtp.get_transport_info("peername")
        except SMTPServerDisconnected:  # closed by the peer already: name what we dialled
            pass
        self.plog.connected(local, remote or (self.address, self.target.port))

    async def _hello(self) -> None:
        assert self.smtp is not None
        if not self.force_helo:
            self.plog.sent(f"EHLO {self.ehlo_name}")
            try:
                reply = await self.smtp.ehlo()
                self.plog.reply(reply.code, reply.message)
                return
            except SMTPHeloError as exc:
                self.plog.reply(exc.code, exc.message)
                if not self.smtp.is_connected:
                    raise
        self.plog.sent(f"HELO {self.ehlo_name}")
        reply = await self.smtp.helo()
        self.plog.reply(reply.code, reply.message)

    async def _starttls(self) -> None:
        """STARTTLS when offered and allowed; with RequireTLS there is no plaintext way."""
        assert self.smtp is not None
        offered = self.smtp.supports_extension("starttls")
        if not self.tls.use or not offered:
            if self.tls.require:
                self.plog.info("TLS required but STARTTLS not offered")
                raise SessionFailure(TLS_REQUIRED, "tls")
            return
        try:
            context = self.tls.context()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("cannot build the TLS context", error=str(exc))
            raise SessionFailure(TLS_FAILED, "tls") from None
        name = self.tls.expected_name or _sni(self.target.host)
        self.plog.sent("STARTTLS")
        try:
            reply = await self.smtp.starttls(tls_context=context, server_hostname=name)
        except (ssl.SSLError, ssl.CertificateError, SMTPException, OSError) as exc:
            self.plog.info(f"TLS negotiation failed: {type(exc).__name__}")
            if self.tls.require or self.tls.verify:
                raise SessionFailure(TLS_FAILED, "tls") from None
            raise _PlaintextRetry() from None  # opportunistic: once more, in plaintext
        self.plog.reply(reply.code, reply.message)
        self.tls_active = True
        self.plog.info(f"TLS negotiated {self.smtp.get_transport_info('cipher')}")
        await self._hello()

    async def _authenticate(self) -> None:
        assert self.smtp is not None
        if self.auth is None or not self.auth.basic:
            return
        if self.auth.needs_tls and not self.tls_active:
            raise SessionFailure(AUTH_NEEDS_TLS, "auth")
        assert self.auth.credential is not None
        try:
            password = self.auth.credential.password()
        except CredentialError as exc:
            log.error("AuthenticationCredential unavailable", reason=str(exc))
            raise SessionFailure(CREDENTIAL_UNAVAILABLE, "auth") from None
        methods = self.smtp.server_auth_methods
        user = self.auth.credential.user_name
        mechanism = next((m for m in ("plain", "login") if m in methods), None)
        if mechanism is None:
            raise SessionFailure(AUTH_NOT_OFFERED, "auth")
        self.plog.sent(f"AUTH {mechanism.upper()} <credentials not logged>")
        try:
            if mechanism == "plain":
                reply = await self.smtp.auth_plain(user, password)
            else:
                reply = await self.smtp.auth_login(user, password)
        except SMTPAuthenticationError as exc:
            self.plog.reply(exc.code, exc.message)
            raise SessionFailure(response_of(exc.code, exc.message), "auth") from None
        finally:
            del password
        self.plog.reply(reply.code, reply.message)

    # -- transactions ------------------------------------------------------------------

    async def _command(self, *args: bytes) -> SmtpResponse:
        """One command and its reply; disconnects and timeouts propagate."""
        assert self.smtp is not None
        self.plog.sent(b" ".join(args).decode("utf-8", "replace"))
        reply = await self.smtp.execute_command(*args)
        self.plog.reply(reply.code, reply.message)
        return response_of(reply.code, reply.message)

    def _local_ip(self) -> str:
        """The local address of the open connection ('' when it is already gone)."""
        try:
            sockname = self.smtp.get_transport_info("sockname") if self.smtp else None
        except SMTPServerDisconnected:
            return ""
        return str(sockname[0]) if sockname else ""

    async def send(self, mail_from: MailFrom, recipients: Sequence[QueuedRecipient],
                   data: bytes | MessageBody) -> SendOutcome:
        """One transaction: per-recipient results (delivered only after the 250 to DATA).

        ``data`` is the message as bytes, or as a body handle: one held in memory is taken
        as its bytes (the path small messages always took), a spooled one is streamed.
        """
        if isinstance(data, MessageBody) and not data.spooled:
            data = data.prefix
        out = SendOutcome(detail=f"{self.target.host}[{self.address}]",
                          remote_host=self.target.host, remote_ip=self.address,
                          local_ip=self._local_ip())
        refused = self._local_checks(mail_from, recipients, out)
        if refused is not None:
            return refused
        ext = self.extensions
        utf8 = content.needs_smtputf8(mail_from, [r.address for r in recipients])
        body: str | None = None
        if isinstance(data, MessageBody):
            body, refused = await self._spooled_8bit(mail_from, data, out, recipients)
            if refused is not None:
                return refused
        elif content.is_8bit(data, mail_from):
            if "8bitmime" in ext:
                body = "8BITMIME"
            else:
                downgraded = content.downgrade_to_7bit(data)
                if downgraded is None:
                    return _all(out, recipients, RecipientResult.failed(CANNOT_DOWNGRADE))
                self.plog.info("8-bit content converted to 7 bits for a peer without 8BITMIME")
                data = downgraded
        limit = _size_limit(ext)
        if limit and len(data) > limit:
            return _all(out, recipients, RecipientResult.failed(TOO_BIG))
        dsn = "dsn" in ext
        options = content.mail_options(mail_from, len(data), body=body, smtputf8=utf8,
                                       dsn=dsn, size_ext="size" in ext)
        encoding = "utf-8" if utf8 else "ascii"
        self.messages += 1
        transaction = self._pipelined if "pipelining" in ext else self._transaction
        try:
            return await transaction(mail_from, recipients, data, options, dsn, encoding, out)
        except (SMTPServerDisconnected, ConnectionError):
            self.close()
            return _fill(out, recipients, RecipientResult.deferred(DROPPED))
        except SMTPTimeoutError:
            self.close()
            return _fill(out, recipients, RecipientResult.deferred(TIMED_OUT))
        except SMTPResponseException:  # a reply aiosmtplib cannot parse: the peer is broken
            log.warning("malformed reply from the next hop; the connection is dropped",
                        host=self.target.host)
            self.close()
            return _fill(out, recipients, RecipientResult.deferred(PROTOCOL))
        except ValueError:  # aiosmtplib refused a control character: never on the wire
            log.error("an envelope value with a control character reached the send connector",
                      host=self.target.host)
            await self._reset()
            return _fill(out, recipients, RecipientResult.failed(BAD_RECIPIENT))

    async def _spooled_8bit(self, mail_from: MailFrom, data: MessageBody, out: SendOutcome,
                            recipients: Sequence[QueuedRecipient],
                            ) -> tuple[str | None, SendOutcome | None]:
        """The BODY parameter for a spooled message, or its refusal.

        The same decision as for bytes, without holding the message: the 8-bit scan reads
        it in chunks in a thread (skipped when the sender's BODY=8BITMIME already decides).
        A message that is 8-bit for a peer without 8BITMIME is not converted: the
        conversion (``downgrade_to_7bit``) parses and re-encodes the whole message in
        memory, which a spooled message must never cost. Its recipients on this route fail
        with 554 5.6.3 (RFC 3463: conversion required but not supported, which covers a
        conversion that is "not practical" in the forwarding path) rather than being
        retried, since every retry would meet the same peer; the sender's NDR says why.
        """
        if "8bitmime" in self.extensions:
            if content.declares_8bit(mail_from) or not await content.body_is_ascii(data):
                return "8BITMIME", None
            return None, None
        if await content.body_is_ascii(data):
            return None, None
        self.plog.info("8-bit content too large to convert for a peer without 8BITMIME")
        return None, _all(out, recipients, RecipientResult.failed(TOO_LARGE_TO_CONVERT))

    def _local_checks(self, mail_from: MailFrom, recipients: Sequence[QueuedRecipient],
                      out: SendOutcome) -> SendOutcome | None:
        if content.has_control(mail_from.address):
            log.error("sender address with a control character refused", host=self.target.host)
            return _all(out, recipients, RecipientResult.failed(BAD_SENDER))
        for r in recipients:
            if content.has_control(r.address):
                log.error("recipient address with a control character refused")
                out.results[r.id] = RecipientResult.failed(BAD_RECIPIENT)
        if len(out.results) == len(recipients):
            return out
        addresses = [r.address for r in recipients]
        if content.needs_smtputf8(mail_from, addresses) and "smtputf8" not in self.extensions:
            return _all(out, recipients, RecipientResult.failed(NEEDS_SMTPUTF8))
        return None

    async def _transaction(self, mail_from: MailFrom, recipients: Sequence[QueuedRecipient],
                           data: bytes | MessageBody, options: list[str], dsn: bool, encoding: str,
                           out: SendOutcome) -> SendOutcome:
        sender = f"<{mail_from.address}>".encode(encoding)
        reply = await self._command(b"MAIL", b"FROM:" + sender,
                                    *(o.encode("ascii") for o in options))
        if reply.code != 250:
            await self._reset()
            return _fill(out, recipients, _classify(reply, self.target.host))
        accepted: list[QueuedRecipient] = []
        for r in recipients:
            if r.id in out.results:
                continue
            opts = content.rcpt_options(r.notify, r.orcpt, dsn=dsn)
            reply = await self._command(b"RCPT", f"TO:<{r.address}>".encode(encoding),
                                        *(o.encode("ascii") for o in opts))
            if reply.code in (250, 251):
                accepted.append(r)
            else:
                out.results[r.id] = _classify(reply, self.target.host)
                if reply.code == 421:
                    self.close()
                    return _fill(out, recipients, RecipientResult.deferred(DROPPED))
        if not accepted:
            await self._reset()
            return out
        return await self._data(accepted, data, out, dsn=dsn)

    async def _pipelined(self, mail_from: MailFrom, recipients: Sequence[QueuedRecipient],
                         data: bytes | MessageBody, options: list[str], dsn: bool, encoding: str,
                         out: SendOutcome) -> SendOutcome:
        """MAIL, every RCPT and DATA in one write (RFC 2920), then their replies in order.

        Every reply of the group is read before anything else is sent, whatever the earlier
        ones said, so each refusal is the server's own answer. Each outcome is recorded as
        its reply is read: when the connection drops or times out midway, ``send`` defers
        only the recipients still without one. A DATA that the server takes (354) with
        nothing to deliver is ended at once with an empty message. Success is the 250 after
        the message, whatever else the group said.
        """
        assert self.smtp is not None and self.smtp.protocol is not None
        sender = f"<{mail_from.address}>".encode(encoding)
        todo = [r for r in recipients if r.id not in out.results]
        group = [b" ".join([b"MAIL", b"FROM:" + sender, *(o.encode("ascii") for o in options)])]
        for r in todo:
            opts = content.rcpt_options(r.notify, r.orcpt, dsn=dsn)
            group.append(b" ".join([b"RCPT", f"TO:<{r.address}>".encode(encoding),
                                    *(o.encode("ascii") for o in opts)]))
        group.append(b"DATA")
        if any(content.has_control(line.decode(encoding, "replace")) for line in group):
            raise ValueError("a control character in a pipelined command")  # never sent
        accepted: list[QueuedRecipient] = []
        closing = False  # a 421 anywhere: the server is going away
        final: SmtpResponse | None = None
        with lent_connection(self.smtp.protocol) as reader:
            for line in group:
                self.plog.sent(line.decode(encoding, "replace"))
            reader.write(b"".join(line + b"\r\n" for line in group))
            mail = await self._reply(reader)
            closing = mail.code == 421
            if mail.code != 250:
                _all(out, todo, _classify(mail, self.target.host))
            for r in todo:
                reply = await self._reply(reader)
                closing = closing or reply.code == 421
                if mail.code != 250:
                    continue  # a 503: the MAIL reply decided
                if reply.code in (250, 251):
                    accepted.append(r)
                else:
                    out.results[r.id] = _classify(reply, self.target.host)
            go = await self._reply(reader)
            closing = closing or go.code == 421
            if go.code == 354 and not accepted:
                self.plog.sent(".")
                reader.write(b".\r\n")
                await self._reply(reader)
            elif go.code == 354:
                final = await self._message(reader, data)
                if final is None:
                    return _fill(out, accepted, RecipientResult.deferred(DROPPED_AFTER_DATA))
            elif accepted:
                _all(out, accepted, _classify(go, self.target.host))
        if final is not None and final.code == 250:
            # a peer without DSN got no NOTIFY: a NOTIFY=SUCCESS is ours to answer, "relayed"
            return _fill(out, accepted, RecipientResult.delivered(final, relayed=not dsn))
        if final is not None:
            closing = closing or final.code == 421
            _all(out, accepted, _classify(final, self.target.host))
        if closing:
            self.close()
            return _fill(out, recipients, RecipientResult.deferred(DROPPED))
        await self._reset()
        return out

    async def _reply(self, reader: ReplyReader) -> SmtpResponse:
        reply = await reader.read(self.timeout)
        self.plog.reply(reply.code, reply.message)
        return response_of(reply.code, reply.message)

    async def _message(self, reader: ReplyReader,
                       data: bytes | MessageBody) -> SmtpResponse | None:
        """After a 354: the message, then its reply; None (the connection closed) when
        there is no usable reply, which the caller defers as a possible duplicate.

        Bytes go in one write, as they always did (the transport buffers them and the
        reply has the whole timeout); a spooled body streams chunk by chunk, each write
        waiting for the transport to drain within the timeout.
        """
        self.plog.info(f"<message of {len(data)} bytes>")
        try:
            if isinstance(data, MessageBody):
                try:
                    await send_body(reader, data, self.timeout)
                except BaseException:
                    # a drop, a spool read that failed or a cancellation midway: the message
                    # can never be ended cleanly (anything sent now would be its content)
                    self.close()
                    raise
            else:
                reader.write(data_block(data))
            return await self._reply(reader)
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException,
                ConnectionError):
            self.plog.info("no usable reply to the message")
            self.close()
            return None

    async def _streamed_data(self, accepted: list[QueuedRecipient], data: MessageBody,
                             out: SendOutcome, *, dsn: bool) -> SendOutcome:
        """DATA for a spooled message without PIPELINING: aiosmtplib's ``data`` takes
        the message as one bytes object, so the connection is lent to a ``ReplyReader``
        for DATA, the streamed message and the reply (read with the session's timeout as
        aiosmtplib would)."""
        assert self.smtp is not None and self.smtp.protocol is not None
        with lent_connection(self.smtp.protocol) as reader:
            self.plog.sent("DATA")
            try:
                reader.write(b"DATA\r\n")
                go = await self._reply(reader)
            except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException,
                    ConnectionError):
                self.plog.info("no usable reply to DATA")
                self.close()
                return _fill(out, accepted, RecipientResult.deferred(DROPPED_AFTER_DATA))
            final = await self._message(reader, data) if go.code == 354 else go
        if final is None:
            return _fill(out, accepted, RecipientResult.deferred(DROPPED_AFTER_DATA))
        if final.code != 250:
            result = _classify(final, self.target.host)
            await self._reset()
            return _fill(out, accepted, result)
        # a peer without DSN got no NOTIFY: a NOTIFY=SUCCESS is ours to answer, "relayed"
        return _fill(out, accepted, RecipientResult.delivered(final, relayed=not dsn))

    async def _data(self, accepted: list[QueuedRecipient], data: bytes | MessageBody,
                    out: SendOutcome, *, dsn: bool) -> SendOutcome:
        if isinstance(data, MessageBody):
            return await self._streamed_data(accepted, data, out, dsn=dsn)
        assert self.smtp is not None
        self.plog.sent("DATA")
        self.plog.info(f"<message of {len(data)} bytes>")
        try:
            reply = await self.smtp.data(data)
        except SMTPDataError as exc:
            self.plog.reply(exc.code, exc.message)
            result = _classify(response_of(exc.code, exc.message), self.target.host)
            await self._reset()
            return _fill(out, accepted, result)
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException,
                ConnectionError):
            self.plog.info("no usable reply to the message")
            self.close()
            return _fill(out, accepted, RecipientResult.deferred(DROPPED_AFTER_DATA))
        self.plog.reply(reply.code, reply.message)
        # a peer without DSN got no NOTIFY: a NOTIFY=SUCCESS is ours to answer, "relayed"
        delivered = RecipientResult.delivered(response_of(reply.code, reply.message),
                                              relayed=not dsn)
        return _fill(out, accepted, delivered)

    async def _reset(self) -> None:
        """RSET after an aborted transaction; a failure only ends the session."""
        if not self.alive:
            return
        try:
            reply = await self._command(b"RSET")
            if reply.code != 250:
                self.close()
        except (SMTPException, OSError, ValueError):
            self.close()

    # -- closing -----------------------------------------------------------------------

    async def quit(self) -> None:
        """QUIT with a short deadline; nothing that happens here changes a result."""
        if self.alive:
            assert self.smtp is not None
            self.plog.sent("QUIT")
            try:
                reply = await asyncio.wait_for(self.smtp.quit(timeout=QUIT_DEADLINE),
                                               QUIT_DEADLINE + 1)
                self.plog.reply(reply.code, reply.message)
            except (SMTPException, OSError, TimeoutError, ValueError):
                pass
        self.close()

    def close(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
            self.smtp = None
            self.plog.disconnected()


class _PlaintextRetry(Exception):
    """Opportunistic STARTTLS failed: reconnect once without TLS (RFC 7435)."""


def _sni(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _size_limit(ext: dict[str, str]) -> int:
    value = ext.get("size", "").strip()
    return int(value) if value.isdigit() else 0


def _all(out: SendOutcome, recipients: Sequence[QueuedRecipient],
         result: RecipientResult) -> SendOutcome:
    for r in recipients:
        out.results[r.id] = result
    return out


def _fill(out: SendOutcome, recipients: Sequence[QueuedRecipient],
          result: RecipientResult) -> SendOutcome:
    """Give ``result`` to every recipient that has none yet."""
    for r in recipients:
        out.results.setdefault(r.id, result)
    return out
