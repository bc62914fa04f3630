"""Mailbox passwords for SMTP Basic authentication: scrypt hashes in a small private file.

Exchange checks AUTH LOGIN/PLAIN against Active Directory accounts; hubport's users are the
organization's mailboxes, and their password hashes live outside the organization file (which
is shared, edited by hand and kept in version control) in ``PasswordFilePath``: one line
``alias:$scrypt$ln=15,r=8,p=1$<salt>$<hash>`` per mailbox, keyed by the lower-cased alias.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from hubport.core.config import Mailbox, Organization, TransportServer

__all__ = [
    "PasswordStore",
    "hash_password",
    "locked_folder",
    "mailbox_for_login",
    "organization_folder",
    "replace_file",
    "verify_password",
]

log = structlog.get_logger("hubport.auth")

# scrypt cost: N = 2**15, r = 8, p = 1 (about 32 MiB and tens of milliseconds per check).
LOG_N, BLOCK_SIZE, PARALLELISM = 15, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
# Upper bounds accepted from a stored entry: a tampered file must not make a check take
# gigabytes of memory or minutes of CPU.
_MAX_LOG_N, _MAX_R, _MAX_P = 20, 32, 16
_ENTRY_RE = re.compile(
    r"^\$scrypt\$ln=(\d{1,2}),r=(\d{1,2}),p=(\d{1,2})\$([A-Za-z0-9+/]+=*)\$([A-Za-z0-9+/]+=*)$"
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    text = text.rstrip("=")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int, length: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(
        password.encode("utf-8", errors="surrogatepass"),
        salt=salt, n=n, r=r, p=p, dklen=length,
        maxmem=128 * r * n * p + 128 * r * n + (1 << 20),  # OpenSSL's 32 MiB default is too small
    )  # fmt: skip


def hash_password(password: str) -> str:
    """An encoded scrypt hash with a fresh 16-byte salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, LOG_N, BLOCK_SIZE, PARALLELISM, HASH_BYTES)
    return f"$scrypt$ln={LOG_N},r={BLOCK_SIZE},p={PARALLELISM}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Does `password` match the encoded hash? Constant-time; False for malformed entries."""
    m = _ENTRY_RE.match(encoded.strip())
    if not m:
        return False
    log_n, r, p = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if not (1 <= log_n <= _MAX_LOG_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        return False
    try:
        salt, expected = _unb64(m.group(4)), _unb64(m.group(5))
    except ValueError:
        return False
    if not salt or not 16 <= len(expected) <= 64:
        return False
    try:
        actual = _scrypt(password, salt, log_n, r, p, len(expected))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(actual, expected)


def mailbox_for_login(org: Organization, login: str) -> Mailbox | None:
    """The mailbox a login names: its alias, Name or any SMTP address (case-insensitive)."""
    wanted = login.strip().lower()
    if not wanted:
        return None
    for mailbox in org.mailboxes:
        names = (mailbox.alias, mailbox.name, mailbox.primary_smtp_address,
                 *mailbox.smtp_addresses)  # fmt: skip
        if any(name.lower() == wanted for name in names if name):
            return mailbox
    return None


def _key(mailbox: Mailbox) -> str:
    return mailbox.alias.lower()


def _parse(text: str) -> dict[str, str]:
    """alias -> encoded hash; blank, comment and malformed lines are ignored."""
    entries: dict[str, str] = {}
    for line in text.splitlines():
        alias, sep, encoded = line.strip().rpartition(":")
        if sep and alias and not alias.startswith("#"):
            entries[alias.lower()] = encoded
    return entries


@functools.cache
def _dummy() -> str:
    """Checked when an alias has no entry, so a failed login takes as long for an unknown user."""
    return hash_password(secrets.token_hex(16))


class PasswordStore:
    """The password file of one server; re-read when it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # guards the cache (verify runs in worker threads)
        self._signature: tuple[int, int, int] | None = None  # (inode, mtime_ns, size)
        self._entries: dict[str, str] = {}

    async def verify(self, mailbox: Mailbox, password: str) -> bool:
        """Is `password` the mailbox's password? Hashing (and the file) stay off the loop."""
        return await asyncio.to_thread(self._verify, _key(mailbox), password)

    def _verify(self, key: str, password: str) -> bool:
        encoded = self._current().get(key)
        if encoded is None:
            verify_password(password, _dummy())
            return False
        return verify_password(password, encoded)

    def _current(self) -> dict[str, str]:
        """The entries, reloaded when the file's inode, mtime or size changed."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self._signature, self._entries = None, {}
                return self._entries
            except OSError as exc:
                log.warning("password file unreadable", path=str(self.path), error=str(exc))
                return {}
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            if signature != self._signature:
                try:
                    text = self.path.read_text("utf-8", errors="replace")
                except OSError as exc:
                    log.warning("password file unreadable", path=str(self.path), error=str(exc))
                    return {}
                self._signature, self._entries = signature, _parse(text)
            return self._entries

    def set_password(self, mailbox: Mailbox, password: str) -> None:
        """Store a new hash for `mailbox`, replacing the file atomically (blocking)."""
        encoded = hash_password(password)
        key = _key(mailbox)
        with locked_folder(self.path.parent):  # two set-password runs must not lose an update
            try:
                old = self.path.read_text("utf-8", errors="replace").splitlines()
            except FileNotFoundError:
                old = []
            kept = [line for line in old if line.strip().rpartition(":")[0].lower() != key]
            text = "".join(f"{line}\n" for line in [*kept, f"{key}:{encoded}"])
            replace_file(self.path, text.encode("utf-8"), 0o600)
        log.info("password set", mailbox=mailbox.name, path=str(self.path))


# --------------------------------------------------------------------------------------------
# Private files (also used by hubport.core.tls for its keys)


def organization_folder(org: Organization, server: TransportServer, name: str) -> Path:
    """A folder of server-local secrets the organization's hubs share: beside the
    organization file, which every hub of one machine reads (``org.toml`` ->
    ``org-<name>/``); in the server's state folder (``<state>/<name>``) for the embedded
    default and for an organization in a store."""
    from hubport.core.config_fields import EMBEDDED_SOURCE

    if org.source == EMBEDDED_SOURCE or "://" in org.source:
        return server.state_directory / name
    source = Path(org.source)
    return source.with_name(f"{source.stem}-{name}")


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created 0700 if missing) and fsync it on success.

    Writers of the same folder are serialized; the fsync makes their renames durable.
    """
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        yield
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)  # also releases the lock


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` atomically: a temp file in its folder with `mode`, fsync, rename.

    Readers see the old or the new file, never a partial one; the caller fsyncs the folder.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
