"""Exchange-style rotating log files, shared by the message tracking and protocol logs.

Exchange's transport logs all look alike: files named ``<PREFIX>yyyymmdd-n.log`` after the UTC
day of their entries, a block of ``#`` header lines, a new number when a file would pass its size
limit, and pruning by age and by total folder size. `RotatingLog` is that machinery; a subclass
only says how one buffered entry becomes one line (`_encode`).

Several processes (the workers of one server, core/workers.py) may log into one folder. Each
writes a file family of its own, as Exchange's services each write their own MSGTRK-prefixed
family: the first writer (``writer`` empty) the ``<PREFIX>yyyymmdd-n.log`` files, writer ``W1``
the ``<PREFIX>_W1_yyyymmdd-n.log`` files, and so on. A writer appends to, rotates and prunes
only its own family, so no two processes ever touch one file; its share of the folder's size
limit is the limit divided by the number of writers. Readers (the tracking log's search) take
every family of the folder (`list_files` with ``writer=None``).

Logging runs next to the event loop: `_append()` only touches an in-memory buffer, and
`flush()` does all disk work from a worker thread. A disk error never propagates: the entries
stay buffered (bounded) and the error is reported through `last_error`. What is buffered is
best-effort (a crash loses it); a subclass with a durable source of its own (the tracking log's
outbox) overrides `_flush_pending` and writes with `_write(..., sync=True)`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from hubport.core import __version__
from hubport.core.workers import WorkerSlot

__all__ = [
    "MAX_BUFFERED_EVENTS",
    "Entry",
    "LogFile",
    "RotatingLog",
    "day_of",
    "family_prefix",
    "iso_ms",
    "list_files",
    "log_writer",
]

logger = logging.getLogger(__name__)

SOFTWARE = "hubport"
VERSION = __version__

# Beyond this many unflushed entries (disk failing for a long time) the oldest are dropped:
# memory must stay bounded while the disk is down.
MAX_BUFFERED_EVENTS = 100_000

# One buffered entry: a tuple whose first item is its time (seconds since the epoch); the rest
# is the subclass's business and is serialized by flush(), off the event loop.
Entry = tuple[Any, ...]


def iso_ms(ts: float) -> str:
    """UTC ISO 8601 with milliseconds and 'Z', e.g. 2024-03-01T12:00:00.123Z.

    Rounded to microseconds like datetime.fromtimestamp, then truncated to milliseconds, so
    23:59:59.9996 stays on its day. The per-second prefix is cached: flush formats thousands
    of stamps per second and this is one of its hottest steps.
    """
    sec = math.floor(ts)
    micros = round((ts - sec) * 1_000_000)
    if micros >= 1_000_000:
        sec, micros = sec + 1, micros - 1_000_000
    return f"{_second_prefix(sec)}{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8)
def _second_prefix(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))


def day_of(stamp: str) -> str:
    """The yyyymmdd file-name day of an `iso_ms` stamp (the same rounding, so never off by one)."""
    return stamp[0:4] + stamp[5:7] + stamp[8:10]


# --------------------------------------------------------------------------------------------
# The files of one log folder


@dataclass(frozen=True)
class LogFile:
    path: Path
    day: date
    n: int
    size: int
    mtime: float
    writer: str = ""  # the family: "" for the first writer's files, e.g. "W1" for another's


# A writer's name in its files: letters and digits only, so ``_<writer>_`` between the prefix
# and the date can never be mistaken for part of either.
_WRITER_RE = re.compile(r"[A-Za-z0-9]{1,16}")


def log_writer(worker: WorkerSlot) -> str:
    """The log file family of a server's worker: "" (the names of a single-process server)
    for worker 0, ``W<k>`` for worker k."""
    return f"W{worker.index}" if worker.index else ""


def family_prefix(prefix: str, writer: str) -> str:
    """What the names of `writer`'s files start with: ``MSGTRK`` or ``MSGTRK_W1_``."""
    if writer and not _WRITER_RE.fullmatch(writer):
        raise ValueError(f"a log writer name is 1 to 16 letters or digits, not {writer!r}")
    return f"{prefix}_{writer}_" if writer else prefix


@functools.lru_cache(maxsize=16)
def _file_re(prefix: str) -> re.Pattern[str]:
    return re.compile(
        rf"^{re.escape(prefix)}(?:_([A-Za-z0-9]{{1,16}})_)?(\d{{8}})-(\d{{1,9}})\.log$"
    )


def _parse_file_name(prefix: str, name: str) -> tuple[date, int, str] | None:
    """(UTC date, sequence number, writer) of a `prefix` log file name, None for anything else."""
    m = _file_re(prefix).match(name)
    if not m:
        return None
    try:
        day = datetime.strptime(m.group(2), "%Y%m%d").date()
    except ValueError:
        return None
    return day, int(m.group(3)), m.group(1) or ""


def list_files(directory: Path, prefix: str, writer: str | None = "") -> list[LogFile]:
    """Regular `prefix` files in `directory` of `writer`'s family (None: of every family),
    oldest first by (date, writer, n); never follows symlinks."""
    found: list[LogFile] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                parsed = _parse_file_name(prefix, entry.name)
                if parsed is None or (writer is not None and parsed[2] != writer):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    day, n, family = parsed
                    found.append(
                        LogFile(Path(entry.path), day, n, st.st_size, st.st_mtime, family)
                    )
    except (FileNotFoundError, NotADirectoryError):
        return []
    found.sort(key=lambda f: (f.day, f.writer, f.n))
    return found


# --------------------------------------------------------------------------------------------
# Writer


class RotatingLog:
    """Buffers entries on the event loop and writes them to rotating ``<prefix>`` files.

    Subclasses implement `_encode` and call `_append` from their own logging methods.
    `max_age` None or 0 keeps files forever; `max_directory_size` None sets no folder limit.
    `writer` names this process's file family (see the module docstring) and `writers` is
    how many processes log into the folder: this one keeps its family within
    ``max_directory_size / writers``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        prefix: str,
        log_type: str,
        fields: Sequence[str],
        max_age: float | None,
        max_directory_size: int | None,
        max_file_size: int,
        label: str,
        clock: Callable[[], float] = time.time,
        writer: str = "",
        writers: int = 1,
    ) -> None:
        if writers < 1:
            raise ValueError(f"a log folder has at least one writer, not {writers}")
        self.directory = directory
        self.prefix = prefix
        self.writer = writer
        self.writers = writers
        self._family = family_prefix(prefix, writer)  # validates `writer`
        self.log_type = log_type
        self.fields = tuple(fields)
        self.max_age = max_age
        self.max_directory_size = max_directory_size
        self.max_file_size = max_file_size
        self.label = label  # names the log in warnings, e.g. "message tracking log"
        self.clock = clock
        # The error of the latest flush (None = healthy), and the entries lost for good
        # (buffer overflow while the disk was failing, or unencodable).
        self.last_error: Exception | None = None
        self.dropped = 0
        self._lock = threading.Lock()  # guards _buffer and dropped (_append() vs flush())
        self._flush_lock = threading.Lock()  # one flush at a time (periodic vs close)
        self._buffer: collections.deque[Entry] = collections.deque()
        self._closed = False
        self._started = False  # first flush prunes, as Exchange does at service start
        self._error: Exception | None = None  # first error of the flush in progress
        self._sync_failed = False  # set by _write(sync=True) when an fsync failed
        # The file being appended to: its UTC day (yyyymmdd) and number (0 = none yet).
        self._day = ""
        self._n = 0

    # -- subclass contract -----------------------------------------------------------------

    def _encode(self, entry: Entry) -> tuple[str, bytes]:
        """(UTC day yyyymmdd, one line with its newline) for `entry`; runs in flush()."""
        raise NotImplementedError

    @property
    def max_buffered(self) -> int:
        """The buffer bound (a property so a subclass or test can change it at run time)."""
        return MAX_BUFFERED_EVENTS

    # -- event loop side -------------------------------------------------------------------

    def _append(self, entry: Entry) -> None:
        """Buffer one entry; no disk I/O, so it is safe on the event loop."""
        if self._closed:
            return
        with self._lock:
            self._buffer.append(entry)
            if len(self._buffer) > self.max_buffered:
                self._buffer.popleft()
                self.dropped += 1

    @property
    def buffered(self) -> int:
        """Entries waiting for the next flush (for health reporting)."""
        return len(self._buffer)

    async def run_flusher(self, interval: float = 0.5) -> None:
        """Flush every `interval` seconds from a worker thread until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self._flush_in_thread()
        except asyncio.CancelledError:
            await self._flush_in_thread()
            raise

    async def _flush_in_thread(self) -> None:
        try:
            await asyncio.to_thread(self.flush)
        except Exception as exc:  # a bug in flush must not stop logging for good
            logger.exception("%s flush failed", self.label)
            self.last_error = exc

    # -- worker thread side ----------------------------------------------------------------

    def flush(self) -> None:
        """Write buffered entries to disk; on failure keep them buffered and set last_error."""
        with self._flush_lock:
            self._error = None
            self._flush_pending()
            self._report()

    def _flush_pending(self) -> None:
        """Write what is waiting (the flush lock is held); a subclass may add a source."""
        with self._lock:
            batch = list(self._buffer)
            self._buffer.clear()
        try:
            self._start()
            lines = self._serialize(batch)
            written = self._write(lines)
            self._requeue([entry for entry, _, _ in lines[written:]])
        except OSError as exc:
            self._note(exc)
            self._requeue(batch)

    def _start(self) -> None:
        """Create the folder and prune, once (Exchange prunes at service start)."""
        if not self._started:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._prune(current=None)
            self._started = True

    def close(self) -> None:
        """Flush what is buffered; later entries are ignored."""
        self._closed = True
        self.flush()

    def _note(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc

    def _report(self) -> None:
        """Publish this flush's outcome; warn once when the log starts failing."""
        if self._error is not None and self.last_error is None:
            logger.warning(
                "%s: %s (%d entries lost so far)", self.label, ascii(str(self._error)), self.dropped
            )
        self.last_error = self._error

    def _requeue(self, entries: list[Entry]) -> None:
        """Put unwritten entries back in front of newer ones, dropping the oldest beyond the cap."""
        if not entries:
            return
        with self._lock:
            self._buffer.extendleft(reversed(entries))
            excess = len(self._buffer) - self.max_buffered
            for _ in range(excess):
                self._buffer.popleft()
            self.dropped += max(0, excess)

    def _serialize(self, batch: list[Entry]) -> list[tuple[Entry, str, bytes]]:
        """(entry, UTC day, line) per entry; an entry that cannot be encoded is dropped.

        Dropping (rather than requeueing) keeps one bad entry from blocking the buffer forever.
        """
        out: list[tuple[Entry, str, bytes]] = []
        for entry in batch:
            try:
                day, line = self._encode(entry)
            except (TypeError, ValueError, OverflowError, OSError) as exc:
                with self._lock:
                    self.dropped += 1
                self._note(ValueError(f"unencodable {self.label} entry dropped: {exc}"))
                continue
            out.append((entry, day, line))
        return out

    def _header(self, ts: float) -> bytes:
        lines = [
            f"#Software: {SOFTWARE}",
            f"#Version: {VERSION}",
            f"#Log-Type: {self.log_type}",
            f"#Date: {iso_ms(ts)}",
            "#Fields: " + ",".join(self.fields),
        ]
        return ("\n".join(lines) + "\n").encode("ascii")

    def _write(self, lines: list[tuple[Entry, str, bytes]], sync: bool = False) -> int:
        """Append lines, rolling by day and size; returns how many were written.

        A failure stops the batch (the caller requeues the rest) and is noted for last_error.
        With `sync` every file is fsynced before it is closed (and the folder when a file was
        created), so a caller that counts lines as durable may; a failed fsync is noted too.
        """
        written = 0
        out: _OpenFile | None = None
        try:
            for entry, day, line in lines:
                if out is None or day != self._day:
                    if out is not None:
                        written += out.commit()
                        self._done_with(out, sync)
                        out = None
                    out = self._open_day(day, entry[0])
                while out.full_for(len(line), self.max_file_size):
                    written += out.commit()
                    self._done_with(out, sync)
                    out = None
                    self._n += 1
                    out = self._open_current(entry[0])
                out.add(line)
            if out is not None:
                written += out.commit()
                self._done_with(out, sync)
                out = None
        except OSError as exc:
            self._note(exc)
        finally:
            if out is not None:
                out.close()
        return written

    def _done_with(self, out: _OpenFile, sync: bool) -> None:
        """Close a file after its commit; with `sync`, make it (and a new name) durable first.

        A failed fsync sets `_sync_failed`: the lines are in the file but maybe not on disk.
        """
        try:
            if sync:
                os.fsync(out.fd)
                if out.header_len:  # created by this flush: its directory entry is new
                    dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        os.fsync(dirfd)
                    finally:
                        os.close(dirfd)
        except OSError:
            self._sync_failed = True
            raise
        finally:
            out.close()

    def _open_day(self, day: str, ts: float) -> _OpenFile:
        """Open the file for `day`: the current one, else that day's newest, else number 1."""
        if day != self._day or self._n == 0:
            numbers = [
                f.n
                for f in list_files(self.directory, self.prefix, self.writer)
                if f.day.strftime("%Y%m%d") == day
            ]
            self._day, self._n = day, max(numbers, default=1)
        return self._open_current(ts)

    def _open_current(self, ts: float) -> _OpenFile:
        """Open (creating it with a header, then pruning) the file for self._day/self._n.

        A symlink, FIFO or directory squatting on the name is stepped over to the next
        number: opening it could block or write elsewhere, and refusing would stop logging.
        """
        while True:
            path = self.directory / f"{self._family}{self._day}-{self._n}.log"
            fd = _open_regular_for_append(path)
            if fd is not None:
                break
            self._n += 1
        st_size = os.fstat(fd).st_size
        out = _OpenFile(fd, st_size)
        if st_size == 0:
            out.add_header(self._header(ts))
            self._prune(current=path)
        elif _torn(fd, st_size):
            # a line cut short by a crash (power loss): end it, so the next entry starts
            # on a line of its own and readers skip only the torn one
            out.pending += b"\n"
        return out

    @property
    def size_share(self) -> int | None:
        """This writer's part of max_directory_size: what its own family may take."""
        if self.max_directory_size is None:
            return None
        return max(1, self.max_directory_size // self.writers)

    def _prune(self, current: Path | None) -> None:
        """Delete this writer's oldest files while its family is over its share of the size
        limit, and any of its files past max_age; other writers' files are never touched.

        Never deletes `current`. Deletion failures are noted but do not stop logging.
        """
        files = list_files(self.directory, self.prefix, self.writer)
        total = sum(f.size for f in files)
        cutoff = self.clock() - self.max_age if self.max_age else None
        limit = self.size_share
        for f in files:
            if current is not None and f.path == current:
                continue
            too_big = limit is not None and total > limit
            too_old = cutoff is not None and f.mtime < cutoff
            if not (too_big or too_old):
                continue
            try:
                f.path.unlink(missing_ok=True)
            except OSError as exc:
                self._note(exc)
                continue
            total -= f.size


def _torn(fd: int, size: int) -> bool:
    """Does the file end in the middle of a line? (Checked once per open: one small read.)"""
    try:
        return os.pread(fd, 1, size - 1) != b"\n"
    except OSError:
        return False


def _open_regular_for_append(path: Path) -> int | None:
    """An append descriptor for `path`, or None when the name is taken by a non-regular file.

    Read-write, so the end of an existing file can be checked for a torn line (`_torn`).
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


class _OpenFile:
    """A log file open for appending, with the bytes not yet written to it."""

    def __init__(self, fd: int, size_on_disk: int) -> None:
        self.fd = fd
        self.on_disk = size_on_disk
        # > 0 only when we start the file ourselves: it then holds no entries yet.
        self.header_len = 0
        self.pending = bytearray()
        self.pending_entries = 0

    @property
    def size(self) -> int:
        return self.on_disk + len(self.pending)

    def full_for(self, line_len: int, max_size: int) -> bool:
        """Would `line_len` more bytes exceed max_size? A file with no entries takes any line."""
        return self.size + line_len > max_size and self.size > self.header_len

    def add_header(self, header: bytes) -> None:
        self.pending += header
        self.header_len = len(header)

    def add(self, line: bytes) -> None:
        self.pending += line
        self.pending_entries += 1

    def commit(self) -> int:
        """Write the pending bytes; returns the entries written.

        On error the file is cut back to its previous size, so no half line is left behind.
        """
        data = bytes(self.pending)
        done = 0
        try:
            while done < len(data):
                done += os.write(self.fd, data[done:] if done else data)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.on_disk)
            raise
        count = self.pending_entries
        self.on_disk += len(data)
        self.pending = bytearray()
        self.pending_entries = 0
        return count

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
