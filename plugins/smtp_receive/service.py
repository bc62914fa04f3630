"""The receive connectors of one server at run time: listeners, connector choice, limits.

One listening socket serves every connector bound to the same IP and port (a wildcard
address serves the specific ones of its family too); which connector a client gets is
decided per connection: the connector whose binding names the local address exactly wins
over a wildcard binding, then the one whose RemoteIPRanges hold the client most
specifically (docs/exchange.md, "Receive connectors and permission groups"). A configuration
change re-binds only what changed; sessions already running keep the connector they started
with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from hubport.core.credentials import PasswordStore, hash_password, mailbox_for_login
from hubport.core.internal_tls import InternalTls, internal_tls
from hubport.core.model import Inspection, SmtpResponse
from hubport.core.protocol_log import ProtocolLog
from hubport.core.rotating_log import log_writer
from hubport.core.routing_groups import is_legacy_peer
from hubport.core.services import ServiceError, ServiceRuntime
from hubport.core.tls import (
    CertificatePair,
    TlsConfigError,
    describe,
    ensure_self_signed,
    server_context,
)
from hubport.plugins.smtp_receive.connector import ReceiveConnector
from hubport.plugins.smtp_receive.protocol import LOCAL_ERROR, ReceiveProtocol

if TYPE_CHECKING:
    from hubport.core.body import MessageBody
    from hubport.core.config import Mailbox
    from hubport.core.headers import ParsedMessage
    from hubport.core.model import ReceiveSession

log = structlog.get_logger("hubport.smtp.receive")
logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-connection chatter

TOO_MANY_CONNECTIONS = SmtpResponse(
    421, "4.3.2", "The maximum number of concurrent server connections has exceeded a limit,"
    " closing transmission channel")
TOO_MANY_FROM_SOURCE = SmtpResponse(
    421, "4.3.2", "The maximum number of concurrent connections has exceeded a limit, closing"
    " transmission channel")
DRAIN_TIMEOUT = 10.0
SWEEP_INTERVAL = 0.25
SMTP_EVENTS = ("on_connect", "on_helo", "on_starttls", "on_auth", "on_mail_from", "on_rcpt_to",
               "on_data", "on_end_of_headers", "on_end_of_data", "on_disconnect",
               "authenticate_sender")


#: seconds between checks that the internal transport certificate is not due for renewal
RENEWAL_CHECK = 6 * 3600.0


def _differs(old: InternalTls, new: InternalTls) -> bool:
    """Whether ``new`` presents another certificate than ``old`` did when it was loaded."""
    return new is not old and new.pair.certificate.read_bytes() != old.pem


class ReceiveService:
    """Implements ``hubport.core.services.ConnectorService`` for ``[[receive_connector]]``."""

    def __init__(self, runtime: ServiceRuntime) -> None:
        self.runtime = runtime
        self.connectors: list[ReceiveConnector] = []
        self.listeners: dict[tuple[str, int, bool], asyncio.AbstractServer] = {}
        self.sessions: set[ReceiveProtocol] = set()
        self._rates: dict[str, deque[float]] = {}
        self._tls: dict[str, ssl.SSLContext] = {}
        self._internal: InternalTls | None = None
        self._passwords: PasswordStore | None = None
        self._protocol_log: ProtocolLog | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        #: local_names() for the organization and connectors in force
        self._names: dict[bool, frozenset[str]] = {}
        self._names_of: Any = None
        self._names_for: Any = None
        self._events = self._implemented_events()

    # -- lifecycle -----------------------------------------------------------------------

    async def apply(self, connectors: Sequence[Any]) -> None:
        server = self.runtime.server
        mine = [dataclasses.replace(c, fqdn=c.fqdn or server.fqdn) for c in connectors
                if isinstance(c, ReceiveConnector) and c.enabled
                and c.server.lower() == server.name.lower()]
        contexts, internal = await asyncio.to_thread(self._tls_contexts, mine,
                                                     server.state_directory)
        wanted = _sockets(mine)
        self._tls = {**self._tls, **contexts}  # implicit-TLS listeners need them now
        opened: dict[tuple[str, int, bool], asyncio.AbstractServer] = {}
        try:
            for key in wanted:
                if key not in self.listeners:
                    opened[key] = await self._listen(*key, mine)
        except OSError as exc:
            for listener in opened.values():
                listener.close()
            raise ServiceError(f"receive connector binding {_show(key)} cannot be opened:"
                               f" {exc.strerror or exc}") from exc
        for key in [k for k in self.listeners if k not in wanted]:
            self.listeners.pop(key).close()
        self.listeners.update(opened)
        self.connectors, self._tls, self._internal = mine, contexts, internal
        self._passwords = PasswordStore(server.password_file_path)
        self._start_protocol_log()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle(),
                                                                   name="smtp-idle-sweeper")
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_internal(), name="internal-certificate-renewal")
        for key in opened:
            log.info("receive connector listening", binding=_show(key),
                     connectors=[c.name for c in mine if _serves(key, c)])

    async def _listen(self, ip: str, port: int, implicit_tls: bool,
                      connectors: list[ReceiveConnector]) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        context = None
        handshake = None
        if implicit_tls:
            tls_connector = next(c for c in connectors if c.implicit_tls and _serves(
                (ip, port, True), c))
            context = self._tls[tls_connector.name]
            handshake = tls_connector.tls_handshake_timeout
        shared = self.runtime.worker.count > 1
        if shared and self.runtime.first_bind and not self.listeners:
            # the workers of one server share each binding (SO_REUSEPORT): the first makes
            # sure no other process holds it, which SO_REUSEPORT alone would not tell
            await asyncio.to_thread(_probe_binding, ip, port)
        return await loop.create_server(
            lambda: ReceiveProtocol(self, implicit_tls=implicit_tls), host=ip, port=port,
            reuse_address=True, reuse_port=shared or None, backlog=512, ssl=context,
            ssl_handshake_timeout=handshake)

    def _tls_contexts(self, connectors: list[ReceiveConnector], state: Path
                      ) -> tuple[dict[str, ssl.SSLContext], InternalTls | None]:
        """One server context per TLS connector, and this server's internal transport
        certificate when a connector takes other hubs (the ExchangeServer mechanism).

        Such a connector presents that certificate (unless it names its own) and asks for
        the client's, checked against the organization's CA; any other TLS connector
        presents its own certificate or a self-signed one, as Exchange does at setup."""
        internal = None
        if any("ExchangeServer" in c.auth_mechanism for c in connectors if c.offers_tls):
            try:
                internal = internal_tls(self.runtime.organization, self.runtime.server)
            except (TlsConfigError, OSError) as exc:
                raise ServiceError(f"internal transport certificate: {exc}") from exc
        contexts = {}
        for c in connectors:
            if not c.offers_tls:
                continue
            exchange = internal is not None and "ExchangeServer" in c.auth_mechanism
            try:
                if c.tls_certificate_file is not None and c.tls_certificate_key_file is not None:
                    pair = CertificatePair(c.tls_certificate_file, c.tls_certificate_key_file)
                elif exchange:
                    assert internal is not None
                    pair = internal.pair
                else:
                    pair = ensure_self_signed(state / "tls", c.fqdn)
                authorities = [internal.authority] if exchange and internal else []
                if c.tls_client_certificate_authority_file is not None:
                    authorities.append(c.tls_client_certificate_authority_file)
                if "ExchangeLegacyServers" in c.permission_groups:
                    # a legacy server's own certificate is its trust anchor (pinned)
                    authorities += [s.certificate for s in self.runtime.organization
                                    .legacy_servers if s.certificate is not None]
                # an Internet server may present a certificate from a public CA: the
                # system CAs stay trusted for the handshake; only the organization's CA
                # makes an Exchange server (proven_server)
                contexts[c.name] = server_context(
                    pair, client_ca=authorities or None,
                    request_client_certificate=bool(authorities),
                    system_cas=exchange and c.tls_client_certificate_authority_file is None)
            except (TlsConfigError, OSError, ValueError, ssl.SSLError) as exc:
                raise ServiceError(f"{c.label}: TLS certificate: {exc}") from exc
        return contexts, internal

    def _start_protocol_log(self) -> None:
        if self._protocol_log is not None:
            return
        server = self.runtime.server
        worker = self.runtime.worker  # the workers share the folder, a file family each
        self._protocol_log = ProtocolLog(
            server.receive_protocol_log_path, "RECV", max_age=server.protocol_log_max_age,
            max_directory_size=server.protocol_log_max_directory_size,
            max_file_size=server.protocol_log_max_file_size,
            writer=log_writer(worker), writers=worker.count)
        self._flusher = asyncio.get_running_loop().create_task(
            self._protocol_log.run_flusher(), name="protocol-log-recv")

    async def _sweep_idle(self) -> None:
        """Close sessions past their deadline (inactivity, ConnectionTimeout)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            for session in [s for s in self.sessions if s.deadline <= now]:
                try:
                    session._timeout_cb()
                except Exception:  # one broken session must not stop every timeout
                    log.exception("closing an idle session failed")
                    self.sessions.discard(session)

    async def _renew_internal(self) -> None:
        """Renew the internal transport certificate while the server runs: every
        ``RENEWAL_CHECK`` seconds it is issued again when due (core/internal_tls.py), and
        the connectors that present it take the new one for their next handshakes."""
        while True:
            await asyncio.sleep(RENEWAL_CHECK)
            current = self._internal
            if current is None:
                continue
            try:
                fresh = await asyncio.to_thread(internal_tls, self.runtime.organization,
                                                self.runtime.server)
                changed = await asyncio.to_thread(_differs, current, fresh)
                if not changed:
                    continue
                for c in self.connectors:
                    context = self._tls.get(c.name)
                    if context is not None and c.tls_certificate_file is None and \
                            "ExchangeServer" in c.auth_mechanism:
                        # on the loop: a context is never changed under a handshake
                        context.load_cert_chain(fresh.pair.certificate, fresh.pair.key)
            except (TlsConfigError, OSError, ssl.SSLError) as exc:
                log.error("internal transport certificate: renewal failed", error=str(exc))
                continue
            self._internal = fresh
            log.info("internal transport certificate renewed",
                     certificate=str(fresh.pair.certificate))

    async def stop(self) -> None:
        """Close the listeners, let messages in DATA finish, then close the sessions."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._renewer is not None:
            self._renewer.cancel()
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while any(s.in_data for s in self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            await session.shutdown()
        if self._flusher is not None:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        if self._protocol_log is not None:
            await asyncio.to_thread(self._protocol_log.close)

    # -- per connection ------------------------------------------------------------------

    def choose(self, local_ip: str, local_port: int, remote_ip: str) -> ReceiveConnector | None:
        """Local binding first (exact address over wildcard), then the narrowest range."""
        try:
            client = ipaddress.ip_address(remote_ip.split("%")[0])
        except ValueError:
            return None
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
            client = client.ipv4_mapped
        local = _canonical(local_ip)
        exact = [c for c in self.connectors if (local, local_port) in c.bindings]
        wildcard = [c for c in self.connectors
                    if (_wildcard_of(local), local_port) in c.bindings]
        for candidates in (exact, wildcard):
            ranked = [(r.size, c.name, c) for c in candidates
                      if (r := c.matches_remote(client)) is not None]
            if ranked:
                return min(ranked, key=lambda t: (t[0], t[1]))[2]
        return None

    def opened(self, session: ReceiveProtocol) -> tuple[str, SmtpResponse | None]:
        """Count a new session; the refusal when a connection limit is reached.

        The counts are the server's, over all its workers (``runtime.counters``); a refused
        session is counted too, until it is closed."""
        connector, info = session.connector, session.info
        assert connector is not None and info is not None
        self.sessions.add(session)
        source = _source_key(info.remote_ip)
        counters = self.runtime.counters
        per_connector, per_source = _counter_keys(connector.name, source)
        total = counters.total(per_connector)
        mine = counters.total(per_source)
        counters.add(per_connector, 1)
        counters.add(per_source, 1)
        limit = connector.max_inbound_connection
        if limit is not None and total >= limit:
            return source, TOO_MANY_CONNECTIONS
        per_source_limit = connector.max_inbound_connection_per_source
        if per_source_limit is not None and mine >= per_source_limit:
            return source, TOO_MANY_FROM_SOURCE
        if limit is not None:
            share = (limit - total) * connector.max_inbound_connection_percentage_per_source
            if mine >= max(1, share // 100):
                return source, TOO_MANY_FROM_SOURCE
        return source, None

    def closed(self, session: ReceiveProtocol) -> None:
        self.sessions.discard(session)
        connector = session.connector
        if connector is None:
            return
        counters = self.runtime.counters
        for key in _counter_keys(connector.name, session.source_key):
            counters.add(key, -1)
        if "on_disconnect" in self._events and session.info is not None:
            asyncio.get_running_loop().create_task(
                self.runtime.hooks.notify("on_disconnect", session=session.info))

    def within_rate(self, session: ReceiveProtocol) -> bool:
        """MessageRateLimit: messages per minute per client IP, user, or both."""
        connector, info = session.connector, session.info
        assert connector is not None and info is not None
        if connector.message_rate_limit is None or connector.message_rate_source == "None":
            return True
        keys = []
        if connector.message_rate_source in ("IPAddress", "All"):
            keys.append(f"ip:{session.source_key}")
        if connector.message_rate_source in ("User", "All") and info.authenticated_as:
            keys.append(f"user:{info.authenticated_as}")
        now = time.monotonic()
        for key in keys:
            window = self._rates.setdefault(key, deque())
            while window and now - window[0] >= 60:
                window.popleft()
            if len(window) >= connector.message_rate_limit:
                return False
        for key in keys:
            self._rates[key].append(now)
        return True

    def tls_context(self, connector: ReceiveConnector) -> ssl.SSLContext | None:
        return self._tls.get(connector.name)

    def protocol_session(self, connector: ReceiveConnector, local: Any, remote: Any) -> Any:
        if connector.protocol_logging_level != "Verbose" or self._protocol_log is None \
                or not self._protocol_log.enabled:
            return None
        return self._protocol_log.session(connector.name, tuple(local[:2]), tuple(remote[:2]))

    @staticmethod
    def describe_tls(transport: Any) -> str | None:
        return describe(transport.get_extra_info("ssl_object")) if transport else None

    @staticmethod
    def peer_name(transport: Any, connector: ReceiveConnector) -> str | None:
        """The host name a verified client certificate proves, else None."""
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        if not certificate:
            return None
        names = [v for k, v in certificate.get("subjectAltName", ()) if k == "DNS"]
        for rdn in certificate.get("subject", ()):
            names += [v for k, v in rdn if k == "commonName"]
        return names[0].lower() if names else None

    def proven_server(self, transport: Any) -> str | None:
        """The organization's transport server the client certificate proves (issued by
        the organization's CA, naming a server of the organization), else None: a
        certificate from any other CA never makes a session an Exchange server."""
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        if ssl_object is None or self._internal is None:
            return None
        return self._internal.proves_server(ssl_object.getpeercert(binary_form=True))

    def legacy_peer(self, transport: Any, address: str | None) -> bool:
        """Whether the session comes from a legacy server of the organization (a source
        server of a routing group connector to our hubs): by the certificate it presented
        or, with none, by its address (docs/exchange.md, "Routing Group connectors")."""
        servers = self.runtime.organization.legacy_servers
        if not servers:
            return False
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        return is_legacy_peer(servers, address, der)

    def local_names(self, *, every_server: bool = False) -> frozenset[str]:
        """FQDNs that mean "us": this server's (or every server's of the organization).

        Asked for every message (MaxLocalHopCount): computed once per configuration."""
        org = self.runtime.organization
        if self._names_of is not org or self._names_for is not self.connectors:
            self._names_of, self._names_for, self._names = org, self.connectors, {}
        cached = self._names.get(every_server)
        if cached is not None:
            return cached
        servers = org.servers if every_server else (self.runtime.server,)
        names = {s.fqdn.lower() for s in servers}
        if not every_server:
            names |= {c.fqdn.lower() for c in self.connectors}
        self._names[every_server] = frozenset(names)
        return self._names[every_server]

    async def authenticate(self, login: str, password: str) -> Mailbox | None:
        """The mailbox whose password this is, else None (same cost either way)."""
        mailbox = mailbox_for_login(self.runtime.organization, login) if login else None
        if mailbox is None or self._passwords is None:
            await asyncio.to_thread(hash_password, password)  # no timing oracle
            return None
        return mailbox if await self._passwords.verify(mailbox, password) else None

    # -- agent events ---------------------------------------------------------------------

    def _implemented_events(self) -> frozenset[str]:
        hook = self.runtime.hooks.pm.hook
        return frozenset(name for name in SMTP_EVENTS
                         if getattr(hook, name).get_hookimpls())

    async def check_sender(self, session: ReceiveSession, headers: ParsedMessage,
                           body: MessageBody) -> Inspection | None:
        """The ``authenticate_sender`` verdicts on a message from the Internet, merged; a
        raising plugin is logged and has no say (the message is not refused for it)."""
        if "authenticate_sender" not in self._events:
            return None
        try:
            found = await self.runtime.hooks.call_all(
                "authenticate_sender", session=session, headers=headers, body=body,
                organization=self.runtime.organization, server=self.runtime.server)
        except Exception:
            log.exception("an authenticate_sender implementation raised; the message is"
                          " taken without its verdict", session=session.session_id)
            return None
        return Inspection.merge(found) if found else None

    async def event(self, name: str, **kwargs: Any) -> SmtpResponse | None:
        """Run an SMTP agent event; a raising plugin answers 451 4.3.0, never a 5xx."""
        if name not in self._events:
            return None
        try:
            verdict = await self.runtime.hooks.call_first(name, **kwargs)
        except Exception:
            log.exception("an SMTP receive agent raised", hook=name)
            return LOCAL_ERROR
        if isinstance(verdict, SmtpResponse) and verdict.code >= 400:
            return verdict
        return None


# -- sockets --------------------------------------------------------------------------------


def _canonical(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).compressed


def _wildcard_of(ip: str) -> str:
    return "::" if ":" in ip else "0.0.0.0"


def _probe_binding(ip: str, port: int) -> None:
    """Raise OSError (address in use) when another process listens on ``ip:port``."""
    for family, kind, proto, _, address in socket.getaddrinfo(
            ip or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)


def _sockets(connectors: list[ReceiveConnector]) -> set[tuple[str, int, bool]]:
    """The listening sockets: a wildcard address covers the specific ones of its family."""
    wanted = {(ip, port, c.implicit_tls) for c in connectors for ip, port in c.bindings}
    return {(ip, port, tls) for ip, port, tls in wanted
            if ip in ("0.0.0.0", "::") or (_wildcard_of(ip), port, tls) not in wanted}


def _serves(key: tuple[str, int, bool], connector: ReceiveConnector) -> bool:
    ip, port, _tls = key
    return any(p == port and (i == ip or ip == _wildcard_of(i)) for i, p in connector.bindings)


def _show(key: tuple[str, int, bool]) -> str:
    ip, port, tls = key
    text = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return text + (" (implicit TLS)" if tls else "")


def _counter_keys(connector: str, source: str) -> tuple[str, str]:
    """The server-wide counters of a session: its connector's, and its source's on it."""
    return f"recv|{connector}", f"recv|{connector}|{source}"


def _source_key(ip: str) -> str:
    """Per-source limits count IPv6 clients by their /64."""
    try:
        address = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return ip
    if address.version == 6 and not getattr(address, "ipv4_mapped", None):
        return ipaddress.ip_network(f"{address}/64", strict=False).compressed
    return _canonical(ip)
