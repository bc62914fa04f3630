"""Back pressure (core/backpressure.py): levels with hysteresis, the verdicts at MAIL FROM,
the settings, the sampler, and the Submission queue's length against a real daemon.

The full-disk story (a tmpfs filled with ballast under a real daemon) is in
tests/test_disk_faults.py, beside the other tmpfs tests.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon_process import DaemonPool, daemon_pool, hubport
from hubport.core import backpressure as bp
from hubport.core import queue as q
from hubport.core.backpressure import (
    INSUFFICIENT_RESOURCES,
    BackPressure,
    Level,
    Reading,
    Thresholds,
    next_level,
)
from hubport.core.config import Organization, parse_organization
from hubport.core.config_fields import ConfigErrors
from hubport.core.control import call
from hubport.core.store import Store
from smtp_support import Client, free_port, receive_connector
from support import BASE_ORG, maildir, wait_for, wait_for_sync

N, M, H = Level.NORMAL, Level.MEDIUM, Level.HIGH
T = Thresholds(60, 70, 90)

ORG = """
[[accepted_domain]]
Name = "contoso"
DomainName = "contoso.test"
DomainType = "Authoritative"
Default = true

[[accepted_domain]]
Name = "fabrikam"
DomainName = "fabrikam.test"
DomainType = "InternalRelay"

[[transport_server]]
Name = "HUB01"
"""


def organization(extra: str = "", tmp: Path = Path(".")) -> Organization:
    return parse_organization(ORG + extra, source="org.toml", base_dir=tmp,
                              connector_types={})


class FakeStore:
    """What the monitor uses of ``hubport.core.store.Store``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.healthy = True


def monitor(tmp_path: Path, extra: str = "") -> BackPressure:
    org = organization(extra, tmp_path)
    return BackPressure(lambda: org, "HUB01", FakeStore(tmp_path / "queue" / "mail.que"))  # type: ignore[arg-type]


def disk(figure: float, t: Thresholds = T) -> Reading:
    return Reading("DatabaseUsedSpace[/q]", figure, "%", t, f"{100 - figure:g}% free")


# -- the level logic ---------------------------------------------------------------------------


@pytest.mark.parametrize(("figures", "levels"), [
    # up at once on reaching a threshold
    ([50, 69.9, 70, 89.9, 90], [N, N, M, M, H]),
    # High holds until below Medium, Medium holds until below Normal
    ([95, 80, 70, 69.9, 65, 60, 59.9], [H, H, H, M, M, M, N]),
    # straight from High to Normal when the figure drops below Normal
    ([95, 10], [H, N]),
    # from Normal, a figure between Normal and Medium stays Normal
    ([65, 69, 61], [N, N, N]),
    # hovering at a threshold does not flap
    ([70, 69.99, 70, 69.99, 70], [M, M, M, M, M]),
])
def test_levels_rise_at_once_and_fall_only_below_the_lower_threshold(
        figures: list[float], levels: list[Level]) -> None:
    level = N
    seen = []
    for figure in figures:
        level = next_level(level, figure, T)
        seen.append(level)
    assert seen == levels


def test_disk_thresholds_keep_the_reserve_free_on_any_volume() -> None:
    gb, mb = 1 << 30, 1 << 20
    derived = Thresholds(0, 0, 0).for_volume(100 * gb, 500 * mb)
    assert derived.high == pytest.approx(100 * (100 * gb - 500 * mb) / (100 * gb))  # 99.51...
    assert (derived.high - derived.medium, derived.high - derived.normal) == (2, 4)
    # the level reaches High exactly when less than the reserve is left
    assert next_level(N, 100 * (100 * gb - 499 * mb) / (100 * gb), derived) is H
    assert next_level(N, 100 * (100 * gb - 501 * mb) / (100 * gb), derived) is M
    # a volume smaller than the reserve is always High (the old "100TB" behaviour)
    assert next_level(N, 0.0, Thresholds(0, 0, 0).for_volume(16 * mb, 100 * mb)) is H
    # given thresholds are kept; a given High moves the derived ones with it
    assert Thresholds(60, 70, 90).for_volume(gb, mb) == Thresholds(60, 70, 90)
    assert Thresholds(0, 0, 90).for_volume(gb, mb) == Thresholds(86, 88, 90)


# -- the verdicts --------------------------------------------------------------------------------


def test_medium_refuses_outside_senders_only_and_high_refuses_everyone(tmp_path: Path) -> None:
    m = monitor(tmp_path)
    assert m.admission("someone@example.org") is None
    m.update([disk(75)])
    assert m.level is M and m.intake_paused
    assert m.admission("someone@example.org") == INSUFFICIENT_RESOURCES
    assert str(INSUFFICIENT_RESOURCES) == "452 4.3.1 Insufficient system resources"
    assert m.admission("") == INSUFFICIENT_RESOURCES  # a bounce from outside waits too
    assert m.admission("x@fabrikam.test") == INSUFFICIENT_RESOURCES  # InternalRelay: outside
    assert m.admission("alice@contoso.test") is None
    assert m.admission("Alice@CONTOSO.TEST") is None
    assert m.admission("someone@example.org", internal=True) is None  # a user or another hub
    assert m.admission(None) is None  # the sender is not known yet: only High refuses
    m.update([disk(95)])
    assert m.level is H
    for sender in ("alice@contoso.test", "someone@example.org", None):
        assert m.admission(sender, internal=True) == INSUFFICIENT_RESOURCES
    m.update([disk(50)])
    assert m.level is N and not m.intake_paused
    assert m.admission("someone@example.org") is None


def test_a_failed_commit_is_high_until_a_commit_succeeds(tmp_path: Path) -> None:
    m = monitor(tmp_path)
    m.store.healthy = False
    assert m.level is H  # at once, without waiting for a sample
    assert m.admission("alice@contoso.test", internal=True) == INSUFFICIENT_RESOURCES
    m.store.healthy = True
    assert m.level is N


def test_the_worst_resource_sets_the_level_and_every_change_is_logged(tmp_path: Path) -> None:
    m = monitor(tmp_path)
    queue = Thresholds(2, 4, 8)
    with capture_logs() as logs:
        m.update([disk(75), Reading(bp.SUBMISSION_QUEUE, 1, "messages", queue)])
        m.update([disk(75), Reading(bp.SUBMISSION_QUEUE, 9, "messages", queue)])
        m.update([disk(50), Reading(bp.SUBMISSION_QUEUE, 3, "messages", queue)])
        m.update([disk(50), Reading(bp.SUBMISSION_QUEUE, 1, "messages", queue)])
    assert m.level is N
    changes = [(e["resource"], e["previous"], e["current"], e["pressure"])
               for e in logs if e["event"] == "back pressure level changed"]
    assert changes == [
        ("DatabaseUsedSpace[/q]", "Normal", "Medium", 75),
        (bp.SUBMISSION_QUEUE, "Normal", "High", 9),
        ("DatabaseUsedSpace[/q]", "Medium", "Normal", 50),
        (bp.SUBMISSION_QUEUE, "High", "Medium", 3),
        (bp.SUBMISSION_QUEUE, "Medium", "Normal", 1),
    ]
    first = next(e for e in logs if e["event"] == "back pressure level changed")
    assert (first["log_level"], first["normal"], first["medium"], first["high"],
            first["detail"]) == ("warning", "60", "70", "90", "25% free")
    server = [(e["previous"], e["current"]) for e in logs
              if e["event"].startswith("back pressure: intake")]
    assert server == [("Normal", "Medium"), ("Medium", "High"), ("High", "Medium"),
                      ("Medium", "Normal")]
    snap = m.snapshot()
    assert snap["level"] == "Normal"
    assert [(t["resource"], t["from"], t["to"]) for t in snap["transitions"]] == [
        (r, a, b) for r, a, b, _ in changes]
    meter = {x["resource"]: x for x in snap["meters"]}[bp.SUBMISSION_QUEUE]
    assert (meter["current_resource_use"], meter["previous_resource_use"], meter["pressure"],
            meter["thresholds"]) == ("Normal", "Medium", 1,
                                     {"Normal": 2, "Medium": 4, "High": 8})
    assert meter["pressure_transitions"] == ("NormalToMedium>=4 MediumToHigh>=8 "
                                             "HighToMedium<4 MediumToNormal<2")
    json.dumps(snap)  # what the control socket sends


def test_a_resource_no_longer_watched_is_dropped(tmp_path: Path) -> None:
    m = monitor(tmp_path)
    m.update([disk(95), Reading("UsedDiskSpace[/logs]", 95, "%", T)])
    m.update([Reading("UsedDiskSpace[/logs]", 10, "%", T)])  # the queue meter is gone
    assert m.level is N and list(m.meters) == ["UsedDiskSpace[/logs]"]


# -- sampling --------------------------------------------------------------------------------------


def test_the_system_sample_reads_the_volumes_and_the_memory(tmp_path: Path) -> None:
    org = organization(f'StateDirectory = "{tmp_path}"\nSendProtocolLogPath = ""', tmp_path)
    server = org.server("HUB01")
    readings = {r.resource: r for r in bp.sample_system(bp._plan(server, tmp_path / "queue"))}
    database = readings[f"DatabaseUsedSpace[{tmp_path / 'queue'}]"]
    assert 0 < database.figure < 100 and "free of" in database.detail
    assert database.thresholds is not None and database.thresholds.high > 90
    # the tracking and receive protocol logs share this volume: one meter, at their common
    # folder (neither exists yet: the nearest existing parent is asked)
    logs = [r for r in readings if r.startswith("UsedDiskSpace[")]
    assert logs == [f"UsedDiskSpace[{tmp_path / 'logs'}]"]
    memory = readings["PrivateBytes"]
    assert 0 < memory.figure < 75 and memory.thresholds == Thresholds(71, 73, 75)


async def test_a_hung_sample_keeps_the_last_figures_and_does_not_pile_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "mail.que")
    await store.open(q.SCHEMA)
    org = organization('ResourceMonitoringInterval = "1s"', tmp_path)
    m = BackPressure(lambda: org, "HUB01", store)
    release = threading.Event()
    calls: list[float] = []

    def sample(plan: Any) -> list[Reading]:
        calls.append(time.monotonic())
        if len(calls) > 1:
            release.wait(30)  # a statvfs on a hung volume
        return [disk(75)]

    monkeypatch.setattr(bp, "sample_system", sample)
    try:
        await m.start()
        assert m.level is M
        await wait_for(lambda: len(calls) == 2, timeout=20)
        await asyncio.sleep(2.5)  # more rounds come due while the second sample hangs
        assert len(calls) == 2 and m.level is M
        assert m.meters["DatabaseUsedSpace[/q]"].reading.figure == 75
        release.set()
    finally:
        release.set()
        await m.stop()
        await store.close()


async def test_a_failed_store_is_probed_and_intake_resumes(tmp_path: Path) -> None:
    store = Store(tmp_path / "mail.que")
    await store.open(q.SCHEMA)
    org = organization("", tmp_path)
    m = BackPressure(lambda: org, "HUB01", store)
    try:
        store.healthy = False  # as after a commit that failed on a full disk
        await m.sample()
        assert store.healthy and m.level is N  # the probe committed
        flags = await store.read(lambda c: c.execute("SELECT * FROM queue_flag").fetchall())
        assert flags == []  # and left nothing behind
    finally:
        await store.close()


# -- the settings ------------------------------------------------------------------------------------


def test_defaults_are_exchange_like(tmp_path: Path) -> None:
    server = organization("", tmp_path).server("HUB01")
    assert server.enable_resource_monitoring and server.resource_monitoring_interval == 1.0
    assert server.queue_database_minimum_free_space == 100 << 20
    assert server.percentage_database_disk_space_used == Thresholds(0, 0, 0)  # derived
    assert server.percentage_private_bytes_used == Thresholds(71, 73, 75)
    assert server.submission_queue_length == Thresholds(2000, 10000, 15000)


def test_settings_are_read_with_exchange_names(tmp_path: Path) -> None:
    server = organization("""
EnableResourceMonitoring = false
ResourceMonitoringInterval = "00:00:05"
QueueDatabaseMinimumFreeSpace = "1GB"
PercentageDatabaseDiskSpaceUsedHighThreshold = 95
PercentageDatabaseDiskSpaceUsedMediumThreshold = "92.5%"
PercentageLogDiskSpaceUsedHighThreshold = 97
PercentagePrivateBytesUsedNormalThreshold = 40
PercentagePrivateBytesUsedMediumThreshold = 45
PercentagePrivateBytesUsedHighThreshold = 50
SubmissionQueueLengthNormalThreshold = 10
SubmissionQueueLengthMediumThreshold = 20
SubmissionQueueLengthHighThreshold = 30
""", tmp_path).server("HUB01")
    assert not server.enable_resource_monitoring
    assert server.resource_monitoring_interval == 5.0
    assert server.queue_database_minimum_free_space == 1 << 30
    assert server.percentage_database_disk_space_used == Thresholds(0, 92.5, 95)
    assert server.percentage_log_disk_space_used == Thresholds(0, 0, 97)
    assert server.percentage_private_bytes_used == Thresholds(40, 45, 50)
    assert server.submission_queue_length == Thresholds(10, 20, 30)


@pytest.mark.parametrize(("setting", "field", "reason"), [
    ("PercentagePrivateBytesUsedNormalThreshold = 80", "PercentagePrivateBytesUsedNormalThreshold",
     "must be below PercentagePrivateBytesUsedMediumThreshold (73), got 80"),
    ("SubmissionQueueLengthHighThreshold = 5000", "SubmissionQueueLengthMediumThreshold",
     "must be below SubmissionQueueLengthHighThreshold (5000), got 10000"),
    ("SubmissionQueueLengthMediumThreshold = 0", "SubmissionQueueLengthMediumThreshold",
     "must be between 1 and 2147483647, got 0"),
    ("PercentageDatabaseDiskSpaceUsedMediumThreshold = 90",
     "PercentageDatabaseDiskSpaceUsedMediumThreshold",
     "needs PercentageDatabaseDiskSpaceUsedHighThreshold too"),
    ("PercentageLogDiskSpaceUsedHighThreshold = 101", "PercentageLogDiskSpaceUsedHighThreshold",
     "must be between 0 and 100, got 101"),
    ("PercentageLogDiskSpaceUsedHighThreshold = true", "PercentageLogDiskSpaceUsedHighThreshold",
     "expected a percentage"),
    ('ResourceMonitoringInterval = "100ms"', "ResourceMonitoringInterval", "must be between"),
    ('QueueDatabaseMinimumFreeSpace = "unlimited"', "QueueDatabaseMinimumFreeSpace",
     "cannot be unlimited"),
])
def test_bad_settings_name_the_file_server_and_field(tmp_path: Path, setting: str, field: str,
                                                     reason: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        organization(setting, tmp_path)
    (error,) = info.value.errors
    assert (error.file, error.object, error.field) == ("org.toml", 'transport_server "HUB01"',
                                                       field)
    assert reason in error.reason, error.reason


# -- the Submission queue's length, against a real daemon --------------------------------------------

QUEUE_SERVER = """
SubmissionQueueLengthNormalThreshold = 2
SubmissionQueueLengthMediumThreshold = 4
SubmissionQueueLengthHighThreshold = 8
"""


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def control(root: Path, *args: str) -> Any:
    done = hubport(*args, "--config", str(root / "org.toml"), "--format", "json", cwd=root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def queue_meter(root: Path) -> dict[str, Any]:
    state = call(root / "var", "get-backpressure")
    return {m["resource"]: m for m in state["meters"]}[bp.SUBMISSION_QUEUE]


async def send(port: int, sender: str, subject: str, log: list[str]) -> int:
    """One message from ``sender`` to Bob; returns the MAIL reply's code (the transaction
    goes on only after a 250). Every reply is noted in ``log``."""
    client = await Client.connect(port)
    try:
        await client.hello()
        reply = await client.cmd(f"MAIL FROM:<{sender}>")
        log.append(f"MAIL FROM:<{sender}> -> {reply.code} {reply.lines[-1]}")
        if reply.code != 250:
            return reply.code
        assert (await client.cmd("RCPT TO:<bob@contoso.test>")).code == 250
        assert (await client.cmd("DATA")).code == 354
        await client.send(f"From: {sender}\r\nTo: bob@contoso.test\r\nSubject: {subject}\r\n"
                          f"\r\nHello.\r\n.\r\n")
        done = await client.reply()
        log.append(f"  DATA ({subject}) -> {done.code} {done.lines[-1]}")
        assert done.code == 250, done
        await client.cmd("QUIT")
        return reply.code
    finally:
        await client.close()


def subjects(root: Path) -> set[str]:
    found = set()
    for path in maildir(root, "Bob"):
        for line in path.read_bytes().splitlines():
            if line.startswith(b"Subject: "):
                found.add(line[9:].decode())
    return found


async def test_a_long_submission_queue_refuses_outside_senders_until_it_drains(
        tmp_path: Path, pool: DaemonPool) -> None:
    port = free_port()
    connector = receive_connector("Internet", [f"127.0.0.1:{port}"],
                                  PermissionGroups=["AnonymousUsers"])
    (tmp_path / "org.toml").write_text(BASE_ORG.format(
        server_extra=QUEUE_SERVER, foreign_extra="", extra=connector))
    daemon = pool.start(config=tmp_path / "org.toml")
    daemon.wait_ready()
    replies: list[str] = []
    control(tmp_path, "suspend-queue", "--identity", "HUB01\\Submission")
    for n in range(4):  # at MAIL the queue holds at most 3: all are let in
        assert await send(port, "someone@example.org", f"outside {n}", replies) == 250
    meter = await asyncio.to_thread(wait_for_sync, lambda: (
        m := queue_meter(tmp_path))["current_resource_use"] == "Medium" and m, 20)
    assert meter["pressure"] == 4
    # Medium: the outside sender waits, the organization's own sender gets in
    assert await send(port, "someone@example.org", "refused", replies) == 452
    assert replies[-1] == "MAIL FROM:<someone@example.org> -> 452 4.3.1 Insufficient system" \
                          " resources"
    assert await send(port, "alice@contoso.test", "inside", replies) == 250
    table = hubport("get-queue", "--config", str(tmp_path / "org.toml"), cwd=tmp_path)
    assert "Back pressure Medium" in table.stdout, table.stdout
    # the monitor samples about once a second: wait until it has counted the fifth message
    await asyncio.to_thread(wait_for_sync, lambda: queue_meter(tmp_path)["pressure"] == 5, 20)
    shown = hubport("get-backpressure", "--config", str(tmp_path / "org.toml"), cwd=tmp_path)
    row = next(line for line in shown.stdout.splitlines() if line.startswith("QueueLength"))
    assert row.split()[1:5] == ["5", "messages", "Medium", "Normal"], shown.stdout
    control(tmp_path, "resume-queue", "--identity", "HUB01\\Submission")
    await asyncio.to_thread(wait_for_sync, lambda: queue_meter(tmp_path)[
        "current_resource_use"] == "Normal", 20)
    assert await send(port, "someone@example.org", "after", replies) == 250
    expected = {f"outside {n}" for n in range(4)} | {"inside", "after"}
    await asyncio.to_thread(wait_for_sync, lambda: subjects(tmp_path) == expected, 20)
    changes = [line for line in daemon.log_text().splitlines()
               if "back pressure level changed" in line and "QueueLength" in line]
    assert len(changes) == 2, changes  # Normal -> Medium, then (drained) Medium -> Normal
    print("\n".join(["SMTP replies:", *replies, "hubport get-backpressure (at Medium):",
                     shown.stdout, "level changes logged:", *changes]))
