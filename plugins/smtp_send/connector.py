"""The ``[[send_connector]]`` type: New-SendConnector's parameters
(docs/exchange.md, "Send connectors").

Only configuration lives here: parsing, cross-field rules and the Usage templates. The
credential is read from its file or environment variable when a connection needs it, so
a rotated password needs no reload and the secret is never held by the configuration.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hubport.core.address_space import AddressSpace
from hubport.core.addresses import AddressError, check_hostname, domain_to_ascii
from hubport.core.config_fields import ConfigContext, FieldReader
from hubport.core.connectors import Connector

if TYPE_CHECKING:
    from hubport.core.services import ConnectorService, ServiceRuntime

USAGES = ("Custom", "Internal", "Internet", "Partner")
AUTH_MECHANISMS = ("None", "BasicAuth", "BasicAuthRequireTLS", "ExchangeServer",
                   "ExternalAuthoritative")
TLS_AUTH_LEVELS = ("EncryptionOnly", "CertificateValidation", "DomainValidation")
#: Exchange 2010's ErrorPolicies; what each one changes is documented in plugins/smtp_send
ERROR_POLICIES = ("Default", "DowngradeAuthFailures", "DowngradeDnsFailures")
LOGGING_LEVELS = ("None", "Verbose")

#: Usage: the defaults each template gives (an explicit field always wins)
USAGE_TEMPLATES: dict[str, dict[str, Any]] = {
    "Custom": {},
    "Internal": {"SmtpMaxMessagesPerConnection": 20},
    "Internet": {"DNSRoutingEnabled": True},
    "Partner": {"RequireTLS": True, "TlsAuthLevel": "DomainValidation"},
}


class CredentialError(Exception):
    """The secret could not be read; the text names where, never what."""


@dataclass(frozen=True)
class Credential:
    """AuthenticationCredential: a user name and where its password is kept."""

    user_name: str
    password_file: Path | None = None
    password_environment_variable: str | None = None

    def password(self) -> str:
        """Read the secret now (a rotated one is picked up without a reload)."""
        if self.password_file is not None:
            try:
                text = self.password_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CredentialError(
                    f"cannot read the password file {self.password_file}: "
                    f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
            return text.rstrip("\r\n")
        name = self.password_environment_variable or ""
        value = os.environ.get(name)
        if value is None:
            raise CredentialError(f"the environment variable {name} is not set")
        return value

    def __repr__(self) -> str:  # the dataclass repr is safe, but say so explicitly
        where = self.password_file or f"${self.password_environment_variable}"
        return f"Credential(user_name={self.user_name!r}, password=<from {where}>)"


@dataclass(frozen=True)
class SmartHost:
    """One SmartHosts entry: a host name, or an IP literal written ``[192.0.2.1]``."""

    host: str
    literal: bool = False

    def __str__(self) -> str:
        return f"[{self.host}]" if self.literal else self.host


@dataclass
class SendConnector(Connector):
    usage: str = "Custom"
    dns_routing_enabled: bool = True
    smart_hosts: tuple[SmartHost, ...] = ()
    port: int = 25
    smart_host_auth_mechanism: str = "None"
    authentication_credential: Credential | None = None
    require_tls: bool = False
    ignore_starttls: bool = False
    tls_auth_level: str | None = None
    tls_domain: str | None = None
    tls_certificate_authority_file: Path | None = None
    tls_client_certificate_file: Path | None = None
    tls_client_key_file: Path | None = None
    fqdn: str | None = None
    force_helo: bool = False
    smtp_max_messages_per_connection: int = 20
    connection_inactivity_timeout: float = 600.0
    error_policies: frozenset[str] = field(default_factory=lambda: frozenset({"Default"}))
    protocol_logging_level: str = "None"
    use_external_dns_servers_enabled: bool = False
    #: a linked connector: every message that receive connector takes leaves through this one
    linked_receive_connector: str | None = None

    section: ClassVar[str] = "send_connector"
    kind: ClassVar[str] = "SendConnector"

    @property
    def linked_receive_name(self) -> str | None:
        """The linked receive connector's Name (LinkedReceiveConnector may be written as
        Exchange's identity, ``Server\\Name``)."""
        if self.linked_receive_connector is None:
            return None
        return self.linked_receive_connector.rpartition("\\")[2].strip()

    @property
    def delivery_type(self) -> str:  # type: ignore[override]  # the base: a class constant
        """The queue's DeliveryType: smart-host or DNS (MX) delivery."""
        return "SmartHostConnectorDelivery" if self.smart_hosts else "DnsConnectorDelivery"

    def secret_files(self) -> tuple[Path, ...]:
        credential = self.authentication_credential
        if credential is None or credential.password_file is None:
            return ()
        return (credential.password_file,)

    def next_hop_domain(self, space: AddressSpace, address: str = "") -> str:
        """Exchange names a smart-host queue after its smart-host list, and gives DNS
        routing a queue per recipient domain: each domain is its own next hop (its own MX
        hosts), so one that cannot be reached puts only its own queue in Retry."""
        if self.smart_hosts:
            return ",".join(str(h) for h in self.smart_hosts)
        _, at, domain = address.rpartition("@")
        if at and domain and space.type == "SMTP":
            return domain.lower()
        return super().next_hop_domain(space, address)

    @classmethod
    def create_service(cls, runtime: ServiceRuntime) -> ConnectorService:
        """The service that keeps the Send protocol log (see ``service``)."""
        from hubport.plugins.smtp_send.service import SendService

        return SendService(runtime)

    @classmethod
    def from_config(cls, reader: FieldReader, ctx: ConfigContext) -> SendConnector:
        usage = reader.string("Usage", default="Custom", choices=USAGES) or "Custom"
        template = USAGE_TEMPLATES[usage]
        linked = (reader.string("LinkedReceiveConnector", default=None) or "").strip() or None
        common = cls.read_common(reader, ctx, address_spaces_required=linked is None)
        smart_hosts = _smart_hosts(reader)
        dns_default = False if smart_hosts else template.get("DNSRoutingEnabled", True)
        connector = cls(
            **common,
            usage=usage,
            dns_routing_enabled=reader.bool("DNSRoutingEnabled", default=dns_default),
            smart_hosts=smart_hosts,
            port=reader.int("Port", 25, min=1, max=65535) or 25,
            smart_host_auth_mechanism=reader.string(
                "SmartHostAuthMechanism", default="None", choices=AUTH_MECHANISMS) or "None",
            authentication_credential=_credential(reader, ctx),
            require_tls=reader.bool("RequireTLS", default=template.get("RequireTLS", False)),
            ignore_starttls=reader.bool("IgnoreSTARTTLS", default=False),
            tls_auth_level=reader.string("TlsAuthLevel", default=template.get("TlsAuthLevel"),
                                         choices=TLS_AUTH_LEVELS),
            tls_domain=_host(reader, "TlsDomain"),
            tls_certificate_authority_file=reader.path("TlsCertificateAuthorityFile", None),
            tls_client_certificate_file=reader.path("TlsClientCertificateFile", None),
            tls_client_key_file=reader.path("TlsClientKeyFile", None),
            fqdn=_host(reader, "Fqdn"),
            force_helo=reader.bool("ForceHELO", default=False),
            smtp_max_messages_per_connection=reader.int(
                "SmtpMaxMessagesPerConnection",
                template.get("SmtpMaxMessagesPerConnection", 20), min=1, max=100000) or 20,
            connection_inactivity_timeout=reader.duration(
                "ConnectionInactivityTimeOut", "10m", "1s", "1d") or 600.0,
            error_policies=_error_policies(reader),
            protocol_logging_level=reader.string(
                "ProtocolLoggingLevel", default="None", choices=LOGGING_LEVELS) or "None",
            use_external_dns_servers_enabled=reader.bool(
                "UseExternalDNSServersEnabled", default=False),
            linked_receive_connector=linked,
        )
        _check(connector, reader, explicit_tls_level=reader.has("TlsAuthLevel"))
        if linked is not None:
            _check_linked(connector, reader)
        return connector

    @classmethod
    def check_across(cls, connectors: Sequence[SendConnector], everything: Sequence[Connector],
                     ctx: ConfigContext) -> None:
        """Linked connectors: the receive connector exists, one send connector links it,
        and the send connector is hosted on that receive connector's server."""
        receive = {c.name.lower(): c for c in everything if type(c).section == "receive_connector"}
        taken: dict[str, str] = {}
        for c in connectors:
            if c.linked_receive_connector is None:
                continue
            server = c.linked_receive_connector.rpartition("\\")[0]  # Server\Name
            key = (c.linked_receive_name or "").lower()
            rc = receive.get(key)
            if rc is not None and server and getattr(rc, "server", "").lower() != \
                    server.strip().lower():
                rc = None
            label = f"send_connector {c.name!r}"
            if rc is None:
                ctx.error(label, "LinkedReceiveConnector",
                          f"no receive connector is named {c.linked_receive_connector!r}")
                continue
            if key in taken:
                ctx.error(label, "LinkedReceiveConnector",
                          f"{rc.name!r} is already linked to send connector {taken[key]!r}:"
                          " a receive connector links to one send connector")
                continue
            taken[key] = c.name
            server = str(getattr(rc, "server", ""))
            if [s.lower() for s in c.source_transport_servers] != [server.lower()]:
                ctx.error(label, "SourceTransportServers",
                          f"must be [{server!r}] alone: a linked connector is hosted on the"
                          f" server of its receive connector {rc.name!r}")


def _host(reader: FieldReader, key: str) -> str | None:
    raw = reader.string(key, default=None)
    if raw is None or not raw.strip():
        return None
    try:
        return check_hostname(domain_to_ascii(raw.strip().rstrip(".")))
    except AddressError as exc:
        reader.error(key, f"{raw!r}: {exc}")
        return None


def _smart_hosts(reader: FieldReader) -> tuple[SmartHost, ...]:
    hosts: list[SmartHost] = []
    for item in reader.string_list("SmartHosts"):
        text = item.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                hosts.append(SmartHost(ipaddress.ip_address(text[1:-1]).compressed, True))
            except ValueError:
                reader.error("SmartHosts", f"{item!r}: not an IP literal")
            continue
        try:
            ipaddress.ip_address(text)
            reader.error("SmartHosts", f"{item!r}: write an IP address as [{text}]")
            continue
        except ValueError:
            pass
        try:
            hosts.append(SmartHost(check_hostname(domain_to_ascii(text.rstrip(".")))))
        except AddressError as exc:
            reader.error("SmartHosts", f"{item!r}: {exc}")
    return tuple(hosts)


def _credential(reader: FieldReader, ctx: ConfigContext) -> Credential | None:
    raw = reader.raw("AuthenticationCredential")
    if raw is None:
        return None
    key = "AuthenticationCredential"
    if not isinstance(raw, dict):
        reader.error(key, "expected a table { UserName = ..., PasswordFile = ... } or"
                          " { UserName = ..., PasswordEnvironmentVariable = ... }")
        return None
    fields = {k.lower(): v for k, v in raw.items()}
    unknown = set(fields) - {"username", "passwordfile", "passwordenvironmentvariable"}
    if unknown:
        reader.error(key, f"unknown entries: {', '.join(sorted(unknown))} (a password is never"
                          " written in the configuration: use PasswordFile or"
                          " PasswordEnvironmentVariable)")
        return None
    user, path, env = (fields.get("username"), fields.get("passwordfile"),
                       fields.get("passwordenvironmentvariable"))
    if not isinstance(user, str) or not user or any(ord(c) < 32 for c in user):
        reader.error(key, "UserName: required, a string without control characters")
        return None
    if (path is None) == (env is None):
        reader.error(key, "give exactly one of PasswordFile and PasswordEnvironmentVariable")
        return None
    if path is not None:
        if not isinstance(path, str) or not path.strip() or "\0" in path:
            reader.error(key, "PasswordFile: expected a path")
            return None
        return Credential(user, password_file=ctx.resolve(path))
    if not isinstance(env, str) or not env.strip() or "=" in env or "\0" in env:
        reader.error(key, "PasswordEnvironmentVariable: expected a variable name")
        return None
    return Credential(user, password_environment_variable=env.strip())


def _error_policies(reader: FieldReader) -> frozenset[str]:
    reader.offer("ErrorPolicies", ERROR_POLICIES)
    raw = reader.raw("ErrorPolicies", "Default")
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        reader.error("ErrorPolicies", "expected a comma list or a list of strings")
        return frozenset({"Default"})
    chosen: set[str] = set()
    for item in items:
        match = next((p for p in ERROR_POLICIES
                      if isinstance(item, str) and p.lower() == item.strip().lower()), None)
        if match is None:
            reader.not_one_of("ErrorPolicies", item, ERROR_POLICIES)
        else:
            chosen.add(match)
    return frozenset(chosen or {"Default"})


def _check_linked(c: SendConnector, reader: FieldReader) -> None:
    """Exchange's rules for a linked connector (New-SendConnector -LinkedReceiveConnector),
    each broken one named by its field."""
    if c.address_spaces:
        reader.error("AddressSpaces", "must be empty on a linked connector: every message of"
                                      f" {c.linked_receive_connector!r} leaves through it,"
                                      " whatever its recipients")
    if not c.smart_hosts:
        reader.error("SmartHosts", "required on a linked connector (the scanner to send to)")
    if c.dns_routing_enabled:
        reader.error("DNSRoutingEnabled", "must be false on a linked connector")
    if c.max_message_size is not None:
        reader.error("MaxMessageSize", "must be unlimited on a linked connector")


def _check(c: SendConnector, reader: FieldReader, *, explicit_tls_level: bool) -> None:
    """The cross-field rules of New-SendConnector (docs/exchange.md, "Send connectors")."""
    if c.smart_hosts and c.dns_routing_enabled:
        reader.error("DNSRoutingEnabled", "must be false when SmartHosts is set")
    if not c.smart_hosts and not c.dns_routing_enabled:
        reader.error("SmartHosts", "required when DNSRoutingEnabled is false")
    if any(s.type != "SMTP" for s in c.address_spaces) and c.dns_routing_enabled:
        reader.error("AddressSpaces", "a non-SMTP address space needs SmartHosts with"
                                      " DNSRoutingEnabled = false")
    if c.smart_host_auth_mechanism != "None" and not c.smart_hosts:
        reader.error("SmartHostAuthMechanism", "is only valid with SmartHosts")
    basic = c.smart_host_auth_mechanism in ("BasicAuth", "BasicAuthRequireTLS")
    if basic and c.authentication_credential is None:
        reader.error("AuthenticationCredential", f"required for {c.smart_host_auth_mechanism}")
    if c.require_tls and c.ignore_starttls:
        reader.error("IgnoreSTARTTLS", "must be false when RequireTLS is true")
    if c.tls_auth_level is not None and (not c.require_tls or c.ignore_starttls):
        if explicit_tls_level:
            reader.error("TlsAuthLevel", "needs RequireTLS = true and IgnoreSTARTTLS = false")
        else:
            c.tls_auth_level = None
    if c.tls_auth_level == "DomainValidation" and c.smart_hosts and not c.tls_domain:
        reader.error("TlsDomain", "required for DomainValidation on a smart-host connector")
    if (c.tls_client_certificate_file is None) != (c.tls_client_key_file is None):
        reader.error("TlsClientKeyFile", "give both TlsClientCertificateFile and"
                                         " TlsClientKeyFile, or neither")
