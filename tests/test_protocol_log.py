"""Tests for the SMTP protocol logs: CSV format, escaping, sessions, rotation and failures."""

from __future__ import annotations

import asyncio
import csv
import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hubport.core.protocol_log import FIELDS, ProtocolLog

T0 = (datetime(2024, 3, 1, tzinfo=UTC) + timedelta(hours=12)).timestamp()


class Clock:
    """A settable clock so file names and stamps are deterministic."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_log(path: Path | None, kind: str = "RECV", **limits: Any) -> ProtocolLog:
    settings: dict[str, Any] = {
        "max_age": None,
        "max_directory_size": None,
        "max_file_size": 10 * 1024 * 1024,
    }
    settings.update(limits)
    clock = settings.pop("clock", Clock())
    return ProtocolLog(path, kind, clock=clock, **settings)


def records(directory: Path) -> list[list[str]]:
    """All data records of all log files, in file order, parsed as CSV."""
    rows: list[list[str]] = []
    for file in sorted(directory.iterdir(), key=lambda p: (p.name[:12], int(p.stem[13:]))):
        text = file.read_bytes().decode("utf-8")  # strict: files must be valid UTF-8
        body = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))
        rows.extend(csv.reader(io.StringIO(body)))
    return rows


def data_lines(directory: Path) -> list[str]:
    return [
        line
        for file in sorted(directory.iterdir())
        for line in file.read_text("utf-8").splitlines()
        if not line.startswith("#")
    ]


# ---- file format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "log_type"),
    [("RECV", "SMTP Receive Protocol Log"), ("SEND", "SMTP Send Protocol Log")],
)
def test_file_name_and_header(tmp_path: Path, kind: str, log_type: str) -> None:
    log = make_log(tmp_path, kind)
    log.session("Default HUB01", ("127.0.0.1", 25), ("127.0.0.2", 40000)).connected()
    log.close()
    [file] = tmp_path.iterdir()
    assert file.name == f"{kind}20240301-1.log"
    head = file.read_text().splitlines()[:5]
    assert head[0] == "#Software: hubport"
    assert head[1].startswith("#Version: ")
    assert head[2] == f"#Log-Type: {log_type}"
    assert head[3] == "#Date: 2024-03-01T12:00:00.000Z"
    assert head[4] == "#Fields: " + ",".join(FIELDS)
    assert head[4] == (
        "#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,"
        "remote-endpoint,event,data,context"
    )


def test_a_session_in_order(tmp_path: Path) -> None:
    clock = Clock()
    log = make_log(tmp_path, clock=clock)
    s = log.session("Default HUB01", ("127.0.0.1", 2525), ("127.0.0.9", 40001))
    s.connected()
    s.sent("220 hub01.contoso.test Microsoft ESMTP MAIL Service ready")
    clock.now += 0.25
    s.received(b"EHLO client.test\r\n")
    s.info("", "Set Session Permissions")
    s.disconnected("Local")
    log.close()
    rows = records(tmp_path)
    assert [r[0] for r in rows] == ["2024-03-01T12:00:00.000Z"] * 2 + [
        "2024-03-01T12:00:00.250Z"
    ] * 3
    assert {r[1] for r in rows} == {"Default HUB01"}
    assert {r[2] for r in rows} == {s.session_id}
    assert [r[3] for r in rows] == ["0", "1", "2", "3", "4"]
    assert {(r[4], r[5]) for r in rows} == {("127.0.0.1:2525", "127.0.0.9:40001")}
    assert [r[6] for r in rows] == ["+", ">", "<", "*", "-"]
    assert rows[2][7] == "EHLO client.test"  # the line ending is not part of the data
    assert rows[3][8] == "Set Session Permissions"
    assert rows[4][8] == "Local"
    assert all(len(r) == len(FIELDS) for r in rows)


def test_sessions_have_unique_ids_and_own_sequences(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    sessions = [log.session("c", None, None) for _ in range(1000)]
    assert len({s.session_id for s in sessions}) == 1000
    assert all(s.session_id.isalnum() and int(s.session_id, 16) >= 0 for s in sessions)
    a, b = sessions[:2]
    a.connected()
    b.connected()
    a.sent("220")
    b.sent("220")
    log.close()
    rows = records(tmp_path)
    assert [(r[2], r[3]) for r in rows] == [
        (a.session_id, "0"),
        (b.session_id, "0"),
        (a.session_id, "1"),
        (b.session_id, "1"),
    ]


def test_quoting_escaping_and_decoding(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    s = log.session('Conn, "quoted"', ("::1", 25), ("2001:db8::5", 4000))
    s.received('MAIL FROM:<a@b.test> SIZE=10,"x"')
    s.received("two\r\nrecords?\rno\n")
    s.received(b"caf\xc3\xa9 \xff\xfe bytes")
    s.sent("evil\x1b[2J\u2028\x85 line")
    s.info("lone \udcff surrogate", "ctx\nwith newline")
    log.close()
    lines = data_lines(tmp_path)
    assert len(lines) == 5  # not one record broken across lines
    rows = records(tmp_path)
    assert rows[0][1] == 'Conn, "quoted"'
    assert (rows[0][4], rows[0][5]) == ("[::1]:25", "[2001:db8::5]:4000")
    assert rows[0][7] == 'MAIL FROM:<a@b.test> SIZE=10,"x"'
    assert rows[1][7] == "two\\r\\nrecords?\\rno"
    assert rows[2][7] == "café \\xff\\xfe bytes"
    assert rows[3][7] == "evil\\x1b[2J\\u2028\\x85 line"
    assert rows[4][7] == "lone \\udcff surrogate"
    assert rows[4][8] == "ctx\\nwith newline"


def test_secret_data_is_never_written(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    s = log.session("c", None, None)
    s.received("AUTH PLAIN")
    s.received(b"AGFsaWNlAHMzY3JldA==\r\n", secret=True)
    log.close()
    rows = records(tmp_path)
    assert [r[7] for r in rows] == ["AUTH PLAIN", "****"]
    assert b"AGFsaWNl" not in b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert rows[0][4:6] == ["", ""]  # unknown endpoints are empty fields


def test_mutable_buffers_are_copied(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    s = log.session("c", None, None)
    data = bytearray(b"RCPT TO:<a@contoso.test>")
    s.received(data)  # type: ignore[arg-type]
    data[:4] = b"XXXX"
    log.close()
    assert records(tmp_path)[0][7] == "RCPT TO:<a@contoso.test>"


# ---- off the event loop; disabled; failures --------------------------------------------------


def test_events_do_no_disk_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "logs"
    log = make_log(target)

    def no_io(*_a: Any, **_k: Any) -> None:
        raise AssertionError("disk I/O on the event loop")

    monkeypatch.setattr(os, "open", no_io)
    monkeypatch.setattr(os, "write", no_io)
    monkeypatch.setattr(os, "scandir", no_io)
    s = log.session("c", ("127.0.0.1", 25), ("127.0.0.2", 1))
    for i in range(50):
        s.received(f"NOOP {i}")
    monkeypatch.undo()
    assert not target.exists() and log.buffered == 50
    log.flush()
    assert len(records(target)) == 50


async def test_disabled_log_is_a_no_op(tmp_path: Path) -> None:
    log = make_log(None)
    assert not log.enabled
    s = log.session("c", ("127.0.0.1", 25), None)
    s.connected()
    s.received("EHLO x")
    s.disconnected()
    assert s.session_id and log.buffered == 0 and log.last_error is None
    task = asyncio.create_task(log.run_flusher())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_kind_is_checked() -> None:
    with pytest.raises(ValueError, match="RECV or SEND"):
        make_log(None, "SMTP")


def test_failing_disk_never_raises_and_recovers(tmp_path: Path) -> None:
    target = tmp_path / "blocked"
    target.write_text("")  # a file where the folder should be
    log = make_log(target)
    s = log.session("c", None, None)
    s.connected()
    s.sent("220 ready")
    log.flush()  # must not raise
    assert isinstance(log.last_error, OSError)
    assert log.buffered == 2 and log.dropped == 0
    s.disconnected()
    target.unlink()
    log.flush()
    assert log.last_error is None and log.buffered == 0
    assert [r[6] for r in records(target)] == ["+", ">", "-"]


def test_buffer_is_bounded_while_the_disk_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubport.core import rotating_log

    monkeypatch.setattr(rotating_log, "MAX_BUFFERED_EVENTS", 3)
    target = tmp_path / "blocked"
    target.write_text("")
    log = make_log(target)
    s = log.session("c", None, None)
    for i in range(5):
        s.received(f"NOOP {i}")
    log.flush()
    assert log.buffered == 3 and log.dropped == 2
    target.unlink()
    log.close()
    assert [r[7] for r in records(target)] == ["NOOP 2", "NOOP 3", "NOOP 4"]


# ---- rotation and pruning ------------------------------------------------------------------


def test_rotates_by_size_and_by_day(tmp_path: Path) -> None:
    clock = Clock()
    log = make_log(tmp_path, "SEND", clock=clock, max_file_size=700)
    s = log.session("Internet", ("127.0.0.1", 1), ("127.0.0.2", 25))
    for i in range(20):
        s.sent(f"RCPT TO:<user{i}@example.test>")
    clock.now += 86400
    s.sent("QUIT")
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    day1 = [n for n in names if n.startswith("SEND20240301-")]
    assert len(day1) > 1 and names[-1] == "SEND20240302-1.log"
    for name in day1:
        assert (tmp_path / name).stat().st_size <= 700
    assert [int(r[3]) for r in records(tmp_path)] == list(range(21))


def test_prunes_by_age_and_directory_size(tmp_path: Path) -> None:
    clock = Clock()
    old = tmp_path / "RECV20240101-1.log"
    old.write_text("#old\n")
    os.utime(old, (T0 - 40 * 86400, T0 - 40 * 86400))
    fresh = tmp_path / "RECV20240229-1.log"
    fresh.write_text("#fresh\n")
    os.utime(fresh, (T0 - 86400, T0 - 86400))
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    log = make_log(tmp_path, clock=clock, max_age=30 * 86400)
    log.session("c", None, None).connected()
    log.close()
    assert not old.exists() and fresh.exists() and other.exists()

    big = tmp_path / "RECV20240228-1.log"
    big.write_bytes(b"#" + b"x" * 5000 + b"\n")
    os.utime(big, (T0 - 2 * 86400, T0 - 2 * 86400))
    log = make_log(tmp_path, clock=clock, max_directory_size=2000)
    clock.now += 86400  # a new day starts a new file, which prunes
    log.session("c", None, None).connected()
    log.close()
    assert not big.exists()  # the oldest goes first, until the folder fits
    assert fresh.exists() and other.exists()
    assert (tmp_path / "RECV20240302-1.log").exists()


async def test_run_flusher_flushes_periodically_and_on_cancel(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    s = log.session("c", None, None)
    task = asyncio.create_task(log.run_flusher(interval=0.01))
    s.connected()
    for _ in range(1000):
        await asyncio.sleep(0.01)
        if log.buffered == 0 and list(tmp_path.iterdir()):
            break
    assert len(records(tmp_path)) == 1
    slow = make_log(tmp_path)
    slow_task = asyncio.create_task(slow.run_flusher(interval=3600))
    await asyncio.sleep(0)
    slow.session("c", None, None).disconnected()
    slow_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow_task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r[6] for r in records(tmp_path)] == ["+", "-"]


# ---- several writers (the workers of one server) in one folder -------------------------------


def family_lines(directory: Path, start: str) -> list[str]:
    return [
        line
        for file in sorted(directory.iterdir())
        if file.name.startswith(start)
        for line in file.read_text("utf-8").splitlines()
        if not line.startswith("#")
    ]


def test_two_writers_write_files_of_their_own(tmp_path: Path) -> None:
    first = make_log(tmp_path, writers=2)
    second = make_log(tmp_path, writer="W1", writers=2)
    first.session("mine", None, None).connected()
    second.session("theirs", None, None).connected()
    first.session("mine", None, None).disconnected()
    second.close()
    first.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "RECV20240301-1.log",
        "RECV_W1_20240301-1.log",
    ]
    assert [line.split(",")[1] for line in family_lines(tmp_path, "RECV2")] == ["mine", "mine"]
    assert [line.split(",")[1] for line in family_lines(tmp_path, "RECV_W1_")] == ["theirs"]


def test_each_writer_rotates_in_its_own_family(tmp_path: Path) -> None:
    first = make_log(tmp_path, "SEND", max_file_size=700)
    s = first.session("Internet", None, None)
    for i in range(10):
        s.sent(f"RCPT TO:<user{i}@example.test>")
    first.close()
    theirs = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert len(theirs) > 1
    second = make_log(tmp_path, "SEND", writer="W3", writers=4, max_file_size=700)
    second.session("Internet", None, None).connected()
    second.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in theirs} == theirs
    assert [p.name for p in tmp_path.iterdir() if p.name not in theirs] == ["SEND_W3_20240301-1.log"]


def test_each_writer_prunes_its_own_family_to_its_share(tmp_path: Path) -> None:
    def plant(name: str, size: int, age_days: float) -> Path:
        file = tmp_path / name
        file.write_bytes(b"#" + b"x" * (size - 2) + b"\n")
        os.utime(file, (T0 - age_days * 86400, T0 - age_days * 86400))
        return file

    ours = [plant("RECV20240101-1.log", 100, 60), plant("RECV20240228-1.log", 3000, 2)]
    old = plant("RECV_W2_20240101-1.log", 100, 60)
    big = plant("RECV_W2_20240227-1.log", 3000, 3)
    kept = plant("RECV_W2_20240228-1.log", 1000, 2)
    # 3,000 allowed in all, shared by three writers: W2 may keep 1,000
    log = make_log(tmp_path, writer="W2", writers=3, max_age=30 * 86400,
                   max_directory_size=3000)
    log.session("c", None, None).connected()
    log.close()
    assert all(p.exists() for p in ours)  # another writer's: never W2's to delete
    assert not old.exists() and not big.exists() and kept.exists()
    assert (tmp_path / "RECV_W2_20240301-1.log").exists()


async def test_send_logs_use_the_worker_the_send_service_names(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from hubport.core.workers import WorkerSlot
    from hubport.plugins.smtp_send.protolog import SendProtocolLogs

    server = SimpleNamespace(send_protocol_log_path=tmp_path / "w1", protocol_log_max_age=None,
                             protocol_log_max_directory_size=None,
                             protocol_log_max_file_size=1 << 20)
    other = SimpleNamespace(**dict(vars(server), send_protocol_log_path=tmp_path / "w0"))
    logs = SendProtocolLogs()
    logs.use(server.send_protocol_log_path, WorkerSlot(1, 2))
    for srv in (server, other):
        plog = logs.log_for(srv)  # type: ignore[arg-type]
        assert plog is not None
        plog.session("Internet", None, None).connected()
    await logs.close()
    assert [p.name[:8] for p in (tmp_path / "w1").iterdir()] == ["SEND_W1_"]
    assert [p.name[:6] for p in (tmp_path / "w0").iterdir()] == ["SEND20"]
