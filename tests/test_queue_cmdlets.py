"""The queue cmdlets against a running daemon through its control socket
(docs/exchange.md, "Queue cmdlets").

A real daemon subprocess and the real ``hubport`` command. The next hop is a tiny plugin
module beside the organization file: a Delivery Agent connector for ``example.net`` whose
deliveries defer (``451 4.4.1``) while the file ``hop-mode`` says ``defer`` and succeed
(recorded in ``delivered.log``) when it says ``deliver``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from daemon_process import (
    Daemon,
    DaemonPool,
    child_env,
    daemon_pool,
    hubport,
    hubport_command,
)
from hubport.core import queue as q
from hubport.core.queue_admin import QUEUE_FIELDS, AdminError, parse_filter
from support import BASE_ORG, events, maildir, message, replay_file, wait_for_sync

PLUGIN = '''
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from hubport.core.api import DeferQueue, ItemResult
from hubport.core import hookimpl
from hubport.core.connectors import Connector
from hubport.core.model import SmtpResponse

HERE = Path(__file__).parent
TEMP = SmtpResponse(451, "4.4.1", "Connection timed out (test hop)")


class HopConnector(Connector):
    section: ClassVar[str] = "test_hop"
    delivery_type: ClassVar[str] = "DeliveryAgent"
    kind: ClassVar[str] = "DeliveryAgentConnector"

    @classmethod
    def from_config(cls, reader: Any, ctx: Any) -> HopConnector:
        return cls(**cls.read_common(reader, ctx))


@hookimpl
def register_connector_types(register: Any) -> None:
    register(HopConnector)


@hookimpl
def deliver(next_hop: Any, connector: Any, items: list[Any], context: Any) -> Any:
    if not isinstance(connector, HopConnector):
        return None
    if (HERE / "hop-mode").read_text().strip() != "deliver":
        return DeferQueue(TEMP)
    with open(HERE / "delivered.log", "a") as out:
        for item in items:
            for r in item.recipients:
                out.write(f"{r.address} {item.message.subject}\\n")
    return [ItemResult.success(item) for item in items]
'''

HOP = """
[[test_hop]]
Name = "Hop"
AddressSpaces = ["example.net"]
"""


def write_config(root: Path, retry: str = "1s") -> Path:
    """The shared test organization with the plugin; ``retry`` sets every retry interval."""
    (root / "hophook.py").write_text(PLUGIN)
    (root / "hop-mode").write_text("defer")
    text = '[hubport]\nPlugins = ["hophook"]\n' + BASE_ORG.format(
        server_extra="", foreign_extra="", extra=HOP)
    text = re.sub(r'(?m)^(\w*RetryInterval) = "1s"$', rf'\1 = "{retry}"', text)
    path = root / "org.toml"
    path.write_text(text)
    return path


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def start(pool: DaemonPool, root: Path, retry: str = "1s") -> Daemon:
    daemon = pool.start(config=write_config(root, retry))
    daemon.wait_ready()
    return daemon


def cmd(root: Path, *args: str) -> Any:
    """A queue command with ``--format json``; its parsed output (it must succeed)."""
    done = hubport(*args, "--config", str(root / "org.toml"), "--format", "json", cwd=root)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def refused(root: Path, *args: str) -> str:
    done = hubport(*args, "--config", str(root / "org.toml"), cwd=root)
    assert done.returncode == 1, (done.stdout, done.stderr)
    return done.stderr


def queue_rows(root: Path, *args: str) -> dict[str, dict[str, Any]]:
    return {r["identity"]: r for r in cmd(root, "get-queue", *args)}


def hop_queue(root: Path) -> dict[str, Any] | None:
    rows = [r for r in cmd(root, "get-queue") if r.get("connector") == "Hop"]
    return rows[0] if rows else None


def submit(root: Path, name: str, to: str, subject: str,
           sender: str = "alice@contoso.test") -> None:
    data = replay_file(sender, [to], message(sender=sender, to=to, subject=subject))
    tmp = root / "replay" / f".{name}.tmp"
    tmp.parent.mkdir(exist_ok=True)
    tmp.write_bytes(data)
    os.rename(tmp, root / "replay" / name)


def delivered(root: Path) -> list[str]:
    log = root / "delivered.log"
    return log.read_text().splitlines() if log.exists() else []


def mode(root: Path, value: str) -> None:
    (root / "hop-mode").write_text(value)


def wait_retry(root: Path, count: int = 1) -> dict[str, Any]:
    return wait_for_sync(lambda: (r := hop_queue(root)) and r["status"] == "Retry"
                         and r["message_count"] == count and r, timeout=20)


# -- Get-Queue, Get-Message, Retry-Queue ---------------------------------------------------


def test_queue_in_retry_is_listed_filtered_and_retried_now(tmp_path: Path,
                                                           pool: DaemonPool) -> None:
    start(pool, tmp_path, retry="10m")
    submit(tmp_path, "1.eml", "x@example.net", "stuck")
    row = wait_retry(tmp_path)
    ident = row["identity"]
    assert row["delivery_type"] == "DeliveryAgent" and row["next_hop"] == "example.net"
    assert "4.4.1" in row["last_error"] and row["next_retry"] > time.time() + 60

    assert list(queue_rows(tmp_path, "--filter", "Status -eq 'Retry'")) == [ident]
    assert list(queue_rows(tmp_path, "--filter", "NextHopDomain -eq 'example.net'")) == [ident]
    assert ident in queue_rows(tmp_path, "--filter", "DeliveryType -eq 'DeliveryAgent'")
    assert list(queue_rows(tmp_path, "--filter", "MessageCount -gt 0")) == [ident]
    assert queue_rows(tmp_path, "--filter", "MessageCount -gt 5") == {}
    assert list(queue_rows(tmp_path, "--identity", ident)) == [ident]
    assert "unknown filter field" in refused(tmp_path, "get-queue", "--filter", "Colour -eq 1")

    items = cmd(tmp_path, "get-message", "--queue", ident)
    assert len(items) == 1
    item = items[0]
    assert item["identity"] == f"{ident}\\{item['message']}"
    assert (item["from"], item["subject"], item["status"]) == (
        "alice@contoso.test", "stuck", "Retry")
    assert item["size"] > 0 and item["queue_identity"] == ident and "4.4.1" in item["last_error"]
    assert [(r["address"], r["status"]) for r in item["recipients"]] == [("x@example.net",
                                                                          "Retry")]
    assert cmd(tmp_path, "get-message", "--identity", item["identity"])[0]["subject"] == "stuck"
    table = hubport("get-message", "--config", str(tmp_path / "org.toml"), cwd=tmp_path)
    assert table.returncode == 0 and item["identity"] in table.stdout and "stuck" in table.stdout

    mode(tmp_path, "deliver")
    cmd(tmp_path, "retry-queue", "--identity", ident)  # long before its 10-minute retry
    wait_for_sync(lambda: delivered(tmp_path) == ["x@example.net stuck"], timeout=20)
    wait_for_sync(lambda: hop_queue(tmp_path)["message_count"] == 0)
    assert "not in Retry" in refused(tmp_path, "retry-queue", "--identity", ident)


def test_retry_queue_resubmit_sends_unreachable_through_the_categorizer(
        tmp_path: Path, pool: DaemonPool) -> None:
    start(pool, tmp_path)
    submit(tmp_path, "1.eml", "far@elsewhere.test", "lost")
    wait_for_sync(lambda: queue_rows(tmp_path)["HUB01\\Unreachable"]["message_count"] == 1)
    item = cmd(tmp_path, "get-message", "--queue", "HUB01\\Unreachable")[0]
    assert item["recipients"][0]["status"] == "Unreachable"
    done = cmd(tmp_path, "retry-queue", "--identity", "HUB01\\Unreachable", "--resubmit")
    assert done["resubmitted"] == 1
    # still no route: categorized again, back in Unreachable (tracked as a second pass)
    wait_for_sync(lambda: queue_rows(tmp_path)["HUB01\\Unreachable"]["message_count"] == 1)


# -- suspension --------------------------------------------------------------------------


def test_suspended_queue_message_and_submission_hold_mail_until_resumed(
        tmp_path: Path, pool: DaemonPool) -> None:
    start(pool, tmp_path)
    mode(tmp_path, "deliver")
    submit(tmp_path, "1.eml", "one@example.net", "first")
    wait_for_sync(lambda: delivered(tmp_path) == ["one@example.net first"], timeout=20)
    ident = hop_queue(tmp_path)["identity"]

    # a suspended delivery queue holds its mail
    assert cmd(tmp_path, "suspend-queue", "--identity", ident)["status"] == "Suspended"
    submit(tmp_path, "2.eml", "two@example.net", "second")
    wait_for_sync(lambda: hop_queue(tmp_path)["message_count"] == 1)
    time.sleep(1.5)  # a working queue would have delivered by now
    assert delivered(tmp_path) == ["one@example.net first"]
    assert hop_queue(tmp_path)["status"] == "Suspended"
    cmd(tmp_path, "resume-queue", "--identity", ident)
    wait_for_sync(lambda: len(delivered(tmp_path)) == 2, timeout=20)

    # a suspended Submission queue pauses the categorizer
    cmd(tmp_path, "suspend-queue", "--identity", "HUB01\\Submission")
    submit(tmp_path, "3.eml", "three@example.net", "third")
    wait_for_sync(lambda: queue_rows(tmp_path)["HUB01\\Submission"]["message_count"] == 1)
    held = cmd(tmp_path, "get-message", "--queue", "HUB01\\Submission")
    assert [i["subject"] for i in held] == ["third"]
    time.sleep(1.0)
    assert len(delivered(tmp_path)) == 2
    cmd(tmp_path, "resume-queue", "--identity", "HUB01\\Submission")
    wait_for_sync(lambda: len(delivered(tmp_path)) == 3, timeout=20)

    # a suspended message is held in a working queue; the queue's other mail flows
    mode(tmp_path, "defer")
    submit(tmp_path, "4.eml", "four@example.net", "fourth")
    wait_retry(tmp_path)
    item = cmd(tmp_path, "get-message", "--queue", ident)[0]
    assert cmd(tmp_path, "suspend-message", "--identity", item["identity"])["status"] == \
        "Suspended"
    mode(tmp_path, "deliver")
    submit(tmp_path, "5.eml", "five@example.net", "fifth")
    wait_for_sync(lambda: "five@example.net fifth" in delivered(tmp_path), timeout=20)
    time.sleep(1.5)  # past the 1 s retry interval
    assert "four@example.net fourth" not in delivered(tmp_path)
    assert cmd(tmp_path, "get-message", "--identity", item["identity"])[0]["status"] == \
        "Suspended"
    cmd(tmp_path, "resume-message", "--identity", item["identity"])
    wait_for_sync(lambda: "four@example.net fourth" in delivered(tmp_path), timeout=20)


# -- removal -----------------------------------------------------------------------------


def test_remove_message_silently_or_with_an_ndr_and_always_tracked(
        tmp_path: Path, pool: DaemonPool) -> None:
    start(pool, tmp_path, retry="10m")
    submit(tmp_path, "1.eml", "quiet@example.net", "quiet")
    submit(tmp_path, "2.eml", "loud@example.net", "loud")
    wait_retry(tmp_path, count=2)
    items = {i["subject"]: i for i in cmd(tmp_path, "get-message", "--queue",
                                          hop_queue(tmp_path)["identity"])}

    done = cmd(tmp_path, "remove-message", "--identity", items["quiet"]["identity"])
    assert done["removed"] == ["quiet@example.net"] and not done["ndr_sent"]
    drops = wait_for_sync(lambda: events(tmp_path, event_id="DROP"))
    assert drops[0]["source"] == "ADMIN" and drops[0]["recipient-address"] == [
        "quiet@example.net"]

    done = cmd(tmp_path, "remove-message", "--identity", items["loud"]["identity"],
               "--with-ndr")
    assert done["ndr_sent"]
    fails = wait_for_sync(lambda: events(tmp_path, event_id="FAIL",
                                         recipients=["loud@example.net"]))
    assert fails[0]["source"] == "ADMIN" and "QUEUE.Admin" in fails[0]["recipient-status"][0]
    ndrs = wait_for_sync(lambda: maildir(tmp_path, "Alice"), timeout=20)
    assert len(ndrs) == 1  # the silent removal sent nothing
    text = ndrs[0].read_bytes().decode("ascii", "replace")
    assert "loud@example.net" in text and "QUEUE.Admin" in text and "quiet@" not in text
    wait_for_sync(lambda: hop_queue(tmp_path)["message_count"] == 0)
    assert "no message" in refused(tmp_path, "remove-message", "--identity",
                                   items["loud"]["identity"])


def test_the_queue_cmdlets_run_as_exchange_administrators_type_them(
        tmp_path: Path, pool: DaemonPool) -> None:
    """One line each, quotes as documents print them; Remove-Message tells the sender by
    default, as Exchange does; -WhatIf changes nothing."""
    start(pool, tmp_path, retry="10m")
    submit(tmp_path, "1.eml", "typed@example.net", "typed")
    wait_retry(tmp_path)
    queue = hop_queue(tmp_path)["identity"]  # type: ignore[index]
    config = ("--config", str(tmp_path / "org.toml"))

    def line(text: str) -> subprocess.CompletedProcess[str]:
        return hubport(text, *config, cwd=tmp_path)

    done = line(f"Get-Message -Queue ‘{queue}’ -ResultSize Unlimited | ConvertTo-Json")
    assert done.returncode == 0, done.stderr
    [item] = json.loads(done.stdout)
    assert item["subject"] == "typed"
    listed = line(f"get-message -q '«{queue}»' | fl")
    assert listed.returncode == 0 and f"Identity          : {item['identity']}" in \
        listed.stdout, listed.stdout
    assert json.loads(hubport(f"Get-Queue '{queue}'", *config, "--json",
                              cwd=tmp_path).stdout)[0]["message_count"] == 1

    retrying = line("Get-Queue | Where-Object {$_.Status -eq 'Retry'} | ConvertTo-Json")
    assert [r["identity"] for r in json.loads(retrying.stdout)] == [queue], retrying

    what_if = line(f"Remove-Message -Identity '{item['identity']}' -WhatIf")
    assert what_if.returncode == 0 and what_if.stdout.startswith("What if:"), what_if
    assert hop_queue(tmp_path)["message_count"] == 1  # type: ignore[index]

    bad = line(f"Remove-Message -Identity '{item['identity']}' -WithNDR")
    assert bad.returncode == 2 and "single quotes" in bad.stderr, bad.stderr
    typo = line(f"Remove-Message -Identiy '{item['identity']}'")
    assert typo.returncode == 2 and 'did you mean "Identity"' in typo.stderr, typo.stderr

    done = line(f"Remove-Message '{item['identity']}' -Confirm:$false")
    assert done.returncode == 0, done.stderr
    ndr = wait_for_sync(lambda: maildir(tmp_path, "Alice"), timeout=20)  # -WithNDR $true
    assert b"typed@example.net" in ndr[0].read_bytes()


# -- export ------------------------------------------------------------------------------


def test_exported_message_dropped_into_replay_is_delivered(tmp_path: Path,
                                                           pool: DaemonPool) -> None:
    start(pool, tmp_path, retry="10m")
    submit(tmp_path, "1.eml", "x@example.net", "exported")
    wait_retry(tmp_path)
    ident = cmd(tmp_path, "get-message")[0]["identity"]
    out = tmp_path / "saved.eml"
    assert "suspended" in refused(tmp_path, "export-message", "--identity", ident,
                                  "--path", str(out))
    cmd(tmp_path, "suspend-message", "--identity", ident)
    done = cmd(tmp_path, "export-message", "--identity", ident, "--path", str(out))
    data = out.read_bytes()
    assert done["size"] == len(data) and data.startswith(b"X-Sender: <alice@contoso.test>")
    assert b"X-Receiver: <x@example.net>" in data and b"Subject: exported" in data
    assert "does not overwrite" in refused(tmp_path, "export-message", "--identity", ident,
                                           "--path", str(out))
    assert out.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".saved")] == []

    cmd(tmp_path, "remove-message", "--identity", ident)
    mode(tmp_path, "deliver")
    os.rename(out, tmp_path / "replay" / "saved.eml")
    # the copy waits in the queue, which stays in Retry (10 minutes) until retried
    wait_for_sync(lambda: (r := hop_queue(tmp_path)) and r["message_count"] == 1, timeout=20)
    cmd(tmp_path, "retry-queue", "--identity", hop_queue(tmp_path)["identity"])
    wait_for_sync(lambda: delivered(tmp_path) == ["x@example.net exported"], timeout=20)


# -- the control socket ------------------------------------------------------------------


def test_no_daemon_is_a_clear_error(tmp_path: Path, pool: DaemonPool) -> None:
    write_config(tmp_path)
    expected = ("hubport: no hubport daemon is running for state folder var"
                " (no control socket at var/control.sock)\n")
    for args in (("get-queue",), ("suspend-queue", "--identity", "HUB01\\1"),
                 ("get-message",)):
        done = hubport(*args, "--config", str(tmp_path / "org.toml"), cwd=tmp_path)
        assert (done.returncode, done.stderr) == (1, expected)
    # a daemon that stops removes its socket; one that was killed leaves a stale one
    daemon = start(pool, tmp_path)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    done = hubport("get-queue", "--config", str(tmp_path / "org.toml"), cwd=tmp_path)
    assert (done.returncode, done.stderr) == (1, expected)
    daemon = start(pool, tmp_path)
    daemon.kill()
    assert "is stale" in refused(tmp_path, "get-queue")
    start(pool, tmp_path)  # the next daemon replaces the stale socket
    assert "HUB01\\Submission" in queue_rows(tmp_path)


def test_another_user_is_told_permission_denied_not_no_daemon(pool: DaemonPool) -> None:
    """The owner-only state folder hides the socket from other users: say so, not "no daemon"."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the command as another user")
    root = Path(tempfile.mkdtemp(prefix="hubport-perm-"))
    daemon = None
    try:
        os.chmod(root, 0o755)
        daemon = start(pool, root)
        for name in ("org.toml", "hophook.py", "hop-mode"):
            os.chmod(root / name, 0o644)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        probe = subprocess.run([*as_nobody, sys.executable, "-c", "import hubport.core.control"],
                               cwd=root, capture_output=True, text=True, check=False)
        if probe.returncode != 0:
            pytest.skip(f"this interpreter cannot run as another user: {probe.stderr[-200:]}")
        done = subprocess.run([*as_nobody, *hubport_command(), "get-queue", "--config",
                               str(root / "org.toml")], cwd=root, env=child_env(),
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "permission denied" in done.stderr and "no hubport daemon" not in done.stderr, (
            done.stderr)
        assert "HUB01\\Submission" in queue_rows(root)  # the owner still gets through
    finally:
        if daemon is not None and daemon.alive():
            daemon.kill()
            daemon.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def test_control_socket_is_owner_only(tmp_path: Path, pool: DaemonPool) -> None:
    start(pool, tmp_path)
    sock = tmp_path / "var" / "control.sock"
    mode_bits = os.lstat(sock).st_mode
    assert stat.S_ISSOCK(mode_bits) and stat.S_IMODE(mode_bits) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "var").st_mode) == 0o700
    # a bad request is answered, not fatal
    done = hubport("get-message", "--identity", "OTHER\\1\\2", "--config",
                   str(tmp_path / "org.toml"), cwd=tmp_path)
    assert done.returncode == 1 and "this daemon runs HUB01" in done.stderr
    assert "HUB01\\Poison" in queue_rows(tmp_path)


def test_daemon_upgrades_an_old_queue_database_and_delivers(tmp_path: Path,
                                                            pool: DaemonPool) -> None:
    old_schema = q.SCHEMA.replace(
        "    drop_intent TEXT,\n    suspended INTEGER NOT NULL DEFAULT 0"
        "  -- Suspend-Message on a delivery/Unreachable item\n", "    drop_intent TEXT\n")
    assert old_schema != q.SCHEMA
    db = tmp_path / "var" / "queue" / "mail.que"
    db.parent.mkdir(parents=True)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.executescript(old_schema)
        conn.execute(
            "INSERT INTO message (sender, size, source, received_at, expires_at, data)"
            " VALUES ('alice@contoso.test', 10, 'PICKUP', ?, ?, ?)",
            (time.time(), time.time() + 3600, message(subject="old queue")))
        conn.execute("INSERT INTO recipient (message, address, status)"
                     " VALUES (1, 'bob@contoso.test', 'Submitted')")
    start(pool, tmp_path)
    wait_for_sync(lambda: maildir(tmp_path, "Bob"), timeout=20)
    assert queue_rows(tmp_path)["HUB01\\Submission"]["message_count"] == 0


def test_filter_language() -> None:
    row = {"status": "Retry", "message_count": 7, "next_hop": "example.net",
           "delivery_type": "DeliveryAgent"}
    assert parse_filter("Status -eq 'retry' -and MessageCount -gt 5", QUEUE_FIELDS)(row)
    assert not parse_filter("MessageCount -le 6", QUEUE_FIELDS)(row)
    assert parse_filter('NextHopDomain -like "*.net"', QUEUE_FIELDS)(row)
    assert parse_filter("DeliveryType -ne Smtp", QUEUE_FIELDS)(row)
    for bad in ("Status = Retry", "Colour -eq red", "MessageCount -gt"):
        with pytest.raises(AdminError):
            parse_filter(bad, QUEUE_FIELDS)


async def test_control_arguments_must_have_their_json_type() -> None:
    """"false" must never mean true: a string where a flag belongs is refused."""
    from hubport.core.queue_admin import AdminError, QueueAdmin

    admin = QueueAdmin(None)  # type: ignore[arg-type]  # refused before the queue is touched
    with pytest.raises(AdminError, match="with_ndr must be bool"):
        await admin.handle({"op": "remove-message",
                            "args": {"identity": "HUB01\\1\\1", "with_ndr": "false"}})
    with pytest.raises(AdminError, match="resubmit must be bool"):
        await admin.handle({"op": "retry-queue", "args": {"identity": "HUB01\\1",
                                                          "resubmit": "no"}})
