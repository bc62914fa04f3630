"""DKIM signing keys: server-local secret files, one per domain and selector.

A key is made once (``New-DkimSigningConfig``, or ``Rotate-DkimSigningConfig
-RenewInactiveKey``) and then shared by every hub that sends for the domain, like the
organization's CA (core/internal_tls.py): beside the organization file
(``org.toml`` -> ``org-dkim/<domain>/<selector>.key``), which every hub of one machine reads,
or in the server's state folder for the embedded default and an organization in a store.
``hubport export-secrets`` copies them to a hub on another machine. They are never in the
organization itself, and a daemon never makes one: a hub that made its own key would sign
with a key whose record nobody published.

Each file is the private key in PEM (PKCS#8), mode 0600. RSA keys are made by OpenSSL
(``cryptography``); the second, ed25519 key (RFC 8463) lives under ``<selector>-ed25519``.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from hubport.core.credentials import locked_folder, organization_folder, replace_file

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer
    from hubport.core.mail_auth_config import DkimSigningConfig

__all__ = [
    "KeyStatus",
    "SigningKeyError",
    "dkim_key_folder",
    "ensure_keys",
    "key_path",
    "key_status",
    "load_private_key",
    "public_record",
    "renew_key",
]

ED25519_SUFFIX = "-ed25519"


class SigningKeyError(Exception):
    """A key file that is missing, unreadable or not a usable key (the reason is the text)."""


def dkim_key_folder(org: Organization, server: TransportServer) -> Path:
    """Where the organization's DKIM keys live on this machine (see the module's text)."""
    return organization_folder(org, server, "dkim")


def key_path(folder: Path, domain: str, selector: str) -> Path:
    return folder / domain / f"{selector}.key"


def selectors_of(config: DkimSigningConfig, selector: str) -> list[tuple[str, str]]:
    """(selector name, algorithm) of the keys one of the config's selectors stands for."""
    keys = [(selector, "rsa")]
    if config.ed25519:
        keys.append((selector + ED25519_SUFFIX, "ed25519"))
    return keys


def ensure_keys(folder: Path, config: DkimSigningConfig, selectors: tuple[str, ...]
                ) -> list[str]:
    """Make the keys of ``selectors`` that do not exist yet; the selectors made. Two
    administrators at once make one key: the domain's folder is locked."""
    made = []
    domain_folder = folder / config.domain
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    with locked_folder(domain_folder):
        for selector in selectors:
            for name, algorithm in selectors_of(config, selector):
                path = key_path(folder, config.domain, name)
                if path.exists():
                    continue
                replace_file(path, _new_key(algorithm, config.key_size), 0o600)
                made.append(name)
    return made


def renew_key(folder: Path, config: DkimSigningConfig, selector: str) -> list[str]:
    """Replace the keys of ``selector`` (which must not be the active one) with new ones."""
    if selector == config.active_selector:
        raise SigningKeyError(f"{selector} signs {config.domain}'s mail now: rotate first")
    with locked_folder(folder / config.domain):
        names = []
        for name, algorithm in selectors_of(config, selector):
            replace_file(key_path(folder, config.domain, name),
                         _new_key(algorithm, config.key_size), 0o600)
            names.append(name)
    return names


def _new_key(algorithm: str, size: int) -> bytes:
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=size)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def load_private_key(path: Path) -> PrivateKey:
    """The key in ``path``; SigningKeyError saying why it cannot be used."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SigningKeyError(f"{path}: no such file (copy it from the hub that made it:"
                              " hubport export-secrets)") from None
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: not a PEM private key without a password ({exc})"
                              ) from None
    if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise SigningKeyError(f"{path}: a {type(key).__name__}; DKIM signs with RSA or"
                              " ed25519 keys")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 1024:
        raise SigningKeyError(f"{path}: a {key.key_size}-bit RSA key; RFC 8301 asks for at"
                              " least 1024 bits")
    return key


def public_record(key: PrivateKey) -> str:
    """The DNS TXT record that publishes ``key``'s public half (RFC 6376 §3.6.1)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


@dataclass(frozen=True)
class KeyStatus:
    """One selector's key as this machine has it."""

    selector: str
    path: Path
    record: str = ""  # the TXT record to publish ('' when the key is not usable here)
    created: str = ""  # when the file was written (ISO 8601, UTC)
    problem: str = ""


def key_status(folder: Path, config: DkimSigningConfig) -> list[tuple[str, KeyStatus]]:
    """(DNS name of the record, status) for every key of the config's two selectors."""
    out = []
    for selector in (config.active_selector, config.inactive_selector):
        for name, _algorithm in selectors_of(config, selector):
            path = key_path(folder, config.domain, name)
            dns_name = f"{name}._domainkey.{config.domain}"
            try:
                key = load_private_key(path)
            except SigningKeyError as exc:
                out.append((dns_name, KeyStatus(name, path, problem=str(exc))))
                continue
            made = dt.datetime.fromtimestamp(os.stat(path).st_mtime, dt.UTC)
            out.append((dns_name, KeyStatus(name, path, public_record(key),
                                            made.strftime("%Y-%m-%dT%H:%M:%SZ"))))
    return out
