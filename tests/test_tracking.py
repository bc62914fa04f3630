"""Tests for the message tracking log: writer, rotation, pruning, failures and the searcher."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from hubport.core import tracking
from hubport.core.rotating_log import log_writer
from hubport.core.tracking import (
    EVENT_IDS,
    FIELDS,
    SOURCES,
    TrackingLog,
    TrackingSettings,
    format_events,
    search,
)
from hubport.core.workers import WorkerSlot

DAY1 = datetime(2024, 3, 1, tzinfo=UTC)
T0 = (DAY1 + timedelta(hours=12)).timestamp()  # 2024-03-01T12:00:00Z


def make_log(path: Path, **settings: Any) -> TrackingLog:
    return TrackingLog(TrackingSettings(path=path, **settings), "hub1.example.test", "10.0.0.1")


def log_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("MSGTRK"))


def data_lines(file: Path) -> list[dict[str, Any]]:
    text = file.read_bytes().decode("utf-8")  # strict: the file must be valid UTF-8
    return [json.loads(line) for line in text.splitlines() if not line.startswith("#")]


def seed_events(log: TrackingLog) -> None:
    """Five events of two messages, one second apart from T0."""
    log.log(
        "RECEIVE",
        "SMTP",
        internal_message_id="101",
        message_id="<m1@example.test>",
        recipients=["Alice@Example.test", "bob@example.test"],
        recipient_status=["", ""],
        total_bytes=1234,
        subject="Quarterly Report",
        sender="carol@sender.test",
        return_path="carol@sender.test",
        client_ip="192.0.2.7",
        client_hostname="mx.sender.test",
        connector_id="Default hub1",
        source_context="08D0AAAA",
        directionality="Incoming",
        when=T0,
    )
    log.log(
        "RESOLVE",
        "RESOLVER",
        internal_message_id="101",
        message_id="<m1@example.test>",
        recipients=["alice@example.test"],
        related_recipient_address="alias@example.test",
        subject="Quarterly Report",
        sender="carol@sender.test",
        when=T0 + 1,
    )
    log.log(
        "DELIVER",
        "STOREDRIVER",
        internal_message_id="101",
        message_id="<m1@example.test>",
        recipients=["alice@example.test", "bob@example.test"],
        recipient_status=["250 2.0.0 OK", "250 2.0.0 OK"],
        subject="Quarterly Report",
        sender="carol@sender.test",
        when=T0 + 2,
    )
    log.log(
        "RECEIVE",
        "PICKUP",
        internal_message_id="102",
        message_id="m2@example.test",
        recipients=["dave@example.test"],
        subject="lunch?",
        sender="erin@example.test",
        when=T0 + 3,
    )
    log.log(
        "DSN",
        "DSN",
        internal_message_id="103",
        message_id="<dsn1@hub1.example.test>",
        reference="<m2@example.test>",
        recipients=["erin@example.test"],
        subject="Undeliverable: lunch?",
        sender="postmaster@example.test",
        return_path="<>",
        when=T0 + 4,
    )


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    log = make_log(tmp_path)
    seed_events(log)
    log.close()
    return tmp_path


def ids(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event-id"], e["internal-message-id"]) for e in events]


# ---- the line format ------------------------------------------------------------------------


def test_line_has_exchange_fields_in_order(seeded: Path) -> None:
    [file] = seeded.iterdir()
    assert file.name == "MSGTRK20240301-1.log"
    first = data_lines(file)[0]
    assert list(first) == list(FIELDS)
    assert first["date-time"] == "2024-03-01T12:00:00.000Z"
    assert first["server-hostname"] == "hub1.example.test"
    assert first["server-ip"] == "10.0.0.1"
    assert first["recipient-address"] == ["Alice@Example.test", "bob@example.test"]
    assert first["recipient-count"] == 2
    assert first["total-bytes"] == 1234
    assert first["custom-data"] == {}


def test_header_lines(seeded: Path) -> None:
    [file] = seeded.iterdir()
    head = file.read_text().splitlines()[:5]
    assert head[0] == "#Software: hubport"
    assert head[1].startswith("#Version: ")
    assert head[2] == "#Log-Type: Message Tracking Log"
    assert head[3] == "#Date: 2024-03-01T12:00:00.000Z"
    assert head[4] == "#Fields: " + ",".join(FIELDS)


def test_milliseconds_are_kept(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    log.log("SEND", "SMTP", when=T0 + 0.1239)
    log.log("SEND", "SMTP", when=T0 + 1.123)  # not exact in binary: 1.12299990654...
    log.log("SEND", "SMTP", when=T0 + 2.9999)  # truncated, never rounded up
    log.close()
    assert [e["date-time"] for e in search(tmp_path)] == [
        "2024-03-01T12:00:00.123Z",
        "2024-03-01T12:00:01.123Z",
        "2024-03-01T12:00:02.999Z",
    ]


def test_unknown_event_id_or_source_is_a_programming_error(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    with pytest.raises(ValueError, match="event id"):
        log.log("ROUTING", "ROUTING")  # ROUTING is a Source, not an EventId
    with pytest.raises(ValueError, match="source"):
        log.log("FAIL", "NOWHERE")
    assert {"RECEIVE", "DROP", "SUPPRESSED", "DUPLICATEDELIVER"} <= EVENT_IDS
    assert {"ROUTING", "GATEWAY", "PICKUP"} <= SOURCES and "ROUTING" not in EVENT_IDS


def test_log_does_no_disk_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "track"
    log = make_log(target)

    def no_io(*_a: Any, **_k: Any) -> None:
        raise AssertionError("disk I/O in log()")

    monkeypatch.setattr(os, "open", no_io)
    monkeypatch.setattr(os, "write", no_io)
    monkeypatch.setattr(os, "scandir", no_io)
    for i in range(100):
        log.log("RECEIVE", "SMTP", when=T0 + i)
    monkeypatch.undo()
    assert not target.exists() and log.buffered == 100
    log.flush()
    assert len(search(target)) == 100


def test_caller_mutation_after_log_does_not_change_event(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    rcpts = ["a@example.test"]
    extra = {"k": "v"}
    log.log("SEND", "SMTP", recipients=rcpts, custom_data=extra, when=T0)
    rcpts.append("b@example.test")
    extra["k"] = "changed"
    log.close()
    [event] = search(tmp_path)
    assert event["recipient-address"] == ["a@example.test"]
    assert event["custom-data"] == {"k": "v"}


def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = make_log(tmp_path / "t", enabled=False)
    log.log("RECEIVE", "SMTP", when=T0)
    log.close()
    assert log.buffered == 0
    assert not (tmp_path / "t").exists() or log_files(tmp_path / "t") == []


def test_subject_logging_disabled(tmp_path: Path) -> None:
    log = make_log(tmp_path, subject_logging_enabled=False)
    log.log("RECEIVE", "SMTP", subject="secret merger plans", when=T0)
    log.close()
    [event] = search(tmp_path)
    assert event["message-subject"] == ""
    assert b"merger" not in b"".join(p.read_bytes() for p in tmp_path.iterdir())


def test_non_utf8_surrogate_strings_survive(tmp_path: Path) -> None:
    subject = b"caf\xc3\xa9 \xff\xfe broken".decode("utf-8", "surrogateescape")
    rcpt = b"j\xe9r\xf4me@example.test".decode("utf-8", "surrogateescape")
    log = make_log(tmp_path)
    log.log("RECEIVE", "PICKUP", subject=subject, recipients=[rcpt], when=T0)
    log.log("RECEIVE", "PICKUP", subject="naïve ☃", when=T0 + 1)
    log.close()
    [file] = tmp_path.iterdir()
    assert len(data_lines(file)) == 2  # strict UTF-8 decode and valid JSON
    assert "naïve ☃" in file.read_text("utf-8")  # ordinary text stays readable
    first, second = search(tmp_path)
    assert first["message-subject"] == subject
    assert first["recipient-address"] == [rcpt]
    assert second["message-subject"] == "naïve ☃"
    assert search(tmp_path, recipients=[rcpt.upper()]) == [first]


def test_unencodable_event_is_dropped_not_blocking(tmp_path: Path) -> None:
    circular: dict[str, Any] = {}
    circular["self"] = circular
    log = make_log(tmp_path)
    log.log("AGENTINFO", "AGENT", custom_data=circular, when=T0)
    log.log("AGENTINFO", "AGENT", custom_data={"obj": object()}, when=T0 + 1)
    log.log("SEND", "SMTP", when=T0 + 2)
    log.flush()
    assert log.dropped == 1 and log.buffered == 0
    assert isinstance(log.last_error, ValueError)
    assert [e["event-id"] for e in search(tmp_path)] == ["AGENTINFO", "SEND"]
    log.flush()
    assert log.last_error is None


# ---- the searcher ---------------------------------------------------------------------------


def test_no_filter_returns_all_in_time_order(seeded: Path) -> None:
    assert ids(search(seeded)) == [
        ("RECEIVE", "101"),
        ("RESOLVE", "101"),
        ("DELIVER", "101"),
        ("RECEIVE", "102"),
        ("DSN", "103"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"event_id": "receive"}, [("RECEIVE", "101"), ("RECEIVE", "102")]),
        ({"message_id": "<m1@example.test>"}, [("RECEIVE", "101"), ("RESOLVE", "101"), ("DELIVER", "101")]),
        ({"message_id": "m2@example.test"}, [("RECEIVE", "102")]),
        ({"message_id": "<m2@example.test>"}, [("RECEIVE", "102")]),
        ({"message_id": "M2@example.test"}, []),
        ({"internal_message_id": "103"}, [("DSN", "103")]),
        ({"message_subject": "REPORT"}, [("RECEIVE", "101"), ("RESOLVE", "101"), ("DELIVER", "101")]),
        ({"message_subject": "lunch"}, [("RECEIVE", "102"), ("DSN", "103")]),
        ({"recipients": ["BOB@example.test"]}, [("RECEIVE", "101"), ("DELIVER", "101")]),
        ({"recipients": ["nobody@x.test", "dave@EXAMPLE.test"]}, [("RECEIVE", "102")]),
        ({"sender": "Carol@Sender.Test"}, [("RECEIVE", "101"), ("RESOLVE", "101"), ("DELIVER", "101")]),
        ({"reference": "m2@example.test"}, [("DSN", "103")]),
        ({"server": "HUB1.example.test"}, "all"),
        ({"server": "10.0.0.1"}, "all"),
        ({"server": "hub2.example.test"}, []),
        ({"source": "storedriver"}, [("DELIVER", "101")]),
        ({"event_id": "RECEIVE", "source": "PICKUP"}, [("RECEIVE", "102")]),
        ({"event_id": "RECEIVE", "sender": "carol@sender.test", "message_subject": "lunch"}, []),
    ],
)  # fmt: skip
def test_filters(seeded: Path, kwargs: dict[str, Any], expected: Any) -> None:
    got = ids(search(seeded, **kwargs))
    assert got == (ids(search(seeded)) if expected == "all" else expected)


def test_start_inclusive_end_exclusive(seeded: Path) -> None:
    def at(seconds: float) -> datetime:
        return datetime.fromtimestamp(T0 + seconds, UTC)

    assert ids(search(seeded, start=at(1), end=at(3))) == [
        ("RESOLVE", "101"),
        ("DELIVER", "101"),
    ]
    assert search(seeded, start=at(2), end=at(2)) == []
    assert len(search(seeded, end=at(4))) == 4  # the DSN at exactly End is excluded
    assert len(search(seeded, start=at(4))) == 1
    # naive datetimes are UTC; other zones are converted
    assert len(search(seeded, end=at(3).replace(tzinfo=None))) == 3
    plus2 = at(3).astimezone(timezone(timedelta(hours=2)))
    assert plus2.hour == 14 and len(search(seeded, end=plus2)) == 3


def test_result_size(seeded: Path) -> None:
    assert ids(search(seeded, result_size=2)) == [
        ("RECEIVE", "101"),
        ("RESOLVE", "101"),
    ]
    assert len(search(seeded, result_size=None)) == 5
    assert search(seeded, result_size=0) == []


def test_result_size_default_is_1000(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    for i in range(1005):
        log.log("DEFER", "QUEUE", when=T0 + i / 1000)
    log.close()
    assert len(search(tmp_path)) == 1000
    assert len(search(tmp_path, result_size=None)) == 1005


def test_malformed_lines_are_skipped(seeded: Path) -> None:
    [file] = seeded.iterdir()
    with file.open("ab") as fh:
        fh.write(b"not json at all\n")
        fh.write(b"[1, 2, 3]\n")
        fh.write(b'{"event-id": "SEND"}\n')  # no date-time
        fh.write(b'{"date-time": "yesterday", "event-id": "SEND"}\n')
        fh.write(b'{"date-time": "2024-03-01T12:00:05.000Z", "recipient-address": 7}\n')
        fh.write(b"\xff\xfe\x00garbage\n")
        fh.write(b"\n")
        fh.write(b'{"date-time": "2024-03-01T12:00:06.000Z", "event-id": "SEND", "recip')
    assert len(search(seeded)) == 6  # five good events + the odd-but-parseable one
    assert len(search(seeded, recipients=["alice@example.test"])) == 3
    assert len(search(seeded, event_id="SEND")) == 0
    (seeded / "MSGTRK20240301-2.log").write_bytes(b"#only a header\n")
    (seeded / "MSGTRK2024031-1.log").write_bytes(b"bad name, ignored\n")
    assert len(search(seeded)) == 6


def test_files_outside_the_date_range_are_not_read(tmp_path: Path) -> None:
    # An event planted in a file whose name says 2020 is invisible to a 2024 search: the
    # searcher trusts the file date instead of reading every file.
    planted = {"date-time": "2024-03-01T12:00:00.500Z", "event-id": "SEND"}
    (tmp_path / "MSGTRK20200101-1.log").write_text(json.dumps(planted) + "\n")
    (tmp_path / "MSGTRK20250101-1.log").write_text(json.dumps(planted) + "\n")
    assert len(search(tmp_path)) == 2  # without a range every file is read
    assert len(search(tmp_path, start=DAY1)) == 1  # the 2020 file is skipped
    assert len(search(tmp_path, end=DAY1 + timedelta(days=1))) == 1  # 2025 is skipped
    assert search(tmp_path, start=DAY1, end=DAY1 + timedelta(days=1)) == []


@pytest.mark.timeout(10)
def test_squatters_on_log_names_are_stepped_over(tmp_path: Path) -> None:
    """A FIFO would block open() forever and a symlink would write elsewhere."""
    os.mkfifo(tmp_path / "MSGTRK20240301-1.log")
    outside = tmp_path / "outside.txt"
    (tmp_path / "MSGTRK20240301-2.log").symlink_to(outside)
    (tmp_path / "MSGTRK20240301-3.log").mkdir()
    log = make_log(tmp_path)
    log.log("SEND", "SMTP", when=T0)
    log.close()
    assert log.last_error is None
    assert not outside.exists()
    assert len(data_lines(tmp_path / "MSGTRK20240301-4.log")) == 1
    assert len(search(tmp_path)) == 1  # the searcher neither blocks on the FIFO nor follows


def test_settings_accept_a_str_path(tmp_path: Path) -> None:
    assert TrackingSettings(path=str(tmp_path)).path == tmp_path  # type: ignore[arg-type]


def test_search_of_missing_directory_is_empty(tmp_path: Path) -> None:
    assert search(tmp_path / "nope") == []


# ---- rotation, rollover, restart ----------------------------------------------------------


def test_size_rotation_makes_numbered_files_with_headers(tmp_path: Path) -> None:
    log = make_log(tmp_path, max_file_size=1500)
    for i in range(12):
        log.log("SEND", "SMTP", message_id=f"<{i}@x.test>", when=T0 + i)
    log.close()
    names = log_files(tmp_path)
    assert names[:3] == [
        "MSGTRK20240301-1.log",
        "MSGTRK20240301-2.log",
        "MSGTRK20240301-3.log",
    ]
    assert len(names) >= 3
    seen = []
    for name in names:
        raw = (tmp_path / name).read_bytes()
        assert raw.startswith(b"#Software: hubport\n")
        assert len(raw) <= 1500
        seen += [e["message-id"] for e in data_lines(tmp_path / name)]
    assert seen == [f"<{i}@x.test>" for i in range(12)]  # each event once, in order
    assert [e["message-id"] for e in search(tmp_path)] == seen


def test_rotation_across_flushes_and_oversized_event(tmp_path: Path) -> None:
    log = make_log(tmp_path, max_file_size=1200)
    for i in range(6):
        log.log("SEND", "SMTP", when=T0 + i)
        log.flush()  # one event per flush: the size is tracked across flushes too
    # An event bigger than a whole file still gets written, alone in its file.
    log.log("SEND", "SMTP", subject="x" * 5000, when=T0 + 10)
    log.log("SEND", "SMTP", when=T0 + 11)
    log.close()
    assert len(search(tmp_path)) == 8
    big = [n for n in log_files(tmp_path) if (tmp_path / n).stat().st_size > 1200]
    assert len(big) == 1 and len(data_lines(tmp_path / big[0])) == 1


def test_date_rollover_restarts_numbering(tmp_path: Path) -> None:
    midnight = datetime(2024, 3, 2, tzinfo=UTC).timestamp()
    log = make_log(tmp_path, max_file_size=1500)  # two events per file
    for i in range(4):
        log.log("SEND", "SMTP", when=midnight - 4 + i + 0.9999)  # last one 23:59:59.999
    log.log("SEND", "SMTP", when=midnight)
    log.log("SEND", "SMTP", when=midnight + 1)
    log.close()
    names = log_files(tmp_path)
    day1 = [n for n in names if n.startswith("MSGTRK20240301-")]
    assert day1 == ["MSGTRK20240301-1.log", "MSGTRK20240301-2.log"]
    assert "MSGTRK20240302-1.log" in names
    day2 = data_lines(tmp_path / "MSGTRK20240302-1.log")
    assert [e["date-time"] for e in day2] == [
        "2024-03-02T00:00:00.000Z",
        "2024-03-02T00:00:01.000Z",
    ]
    last_day1 = data_lines(tmp_path / day1[-1])[-1]
    assert last_day1["date-time"] == "2024-03-01T23:59:59.999Z"
    day2_only = search(tmp_path, start=datetime(2024, 3, 2, tzinfo=UTC))
    assert len(day2_only) == 2


def test_out_of_order_events_go_to_their_own_day(tmp_path: Path) -> None:
    day2 = datetime(2024, 3, 2, 8, tzinfo=UTC).timestamp()
    log = make_log(tmp_path)
    log.log("SEND", "SMTP", message_id="late", when=day2)
    log.log("SEND", "SMTP", message_id="early", when=T0)
    log.log("SEND", "SMTP", message_id="later", when=day2 + 1)
    log.close()
    log2 = make_log(tmp_path)
    log2.log("SEND", "SMTP", message_id="same-day-late", when=day2 + 0.5)
    log2.close()
    assert log_files(tmp_path) == ["MSGTRK20240301-1.log", "MSGTRK20240302-1.log"]
    assert [e["message-id"] for e in search(tmp_path)] == [
        "early", "late", "same-day-late", "later",
    ]  # fmt: skip


def test_restart_appends_to_newest_file_of_the_day(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    log.log("SEND", "SMTP", when=T0)
    log.close()
    log2 = make_log(tmp_path)
    log2.log("SEND", "SMTP", when=T0 + 1)
    log2.close()
    [file] = tmp_path.iterdir()
    assert file.read_text().count("#Software") == 1
    assert len(data_lines(file)) == 2


def test_restart_rolls_when_newest_file_is_full(tmp_path: Path) -> None:
    log = make_log(tmp_path, max_file_size=800)
    log.log("SEND", "SMTP", when=T0)
    log.log("SEND", "SMTP", when=T0 + 1)
    log.close()
    assert log_files(tmp_path) == ["MSGTRK20240301-1.log", "MSGTRK20240301-2.log"]
    log2 = make_log(tmp_path, max_file_size=800)
    log2.log("SEND", "SMTP", when=T0 + 2)
    log2.close()
    assert log_files(tmp_path)[-1] == "MSGTRK20240301-3.log"
    assert len(search(tmp_path)) == 3


def test_restart_continues_the_highest_number_not_the_first(tmp_path: Path) -> None:
    log = make_log(tmp_path, max_file_size=800)
    log.log("SEND", "SMTP", when=T0)
    log.log("SEND", "SMTP", when=T0 + 1)
    log.close()
    log2 = make_log(tmp_path)  # the default 10 MB: both files would have room
    log2.log("SEND", "SMTP", when=T0 + 2)
    log2.close()
    assert log_files(tmp_path) == ["MSGTRK20240301-1.log", "MSGTRK20240301-2.log"]
    assert len(data_lines(tmp_path / "MSGTRK20240301-1.log")) == 1
    assert len(data_lines(tmp_path / "MSGTRK20240301-2.log")) == 2


# ---- pruning -----------------------------------------------------------------------------


def plant(path: Path, name: str, size: int, age_days: float = 0) -> Path:
    file = path / name
    file.write_bytes(b"#Software: hubport\n" + b"x" * (size - 19))
    when = time.time() - age_days * 86400
    os.utime(file, (when, when))
    return file


def test_prune_by_directory_size_deletes_oldest_first(tmp_path: Path) -> None:
    plant(tmp_path, "MSGTRK20240105-1.log", 4000)
    plant(tmp_path, "MSGTRK20240110-1.log", 4000)
    plant(tmp_path, "MSGTRK20240110-2.log", 4000)
    plant(tmp_path, "MSGTRK20240110-10.log", 4000)  # numeric order: -10 after -2
    # Not ours: neither counted nor deleted.
    (tmp_path / "unrelated.txt").write_bytes(b"y" * 50_000)
    log = make_log(tmp_path, max_directory_size=5000)
    log.log("SEND", "SMTP")  # now: a new file for today
    log.close()
    names = log_files(tmp_path)
    assert "MSGTRK20240105-1.log" not in names
    assert "MSGTRK20240110-1.log" not in names
    assert "MSGTRK20240110-2.log" not in names
    assert "MSGTRK20240110-10.log" in names
    assert len(names) == 2 and (tmp_path / "unrelated.txt").exists()


def test_prune_never_deletes_the_current_file(tmp_path: Path) -> None:
    log = make_log(tmp_path, max_directory_size=10, max_file_size=700)
    for i in range(3):
        log.log("SEND", "SMTP", when=time.time() + i)
    log.close()
    names = log_files(tmp_path)
    # Each roll pruned the previous file; the current one always survives.
    assert len(names) == 1
    assert len(search(tmp_path)) == 1


def test_prune_spares_the_current_file_even_when_it_is_the_oldest(
    tmp_path: Path,
) -> None:
    plant(tmp_path, "MSGTRK20240601-1.log", 4000)
    log = make_log(tmp_path, max_directory_size=10)
    log.flush()  # start-up: the planted file alone exceeds the limit
    assert log_files(tmp_path) == []
    plant(tmp_path, "MSGTRK20240601-1.log", 4000)
    log.log("SEND", "SMTP", when=T0)  # a late event: its file (20240301) sorts first
    log.flush()
    assert log_files(tmp_path) == ["MSGTRK20240301-1.log"]
    assert len(search(tmp_path)) == 1


def test_prune_by_age(tmp_path: Path) -> None:
    plant(tmp_path, "MSGTRK20240101-1.log", 100, age_days=40)
    plant(tmp_path, "MSGTRK20240102-1.log", 100, age_days=31)
    plant(tmp_path, "MSGTRK20240103-1.log", 100, age_days=29)
    log = make_log(tmp_path)
    log.flush()  # start: prunes even with nothing to write
    assert log_files(tmp_path) == ["MSGTRK20240103-1.log"]
    assert log.last_error is None


def test_max_age_zero_never_expires(tmp_path: Path) -> None:
    plant(tmp_path, "MSGTRK20200101-1.log", 100, age_days=4000)
    log = make_log(tmp_path, max_age=0)
    log.log("SEND", "SMTP")
    log.close()
    assert "MSGTRK20200101-1.log" in log_files(tmp_path)


def test_prune_runs_at_roll_not_only_at_start(tmp_path: Path) -> None:
    log = make_log(tmp_path, max_file_size=700)
    log.log("SEND", "SMTP")
    log.flush()  # start-up prune happens here
    old = plant(tmp_path, "MSGTRK20240101-1.log", 100, age_days=90)
    log.flush()  # no roll: nothing pruned
    assert old.exists()
    log.log("SEND", "SMTP")  # rolls to -2 (files hold one event at this size)
    log.flush()
    assert not old.exists()


# ---- disk failures ------------------------------------------------------------------------


def test_flush_failure_keeps_events_and_recovers(tmp_path: Path) -> None:
    target = tmp_path / "track"
    target.write_text("a file where the directory should be")
    log = make_log(target)
    seed_events(log)
    log.flush()  # must not raise
    assert isinstance(log.last_error, OSError)
    assert log.buffered == 5
    log.log("SEND", "SMTP", when=T0 + 5)
    log.flush()
    assert log.buffered == 6
    target.unlink()
    log.flush()
    assert log.last_error is None and log.buffered == 0
    assert [e["event-id"] for e in search(target)] == [
        "RECEIVE", "RESOLVE", "DELIVER", "RECEIVE", "DSN", "SEND",
    ]  # fmt: skip


def test_enospc_midway_leaves_no_half_line_and_no_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = make_log(tmp_path, max_file_size=1500)
    for i in range(3):
        log.log("SEND", "SMTP", message_id=f"a{i}", when=T0 + i)
    log.flush()
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[:17])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    for i in range(3, 12):
        log.log("SEND", "SMTP", message_id=f"a{i}", when=T0 + i)
    monkeypatch.setattr(tracking.os, "write", full_disk)
    log.flush()
    monkeypatch.undo()
    assert isinstance(log.last_error, OSError) and log.last_error.errno == errno.ENOSPC
    assert log.buffered == 9
    for name in log_files(tmp_path):
        # Truncated back after the partial write: no torn line.
        assert (tmp_path / name).read_bytes().endswith(b"\n")
    log.flush()
    assert log.last_error is None
    assert [e["message-id"] for e in search(tmp_path)] == [f"a{i}" for i in range(12)]


def test_events_logged_during_a_failed_flush_stay_behind_the_requeued_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = make_log(tmp_path)
    log.flush()  # start-up done; the next flush goes straight to writing
    log.log("SEND", "SMTP", message_id="old", when=T0 + 5)

    def log_then_fail(*_a: Any, **_k: Any) -> int:
        log.log("SEND", "SMTP", message_id="new", when=T0)  # from the event loop, meanwhile
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tracking.os, "open", log_then_fail)
    log.flush()
    monkeypatch.undo()
    log.flush()
    [file] = tmp_path.iterdir()
    assert [e["message-id"] for e in data_lines(file)] == ["old", "new"]


def test_failure_after_some_files_requeues_only_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = make_log(tmp_path, max_file_size=1000)
    for i in range(8):
        log.log("SEND", "SMTP", message_id=f"b{i}", when=T0 + i)
    real_open = os.open
    opened: list[str] = []

    def open_twice(path: Any, flags: int, mode: int = 0o777) -> int:
        opened.append(str(path))
        if len(opened) > 2:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(tracking.os, "open", open_twice)
    log.flush()
    monkeypatch.undo()
    assert isinstance(log.last_error, PermissionError)
    written = len(search(tmp_path))
    assert 0 < written < 8 and log.buffered == 8 - written
    log.flush()
    assert [e["message-id"] for e in search(tmp_path)] == [f"b{i}" for i in range(8)]


def test_buffer_is_bounded_and_drops_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracking, "MAX_BUFFERED_EVENTS", 5)
    target = tmp_path / "blocked"
    target.write_text("")
    log = make_log(target)
    for i in range(4):
        log.log("SEND", "SMTP", message_id=f"c{i}", when=T0 + i)
    log.flush()  # fails: the four are requeued
    for i in range(4, 8):
        log.log("SEND", "SMTP", message_id=f"c{i}", when=T0 + i)
    log.flush()
    assert log.buffered == 5 and log.dropped == 3
    target.unlink()
    log.flush()
    assert [e["message-id"] for e in search(target)] == [f"c{i}" for i in range(3, 8)]


def test_log_alone_bounds_the_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "MAX_BUFFERED_EVENTS", 5)
    log = make_log(tmp_path)
    for i in range(8):
        log.log("SEND", "SMTP", message_id=f"d{i}", when=T0 + i)
    assert log.buffered == 5 and log.dropped == 3
    log.flush()
    assert [e["message-id"] for e in search(tmp_path)] == [f"d{i}" for i in range(3, 8)]


def test_requeue_after_failure_bounds_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "blocked"
    target.write_text("")
    log = make_log(target)
    for i in range(8):
        log.log("SEND", "SMTP", message_id=f"e{i}", when=T0 + i)
    monkeypatch.setattr(tracking, "MAX_BUFFERED_EVENTS", 5)  # shrinks before the requeue
    log.flush()
    assert log.buffered == 5 and log.dropped == 3


def test_log_after_close_is_ignored(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    log.close()
    log.log("SEND", "SMTP", when=T0)
    assert log.buffered == 0


# ---- the flusher task ----------------------------------------------------------------------


def test_run_flusher_flushes_periodically_and_on_cancel(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, int]:
        log = make_log(tmp_path)
        task = asyncio.create_task(log.run_flusher(interval=0.01))
        log.log("RECEIVE", "SMTP", when=T0)
        for _ in range(200):
            await asyncio.sleep(0.01)
            if search(tmp_path):
                break
        periodic = len(search(tmp_path))
        slow = asyncio.create_task(make_log(tmp_path).run_flusher(interval=3600))
        await asyncio.sleep(0)
        log.log("SEND", "SMTP", when=T0 + 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        return periodic, len(search(tmp_path))

    assert asyncio.run(scenario()) == (1, 2)


# ---- CLI formatting ------------------------------------------------------------------------


def test_format_table(seeded: Path) -> None:
    out = format_events(search(seeded), "table")
    lines = out.splitlines()
    assert lines[0].split() == [
        "Timestamp",
        "EventId",
        "Source",
        "Sender",
        "Recipients",
        "MessageSubject",
    ]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 7
    assert "{Alice@Example.test, bob@example.test}" in lines[2]
    assert "STOREDRIVER" in lines[4] and "Quarterly Report" in lines[4]


def test_format_list_and_json(seeded: Path) -> None:
    events = search(seeded)
    listing = format_events(events, "list")
    assert listing.count("EventId") == 5
    assert "MessageSubject          : Undeliverable: lunch?" in listing
    assert "RelatedRecipientAddress : alias@example.test" in listing
    as_json = format_events(events, "json").splitlines()
    assert [json.loads(line) for line in as_json] == events
    custom = dict(events[0], **{"custom-data": {"k": "v"}})
    assert "CustomData              : @{k=v}" in format_events([custom], "list")  # as PowerShell
    with pytest.raises(ValueError):
        format_events(events, "csv")


def test_format_escapes_control_characters(tmp_path: Path) -> None:
    log = make_log(tmp_path)
    log.log("RECEIVE", "SMTP", subject="evil\x1b[2J\nFake: row", when=T0)
    log.close()
    events = search(tmp_path)
    for fmt in ("table", "list"):
        out = format_events(events, fmt)
        assert "\x1b" not in out and "\\x1b[2J\\nFake" in out
    assert len(format_events(events, "table").splitlines()) == 3
    assert "\x1b" not in format_events(events, "json")


# ---- several writers (the workers of one server) in one folder -------------------------------


def test_worker_0_keeps_the_names_of_a_single_process_server() -> None:
    assert log_writer(WorkerSlot()) == ""
    assert log_writer(WorkerSlot(0, 4)) == ""
    assert log_writer(WorkerSlot(3, 4)) == "W3"
    assert TrackingSettings(path=Path("x")).writer == ""
    assert TrackingSettings(path=Path("x")).writers == 1


@pytest.mark.parametrize("writer", ["W-1", "W_1", "../W1", "W 1", "W" * 17])
def test_a_writer_name_is_letters_and_digits(tmp_path: Path, writer: str) -> None:
    with pytest.raises(ValueError):
        make_log(tmp_path, writer=writer)


def test_a_folder_has_at_least_one_writer(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_log(tmp_path, writers=0)


def test_two_writers_write_files_of_their_own(tmp_path: Path) -> None:
    first, second = make_log(tmp_path, writers=2), make_log(tmp_path, writer="W1", writers=2)
    for i in range(4):
        (first if i % 2 == 0 else second).log(
            "RECEIVE", "SMTP", internal_message_id=str(i), when=T0 + i
        )
    second.log("DELIVER", "STOREDRIVER", internal_message_id="4", when=T0 + 86400)
    first.close()
    second.close()
    assert log_files(tmp_path) == [
        "MSGTRK20240301-1.log",
        "MSGTRK_W1_20240301-1.log",
        "MSGTRK_W1_20240302-1.log",
    ]
    mine = [e["internal-message-id"] for e in data_lines(tmp_path / "MSGTRK20240301-1.log")]
    theirs = [e["internal-message-id"] for e in data_lines(tmp_path / "MSGTRK_W1_20240301-1.log")]
    assert mine == ["0", "2"] and theirs == ["1", "3"]


def test_search_merges_every_writer_in_time_order(tmp_path: Path) -> None:
    writers = [make_log(tmp_path, writer=w, writers=3) for w in ("", "W1", "W2")]
    # out of step on purpose: each writer's events interleave with the others'
    moments = [(2, 0), (0, 1), (1, 2), (0, 3), (2, 4), (1, 5), (1, 86400), (0, 86401)]
    for k, offset in moments:
        writers[k].log("SEND", "SMTP", internal_message_id=str(offset), when=T0 + offset)
    for log in reversed(writers):
        log.close()
    assert len(log_files(tmp_path)) == 5  # W2 logged on the first day only
    found = [e["internal-message-id"] for e in search(tmp_path)]
    assert found == ["0", "1", "2", "3", "4", "5", "86400", "86401"]
    assert [e["internal-message-id"] for e in search(tmp_path, result_size=3)] == ["0", "1", "2"]
    later = search(tmp_path, start=datetime.fromtimestamp(T0 + 3, UTC))
    assert [e["internal-message-id"] for e in later] == ["3", "4", "5", "86400", "86401"]


def test_each_writer_rotates_and_restarts_in_its_own_family(tmp_path: Path) -> None:
    first = make_log(tmp_path, max_file_size=700, writers=2)
    for i in range(3):
        first.log("SEND", "SMTP", when=T0 + i)
    first.close()
    assert log_files(tmp_path) == [f"MSGTRK20240301-{n}.log" for n in (1, 2, 3)]
    theirs = (tmp_path / "MSGTRK20240301-3.log").read_bytes()
    for attempt in range(2):  # a first start, then a restart that appends to its own file
        second = make_log(tmp_path, writer="W1", writers=2)
        second.log("SEND", "SMTP", when=T0 + 10 + attempt)
        second.close()
    assert log_files(tmp_path) == [
        *(f"MSGTRK20240301-{n}.log" for n in (1, 2, 3)),
        "MSGTRK_W1_20240301-1.log",
    ]
    assert len(data_lines(tmp_path / "MSGTRK_W1_20240301-1.log")) == 2
    assert (tmp_path / "MSGTRK20240301-3.log").read_bytes() == theirs


def family_size(path: Path, start: str) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.startswith(start))


def test_each_writer_prunes_its_own_family_to_its_share(tmp_path: Path) -> None:
    ours = [
        plant(tmp_path, "MSGTRK20240105-1.log", 4000),
        plant(tmp_path, "MSGTRK20240106-1.log", 4000),
        plant(tmp_path, "MSGTRK20240107-1.log", 100, age_days=40),
    ]
    plant(tmp_path, "MSGTRK_W1_20240104-1.log", 100, age_days=40)
    plant(tmp_path, "MSGTRK_W1_20240105-1.log", 4000)
    plant(tmp_path, "MSGTRK_W1_20240110-1.log", 4000)
    # 12,200 bytes in the folder, 10,000 allowed: writer W1 of 2 may keep 5,000
    second = make_log(tmp_path, writer="W1", writers=2, max_directory_size=10_000)
    second.log("SEND", "SMTP")
    second.close()
    assert all(p.exists() for p in ours)  # never another writer's file, however old or big
    w1 = [n for n in log_files(tmp_path) if n.startswith("MSGTRK_W1_")]
    assert w1[0] == "MSGTRK_W1_20240110-1.log" and len(w1) == 2
    assert family_size(tmp_path, "MSGTRK_W1_") <= 5000
    first = make_log(tmp_path, writers=2, max_directory_size=10_000)
    first.flush()  # start-up prunes
    assert [p.exists() for p in ours] == [False, True, False]
    assert family_size(tmp_path, "MSGTRK2") <= 5000
    assert [n for n in log_files(tmp_path) if n.startswith("MSGTRK_W1_")] == w1


async def test_recovery_after_a_crash_looks_only_at_its_own_family(tmp_path: Path) -> None:
    """Each worker numbers from its own outbox: worker 1's leftover events are copied even
    when worker 0's files of that day hold higher numbers, and never twice."""
    from hubport.core import queue as q
    from hubport.core.store import Store

    logs = tmp_path / "logs"
    stores = [Store(tmp_path / f"mail{k}.que") for k in (0, 1)]
    for store in stores:
        await store.open(q.SCHEMA)

    def tracker(writer: str) -> TrackingLog:
        return TrackingLog(TrackingSettings(path=logs, writer=writer, writers=2), "hub1")

    async def commit(store: Any, log: TrackingLog, names: list[str], when: float) -> None:
        for i, name in enumerate(names):
            await store.write(lambda c, n=name, i=i: log.log(
                "RECEIVE", "SMTP", message_id=n, conn=c, when=when + i))

    first, second = tracker(""), tracker("W1")
    await first.attach(stores[0])
    await second.attach(stores[1])
    for store, base in zip(stores, (1_000_000, 1000), strict=True):  # worker 1 numbers lower
        await store.write(lambda c, b=base: c.execute(
            "UPDATE sqlite_sequence SET seq=? WHERE name='tracking_outbox'", (b,)))
    await commit(stores[0], first, ["a1", "a2"], T0)
    await asyncio.to_thread(first.close)
    await commit(stores[1], second, ["b1", "b2"], T0 + 10)
    second.flush()  # copied; the trim never happens (a crash)
    await commit(stores[1], second, ["b3"], T0 + 20)  # committed, never copied
    # the crash of worker 1: its TrackingLog is abandoned as is

    again = tracker("W1")
    await again.attach(stores[1])
    await asyncio.to_thread(again.close)
    assert [e["message-id"] for e in search(logs)] == ["a1", "a2", "b1", "b2", "b3"]
    numbers = [e["sequence-number"] for e in data_lines(logs / "MSGTRK_W1_20240301-1.log")]
    assert numbers == [1001, 1002, 1003]
    for store in stores:
        await store.close()
