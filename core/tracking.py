"""The message tracking log: Exchange's MSGTRK files, written as JSON lines, and their searcher.

The log must account for every message even after a crash, so an event that describes a queue
change is committed with it: `TrackingLog.log(conn=...)`, called inside the group-committed
transaction, adds the encoded line to the ``tracking_outbox`` table of the queue database and
costs no fsync of its own. The flusher (a worker thread, every half second) copies new outbox
rows to the files in sequence order, fsyncs the files, and only then deletes the rows it copied,
in a later group commit. Each such line carries its ``sequence-number``; at start, before
anything else runs, the rows a crash left in the outbox are copied unless their number is
already in that day's files, so no event is lost and none is written twice.

Events that go with no queue commit (`log()` without `conn`: the BADMAIL of a folder file)
stay best-effort, as the protocol logs are: they are buffered in memory (bounded) and lost if
the process dies before the next flush; their ``sequence-number`` is null. A disk error never
propagates: the events stay buffered (or in the outbox) and the error is reported through
`last_error`.

Every event is written to the file named after its own UTC date, so the searcher can skip
files by name without missing events.

The workers of one server share the folder, each with a file family of its own
(core/rotating_log.py: ``MSGTRK…`` for worker 0, ``MSGTRK_W1_…`` for worker 1, …) and an
outbox of its own (in its own queue database). Sequence numbers are per outbox, so they are
compared only within the writer's family; the searcher reads every family and merges them
in time order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubport.core.failpoints import failpoint
from hubport.core.rotating_log import Entry, LogFile, RotatingLog, day_of, list_files
from hubport.core.rotating_log import iso_ms as _iso_ms

if TYPE_CHECKING:
    from hubport.core.store import Store

__all__ = [
    "EVENT_IDS",
    "FIELDS",
    "MAX_BUFFERED_EVENTS",
    "OUTBOX_SCHEMA",
    "SOURCES",
    "TrackingLog",
    "TrackingSettings",
    "format_events",
    "search",
]


logger = logging.getLogger(__name__)

PREFIX = "MSGTRK"
LOG_TYPE = "Message Tracking Log"

EVENT_IDS = frozenset(
    {
        # Core 2007/2010 events.
        "RECEIVE", "SUBMIT", "SEND", "DELIVER", "DEFER", "FAIL", "DSN", "EXPAND", "RESOLVE",
        "REDIRECT", "TRANSFER", "POISONMESSAGE", "BADMAIL",
        # 2010-era extras.
        "DUPLICATEDELIVER", "DUPLICATEEXPAND", "DUPLICATEREDIRECT", "AGENTINFO",
        "INITMESSAGECREATED", "MODERATORAPPROVE", "MODERATORREJECT", "MODERATORSALLNDR",
        "MODERATIONEXPIRE", "HAREDIRECT", "HARECEIVE", "HAREDIRECTFAIL", "HADISCARD",
        # Documented for 2013+; hubport uses DROP, SUPPRESSED and RESUBMIT.
        "DROP", "LOAD", "PROCESS", "THROTTLE", "SUPPRESSED", "RESUBMIT", "SUBMITDEFER",
        "SUBMITFAIL", "NOTIFYMAPI", "NOTIFYSHADOW",
    }
)  # fmt: skip

SOURCES = frozenset(
    {
        "SMTP", "STOREDRIVER", "PICKUP", "ADMIN", "AGENT", "DSN", "GATEWAY", "QUEUE", "ROUTING",
        "RESOLVER", "DNS", "POISONMESSAGE", "REDUNDANCY", "BOOTLOADER", "APPROVAL",
        "MAILBOXRULE", "ORAR", "PUBLICFOLDER",
    }
)  # fmt: skip

# Exchange's field names, in Exchange's order (the 2010-era set minus tenant-id and the
# original-client-ip/original-server-ip pair, which hubport has no use for), then hubport's
# sequence-number: the event's number in the outbox (null for a best-effort event). It is how
# recovery after a crash knows which committed events are already in the files.
FIELDS: tuple[str, ...] = (
    "date-time", "client-ip", "client-hostname", "server-ip", "server-hostname",
    "source-context", "connector-id", "source", "event-id", "internal-message-id",
    "message-id", "recipient-address", "recipient-status", "total-bytes", "recipient-count",
    "related-recipient-address", "reference", "message-subject", "sender-address",
    "return-path", "message-info", "directionality", "custom-data", "sequence-number",
)  # fmt: skip

# Beyond this many unflushed events (disk failing for a long time) the oldest are dropped:
# memory must stay bounded while the disk is down.
MAX_BUFFERED_EVENTS = 100_000

# The searcher never holds more than this of one line in memory (a corrupt file may lack newlines).
MAX_LINE_BYTES = 16 * 1024 * 1024

# The outbox, in the queue database. `line` is the event's JSON line up to its last field (the
# sequence number, which is the row's key, is added when the line is copied to a file).
# AUTOINCREMENT: a number is never used twice, even after the rows have been deleted.
OUTBOX_SCHEMA = """
CREATE TABLE IF NOT EXISTS tracking_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    line BLOB NOT NULL
);
"""

# Outbox rows copied per read (bounds the flusher's memory after a long disk outage).
OUTBOX_BATCH = 5000

# Tail of a log file read per step while looking for its last sequence number.
_TAIL_CHUNK = 64 * 1024

# Marks an outbox entry in the writer's batches: (at, _OUTBOX, seq, line without its end).
_OUTBOX = object()
_SEQUENCE_KEY = b'"sequence-number":'


@dataclass(frozen=True)
class TrackingSettings:
    """Set-TransportServer's MessageTrackingLog* settings ([2010] defaults).

    `path` comes first because it is the only setting without a default.
    """

    path: Path
    enabled: bool = True
    max_age: float = 30 * 86400  # seconds; 0 = never expire
    max_directory_size: int = 1 << 30  # 1 GB [2010]
    max_file_size: int = 10 * 1024 * 1024
    subject_logging_enabled: bool = True
    #: this process's file family ("" = the ``MSGTRK<date>-<n>.log`` names; see
    #: ``rotating_log.log_writer``) and how many processes write into the folder (each keeps
    #: its family within max_directory_size / writers)
    writer: str = ""
    writers: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path):  # accept a str from the config loader
            object.__setattr__(self, "path", Path(self.path))


# One buffered event: the raw arguments of log(), serialized later by flush() off the loop.
_Event = tuple[Any, ...]


def _create_outbox(conn: sqlite3.Connection) -> None:
    """Create the outbox; a new one numbers from the current time in microseconds.

    So the numbers of a queue database created afresh (deleted, restored) stay above those an
    earlier one left in the log files, and recovery never takes a new event for an old one.
    (At fewer than a million events a second, numbers never catch up with the clock.)
    """
    conn.execute(OUTBOX_SCHEMA)
    conn.execute(
        "INSERT INTO sqlite_sequence (name, seq) SELECT 'tracking_outbox', ?"
        " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name='tracking_outbox')",
        (int(time.time() * 1_000_000),),
    )


# --------------------------------------------------------------------------------------------
# Formatting helpers shared by writer and CLI


# Built once: json.dumps() with options builds a new encoder per call. The plain encoder is
# measurably faster than one with a `default`, which is kept for odd custom-data values.
_JSON_UTF8 = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_JSON_UTF8_ANY = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)
_JSON_ASCII_ANY = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=str)


def _dumps(obj: Any) -> str:
    """JSON text that is always valid UTF-8: readable normally, escaped if strings hold surrogates.

    Header values and file names decoded with surrogateescape carry lone surrogates, which
    cannot be encoded as UTF-8; ensure_ascii keeps them losslessly as \\udcXX escapes.
    """
    return _json_line(obj)[:-1].decode("utf-8")


def _json_line(obj: Any) -> bytes:
    """`obj` as one UTF-8 JSON line (see _dumps), newline included."""
    try:
        text = _JSON_UTF8.encode(obj)
    except TypeError:  # a value JSON does not know (custom-data): use its str()
        text = _JSON_UTF8_ANY.encode(obj)
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (_JSON_ASCII_ANY.encode(obj) + "\n").encode("ascii")


# --------------------------------------------------------------------------------------------
# Writer


class TrackingLog(RotatingLog):
    """Writes tracking events to rotating MSGTRK files: from the queue database's outbox
    (events committed with queue changes) and from a memory buffer (best-effort events)."""

    def __init__(
        self,
        settings: TrackingSettings,
        server_hostname: str,
        server_ip: str = "127.0.0.1",
    ) -> None:
        super().__init__(
            settings.path,
            prefix=PREFIX,
            log_type=LOG_TYPE,
            fields=FIELDS,
            max_age=settings.max_age,
            max_directory_size=settings.max_directory_size,
            max_file_size=settings.max_file_size,
            label="message tracking log",
            writer=settings.writer,
            writers=settings.writers,
        )
        self.settings = settings
        self.server_hostname = server_hostname
        self.server_ip = server_ip
        # The outbox side (see attach): the queue database, a reading connection of the
        # flusher's own, the highest number copied to the files, the highest known to be on
        # disk (fsynced; rows up to it may go) and the highest deleted from the outbox.
        self._store: Store | None = None
        self._reader: sqlite3.Connection | None = None
        self._copied = 0
        self._synced = 0
        self._trimmed = 0
        # After a crash, until the leftovers are copied: per UTC day (yyyymmdd), the highest
        # number already in that day's files.
        self._in_log: dict[str, int] | None = None

    @property
    def max_buffered(self) -> int:
        return MAX_BUFFERED_EVENTS  # looked up at each use, so tests can shrink it

    # -- event loop side -------------------------------------------------------------------

    def log(
        self,
        event_id: str,
        source: str,
        *,
        internal_message_id: str = "",
        message_id: str = "",
        recipients: Sequence[str] = (),
        recipient_status: Sequence[str] = (),
        total_bytes: int = 0,
        related_recipient_address: str = "",
        reference: str = "",
        subject: str = "",
        sender: str = "",
        return_path: str = "",
        connector_id: str = "",
        source_context: str = "",
        client_ip: str = "",
        client_hostname: str = "",
        server_ip: str = "",
        server_hostname: str = "",
        message_info: str = "",
        directionality: str = "",
        custom_data: dict[str, Any] | None = None,
        when: float | None = None,
        conn: sqlite3.Connection | None = None,
    ) -> None:
        """Record one event; no disk I/O of its own, so it is safe on the event loop.

        `server_ip`/`server_hostname` name the server end of the connection the event is
        about (the local socket of a RECEIVE over SMTP, the remote host of a SEND); left
        empty, they are this server's own.

        With `conn` (a queue transaction, in the database thread) the event is committed with
        that transaction and survives a crash; without it, it is buffered in memory and is
        best-effort.
        """
        if event_id not in EVENT_IDS:
            raise ValueError(f"unknown tracking event id {event_id!r}")
        if source not in SOURCES:
            raise ValueError(f"unknown tracking source {source!r}")
        if not self.settings.enabled or (self._closed and conn is None):
            return
        event = (
            time.time() if when is None else when,
            client_ip,
            client_hostname,
            source_context,
            connector_id,
            source,
            event_id,
            internal_message_id,
            message_id,
            tuple(recipients),  # copies: the caller may mutate its lists afterwards
            tuple(recipient_status),
            total_bytes,
            related_recipient_address,
            reference,
            subject if self.settings.subject_logging_enabled else "",
            sender,
            return_path,
            message_info,
            directionality,
            dict(custom_data) if custom_data else {},
            server_ip or self.server_ip,
            server_hostname or self.server_hostname,
        )
        if conn is None:
            self._append(event)
            return
        try:
            line = _json_line(self._record(event))
        except (TypeError, ValueError, OverflowError):  # never let tracking undo a queue change
            with self._lock:
                self.dropped += 1
            logger.warning("%s: unencodable %s event dropped", self.label, event_id)
            return
        # the line up to its last field: the flusher appends the sequence number
        conn.execute(
            "INSERT INTO tracking_outbox (at, line) VALUES (?, ?)", (event[0], line[:-2])
        )

    # -- the outbox (the event loop side) ---------------------------------------------------

    async def attach(self, store: Store) -> None:
        """Take committed events from `store`'s outbox from now on; first copy what a crash
        left there. Call it at start, before anything can log (the daemon does)."""
        await store.write(_create_outbox)
        await asyncio.to_thread(self._open_outbox, store.path)
        self._store = store
        await self._flush_in_thread()
        await self._trim()

    async def run_flusher(self, interval: float = 0.5) -> None:
        """Flush every `interval` seconds and trim the outbox, until cancelled; then once more."""
        try:
            while True:
                await asyncio.sleep(interval)
                await self._flush_in_thread()
                await self._trim()
        except asyncio.CancelledError:
            await self._flush_in_thread()
            await self._trim()
            raise

    async def _trim(self) -> None:
        """Delete the outbox rows that are on disk in the files (joins the next group commit)."""
        upto = self._synced
        if self._store is None or upto <= self._trimmed:
            return
        try:
            await self._store.write(
                lambda c: c.execute("DELETE FROM tracking_outbox WHERE seq<=?", (upto,))
            )
        except Exception as exc:  # the queue cannot commit now: the rows go next time
            logger.debug("%s: outbox not trimmed: %s", self.label, exc)
            return
        self._trimmed = upto

    def close(self) -> None:
        """Final flush (the outbox too); later best-effort events are ignored."""
        super().close()
        with self._flush_lock:
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    # -- worker thread side (called by RotatingLog.flush) -----------------------------------

    def _open_outbox(self, path: Path) -> None:
        """Open the flusher's connection; note what of the outbox the files already hold.

        After a crash the outbox holds rows not yet copied and rows copied but not yet
        deleted. The files of one day receive that day's events in sequence order, so the
        last numbered line of the day's newest files says which of its rows are there. Only
        this writer's family is looked at: the other writers number from outboxes of their own.
        """
        reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        reader.execute("PRAGMA query_only=1")
        reader.execute("PRAGMA busy_timeout=5000")
        days = {day_of(_iso_ms(at)) for (at,) in reader.execute("SELECT at FROM tracking_outbox")}
        self._in_log = {
            day: _highest_in_day(self.directory, day, self.writer) for day in days
        } or None
        with self._flush_lock:
            self._reader = reader

    def _flush_pending(self) -> None:
        if self._reader is not None:
            self._copy_outbox(self._reader)
        super()._flush_pending()

    def _copy_outbox(self, reader: sqlite3.Connection) -> None:
        """Append the committed events not yet copied, in sequence order, and fsync them.

        What is copied is never copied again in this process (`_copied`); what is fsynced
        may leave the outbox (`_synced`). A failure leaves the rest for the next flush.
        """
        while True:
            try:
                rows = reader.execute(
                    "SELECT seq, at, line FROM tracking_outbox WHERE seq>? ORDER BY seq LIMIT ?",
                    (self._copied, OUTBOX_BATCH),
                ).fetchall()
            except sqlite3.Error as exc:
                self._note(exc)
                return
            if not rows:
                break
            entries: list[Entry] = [
                (at, _OUTBOX, seq, bytes(line))
                for seq, at, line in rows
                if not self._already_in_log(seq, at)
            ]
            if entries:
                lines = self._serialize(entries)
                failpoint("tracking_before_write")
                self._sync_failed = False
                try:
                    self._start()
                    written = self._write(lines, sync=True)
                except OSError as exc:
                    self._note(exc)
                    written = 0
                if written:
                    self._copied = lines[written - 1][0][2]
                if written < len(lines) or self._sync_failed:
                    return
                failpoint("tracking_after_write")
            self._copied = rows[-1][0]
            if len(rows) < OUTBOX_BATCH:
                break
        self._in_log = None  # whatever a crash left behind is in the files now
        self._synced = self._copied

    def _already_in_log(self, seq: int, at: float) -> bool:
        return self._in_log is not None and seq <= self._in_log.get(day_of(_iso_ms(at)), 0)

    def _encode(self, event: _Event) -> tuple[str, bytes]:
        if event[1] is _OUTBOX:
            at, _, seq, line = event
            return day_of(_iso_ms(at)), b"%s,%s%d}\n" % (line, _SEQUENCE_KEY, seq)
        record = self._record(event)
        record["sequence-number"] = None
        return day_of(record["date-time"]), _json_line(record)

    def _record(self, event: _Event) -> dict[str, Any]:
        """The Exchange fields of an event (all but the sequence number), in their order."""
        (ts, client_ip, client_hostname, source_context, connector_id, source, event_id,
         internal_message_id, message_id, recipients, recipient_status, total_bytes,
         related, reference, subject, sender, return_path, message_info, directionality,
         custom_data, server_ip, server_hostname) = event  # fmt: skip
        stamp = _iso_ms(ts)
        record = {
            "date-time": stamp,
            "client-ip": client_ip,
            "client-hostname": client_hostname,
            "server-ip": server_ip,
            "server-hostname": server_hostname,
            "source-context": source_context,
            "connector-id": connector_id,
            "source": source,
            "event-id": event_id,
            "internal-message-id": internal_message_id,
            "message-id": message_id,
            "recipient-address": list(recipients),
            "recipient-status": list(recipient_status),
            "total-bytes": total_bytes,
            "recipient-count": len(recipients),
            "related-recipient-address": related,
            "reference": reference,
            "message-subject": subject,
            "sender-address": sender,
            "return-path": return_path,
            "message-info": message_info,
            "directionality": directionality,
            "custom-data": custom_data,
        }
        return record


def _highest_in_day(directory: Path, day: str, writer: str = "") -> int:
    """The highest sequence number in `writer`'s files of UTC `day` (yyyymmdd); 0 when none.

    A day's files are appended to in sequence order, newest number last, so the answer is the
    last numbered line of the newest file that has one.
    """
    files = [
        f for f in list_files(directory, PREFIX, writer) if f.day.strftime("%Y%m%d") == day
    ]
    for f in sorted(files, key=lambda f: f.n, reverse=True):
        found = _last_sequence(f.path)
        if found:
            return found
    return 0


def _last_sequence(path: Path) -> int:
    """The sequence number of the last numbered line of a file, read backwards; 0 when none.

    A torn last line (a crash in the middle of a write) is not valid JSON and is passed over.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    with open(fd, "rb") as fh:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return 0
            pos = os.fstat(fd).st_size
            head = b""  # the start of the file's next line, whose beginning is further back
            while pos > 0:
                step = min(_TAIL_CHUNK, pos)
                pos -= step
                fh.seek(pos)
                pieces = (fh.read(step) + head).split(b"\n")
                head = pieces[0] if pos > 0 else b""
                complete = pieces[1:] if pos > 0 else pieces
                for raw in reversed(complete):
                    found = _sequence_of(raw)
                    if found:
                        return found
                if len(head) > MAX_LINE_BYTES:  # a monster line: not one of ours
                    head = b""
        except OSError:
            return 0
    return 0


def _sequence_of(raw: bytes) -> int:
    if _SEQUENCE_KEY not in raw:  # cheap test first: most old lines have no number
        return 0
    try:
        event = json.loads(raw)
    except ValueError:
        return 0
    value = event.get("sequence-number") if isinstance(event, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --------------------------------------------------------------------------------------------
# Searcher (Get-MessageTrackingLog)


def search(
    path: Path,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    event_id: str | None = None,
    message_id: str | None = None,
    internal_message_id: str | None = None,
    message_subject: str | None = None,
    recipients: Sequence[str] = (),
    sender: str | None = None,
    reference: str | None = None,
    server: str | None = None,
    source: str | None = None,
    result_size: int | None = 1000,
) -> list[dict[str, Any]]:
    """Get-MessageTrackingLog: matching events in time order, at most `result_size` of them.

    Every writer's files in `path` are read (the workers' families), merged in time order.
    `end` is exclusive; naive datetimes are taken as UTC. Text filters are case-insensitive
    except the Message-Ids, which compare exactly (angle brackets optional).
    """
    if result_size is not None and result_size <= 0:
        return []
    start_utc = _as_utc(start)
    end_utc = _as_utc(end)
    match = _Matcher(
        event_id=event_id,
        message_id=message_id,
        internal_message_id=internal_message_id,
        message_subject=message_subject,
        recipients=recipients,
        sender=sender,
        reference=reference,
        server=server,
        source=source,
    )
    results: list[dict[str, Any]] = []
    for day_files in _files_by_day(path, start_utc, end_utc):
        found: list[tuple[datetime, dict[str, Any]]] = []
        for f in day_files:
            for when, event in _read_events(f.path):
                if start_utc is not None and when < start_utc:
                    continue
                if end_utc is not None and when >= end_utc:
                    continue
                if match(event):
                    found.append((when, event))
        # Within a day each writer's files and lines are in append order: a stable sort by
        # time merges the writers' families (and puts an out-of-order `when` in its place).
        found.sort(key=lambda item: item[0])
        results.extend(event for _, event in found)
        if result_size is not None and len(results) >= result_size:
            return results[:result_size]
    return results


def _as_utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _files_by_day(
    path: Path, start: datetime | None, end: datetime | None
) -> Iterator[list[LogFile]]:
    """Files of every writer grouped per UTC day, oldest day first, skipping days outside
    [start, end)."""
    by_day: dict[date, list[LogFile]] = {}
    for f in list_files(path, PREFIX, writer=None):
        day_start = datetime(f.day.year, f.day.month, f.day.day, tzinfo=UTC)
        if start is not None and day_start + timedelta(days=1) <= start:
            continue
        if end is not None and day_start >= end:
            continue
        by_day.setdefault(f.day, []).append(f)
    for day in sorted(by_day):
        yield by_day[day]


def _read_events(path: Path) -> Iterator[tuple[datetime, dict[str, Any]]]:
    """(time, event) for each well-formed line; headers and malformed lines are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    with open(fd, "rb") as fh:
        try:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return  # a FIFO or device named like a log file: never block on it
            for raw in _bounded_lines(fh):
                if raw.startswith(b"#") or not raw.strip():
                    continue
                parsed = _parse_line(raw)
                if parsed is not None:
                    yield parsed
        except OSError:
            return  # an unreadable file is skipped like a malformed line


def _bounded_lines(fh: Any) -> Iterator[bytes]:
    """Lines of a binary file; over-long lines are skipped whole instead of filling memory."""
    while True:
        raw = fh.readline(MAX_LINE_BYTES)
        if not raw:
            return
        if len(raw) == MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while True:  # discard the rest of the monster line
                rest = fh.readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            continue
        yield raw


def _parse_line(raw: bytes) -> tuple[datetime, dict[str, Any]] | None:
    try:
        event = json.loads(raw.decode("utf-8", errors="replace"))
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    stamp = event.get("date-time")
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when, event


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _msgid(value: Any) -> str:
    """A Message-Id without surrounding whitespace and angle brackets."""
    text = _text(value).strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


class _Matcher:
    """The non-time filters of Get-MessageTrackingLog, prepared once per search."""

    def __init__(
        self,
        *,
        event_id: str | None,
        message_id: str | None,
        internal_message_id: str | None,
        message_subject: str | None,
        recipients: Sequence[str],
        sender: str | None,
        reference: str | None,
        server: str | None,
        source: str | None,
    ) -> None:
        self.event_id = event_id.casefold() if event_id else None
        self.message_id = _msgid(message_id) if message_id else None
        self.internal = str(internal_message_id) if internal_message_id else None
        self.subject = message_subject.casefold() if message_subject else None
        self.recipients = frozenset(r.casefold() for r in recipients)
        self.sender = sender.casefold() if sender else None
        self.reference = _msgid(reference) if reference else None
        self.server = server.casefold() if server else None
        self.source = source.casefold() if source else None

    def __call__(self, ev: dict[str, Any]) -> bool:
        return (
            self._eq("event-id", self.event_id, ev)
            and self._eq("source", self.source, ev)
            and self._eq("sender-address", self.sender, ev)
            and (self.message_id is None or _msgid(ev.get("message-id")) == self.message_id)
            and (self.reference is None or _msgid(ev.get("reference")) == self.reference)
            and (self.internal is None or _str_id(ev.get("internal-message-id")) == self.internal)
            and self._subject_ok(ev)
            and self._server_ok(ev)
            and self._recipients_ok(ev)
        )

    def _subject_ok(self, ev: dict[str, Any]) -> bool:
        if self.subject is None:
            return True
        return self.subject in _text(ev.get("message-subject")).casefold()

    @staticmethod
    def _eq(key: str, wanted: str | None, ev: dict[str, Any]) -> bool:
        return wanted is None or _text(ev.get(key)).casefold() == wanted

    def _server_ok(self, ev: dict[str, Any]) -> bool:
        if self.server is None:
            return True
        names = (_text(ev.get("server-hostname")), _text(ev.get("server-ip")))
        return any(n.casefold() == self.server for n in names)

    def _recipients_ok(self, ev: dict[str, Any]) -> bool:
        if not self.recipients:
            return True
        listed = ev.get("recipient-address")
        if not isinstance(listed, list):
            return False
        return any(isinstance(r, str) and r.casefold() in self.recipients for r in listed)


def _str_id(value: Any) -> str:
    """Internal message ids are written as given (str or int); compare them as text."""
    if isinstance(value, bool):
        return ""
    if isinstance(value, str | int):
        return str(value)
    return ""


# --------------------------------------------------------------------------------------------
# CLI output (Format-Table / Format-List / JSON)

# Exchange's property names for the fields, as Format-List shows them.
_PROPERTY_NAMES: tuple[tuple[str, str], ...] = (
    ("Timestamp", "date-time"), ("ClientIp", "client-ip"),
    ("ClientHostname", "client-hostname"), ("ServerIp", "server-ip"),
    ("ServerHostname", "server-hostname"), ("SourceContext", "source-context"),
    ("ConnectorId", "connector-id"), ("Source", "source"), ("EventId", "event-id"),
    ("InternalMessageId", "internal-message-id"), ("MessageId", "message-id"),
    ("Recipients", "recipient-address"), ("RecipientStatus", "recipient-status"),
    ("TotalBytes", "total-bytes"), ("RecipientCount", "recipient-count"),
    ("RelatedRecipientAddress", "related-recipient-address"), ("Reference", "reference"),
    ("MessageSubject", "message-subject"), ("Sender", "sender-address"),
    ("ReturnPath", "return-path"), ("MessageInfo", "message-info"),
    ("Directionality", "directionality"), ("CustomData", "custom-data"),
    ("SequenceNumber", "sequence-number"),
)  # fmt: skip

_TABLE_COLUMNS = (
    "Timestamp",
    "EventId",
    "Source",
    "Sender",
    "Recipients",
    "MessageSubject",
)
_TABLE_CELL_MAX = 40
_FIELD_OF = dict(_PROPERTY_NAMES)


def _display(value: Any) -> str:
    from hubport.core.cmdlet_output import display

    return display(value)


def format_events(events: list[dict[str, Any]], fmt: str = "table") -> str:
    """Render search() results for a terminal: 'table', 'list' or 'json' (one per line)."""
    if fmt == "json":
        return "".join(_dumps(ev) + "\n" for ev in events)
    if fmt == "list":
        return "\n".join(_format_list_entry(ev) for ev in events)
    if fmt == "table":
        return _format_table(events)
    raise ValueError(f"unknown format {fmt!r}: use table, list or json")


def event_properties(ev: dict[str, Any]) -> dict[str, Any]:
    """One event under Exchange's property names, for the stages after
    Get-MessageTrackingLog (``| Select-Object Timestamp,EventId``)."""
    return {name: ev.get(key) for name, key in _PROPERTY_NAMES}


def _format_list_entry(ev: dict[str, Any]) -> str:
    width = max(len(name) for name, _ in _PROPERTY_NAMES)
    rows = [f"{name.ljust(width)} : {_display(ev.get(key))}" for name, key in _PROPERTY_NAMES]
    return "\n".join(rows) + "\n"


def _format_table(events: list[dict[str, Any]]) -> str:
    rows = [[_cell(_display(ev.get(_FIELD_OF[col]))) for col in _TABLE_COLUMNS] for ev in events]
    widths = [len(col) for col in _TABLE_COLUMNS]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        _table_line(list(_TABLE_COLUMNS), widths),
        _table_line(["-" * len(col) for col in _TABLE_COLUMNS], widths),
    ]
    lines.extend(_table_line(row, widths) for row in rows)
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    if len(text) <= _TABLE_CELL_MAX:
        return text
    return text[: _TABLE_CELL_MAX - 3] + "..."


def _table_line(cells: list[str], widths: list[int]) -> str:
    return " ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


#: Get-MessageTrackingLog's filters as the control operation takes them (JSON strings)
SEARCH_FILTERS = ("event_id", "message_id", "internal_message_id", "message_subject",
                  "sender", "reference", "source")


async def search_request(path: Path, start: str | None = None, end: str | None = None,
                         recipients: Sequence[str] = (), result_size: int | None = 1000,
                         **filters: str | None) -> list[dict[str, Any]]:
    """The control operation ``get-messagetrackinglog`` (a management endpoint's answer
    for an administrator elsewhere): ``search`` in a thread, times as ISO 8601 text."""
    unknown = set(filters) - set(SEARCH_FILTERS)
    if unknown:
        raise TypeError(f"unknown filters {', '.join(sorted(unknown))}")
    try:
        begin = datetime.fromisoformat(start) if start else None
        until = datetime.fromisoformat(end) if end else None
    except ValueError as exc:
        raise TypeError(f"start and end are ISO 8601 times ({exc})") from None
    return await asyncio.to_thread(
        search, path, start=begin, end=until, recipients=list(recipients),
        result_size=result_size, **filters)
