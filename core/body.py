"""Message bodies that cost bounded memory: small ones in memory, large ones in a spool file.

A message's octets are a ``MessageBody``: ``prefix`` bytes held in memory followed by the
part of a spool file from ``offset`` on. A small message is all prefix, exactly as it always
was. A large one (over ``SPOOL_THRESHOLD``) is written by its receiver through a
``SpoolWriter`` into the queue's spool folder (``queue/mail.spool/`` beside ``mail.que``,
one per worker), fsync'd before the queue commit that names it, and read back in chunks by
every delivery. Header rewriting (the Received field, a firewalled header removed, Pickup's
Bcc) replaces the first octets with a new ``prefix`` and moves ``offset`` past what it
replaced, so the file itself is never rewritten.

Ownership: a spool file belongs to whoever wrote it until a queue commit names it; from
then on to the queue, which removes it (``core/queue.py``, ``spool_garbage``) only after
the last message row that names it is gone. A file no row names when the queue opens is
the leftover of a commit that never happened and is removed then.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from hubport.core.durable import fsync_dir

#: bodies larger than this go to a spool file (every smaller one stays in memory, which is
#: what keeps the common case as fast as before)
SPOOL_THRESHOLD = 1 << 20
#: how much of a spooled body one read takes
CHUNK_SIZE = 1 << 20
SPOOL_SUFFIX = ".body"


def spool_folder(queue_path: Path) -> Path:
    """The spool folder of the queue database at ``queue_path`` (``mail.que`` →
    ``mail.spool``): per database, so that a worker only ever sees its own files."""
    return queue_path.with_suffix(".spool")


@dataclass(frozen=True, slots=True)
class MessageBody:
    """The octets of one message: ``prefix`` then ``spool`` from ``offset`` (if any).

    Immutable: a rewrite makes a new body (``replace_prefix``). Reading a spooled body is
    blocking file I/O; in the daemon use ``achunks`` or run the sync methods in a thread.
    """

    prefix: bytes = b""
    spool: Path | None = None
    offset: int = 0
    size: int = 0

    @classmethod
    def of(cls, data: bytes) -> MessageBody:
        """A body held wholly in memory."""
        data = bytes(data)
        return cls(prefix=data, size=len(data))

    @property
    def spooled(self) -> bool:
        return self.spool is not None

    def __len__(self) -> int:
        return self.size

    def read(self) -> bytes:
        """The whole message in memory: a convenience for small messages and for steps that
        need it all at once. Costs the message's size; prefer ``chunks``."""
        if self.spool is None:
            return self.prefix
        return b"".join(self.chunks())

    def read_prefix(self, limit: int) -> bytes:
        """At most the first ``limit`` octets (the header section is in them)."""
        if self.spool is None or len(self.prefix) >= limit:
            return self.prefix[:limit]
        with open(self.spool, "rb") as fh:
            fh.seek(self.offset)
            return self.prefix + fh.read(limit - len(self.prefix))

    def chunks(self, size: int | None = None) -> Iterator[bytes]:
        """The octets in pieces of at most ``size`` (``CHUNK_SIZE``; blocking reads)."""
        size = size or CHUNK_SIZE
        for start in range(0, len(self.prefix), size):
            yield self.prefix[start:start + size]
        if self.spool is None:
            return
        with open(self.spool, "rb") as fh:
            fh.seek(self.offset)
            left = self.size - len(self.prefix)
            while left > 0:
                piece = fh.read(min(size, left))
                if not piece:
                    raise OSError(f"spool file {self.spool} ends {left} octets early")
                left -= len(piece)
                yield piece

    async def achunks(self, size: int | None = None) -> AsyncIterator[bytes]:
        """``chunks`` for the event loop: each file read runs in a thread."""
        if self.spool is None:
            for piece in self.chunks(size):
                yield piece
            return
        pieces = self.chunks(size)
        while (read := await asyncio.to_thread(_next_piece, pieces)) is not None:
            yield read

    def replace_prefix(self, consumed: int, new: bytes) -> MessageBody:
        """The body with its first ``consumed`` octets replaced by ``new`` (a rewritten
        header section); the spool file is not touched."""
        if consumed < 0 or consumed > self.size:
            raise ValueError(f"cannot replace {consumed} octets of a {self.size}-octet body")
        if consumed <= len(self.prefix):
            prefix = new + self.prefix[consumed:]
            return replace(self, prefix=prefix, size=self.size - consumed + len(new))
        skipped = consumed - len(self.prefix)
        return replace(self, prefix=new, offset=self.offset + skipped,
                       size=self.size - consumed + len(new))


class SpoolWriter:
    """Collects a body being received: in memory up to ``threshold``, then in a new spool
    file. ``finish`` makes the file durable and returns the body; ``discard`` removes it
    when the message is not committed (the writer owns the file until a commit names it).
    """

    def __init__(self, folder: Path, threshold: int | None = None) -> None:
        self.folder = folder
        self.threshold = SPOOL_THRESHOLD if threshold is None else threshold
        self._buffer = bytearray()
        self._spilled = False
        #: ``discard`` may run on the event loop while a write thread creates the file
        self._lock = threading.Lock()
        self._discarded = False
        self._file: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0

    async def write(self, data: bytes) -> None:
        staged = self._stage(data)
        if staged:
            await asyncio.to_thread(self._write_file, staged)

    def write_sync(self, data: bytes) -> None:
        """``write`` for a caller already off the event loop (a folder reader's thread)."""
        staged = self._stage(data)
        if staged:
            self._write_file(staged)

    def _stage(self, data: bytes) -> bytes:
        """Count ``data``; what must go to the file now (empty while it fits in memory)."""
        self.size += len(data)
        if self._spilled:
            return data
        self._buffer += data
        if len(self._buffer) <= self.threshold:
            return b""
        self._spilled = True
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    def _write_file(self, data: bytes) -> None:
        if self._file is None:
            self.path = self.folder / f"{uuid.uuid4().hex}{SPOOL_SUFFIX}"
            self.folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "xb")
        self._file.write(data)

    async def finish(self) -> MessageBody:
        """The body; a spool file is flushed and fsync'd (with its folder) first."""
        if not self._spilled:
            return MessageBody.of(bytes(self._buffer))
        return await asyncio.to_thread(self.finish_sync)

    def finish_sync(self) -> MessageBody:
        """``finish`` off the event loop."""
        if not self._spilled:
            return MessageBody.of(bytes(self._buffer))
        with self._lock:
            if self._discarded or self.path is None:
                raise OSError("the spool file was discarded before it was finished")
            self._close_durably()
            return MessageBody(spool=self.path, size=self.size)

    def _close_durably(self) -> None:
        fh = self._file
        assert fh is not None
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        self._file = None
        fsync_dir(self.folder)

    def discard(self) -> None:
        """Forget the body and remove its spool file (blocking; small, one unlink). Safe
        while a ``write`` is still running in its thread: that write then creates nothing."""
        with self._lock:
            self._discarded = True
            self._buffer = bytearray()
            if self._file is not None:
                self._file.close()
                self._file = None
            if self.path is not None:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                self.path = None


def make_durable_folder(folder: Path) -> None:
    """Create ``folder`` if needed, durably (its parent synced), so that a spool file
    named in a commit is never in a folder a crash can lose."""
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        fsync_dir(folder.parent)


def _next_piece(pieces: Iterator[bytes]) -> bytes | None:
    return next(pieces, None)


def discard_spool(body: MessageBody) -> None:
    """Remove the spool file of a body no commit has named (a refused message)."""
    if body.spool is not None:
        try:
            body.spool.unlink()
        except FileNotFoundError:
            pass

