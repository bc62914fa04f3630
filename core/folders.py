"""The Pickup and Replay directories: watched folders that submit ``.eml`` files.

Folder claim, exactly once (docs/exchange.md, "Pickup and Replay formats"): a ready file is
renamed into ``.work/`` (same filesystem, atomic; the watcher ignores it), parsed, and
committed together with its claim name; only after the commit is the claimed file deleted.
On start, a claimed file whose name the queue knows is deleted, one it does not know is
ingested again. No file is ingested twice; none is lost.

watchdog events are only a hint to look now (events get lost: inotify queues overflow): the folder
is rescanned at start, every ``FolderRescanInterval`` and whenever the observer dies. A file
is taken when a close-after-write or rename-in event announced it, or when no process holds
it open for writing (a Linux read lease) and its mtime has been quiet for
``FolderSettleTime``. Bad files are renamed ``<name>.bad`` with a ``<name>.bad.reason``
file beside them; a file we cannot read is left in place and retried.

Memory is bounded: a file over the organization's size limit is never read past its header
(``size_limit``), others are read in chunks, and a batch holds at most ``BATCH_BYTES`` of
message data (a file that would not fit waits for the next batch). A file over
``body.SPOOL_THRESHOLD`` is not held at all: its header section is read and parsed as any
file's, its rest copied (as CRLF) into a file of the queue's spool folder, and the commit
that names that file hands it to the queue (``_take_spooled``); a message not committed
has its spool file removed here (``_ingest``), a crash leaves it to the queue's sweep at
start.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import itertools
import os
import re
import stat
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

try:  # Linux: the inotify reader under watchdog's Observer, used with a narrow event mask
    from watchdog.observers.inotify_c import CallbackId, InotifyConstants, InotifyFD, Mask
except ImportError:  # pragma: no cover - other platforms use the generic Observer
    InotifyFD = None  # type: ignore[assignment,misc]

from hubport.core import body as body_module
from hubport.core import queue as q
from hubport.core.body import MessageBody, SpoolWriter, discard_spool, spool_folder
from hubport.core.failpoints import failpoint
from hubport.core.folder_formats import (
    ContentRejected,
    LineEndings,
    display_name,
    notice_envelope,
    parse_pickup,
    parse_replay,
    repair_header_section,
)
from hubport.core.headers import (
    CRLF,
    HEADER_SCAN,
    MessageFormatError,
    canonicalize_line_endings,
    message_id_of,
    parse_header_section,
    subject_of,
)
from hubport.core.model import Envelope, SmtpResponse, Submission
from hubport.core.store import StoreError

if TYPE_CHECKING:
    from hubport.core.backpressure import BackPressure
    from hubport.core.config import TransportServer
    from hubport.core.pipeline import Pipeline

log = structlog.get_logger("hubport.folders")

WORK = b".work"
EML = b".eml"
MAX_FILE_SIZE = 2 * 1024 * 1024 * 1024  # Exchange's 2 GB ceiling; the org limit is checked too
BATCH = 500
#: message bytes one batch may hold in memory (a single file over it is taken alone)
BATCH_BYTES = 32 * 1024 * 1024
#: what is read of a file over the size limit: its header, for the NDR (the body never is)
HEAD_LIMIT = 1024 * 1024
READ_CHUNK = 1024 * 1024
BACKOFF_AFTER_STORE_ERROR = 5.0
PAUSE_POLL = 1.0  # seconds between looks at the back-pressure level while paused
MAX_BAD_STEM = 200  # + datetime, counter, ".bad.reason.tmp" and a dot stays under 255 bytes
_claims = itertools.count()


@dataclass(slots=True)
class Claimed:
    """A file renamed into ``.work``: its claim key, original name and content.

    ``oversize`` is the file's size when it is over the size limit: ``data`` then holds
    only its first ``HEAD_LIMIT`` bytes, enough to find whom to send the NDR.

    ``spool`` is the rest of a file over ``SPOOL_THRESHOLD``, after its header section, in
    a spool file: ``data`` then holds only that header section (as CRLF), ``stored`` the
    same rewritten, and ``rest_is_8bit`` whether the rest has 8-bit octets. The spool file
    is ours until the commit that names it (``_submit`` then sets ``spool`` to None).
    """

    key: str
    work_name: bytes
    original: bytes
    data: bytes | None = None
    envelope: Envelope | None = None
    stored: bytes | None = None
    error: MessageFormatError | None = None
    oversize: int | None = None
    repairs: list[str] | None = None
    spool: MessageBody | None = None
    rest_is_8bit: bool = False


class _Later:
    """``_claim_one``'s answer for a file left for the next batch (its bytes would not fit)."""


LATER = _Later()


class PickupDirectory:
    """One watched folder; ``kind`` is ``Pickup`` or ``Replay`` (their formats differ)."""

    kind = "Pickup"
    source = "PICKUP"
    letter = "P"
    replay = False  # the file format (folder_formats)

    def __init__(self, path: Path, pipeline: Pipeline,
                 pressure: BackPressure | None = None) -> None:
        self.path = path
        self.bpath = os.fsencode(path)
        self.work = self.bpath + b"/" + WORK
        self.pipeline = pipeline
        #: back pressure (core/backpressure.py): at Medium or High the folder takes nothing
        self.pressure = pressure
        self._was_paused = False
        self._wake = asyncio.Event()
        #: names events announced: True when complete (closed after writing, renamed in),
        #: False when only seen created (taken only if a lease proves no writer has it open)
        self._announced: dict[bytes, bool] = {}
        self._hints: list[tuple[bytes, str]] = []
        self._hints_lock = threading.Lock()
        self._hint_pending = False
        self._observer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._finishing: asyncio.Task[None] | None = None
        self._next_scan = 0.0
        self._rate: deque[float] = deque()
        self._warned: dict[bytes, float] = {}
        self.ingested = 0
        self.bad = 0

    @property
    def key_prefix(self) -> str:
        """Claim keys name the folder and the server: several hubs may share one folder
        (each file still goes to exactly one of them: the claim is an atomic rename), and
        each recovers only its own claims at start. The workers of one server are claimants
        of their own (``PHUB01.``, ``PHUB01+1.``…: ``+`` never comes out of the name, so no
        prefix starts another and each worker recovers only what it claimed)."""
        name = re.sub(r'[^A-Za-z0-9]', '_', self.pipeline.server_name)
        index = self.pipeline.worker.index
        return f"{self.letter}{name}{f'+{index}' if index else ''}."

    # -- settings from the running config (live reload applies at the next scan) ----------

    @property
    def server(self) -> TransportServer:
        return self.pipeline.server

    def _per_minute(self) -> int | None:
        """PickupDirectoryMaxMessagesPerMinute is the server's: each worker takes its share."""
        return self.pipeline.worker.share(self.server.pickup_directory_max_messages_per_minute)

    def size_limit(self) -> int:
        """The largest message a folder file may hold: the organization's MaxSendSize and
        MaxReceiveSize, the smaller of the two, and never over Exchange's 2 GB ceiling.

        Exchange has no size limit of its own for the Pickup and Replay directories; the
        organization limits apply to what they submit as to any other message. A folder
        file is both sent and received inside the organization before any recipient is
        known, so the smaller limit decides. A file over it is claimed, but only its header
        is read (``HEAD_LIMIT`` bytes): a Pickup file's sender (From/Sender) or a Replay
        file's X-Sender gets an NDR with ``552 5.3.4`` listing the recipients the header
        names, and the file is removed once that NDR is committed (Exchange's NDR path for
        a file whose limits are broken: the sender learns why, and the sender is who can
        act on it). Without a sender to notify (none, invalid, or the null sender) the file
        is moved to ``.bad`` with a reason file instead, never deleted silently.
        """
        config = self.pipeline.org.transport_config
        limits = [v for v in (config.max_send_size, config.max_receive_size) if v is not None]
        return min([MAX_FILE_SIZE, *limits])

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare)
        await self._recover()
        self._start_observer()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self.kind}-folder")

    def _prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        # one fixed name per server: a crash leaves no litter, hubs sharing the folder
        # never remove each other's probe
        probe = self.path / (f".hubport-write-test-{self.pipeline.server_name}"
                             f"{self.pipeline.worker.suffix}")
        probe.write_bytes(b"")
        probe.unlink(missing_ok=True)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._observer is not None:
            observer, self._observer = self._observer, None
            observer.stop()
            await asyncio.to_thread(observer.join, 5)
        if self._task is not None:
            await self._task
        await self._finished()

    def _start_observer(self) -> None:
        loop = asyncio.get_running_loop()
        if InotifyFD is not None:
            self._observer = _InotifyWatch(self, loop)
            return
        handler = _Handler(self, loop)
        observer = Observer()
        observer.schedule(handler, str(self.path), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def _overflowed(self) -> None:
        """The kernel dropped events: rescan at once (an inotify queue overflow)."""
        log.warning("folder events overflowed; rescanning", folder=self.kind)
        self._next_scan = 0.0
        self._wake.set()

    def _on_events(self) -> None:
        """Take the names the observer thread collected (one loop wake-up per burst)."""
        with self._hints_lock:
            hints, self._hints = self._hints, []
            self._hint_pending = False
        for name, kind in hints:
            if kind in ("moved", "closed"):
                self._announced[name] = True
            elif kind == "created":  # also how a rename from outside the folder shows up
                self._announced.setdefault(name, False)
        self._wake.set()

    def _hint(self, loop: asyncio.AbstractEventLoop, name: bytes, kind: str) -> None:
        """Called in the observer thread for every event of an ``*.eml`` name."""
        with self._hints_lock:
            self._hints.append((name, kind))
            if self._hint_pending:
                return
            self._hint_pending = True
        loop.call_soon_threadsafe(self._on_events)

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        self._next_scan = 0.0
        while not self._stopping:
            if self._observer is not None and not self._observer.is_alive():
                log.error("folder observer died; restarting it and rescanning", folder=self.kind)
                self._start_observer()
                self._next_scan = 0.0
            if self._paused():
                await self._backoff(PAUSE_POLL)
                continue
            now = time.monotonic()
            full = now >= self._next_scan
            if full:
                self._next_scan = now + self.server.folder_rescan_interval
            try:
                worked = await self._pass(full)
            except StoreError as exc:
                log.error("queue cannot commit; files stay in the folder", folder=self.kind,
                          error=str(exc))
                await self._backoff(BACKOFF_AFTER_STORE_ERROR)
                continue
            except Exception:
                log.exception("folder pass failed", folder=self.kind)
                await self._backoff(1.0)
                continue
            if worked:
                continue
            await self._sleep(max(0.0, min(self._next_scan - time.monotonic(),
                                           self._throttle_wait())))

    def _paused(self) -> bool:
        """Back pressure at Medium or High: files stay in the folder, untouched, until it
        falls (looked at every ``PAUSE_POLL`` seconds; announced names are kept)."""
        paused = self.pressure is not None and self.pressure.intake_paused
        if paused != self._was_paused:
            self._was_paused = paused
            if paused:
                assert self.pressure is not None
                log.warning("folder paused by back pressure; files stay in the folder",
                            folder=self.kind, back_pressure=self.pressure.level.title)
            else:
                log.info("folder resumed after back pressure", folder=self.kind)
                self._next_scan = 0.0  # look at everything that waited
        return paused

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _backoff(self, seconds: float) -> None:
        """Wait out a failure; only ``stop`` cuts it short. A returned file announces
        itself at once, and waking on that would retry a full disk in a hot loop."""
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            await self._sleep(left)

    def _throttle_wait(self) -> float:
        limit = self._per_minute()
        if limit is None or len(self._rate) < limit:
            return 3600.0
        return max(0.05, self._rate[0] + 60.0 - time.monotonic())

    def _allowance(self) -> int:
        limit = self._per_minute()
        if limit is None:
            return BATCH
        now = time.monotonic()
        while self._rate and self._rate[0] <= now - 60.0:
            self._rate.popleft()
        return max(0, min(BATCH, limit - len(self._rate)))

    async def _pass(self, full: bool) -> bool:
        """One round: find ready files, claim, parse, submit. True when it did work."""
        allowance = self._allowance()
        if allowance == 0:
            return False
        announced, self._announced = self._announced, {}
        settle = self.server.folder_settle_time
        names, fresh = await asyncio.to_thread(self._ready_names, set(announced), full, settle,
                                               allowance)
        if fresh:  # look again once those files have settled
            self._next_scan = min(self._next_scan, time.monotonic() + settle)
        taken = set(names)
        for name, sure in announced.items():  # the rest wait for the next pass
            if name not in taken:
                self._announced[name] = sure or self._announced.get(name, False)
        if full and len(names) >= allowance:
            self._next_scan = 0.0  # the scan stopped at the batch size: more files wait
        if not names:
            return False
        unsure = {n for n in names if announced.get(n) is False}
        claimed, later = await asyncio.to_thread(self._claim_and_read, names, unsure)
        for name in later:  # over the batch's byte budget: the very next pass takes them
            self._announced[name] = announced.get(name) is not False
        if claimed:
            await self._ingest(claimed)
        return bool(claimed)

    # -- finding and claiming (in a worker thread) ----------------------------------------

    def _ready_names(self, announced: set[bytes], full: bool, settle: float,
                     limit: int) -> tuple[list[bytes], bool]:
        """Announced names, plus (on a full scan) every settled ``*.eml``; and whether
        some file was still too fresh to take."""
        ready = self._mine_first([n for n in announced if n.lower().endswith(EML)])
        if not full or len(ready) >= limit:
            return ready[:limit], False
        chosen = set(ready)
        fresh = False
        now = time.time()
        others: list[bytes] = []  # files another worker prefers: taken when ours run out
        with os.scandir(self.bpath) as entries:
            for entry in entries:
                name = entry.name
                if name in chosen or not name.lower().endswith(EML) or name.startswith(b"."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue  # a directory named *.eml is skipped (docs/reliability.md case 71)
                if stat.S_ISREG(st.st_mode) and now - max(st.st_mtime, st.st_ctime) < settle:
                    fresh = True
                    continue
                chosen.add(name)
                (ready if self._is_mine(name) else others).append(name)
                # enough of ours, or enough in all that more would only be stat calls
                if len(ready) >= limit or \
                        len(ready) + len(others) >= limit * (self.pipeline.worker.count + 1):
                    break
        return (ready + others)[:limit], fresh

    def _is_mine(self, name: bytes) -> bool:
        """Several workers watch one folder: each first takes the files whose name hashes to
        it, so they do not all race for the same files (the claim rename decides anyway)."""
        worker = self.pipeline.worker
        return worker.count == 1 or zlib.crc32(name) % worker.count == worker.index

    def _mine_first(self, names: list[bytes]) -> list[bytes]:
        return [n for n in names if self._is_mine(n)] + [n for n in names
                                                        if not self._is_mine(n)]

    def _claim_and_read(self, names: list[bytes],
                        unsure: set[bytes]) -> tuple[list[Claimed], list[bytes]]:
        """Claim and read files until the batch holds ``BATCH_BYTES``; also returns the
        names left for the next batch."""
        limit = self.size_limit()
        spool = self._spool_folder()
        dirfd = os.open(self.bpath, os.O_RDONLY | os.O_DIRECTORY)
        claimed: list[Claimed] = []
        later: list[bytes] = []
        held = 0
        try:
            for name in names:
                budget = BATCH_BYTES - held if claimed else None
                c = self._claim_one(dirfd, name, name in unsure, limit, budget, spool)
                if c is LATER:
                    later.append(name)
                elif isinstance(c, Claimed):
                    claimed.append(c)
                    held += len(c.data or b"")
            return claimed, later
        finally:
            os.close(dirfd)

    def _claim_one(self, dirfd: int, name: bytes, need_proof: bool = False,
                   limit: int = MAX_FILE_SIZE, budget: int | None = None,
                   spool: Path | None = None) -> Claimed | _Later | None:
        """Claim one file; ``need_proof``: only seen created, so a lease must show that no
        writer still has it open (else the settle-time rescan decides). A file that would
        take more than ``budget`` bytes in memory is left alone (``LATER``). ``spool``: the
        folder a large file's body is copied to (``_take``)."""
        key = f"{self.key_prefix}{time.time_ns():x}-{next(_claims)}"
        work_name = _work_name(key, name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dirfd)
        except FileNotFoundError:
            return None  # taken by someone else, or removed
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._quarantine_in_place(dirfd, name, "symlink: never followed, target untouched")
                return None
            if not _is_regular(dirfd, name):  # a socket cannot be opened (ENXIO)
                self._quarantine_in_place(dirfd, name, "not a regular file")
                return None
            self._warn_unreadable(name, exc)
            return None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return None  # a directory named *.eml is skipped (docs/reliability.md case 71)
            if not stat.S_ISREG(st.st_mode):
                self._quarantine_in_place(dirfd, name, "not a regular file")
                return None
            if st.st_nlink > 1:
                self._quarantine_in_place(
                    dirfd, name, "hard link: refused (another name points at this file)")
                return None
            if budget is not None and _in_memory(st.st_size, limit) > budget:
                return LATER
            writer = _writer_gone(fd)
            if writer is False or (writer is None and need_proof):
                return None  # still open for writing (or cannot tell yet): a later pass
            try:
                os.rename(name, work_name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except FileNotFoundError:
                return None
            try:
                return _take(fd, st.st_size, limit, Claimed(key, work_name, name), spool)
            except OSError:
                self._unclaim(dirfd, work_name, name)
                raise
        except OSError as exc:
            self._warn_unreadable(name, exc)
            return None
        finally:
            _release_lease(fd)
            os.close(fd)

    def _unclaim(self, dirfd: int, work_name: bytes, name: bytes) -> None:
        """A claimed file that could not be read goes back under its name (retried later)."""
        try:
            os.rename(work_name, _free_name(dirfd, name), src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as exc:
            log.error("cannot return a claimed file; it stays in .work and is retried at the"
                      " next start", file=display_name(work_name), error=exc.strerror)

    def _warn_unreadable(self, name: bytes, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._warned.get(name, -1e9) > 300:
            self._warned[name] = now
            log.warning("cannot read file; left in place and retried", folder=self.kind,
                        file=display_name(name), error=exc.strerror)

    def _quarantine_in_place(self, dirfd: int, name: bytes, reason: str) -> None:
        """Rename the entry itself (never its target) to ``.bad`` with a reason file."""
        bad = _bad_name(dirfd, name)
        try:
            _write_reason(dirfd, bad, reason)
            os.rename(name, bad, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as exc:
            self._warn_unreadable(name, exc)
            return
        self.bad += 1
        log.warning("bad file moved aside", folder=self.kind, file=display_name(name),
                    bad=display_name(bad), reason=reason)
        self.pipeline.tracking.log("BADMAIL", self.source, custom_data={
            "file": display_name(name), "reason": reason}, connector_id=self.kind)

    def _spool_folder(self) -> Path:
        """Where a large file's body goes: the queue's own spool folder, so that the commit
        naming the file hands it to the queue (core/body.py)."""
        return spool_folder(self.pipeline.store.path)

    # -- parsing and submitting --------------------------------------------------------

    def _parse(self, data: bytes, repairs: list[str],
               rest_is_8bit: bool = False) -> tuple[Envelope, bytes]:
        server = self.server
        return parse_pickup(
            data, default_domain=self.pipeline.org.default_domain.domain_name,
            server_name=server.fqdn, max_header_size=server.pickup_directory_max_header_size,
            max_recipients=server.pickup_directory_max_recipients_per_message, repairs=repairs,
            rest_is_8bit=rest_is_8bit)

    def _parse_all(self, claimed: list[Claimed]) -> None:
        limit = self.size_limit()
        for c in claimed:
            if c.error is not None:  # refused while it was read (a large file's NUL, bare CR)
                continue
            data = c.data or b""
            try:
                assert c.data is not None
                if c.oversize is not None:
                    self._refuse_oversize(c, c.oversize, limit, data)
                    continue
                c.repairs = []
                c.envelope, c.stored = self._parse(data, c.repairs, c.rest_is_8bit)
                if c.spool is not None and CRLF + CRLF not in c.stored:
                    # a large file's header section went on past what was read of it
                    raise MessageFormatError(f"header section exceeds {HEADER_SCAN} bytes")
                size = len(c.stored) + (c.spool.size if c.spool is not None else 0)
                if size > limit:  # the file fitted; as CRLF with our fields not
                    self._refuse_oversize(c, size, limit, c.stored, c.envelope)
            except ContentRejected as exc:
                c.error = exc
                c.envelope, c.stored = self._rejected(data)
            except MessageFormatError as exc:
                c.error = exc
            except Exception as exc:  # a parser bug must not lose the file
                c.error = MessageFormatError(f"cannot parse: {type(exc).__name__}")
            finally:
                c.data = None

    def _refuse_oversize(self, c: Claimed, size: int, limit: int, head: bytes,
                         envelope: Envelope | None = None) -> None:
        """Over the size limit: an NDR (returning the header only) to the file's sender, or
        ``.bad`` when there is none to notify (see ``size_limit``). ``head`` is the file's
        start, or the parsed message when ``envelope`` is known."""
        reason = (f"message size {size} exceeds the organization's limit of {limit} bytes "
                  "(MaxSendSize, MaxReceiveSize)")
        c.envelope = None
        c.stored = None
        if c.spool is not None:  # the NDR returns the header only: the body is not needed
            discard_spool(c.spool)
            c.spool = None
        try:
            if envelope is None:
                envelope, header = notice_envelope(head, replay=self.replay)
            elif not envelope.mail_from.address:
                raise MessageFormatError("the null sender cannot be notified")
            else:
                header = head[: parse_header_section(head).body_offset]
        except MessageFormatError as exc:
            c.error = MessageFormatError(f"{reason}; no sender to notify: {exc.reason}")
            return
        c.error = ContentRejected(reason, sender=envelope.mail_from.address, enhanced="5.3.4",
                                  code=552)
        envelope.mail_from.ret = "HDRS"  # the NDR says it returns the header only, as it does
        c.envelope, c.stored = envelope, header

    def _rejected(self, data: bytes) -> tuple[Envelope | None, bytes | None]:
        """The envelope and the whole message for the NDR of a file over a Pickup limit."""
        try:
            envelope, _ = notice_envelope(data, replay=self.replay, truncated=False)
            message, _ = repair_header_section(canonicalize_line_endings(data),
                                               replay=self.replay)
        except MessageFormatError:
            return None, None
        return envelope, message

    async def _ingest(self, claimed: list[Claimed]) -> None:
        try:
            await asyncio.to_thread(self._parse_all, claimed)
            failpoint("after_claim_before_commit")
            results = await asyncio.gather(*(self._submit(c) for c in claimed),
                                           return_exceptions=True)
        except Exception:
            # nothing was committed (gather returns its errors): the spool files are ours. A
            # cancellation (at stop) may come after a commit: the start-up sweep decides then
            _discard_all([c.spool for c in claimed if c.spool is not None])
            raise
        done: list[Claimed] = []
        back: list[Claimed] = []
        bad: list[tuple[Claimed, str]] = []
        store_error: BaseException | None = None
        for c, outcome in zip(claimed, results):
            if outcome is True:
                done.append(c)
            elif isinstance(outcome, str):
                bad.append((c, outcome))
            else:
                back.append(c)
                if isinstance(outcome, BaseException):
                    store_error = outcome
            c.envelope = c.stored = None  # committed or not, the bytes are not needed now
        # a spool file no commit named (refused, bounced, bad, given back) is still ours
        uncommitted = [c.spool for c in claimed if c.spool is not None]
        for c in claimed:
            c.spool = None
        if uncommitted:
            await asyncio.to_thread(_discard_all, uncommitted)
        # the rate limit counts files taken (submitted or moved aside), not ones given back
        self._rate.extend([time.monotonic()] * (len(done) + len(bad)))
        if done:
            failpoint("after_commit_before_unlink")
        # the unlinks (slow in a churned folder) overlap the next batch's claim and commit;
        # at most one batch is finishing at a time
        await self._finished()
        self._finishing = asyncio.get_running_loop().create_task(
            self._finish_batch(done, back, bad))
        if back:
            await self._finished()
        if store_error is not None:  # the caller backs off before the next try
            raise store_error

    async def _submit(self, c: Claimed) -> bool | str:
        """True when committed (file may go); a string is the reason it is bad."""
        if c.error is not None:
            if isinstance(c.error, ContentRejected) and c.envelope is not None and c.stored:
                response = SmtpResponse(c.error.code, c.error.enhanced, c.error.reason)
                await self.pipeline.bounce(self._submission(c, c.envelope, c.stored), response)
                return True
            return c.error.reason
        assert c.envelope is not None and c.stored is not None
        sub = self._submission(c, c.envelope, c.stored)
        refused = (await self.pipeline.submit(sub)).response
        if refused is None:
            c.spool = None  # committed: the queue owns the spool file now
            return True
        if refused.code >= 500 and sub.envelope.mail_from.address:
            await self.pipeline.bounce(sub, refused)
            return True
        if refused.code >= 500:
            return f"rejected by a receive agent: {refused}"
        return False  # deferred by an agent: back to the folder, retried later

    def _submission(self, c: Claimed, envelope: Envelope, data: bytes) -> Submission:
        """The message of ``c``: ``data``, then the spool file of a large one (``data`` is
        then its header section, which is all the parse below needs)."""
        body = MessageBody.of(data) if c.spool is None else c.spool.replace_prefix(0, data)
        try:
            parsed = parse_header_section(data)
            message_id, subject = message_id_of(parsed), subject_of(parsed)
        except MessageFormatError:
            message_id, subject = "", ""
        context = f"file={display_name(c.original)}"  # last: a name may hold anything
        if c.repairs:
            context = f"repaired={'; '.join(c.repairs)}; {context}"
        return Submission(envelope=envelope, body=body, source=self.source,
                          source_name=self.kind, message_id=message_id, subject=subject,
                          client_ip="127.0.0.1", client_hostname="localhost", claim=c.key,
                          context=context)

    async def _finish_batch(self, done: list[Claimed], back: list[Claimed],
                            bad: list[tuple[Claimed, str]]) -> None:
        """Remove committed files, return the others; never raises (a claim row left
        behind is harmless: recovery at the next start finds no file for it)."""
        try:
            await asyncio.to_thread(self._finish, done, back, bad)
            if done:
                self.ingested += len(done)
                keys = [c.key for c in done]
                await self.pipeline.store.write(lambda conn: q.forget_claims(conn, keys))
        except Exception:
            log.exception("finishing a folder batch failed", folder=self.kind)

    async def _finished(self) -> None:
        """Wait for the batch still being finished (its files removed or returned)."""
        task, self._finishing = self._finishing, None
        if task is not None:
            await task

    def _finish(self, done: list[Claimed], back: list[Claimed],
                bad: list[tuple[Claimed, str]]) -> None:
        dirfd = os.open(self.bpath, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for c in done:
                try:
                    os.unlink(c.work_name, dir_fd=dirfd)
                except FileNotFoundError:
                    pass
            for c in back:  # not committed: the file returns under its own name
                try:
                    os.rename(c.work_name, _free_name(dirfd, c.original), src_dir_fd=dirfd,
                              dst_dir_fd=dirfd)
                except OSError as exc:
                    log.error("cannot return a claimed file; it stays in .work and is retried"
                              " at the next start", file=display_name(c.work_name),
                              error=exc.strerror)
            for c, reason in bad:
                self._move_bad(dirfd, c, reason)
        finally:
            os.close(dirfd)

    def _move_bad(self, dirfd: int, c: Claimed, reason: str) -> None:
        bad = _bad_name(dirfd, c.original)
        try:
            _write_reason(dirfd, bad, reason)
            os.rename(c.work_name, bad, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except OSError as exc:
            log.error("cannot move a bad file aside", file=display_name(c.original),
                      error=exc.strerror)
            return
        self.bad += 1
        log.warning("bad file moved aside", folder=self.kind, file=display_name(c.original),
                    bad=display_name(bad), reason=reason)
        self.pipeline.tracking.log("BADMAIL", self.source, connector_id=self.kind,
                                   custom_data={"file": display_name(c.original),
                                                "reason": reason})

    # -- recovery ------------------------------------------------------------------------

    async def _recover(self) -> None:
        """Finish what a previous run left in ``.work``: delete if committed, else ingest."""
        entries = await asyncio.to_thread(_list_work, self.work)
        mine = [(key, name) for key, name in entries if key.startswith(self.key_prefix)]
        keys = [k for k, _ in mine]
        store = self.pipeline.store
        known = await store.read(lambda c: q.claims_known(c, keys))
        committed = [name for key, name in mine if key in known]
        again = [(key, name) for key, name in mine if key not in known]
        await asyncio.to_thread(_unlink_all, self.work, committed)
        prefix = self.key_prefix
        await store.write(lambda c: q.forget_other_claims(c, prefix, keys))
        if again:
            log.info("ingesting files claimed before a stop", folder=self.kind, count=len(again))
            while again:  # in batches bounded like the folder's own (files, bytes)
                claimed, again = await asyncio.to_thread(self._read_work, again)
                if claimed:
                    await self._ingest(claimed)
        if committed:
            log.info("removed files committed before a stop", folder=self.kind,
                     count=len(committed))

    def _read_work(self, entries: list[tuple[str, bytes]]
                   ) -> tuple[list[Claimed], list[tuple[str, bytes]]]:
        """Read claimed files left by a stop, up to one batch (``BATCH`` files,
        ``BATCH_BYTES``); returns them and the entries left for the next batch."""
        limit = self.size_limit()
        spool = self._spool_folder()
        out: list[Claimed] = []
        held = 0
        for index, (key, name) in enumerate(entries):
            if len(out) >= BATCH:
                return out, entries[index:]
            path = self.work + b"/" + name
            original = name.split(b"~", 1)[1] if b"~" in name else name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        raise OSError(errno.EINVAL, "not a regular file")
                    if out and held + _in_memory(st.st_size, limit) > BATCH_BYTES:
                        return out, entries[index:]
                    c = _take(fd, st.st_size, limit, Claimed(key, WORK + b"/" + name, original),
                              spool)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("cannot read a claimed file", file=display_name(path),
                          error=exc.strerror)
                continue
            out.append(c)
            held += len(c.data or b"")
        return out, []


class ReplayDirectory(PickupDirectory):
    """The Replay folder: explicit envelopes in ``X-Sender``/``X-Receiver`` lines."""

    kind = "Replay"
    source = "ADMIN"
    letter = "R"
    replay = True

    def _per_minute(self) -> int | None:
        """PickupDirectoryMaxMessagesPerMinute is the server's: each worker takes its share."""
        return self.pipeline.worker.share(self.server.pickup_directory_max_messages_per_minute)

    def _parse(self, data: bytes, repairs: list[str],
               rest_is_8bit: bool = False) -> tuple[Envelope, bytes]:
        return parse_replay(data, default_domain=self.pipeline.org.default_domain.domain_name,
                            server_name=self.server.fqdn, repairs=repairs)


class _InotifyWatch:
    """Linux: watchdog's inotify reader asked only for the events that announce a file.

    The generic Observer also receives the IN_MOVED_FROM of every claim (a rename out of
    the folder) and pairs move events in an O(n²) delay queue: in a burst of thousands of
    files that cost more CPU than the ingestion itself. Without IN_MOVED_FROM in the mask
    the kernel does not even report the claims.
    """

    MASK = (InotifyConstants.IN_CLOSE_WRITE | InotifyConstants.IN_MOVED_TO
            | InotifyConstants.IN_CREATE | InotifyConstants.IN_DELETE_SELF
            | InotifyConstants.IN_MOVE_SELF) if InotifyFD is not None else 0

    def __init__(self, folder: PickupDirectory, loop: asyncio.AbstractEventLoop) -> None:
        self.folder = folder
        self.loop = loop
        self.stopping = False
        self.reader = InotifyFD()
        self.reader.start()
        self.wd = self.reader.add_callback(folder.bpath, Mask(self.MASK), self,
                                           CallbackId(id(self)))

    def on_event(self, event: Any) -> None:
        try:
            if event.is_delete_self or event.is_move_self:
                self._rescan()
                return
            name = event.name
            if event.is_directory or not name or not name.lower().endswith(EML):
                return
            kind = ("moved" if event.is_moved_to else
                    "closed" if event.is_close_write else "created")
            self.folder._hint(self.loop, name, kind)
        except Exception:  # never let the reader thread die on one event
            pass

    def on_watch_deleted(self, wd: Any) -> None:
        self._rescan()

    def on_queue_overflow(self) -> None:
        self._rescan()

    def on_events_lost(self) -> None:
        """The reader's second overflow call (once every watch is repaired); without it the
        reader's dispatch thread dies on the AttributeError and no event arrives again."""
        self._rescan()

    def _rescan(self) -> None:
        if not self.stopping:  # our own stop removes the watch too
            self.loop.call_soon_threadsafe(self.folder._overflowed)

    def is_alive(self) -> bool:
        return self.reader.is_alive()

    def stop(self) -> None:
        self.stopping = True
        self.reader.stop()

    def join(self, timeout: float | None = None) -> None:
        self.reader.join(timeout)


class _Handler(FileSystemEventHandler):
    """Turns watchdog events into hints on the event loop; never raises in the thread."""

    def __init__(self, folder: PickupDirectory, loop: asyncio.AbstractEventLoop) -> None:
        self.folder = folder
        self.loop = loop
        self.root = folder.bpath

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            kind = event.event_type
            if event.is_directory:
                return
            path = event.dest_path if kind == "moved" else event.src_path
            raw = os.fsencode(path)
            parent, _, name = raw.rpartition(b"/")
            if parent != self.root or not name.lower().endswith(EML):
                return
            self.folder._hint(self.loop, name, kind)
        except Exception:  # a dead observer thread loses events: never let one escape
            pass


# -- small filesystem helpers ------------------------------------------------------------


def _work_name(key: str, original: bytes) -> bytes:
    prefix = WORK + b"/" + key.encode() + b"~"
    return prefix + original[: 255 - len(key) - 1]


def _list_work(work: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    try:
        names = os.listdir(work)
    except FileNotFoundError:
        return out
    for name in names:
        key, sep, _ = name.partition(b"~")
        if sep:
            out.append((key.decode("ascii", "replace"), name))
    return out


def _unlink_all(folder: bytes, names: list[bytes]) -> None:
    for name in names:
        try:
            os.unlink(folder + b"/" + name)
        except FileNotFoundError:
            pass


def _stem(name: bytes) -> bytes:
    return name[:-4] if name.lower().endswith(EML) else name


def _bad_name(dirfd: int, name: bytes) -> bytes:
    """``x.eml`` → ``x.bad``; ``x<datetime>.bad`` when that exists (Exchange's rule).

    A long stem is cut so that the reason file and its temp (``.<bad>.reason.tmp``) still
    fit in 255 bytes; else a long-named bad file could never be moved aside."""
    stem = _stem(name)[:MAX_BAD_STEM]
    candidate = stem + b".bad"
    if not _exists(dirfd, candidate):
        return candidate
    stamp = time.strftime("%Y%m%d%H%M%S").encode()
    for n in itertools.count():
        candidate = stem + stamp + (b"-%d" % n if n else b"") + b".bad"
        if not _exists(dirfd, candidate):
            return candidate
    raise AssertionError("unreachable")


def _free_name(dirfd: int, name: bytes) -> bytes:
    if not _exists(dirfd, name):
        return name
    for n in itertools.count(1):
        candidate = _stem(name) + b"-%d.eml" % n
        if not _exists(dirfd, candidate):
            return candidate
    raise AssertionError("unreachable")


def _is_regular(dirfd: int, name: bytes) -> bool:
    """True unless the entry exists and is not a regular file (links are not followed)."""
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except OSError:
        return True


def _exists(dirfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def _write_reason(dirfd: int, bad: bytes, reason: str) -> None:
    text = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {reason}\n".encode(
        "utf-8", "backslashreplace")
    tmp = b"." + bad + b".reason.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644, dir_fd=dirfd)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)
    os.rename(tmp, bad + b".reason", src_dir_fd=dirfd, dst_dir_fd=dirfd)


def _writer_gone(fd: int) -> bool | None:
    """True when no process has the file open for writing (a Linux read lease was granted),
    False while one has, None when the lease cannot tell (not our file, no lease support)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return False if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
    return True


def _release_lease(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def _in_memory(size: int, limit: int) -> int:
    """The bytes a file of ``size`` takes in memory once claimed: only the head if too big
    or large enough to be spooled (``_take``)."""
    return min(size, HEAD_LIMIT) if size > min(limit, body_module.SPOOL_THRESHOLD) else size


def _read_bounded(fd: int, most: int, expect: int) -> bytes:
    """At most ``most`` bytes from ``fd``, read in pieces of at most ``READ_CHUNK``: a file
    that grows while it is read never makes us hold more than asked for. ``expect`` (the
    size fstat gave) sizes the reads, so a small file costs no large buffer."""
    chunks = []
    left = most
    want = expect + 1  # one byte more shows a file that grew
    while left > 0:
        chunk = os.read(fd, min(READ_CHUNK, left, max(want, 4096)))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
        want -= len(chunk)
    return b"".join(chunks)


def _take(fd: int, size: int, limit: int, claimed: Claimed,
          spool: Path | None = None) -> Claimed:
    """Read a claimed file: whole when it is within ``limit``, else only its head. With a
    ``spool`` folder, a file over ``SPOOL_THRESHOLD`` (read at call time) is not held
    whole but streamed (``_take_spooled``); a small one costs exactly what it always did."""
    if size <= limit:
        whole = limit if spool is None else min(limit, body_module.SPOOL_THRESHOLD)
        data = _read_bounded(fd, whole + 1, size) if size <= whole else b""
        if size <= whole and len(data) <= whole:
            claimed.data = data
            return claimed
        if spool is not None:  # large (or it grew past the threshold after fstat)
            return _take_spooled(fd, limit, claimed, spool)
        size = max(len(data), os.fstat(fd).st_size)  # it grew after fstat
        data = data[:HEAD_LIMIT]
    else:
        data = _read_bounded(fd, HEAD_LIMIT, HEAD_LIMIT)
    claimed.data = data
    claimed.oversize = size
    return claimed


def _take_spooled(fd: int, limit: int, claimed: Claimed, folder: Path) -> Claimed:
    """Read a large file a chunk at a time: its header section (as CRLF) into ``data``, the
    rest, with the same CRLF line endings, into a new spool file in ``folder`` (``spool``).

    The parse and the repairs look only at the header section, so the message is octet for
    octet what a whole read makes of the file. The header section ends after the first
    empty line, or is cut at the last whole line within ``HEADER_SCAN`` octets
    (``_parse_all`` refuses a file whose header section goes on past that). A NUL or bare
    CR sets ``error``; a file that grew over ``limit`` is ``oversize`` as in ``_take``. The
    spool file is removed on every way out but a good ``spool``.
    """
    endings = LineEndings()
    writer = SpoolWriter(folder, threshold=0)
    head = bytearray()
    cut = -1  # where the header section ends in ``head``; -1 while not known
    read = 0
    rest_is_8bit = False
    try:
        while read <= limit:
            raw = os.pread(fd, min(body_module.CHUNK_SIZE, limit + 1 - read), read)
            if not raw:
                break
            read += len(raw)
            piece = endings.feed(raw)
            if cut < 0:
                start = max(0, len(head) - 3)  # an empty line may straddle two pieces
                head += piece
                cut = _header_end(head, start)
                if cut < 0:
                    continue
                piece = bytes(head[cut:])
                del head[cut:]
            rest_is_8bit = rest_is_8bit or not piece.isascii()
            writer.write_sync(piece)
        if read > limit:  # it grew after fstat: refused as any file over the limit
            writer.discard()
            claimed.data = os.pread(fd, HEAD_LIMIT, 0)
            claimed.oversize = max(read, os.fstat(fd).st_size)
            return claimed
        endings.end()
        rest = writer.finish_sync()
    except MessageFormatError as exc:
        writer.discard()
        claimed.error = exc
        return claimed
    except BaseException:
        writer.discard()
        raise
    claimed.data = bytes(head)
    if rest.spooled:  # else the file ended inside what was read as its header section
        claimed.spool = rest
        claimed.rest_is_8bit = rest_is_8bit
    return claimed


def _header_end(head: bytearray, start: int) -> int:
    """Where the header section ends in the CRLF start of a file: after its first empty line
    (looked for from ``start``), else once ``HEADER_SCAN`` octets are in after the last
    whole line; -1 while not known."""
    blank = head.find(CRLF + CRLF, start)
    if blank >= 0:
        return blank + 4
    if len(head) < HEADER_SCAN:
        return -1
    line = head.rfind(CRLF)
    return line + 2 if line >= 0 else len(head)


def _discard_all(bodies: list[MessageBody]) -> None:
    for body in bodies:
        discard_spool(body)


def folder_types() -> dict[str, Callable[..., PickupDirectory]]:
    return {"Pickup": PickupDirectory, "Replay": ReplayDirectory}
