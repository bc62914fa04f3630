"""Hub-to-hub trust: the organization's certificate authority and each server's internal
transport certificate (docs/exchange.md, "Hub-to-hub trust").

Exchange servers prove to each other that they belong to the organization (Exchange Server
authentication), and then accept each other's organization headers and envelope. hubport
does it with mutual TLS: every transport server holds an *internal transport certificate*
(Exchange's ``InternalTransportCertificateThumbprint``) issued by the organization's CA, and
a receive connector with the ``ExchangeServer`` mechanism grants the ExchangeServers rights
only to a client certificate that this CA issued and that names a transport server of the
organization.

No manual step on one machine: the CA is created once beside the organization file
(``<stem>-ca/ca.crt`` and ``ca.key``; for the embedded default, ``<state>/ca``) and each
server's certificate is issued from it at its first start, then renewed at a start within
``RENEW_BEFORE`` of its expiry. Across machines the CA's key stays where it was made:
``hubport new-servercertificate NAME`` there writes the certificate, its key and ``ca.crt``
for the other machine, or ``[[transport_server]]`` names the administrator's own files
(``InternalTransportCertificateFile``, ``…KeyFile``, ``…AuthorityFile``).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hubport.core.credentials import locked_folder, organization_folder, replace_file
from hubport.core.tls import CertificatePair, TlsConfigError, check_pair

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer

__all__ = [
    "CertificateAuthority",
    "InternalTls",
    "internal_tls",
    "issue_for",
    "organization_ca_folder",
]

log = structlog.get_logger("hubport.tls")

CA_DAYS = 10 * 365
SERVER_DAYS = 397  # what public CAs may issue at most; renewed well before
RENEW_BEFORE = dt.timedelta(days=30)

#: seconds before a certificate due for renewal (where it cannot be renewed) is looked at again
RECHECK = 600.0

_cache: dict[tuple[object, ...], tuple[InternalTls, float]] = {}
_cache_lock = threading.Lock()


def organization_ca_folder(org: Organization, server: TransportServer) -> Path:
    """Where the organization's CA lives: beside the organization file, which every hub of
    one machine shares (``org.toml`` -> ``org-ca/``); in the state folder for the embedded
    default and for an organization in a store (copy ``ca/ca.crt`` to each hub's, and its
    certificate from new-servercertificate, as for hubs on other machines)."""
    return organization_folder(org, server, "ca")


class CertificateAuthority:
    """``ca.crt`` (public: every hub needs it) and ``ca.key`` (only where certificates are
    issued; a hub without it verifies its peers but cannot issue)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.certificate = folder / "ca.crt"
        self.key = folder / "ca.key"

    @property
    def can_issue(self) -> bool:
        return self.key.exists()

    def ensure(self, organization_name: str) -> None:
        """Create the CA if the folder holds neither file (two hubs starting together make
        one CA: the folder is locked)."""
        with locked_folder(self.folder):
            if self.certificate.exists() or self.key.exists():
                return
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization_name),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{organization_name} hubport CA"),
            ])
            now = dt.datetime.now(dt.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256())
            )
            replace_file(self.key, _key_pem(key), 0o600)  # the key first: a CA never lacks it
            replace_file(self.certificate, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        log.warning("created the organization's CA: hubs on other machines need its"
                    " certificate (not its key) in the same place beside their organization"
                    " file, and their own certificates from 'hubport new-servercertificate'",
                    certificate=str(self.certificate), key=str(self.key))

    def load_key(self) -> Any:
        """The CA's private key; TlsConfigError when it is not on this machine."""
        try:
            return serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        except FileNotFoundError:
            raise TlsConfigError(
                f"{self.key}: the organization CA's key is not on this machine; issue the"
                f" certificate where it is") from None
        except (OSError, ValueError, TypeError) as exc:
            raise TlsConfigError(f"{self.key}: not a usable CA key ({exc})") from None

    def issue(self, names: Sequence[str], days: int = SERVER_DAYS) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server known by ``names`` (its FQDN first), good
        for both ends of a connection."""
        ca_key = self.load_key()
        (ca_cert,) = _certificates(self.certificate)[:1]
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in dict.fromkeys(n.lower() for n in names)]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_cert.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


@dataclass(frozen=True)
class InternalTls:
    """This server's proof to the other hubs, and the CA file that proves theirs."""

    pair: CertificatePair
    authority: Path
    #: the server FQDNs of the organization: a proven certificate must name one of them
    servers: frozenset[str]

    @cached_property
    def pem(self) -> bytes:
        """The certificate as it was when this was made (a renewal replaces the file)."""
        return self.pair.certificate.read_bytes()

    @cached_property
    def _authorities(self) -> tuple[x509.Certificate, ...]:
        return tuple(_certificates(self.authority))

    def issued_here(self, cert: x509.Certificate) -> bool:
        """Issued by the organization's CA (any of the authority file's) and valid now."""
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            return False
        return any(_issued_by(cert, ca) for ca in self._authorities)

    def proves_server(self, der: bytes | None) -> str | None:
        """The transport server a peer's certificate (DER) proves, else None: it must be
        issued by the organization's CA, be valid now, and name a server of the
        organization. A certificate from any other CA proves nothing, whatever it names."""
        if not der:
            return None
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        if not self.issued_here(cert):
            return None
        for name in _dns_names(cert):
            if name in self.servers:
                return name
        return None


def internal_tls(org: Organization, server: TransportServer) -> InternalTls:
    """This server's internal transport certificate: configured, or issued from the
    organization's CA (created if there is none yet) and renewed before it expires.

    Blocking (files, key generation): call it in a thread. Cached per process for what it
    depends on (the servers of the organization, the names, the configured files), and
    made again when the file on disk changed (new files copied in, another worker's
    renewal) or, every ``RECHECK`` seconds, when it is due for renewal."""
    key = (org.source, server.name, frozenset(s.fqdn.lower() for s in org.servers),
           tuple(_names_of(org, server)), server.internal_transport_certificate_file,
           server.internal_transport_certificate_key_file,
           server.internal_transport_certificate_authority_file)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and _current(*cached):
            return cached[0]
        made = _make(org, server)
        made.pem  # noqa: B018  (read now: a later renewal replaces the file)
        _cache[key] = (made, time.monotonic())
        return made


def _current(made: InternalTls, checked: float) -> bool:
    try:
        on_disk = made.pair.certificate.read_bytes()
    except OSError:
        return False
    if on_disk != made.pem:
        return False
    return _fresh(made.pem) or time.monotonic() - checked < RECHECK


def issue_for(org: Organization, server_name: str, out: Path,
              here: TransportServer | None = None) -> list[Path]:
    """``hubport new-servercertificate``: write ``<fqdn>.crt``, ``<fqdn>.key`` and ``ca.crt``
    for ``server_name`` into ``out``, from this machine's organization CA (that of
    ``here``, the hub the command runs beside: with the organization in a store, the CA
    lives in that hub's state folder, not in the new hub's)."""
    server = org.server(server_name)
    ca = CertificateAuthority(organization_ca_folder(org, here or server))
    if not ca.certificate.exists():  # never a second CA the other hubs would not trust
        raise TlsConfigError(
            f"{ca.certificate}: there is no organization CA here; run this where it is (the"
            " machine whose hubs started first, beside their organization file), or start"
            " a hub of the organization here first to create it")
    cert_pem, key_pem = ca.issue(_names_of(org, server))
    with locked_folder(out):
        pair = CertificatePair(out / f"{server.fqdn}.crt", out / f"{server.fqdn}.key")
        replace_file(pair.key, key_pem, 0o600)
        replace_file(pair.certificate, cert_pem, 0o644)
        replace_file(out / "ca.crt", ca.certificate.read_bytes(), 0o644)
    return [pair.certificate, pair.key, out / "ca.crt"]


# -- helpers ---------------------------------------------------------------------------------


def _make(org: Organization, server: TransportServer) -> InternalTls:
    servers = frozenset(s.fqdn.lower() for s in org.servers)
    configured = server.internal_transport_certificate_file
    if configured is not None:
        pair = CertificatePair(configured, server.internal_transport_certificate_key_file
                               or configured)
        check_pair(pair)
        authority = server.internal_transport_certificate_authority_file or \
            CertificateAuthority(organization_ca_folder(org, server)).certificate
        _certificates(authority)
        return InternalTls(pair, authority, servers)
    ca = CertificateAuthority(organization_ca_folder(org, server))
    authority = server.internal_transport_certificate_authority_file or ca.certificate
    folder = server.state_directory / "certs" / "internal"
    pair = CertificatePair(folder / f"{server.fqdn}.crt", folder / f"{server.fqdn}.key")
    names = _names_of(org, server)
    with locked_folder(folder):
        if server.internal_transport_certificate_authority_file is None and \
                not ca.certificate.exists():
            ca.ensure(org.transport_config.organization_name)
        if not _reusable(pair, names, authority):
            if not ca.can_issue:
                if pair.certificate.exists() and _valid_now(pair):
                    log.warning("the internal transport certificate is due for renewal and the"
                                " organization CA's key is not on this machine: run 'hubport"
                                f" new-servercertificate {server.name}' where it is",
                                certificate=str(pair.certificate))
                    return InternalTls(pair, authority, servers)
                raise TlsConfigError(
                    f"{pair.certificate}: {server.name} has no internal transport certificate"
                    f" and the organization CA's key ({ca.key}) is not on this machine: run"
                    f" 'hubport new-servercertificate {server.name}' where it is and copy"
                    f" the files it writes here (ca.crt to {ca.certificate}), or set"
                    f" InternalTransportCertificateFile")
            cert_pem, key_pem = ca.issue(names)
            replace_file(pair.key, key_pem, 0o600)
            replace_file(pair.certificate, cert_pem, 0o644)
    _certificates(authority)
    return InternalTls(pair, authority, servers)


def _names_of(org: Organization, server: TransportServer) -> list[str]:
    """The server's FQDN first, then the FQDNs of its receive connectors that other hubs
    reach (those with the ExchangeServer mechanism), which present this certificate."""
    names = [server.fqdn.lower()]
    for rc in org.connectors_of("receive_connector"):
        if str(getattr(rc, "server", "")).lower() == server.name.lower() and \
                "ExchangeServer" in getattr(rc, "auth_mechanism", ()):
            fqdn = str(getattr(rc, "fqdn", "") or "").lower()
            if fqdn and fqdn not in names:
                names.append(fqdn)
    return names


def _reusable(pair: CertificatePair, names: Sequence[str], authority: Path) -> bool:
    if not (pair.certificate.exists() and pair.key.exists()):
        return False
    try:
        cert = check_pair(pair)
        authorities = _certificates(authority)
    except TlsConfigError:
        return False
    now = dt.datetime.now(dt.UTC)
    fresh = cert.not_valid_before_utc <= now and now + RENEW_BEFORE < cert.not_valid_after_utc
    return fresh and set(names) <= set(_dns_names(cert)) and \
        any(_issued_by(cert, ca) for ca in authorities)


def _valid_now(pair: CertificatePair) -> bool:
    try:
        cert = check_pair(pair)
    except TlsConfigError:
        return False
    return cert.not_valid_after_utc > dt.datetime.now(dt.UTC)


def _fresh(pem: bytes) -> bool:
    try:
        (cert,) = x509.load_pem_x509_certificates(pem)[:1]
    except ValueError:
        return False
    return dt.datetime.now(dt.UTC) + RENEW_BEFORE < cert.not_valid_after_utc


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        found = x509.load_pem_x509_certificates(path.read_bytes())
    except FileNotFoundError:
        raise TlsConfigError(f"{path}: the organization CA certificate does not exist")\
            from None
    except OSError as exc:
        raise TlsConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError:
        raise TlsConfigError(f"{path}: not a PEM certificate") from None
    return found


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):  # another CA, or another key type
        return False
    return True


def _dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
