"""Crash tests for large messages, whose bodies live in spool files beside the queue
(core/body.py): SIGKILL the real daemon at the two moments that matter and check that the
message is delivered whole or its leftover file removed, never lost and never leaked."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiosmtplib import SMTP, SMTPException

from daemon_process import DaemonPool, daemon_pool
from smtp_support import free_port, receive_connector
from support import maildir, write_org

SIZE = 3 * 1024 * 1024  # over the 1 MiB spool threshold
LINE = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def large_message(tag: str) -> bytes:
    head = (f"From: alice@contoso.test\r\nTo: bob@contoso.test\r\nSubject: large {tag}\r\n"
            f"Message-ID: <{tag}@contoso.test>\r\n\r\n").encode()
    return head + LINE * (SIZE // len(LINE))


def spool_files(root: Path) -> list[Path]:
    folder = root / "var" / "queue" / "mail.spool"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def wait_for(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        seen = check()
        if seen:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s (last: {seen!r})")
        time.sleep(0.1)


def org(root: Path, port: int) -> Path:
    return write_org(root, extra=receive_connector("Default", [f"127.0.0.1:{port}"],
                                                   PermissionGroups=["AnonymousUsers"]))


@pytest.mark.timeout(120)
def test_a_large_message_committed_before_the_kill_is_delivered_whole_after_restart(
        tmp_path: Path, pool: DaemonPool) -> None:
    port = free_port()
    config = org(tmp_path, port)
    daemon = pool.start(config=config, failpoints="after_receive_commit_before_reply:kill:1")
    daemon.wait_ready()
    content = large_message("committed")

    async def send() -> None:
        async with SMTP(hostname="127.0.0.1", port=port, timeout=60, start_tls=False) as client:
            await client.sendmail("alice@contoso.test", ["bob@contoso.test"], content)

    with pytest.raises((SMTPException, OSError)):
        asyncio.run(send())  # the 250 never comes: the daemon dies after the commit
    assert daemon.wait(30) == -signal.SIGKILL
    assert len(spool_files(tmp_path)) == 1, "the committed body is in one spool file"

    survivor = pool.start(config=config)
    survivor.wait_ready()
    [delivered] = wait_for(lambda: maildir(tmp_path, "Bob"), 60, "the delivery")  # type: ignore[misc]
    data = delivered.read_bytes()
    assert b"\nReceived: from " in data[:400], data[:400]
    assert data.endswith(content.replace(b"\r\n", b"\n")), "the body arrived byte for byte"
    wait_for(lambda: not spool_files(tmp_path), 30, "the spool file's removal")
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(30) == 0


@pytest.mark.timeout(120)
def test_a_body_cut_off_by_a_kill_leaves_no_spool_file_after_restart(
        tmp_path: Path, pool: DaemonPool) -> None:
    port = free_port()
    config = org(tmp_path, port)
    daemon = pool.start(config=config)
    daemon.wait_ready()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        reader = conn.makefile("rb")

        def command(line: bytes, expect: bytes) -> None:
            conn.sendall(line)
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply = reader.readline()
            assert reply.startswith(expect), (line, reply)

        assert reader.readline().startswith(b"220")
        command(b"EHLO client.test\r\n", b"250")
        command(b"MAIL FROM:<alice@contoso.test>\r\n", b"250")
        command(b"RCPT TO:<bob@contoso.test>\r\n", b"250")
        command(b"DATA\r\n", b"354")
        conn.sendall(large_message("cut"))  # no terminating dot: the message never ends
        wait_for(lambda: spool_files(tmp_path), 30, "the body's spool file")
        daemon.kill()
        daemon.wait(30)
    left = spool_files(tmp_path)
    assert len(left) == 1

    survivor = pool.start(config=config)
    survivor.wait_ready()
    assert not spool_files(tmp_path), "the unnamed spool file is removed at start"
    assert "spool files of uncommitted messages removed" in survivor.log_text()
    assert maildir(tmp_path, "Bob") == []
    survivor.signal(signal.SIGTERM)
    assert survivor.wait(30) == 0
