"""`[[receive_connector]]` (New-ReceiveConnector): where and how a server accepts SMTP.

Field names and defaults are Exchange 2010's
(docs/exchange.md, "Receive connectors and permission groups"). A `Usage` template sets the
defaults of AuthMechanism and PermissionGroups as New-ReceiveConnector -Usage does. Values
hubport cannot honour (Integrated auth, CHUNKING, XLONGADDR ...) are refused at load with the
reason, never accepted and ignored. hubport extensions are marked as such below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hubport.core.addresses import AddressError, check_hostname, domain_to_ascii
from hubport.core.config_fields import ConfigContext, FieldReader
from hubport.plugins.smtp_receive.permissions import (
    GROUPS,
    Principal,
    Right,
    parse_principal,
    parse_right,
)
from hubport.plugins.smtp_receive.ranges import IPRange, parse_range

if TYPE_CHECKING:
    from hubport.core.services import ConnectorService, ServiceRuntime

KB, MB, GB = 1024, 1024 * 1024, 1024 * 1024 * 1024

AUTH_MECHANISMS = ("None", "Tls", "Integrated", "BasicAuth", "BasicAuthRequireTLS",
                   "ExchangeServer", "ExternalAuthoritative")
USAGES = ("Custom", "Internet", "Internal", "Client", "Partner")
#: Usage -> (AuthMechanism, PermissionGroups) defaults (New-ReceiveConnector -Usage)
USAGE_DEFAULTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Custom": (("Tls",), ()),
    "Internet": (("Tls",), ("AnonymousUsers",)),
    "Internal": (("Tls", "ExchangeServer"), ("ExchangeServers",)),
    "Client": (("Tls", "BasicAuth", "BasicAuthRequireTLS"), ("ExchangeUsers",)),
    "Partner": (("Tls",), ("Partners",)),
}
ALL_IPV4 = "0.0.0.0-255.255.255.255"
ALL_IPV6 = "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


@dataclass
class ReceiveConnector:
    """One receive connector of one transport server."""

    name: str
    server: str
    bindings: tuple[tuple[str, int], ...]
    remote_ip_ranges: tuple[IPRange, ...]
    fqdn: str
    usage: str = "Custom"
    banner: str | None = None
    auth_mechanism: frozenset[str] = frozenset({"Tls"})
    permission_groups: frozenset[str] = frozenset()
    #: Add-ADPermission entries: extra rights for a principal on this connector
    permissions: dict[Principal, frozenset[Right]] = field(default_factory=dict)
    enabled: bool = True
    max_inbound_connection: int | None = 5000
    max_inbound_connection_per_source: int | None = 20
    max_inbound_connection_percentage_per_source: int = 2
    connection_timeout: float = 600.0
    connection_inactivity_timeout: float = 300.0
    max_message_size: int = 10 * MB
    max_recipients_per_message: int = 200
    max_header_size: int = 64 * KB
    max_hop_count: int = 30
    max_local_hop_count: int = 8
    max_logon_failures: int = 3
    max_protocol_errors: int | None = 5
    message_rate_limit: int | None = None
    message_rate_source: str = "IPAddress"
    protocol_logging_level: str = "None"
    require_tls: bool = False
    tarpit_interval: float = 5.0
    require_ehlo_domain: bool = False
    size_enabled: str = "Enabled"
    enhanced_status_codes_enabled: bool = True
    pipelining_enabled: bool = True
    eight_bit_mime_enabled: bool = True
    delivery_status_notification_enabled: bool = True
    # hubport extensions
    smtp_utf8_enabled: bool = False
    tls_certificate_file: Path | None = None
    tls_certificate_key_file: Path | None = None
    tls_client_certificate_authority_file: Path | None = None
    implicit_tls: bool = False
    bare_line_endings: str = "Reject"
    #: which sessions get the inbound mail authentication checks ([sender_id_config]):
    #: Anonymous (sessions from the Internet) or None
    mail_authentication: str = "Anonymous"
    max_line_length: int = 64 * KB
    greeting_delay: float = 0.0
    tls_handshake_timeout: float = 30.0
    min_data_rate: int = 1 * KB
    #: `receive_connector "Default HUB01"`: names the object in later messages
    label: str = field(default="", compare=False)

    section: ClassVar[str] = "receive_connector"
    kind: ClassVar[str] = "ReceiveConnector"

    # -- derived ---------------------------------------------------------------------

    def summary(self) -> str:
        """One line for ``hubport test-config``."""
        bindings = ", ".join(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                             for ip, port in self.bindings)
        groups = ", ".join(sorted(self.permission_groups)) or "None"
        return (f'{self.kind} "{self.name}": {bindings} on {self.server}; {groups}'
                + ("" if self.enabled else "; disabled"))

    @property
    def offers_tls(self) -> bool:
        return "Tls" in self.auth_mechanism or self.implicit_tls

    @property
    def offers_basic_auth(self) -> bool:
        return "BasicAuth" in self.auth_mechanism

    @property
    def basic_auth_requires_tls(self) -> bool:
        return "BasicAuthRequireTLS" in self.auth_mechanism

    @property
    def externally_secured(self) -> bool:
        return "ExternalAuthoritative" in self.auth_mechanism

    def matches_remote(self, address: Any) -> IPRange | None:
        """The most specific of this connector's remote ranges holding ``address``."""
        best = None
        for ip_range in self.remote_ip_ranges:
            if ip_range.contains(address) and (best is None or ip_range.size < best.size):
                best = ip_range
        return best

    # -- the connector-type contract ---------------------------------------------------

    @classmethod
    def create_service(cls, runtime: ServiceRuntime) -> ConnectorService:
        from hubport.plugins.smtp_receive.service import ReceiveService

        return ReceiveService(runtime)

    @classmethod
    def from_config(cls, r: FieldReader, ctx: ConfigContext) -> ReceiveConnector:
        name = r.name()
        servers = ctx.default_source_servers()
        server = r.server("Server", servers[0] if servers else "") or ""
        usage = r.string("Usage", "Custom", choices=USAGES) or "Custom"
        auth_default, groups_default = USAGE_DEFAULTS[usage]
        auth = _choices(r, "AuthMechanism", AUTH_MECHANISMS, auth_default)
        groups = _choices(r, "PermissionGroups", tuple(GROUPS), groups_default)
        bindings = r.endpoints("Bindings", port=25)
        if not bindings:
            r.error("Bindings", "required: at least one IP:port to listen on")
        ranges = _ranges(r, "RemoteIPRanges", (ALL_IPV4, ALL_IPV6))
        connection_timeout = r.duration("ConnectionTimeout", "10m", "1s", "1d")
        inactivity = r.duration("ConnectionInactivityTimeout", "5m", "1s", "1d")
        if connection_timeout <= inactivity:
            r.error("ConnectionTimeout", "must be greater than ConnectionInactivityTimeout")
        connector = cls(
            name=name,
            server=server,
            bindings=bindings,
            remote_ip_ranges=ranges,
            fqdn=_fqdn(r, ctx, server),
            usage=usage,
            banner=_banner(r),
            auth_mechanism=auth,
            permission_groups=groups,
            permissions=_permissions(r),
            enabled=r.bool("Enabled", True),
            max_inbound_connection=r.int("MaxInboundConnection", 5000, min=1, max=2147483647,
                                         unlimited=True),
            max_inbound_connection_per_source=r.int(
                "MaxInboundConnectionPerSource", 20, min=1, max=10000, unlimited=True),
            max_inbound_connection_percentage_per_source=r.int(
                "MaxInboundConnectionPercentagePerSource", 2, min=1, max=100) or 2,
            connection_timeout=connection_timeout,
            connection_inactivity_timeout=inactivity,
            max_message_size=r.size("MaxMessageSize", 10 * MB, min=64 * KB, max=2 * GB,
                                    unlimited=False) or 10 * MB,
            max_recipients_per_message=r.int("MaxRecipientsPerMessage", 200, min=1,
                                             max=512000) or 200,
            max_header_size=r.size("MaxHeaderSize", 64 * KB, min=1, max=2 * GB,
                                   unlimited=False) or 64 * KB,
            max_hop_count=r.int("MaxHopCount", 30, min=1, max=500) or 30,
            max_local_hop_count=r.int("MaxLocalHopCount", 8, min=0, max=50) or 0,
            max_logon_failures=r.int("MaxLogonFailures", 3, min=0, max=10) or 0,
            max_protocol_errors=r.int("MaxProtocolErrors", 5, min=0, max=2147483647,
                                      unlimited=True),
            message_rate_limit=r.int("MessageRateLimit", None, min=1, max=2147483647,
                                     unlimited=True),
            message_rate_source=r.string("MessageRateSource", "IPAddress",
                                         choices=("None", "User", "IPAddress", "All"))
            or "IPAddress",
            protocol_logging_level=r.string("ProtocolLoggingLevel", "None",
                                            choices=("None", "Verbose")) or "None",
            require_tls=r.bool("RequireTLS", False),
            tarpit_interval=r.duration("TarpitInterval", "5s", "0s", "10m"),
            require_ehlo_domain=r.bool("RequireEHLODomain", False),
            size_enabled=r.string("SizeEnabled", "Enabled",
                                  choices=("Enabled", "Disabled", "EnabledWithoutValue"))
            or "Enabled",
            enhanced_status_codes_enabled=r.bool("EnhancedStatusCodesEnabled", True),
            pipelining_enabled=r.bool("PipeliningEnabled", True),
            eight_bit_mime_enabled=r.bool("EightBitMimeEnabled", True),
            delivery_status_notification_enabled=r.bool("DeliveryStatusNotificationEnabled",
                                                        True),
            smtp_utf8_enabled=r.bool("SmtpUtf8Enabled", False),
            tls_certificate_file=r.path("TlsCertificateFile", None, nullable=True),
            tls_certificate_key_file=r.path("TlsCertificateKeyFile", None, nullable=True),
            tls_client_certificate_authority_file=r.path(
                "TlsClientCertificateAuthorityFile", None, nullable=True),
            implicit_tls=r.bool("ImplicitTls", False),
            bare_line_endings=r.string("BareLineEndings", "Reject",
                                       choices=("Reject", "Normalize")) or "Reject",
            mail_authentication=r.string("MailAuthentication", "Anonymous",
                                         choices=("Anonymous", "None")),
            max_line_length=r.size("MaxLineLength", 998 if usage == "Internet" else 64 * KB,
                                   min=998, max=MB, unlimited=False) or 64 * KB,
            greeting_delay=r.duration("GreetingDelay", "1s" if usage == "Internet" else "0s",
                                      "0s", "30s"),
            tls_handshake_timeout=r.duration("TlsHandshakeTimeout", "30s", "1s", "5m"),
            min_data_rate=r.size("MinimumDataRate", 1 * KB, min=0, max=GB,
                                 unlimited=False) or 0,
            label=r.object,
        )
        _refuse_unsupported(r)
        _check_auth(r, connector)
        return connector

    @classmethod
    def check_all(cls, connectors: Sequence[ReceiveConnector], ctx: ConfigContext) -> None:
        """Connectors sharing a binding must have nested or disjoint remote ranges."""
        by_binding: dict[tuple[str, str, int], list[ReceiveConnector]] = {}
        for connector in connectors:
            for ip, port in set(connector.bindings):
                by_binding.setdefault((connector.server.lower(), ip, port), []).append(connector)
        for (_server, ip, port), sharing in by_binding.items():
            for index, first in enumerate(sharing):
                for second in sharing[index + 1:]:
                    problem = _range_conflict(first, second)
                    if problem:
                        ctx.error(second.label, "RemoteIPRanges",
                                  f"shares binding {_endpoint(ip, port)} with {first.label} and"
                                  f" {problem}; ranges on one binding must differ and may"
                                  " overlap only when one contains the other")


def _range_conflict(first: ReceiveConnector, second: ReceiveConnector) -> str | None:
    for a in first.remote_ip_ranges:
        for b in second.remote_ip_ranges:
            if a.first == b.first and a.last == b.last and a.version == b.version:
                return f"both list the range {a}"
            if not a.nests_with(b):
                return f"its range {b} partly overlaps {a}"
    return None


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _choices(r: FieldReader, key: str, allowed: tuple[str, ...],
             default: tuple[str, ...]) -> frozenset[str]:
    r.offer(key, allowed)
    raw = r.raw(key)
    if raw is None:
        return frozenset(default)
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        r.error(key, "must be a name or a list of names")
        return frozenset(default)
    by_lower = {a.lower(): a for a in allowed}
    chosen = set()
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            found = by_lower.get(part.strip().lower())
            if found is None:
                r.not_one_of(key, part.strip(), allowed)
            else:
                chosen.add(found)
    return frozenset(chosen)


def _ranges(r: FieldReader, key: str, default: tuple[str, ...]) -> tuple[IPRange, ...]:
    items = r.string_list(key, default)
    if not items:
        r.error(key, "must list at least one range (0.0.0.0-255.255.255.255 for everyone)")
        items = default
    ranges = []
    for item in items:
        try:
            ranges.append(parse_range(item))
        except ValueError as exc:
            r.error(key, str(exc))
    return tuple(ranges)


def _fqdn(r: FieldReader, ctx: ConfigContext, server: str) -> str:
    raw = r.string("Fqdn")
    if raw is None:
        return ""  # the server's Fqdn, filled in by the service
    try:
        return check_hostname(domain_to_ascii(raw.strip().rstrip(".")))
    except AddressError as exc:
        r.error("Fqdn", f"{raw!r}: {exc}")
        return ""


def _banner(r: FieldReader) -> str | None:
    banner = r.string("Banner")
    if banner is None or banner == "":
        return None
    if not (banner == "220" or banner.startswith("220 ")):
        r.error("Banner", 'must start with "220 " (the SMTP greeting code)')
        return None
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in banner) or not banner.isascii():
        r.error("Banner", "must be printable ASCII on one line")
        return None
    return banner


def _permissions(r: FieldReader) -> dict[Principal, frozenset[Right]]:
    """`Permissions = [{ User = "NT AUTHORITY\\ANONYMOUS LOGON", ExtendedRights = [...] }]`."""
    r.offer("ExtendedRights", tuple(right.value for right in Right))  # Add-ADPermission
    raw = r.raw("Permissions")
    if raw is None:
        return {}
    if isinstance(raw, dict):  # one entry, as a cmdlet's single @{...} gives it
        raw = [raw]
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        r.error("Permissions", "must be a list of { User = ..., ExtendedRights = [...] } tables")
        return {}
    granted: dict[Principal, set[Right]] = {}
    for entry in raw:
        lowered = {str(k).lower(): v for k, v in entry.items()}
        unknown = set(lowered) - {"user", "extendedrights"}
        if unknown:
            r.error("Permissions", f"unknown key {sorted(unknown)[0]!r} (User, ExtendedRights)")
            continue
        try:
            principal = parse_principal(str(lowered.get("user", "")))
        except ValueError as exc:
            r.error("Permissions", str(exc))
            continue
        rights = lowered.get("extendedrights", [])
        rights = [rights] if isinstance(rights, str) else rights
        for right in rights if isinstance(rights, list) else []:
            try:
                granted.setdefault(principal, set()).add(parse_right(str(right)))
            except ValueError as exc:
                r.error("Permissions", str(exc))
    return {p: frozenset(rs) for p, rs in granted.items()}


#: Exchange parameters hubport knows but cannot honour with the value given
_UNSUPPORTED = {
    "ChunkingEnabled": "CHUNKING (BDAT) is not implemented; set it to false",
    "BinaryMimeEnabled": "BINARYMIME needs CHUNKING, which is not implemented; set it to false",
    "LongAddressesEnabled": "XLONGADDR is not implemented; set it to false",
    "OrarEnabled": "XORAR is not implemented; set it to false",
    "DomainSecureEnabled": "Domain Security is not implemented; set it to false",
    "EnableAuthGSSAPI": "GSSAPI (Integrated) authentication is not supported; set it to false",
}


def _refuse_unsupported(r: FieldReader) -> None:
    for key, reason in _UNSUPPORTED.items():
        if r.bool(key, False):
            r.error(key, reason)


def _check_auth(r: FieldReader, c: ReceiveConnector) -> None:
    """The AuthMechanism rules of New-ReceiveConnector, checked together."""
    auth = c.auth_mechanism
    if "Integrated" in auth:
        r.error("AuthMechanism", "Integrated (NTLM/Kerberos) is not supported by hubport; use"
                " BasicAuth with BasicAuthRequireTLS for users, ExchangeServer between servers")
    if "None" in auth and len(auth) > 1:
        r.error("AuthMechanism", "None must be used alone")
    if "BasicAuthRequireTLS" in auth and not {"BasicAuth", "Tls"} <= auth:
        r.error("AuthMechanism", "BasicAuthRequireTLS requires BasicAuth and Tls")
    if "ExchangeServer" in auth and "Tls" not in auth:
        r.error("AuthMechanism", "ExchangeServer (mutual TLS) requires Tls")
    if "ExternalAuthoritative" in auth:
        if auth - {"ExternalAuthoritative", "Tls"}:
            r.error("AuthMechanism", "ExternalAuthoritative can only be combined with Tls")
        if "ExchangeServers" not in c.permission_groups:
            r.error("PermissionGroups", "AuthMechanism ExternalAuthoritative requires"
                    " PermissionGroups ExchangeServers")
    if c.require_tls and not c.offers_tls:
        r.error("RequireTLS", "requires the Tls AuthMechanism")
    if c.implicit_tls and "Tls" not in auth:
        r.error("ImplicitTls", "requires the Tls AuthMechanism")
    if (c.tls_certificate_file is None) != (c.tls_certificate_key_file is None):
        r.error("TlsCertificateFile", "TlsCertificateFile and TlsCertificateKeyFile go together")
    if "None" in c.permission_groups and len(c.permission_groups) > 1:
        r.error("PermissionGroups", "None must be used alone")
