"""The admin audit log: who changed what, with which cmdlet line, when, to which revision
(Exchange's admin audit logging; searched with ``Search-AdminAuditLog``).

Every cmdlet that changes something is recorded once it has succeeded: the organization
cmdlets and the queue cmdlets that act (Retry-, Suspend-, Resume-Queue, Suspend-, Resume-,
Remove-, Export-Message). The caller is the Unix user, and the administrator's certificate
name when the command went to a management endpoint with one.

Where: beside the organization file (``<stem>-audit.log``, JSON lines, each appended and
fsynced under a lock), or in the organization's store (``<prefix>/audit/<time>-<pid>``),
or, for the embedded default, ``./hubport-audit.log``.
"""

from __future__ import annotations

import asyncio
import fcntl
import getpass
import json
import os
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["caller", "properties", "record", "search"]

LOCAL_LOG = Path("hubport-audit.log")


def caller(certificate: Path | None = None) -> str:
    """The Unix user, and the administrator certificate's name when one is used."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    if certificate is None:
        return user
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(certificate.read_bytes())
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        name = names[0].value if names else None
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"{user} as {name}" if name else user
    except (OSError, ValueError, IndexError):
        return user


def entry(cmdlet: str, line: str, objects: Sequence[str], revision: str,
          who: str) -> dict[str, Any]:
    return {"run-date": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "caller": who, "cmdlet": cmdlet, "cmdlet-line": line,
            "object-ids": list(objects), "revision": revision, "succeeded": True}


def properties(item: dict[str, Any]) -> dict[str, Any]:
    """An entry under the names of Exchange's admin audit log entries."""
    return {"RunDate": item["run-date"], "Caller": item["caller"],
            "CmdletName": item["cmdlet"], "CmdletLine": item["cmdlet-line"],
            "ObjectModified": item["object-ids"], "Revision": item["revision"],
            "Succeeded": item["succeeded"]}


def _file(config: Any) -> Path:
    if config is None:
        return LOCAL_LOG
    path = Path(config)
    return path.with_name(f"{path.stem}-audit.log")


def record(config: Any, item: dict[str, Any]) -> None:
    """Append one entry where the organization's audit log is."""
    from hubport.core.org_store import OrganizationStore, is_store_url

    if is_store_url(config):
        store = OrganizationStore.from_url(str(config))
        key = store.key("audit", f"{time.time_ns():020d}-{os.getpid()}")
        asyncio.run(store.client.put(key, json.dumps(item).encode()))
        return
    path = _file(config)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (json.dumps(item) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _entries(config: Any) -> Iterable[dict[str, Any]]:
    from hubport.core.org_store import OrganizationStore, is_store_url

    if is_store_url(config):
        store = OrganizationStore.from_url(str(config))
        items, _ = asyncio.run(store.client.range(store.key("audit", ""), prefix=True))
        for item in items:
            try:
                yield json.loads(item.value)
            except ValueError:
                continue
        return
    try:
        text = _file(config).read_text(encoding="utf-8")
    except OSError:
        return
    for line in text.splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


def search(config: Any, *, cmdlets: Sequence[str] = (), start: datetime | None = None,
           end: datetime | None = None, object_ids: Sequence[str] = (),
           limit: int | None = 1000) -> list[dict[str, Any]]:
    """Search-AdminAuditLog: the entries matching every filter given, oldest first."""
    wanted = {c.lower() for c in cmdlets}
    objects = {o.lower() for o in object_ids}
    out = []
    for item in _entries(config):
        when = datetime.fromisoformat(str(item.get("run-date")))
        if wanted and str(item.get("cmdlet", "")).lower() not in wanted:
            continue
        if start is not None and when < start:
            continue
        if end is not None and when > end:
            continue
        ids = {str(i).lower() for i in item.get("object-ids", [])}
        if objects and not (objects & ids or objects & {i.rsplit("/", 1)[-1] for i in ids}):
            continue
        out.append(item)
    out.sort(key=lambda i: str(i.get("run-date")))
    return out[-limit:] if limit else out
