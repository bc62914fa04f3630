"""Real disk faults: full and read-only filesystems under the drop folder and the queue.

Each test mounts a small tmpfs (the tests run as root, as CI does) so the kernel itself
answers ENOSPC or EROFS; no system call is faked. Where mounting is not permitted the tests
are skipped: tests/test_drop.py and tests/test_folders.py cover the same paths by patching.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon_process import child_env, daemon_pool, hubport, hubport_command
from smtp_support import Client, Reply, auth_plain, free_port, receive_connector
from support import (
    drop_files,
    drop_in,
    events,
    maildir,
    message,
    wait_for,
    wait_for_sync,
    write_org,
)

FAX = "IMCEAFAX-+2B15551234@contoso.test"


def _mount(point: Path, size: str) -> None:
    point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _remount(point: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[callable]:
    mounted: list[Path] = []

    def mount(relative: str, size: str = "512k") -> Path:
        point = tmp_path / relative
        _mount(point, size)
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill a filesystem to the last byte; returns the filler file (delete it to free)."""
    filler = folder / ".filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler



async def queue_row(root: Path, delivery_type: str) -> dict[str, Any]:
    """``hubport get-queue`` (JSON) row of the queue of ``delivery_type`` ({} if none)."""
    proc = await asyncio.create_subprocess_exec(
        *hubport_command(), "get-queue", "--json", "--config", str(root / "org.toml"),
        cwd=root, env=child_env(), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    rows = [r for r in json.loads(out) if r.get("delivery_type") == delivery_type]
    return rows[0] if rows else {}


async def queue_saying(root: Path, delivery_type: str, reason: str,
                       timeout: float = 20.0) -> dict[str, Any]:
    """Poll ``get-queue`` until the queue's LastError names ``reason``; the row."""
    deadline = asyncio.get_running_loop().time() + timeout
    row = await queue_row(root, delivery_type)
    while reason not in (row.get("last_error") or ""):
        assert asyncio.get_running_loop().time() < deadline, f"get-queue last showed {row}"
        await asyncio.sleep(0.2)
        row = await queue_row(root, delivery_type)
    return row


async def test_full_drop_folder_defers_then_delivers(hub_factory, tmpfs) -> None:
    drop = tmpfs("drop/Fax Gateway")
    filler = fill(drop)
    async with hub_factory() as hub:
        drop_in(hub.pickup, "f.eml", message(to=FAX, body="x" * 5000 + "\n"))
        defer = await wait_for(lambda: events(hub.root, event_id="DEFER"))
        assert "4.3.1" in defer[0]["recipient-status"][0]
        row = await queue_saying(hub.root, "NonSmtpGatewayDelivery", "4.3.1")
        assert "is full" in row["last_error"] and row["message_count"] == 1, row
        assert not drop_files(drop)
        assert not [p for p in drop.iterdir() if p.name.endswith(".tmp")]  # partial temp removed
        filler.unlink()
        files = await wait_for(lambda: drop_files(drop), timeout=15)
        assert len(files) == 1 and b"x" * 5000 in files[0].read_bytes()


async def test_read_only_drop_folder_defers_then_delivers(hub_factory, tmpfs) -> None:
    drop = tmpfs("drop/Fax Gateway")
    _remount(drop, "ro")
    async with hub_factory() as hub:
        drop_in(hub.pickup, "f.eml", message(to=FAX))
        defer = await wait_for(lambda: events(hub.root, event_id="DEFER"))
        assert "not writable" in defer[0]["recipient-status"][0]
        row = await queue_saying(hub.root, "NonSmtpGatewayDelivery", "not writable (EROFS)")
        assert row["last_error"].startswith("451 4.3.0 ") and row["message_count"] == 1, row
        _remount(drop, "rw")
        files = await wait_for(lambda: drop_files(drop), timeout=15)
        assert len(files) == 1


async def test_full_queue_disk_keeps_the_pickup_file_then_delivers(hub_factory, tmpfs) -> None:
    state = tmpfs("var", size="16m")
    # no disk meter: the commit itself must fail and keep the file (then the failed store
    # holds intake at High until its probe commits again)
    async with hub_factory(server_extra="EnableResourceMonitoring = false") as hub:
        drop_in(hub.pickup, "first.eml", message(subject="first"))
        await wait_for(lambda: maildir(hub.root, "Bob"))
        filler = fill(state)
        body = "y" * 300_000 + "\n"  # more than any free page the database still holds
        drop_in(hub.pickup, "second.eml", message(subject="second", body=body))
        # the commit fails: the file must stay in the folder under its own name
        await wait_for(lambda: not os.path.exists(hub.pickup / ".work")
                       or not any((hub.pickup / ".work").iterdir()), timeout=10)
        for _ in range(20):
            assert (hub.pickup / "second.eml").exists() or len(maildir(hub.root, "Bob")) == 2
            assert not list(hub.pickup.glob("*.bad"))
            await wait_for(lambda: True, interval=0.1)
        assert (hub.pickup / "second.eml").exists(), "acknowledged without a durable commit"
        filler.unlink()
        await wait_for(lambda: len(maildir(hub.root, "Bob")) == 2, timeout=20)
        assert not (hub.pickup / "second.eml").exists()


# -- back pressure against a real daemon: a small queue volume filled with ballast -------------

BALLAST_SERVER = """
PercentageDatabaseDiskSpaceUsedNormalThreshold = 50
PercentageDatabaseDiskSpaceUsedMediumThreshold = 60
PercentageDatabaseDiskSpaceUsedHighThreshold = 85
LogDiskMinimumFreeSpace = "256KB"
"""


def ballast(volume: Path, used_percent: float, name: str = ".ballast") -> Path:
    """Grow (or make) a file on ``volume`` until ``used_percent`` of it is in use."""
    path = volume / name
    st = os.statvfs(volume)
    size = st.f_blocks * st.f_frsize
    missing = int(size * used_percent / 100) - (size - st.f_bavail * st.f_frsize)
    with open(path, "ab") as out:
        out.write(b"\0" * max(0, missing))
        out.flush()
        os.fsync(out.fileno())
    return path


def pressure(root: Path) -> dict[str, Any]:
    from hubport.core.control import call

    return call(root / "var", "get-backpressure")


def wait_level(root: Path, level: str) -> dict[str, Any]:
    return wait_for_sync(lambda: (s := pressure(root))["level"] == level and s, timeout=20)


class Session:
    """One SMTP client session of the story; every reply is noted in ``transcript``."""

    def __init__(self, port: int, transcript: list[str], label: str) -> None:
        self.port, self.transcript, self.label = port, transcript, label
        self.client: Client | None = None

    async def __aenter__(self) -> Session:
        self.client = await Client.connect(self.port)
        await self.client.hello()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.close()

    async def cmd(self, line: str, shown: str | None = None) -> Reply:
        assert self.client is not None
        reply = await self.client.cmd(line)
        self.transcript.append(f"{self.label}: {shown or line} -> {reply.code} "
                               f"{reply.lines[-1]}")
        return reply

    async def send(self, sender: str, subject: str, body: str = "Hello.") -> Reply:
        """MAIL, RCPT to Bob, DATA; returns the first reply that is not a success."""
        assert self.client is not None
        reply = await self.cmd(f"MAIL FROM:<{sender}>")
        if reply.code != 250:
            return reply
        assert (await self.cmd("RCPT TO:<bob@contoso.test>")).code == 250
        assert (await self.cmd("DATA")).code == 354
        await self.client.send(f"From: {sender}\r\nTo: bob@contoso.test\r\nSubject: {subject}"
                               f"\r\n\r\n{body}\r\n.\r\n".encode())
        return await self._final(subject)

    async def _final(self, subject: str) -> Reply:
        assert self.client is not None
        reply = await self.client.reply()
        self.transcript.append(f"{self.label}: <message {subject!r}> . -> {reply.code} "
                               f"{reply.lines[-1]}")
        return reply


def bob_subjects(root: Path) -> list[str]:
    found = []
    for path in maildir(root, "Bob"):
        for line in path.read_bytes().splitlines():
            if line.startswith(b"Subject: "):
                found.append(line[9:].decode())
                break
    return sorted(found)


def set_password(root: Path, mailbox: str, password: str) -> None:
    done = subprocess.run([*hubport_command(), "set-password", mailbox, "--password-stdin",
                           "--config", str(root / "org.toml")], input=password + "\n",
                          cwd=root, env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def level_changes(log: str) -> list[str]:
    """The daemon's level-change lines, shortened for the report."""
    out = []
    for line in log.splitlines():
        if "back pressure" not in line and "folder paused" not in line \
                and "folder resumed" not in line:
            continue
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e["event"] == "back pressure level changed":
            limits = (f"normal {e['normal']}, medium {e['medium']}, high {e['high']}; "
                      if "normal" in e else "")
            out.append(f"{e['resource'].split('[')[0]}: {e['previous']} -> {e['current']} at "
                       f"{e['pressure']} {e['unit']} ({limits}{e['detail']})")
        elif e["event"].startswith("back pressure: intake"):
            out.append(f"server: {e['previous']} -> {e['current']}: {e['event']}")
        elif e["event"].startswith("folder"):
            out.append(f"{e['folder']}: {e['event']}")
    return out


async def test_a_filling_queue_volume_restricts_then_stops_intake_and_recovers(
        tmp_path: Path, tmpfs) -> None:
    """Medium: outside senders get 452 4.3.1 at MAIL, an authenticated user still gets in,
    Pickup files stay; High: everyone waits; ballast gone: intake resumes by itself and every
    acknowledged message, and every Pickup file, is delivered."""
    var = tmpfs("var", size="32m")
    internet, users = free_port(), free_port()
    connectors = (receive_connector("Internet", [f"127.0.0.1:{internet}"],
                                    PermissionGroups=["AnonymousUsers"])
                  + receive_connector("Users", [f"127.0.0.1:{users}"],
                                      PermissionGroups=["ExchangeUsers"],
                                      AuthMechanism=["BasicAuth"]))
    write_org(tmp_path, server_extra=BALLAST_SERVER, extra=connectors)
    set_password(tmp_path, "Alice", "alice-pw")
    transcript: list[str] = []
    acknowledged: list[str] = []
    with daemon_pool(tmp_path) as pool:
        daemon = pool.start(config=tmp_path / "org.toml")
        daemon.wait_ready()
        assert pressure(tmp_path)["level"] == "Normal"
        async with Session(internet, transcript, "outside") as s:
            assert (await s.send("someone@example.org", "before")).code == 250
            acknowledged.append("before")

        weight = ballast(var, 70)
        medium = wait_level(tmp_path, "Medium")
        shown = hubport("get-backpressure", "--config", str(tmp_path / "org.toml"),
                        cwd=tmp_path).stdout
        (db,) = [m for m in medium["meters"] if m["resource"].startswith("DatabaseUsedSpace")]
        assert db["current_resource_use"] == "Medium" and 60 <= db["pressure"] < 85
        async with Session(internet, transcript, "outside") as s:
            reply = await s.send("someone@example.org", "refused at Medium")
            assert (reply.code, reply.text) == (452, "4.3.1 Insufficient system resources")
        async with Session(users, transcript, "alice") as s:
            auth = await s.cmd(f"AUTH PLAIN {auth_plain('alice', 'alice-pw')}",
                               "AUTH PLAIN <alice>")
            assert auth.code == 235, auth
            assert (await s.send("alice@contoso.test", "inside at Medium")).code == 250
            acknowledged.append("inside at Medium")
        for n in range(3):
            drop_in(tmp_path / "pickup", f"p{n}.eml",
                    message(subject=f"pickup {n}", to="bob@contoso.test"))
        await asyncio.sleep(2.0)  # several folder rescans (0.3 s) while paused
        waiting = sorted(p.name for p in (tmp_path / "pickup").glob("*.eml"))
        assert waiting == ["p0.eml", "p1.eml", "p2.eml"], waiting

        ballast(var, 90)
        wait_level(tmp_path, "High")
        async with Session(users, transcript, "alice") as s:
            assert (await s.cmd(f"AUTH PLAIN {auth_plain('alice', 'alice-pw')}",
                                "AUTH PLAIN <alice>")).code == 235
            reply = await s.send("alice@contoso.test", "refused at High")
            assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply
        assert sorted(p.name for p in (tmp_path / "pickup").glob("*.eml")) == waiting

        weight.unlink()
        wait_level(tmp_path, "Normal")
        async with Session(internet, transcript, "outside") as s:
            assert (await s.send("someone@example.org", "after")).code == 250
            acknowledged.append("after")
        expected = sorted([*acknowledged, "pickup 0", "pickup 1", "pickup 2"])
        wait_for_sync(lambda: bob_subjects(tmp_path) == expected, timeout=30)
        assert not list((tmp_path / "pickup").glob("*.eml"))
        assert not list((tmp_path / "pickup").glob("*.bad"))
        changes = level_changes(daemon.log_text())
    print("\n".join(["SMTP replies:", *transcript, "", "hubport get-backpressure at Medium:",
                     shown, "level changes logged by the daemon:", *changes]))
    db_changes = [c for c in changes if c.startswith("DatabaseUsedSpace")]
    assert [c.split(" at ")[0] for c in db_changes] == [
        "DatabaseUsedSpace: Normal -> Medium", "DatabaseUsedSpace: Medium -> High",
        "DatabaseUsedSpace: High -> Normal"], changes


# -- a write failure in the middle of DATA: 451 4.3.0, never 250 -----------------------------------

FULL_SERVER = """
QueueDatabaseMinimumFreeSpace = 0
LogDiskMinimumFreeSpace = 0
"""


async def test_a_disk_that_fills_during_data_answers_451_and_nothing_is_queued(
        hub_factory, tmpfs) -> None:
    """ENOSPC from the kernel while the message is committed: 451 4.3.0, no 250; while the
    store cannot commit, new MAIL gets 452 4.3.1; once space returns the retry is delivered
    exactly once."""
    state = tmpfs("var", size="16m")
    port = free_port()
    transcript: list[str] = []
    extra = receive_connector("Internet", [f"127.0.0.1:{port}"],
                              PermissionGroups=["AnonymousUsers"])
    body = ("z" * 76 + "\r\n") * 4000  # more than any free page the database still holds
    async with hub_factory(server_extra=FULL_SERVER, extra=extra) as hub:
        async with Session(port, transcript, "client") as s:
            assert (await s.cmd("MAIL FROM:<someone@example.org>")).code == 250
            assert (await s.cmd("RCPT TO:<bob@contoso.test>")).code == 250
            assert (await s.cmd("DATA")).code == 354
            filler = fill(state)
            assert s.client is not None
            await s.client.send(f"Subject: full\r\n\r\n{body}\r\n.\r\n".encode())
            reply = await s._final("full")
            assert (reply.code, reply.enhanced) == (451, "4.3.0"), reply
            # the store failed its commit: intake is held at once, for every sender
            reply = await s.cmd("MAIL FROM:<alice@contoso.test>")
            assert (reply.code, reply.enhanced) == (452, "4.3.1"), reply
        assert await hub.store.read(
            lambda c: c.execute("SELECT COUNT(*) FROM message").fetchone()[0]) == 0
        history = hub.daemon.backpressure.history  # the failed commit is on record
        await wait_for(lambda: [(h["resource"], h["to"]) for h in history
                                if h["resource"] == "QueueDatabaseCommit"] == [
            ("QueueDatabaseCommit", "High")])
        filler.unlink()
        await wait_for(lambda: hub.daemon.backpressure.level.name == "NORMAL", timeout=20)
        async with Session(port, transcript, "client") as s:
            assert (await s.send("someone@example.org", "full", body)).code == 250
        await wait_for(lambda: bob_subjects(hub.root) == ["full"], timeout=20)
        await asyncio.sleep(0.5)
        assert bob_subjects(hub.root) == ["full"]  # once
        assert ("QueueDatabaseCommit", "Normal") in [(h["resource"], h["to"])
                                                     for h in history]
    print("\n".join(transcript))


# -- EIO and EROFS from the queue database's own system calls ------------------------------------
#
# A tmpfs cannot be made to answer EIO, and it cannot be remounted read-only while the database
# holds its files open for writing, so these two faults are injected one layer up: a tiny
# LD_PRELOAD library (built here with the system C compiler) makes fsync/fdatasync or
# write/pwrite on files under the queue folder fail with the errno named in a trigger file,
# for as long as that file exists. SQLite sees exactly what the kernel would have said.

FAULT_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* 0, or the errno the operation `op` on `fd` must fail with now */
static int fault(const char *op, int fd) {
    const char *trigger = getenv("HUBPORT_FAULT_FILE");
    const char *prefix = getenv("HUBPORT_FAULT_PREFIX");
    if (!trigger || !prefix) return 0;
    int saved = errno, code = 0;
    char want[32] = {0}, link[64], path[4096];
    int t = open(trigger, O_RDONLY | O_CLOEXEC);
    if (t >= 0) {
        ssize_t n = read(t, want, sizeof want - 1);
        close(t);
        size_t len = strlen(op);
        if (n > (ssize_t)len && !strncmp(want, op, len) && want[len] == ':') {
            snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
            ssize_t m = readlink(link, path, sizeof path - 1);
            if (m > 0) {
                path[m] = 0;
                if (!strncmp(path, prefix, strlen(prefix))) {
                    const char *name = want + len + 1;
                    code = !strncmp(name, "EROFS", 5) ? EROFS
                         : !strncmp(name, "ENOSPC", 6) ? ENOSPC : EIO;
                }
            }
        }
    }
    errno = saved;
    return code;
}

#define NEXT(name) ((__typeof__(&name))dlsym(RTLD_NEXT, #name))

int fsync(int fd) {
    int code = fault("fsync", fd);
    if (code) { errno = code; return -1; }
    return NEXT(fsync)(fd);
}

int fdatasync(int fd) {
    int code = fault("fsync", fd);
    if (code) { errno = code; return -1; }
    return NEXT(fdatasync)(fd);
}

ssize_t write(int fd, const void *buf, size_t count) {
    int code = fault("write", fd);
    if (code) { errno = code; return -1; }
    return NEXT(write)(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    int code = fault("write", fd);
    if (code) { errno = code; return -1; }
    return NEXT(pwrite)(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    int code = fault("write", fd);
    if (code) { errno = code; return -1; }
    return NEXT(pwrite64)(fd, buf, count, offset);
}
"""


@pytest.fixture(scope="module")
def fault_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faultshim")
    source, library = folder / "faultshim.c", folder / "faultshim.so"
    source.write_text(FAULT_SHIM)
    try:
        done = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(library),
                               str(source), "-ldl"], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no C compiler to build the fault library")
    if done.returncode != 0:
        pytest.skip(f"cannot build the fault library: {done.stderr.strip()}")
    return library


@pytest.mark.parametrize("fault", ["fsync:EIO", "write:EROFS"])
async def test_an_io_error_during_data_answers_451_then_recovers(
        tmp_path: Path, fault_shim: Path, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from fsync (the "fsyncgate" case) or EROFS from a write while the message is
    committed: 451 4.3.0, never 250; intake held (452 4.3.1) while the store cannot commit;
    once the fault is gone the retry is queued and every acknowledged message delivered."""
    port = free_port()
    trigger = tmp_path / "fault"
    monkeypatch.setenv("LD_PRELOAD", str(fault_shim))
    monkeypatch.setenv("HUBPORT_FAULT_FILE", str(trigger))
    monkeypatch.setenv("HUBPORT_FAULT_PREFIX", str(tmp_path / "var" / "queue") + "/")
    write_org(tmp_path, extra=receive_connector("Internet", [f"127.0.0.1:{port}"],
                                                PermissionGroups=["AnonymousUsers"]))
    transcript: list[str] = []
    with daemon_pool(tmp_path) as pool:
        daemon = pool.start(config=tmp_path / "org.toml")
        daemon.wait_ready()
        async with Session(port, transcript, "client") as s:
            assert (await s.send("someone@example.org", "before")).code == 250
            assert (await s.cmd("MAIL FROM:<someone@example.org>")).code == 250
            assert (await s.cmd("RCPT TO:<bob@contoso.test>")).code == 250
            assert (await s.cmd("DATA")).code == 354
            trigger.write_text(fault)
            assert s.client is not None
            await s.client.send(b"Subject: faulted\r\n\r\nHello.\r\n.\r\n")
            reply = await s._final("faulted")
            assert (reply.code, reply.enhanced) == (451, "4.3.0"), reply
            # while the fault lasts nothing is acknowledged: MAIL is held (452 4.3.1), or, when
            # SQLite reported a commit as done in between (a small one can succeed although
            # the disk fails), the message is refused after DATA (451 4.3.0): never a 250
            reply = await s.send("alice@contoso.test", "during the fault")
            assert (reply.code, reply.enhanced) in {(452, "4.3.1"), (451, "4.3.0")}, reply
        wait_for_sync(lambda: {m["resource"]: m["current_resource_use"] for m in pressure(
            tmp_path)["meters"]}["QueueDatabaseCommit"] == "High")
        assert pressure(tmp_path)["level"] == "High"
        trigger.unlink()
        wait_level(tmp_path, "Normal")
        async with Session(port, transcript, "client") as s:
            assert (await s.send("someone@example.org", "faulted")).code == 250
        wait_for_sync(lambda: bob_subjects(tmp_path) == ["before", "faulted"], timeout=20)
        log = daemon.log_text()
    assert "queue commit failed" in log
    print(f"{fault}:\n" + "\n".join(transcript + level_changes(log)))


# -- a commit that fails in the categorizer: the message goes back to Submission --------------


@pytest.mark.parametrize("also_release", [False, True], ids=["commit", "commit+release"])
async def test_a_failed_categorizer_commit_gives_the_message_back(
        hub_factory, also_release: bool) -> None:
    """The categorizer's commit fails (a disk error at that moment): the message must not stay
    marked in flight (it would wait for a restart and count a crash towards Poison); it is
    categorized again and delivered. When clearing the mark fails too, it is retried soon,
    not at the next sweep (up to 30 s away)."""
    from hubport.core.store import StoreError

    async with hub_factory() as hub:
        store = hub.store
        original = store.write
        failures = ["_commit_categorized", *(["release"] if also_release else [])]

        async def write(work: Any) -> Any:
            names = ((work.func.__name__,) if isinstance(work, functools.partial)
                     else work.__code__.co_names)
            if failures and failures[0] in names:
                failures.pop(0)
                raise StoreError("queue database commit failed: disk I/O error (injected)")
            return await original(work)

        store.write = write  # type: ignore[method-assign]
        try:
            hub.drop_pickup(message(subject="retried"))
            await wait_for(lambda: bob_subjects(hub.root) == ["retried"], timeout=15)
        finally:
            store.write = original  # type: ignore[method-assign]
        assert not failures
        crashes = await hub.store.read(lambda c: c.execute(
            "SELECT COUNT(*) FROM message WHERE crash_count > 0").fetchone()[0])
        assert crashes == 0


@pytest.mark.parametrize("fault", ["read-only, new mailbox", "read-only", "full"])
async def test_an_unwritable_mailbox_defers_says_why_then_delivers_once(
        hub_factory, tmpfs, fault: str) -> None:
    """The mailboxes' volume is read-only (before or after Bob's Maildir was made) or full:
    delivery is deferred with a 4.x.x status, never failed; ``get-queue`` names the cause in
    the mailbox queue's LastError; once the volume is writable the message arrives once."""
    boxes = tmpfs("var/mailboxes", size="1m")
    if fault != "read-only, new mailbox":
        for sub in ("cur", "new", "tmp"):
            (boxes / "Bob" / sub).mkdir(parents=True)
    filler = fill(boxes) if fault == "full" else None
    if filler is None:
        _remount(boxes, "ro")
    body = "w" * 20_000 + "\n"  # more than the pages a full tmpfs may still give out
    async with hub_factory() as hub:
        hub.drop_pickup(message(subject="boxed", body=body))
        defer = await wait_for(lambda: events(hub.root, event_id="DEFER"), timeout=15)
        status = defer[0]["recipient-status"][0]
        reason = "is full" if fault == "full" else "not writable (EROFS)"
        assert status.startswith(("451 4.", "452 4.")) and reason in status, status
        row = await queue_saying(hub.root, "MapiDelivery", reason)
        assert row["message_count"] == 1, row
        assert not events(hub.root, event_id="FAIL") and not hub.maildir("Bob")
        if filler is not None:
            filler.unlink()
        else:
            _remount(boxes, "rw")
        (delivered,) = await wait_for(lambda: hub.maildir("Bob"), timeout=20)
        assert b"w" * 20_000 in delivered.read_bytes()
        await wait_for(lambda: events(hub.root, event_id="DELIVER"), timeout=10)
        await asyncio.sleep(1.5)  # several retry intervals: no second copy appears
        assert len(hub.maildir("Bob")) == 1 and len(events(hub.root, event_id="DELIVER")) == 1
        assert not list((boxes / "Bob" / "tmp").iterdir())
