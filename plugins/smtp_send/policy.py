"""TLS and authentication policy of one outbound connection.

Decided from the connector before connecting, so the session only follows orders:
whether to use STARTTLS, whether TLS is mandatory (never a plaintext fallback), what the
certificate must prove, and how to authenticate. The SSL context comes from ``hubport.core.tls``
when that module is there; otherwise it is built here with the standard library.
"""

from __future__ import annotations

import importlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubport.core.model import SmtpResponse

if TYPE_CHECKING:
    from hubport.core.config import TransportServer
    from hubport.core.internal_tls import InternalTls
    from hubport.plugins.smtp_send.connector import Credential, SendConnector

TLS_REQUIRED = SmtpResponse(451, "4.7.4", "SMTPSEND.TLS.Required; the next hop does not offer"
                                          " STARTTLS and RequireTLS is set")
TLS_FAILED = SmtpResponse(451, "4.7.5", "SMTPSEND.TLS.Failed; TLS negotiation or certificate"
                                        " validation failed")
AUTH_NOT_OFFERED = SmtpResponse(451, "4.7.3", "SMTPSEND.Auth.NotOffered; the smart host"
                                              " offers no usable AUTH mechanism")
AUTH_NEEDS_TLS = SmtpResponse(451, "4.7.3", "SMTPSEND.Auth.RequireTLS; authentication needs"
                                            " TLS and none was negotiated")
CREDENTIAL_UNAVAILABLE = SmtpResponse(451, "4.3.5", "SMTPSEND.Auth.Credential; the"
                                                    " AuthenticationCredential cannot be read")


@dataclass(frozen=True)
class TlsPolicy:
    """What STARTTLS must achieve on this connection."""

    use: bool = True  # STARTTLS when offered (false: IgnoreSTARTTLS)
    require: bool = False  # no TLS, no mail (defer 4.7.x)
    verify: bool = False  # validate the certificate chain
    expected_name: str | None = None  # DomainValidation: the name the certificate carries
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A client SSL context for this policy (hubport.core.tls when it exists)."""
        tls = _core_tls()
        if tls is not None:
            ctx: ssl.SSLContext = tls.client_context(
                verify=self.verify, ca=self.ca_file,
                check_hostname=self.expected_name is not None)
        else:
            ctx = _stdlib_context(self.verify, self.ca_file, self.expected_name is not None)
        if self.client_cert is not None:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


@dataclass(frozen=True)
class AuthPolicy:
    """How to authenticate to a smart host."""

    mechanism: str = "None"
    credential: Credential | None = None

    @property
    def basic(self) -> bool:
        return self.mechanism in ("BasicAuth", "BasicAuthRequireTLS")

    @property
    def needs_tls(self) -> bool:
        return self.mechanism in ("BasicAuthRequireTLS", "ExchangeServer")


def _core_tls() -> Any:
    try:
        return importlib.import_module("hubport.core.tls")
    except ImportError:
        return None


def _stdlib_context(verify: bool, ca: Path | None, check_hostname: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
    if verify:
        ctx.check_hostname = check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:  # opportunistic TLS (RFC 7435): encrypt, do not authenticate
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_policy(connector: SendConnector, server: TransportServer, recipient_domain: str | None,
               internal: InternalTls | None = None) -> TlsPolicy:
    """The TLS policy of a Send connector for one next hop. With ExchangeServer
    authentication the server presents its internal transport certificate (``internal``)
    unless the connector names a client certificate of its own."""
    level = connector.tls_auth_level if connector.require_tls else None
    expected = None
    if level == "DomainValidation":
        expected = connector.tls_domain or recipient_domain
    exchange = connector.smart_host_auth_mechanism == "ExchangeServer"
    own = connector.tls_client_certificate_file
    return TlsPolicy(
        use=not connector.ignore_starttls,
        require=connector.require_tls or exchange
        or connector.smart_host_auth_mechanism == "BasicAuthRequireTLS",
        verify=level in ("CertificateValidation", "DomainValidation"),
        expected_name=expected,
        ca_file=connector.tls_certificate_authority_file,
        client_cert=own or (internal.pair.certificate if exchange and internal else None),
        client_key=connector.tls_client_key_file if own else (
            internal.pair.key if exchange and internal else None),
    )


def intra_org_tls(internal: InternalTls) -> TlsPolicy:
    """Hub to hub (docs/exchange.md, "Hub-to-hub trust"): TLS is required, the other hub's
    certificate must come from the organization's CA and name it (each target carries the
    hub's FQDN as its ``tls_name``), and this server presents its own internal transport
    certificate, so the other hub grants it ExchangeServers."""
    return TlsPolicy(use=True, require=True, verify=True, ca_file=internal.authority,
                     client_cert=internal.pair.certificate, client_key=internal.pair.key)


def auth_policy(connector: SendConnector) -> AuthPolicy:
    return AuthPolicy(connector.smart_host_auth_mechanism, connector.authentication_credential)
