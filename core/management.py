"""Management across machines: the control protocol on TCP with mutual TLS
(docs/deployment.md, "Managing hubs on other machines").

The Unix control socket only reaches a daemon on the same machine. A transport server with
``ManagementBindings`` also serves the same requests (JSON lines, ``core/control.py``) on
those TCP endpoints, behind TLS: the server presents its internal transport certificate and
requires a client certificate issued by the organization's CA *as an administrator's*
(``hubport new-admincertificate NAME``: organizational unit ``ADMIN_UNIT``, client use only).
No certificate, one from another CA, or a hub's own certificate is refused.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hubport.core.control import (
    REQUEST_LIMIT,
    ControlError,
    Handler,
    RequestError,
    RequestServer,
)
from hubport.core.credentials import locked_folder, replace_file
from hubport.core.internal_tls import (
    CertificateAuthority,
    InternalTls,
    internal_tls,
    organization_ca_folder,
)
from hubport.core.tls import TlsConfigError, server_context

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer

__all__ = ["ADMIN_UNIT", "ManagementServer", "call_remote", "issue_admin",
           "start_management"]

log = structlog.get_logger("hubport.management")

ADMIN_UNIT = "hubport administrators"
ADMIN_DAYS = 397


class ManagementServer(RequestServer):
    """The control handler on TCP endpoints, for administrators' certificates only."""

    def __init__(self, bindings: tuple[tuple[str, int], ...], internal: InternalTls,
                 handler: Handler, refusals: tuple[type[BaseException], ...]) -> None:
        super().__init__(handler, refusals)
        self.bindings = bindings
        self.internal = internal
        self._servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        context = server_context(self.internal.pair, client_ca=[self.internal.authority],
                                 request_client_certificate=True)
        context.verify_mode = ssl.CERT_REQUIRED  # no certificate, no session
        try:
            for ip, port in self.bindings:
                self._servers.append(await asyncio.start_server(
                    self._serve_admin, ip, port, ssl=context, limit=REQUEST_LIMIT,
                    reuse_address=True, ssl_handshake_timeout=30))
        except BaseException:
            await self.stop()
            raise
        log.info("management endpoint listening",
                 bindings=[f"{ip}:{port}" for ip, port in self.bindings])

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except TimeoutError:
                pass
        self._servers = []

    async def _serve_admin(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        who = administrator(der, self.internal)
        if who is None:
            log.warning("management request refused: not an administrator's certificate",
                        peer=str(writer.get_extra_info("peername")))
            await self._reply(writer, {"ok": False, "error": "this certificate is not an"
                                       " administrator's of the organization"})
            writer.close()
            return
        log.info("management session", administrator=who,
                 peer=str(writer.get_extra_info("peername")))
        await self._serve(reader, writer)


def administrator(der: bytes | None, internal: InternalTls) -> str | None:
    """The administrator a client certificate names: issued by the organization's CA, in
    the administrators' unit, for client use only (a hub's certificate is not one)."""
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    if internal.proves_server(der) is not None or ExtendedKeyUsageOID.SERVER_AUTH in usage:
        return None
    units = [a.value for a in cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATIONAL_UNIT_NAME)]
    if ADMIN_UNIT not in units or not internal.issued_here(cert):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "?"


async def start_management(org: Organization, server: TransportServer, handler: Handler,
                           refusals: tuple[type[BaseException], ...] = (RequestError,)
                           ) -> ManagementServer | None:
    """The management endpoint of ``server`` (None without ``ManagementBindings``)."""
    if not server.management_bindings:
        return None
    internal = await asyncio.to_thread(internal_tls, org, server)
    endpoint = ManagementServer(server.management_bindings, internal, handler, refusals)
    await endpoint.start()
    return endpoint


def issue_admin(org: Organization, name: str, out: Path) -> list[Path]:
    """``hubport new-admincertificate``: ``<name>.pem`` (certificate and key, 0600) and the
    organization's ``ca.crt`` in ``out``, from this machine's organization CA."""
    server = org.servers[0]
    ca = CertificateAuthority(organization_ca_folder(org, server))
    ca_key = ca.load_key()
    (ca_cert,) = x509.load_pem_x509_certificates(ca.certificate.read_bytes())[:1]
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ADMIN_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=ADMIN_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "admin"
    with locked_folder(out):
        replace_file(out / f"{safe}.pem", pem, 0o600)
        replace_file(out / "ca.crt", ca.certificate.read_bytes(), 0o644)
    return [out / f"{safe}.pem", out / "ca.crt"]


def call_remote(server: TransportServer, certificate: Path, authority: Path, op: str,
                args: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    """One request to ``server``'s management endpoint, as the administrator whose
    certificate and key ``certificate`` holds (PEM); ControlError when it fails."""
    if not server.management_bindings:
        raise ControlError(f"transport server {server.name} has no ManagementBindings")
    host, port = server.management_bindings[0]
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(authority))
        context.load_cert_chain(str(certificate))
    except (OSError, ssl.SSLError) as exc:
        raise ControlError(f"administrator certificate {certificate} or CA {authority}:"
                           f" {exc}") from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=server.fqdn) as sock:
            sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
    except (OSError, ssl.SSLError) as exc:
        raise ControlError(f"management endpoint {server.name} ({host}:{port}): {exc}",
                           no_daemon=isinstance(exc, ConnectionRefusedError)) from None
    if not data:  # TLS 1.3: a refused client certificate shows as a closed connection
        raise ControlError(f"management endpoint {server.name} ({host}:{port}) closed the"
                           " connection: it refused this certificate (not one the"
                           " organization's CA issued) or it is stopping")
    try:
        response = json.loads(data)
    except ValueError:
        raise ControlError(f"{server.name} sent an unreadable answer") from None
    if not response.get("ok"):
        raise ControlError(str(response.get("error", "refused")))
    return response.get("result")


def admin_files(certificate: Path, org: Organization,
                server: TransportServer) -> tuple[Path, Path]:
    """(certificate PEM, CA file): the CA is ``ca.crt`` beside the certificate, else the
    organization CA's certificate of this machine."""
    beside = certificate.with_name("ca.crt")
    if beside.exists():
        return certificate, beside
    authority = CertificateAuthority(organization_ca_folder(org, server)).certificate
    if not authority.exists():
        raise TlsConfigError(f"no ca.crt beside {certificate} and no {authority}")
    return certificate, authority
