"""TLS for the SMTP connectors: certificates, server and client contexts, and their description.

Exchange creates a self-signed certificate for the server's FQDN at setup so STARTTLS works out
of the box; `ensure_self_signed` does the same once per state folder. Configured certificate
files are checked up front (`TlsConfigError` names the file and the reason), because OpenSSL's
own errors ("[SSL] PEM lib") do not tell an administrator what to fix.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hubport.core.credentials import locked_folder, replace_file

__all__ = [
    "CertificatePair",
    "TlsConfigError",
    "client_context",
    "describe",
    "ensure_self_signed",
    "server_context",
]

SELF_SIGNED_DAYS = 5 * 365
# A self-signed certificate this close to expiry is replaced rather than reused.
RENEW_BEFORE = dt.timedelta(days=30)


class TlsConfigError(Exception):
    """A certificate or key file is missing, unreadable, malformed or does not match."""


@dataclass(frozen=True)
class CertificatePair:
    certificate: Path  # PEM: the certificate, optionally followed by its chain
    key: Path  # PEM: the unencrypted private key


# --------------------------------------------------------------------------------------------
# Checking configured files


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{path}: {what} file does not exist") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{path}: {what} file is a directory") from None
    except OSError as exc:
        raise TlsConfigError(f"{path}: cannot read the {what} file ({exc.strerror})") from None


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        chain = x509.load_pem_x509_certificates(_read(path, "certificate"))
    except ValueError:
        raise TlsConfigError(f"{path}: not a PEM certificate") from None
    return chain[0]


def _load_key(path: Path) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read(path, "key"), password=None)
    except TypeError:
        raise TlsConfigError(
            f"{path}: the private key is encrypted (give it unencrypted)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TlsConfigError(f"{path}: not a PEM private key ({exc})") from None


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_pair(pair: CertificatePair) -> x509.Certificate:
    """The pair's certificate, after checking both files exist, parse and belong together."""
    cert = _load_certificate(pair.certificate)
    key = _load_key(pair.key)
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise TlsConfigError(
            f"{pair.key}: the private key does not match the certificate {pair.certificate}"
        )
    return cert


def _load_chain(ctx: ssl.SSLContext, pair: CertificatePair) -> None:
    check_pair(pair)
    try:
        ctx.load_cert_chain(pair.certificate, pair.key)
    except (ssl.SSLError, OSError) as exc:  # checked above; a race or an unsupported key
        raise TlsConfigError(f"{pair.certificate}: OpenSSL refused the pair ({exc})") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    _read(ca, "CA certificate")
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"{ca}: not a PEM CA certificate file ({exc})") from None


# --------------------------------------------------------------------------------------------
# Contexts


def server_context(
    pair: CertificatePair,
    *,
    client_ca: Path | Sequence[Path] | None = None,
    request_client_certificate: bool = False,
    system_cas: bool = False,
) -> ssl.SSLContext:
    """A TLS >= 1.2 server context; optionally asks clients for a certificate.

    With `request_client_certificate` a client may still connect without one (CERT_OPTIONAL),
    but one it presents must chain to one of `client_ca` (or the system CAs: without
    `client_ca`, or with `system_cas`), else the handshake fails.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, pair)
    if request_client_certificate:
        ctx.verify_mode = ssl.CERT_OPTIONAL
        # any certificate given as an authority is a trust anchor, a leaf too: a legacy
        # server's own certificate is pinned that way (core/routing_groups.py)
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        if client_ca is not None:
            for ca in [client_ca] if isinstance(client_ca, Path) else client_ca:
                _load_ca(ctx, ca)
        if client_ca is None or system_cas:
            ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    return ctx


def client_context(
    *,
    verify: bool,
    ca: Path | None = None,
    check_hostname: bool = True,
    client_pair: CertificatePair | None = None,
) -> ssl.SSLContext:
    """A TLS >= 1.2 client context; without `verify`, any server certificate is accepted
    (opportunistic STARTTLS, as Exchange does to the Internet by default)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        ctx.check_hostname = check_hostname
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca is not None:
            _load_ca(ctx, ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if client_pair is not None:
        _load_chain(ctx, client_pair)
    return ctx


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """``"TLSv1.3 TLS_AES_256_GCM_SHA384"`` for Received headers and logs; None without TLS."""
    if ssl_object is None:
        return None
    version = ssl_object.version()
    cipher = ssl_object.cipher()
    if version is None or cipher is None:
        return None  # the handshake has not completed
    return f"{version} {cipher[0]}"


# --------------------------------------------------------------------------------------------
# The self-signed certificate


def ensure_self_signed(directory: Path, fqdn: str) -> CertificatePair:
    """``<directory>/<fqdn>.crt`` and ``.key``: reused while valid, else created (atomically)."""
    if not fqdn or "/" in fqdn or fqdn.startswith(".") or "\0" in fqdn:
        raise ValueError(f"not a host name for a certificate: {fqdn!r}")
    pair = CertificatePair(directory / f"{fqdn}.crt", directory / f"{fqdn}.key")
    with locked_folder(directory):  # two daemons starting together make one pair
        if not _reusable(pair, fqdn):
            cert_pem, key_pem = _make_self_signed(fqdn)
            replace_file(pair.key, key_pem, 0o600)  # key first: a cert never lacks its key
            replace_file(pair.certificate, cert_pem, 0o644)
    return pair


def _reusable(pair: CertificatePair, fqdn: str) -> bool:
    """Do both files exist, match, name `fqdn` and stay valid for a while yet?"""
    if not (pair.certificate.exists() and pair.key.exists()):
        return False
    try:
        cert = check_pair(pair)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (TlsConfigError, x509.ExtensionNotFound, ValueError):
        return False
    now = dt.datetime.now(dt.UTC)
    fresh = cert.not_valid_before_utc <= now and now + RENEW_BEFORE < cert.not_valid_after_utc
    return fresh and fqdn.lower() in (n.lower() for n in names.get_values_for_type(x509.DNSName))


def _make_self_signed(fqdn: str) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): EC P-256, SAN DNS:fqdn, valid five years, for both ends."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
