"""Counts that are per server while the server runs several worker processes.

A limit such as MaxInboundConnection or MaxOutboundConnections bounds the whole server, but
each worker (core/workers.py) sees only its own connections. The workers therefore share
a small file in the state folder, memory-mapped by each of them: one row of int64 buckets
per worker. Worker k writes only row k, so writes need no lock; a server-wide count is the
sum of one bucket over all rows. A worker that starts (or is restarted) zeroes its own row:
whatever its previous process counted were connections that died with that process.

Keys are strings hashed with a stable hash (BLAKE2b, the same in every process and run,
unlike Python's ``hash``) to two buckets, one in each half of a row; a key's count is the
smaller of its two cells (a count-min sketch). Every cell holds the key's own count plus
those of the keys that share it, so a collision can only make a limit stricter, never
looser; and a key is overcounted only when both of its buckets are shared, so no key is
stuck behind a busy one (a source IP behind its connector's total) except by a chance of
about one in (buckets / 2)² per pair of keys.

The file has no header: its size is workers × buckets × 8 bytes, native byte order, and is
checked on attach. Aligned 8-byte stores are single stores on the 64-bit platforms hubport
runs on, so a reader in another worker never sees half a value; what it sees may be a few
microseconds old, which the limits tolerate (see ``try_take``).

Within one worker the counters are used from its event loop's thread: ``add`` is a
read-modify-write of the worker's own cell and is not meant to be called from several
threads at once.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from types import TracebackType

from hubport.core.workers import WorkerSlot

DEFAULT_BUCKETS = 4096
CELL = 8  # bytes of one int64 bucket


def _check_shape(count: int, buckets: int) -> None:
    if count < 1:
        raise ValueError(f"shared counters need at least one worker row, not {count}")
    if buckets < 2:
        raise ValueError(f"shared counters need at least two buckets a row, not {buckets}")


class SharedCounters:
    """Per-worker rows of int64 buckets; a key's server-wide count is the sum over rows.

    Make one with ``create`` (the supervising parent, before it starts workers) and
    ``attach`` (each worker). A daemon run in-process, or with no file, gets an in-memory
    instance that behaves the same (same hashing, same buckets) for its single row.
    """

    def __init__(self, buffer: bytearray | mmap.mmap, count: int, index: int, buckets: int,
                 path: Path | None = None) -> None:
        _check_shape(count, buckets)
        if not 0 <= index < count:
            raise ValueError(f"worker row {index} of {count}")
        self.path = path
        self.count = count
        self.index = index
        self.buckets = buckets
        self._buffer: bytearray | mmap.mmap | None = buffer
        self._bytes = memoryview(buffer)
        self._cells = self._bytes.cast("q")
        self._zero_row()

    # -- making one ------------------------------------------------------------------------

    @staticmethod
    def create(path: Path, count: int, buckets: int = DEFAULT_BUCKETS) -> None:
        """Create (or replace, resized) the file for ``count`` workers, all zero, mode 0600.

        Atomic: a temporary file next to ``path`` is sized and renamed over it, so a worker
        never maps a half-made file. Workers still attached to an older file keep that
        one; the parent calls this before it starts any worker.
        """
        _check_shape(count, buckets)
        path = Path(path)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
                os.ftruncate(fd, count * buckets * CELL)  # reads back as zeros
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    @classmethod
    def attach(cls, path: Path | None, worker: WorkerSlot,
               buckets: int = DEFAULT_BUCKETS) -> SharedCounters:
        """Worker ``worker.index``'s view of the server's counters; its own row is zeroed.

        ``path`` None, or a server of one worker, gives an in-memory instance: nothing to
        share, and nothing on disk to go wrong. Raises ``OSError`` when the file cannot be
        opened or mapped, ``ValueError`` when its size is not ``worker.count`` × ``buckets``
        × 8 bytes (it was made for another number of workers or buckets).
        """
        _check_shape(worker.count, buckets)
        if path is None or worker.count == 1:
            return cls(bytearray(worker.count * buckets * CELL), worker.count, worker.index,
                       buckets)
        path = Path(path)
        expected = worker.count * buckets * CELL
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size != expected:
                raise ValueError(
                    f"shared counters file {path} is {size} bytes, expected {expected}"
                    f" ({worker.count} workers × {buckets} buckets × {CELL}); it was made"
                    " for another number of workers: recreate it")
            mapped = mmap.mmap(fd, expected)
        finally:
            os.close(fd)
        try:
            return cls(mapped, worker.count, worker.index, buckets, path)
        except BaseException:
            mapped.close()
            raise

    # -- counting --------------------------------------------------------------------------

    def cells(self, key: str) -> tuple[int, int]:
        """The two buckets ``key`` counts in, one in each half of a row (stable across
        processes and runs)."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        half = self.buckets // 2
        first = int.from_bytes(digest[:4], "little") % half
        second = half + int.from_bytes(digest[4:], "little") % (self.buckets - half)
        return first, second

    def add(self, key: str, delta: int) -> None:
        """Change this worker's count of ``key`` by ``delta`` (its own row only)."""
        first, second = self.cells(key)
        base = self.index * self.buckets
        self._cells[base + first] += delta
        self._cells[base + second] += delta

    def total(self, key: str) -> int:
        """The server-wide count of ``key``: over every worker's row, the smaller of the
        key's two cells (never less than the true count)."""
        first, second = self.cells(key)
        cells, step = self._cells, self.buckets
        return sum(min(cells[base + first], cells[base + second])
                   for base in range(0, self.count * step, step))

    def mine(self, key: str) -> int:
        """This worker's own count of ``key``."""
        first, second = self.cells(key)
        base = self.index * self.buckets
        return min(self._cells[base + first], self._cells[base + second])

    def try_take(self, key: str, limit: int | None) -> bool:
        """Take one of ``key`` if the server-wide total is below ``limit`` (None: no limit).

        Check, then add: atomic within this worker (no await in between), but two workers
        may both see ``limit - 1`` and both take, so the server-wide total can overshoot
        ``limit`` by at most workers - 1 (each worker at most once per race). Give back
        what was taken with ``release``.
        """
        if limit is not None and self.total(key) >= limit:
            return False
        self.add(key, 1)
        return True

    def release(self, key: str) -> None:
        """Give back one taken with ``try_take`` (or counted with ``add(key, 1)``)."""
        self.add(key, -1)

    # -- lifetime --------------------------------------------------------------------------

    def _zero_row(self) -> None:
        size = self.buckets * CELL
        start = self.index * size
        self._bytes[start:start + size] = bytes(size)

    @property
    def shared(self) -> bool:
        """Whether other processes see these counts (a mapped file, not memory)."""
        return self.path is not None

    def close(self) -> None:
        """Zero this worker's row and unmap the file (idempotent): a worker that stops has
        no connections left. Close it after the services that count have stopped; any
        use afterwards raises ``ValueError``."""
        if self._buffer is None:
            return
        self._zero_row()
        self._cells.release()
        self._bytes.release()
        if isinstance(self._buffer, mmap.mmap):
            self._buffer.close()
        self._buffer = None

    def __enter__(self) -> SharedCounters:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return (f"SharedCounters({where}, worker {self.index} of {self.count},"
                f" {self.buckets} buckets)")
