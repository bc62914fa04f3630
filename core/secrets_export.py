"""``hubport export-secrets``: the server-local secret files a new hub needs, copied from
this machine (docs/etcd.md, "Secrets").

Secrets never sit in the organization: connectors name files on each hub (a smart host's
``PasswordFile``), and each hub keeps the mailboxes' password hashes (``PasswordFilePath``)
for SMTP authentication. A hub added on another machine needs its own copies of the files
for the connectors it hosts, and the password hashes. This gathers them into one folder,
mode 0600, with a ``MANIFEST`` saying where each goes on the new hub.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer

__all__ = ["export_secrets"]


def secret_files(org: Organization, target: TransportServer, here: TransportServer
                 ) -> list[tuple[Path, Path]]:
    """(file on this machine, where the new hub reads it) for every secret ``target``
    needs: its connectors' secret files, the mailboxes' password hashes and the DKIM signing
    keys."""
    wanted: list[tuple[Path, Path]] = []
    for connector in org.connectors:
        sources = {s.lower() for s in getattr(connector, "source_transport_servers", ())}
        secret = getattr(connector, "secret_files", None)
        if target.name.lower() in sources and secret is not None:
            wanted += [(path, path) for path in secret()]
    wanted.append((here.password_file_path, target.password_file_path))
    wanted += _dkim_keys(org, target, here)
    return list(dict.fromkeys(wanted))


def _dkim_keys(org: Organization, target: TransportServer, here: TransportServer
               ) -> list[tuple[Path, Path]]:
    """Every DKIM signing key (both selectors of each domain): any hub may send a domain's
    mail out, and every hub must sign it with the published key."""
    from hubport.core.dkim_keys import dkim_key_folder, key_path, selectors_of
    from hubport.core.mail_auth_config import SELECTORS

    mine, theirs = dkim_key_folder(org, here), dkim_key_folder(org, target)
    return [(key_path(mine, config.domain, name), key_path(theirs, config.domain, name))
            for config in org.dkim_signing_configs for selector in SELECTORS
            for name, _algorithm in selectors_of(config, selector)]


def export_secrets(org: Organization, target: TransportServer, here: TransportServer,
                   out: Path) -> tuple[list[Path], list[Path]]:
    """Copy the secrets into ``out`` (created 0700); (the files written, the ones missing
    here). ``out/MANIFEST`` lists "<copy>\\t<destination on the new hub>" per file."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    written: list[Path] = []
    missing: list[Path] = []
    lines = []
    for number, (source, destination) in enumerate(secret_files(org, target, here), 1):
        if not source.is_file():
            missing.append(source)
            continue
        copy = out / f"{number:02d}-{source.name}"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as sink, open(source, "rb") as data:
            shutil.copyfileobj(data, sink)
        written.append(copy)
        lines.append(f"{copy.name}\t{destination}\n")
    manifest = out / "MANIFEST"
    manifest.write_text("".join(lines), encoding="utf-8")
    os.chmod(manifest, 0o600)
    return written, missing
