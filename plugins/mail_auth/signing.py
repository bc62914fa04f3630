"""Outbound DKIM signatures and ARC sets (RFC 6376, RFC 8463, RFC 8617), made with dkimpy.

A message leaving through a Send connector is signed for the domain of its From address
(or the closest parent domain with a signing configuration), with the configuration's
active selector, ``rsa-sha256`` and, when asked, a second ``ed25519-sha256`` signature. The
headers signed follow RFC 6376 §5.4: those present of the recommended set, with From, To,
Subject and Date signed once more than they occur, so that none can be added afterwards.

A message that came in from the Internet (it carries this hub's Authentication-Results) is
also ARC-sealed when it leaves, with the key of the organization's default domain: the next
hop can then trust the authentication results this hub saw even if the message was changed
on the way (a scanner's stamp, a footer).

Keys are read once and reread when their file changes. A key that cannot be used stops
signing for its domain, with one error line per problem; the mail still goes.
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import dkim
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from hubport.core.config import Organization, TransportServer
from hubport.core.dkim_keys import (
    SigningKeyError,
    dkim_key_folder,
    key_path,
    load_private_key,
    selectors_of,
)
from hubport.core.headers import ParsedMessage, parse_header_section
from hubport.core.mail_auth_config import SELECTORS, DkimSigningConfig
from hubport.plugins.mail_auth.checks import from_domain

__all__ = ["arc_seal", "config_for", "dkim_signatures"]

log = structlog.get_logger("hubport.dkim")

#: RFC 6376 §5.4.1's recommended header fields (those present are signed)
SIGNED = (b"from", b"reply-to", b"subject", b"date", b"to", b"cc", b"resent-date",
          b"resent-from", b"resent-sender", b"resent-to", b"resent-cc", b"in-reply-to",
          b"references", b"list-id", b"list-help", b"list-unsubscribe",
          b"list-unsubscribe-post", b"list-subscribe", b"list-post", b"list-owner",
          b"list-archive", b"message-id", b"mime-version", b"content-type",
          b"content-transfer-encoding", b"content-id", b"content-description")
#: signed once more than they occur (RFC 6376 §5.4.2, "oversigning")
OVERSIGNED = (b"from", b"to", b"subject", b"date")


@dataclass(frozen=True)
class _Material:
    stamp: tuple[int, int]  # (mtime_ns, size) of the file it was read from
    secret: bytes  # what dkimpy takes: PEM for RSA, base64 of the seed for ed25519
    algorithm: bytes


_keys: dict[Path, _Material] = {}
_reported: set[tuple[Path, str]] = set()
_lock = threading.Lock()


def _material(path: Path) -> _Material:
    """The key of ``path`` as dkimpy takes it (cached until the file changes)."""
    try:
        info = os.stat(path)
        stamp = (info.st_mtime_ns, info.st_size)
    except OSError:
        stamp = (0, 0)
    with _lock:
        cached = _keys.get(path)
    if cached is not None and cached.stamp == stamp:
        return cached
    key = load_private_key(path)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        found = _Material(stamp, base64.b64encode(seed), b"ed25519-sha256")
    else:
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        found = _Material(stamp, pem, b"rsa-sha256")
    with _lock:
        _keys[path] = found
        _reported.difference_update({r for r in _reported if r[0] == path})
    return found


def _report(path: Path, problem: str, domain: str) -> None:
    """Log a key problem once (not once per message)."""
    with _lock:
        if (path, problem) in _reported:
            return
        _reported.add((path, problem))
    log.error("DKIM signing key unusable; mail from this domain leaves unsigned until it is"
              " fixed (Get-DkimSigningConfig shows it)", domain=domain, problem=problem)


def config_for(org: Organization, domain: str) -> DkimSigningConfig | None:
    """The enabled signing configuration of ``domain`` or of its closest parent."""
    enabled = {c.domain: c for c in org.dkim_signing_configs if c.enabled}
    labels = domain.lower().split(".")
    for start in range(len(labels) - 1):
        found = enabled.get(".".join(labels[start:]))
        if found is not None:
            return found
    return None


def _already_signed(parsed: ParsedMessage, config: DkimSigningConfig) -> bool:
    """A DKIM-Signature of ours for this domain is already on the message (a hop inside
    the organization signed it): one signature per domain, not one per hub."""
    ours = {s.encode() for s in SELECTORS} | {
        (s + "-ed25519").encode() for s in SELECTORS}
    for signature in parsed.get_all("DKIM-Signature"):
        try:
            tags = dkim.util.parse_tag_value(signature.value_bytes)
        except dkim.util.InvalidTagValueList:
            continue
        if tags.get(b"d", b"").lower() == config.domain.encode() and tags.get(b"s") in ours:
            return True
    return False


def _include_headers(parsed: ParsedMessage) -> list[bytes]:
    present = [f.lname.encode() for f in parsed.fields if f.lname.encode() in SIGNED]
    return present + list(OVERSIGNED)


def dkim_signatures(content: bytes, org: Organization, server: TransportServer
                    ) -> list[bytes]:
    """The DKIM-Signature fields for ``content`` (none when its From domain does not sign,
    is already signed by us, or has no usable key here)."""
    parsed = parse_header_section(content)
    domain, _problem = from_domain(parsed)
    config = config_for(org, domain) if domain else None
    if config is None or _already_signed(parsed, config):
        return []
    folder = dkim_key_folder(org, server)
    include = _include_headers(parsed)
    canonicalize = (config.header_canonicalization.lower().encode(),
                    config.body_canonicalization.lower().encode())
    fields = []
    for selector, _algorithm in selectors_of(config, config.active_selector):
        path = key_path(folder, config.domain, selector)
        try:
            material = _material(path)
            signer = dkim.DKIM(content, linesep=b"\r\n")
            field = signer.sign(selector.encode(), config.domain.encode(), material.secret,
                                signature_algorithm=material.algorithm,
                                canonicalize=canonicalize, include_headers=include)
        except SigningKeyError as exc:
            _report(path, str(exc), config.domain)
            continue
        except dkim.DKIMException as exc:
            _report(path, f"dkimpy refused to sign: {exc}", config.domain)
            continue
        fields.append(field if field.endswith(b"\r\n") else field + b"\r\n")
    # RSA, then ed25519: RFC 8463 §6 asks signers to keep an RSA signature beside it
    return fields


def arc_seal(content: bytes, org: Organization, server: TransportServer,
             authserv_ids: list[str]) -> list[bytes]:
    """An ARC set for a message the organization authenticated on its way in (it carries
    the Authentication-Results of one of ``authserv_ids``: this hub's, or the hub that took
    it from the Internet), sealed with the default domain's signing key; [] when there is
    nothing to seal or no key to seal with."""
    head = content[:content.find(b"\r\n\r\n") + 2]
    if b"authentication-results:" not in head.lower():  # most mail: nothing to seal
        return []
    parsed = parse_header_section(content)
    wanted = {i.lower() for i in authserv_ids if i}
    claimed = [f.text.strip().split(";", 1)[0].strip().lower()
               for f in parsed.get_all("Authentication-Results")]
    authserv_id = next((c for c in claimed if c in wanted), None)
    if authserv_id is None:
        return []
    config = config_for(org, org.default_domain.base_domain) or next(
        (c for c in org.dkim_signing_configs if c.enabled), None)
    if config is None:
        return []
    path = key_path(dkim_key_folder(org, server), config.domain, config.active_selector)
    try:
        material = _material(path)
        fields = dkim.arc_sign(content, config.active_selector.encode(),
                               config.domain.encode(), material.secret,
                               authserv_id.encode(), linesep=b"\r\n")
    except SigningKeyError as exc:
        _report(path, str(exc), config.domain)
        return []
    except Exception as exc:  # a chain dkimpy cannot extend: the message goes unsealed
        log.warning("ARC sealing skipped", domain=config.domain, error=str(exc))
        return []
    return [f if f.endswith(b"\r\n") else f + b"\r\n" for f in fields]
