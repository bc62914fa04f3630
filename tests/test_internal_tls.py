"""The internal transport certificate's life: issued once, renewed when due, at a start and
while the server runs (core/internal_tls.py, plugins/smtp_receive/service.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hubport.core.config import load_organization
from hubport.core.hooks import Hooks
from hubport.core.internal_tls import CertificateAuthority, internal_tls, organization_ca_folder
from hubport.plugins.smtp_receive import service as receive_service
from smtp_support import Client, free_port, receive_connector
from support import write_org

HOOKS = Hooks(entry_points=False)
HUB02 = '[[transport_server]]\nName = "HUB02"\nStateDirectory = "var2"\n'


def days_left(path: Path) -> float:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return (cert.not_valid_after_utc - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def make_due(org: Any, pair: Any) -> bytes:
    """Replace the server's certificate with one from the same CA that ends in ten days."""
    server = org.server("HUB01")
    cert, key = CertificateAuthority(organization_ca_folder(org, server)).issue(
        [server.fqdn], days=10)
    pair.key.write_bytes(key)
    pair.certificate.write_bytes(cert)
    return cert


def test_a_certificate_due_for_renewal_is_issued_again_where_the_ca_key_is(
        tmp_path: Path) -> None:
    org = load_organization(write_org(tmp_path, extra=HUB02), HOOKS.registry.connector_types)
    server = org.server("HUB01")
    first = internal_tls(org, server)
    assert days_left(first.pair.certificate) > 390
    due = make_due(org, first.pair)
    renewed = internal_tls(org, server)
    assert renewed.pair.certificate.read_bytes() != due
    assert days_left(renewed.pair.certificate) > 390

    # without the CA's key a due certificate is kept (and a warning says what to run)
    copied_cert, copied_key = CertificateAuthority(tmp_path / "org-ca").issue([server.fqdn])
    make_due(org, renewed.pair)
    (tmp_path / "org-ca" / "ca.key").unlink()
    kept = internal_tls(org, server)
    assert days_left(kept.pair.certificate) < 11
    # ... until new files from new-servercertificate are copied in: they are used at once
    kept.pair.key.write_bytes(copied_key)
    kept.pair.certificate.write_bytes(copied_cert)
    assert internal_tls(org, server).pem == copied_cert


async def served_certificate(port: int) -> bytes:
    client = await Client.connect(port)
    await client.hello("hub02.contoso.test")
    assert (await client.cmd("STARTTLS")).code == 220
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    await client.writer.start_tls(context, server_hostname="")
    der = client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await client.close()
    return bytes(der)


async def test_a_running_server_renews_and_presents_the_new_certificate(
        hub_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receive_service, "RENEWAL_CHECK", 0.2)
    port = free_port()
    extra = HUB02 + receive_connector(
        "Hubs", [f"127.0.0.1:{port}"], AuthMechanism=["Tls", "ExchangeServer"],
        PermissionGroups=["ExchangeServers"])
    async with hub_factory(extra=extra):
        before = await served_certificate(port)
        org = load_organization(tmp_path / "org.toml", HOOKS.registry.connector_types)
        pair = internal_tls(org, org.server("HUB01")).pair
        due = x509.load_pem_x509_certificate(make_due(org, pair)).public_bytes(Encoding.DER)
        served = before
        deadline = asyncio.get_running_loop().time() + 30
        while served in (before, due) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
            served = await served_certificate(port)
        assert served not in (before, due), "the running server kept the old certificate"
        assert days_left(pair.certificate) > 390
