"""One inbound SMTP session, on aiosmtpd's protocol class with hubport's rules on top.

aiosmtpd gives the transport plumbing: the stream reader/writer, the STARTTLS upgrade that
discards plaintext sent behind the command (CVE-2024-34083, fixed in 1.4.6) and resets the
session (RFC 3207 §4.2), and the timer. Everything docs/reliability.md asks beyond that is here:
commands must end in CRLF and carry no control characters, DATA is framed by
``hubport.plugins.smtp_receive.data`` (no smuggling), pipelining into DATA is refused, every reply
carries an enhanced status code, a local fault answers ``451 4.3.0`` (never a 5xx, never
internal text), and the 250 after DATA comes only after the durable commit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtpd.smtp import SMTP

from hubport.core.addresses import AddressError, normalize_address
from hubport.core.body import MessageBody, SpoolWriter
from hubport.core.failpoints import failpoint
from hubport.core.headers import (
    HeaderField,
    MessageFormatError,
    ParsedMessage,
    message_id_of,
    parse_header_section,
    rebuild,
    replace_header_section,
    subject_of,
)
from hubport.core.model import (
    Envelope,
    EnvelopeRecipient,
    Inspection,
    MailFrom,
    Notify,
    ReceiveSession,
    SmtpResponse,
    Submission,
    SubmitResult,
)
from hubport.core.store import StoreError
from hubport.plugins.smtp_receive import policy
from hubport.plugins.smtp_receive.data import READ_SIZE, DataOutcome, DataReader
from hubport.plugins.smtp_receive.permissions import Principal, Right, rights_for

if TYPE_CHECKING:
    from hubport.plugins.smtp_receive.connector import ReceiveConnector
    from hubport.plugins.smtp_receive.service import ReceiveService

log = structlog.get_logger("hubport.smtp.receive")

R = SmtpResponse
LOCAL_ERROR = R(451, "4.3.0", "Local error in processing, try again later")
#: the answer to a message the checks delete (SpoofedDomainAction Delete): the sender is not
#: told, as with Exchange's Delete action
DISCARDED = R(250, "2.6.0", "Queued mail for delivery")
SEND_HELLO = R(503, "5.5.1", "Send HELO/EHLO first")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command")
NO_RECIPIENTS = R(503, "5.5.1", "No valid recipients")
BAD_SENDER = R(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = R(501, "5.1.3", "Bad recipient address syntax")
NON_ASCII = R(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
BAD_PARAMETERS = R(501, "5.5.4", "Syntax error in parameters or arguments")
TOO_BIG = R(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = R(552, "5.3.4", "Header too large")
LINE_TOO_LONG = R(500, "5.5.2", "Line too long")
BARE_NEWLINE = R(550, "5.6.11", "Bare CR or LF characters are not allowed in message content"
                               " (SMTPSEND.BareLinefeedsAreIllegal)")
NUL_OCTETS = R(554, "5.6.0", "Message contains NUL octets")
PIPELINING = R(554, "5.5.0", "Improper use of SMTP command pipelining")
MUST_STARTTLS = R(530, "5.7.0", "Must issue a STARTTLS command first")
NOT_AUTHENTICATED = R(530, "5.7.1", "Client was not authenticated")
AUTH_INVALID = R(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = R(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_UNKNOWN = R(504, "5.7.4", "Unrecognized authentication type")
BAD_BASE64 = R(501, "5.5.2", "Cannot decode base64")
AUTH_LINE_TOO_LONG = R(500, "5.5.6", "Authentication Exchange line is too long")  # RFC 4954
TOO_MANY_RECIPIENTS = R(452, "4.5.3", "Too many recipients")
TIMEOUT = R(421, "4.4.2", "Connection timed out")
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors on this connection, closing transmission"
                                  " channel")
RATE_LIMITED = R(421, "4.4.2", "Message submission rate for this client has exceeded the"
                               " configured limit")
SHUTTING_DOWN = R(421, "4.3.2", "Service not available, closing transmission channel")
UNRECOGNIZED = R(500, "5.3.3", "Unrecognized command")

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_XTEXT = re.compile(r"[\x21-\x7e]*")
#: commands a client may send many times in a session before it is thrown out
CALL_LIMIT = 100
LIMITED_COMMANDS = frozenset({"NOOP", "HELP", "VRFY", "EXPN", "HELO", "EHLO", "STARTTLS"})
COMMAND_LIMIT = 512
LONG_COMMANDS = {"MAIL": 2048, "RCPT": 2048, "AUTH": 12288}
BARE_LF_LIMIT = 3
DATA_GRACE = 60.0  # seconds before the minimum data rate applies


WRITE_HIGH_WATER = 64 * 1024
CLOSE_GRACE = 5.0  # seconds a closed connection may take to hand over its last replies


def _no_timeout() -> None:
    """The callback of the never-scheduled handle that stands in for aiosmtpd's timer."""


class _NoHandler:
    """aiosmtpd wants a handler object; hubport's logic lives in the protocol itself."""


class ReceiveProtocol(SMTP):
    """An SMTP session on a receive connector chosen when the client connects."""

    line_length_limit = 16384  # the StreamReader limit; per-command limits are below that

    def __init__(self, service: ReceiveService, *, implicit_tls: bool = False) -> None:
        self.service = service
        self.implicit_tls = implicit_tls
        super().__init__(_NoHandler(), data_size_limit=None, enable_SMTPUTF8=True,
                         hostname="localhost", ident="hubport", timeout=300,
                         loop=asyncio.get_running_loop())
        self.command_size_limits = {}  # aiosmtpd's is shared by every instance
        self.connector: ReceiveConnector | None = None
        self.info: ReceiveSession | None = None
        #: the TLS transport whose client certificate may prove another hub
        self._tls_transport: Any = None
        self.refusal: SmtpResponse | None = None
        self.source_key = ""
        self.own_addresses: tuple[str, ...] | None = None
        self.in_data = False
        #: the body of the message in DATA, until the queue owns it (else discarded)
        self._spool: SpoolWriter | None = None
        self.plog: Any = None
        self._errors = 0
        self._bare_lf = 0
        self._logon_failures = 0
        self._calls: dict[str, int] = {}
        self._started = time.monotonic()
        self._tls_refusal: SmtpResponse | None = None
        self._counted = False
        self.deadline = float("inf")
        #: replies waiting to leave with those of pipelined commands already received
        self._held: list[bytes] = []

    # -- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # the TCP connection (not the STARTTLS upgrade)
            self._choose(transport)
        super().connection_made(transport)

    def _choose(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        connector = self.service.choose(local[0], local[1], peer[0])
        self.connector = connector
        if connector is None:
            return
        self.hostname = connector.fqdn
        self._timeout_duration = connector.connection_inactivity_timeout
        if connector.offers_tls and not self.implicit_tls:
            self.tls_context = self.service.tls_context(connector)
        self.info = ReceiveSession(
            session_id=uuid.uuid4().hex[:16].upper(), connector=connector.name,
            server=self.service.runtime.server_name, remote_ip=peer[0], remote_port=peer[1],
            local_ip=local[0], local_port=local[1])
        if self.implicit_tls:
            self.info.tls = self.service.describe_tls(transport)
            self.info.peer_certificate = self.service.peer_name(transport, connector)
            self._tls_transport = transport
        self._update_rights()
        self.source_key, self.refusal = self.service.opened(self)
        self._counted = True
        self.plog = self.service.protocol_session(connector, local, peer)
        if self.plog is not None:  # one id in the protocol log and the Received field
            self.info.session_id = self.plog.session_id

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.service.closed(self)
        if self.plog is not None:
            self.plog.disconnected()
        super().connection_lost(error)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Arm the idle deadline; the service's sweeper enforces it.

        (aiosmtpd re-creates a loop timer on every command; one sweeper for all sessions
        costs a fraction of that at thousands of commands a second.)
        """
        self.deadline = time.monotonic() + (duration or self._timeout_duration)
        if self._timeout_handle is None:  # what aiosmtpd's connection_lost cancels
            self._timeout_handle = asyncio.TimerHandle(0.0, _no_timeout, (), self.loop)

    def _timeout_cb(self) -> None:
        """Tell the client why before closing (aiosmtpd closes silently)."""
        if self.transport is not None and not self.transport.is_closing():
            self._write_reply(TIMEOUT)
            self._close()

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    # -- the command loop ---------------------------------------------------------------

    def eof_received(self) -> bool | None:
        """The client half-closed: reads see the end, a commit in progress still finishes.

        (aiosmtpd cancels the session task here, which could cut a queue commit short and
        leaves a half-open connection counted against the limits.)
        """
        keep_open = asyncio.StreamReaderProtocol.eof_received(self)
        # TLS has no half-close: after STARTTLS asking to keep the transport open only
        # earns an asyncio warning in the log (the stream reader judged it before TLS)
        return False if self._tls_protocol is not None else keep_open

    async def _handle_client(self) -> None:
        try:
            await self._serve()
        except (ConnectionError, EOFError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("receive session failed", session=self.info and self.info.session_id)
        finally:
            self._close()

    async def _serve(self) -> None:
        connector, info = self.connector, self.info
        if connector is None or info is None:  # no connector serves this client here
            self._close()
            return
        if self.plog is not None:
            self.plog.connected()
        if self.refusal is not None:
            await self._goodbye(self.refusal)
            return
        if connector.greeting_delay and not await self._quiet_before_greeting(connector):
            return
        verdict = await self.service.event("on_connect", session=info)
        if verdict is not None:
            await self._goodbye(verdict)
            return
        await self.push(connector.banner or
                        f"220 {connector.fqdn} hubport ESMTP service ready at "
                        f"{time.strftime('%a, %d %b %Y %H:%M:%S %z')}", flush=True)
        while self.transport is not None and not self.transport.is_closing():
            if not self._arm_command_timer(connector):
                return
            line = await self._read_line()
            if line is None:
                return
            if line:
                await self._command(line)

    async def _command(self, line: bytes) -> None:
        """Run one command; an unexpected fault answers 451 4.3.0 and the session goes on."""
        try:
            await self._dispatch(line)
        except (ConnectionError, EOFError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("an SMTP command failed; the client is told to try again",
                          session=self.info and self.info.session_id)
            if self.info is not None:
                self._reset_transaction()
            await self.push(self._format(LOCAL_ERROR), flush=True)

    async def _quiet_before_greeting(self, connector: ReceiveConnector) -> bool:
        """Early talkers (postscreen's pregreet test): bytes before the banner close it."""
        try:
            early = await asyncio.wait_for(self._reader.read(1), connector.greeting_delay)
        except TimeoutError:
            return True
        if early:
            await self._goodbye(R(554, "5.5.1", "Protocol error: data sent before the greeting"))
        self._close()
        return False

    def _arm_command_timer(self, connector: ReceiveConnector) -> bool:
        """Inactivity timer, bounded by what is left of ConnectionTimeout."""
        left = connector.connection_timeout - (time.monotonic() - self._started)
        if left <= 0:
            self._timeout_cb()
            return False
        self._reset_timeout(min(connector.connection_inactivity_timeout, left))
        return True

    async def _read_line(self, too_long: SmtpResponse = LINE_TOO_LONG) -> bytes | None:
        """One command line with its line ending; b'' after a handled over-long line."""
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError as exc:
            await self._reader.read(exc.consumed)
            while True:  # drop the rest of the line, holding no more than the limit
                try:
                    await self._reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await self._reader.read(more.consumed)
                except asyncio.IncompleteReadError:
                    return None
            await self.protocol_error(too_long)
            return b""

    async def _dispatch(self, line: bytes) -> None:
        if self.plog is not None:
            logged = line.rstrip(b"\r\n")
            if logged[:5].upper() == b"AUTH ":  # the initial response holds the password
                logged = b" ".join(logged.split()[:2]) + b" ****"
            self.plog.received(logged)
        if not line.endswith(b"\r\n"):
            self._bare_lf += 1
            await self.protocol_error(R(500, "5.5.2", "Bare <LF> received; commands must end"
                                                      " with <CRLF>"))
            if self._bare_lf >= BARE_LF_LIMIT:
                await self._goodbye(TOO_MANY_ERRORS)
            return
        body = line[:-2]
        verb, _, arg_bytes = body.partition(b" ")
        try:
            command = verb.decode("ascii").upper()
        except UnicodeDecodeError:
            command = ""
        if not command or not command.isalpha():
            await self.protocol_error(UNRECOGNIZED if body else
                                      R(500, "5.5.2", "Syntax error, command unrecognized"))
            return
        if len(line) > LONG_COMMANDS.get(command, COMMAND_LIMIT):
            await self.protocol_error(LINE_TOO_LONG)
            return
        if _CONTROL.search(body):
            await self.protocol_error(_control_reply(command))
            return
        arg = await self._decode_argument(command, arg_bytes.strip(b" "))
        if arg is None:
            return
        await self._run(command, arg)

    async def _decode_argument(self, command: str, raw: bytes) -> str | None:
        """The argument as text. UTF-8 in MAIL and RCPT goes on to be judged with its
        parameters, so that `SMTPUTF8` on a connector without it gets its own 555 5.5.4
        and an address without it 553 5.6.7 (RFC 6531 §3.5); other bytes are refused."""
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            pass
        assert self.connector is not None
        if command in ("MAIL", "RCPT"):
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                if not self.connector.smtp_utf8_enabled:
                    await self.reply(NON_ASCII)
                    return None
                await self.protocol_error(BAD_SENDER if command == "MAIL" else BAD_RECIPIENT)
                return None
        await self.protocol_error(R(501, "5.5.2", "Syntax error: 8-bit characters in command"))
        return None

    async def _run(self, command: str, arg: str) -> None:
        connector = self.connector
        assert connector is not None
        if self._tls_refusal is not None and command != "QUIT":
            await self.reply(self._tls_refusal)
            return
        if connector.require_tls and not self.tls_active and command not in (
                "NOOP", "EHLO", "HELO", "STARTTLS", "QUIT", "RSET"):
            await self.protocol_error(MUST_STARTTLS)
            return
        if command in LIMITED_COMMANDS:
            calls = self._calls[command] = self._calls.get(command, 0) + 1
            if calls > CALL_LIMIT:
                await self._goodbye(R(421, "4.7.0", f"{command} sent too many times"))
                return
        method = self._commands.get(command)
        if method is None:
            await self.protocol_error(UNRECOGNIZED)
            return
        await method(self, arg)

    # -- replies --------------------------------------------------------------------------

    def _format(self, response: SmtpResponse) -> str:
        assert self.connector is not None
        if self.connector.enhanced_status_codes_enabled:
            return str(response)
        return f"{response.code} {response.text}"

    async def reply(self, response: SmtpResponse) -> None:
        """Send one reply; 5xx to an unauthenticated client waits TarpitInterval first."""
        connector = self.connector
        if (connector is not None and response.code >= 500 and connector.tarpit_interval
                and self.info is not None and self.info.authenticated_as is None
                and Right.ACCEPT_ANY_RECIPIENT not in self.info.rights):
            await asyncio.sleep(connector.tarpit_interval)
        await self.push(self._format(response))

    def _write_reply(self, response: SmtpResponse) -> None:
        """A last reply from a callback (timeout, shutdown), after any held ones."""
        text = self._format(response) if self.connector is not None else str(response)
        if self.plog is not None:
            self.plog.sent(text)
        assert self.transport is not None
        held, self._held = b"".join(self._held), []
        self.transport.write(held + text.encode("ascii") + b"\r\n")  # type: ignore[attr-defined]

    async def push(self, status: str | bytes, *, flush: bool = False) -> None:
        """Send a reply. While the client's next command is already here (RFC 2920
        pipelining), replies wait to leave together: one write per group of commands.
        ``flush`` sends at once (a reply the client must see before it may go on)."""
        if self.plog is not None:
            for line in (status.split("\r\n") if isinstance(status, str) else [status]):
                self.plog.sent(line)  # one record per reply line, as Exchange logs them
        data = status.encode("utf-8") if isinstance(status, str) else status
        self._held.append(data + b"\r\n")
        if not flush and b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            return  # the next command is waiting: its reply goes out with this one
        held, self._held = b"".join(self._held), []
        self._writer.write(held)
        if isinstance(self.transport, asyncio.WriteTransport) and \
                self.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            await self._writer.drain()

    async def protocol_error(self, response: SmtpResponse) -> None:
        """A client mistake: answered, counted, and past MaxProtocolErrors the end."""
        await self.reply(response)
        self._errors += 1
        limit = self.connector.max_protocol_errors if self.connector else None
        if limit is not None and self._errors > limit:
            await self._goodbye(TOO_MANY_ERRORS)

    async def _goodbye(self, response: SmtpResponse) -> None:
        await self.push(self._format(response), flush=True)
        self._close()

    def _close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # closing a TLS transport twice drops its protocol: it then raises
        transport.close()
        if transport.get_write_buffer_size():  # type: ignore[attr-defined]
            # a client that does not read would keep the connection (and its slot) open
            # until the buffer drains: give it a moment, then cut it
            self.loop.call_later(CLOSE_GRACE, transport.abort)  # type: ignore[attr-defined]

    async def shutdown(self) -> None:
        """The service is stopping: tell an idle client and close."""
        if self.transport is not None and not self.transport.is_closing():
            self._write_reply(SHUTTING_DOWN)
            self._close()

    # -- rights -----------------------------------------------------------------------------

    def _principal(self) -> Principal:
        assert self.connector is not None and self.info is not None
        if self.connector.externally_secured:
            return Principal.EXTERNALLY_SECURED
        if self.info.authenticated_as is not None:
            return Principal.AUTHENTICATED_USER
        if self.info.peer_certificate is not None:
            if "ExchangeServer" in self.connector.auth_mechanism and \
                    self.service.proven_server(self._tls_transport) is not None:
                return Principal.EXCHANGE_SERVER
        if "ExchangeLegacyServers" in self.connector.permission_groups and \
                self.service.legacy_peer(self._tls_transport, self.info.remote_ip):
            return Principal.LEGACY_SERVER
        if self.info.peer_certificate is not None:
            return Principal.PARTNER
        return Principal.ANONYMOUS

    def _update_rights(self) -> None:
        assert self.connector is not None and self.info is not None
        principal = self._principal()
        self.info.principal = principal.value
        self.info.rights = frozenset(rights_for(principal, self.connector.permission_groups,
                                                self.connector.permissions))

    @property
    def rights(self) -> frozenset[Right]:
        assert self.info is not None
        return self.info.rights  # type: ignore[return-value]

    def _from_internet(self, connector: ReceiveConnector) -> bool:
        """The session is one the mail authentication checks are for: anonymous, on a
        connector whose MailAuthentication is Anonymous."""
        return connector.mail_authentication == "Anonymous" and \
            self._principal() == Principal.ANONYMOUS

    def _own_session(self) -> bool:
        """The organization's own session, let in at Medium back pressure whatever the
        sender: an authenticated user, or another hub (the ExchangeServers principals)."""
        assert self.info is not None
        return self.info.authenticated_as is not None or self.info.principal in (
            Principal.EXCHANGE_SERVER.value, Principal.EXTERNALLY_SECURED.value)

    def _reset_transaction(self) -> None:
        assert self.info is not None
        self.info.mail_from = None
        self.info.recipients = []

    # -- commands ---------------------------------------------------------------------------

    async def cmd_helo(self, arg: str) -> None:
        await self._hello(arg, esmtp=False)

    async def cmd_ehlo(self, arg: str) -> None:
        await self._hello(arg, esmtp=True)

    async def _hello(self, arg: str, *, esmtp: bool) -> None:
        connector, info = self.connector, self.info
        assert connector is not None and info is not None
        verb = "EHLO" if esmtp else "HELO"
        hostname = arg.strip()
        if not hostname or " " in hostname:
            await self.protocol_error(R(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        if connector.require_ehlo_domain and policy.helo_for_header(hostname) != hostname:
            await self.protocol_error(R(501, "5.5.4", "Invalid domain name"))
            return
        verdict = await self.service.event("on_helo", session=info, hostname=hostname)
        if verdict is not None:
            await self.reply(verdict)
            return
        self._reset_transaction()
        info.helo, info.esmtp = hostname, esmtp
        assert self.session is not None
        self.session.host_name, self.session.extended_smtp = hostname, esmtp
        greeting = f"{connector.fqdn} Hello [{info.remote_ip}]"
        if not esmtp:
            await self.push(f"250 {greeting}")
            return
        lines = [greeting, *self._extensions(connector)]
        await self.push("\r\n".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{text}" for i, text in enumerate(lines)))

    def _extensions(self, connector: ReceiveConnector) -> list[str]:
        out = []
        if connector.size_enabled == "Enabled":
            out.append(f"SIZE {connector.max_message_size}")
        elif connector.size_enabled == "EnabledWithoutValue":
            out.append("SIZE")
        if connector.pipelining_enabled:
            out.append("PIPELINING")
        if connector.delivery_status_notification_enabled:
            out.append("DSN")
        if connector.enhanced_status_codes_enabled:
            out.append("ENHANCEDSTATUSCODES")
        if connector.offers_tls and not self.tls_active and self.tls_context is not None:
            out.append("STARTTLS")
        if connector.offers_basic_auth and (self.tls_active or
                                            not connector.basic_auth_requires_tls):
            out.append("AUTH LOGIN PLAIN")
        if connector.eight_bit_mime_enabled:
            out.append("8BITMIME")
        if connector.smtp_utf8_enabled:
            out.append("SMTPUTF8")
        return out

    async def cmd_starttls(self, arg: str) -> None:
        if arg:
            await self.protocol_error(R(501, "5.5.4", "Syntax: STARTTLS"))
            return
        if self.tls_active:
            await self.protocol_error(R(503, "5.5.1", "TLS already active"))
            return
        if self.tls_context is None:
            await self.protocol_error(UNRECOGNIZED)
            return
        await self.push(self._format(R(220, "2.0.0", "SMTP server ready")), flush=True)
        if not await self._upgrade():
            return
        assert self.info is not None and self.connector is not None
        # RFC 3207 §4.2: forget everything learned before TLS, the login included
        self.info.helo, self.info.esmtp = "", False
        self.info.authenticated_as, self.own_addresses = None, None
        self._logon_failures = 0
        self._reset_transaction()
        self.info.tls = self.service.describe_tls(self.transport)
        self.info.peer_certificate = self.service.peer_name(self.transport, self.connector)
        self._tls_transport = self.transport
        self._update_rights()
        verdict = await self.service.event("on_starttls", session=self.info)
        if verdict is not None:
            self._tls_refusal = verdict

    async def _upgrade(self) -> bool:
        """aiosmtpd's STARTTLS switch, with a handshake timeout (aiosmtpd#269)."""
        from asyncio import sslproto

        assert self.connector is not None and self.tls_context is not None
        waiter = self.loop.create_future()
        self._tls_protocol = sslproto.SSLProtocol(
            self.loop, self, self.tls_context, waiter, server_side=True,
            # typeshed says int; asyncio takes the seconds as a float
            ssl_handshake_timeout=self.connector.tls_handshake_timeout,  # type: ignore[arg-type]
        )
        self._original_transport = self.transport
        assert self._original_transport is not None
        self._original_transport.set_protocol(self._tls_protocol)
        self.transport = self._tls_protocol._app_transport
        self._tls_protocol.connection_made(self._original_transport)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("TLS handshake failed", session=self.info and self.info.session_id,
                     error=str(exc))
            self._close()
            # the TLS layer reports a lost connection only once its handshake is done, and
            # it has closed the TCP one: say so ourselves, or the session stays counted
            # against the connection limits forever
            if self.transport is not None:
                self.connection_lost(exc)
            return False
        return True

    async def cmd_auth(self, arg: str) -> None:
        connector, info = self.connector, self.info
        assert connector is not None and info is not None
        if not info.esmtp:
            await self.protocol_error(R(503, "5.5.1", "Send EHLO first"))
            return
        if not connector.offers_basic_auth:
            await self.protocol_error(AUTH_UNKNOWN)
            return
        if connector.basic_auth_requires_tls and not self.tls_active:
            await self.protocol_error(AUTH_NEEDS_TLS)
            return
        if info.authenticated_as is not None:
            await self.protocol_error(R(503, "5.5.1", "Already authenticated"))
            return
        if info.mail_from is not None:
            await self.protocol_error(R(503, "5.5.1", "AUTH not permitted during a mail"
                                                      " transaction"))
            return
        parts = arg.split()
        if not parts or len(parts) > 2:
            await self.protocol_error(BAD_PARAMETERS)
            return
        mechanism = parts[0].upper()
        reader = {"PLAIN": self._auth_plain, "LOGIN": self._auth_login}.get(mechanism)
        if reader is None:
            await self.protocol_error(AUTH_UNKNOWN)
            return
        credentials = await reader(parts[1] if len(parts) == 2 else None)
        if credentials is None:
            return
        login, password = credentials
        mailbox = await self.service.authenticate(login, password)
        verdict = None
        if mailbox is not None:
            verdict = await self.service.event("on_auth", session=info, mechanism=mechanism,
                                               login=mailbox.alias)
        if mailbox is None or verdict is not None:
            await self._logon_failed(verdict or AUTH_INVALID, login)
            return
        info.authenticated_as = mailbox.alias
        self.own_addresses = tuple(mailbox.smtp_addresses)
        self._update_rights()
        if self.plog is not None:
            self.plog.info(f"authenticated as {mailbox.alias}")
        await self.push(self._format(R(235, "2.7.0", "Authentication successful")))

    async def _logon_failed(self, response: SmtpResponse, login: str) -> None:
        assert self.connector is not None and self.info is not None
        self._logon_failures += 1
        log.info("authentication failed", session=self.info.session_id,
                 remote=self.info.remote_ip, login=login[:100])
        if self._logon_failures >= 2 and self.connector.tarpit_interval:
            await asyncio.sleep(self.connector.tarpit_interval)
        await self.push(self._format(response))
        limit = self.connector.max_logon_failures
        if limit and self._logon_failures >= limit:
            await self._goodbye(R(421, "4.7.0", "Too many authentication failures"))

    async def _challenge(self, prompt: bytes) -> bytes | None:
        """A 334 challenge; the decoded answer, or None after answering the client."""
        await self.push(b"334 " + base64.b64encode(prompt), flush=True)
        assert self.connector is not None
        if not self._arm_command_timer(self.connector):
            return None
        line = await self._read_line(AUTH_LINE_TOO_LONG)
        if line is None:  # the client left
            self._close()
            return None
        if not line:  # over-long, answered (a silent close left the client waiting)
            return None
        if self.plog is not None:
            self.plog.received(b"", secret=True)
        answer = line.rstrip(b"\r\n")
        if answer == b"*":
            await self.reply(R(501, "5.7.0", "Authentication aborted"))
            return None
        return await self._b64(answer)

    async def _b64(self, text: bytes) -> bytes | None:
        if text == b"=":
            return b""
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            await self.protocol_error(BAD_BASE64)
            return None

    async def _auth_plain(self, initial: str | None) -> tuple[str, str] | None:
        blob = (await self._b64(initial.encode("ascii")) if initial is not None
                else await self._challenge(b""))
        if blob is None:
            return None
        fields = blob.split(b"\x00")
        if len(fields) != 3:
            await self.protocol_error(R(501, "5.5.2", "Cannot split the PLAIN response"))
            return None
        authzid, login, password = (_text(f) for f in fields)
        if authzid and authzid != login:
            return ("", "")  # acting for someone else is never granted: a failed logon
        return login, password

    async def _auth_login(self, initial: str | None) -> tuple[str, str] | None:
        user = (await self._b64(initial.encode("ascii")) if initial is not None
                else await self._challenge(b"Username:"))
        if user is None:
            return None
        password = await self._challenge(b"Password:")
        if password is None:
            return None
        return _text(user), _text(password)

    async def cmd_mail(self, arg: str) -> None:
        connector, info = self.connector, self.info
        assert connector is not None and info is not None
        if not info.helo:
            await self.protocol_error(SEND_HELLO)
            return
        if info.mail_from is not None:
            await self.protocol_error(R(503, "5.5.1", "Sender already specified"))
            return
        pressure = self.service.runtime.admission()
        if pressure is not None:
            await self.reply(pressure)
            return
        if Right.SUBMIT not in self.rights:
            await self.reply(NOT_AUTHENTICATED)
            return
        if not self.service.within_rate(self):
            await self._goodbye(RATE_LIMITED)
            return
        parsed = await self._envelope_argument(arg, "MAIL FROM:")
        if parsed is None:
            return
        path, params = parsed
        mail_from = await self._mail_parameters(params, connector)
        if mail_from is None:
            return
        try:
            mail_from.address = normalize_address(_without_root_dot(path),
                                                  smtputf8=mail_from.smtputf8,
                                                  allow_null=True)
        except AddressError as exc:
            await self.protocol_error(NON_ASCII if "SMTPUTF8" in str(exc) else BAD_SENDER)
            return
        pressure = self.service.runtime.admission(mail_from.address,
                                                  internal=self._own_session())
        if pressure is not None:  # Medium back pressure: outside senders wait
            await self.reply(pressure)
            return
        org = self.service.runtime.organization
        refusal = policy.check_sender(org, mail_from.address, self.rights,
                                      self.own_addresses)
        if refusal is None:
            refusal = await self.service.event("on_mail_from", session=info,
                                               mail_from=mail_from)
        if refusal is not None:
            await self.reply(refusal)
            return
        if info.authenticated_as is not None and not mail_from.auth:
            mail_from.auth = self.own_addresses[0] if self.own_addresses else None
        info.mail_from = mail_from
        await self.push(self._format(R(250, "2.1.0", "Sender OK")))

    async def _envelope_argument(self, arg: str, syntax: str
                                 ) -> tuple[str, dict[str, str | None]] | None:
        """`FROM:<path> PARAMS` of MAIL (or `TO:` of RCPT): the path and the ESMTP
        parameters, or None after answering a syntax error."""
        assert self.info is not None
        parsed = _split_command(arg, syntax.split(" ", 1)[1])
        if parsed is None:
            await self.protocol_error(R(501, "5.5.4", f"Syntax: {syntax}<address>"))
            return None
        path, params_text = parsed
        params = _parse_params(params_text, self.info.esmtp)
        if params is None:
            await self.protocol_error(BAD_PARAMETERS)
            return None
        return path, params

    async def _mail_parameters(self, params: dict[str, str | None],
                               connector: ReceiveConnector) -> MailFrom | None:
        mail_from = MailFrom("")
        for key, value in params.items():
            problem = _mail_parameter(mail_from, key, value, connector,
                                      Right.BYPASS_MESSAGE_SIZE_LIMIT in self.rights)
            if problem is not None:
                if problem.code == 501:
                    await self.protocol_error(problem)
                else:
                    await self.reply(problem)
                return None
        return mail_from

    async def cmd_rcpt(self, arg: str) -> None:
        connector, info = self.connector, self.info
        assert connector is not None and info is not None
        if info.mail_from is None:
            await self.protocol_error(NEED_MAIL)
            return
        parsed = await self._envelope_argument(arg, "RCPT TO:")
        if parsed is None:
            return
        path, params = parsed
        org = self.service.runtime.organization
        # RFC 5321 §4.5.1: <Postmaster> (any case, no domain) is accepted from anyone who
        # may send at all, and so is postmaster@ the name this connector greets with
        postmaster = path.strip("<>").lower() == "postmaster"
        if postmaster:
            path = org.postmaster_delivery_address
        try:
            address = normalize_address(_without_root_dot(path),
                                        smtputf8=info.mail_from.smtputf8)
        except AddressError as exc:
            await self.protocol_error(NON_ASCII if "SMTPUTF8" in str(exc) else BAD_RECIPIENT)
            return
        original = address
        greeted = address.lower() == f"postmaster@{connector.fqdn}".lower() and \
            org.accepted_domain_for(connector.fqdn) is None
        if greeted:
            postmaster, address = True, org.postmaster_delivery_address
        recipient = _recipient(address, params, connector)
        if isinstance(recipient, SmtpResponse):
            await self.protocol_error(recipient)
            return
        if greeted and recipient.orcpt is None:  # a DSN names the address the client gave
            recipient.orcpt = f"rfc822;{original}"
        if len(info.recipients) >= connector.max_recipients_per_message:
            await self.reply(TOO_MANY_RECIPIENTS)
            return
        # the postmaster needs no relay right; policy still refuses it (550 5.1.1) when the
        # organization has no postmaster recipient at all, which is warned about at load
        rights = self.rights | {Right.ACCEPT_ANY_RECIPIENT} if postmaster else self.rights
        refusal = policy.check_recipient(org, address, rights)
        if refusal is None:
            refusal = await self.service.event("on_rcpt_to", session=info,
                                               recipient=recipient)
        if refusal is not None:
            await self.reply(refusal)
            return
        if all(r.address.lower() != address.lower() for r in info.recipients):
            info.recipients.append(recipient)
        await self.push(self._format(R(250, "2.1.5", "Recipient OK")))

    async def cmd_data(self, arg: str) -> None:
        connector, info = self.connector, self.info
        assert connector is not None and info is not None
        if arg:
            await self.protocol_error(R(501, "5.5.4", "Syntax: DATA"))
            return
        if info.mail_from is None:
            await self.protocol_error(NEED_MAIL)
            return
        if not info.recipients:
            await self.protocol_error(NO_RECIPIENTS)
            return
        if self._reader._buffer:  # type: ignore[attr-defined]  # the message before the 354
            await self._goodbye(PIPELINING)
            return
        verdict = await self.service.event("on_data", session=info)
        if verdict is not None:
            await self.reply(verdict)
            return
        await self.push("354 Start mail input; end with <CRLF>.<CRLF>", flush=True)
        self.in_data = True  # a stopping service waits for this message and its reply
        self._spool = writer = self.service.runtime.spool_writer()
        try:
            outcome = await self._receive_data(connector, writer)
            if outcome is None:
                return
            self.deadline = float("inf")  # the commit is ours to finish, not the client's
            response = await self._accept(writer, outcome, connector, info)
            if self._spool is not None:  # a refused message leaves no file behind its reply
                spool, self._spool = self._spool, None
                await asyncio.to_thread(spool.discard)  # unlinking 1 GB takes a while
            self._reset_transaction()
            await self.reply(response)
        finally:
            self.in_data = False
            self._drop_spool()
            self._reset_timeout(connector.connection_inactivity_timeout)

    def _drop_spool(self) -> None:
        """Remove the body of a message that was not queued (the queue owns a queued one's
        spool file, and ``_commit`` then clears ``_spool``)."""
        if self._spool is not None:
            self._spool.discard()
            self._spool = None

    async def _receive_data(self, connector: ReceiveConnector,
                            writer: SpoolWriter) -> DataOutcome | None:
        """Read up to the terminator, handing the content to ``writer`` as it comes (a
        large message goes to a spool file, never wholly into memory)."""
        bypass = Right.BYPASS_MESSAGE_SIZE_LIMIT in self.rights
        reader = DataReader(max_size=None if bypass else connector.max_message_size,
                            max_line=connector.max_line_length,
                            normalize=connector.bare_line_endings == "Normalize")
        started = time.monotonic()
        while not reader.done:
            self._reset_timeout(connector.connection_inactivity_timeout)
            block = await self._reader.read(READ_SIZE)
            if not block:
                return None  # the client left: nothing was queued
            content = reader.feed(block)
            if content:
                await writer.write(content)
            elapsed = time.monotonic() - started
            if (connector.min_data_rate and elapsed > DATA_GRACE and not reader.done
                    and reader.size / elapsed < connector.min_data_rate):
                await self._goodbye(R(421, "4.4.2", "Data transfer too slow"))
                return None
        self._reset_timeout(connector.connection_inactivity_timeout)
        outcome = reader.outcome
        assert outcome is not None
        if outcome.rest:  # pipelined commands after the final dot go back to the reader
            self._reader._buffer[0:0] = outcome.rest  # type: ignore[attr-defined]
        return outcome

    async def _accept(self, writer: SpoolWriter, outcome: DataOutcome,
                      connector: ReceiveConnector, info: ReceiveSession) -> SmtpResponse:
        """Judge a complete message and commit it; the reply to send after the dot."""
        if outcome.too_big:
            return TOO_BIG
        if outcome.line_too_long:
            return LINE_TOO_LONG
        if outcome.nul:
            return NUL_OCTETS
        if outcome.bare_line_ending and connector.bare_line_endings != "Normalize":
            return BARE_NEWLINE  # (in Normalize mode the reader already normalized)
        try:
            return await self._commit(await writer.finish(), connector, info)
        except Exception:
            log.exception("accepting a message failed; the client is told to retry",
                          session=info.session_id)
            return LOCAL_ERROR

    async def _commit(self, body: MessageBody, connector: ReceiveConnector,
                      info: ReceiveSession) -> SmtpResponse:
        # a spooled body: only its first octets are read (in a thread), enough to find a
        # header section of up to max_header_size (parse_header_section looks that far)
        head = (await asyncio.to_thread(body.read_prefix, connector.max_header_size + 4)
                if body.spooled else body.prefix)
        try:
            parsed = parse_header_section(head, connector.max_header_size)
        except MessageFormatError:
            return HEADER_TOO_BIG
        if parsed.header_bytes_size > connector.max_header_size:
            return HEADER_TOO_BIG
        hops = policy.check_hops(parsed, max_hops=connector.max_hop_count,
                                 max_local_hops=connector.max_local_hop_count,
                                 local_names=self.service.local_names())
        if hops is not None:
            return hops
        verdict = await self.service.event("on_end_of_headers", session=info, headers=parsed)
        if verdict is not None:
            return verdict
        assert info.mail_from is not None
        checked = await self.service.check_sender(info, parsed, body) \
            if self._from_internet(connector) else None
        verdict_of_checks = checked or Inspection()
        received = policy.received_field(
            helo=info.helo, remote_ip=info.remote_ip, fqdn=connector.fqdn,
            local_ip=info.local_ip, esmtp=info.esmtp, tls=info.tls,
            user=info.authenticated_as, session_id=info.session_id,
            recipient=info.recipients[0].address if len(info.recipients) == 1 else None,
            when=time.time())
        rewritten = rebuild(parsed, remove=_removal(parsed, verdict_of_checks,
                                                    policy.firewalled(self.rights)),
                            prepend=[*verdict_of_checks.prepend, received])
        recipients = [EnvelopeRecipient(a) for a in verdict_of_checks.redirect_to] \
            or list(info.recipients)
        submission = Submission(
            Envelope(info.mail_from, recipients),
            replace_header_section(body, parsed, rewritten), source="SMTP",
            source_name=connector.name, message_id=message_id_of(parsed),
            subject=subject_of(parsed), client_ip=info.remote_ip,
            client_hostname=policy.helo_for_header(info.helo), server_ip=info.local_ip,
            context=verdict_of_checks.summary)
        if verdict_of_checks.response is not None:
            await self.service.runtime.track_unqueued(submission, verdict_of_checks.response)
            return verdict_of_checks.response
        verdict = await self.service.event("on_end_of_data", session=info,
                                           submission=submission)
        if verdict is not None:
            return verdict
        if verdict_of_checks.discard:  # accepted, and deleted (SpoofedDomainAction Delete)
            await self.service.runtime.track_unqueued(submission, DISCARDED, dropped=True)
            info.messages += 1
            return DISCARDED
        committing = asyncio.ensure_future(self.service.runtime.submit(submission))
        try:
            # shielded: a client that leaves now must not cut the commit short (its
            # message is then queued and tracked whole, a duplicate at worst)
            result = await asyncio.shield(committing)
        except StoreError:
            log.error("queue commit failed; the client is told to retry",
                      session=info.session_id)
            return LOCAL_ERROR
        except asyncio.CancelledError:
            # the commit goes on without us: its result decides who owns the spool file
            writer, self._spool = self._spool, None
            if writer is not None:
                committing.add_done_callback(partial(_keep_if_queued, writer))
            raise
        if result.response is not None:  # a receive hook refused it
            return result.response
        self._spool = None  # queued: the spool file is the queue's now
        internal = result.message_id
        info.messages += 1
        failpoint("after_receive_commit_before_reply")  # crash tests: queued, 250 never sent
        ident = f"<{submission.message_id.strip('<>')}> " if submission.message_id else ""
        return R(250, "2.6.0", f"{ident}[InternalId={internal}] Queued mail for delivery")

    async def cmd_rset(self, arg: str) -> None:
        if self.info is not None:
            self._reset_transaction()
        await self.push(self._format(R(250, "2.0.0", "Resetting")))

    async def cmd_noop(self, arg: str) -> None:
        await self.push(self._format(R(250, "2.0.0", "OK")))

    async def cmd_quit(self, arg: str) -> None:
        await self._goodbye(R(221, "2.0.0", "Service closing transmission channel"))

    async def cmd_vrfy(self, arg: str) -> None:
        await self.push(self._format(R(252, "2.1.5", "Cannot VRFY user, but will accept"
                                                     " message and attempt delivery")))

    async def cmd_expn(self, arg: str) -> None:
        await self.reply(R(502, "5.5.1", "Command not implemented"))

    async def cmd_bdat(self, arg: str) -> None:
        await self.protocol_error(R(502, "5.5.1", "Command not implemented"))

    async def cmd_help(self, arg: str) -> None:
        await self.push(self._format(R(214, "2.0.0", "Commands: HELO EHLO STARTTLS AUTH MAIL"
                                                     " RCPT DATA RSET NOOP QUIT VRFY HELP")))

    _commands: dict[str, Callable[[ReceiveProtocol, str], Awaitable[None]]] = {
        "HELO": cmd_helo, "EHLO": cmd_ehlo, "STARTTLS": cmd_starttls, "AUTH": cmd_auth,
        "MAIL": cmd_mail, "RCPT": cmd_rcpt, "DATA": cmd_data, "RSET": cmd_rset,
        "NOOP": cmd_noop, "QUIT": cmd_quit, "VRFY": cmd_vrfy, "EXPN": cmd_expn,
        "BDAT": cmd_bdat, "HELP": cmd_help,
    }


# -- argument syntax -------------------------------------------------------------------------


def _removal(parsed: ParsedMessage, checked: Inspection,
             firewall: Callable[[HeaderField], bool] | None
             ) -> Callable[[HeaderField], bool] | None:
    """Which received fields go: the header firewall's, and those the checks named."""
    named = {id(parsed.fields[i]) for i in checked.remove if 0 <= i < len(parsed.fields)}
    if not named:
        return firewall
    return lambda field: id(field) in named or (firewall is not None and firewall(field))


def _keep_if_queued(writer: SpoolWriter, commit: asyncio.Future[SubmitResult]) -> None:
    """A commit the session stopped waiting for has ended: the spool file goes when a hook
    refused the message. A commit cancelled or failed may still have named the file (it is
    cancelled at shutdown, possibly after its transaction): the start-up sweep removes the
    file then if, and only if, no message row names it."""
    if not commit.cancelled() and commit.exception() is None and \
            commit.result().response is not None:
        writer.discard()


def _control_reply(command: str) -> SmtpResponse:
    if command == "MAIL":
        return BAD_SENDER
    if command == "RCPT":
        return BAD_RECIPIENT
    return R(501, "5.5.2", "Syntax error: control character in command")


def _without_root_dot(path: str) -> str:
    """`<a@Example.COM.>` names the same domain as `<a@example.com>` (docs/reliability.md E)."""
    inner = path[1:-1] if path.startswith("<") and path.endswith(">") else path
    if inner.endswith(".") and "@" in inner and not inner.endswith("@."):
        inner = inner[:-1]
    return f"<{inner}>" if path.startswith("<") else inner


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _split_command(arg: str, keyword: str) -> tuple[str, str] | None:
    """`FROM:<a@b> SIZE=1` → ('<a@b>', 'SIZE=1'); the path may hold quoted '>' or spaces."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword):].lstrip(" ")
    if not rest:
        return None
    if not rest.startswith("<"):
        path, _, params = rest.partition(" ")
        return path, params
    quoted = escaped = False
    for index, ch in enumerate(rest):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            tail = rest[index + 1:]
            if tail and not tail.startswith(" "):
                return None
            return rest[: index + 1], tail.strip(" ")
    return None


def _parse_params(text: str, esmtp: bool) -> dict[str, str | None] | None:
    """ESMTP parameters; None on bad syntax, duplicates, or any parameter after HELO.

    Parameters are ASCII: none hubport knows takes UTF-8 (RFC 6531 §3.3 allows it only in
    values), and Python would otherwise read `SIZE=١٢` as 12 or `NOTIFY=ſuccess` as SUCCESS.
    """
    if not text.isascii():
        return None
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not _PARAM_KEY.fullmatch(key) or (eq and not value):
            return None
        upper = key.upper()
        if upper in params:
            return None
        params[upper] = value if eq else None
    if params and not esmtp:
        return None
    return params


def _mail_parameter(mail_from: MailFrom, key: str, value: str | None,
                    connector: ReceiveConnector, bypass_size: bool) -> SmtpResponse | None:
    unsupported = R(555, "5.5.4", f"Unsupported option: {key}")
    if key == "SIZE" and connector.size_enabled != "Disabled":
        if value is None or not value.isdigit() or len(value) > 20:
            return BAD_PARAMETERS
        if int(value) > connector.max_message_size and not bypass_size:
            return TOO_BIG
        return None
    if key == "BODY":
        body = (value or "").upper()
        if body == "7BIT" or (body == "8BITMIME" and connector.eight_bit_mime_enabled):
            mail_from.body = body
            return None
        return BAD_PARAMETERS if body not in ("8BITMIME", "BINARYMIME") else unsupported
    if key == "SMTPUTF8" and value is None:
        if not connector.smtp_utf8_enabled:
            return R(555, "5.5.4", "SMTPUTF8 not supported")
        mail_from.smtputf8 = True
        return None
    if key == "RET" and connector.delivery_status_notification_enabled:
        if (value or "").upper() not in ("FULL", "HDRS"):
            return BAD_PARAMETERS
        mail_from.ret = (value or "").upper()
        return None
    if key == "ENVID" and connector.delivery_status_notification_enabled:
        if not value or not _XTEXT.fullmatch(value) or len(value) > 100:
            return BAD_PARAMETERS
        mail_from.envid = value
        return None
    if key == "AUTH":
        return None if value and _XTEXT.fullmatch(value) else BAD_PARAMETERS
    return unsupported


def _recipient(address: str, params: dict[str, str | None],
               connector: ReceiveConnector) -> EnvelopeRecipient | SmtpResponse:
    notify: frozenset[Notify] = frozenset()
    orcpt = None
    for key, value in params.items():
        if key == "NOTIFY" and connector.delivery_status_notification_enabled:
            try:  # NOTIFY without a value is a syntax error, not an unknown parameter
                notify = frozenset(Notify(v.strip().upper()) for v in (value or "").split(","))
            except ValueError:
                return BAD_PARAMETERS
            if Notify.NEVER in notify and len(notify) > 1:
                return BAD_PARAMETERS
        elif key == "ORCPT" and connector.delivery_status_notification_enabled:
            value = value or ""
            kind, semicolon, _ = value.partition(";")
            if not semicolon or not kind or not _XTEXT.fullmatch(value) or len(value) > 500:
                return BAD_PARAMETERS
            orcpt = value
        else:
            return R(555, "5.5.4", f"Unsupported option: {key}")
    return EnvelopeRecipient(address, notify, orcpt)
