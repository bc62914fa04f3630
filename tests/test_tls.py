"""Tests for hubport.core.tls: the self-signed certificate, contexts, client certificates, errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hubport.core.tls import (
    CertificatePair,
    TlsConfigError,
    client_context,
    describe,
    ensure_self_signed,
    server_context,
)

FQDN = "hub01.contoso.test"
TIMEOUT = 30


def issued_pair(tmp_path: Path, ca: trustme.CA, *names: str, stem: str) -> CertificatePair:
    cert = ca.issue_cert(*names)
    pair = CertificatePair(tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key")
    cert.cert_chain_pems[0].write_to_path(str(pair.certificate))
    cert.private_key_pem.write_to_path(str(pair.key))
    return pair


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None = FQDN
) -> dict[str, Any]:
    """Connect over loopback; what each side learned about the session."""
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        seen["server"] = describe(obj)
        seen["peer_cert"] = obj.getpeercert()
        writer.write(b"220 ready\r\n")
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname
            ),
            TIMEOUT,
        )
        seen["client"] = describe(writer.get_extra_info("ssl_object"))
        seen["banner"] = await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        await asyncio.wait_for(done.wait(), TIMEOUT)
    finally:
        server.close()
        await server.wait_closed()
    return seen


# ---- the self-signed certificate -----------------------------------------------------------


def test_self_signed_is_created_once(tmp_path: Path) -> None:
    folder = tmp_path / "tls"
    pair = ensure_self_signed(folder, FQDN)
    assert pair == CertificatePair(folder / f"{FQDN}.crt", folder / f"{FQDN}.key")
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(pair.certificate.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [FQDN]
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=4 * 365) < lifetime <= dt.timedelta(days=5 * 365 + 1)
    before = (pair.certificate.read_bytes(), pair.key.read_bytes())
    assert ensure_self_signed(folder, FQDN) == pair
    assert (pair.certificate.read_bytes(), pair.key.read_bytes()) == before
    assert sorted(p.name for p in folder.iterdir()) == [f"{FQDN}.crt", f"{FQDN}.key"]


def test_self_signed_is_replaced_when_broken(tmp_path: Path) -> None:
    pair = ensure_self_signed(tmp_path, FQDN)
    first = pair.certificate.read_bytes()
    other = ec.generate_private_key(ec.SECP256R1())
    pair.key.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ensure_self_signed(tmp_path, FQDN)  # the key no longer matches: a new pair
    assert pair.certificate.read_bytes() != first
    server_context(pair)  # and it loads
    pair.certificate.unlink()
    ensure_self_signed(tmp_path, FQDN)
    assert pair.certificate.exists()
    with pytest.raises(ValueError):
        ensure_self_signed(tmp_path, "../evil")


async def test_self_signed_handshake(tmp_path: Path) -> None:
    pair = ensure_self_signed(tmp_path, FQDN)
    seen = await handshake(server_context(pair), client_context(verify=True, ca=pair.certificate))
    assert seen["banner"] == b"220 ready\r\n"
    assert seen["client"] == seen["server"]
    assert seen["client"].startswith(("TLSv1.2 ", "TLSv1.3 "))
    assert seen["peer_cert"] is None  # no client certificate asked for
    # Opportunistic TLS: any certificate is accepted without verification.
    seen = await handshake(server_context(pair), client_context(verify=False), None)
    assert seen["banner"] == b"220 ready\r\n"


async def test_self_signed_fails_verification_against_system_cas(tmp_path: Path) -> None:
    pair = ensure_self_signed(tmp_path, FQDN)
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(server_context(pair), client_context(verify=True))


# ---- CA-signed certificates ----------------------------------------------------------------


async def test_ca_signed_and_hostname_check(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    pair = issued_pair(tmp_path, ca, FQDN, stem="server")
    seen = await handshake(server_context(pair), client_context(verify=True, ca=ca_file))
    assert seen["banner"] == b"220 ready\r\n"
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(server_context(pair), client_context(verify=True, ca=ca_file), "other.test")
    relaxed = client_context(verify=True, ca=ca_file, check_hostname=False)
    seen = await handshake(server_context(pair), relaxed, "other.test")
    assert seen["banner"] == b"220 ready\r\n"


async def test_server_learns_the_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_pair = issued_pair(tmp_path, ca, FQDN, stem="server")
    client_pair = issued_pair(tmp_path, ca, "hub02.contoso.test", stem="client")
    server_ctx = server_context(server_pair, client_ca=ca_file, request_client_certificate=True)
    assert server_ctx.verify_mode == ssl.CERT_OPTIONAL
    with_cert = client_context(verify=True, ca=ca_file, client_pair=client_pair)
    seen = await handshake(server_ctx, with_cert)
    names = [v for kind, v in seen["peer_cert"]["subjectAltName"] if kind == "DNS"]
    assert names == ["hub02.contoso.test"]
    # A client without a certificate may still connect (CERT_OPTIONAL).
    seen = await handshake(server_ctx, client_context(verify=True, ca=ca_file))
    assert seen["banner"] == b"220 ready\r\n" and not seen["peer_cert"]


def test_contexts_require_tls_1_2(tmp_path: Path) -> None:
    pair = ensure_self_signed(tmp_path, FQDN)
    assert server_context(pair).minimum_version == ssl.TLSVersion.TLSv1_2
    client = client_context(verify=False)
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_NONE and not client.check_hostname
    strict = client_context(verify=True)
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname


def test_describe_without_tls() -> None:
    assert describe(None) is None
    ctx = client_context(verify=False)
    unconnected = ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    assert describe(unconnected) is None


# ---- configuration errors ------------------------------------------------------------------


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    good = ensure_self_signed(tmp_path / "good", FQDN)
    missing = CertificatePair(tmp_path / "nope.crt", good.key)
    with pytest.raises(TlsConfigError, match=r"nope\.crt: certificate file does not exist"):
        server_context(missing)
    with pytest.raises(TlsConfigError, match=r"nokey\.key: key file does not exist"):
        server_context(CertificatePair(good.certificate, tmp_path / "nokey.key"))
    junk = tmp_path / "junk.crt"
    junk.write_text("hello\n")
    with pytest.raises(TlsConfigError, match=r"junk\.crt: not a PEM certificate"):
        server_context(CertificatePair(junk, good.key))
    with pytest.raises(TlsConfigError, match=r"junk\.crt: not a PEM private key"):
        server_context(CertificatePair(good.certificate, junk))
    with pytest.raises(TlsConfigError, match="is a directory"):
        server_context(CertificatePair(tmp_path, good.key))
    with pytest.raises(TlsConfigError, match=r"ca\.pem: CA certificate file does not exist"):
        client_context(verify=True, ca=tmp_path / "ca.pem")
    with pytest.raises(TlsConfigError, match=r"ca\.pem: CA certificate file does not exist"):
        server_context(good, client_ca=tmp_path / "ca.pem", request_client_certificate=True)
    with pytest.raises(TlsConfigError, match=r"junk\.crt: not a PEM CA certificate"):
        client_context(verify=True, ca=junk)


def test_key_that_does_not_match(tmp_path: Path) -> None:
    a = ensure_self_signed(tmp_path / "a", FQDN)
    b = ensure_self_signed(tmp_path / "b", FQDN)
    with pytest.raises(TlsConfigError, match="does not match the certificate"):
        server_context(CertificatePair(a.certificate, b.key))
    with pytest.raises(TlsConfigError, match="does not match the certificate"):
        client_context(verify=False, client_pair=CertificatePair(b.certificate, a.key))


def test_encrypted_key(tmp_path: Path) -> None:
    pair = ensure_self_signed(tmp_path, FQDN)
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsConfigError, match=r"locked\.key: the private key is encrypted"):
        server_context(CertificatePair(pair.certificate, locked))


def test_unreadable_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root every file is readable, so the permission error is simulated."""
    pair = ensure_self_signed(tmp_path, FQDN)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == pair.key:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(TlsConfigError, match=r"\.key: cannot read the key file \(Permission"):
        server_context(pair)
