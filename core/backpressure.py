"""Back pressure: refuse new mail before a resource runs out, keep delivering what is queued.

Modelled on Exchange 2010's back pressure (the TechNet article "Understanding Back Pressure").
A monitor samples, at most once per ``ResourceMonitoringInterval``, what intake depends on:

* ``DatabaseUsedSpace[<queue folder>]``: the percentage in use of the volume holding the queue
  database; its write-ahead log (``mail.que-wal``) lives in the same folder, so one volume;
* ``UsedDiskSpace[<folder>]``: the same for each volume holding the message tracking log or a
  protocol log (an event that cannot be logged is an event an administrator cannot find);
* ``PrivateBytes``: the daemon's private memory (resident anonymous memory plus swap) as a
  percentage of the physical memory it may use (the machine's, or its cgroup's limit);
* ``QueueLength[SubmissionQueue]``: messages waiting for the categorizer;
* ``QueueDatabaseCommit``: High while the last commit of the queue database failed (a full or
  failing disk), until a commit succeeds; a small probe commit is tried every few seconds
  meanwhile, since with intake stopped nothing else may write.

Each resource has Normal / Medium / High thresholds. A level rises as soon as the figure
reaches the threshold of a higher level, and falls only when the figure drops below the
threshold of the level beneath: from High to Medium below the Medium threshold, from Medium to
Normal below the Normal threshold. A figure hovering at a threshold cannot flap.

The server's level is the highest of its resources'. At Medium, MAIL FROM of a sender outside
the organization's authoritative domains is answered ``452 4.3.1`` unless the session is the
organization's own (an authenticated user, or another hub holding the ExchangeServers
permission), and the Pickup and Replay folders pause (their files stay where they are). At
High every new message is refused and the folders pause. Queued mail keeps flowing at every
level, and intake resumes by itself once the figures fall.

Sampling that can block (``statvfs`` on a hung volume, ``/proc``) runs in a thread of its
own; a sample that has not returned keeps the last figures instead of queueing another.
"""

from __future__ import annotations

import asyncio
import enum
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from hubport.core.addresses import AddressError, domain_to_ascii
from hubport.core.model import SmtpResponse
from hubport.core.store import StoreError

if TYPE_CHECKING:
    from hubport.core.config import Organization, TransportServer
    from hubport.core.store import Store

log = structlog.get_logger("hubport.backpressure")

#: the answer at MAIL FROM while a resource is under pressure (Exchange's wording)
INSUFFICIENT_RESOURCES = SmtpResponse(452, "4.3.1", "Insufficient system resources")

#: Exchange's distance between the disk thresholds, in percentage points: Medium sits this
#: far below High and Normal this far below Medium (4 below High)
DISK_STEP = 2.0
#: how often a failed queue database is probed with a small commit, in seconds
PROBE_INTERVAL = 3.0
#: level changes kept for Get-BackPressure
HISTORY = 50

DATABASE = "DatabaseUsedSpace"
LOG_DISK = "UsedDiskSpace"
PRIVATE_BYTES = "PrivateBytes"
SUBMISSION_QUEUE = "QueueLength[SubmissionQueue]"
COMMIT = "QueueDatabaseCommit"


class Level(enum.IntEnum):
    """Resource utilization, in Exchange's terms."""

    NORMAL = 0
    MEDIUM = 1
    HIGH = 2

    @property
    def title(self) -> str:
        return self.name.capitalize()


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Where a resource's levels begin (same unit as its figure); Normal < Medium < High.

    For the disk resources a 0 means "derived from the volume's size" (see ``for_volume``).
    """

    normal: float
    medium: float
    high: float

    def for_volume(self, size: int, minimum_free: int) -> Thresholds:
        """Fill in derived disk thresholds, as Exchange does for its queue database volume.

        High keeps ``minimum_free`` bytes free: 100 × (size − minimum_free) / size percent in
        use (not below 0: a volume smaller than the reserve is always High). Medium defaults
        to ``DISK_STEP`` points below High, Normal to ``DISK_STEP`` below Medium. hubport does
        not round these to whole percents, so High keeps the reserve on any size of disk.
        """
        high = self.high or (max(0.0, 100.0 * (size - minimum_free) / size) if size else 0.0)
        medium = self.medium or high - DISK_STEP
        normal = self.normal or medium - DISK_STEP
        return Thresholds(normal, medium, high)

    def as_dict(self) -> dict[str, float]:
        return {"Normal": round(self.normal, 2), "Medium": round(self.medium, 2),
                "High": round(self.high, 2)}


def next_level(previous: Level, figure: float, t: Thresholds) -> Level:
    """The level after ``previous`` for a new figure, with hysteresis.

    Up as soon as a higher threshold is reached; down only below the lower level's threshold
    (High stays High until the figure is below Medium; Medium stays until below Normal).
    """
    if figure >= t.high:
        return Level.HIGH
    if figure >= t.medium:
        return Level.HIGH if previous is Level.HIGH else Level.MEDIUM
    if figure >= t.normal:
        return Level.MEDIUM if previous >= Level.MEDIUM else Level.NORMAL
    return Level.NORMAL


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample of one resource."""

    resource: str
    figure: float
    unit: str  # "%" or "messages"
    thresholds: Thresholds | None  # None: the level is given (QueueDatabaseCommit)
    detail: str = ""
    level: Level | None = None  # only with thresholds None


@dataclass(slots=True)
class Meter:
    """What is known of one resource: its last reading and level."""

    resource: str
    reading: Reading
    level: Level = Level.NORMAL
    previous: Level = Level.NORMAL
    since: float = 0.0

    def describe(self) -> dict[str, Any]:
        """One ResourceMeter, as Get-ExchangeDiagnosticInfo -Component ResourceThrottling
        lists it (Resource, Pressure, CurrentResourceUse, PreviousResourceUse, transitions)."""
        r = self.reading
        t = r.thresholds
        return {
            "resource": self.resource,
            "pressure": round(r.figure, 2),
            "unit": r.unit,
            "current_resource_use": self.level.title,
            "previous_resource_use": self.previous.title,
            "since": self.since,
            "thresholds": t.as_dict() if t is not None else None,
            "pressure_transitions": (
                f"NormalToMedium>={_num(t.medium)} MediumToHigh>={_num(t.high)} "
                f"HighToMedium<{_num(t.medium)} MediumToNormal<{_num(t.normal)}"
                if t is not None else "High while the last commit failed"),
            "detail": r.detail,
        }


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one system sample looks at (taken from the configuration on the loop)."""

    queue_folder: Path
    database: Thresholds
    database_minimum_free: int
    log_folders: tuple[Path, ...]
    logs: Thresholds
    logs_minimum_free: int
    memory: Thresholds


class BackPressure:
    """The resource monitor of one running server; its ``level`` governs intake."""

    def __init__(self, organization_of: Callable[[], Organization], server_name: str,
                 store: Store, *, clock: Callable[[], float] = time.time,
                 siblings: Sequence[Path] = ()) -> None:
        self.organization_of = organization_of
        self.server_name = server_name
        self.store = store
        #: the other workers' queue databases: SubmissionQueueLength is the server's, so
        #: their Submission queues count too (read-only, at each sample)
        self.siblings = tuple(siblings)
        self.clock = clock
        self.meters: dict[str, Meter] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.sampled_at: float | None = None
        self._level = Level.NORMAL
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._system: asyncio.Future[list[Reading]] | None = None
        self._queue: asyncio.Future[int] | None = None
        self._last_probe = 0.0
        self._slow_warned = False

    @property
    def server(self) -> TransportServer:
        return self.organization_of().server(self.server_name)

    async def _server_submission_length(self) -> int:
        mine = await self.store.read(_submission_length)
        if not self.siblings:
            return mine
        others = await asyncio.get_running_loop().run_in_executor(
            self._executor, _sibling_lengths, self.siblings)
        return mine + others

    # -- the verdicts (called on the event loop for every MAIL and folder pass) --------------

    @property
    def level(self) -> Level:
        """The highest level of any resource; High at once when the store cannot commit."""
        return Level.HIGH if not self.store.healthy else self._level

    @property
    def intake_paused(self) -> bool:
        """Pickup and Replay wait while the server is at Medium or High."""
        return self.level >= Level.MEDIUM

    def admission(self, sender: str | None = None, *, internal: bool = False
                  ) -> SmtpResponse | None:
        """``None`` when a new message may come in, else the 452 to answer at MAIL FROM.

        ``sender`` None asks before the sender is known (only High refuses then); "" is the
        null sender. ``internal`` is a session of the organization's own: an authenticated
        user or another hub; at Medium it is let in whatever the sender.
        """
        level = self.level
        if level is Level.HIGH:
            return INSUFFICIENT_RESOURCES
        if level is Level.NORMAL or sender is None or internal:
            return None
        return None if self.authoritative(sender) else INSUFFICIENT_RESOURCES

    def authoritative(self, sender: str) -> bool:
        """Whether ``sender`` is in one of the organization's authoritative domains."""
        _, at, domain = sender.rpartition("@")
        if not at or not domain:
            return False
        try:
            domain = domain_to_ascii(domain)
        except AddressError:
            return False
        accepted = self.organization_of().accepted_domain_for(domain.lower())
        return accepted is not None and accepted.domain_type == "Authoritative"

    # -- levels ------------------------------------------------------------------------------

    def update(self, readings: Iterable[Reading], *, complete: bool = True) -> None:
        """Adopt new readings: move each resource's level (logging every change); when the
        readings are ``complete``, drop the resources no longer watched (a log path turned
        off by a reload)."""
        now = self.clock()
        seen: set[str] = set()
        for reading in readings:
            seen.add(reading.resource)
            meter = self.meters.get(reading.resource)
            if meter is None:
                meter = self.meters[reading.resource] = Meter(reading.resource, reading,
                                                              since=now)
            if reading.thresholds is None:
                level = reading.level or Level.NORMAL
            else:
                level = next_level(meter.level, reading.figure, reading.thresholds)
            meter.reading = reading
            if level is not meter.level:
                self._changed(meter, level, now)
        for gone in set(self.meters) - seen if complete else ():
            del self.meters[gone]
        self._settle(now)

    def _changed(self, meter: Meter, level: Level, now: float) -> None:
        meter.previous, meter.level, meter.since = meter.level, level, now
        r = meter.reading
        t = r.thresholds
        entry = {"at": now, "resource": meter.resource, "from": meter.previous.title,
                 "to": level.title, "pressure": round(r.figure, 2), "unit": r.unit,
                 "detail": r.detail}
        self.history.append(entry)
        emit = log.warning if level > meter.previous else log.info
        emit("back pressure level changed", resource=meter.resource,
             previous=meter.previous.title, current=level.title, pressure=round(r.figure, 2),
             unit=r.unit, **({"normal": _num(t.normal), "medium": _num(t.medium),
                              "high": _num(t.high)} if t is not None else {}),
             detail=r.detail)

    def _settle(self, now: float) -> None:
        level = max((m.level for m in self.meters.values()), default=Level.NORMAL)
        if level is self._level:
            return
        previous, self._level = self._level, level
        causes = sorted(m.resource for m in self.meters.values() if m.level is level)
        emit = log.warning if level > previous else log.info
        emit("back pressure: intake " + _EFFECTS[level], server=self.server_name,
             previous=previous.title, current=level.title,
             resources=causes if level is not Level.NORMAL else [])

    def snapshot(self) -> dict[str, Any]:
        """Get-BackPressure: the server's level, every resource and the recent changes."""
        server = self.server
        level = self.level
        return {
            "server": self.server_name,
            "enabled": server.enable_resource_monitoring,
            "interval": server.resource_monitoring_interval,
            "level": level.title,
            "effect": _EFFECTS[level],
            "sampled_at": self.sampled_at,
            "meters": [m.describe() for m in sorted(self.meters.values(),
                                                     key=lambda m: m.resource)],
            "transitions": list(self.history),
        }

    # -- sampling ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Take a first sample (intake starts with real figures), then keep sampling."""
        await self.sample()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="backpressure")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None and not self._queue.done():
            self._queue.cancel()
        if self._executor is not None:
            # a sample stuck on a hung volume must not hold the daemon's exit
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.server.resource_monitoring_interval)
            try:
                await self.sample()
            except Exception:
                log.exception("back pressure sampling failed")

    async def sample(self) -> None:
        """One round: system figures (in the monitor's thread), the Submission queue's length
        (a read in the database thread), the store's health; then adopt them."""
        server = self.server
        if not self.store.healthy:
            self.update([self._commit_reading()], complete=False)  # the failure is on record
            await self._probe()
        readings: list[Reading] = [self._commit_reading()]
        if not server.enable_resource_monitoring:
            self.update(readings)
            return
        plan = _plan(server, self.store.path.parent)
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="hubport-backpressure")
        if self._system is None or self._system.done():
            self._system = loop.run_in_executor(self._executor, sample_system, plan)
        if self._queue is None or self._queue.done():
            self._queue = asyncio.ensure_future(self._server_submission_length())
        wait = max(0.5, min(server.resource_monitoring_interval, 5.0))
        samples: set[asyncio.Future[Any]] = {self._system, self._queue}
        await asyncio.wait(samples, timeout=wait)
        system = self._take(self._system)
        if system is None:  # still running: keep the figures it last gave
            system = [m.reading for m in self.meters.values()
                      if m.resource.startswith((DATABASE, LOG_DISK, PRIVATE_BYTES))]
        readings += system
        length = self._take(self._queue)
        if length is not None:
            s = server.submission_queue_length
            readings.append(Reading(SUBMISSION_QUEUE, float(length), "messages", s,
                                    f"{length} messages wait for the categorizer"))
        elif SUBMISSION_QUEUE in self.meters:
            readings.append(self.meters[SUBMISSION_QUEUE].reading)
        self.sampled_at = self.clock()
        self.update(readings)

    def _take(self, future: asyncio.Future[Any]) -> Any:
        """A finished sample's result; None while it runs (warned once) or when it failed."""
        if not future.done():
            if not self._slow_warned:
                self._slow_warned = True
                log.warning("back pressure sampling is slow; the last figures stay in force")
            return None
        self._slow_warned = False
        if future.cancelled():
            return None
        error = future.exception()
        if error is not None:
            log.error("back pressure sample failed", error=str(error))
            return None
        return future.result()

    def _commit_reading(self) -> Reading:
        healthy = self.store.healthy
        return Reading(COMMIT, 0.0 if healthy else 1.0, "", None,
                       "the last commit succeeded" if healthy else
                       "the last commit of the queue database failed",
                       Level.NORMAL if healthy else Level.HIGH)

    async def _probe(self) -> None:
        """With intake stopped nothing else may commit: try a small commit now and then, so
        the store is known healthy again once the disk is (``Store`` tracks the outcome)."""
        now = time.monotonic()
        if now - self._last_probe < PROBE_INTERVAL:
            return
        self._last_probe = now
        try:
            await self.store.write(_probe_commit)
        except StoreError:
            return
        except Exception:
            log.exception("back pressure probe of the queue database failed")


_EFFECTS = {
    Level.NORMAL: "normal: all new mail is accepted",
    Level.MEDIUM: "restricted: MAIL from senders outside the authoritative domains is refused"
                  " (452 4.3.1) unless the session is the organization's own; Pickup and"
                  " Replay are paused",
    Level.HIGH: "stopped: all new mail is refused (452 4.3.1); Pickup and Replay are paused;"
                " queued mail is still delivered",
}


def _sibling_lengths(paths: Sequence[Path]) -> int:
    """Messages waiting for the categorizer in the other workers' queues (read-only; a
    queue that cannot be read now counts nothing until the next sample)."""
    total = 0
    for path in paths:
        try:
            with closing(sqlite3.connect(path.as_uri() + "?mode=ro", uri=True,
                                         timeout=1)) as db:
                total += _submission_length(db)
        except sqlite3.Error:
            continue
    return total


def _submission_length(conn: Any) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM message WHERE state='submitted'")
               .fetchone()[0])


def _probe_commit(conn: Any) -> None:
    """A commit that writes pages (and so needs space and a working disk) but changes nothing."""
    conn.execute("INSERT OR REPLACE INTO queue_flag (name, suspended) VALUES"
                 " ('BackPressureProbe', 0)")
    conn.execute("DELETE FROM queue_flag WHERE name='BackPressureProbe'")


def _plan(server: TransportServer, queue_folder: Path) -> _Plan:
    logs: list[Path] = []
    if server.message_tracking_log_enabled:
        logs.append(server.message_tracking_log_path)
    for path in (server.receive_protocol_log_path, server.send_protocol_log_path):
        if path is not None:
            logs.append(path)
    return _Plan(queue_folder, server.percentage_database_disk_space_used,
                 server.queue_database_minimum_free_space, tuple(logs),
                 server.percentage_log_disk_space_used, server.log_disk_minimum_free_space,
                 server.percentage_private_bytes_used)


# -- the system sample (blocking: runs in the monitor's thread) ----------------------------------


def sample_system(plan: _Plan) -> list[Reading]:
    """Disk and memory readings for ``plan``."""
    readings = [_disk_reading(f"{DATABASE}[{plan.queue_folder}]", plan.queue_folder,
                              plan.database, plan.database_minimum_free)]
    for folder in _by_volume(plan.log_folders):
        readings.append(_disk_reading(f"{LOG_DISK}[{folder}]", folder, plan.logs,
                                      plan.logs_minimum_free))
    memory = _memory_reading(plan.memory)
    if memory is not None:
        readings.append(memory)
    return readings


def _disk_reading(resource: str, folder: Path, configured: Thresholds,
                  minimum_free: int) -> Reading:
    """Percentage of the volume in use: everything but what this process may still write."""
    try:
        st = os.statvfs(_existing(folder))
    except OSError as exc:  # a volume we cannot even ask about is not one to accept mail on
        return Reading(resource, 100.0, "%", configured.for_volume(0, minimum_free),
                       f"statvfs failed: {exc.strerror or exc}")
    size = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    used = 100.0 * (size - free) / size if size else 100.0
    return Reading(resource, used, "%", configured.for_volume(size, minimum_free),
                   f"{_bytes(free)} free of {_bytes(size)}")


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest existing parent (a log folder is made at its first line)."""
    path = folder.absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _by_volume(folders: Sequence[Path]) -> list[Path]:
    """One folder per volume: the deepest folder all of that volume's folders share."""
    groups: dict[int, list[Path]] = {}
    for folder in folders:
        try:
            device = os.stat(_existing(folder)).st_dev
        except OSError:
            device = -len(groups) - 1  # unknown: its own group, the reading will say why
        groups.setdefault(device, []).append(folder.absolute())
    return [Path(os.path.commonpath(paths)) for paths in groups.values()]


def _memory_reading(thresholds: Thresholds) -> Reading | None:
    """The daemon's private memory against the physical memory it may use (Linux /proc)."""
    private = _private_bytes()
    limit = physical_memory()
    if private is None or not limit:
        return None
    return Reading(PRIVATE_BYTES, 100.0 * private / limit, "%", thresholds,
                   f"{_bytes(private)} private of {_bytes(limit)} physical")


def _private_bytes() -> int | None:
    """Resident anonymous memory plus swapped-out memory: what only this process holds
    (Linux's nearest to Windows' private bytes)."""
    try:
        with open("/proc/self/status", "rb") as status:
            text = status.read().decode("ascii", "replace")
    except OSError:
        return None
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "VmSwap"):
            fields[name] = int(value.split()[0]) * 1024
    return fields["RssAnon"] + fields.get("VmSwap", 0) if "RssAnon" in fields else None


def physical_memory() -> int | None:
    """The machine's memory, or less when this process's cgroup (v2) is limited."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = None
    limit = _cgroup_limit()
    if limit is not None and (total is None or limit < total):
        return limit
    return total


def _cgroup_limit() -> int | None:
    try:
        with open("/proc/self/cgroup", encoding="ascii", errors="replace") as cgroup:
            lines = cgroup.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            folder = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            try:
                value = (folder / "memory.max").read_text().strip()
            except OSError:
                return None
            return int(value) if value.isdigit() else None
    return None


def _bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover


__all__ = [
    "INSUFFICIENT_RESOURCES",
    "BackPressure",
    "Level",
    "Reading",
    "Thresholds",
    "next_level",
    "sample_system",
]
