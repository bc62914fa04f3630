"""Legacy routing groups (docs/exchange.md, "Routing Group connectors").

Exchange 2010 reaches an Exchange 2003 routing group through a Routing Group connector.
In hubport a legacy routing group is any named group of SMTP servers (another MTA, an older
mail system) that the organization shares recipients and address spaces with: mailboxes and
contacts homed there name their ``RoutingGroup``, its ``AddressSpaces`` are the addresses
its own connectors serve, and a ``[[routing_group_connector]]`` (a connector type of the
smtp_send plugin) carries the mail to its servers.

A legacy server is recognized when it sends to us (the ``ExchangeLegacyServers`` permission
group) by its configured IP address or by the certificate it presents. This module owns the
declaration and that recognition; routing and delivery belong to the routing table and the
connector.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubport.core.address_space import AddressSpace
from hubport.core.addresses import AddressError, check_hostname
from hubport.core.config_fields import ConfigContext, FieldReader

__all__ = ["EXCHANGE_ROUTING_GROUP", "HOME_TYPE", "LegacyServer", "RoutingGroup",
           "is_legacy_peer", "legacy_senders", "read_routing_groups"]

#: the address type of recipients homed in a legacy routing group (the address is the
#: group's name): only Routing Group connectors have address spaces of this type
HOME_TYPE = "RoutingGroup"
#: the routing group every hub of the organization belongs to (Exchange 2010 names it so)
EXCHANGE_ROUTING_GROUP = "Exchange Routing Group (DWBGZMFD01QNBJR)"


@dataclass(frozen=True)
class LegacyServer:
    """One server of a legacy routing group: where to reach it and how it proves itself."""

    name: str
    address: str  # an IP address: what its sessions to us come from
    port: int = 25
    certificate: Path | None = None
    #: SHA-256 of the certificate (DER), what a presented client certificate is compared to
    certificate_sha256: str | None = None


@dataclass(frozen=True)
class RoutingGroup:
    """``[[routing_group]]``: a named group of legacy servers."""

    name: str
    servers: tuple[LegacyServer, ...]
    address_spaces: tuple[AddressSpace, ...] = ()

    def server(self, name: str) -> LegacyServer | None:
        wanted = name.strip().lower()
        return next((s for s in self.servers if s.name.lower() == wanted), None)


def certificate_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def is_legacy_peer(servers: Iterable[LegacyServer], address: str | None,
                   certificate_der: bytes | None) -> bool:
    """Whether a session comes from one of ``servers``: its certificate is one of theirs,
    or (with no certificate) its address is."""
    servers = list(servers)
    if certificate_der:
        fingerprint = certificate_fingerprint(certificate_der)
        if any(s.certificate_sha256 == fingerprint for s in servers):
            return True
    if address is None:
        return False
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return any(ipaddress.ip_address(s.address) == peer for s in servers)


def read_routing_groups(readers: Iterable[tuple[int, FieldReader]], ctx: ConfigContext
                        ) -> tuple[RoutingGroup, ...]:
    """Every ``[[routing_group]]``; each problem is an error naming the group and field."""
    groups: list[RoutingGroup] = []
    seen: dict[str, str] = {}
    servers_seen: dict[str, str] = {}
    for index, reader in readers:
        name = reader.name()
        servers = _servers(reader, ctx, servers_seen)
        spaces = reader.address_spaces("AddressSpaces")
        reader.finish()
        if not name:
            continue
        if name.lower() in seen:
            reader.error("Name", f"name already used by {seen[name.lower()]}")
            continue
        if name.lower() == EXCHANGE_ROUTING_GROUP.lower():
            reader.error("Name", "is the routing group of the organization's own hubs")
            continue
        seen[name.lower()] = f"{reader.object} (entry {index + 1})"
        groups.append(RoutingGroup(name, servers, spaces))
    return tuple(groups)


def _servers(reader: FieldReader, ctx: ConfigContext, seen: dict[str, str]
             ) -> tuple[LegacyServer, ...]:
    value = reader.raw("Servers")
    if isinstance(value, Mapping):  # one server, as a cmdlet's single @{...} gives it
        value = [value]
    if value is None or value == []:
        reader.error("Servers", "required: a routing group has at least one server, written"
                                ' Servers = [{ Name = "EX2003A", Address = "192.0.2.10" }]')
        return ()
    if not isinstance(value, list) or not all(isinstance(t, Mapping) for t in value):
        reader.error("Servers", "expected a list of tables with Name, Address, Port and"
                                " Certificate")
        return ()
    servers: list[LegacyServer] = []
    for number, table in enumerate(value, 1):
        sub = FieldReader(table, f"{reader.object} Servers[{number}]", ctx)
        server = _server(sub, ctx)
        sub.finish()
        if server is None:
            continue
        key = server.name.lower()
        if key in seen or ctx.server_name(server.name) is not None:
            sub.error("Name", f"{server.name} is already "
                              f"{seen.get(key) or 'a transport server of the organization'}")
            continue
        seen[key] = f"a server of {reader.object}"
        servers.append(server)
    return tuple(servers)


def _server(sub: FieldReader, ctx: ConfigContext) -> LegacyServer | None:
    address = sub.string("Address")
    name = sub.string("Name")
    port = sub.int("Port", 25, min=1, max=65535)
    certificate = sub.path("Certificate", None)
    if address is None:
        sub.error("Address", "required: the server's IP address")
        return None
    try:
        ipaddress.ip_address(address)
    except ValueError:
        sub.error("Address", f"{address!r} is not an IP address (the address its sessions"
                             " to us come from, which recognizes it as a legacy server)")
        return None
    if name:
        try:
            check_hostname(name)
        except AddressError as exc:
            sub.error("Name", f"{name!r}: {exc}")
            return None
    fingerprint = None
    if certificate is not None:
        fingerprint = _fingerprint(sub, certificate)
        if fingerprint is None:
            return None
    return LegacyServer(name or address, address, port or 25, certificate, fingerprint)


def _fingerprint(sub: FieldReader, path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii")
        start = text.index("-----BEGIN CERTIFICATE-----")
        end = text.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        return certificate_fingerprint(ssl.PEM_cert_to_DER_cert(text[start:end]))
    except (OSError, UnicodeDecodeError) as exc:
        sub.error("Certificate", f"cannot read {path}: {exc}")
    except ValueError:
        sub.error("Certificate", f"{path} holds no PEM certificate")
    return None


def legacy_senders(groups: Sequence[RoutingGroup], connectors: Sequence[Any]
                   ) -> tuple[LegacyServer, ...]:
    """The legacy servers the ``ExchangeLegacyServers`` group stands for: the source
    servers of the routing group connectors that bring mail from a legacy group to our
    hubs (a Bidirectional connector's reciprocal)."""
    by_name = {s.name.lower(): s for g in groups for s in g.servers}
    found: dict[str, LegacyServer] = {}
    for connector in connectors:
        if getattr(connector, "source_routing_group", None) is None or \
                connector.source_routing_group == EXCHANGE_ROUTING_GROUP:
            continue
        for name in getattr(connector, "legacy_source_servers", ()):
            server = by_name.get(name.lower())
            if server is not None:
                found.setdefault(server.name.lower(), server)
    return tuple(found.values())
