"""End to end: the real ``hubport run`` as a subprocess, driven only through its folders,
signals and management commands (what an administrator sees)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from daemon_process import STOPPED, DaemonPool, daemon_pool, hubport, queue_counts
from support import (
    drop_files,
    drop_in,
    maildir,
    message,
    read_mail,
    replay_file,
    wait_for,
    wait_for_sync,
    write_org,
)

pytestmark = pytest.mark.timeout(120)

FAX = "IMCEAFAX-+2B15551234@contoso.test"
EXTERNAL = "someone@example.net"


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[DaemonPool]:
    with daemon_pool(tmp_path) as daemons:
        yield daemons


def tracking(root: Path, *args: str) -> list[dict[str, Any]]:
    """``hubport get-messagetrackinglog -format json`` with extra cmdlet parameters."""
    done = hubport("get-messagetrackinglog", "--config", str(root / "org.toml"),
                   "-format", "json", *args, cwd=root)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def queues(root: Path) -> dict[str, dict[str, Any]]:
    done = hubport("get-queue", "--config", str(root / "org.toml"), "--json", cwd=root)
    assert done.returncode == 0, done.stderr
    return {row["identity"]: row for row in json.loads(done.stdout)}


def split_drop_file(data: bytes) -> tuple[list[bytes], bytes]:
    """A Replay/Drop file → (its injected envelope lines, the message after them)."""
    lines = data.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if line.lower().startswith(b"x-endofinjectedxheaders:"):
            return lines[: index + 1], b"".join(lines[index + 1 :])
    raise AssertionError(f"no X-EndOfInjectedXHeaders in {data[:300]!r}")


def without_first_field(data: bytes) -> tuple[bytes, bytes]:
    """(the first header field with its folded lines, the rest of the message)."""
    lines = data.splitlines(keepends=True)
    end = 1
    while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
        end += 1
    return b"".join(lines[:end]), b"".join(lines[end:])


# -- the walk of messages through a running daemon ------------------------------------------


def test_messages_walk_through_folders_to_maildir_drop_and_tracking_log(
        tmp_path: Path, pool: DaemonPool) -> None:
    config = write_org(tmp_path)
    daemon = pool.start(config=config)
    daemon.wait_ready()
    pickup, replay = tmp_path / "pickup", tmp_path / "replay"
    fax_drop = tmp_path / "drop" / "Fax Gateway"

    drop_in(pickup, "group.eml", message(to="bob@contoso.test, staff@contoso.test",
                                         message_id="<e2e-group@test>"))
    drop_in(pickup, "fax.eml", message(to=f'"Fax" <{FAX}>', subject="fax",
                                       message_id="<e2e-fax@test>"))
    drop_in(pickup, "unknown.eml", message(to="nobody@contoso.test", subject="lost",
                                           message_id="<e2e-unknown@test>"))
    drop_in(pickup, "external.eml", message(to=EXTERNAL, subject="far away",
                                            message_id="<e2e-external@test>"))
    drop_in(replay, "replayed.eml", replay_file(
        "bob@contoso.test", ["Alice.Smith@contoso.test"],
        message(sender="bob@contoso.test", to="whoever@contoso.test", subject="replayed",
                message_id="<e2e-replay@test>")))
    drop_in(pickup, "junk.eml", b"\x00\x01 this is not a message at all")

    # Maildir: Bob once (direct and through Staff), Alice through Staff, by replay and the NDR
    wait_for_sync(lambda: len(maildir(tmp_path, "Alice")) == 3 and maildir(tmp_path, "Bob"))
    assert len(maildir(tmp_path, "Bob")) == 1
    subjects = sorted(str(read_mail(p)["Subject"]) for p in maildir(tmp_path, "Alice"))
    assert "hello" in subjects and "replayed" in subjects
    ndr = next(read_mail(p) for p in maildir(tmp_path, "Alice")
               if read_mail(p).get_content_type() == "multipart/report")
    assert "nobody@contoso.test" in ndr.as_string() and "5.1.1" in ndr.as_string()
    assert read_mail(maildir(tmp_path, "Bob")[0])["Message-ID"] == "<e2e-group@test>"

    # the FAX recipient went to the Foreign connector's drop folder, in the Replay format
    files = wait_for_sync(lambda: drop_files(fax_drop))
    assert len(files) == 1
    assert files[0].read_bytes().startswith(b"X-Sender: <alice@contoso.test>")
    assert f"X-Receiver: <{FAX}>".encode() in files[0].read_bytes()

    # the junk file is set aside with a reason, nothing is left to ingest
    bad = wait_for_sync(lambda: list(pickup.glob("junk*.bad")))
    assert (pickup / (bad[0].name + ".reason")).read_text().strip()
    wait_for_sync(lambda: not list(pickup.glob("*.eml")) and not list(replay.glob("*.eml")))
    assert not list((pickup / ".work").iterdir()) and not list((replay / ".work").iterdir())

    # the tracking log, read by the management command
    wanted = {"RECEIVE", "EXPAND", "RESOLVE", "TRANSFER", "DELIVER", "FAIL", "DSN", "BADMAIL"}
    # TRANSFER needs a bifurcation: one message to a mailbox and a FAX recipient
    drop_in(pickup, "both.eml", message(to=f"bob@contoso.test, {FAX}", subject="both",
                                        message_id="<e2e-both@test>"))
    wait_for_sync(lambda: wanted <= {e["event-id"] for e in tracking(tmp_path)}, timeout=15)
    delivered = tracking(tmp_path, "-EventId", "DELIVER")
    assert delivered and {e["event-id"] for e in delivered} == {"DELIVER"}
    sources = {e["source"] for e in delivered}
    assert {"STOREDRIVER", "GATEWAY"} <= sources, sources
    from_bob = tracking(tmp_path, "-Sender", "bob@contoso.test")
    assert from_bob and all(e["sender-address"] == "bob@contoso.test" for e in from_bob)
    assert {e["message-id"] for e in from_bob} == {"<e2e-replay@test>"}
    fail = tracking(tmp_path, "-EventId", "FAIL", "-MessageId", "<e2e-unknown@test>")
    assert fail and fail[0]["recipient-address"] == ["nobody@contoso.test"]

    # the message to an external domain waits in Unreachable (no connector serves it)
    rows = queues(tmp_path)
    assert rows["HUB01\\Unreachable"]["message_count"] == 1
    assert rows["HUB01\\Poison"]["message_count"] == 0
    text = hubport("get-queue", "--config", str(config), cwd=tmp_path)
    assert text.returncode == 0 and "HUB01\\Unreachable" in text.stdout
    assert daemon.alive()


def test_drop_file_copied_into_replay_is_submitted_again_unchanged(
        tmp_path: Path, pool: DaemonPool) -> None:
    daemon = pool.start(config=write_org(tmp_path))
    daemon.wait_ready()
    fax_drop = tmp_path / "drop" / "Fax Gateway"
    drop_in(tmp_path / "pickup", "fax.eml", message(
        to=f"{FAX}, IMCEAFAX-+2B15550000@contoso.test", subject="round trip",
        body="Line one.\n.\nLine . three\n", message_id="<round-trip@test>",
        extra="Date: Mon, 2 Nov 2026 10:00:00 +0000\n"))
    first = wait_for_sync(lambda: drop_files(fax_drop))[0]
    original = first.read_bytes()
    db = tmp_path / "var" / "queue" / "mail.que"
    wait_for_sync(lambda: (queue_counts(db) or {"total": -1})["total"] == 0)
    # the gateway has not taken the first file yet: the copy must not overwrite it, even
    # though the queue is empty again (ids are never reused)
    shutil.copy(first, tmp_path / "first.eml")
    drop_in(tmp_path / "replay", "again.eml", (tmp_path / "first.eml").read_bytes())
    both = wait_for_sync(lambda: len(drop_files(fax_drop)) == 2 and drop_files(fax_drop))
    assert first.read_bytes() == original
    second = next(p for p in both if p.name != first.name)
    again = second.read_bytes()

    envelope_1, message_1 = split_drop_file(original)
    envelope_2, message_2 = split_drop_file(again)
    assert [line for line in envelope_1 if line.lower().startswith((b"x-sender", b"x-receiver"))]\
        == [line for line in envelope_2 if line.lower().startswith((b"x-sender", b"x-receiver"))]
    assert len([line for line in envelope_2 if line.lower().startswith(b"x-receiver")]) == 2
    received, rest = without_first_field(message_2)
    assert received.startswith(b"Received: from ") and b"hubport Replay" in received
    assert rest == message_1  # every other byte as it was
    assert message_from_bytes(message_1)["Message-ID"] == "<round-trip@test>"


# -- signals ------------------------------------------------------------------------------


def test_sigterm_drains_and_exits_zero_and_nothing_is_lost(tmp_path: Path,
                                                            pool: DaemonPool) -> None:
    config = write_org(tmp_path)
    daemon = pool.start(config=config)
    daemon.wait_ready()
    for n in range(30):
        drop_in(tmp_path / "pickup", f"m{n}.eml",
                message(to="bob@contoso.test", message_id=f"<term-{n}@test>"))
    wait_for_sync(lambda: maildir(tmp_path, "Bob"))
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0
    assert STOPPED in daemon.log_text()
    # the lock is released (a second daemon starts) and whatever the drain left (files or
    # queued messages) is finished by the next run
    second = pool.start(config=config)
    second.wait_ready()
    wait_for_sync(lambda: len(maildir(tmp_path, "Bob")) >= 30, timeout=20)
    ids = sorted(str(read_mail(p)["Message-ID"]) for p in maildir(tmp_path, "Bob"))
    assert ids == sorted(f"<term-{n}@test>" for n in range(30))
    second.signal(signal.SIGINT)
    assert second.wait(10) == 0


def test_sighup_refuses_a_broken_config_and_applies_a_fixed_one(tmp_path: Path,
                                                                 pool: DaemonPool) -> None:
    config = write_org(tmp_path)
    good = config.read_text()
    daemon = pool.start(config=config)
    daemon.wait_ready()
    drop_in(tmp_path / "pickup", "far.eml", message(to=EXTERNAL, message_id="<far@test>"))
    wait_for_sync(lambda: queues(tmp_path)["HUB01\\Unreachable"]["message_count"] == 1)

    def count(text: str) -> int:
        return daemon.log_text().count(text)

    refused = "configuration change refused"
    config.write_text(good + '\n[[mailbox]]\nName = "Carol"\nBogusField = 1\n')
    wait_for_sync(lambda: count(refused) >= 1)  # the file watch saw it
    seen = count(refused)
    daemon.signal(signal.SIGHUP)
    wait_for_sync(lambda: count(refused) > seen)  # and SIGHUP asks again
    assert daemon.alive() and "BogusField" in daemon.log_text()
    drop_in(tmp_path / "pickup", "a.eml", message(to="bob@contoso.test"))
    wait_for_sync(lambda: maildir(tmp_path, "Bob"))  # the running config still works

    reloaded = "configuration reloaded"
    connector = '\n[[foreign_connector]]\nName = "Net Gateway"\nAddressSpaces = ["example.net"]' \
                "\nCreateDropDirectory = true\n"
    config.write_text(good + connector)
    wait_for_sync(lambda: count(reloaded) >= 1)
    seen = count(reloaded)
    daemon.signal(signal.SIGHUP)
    wait_for_sync(lambda: count(reloaded) > seen)
    files = wait_for_sync(lambda: drop_files(tmp_path / "drop" / "Net Gateway"))
    assert f"X-Receiver: <{EXTERNAL}>".encode() in files[0].read_bytes()
    assert queues(tmp_path)["HUB01\\Unreachable"]["message_count"] == 0
    assert daemon.alive()


# -- start-up failures ----------------------------------------------------------------------


def run_to_exit(pool: DaemonPool, *args: str, cwd: Path | None = None,
                config: Path | None = None) -> tuple[int, str]:
    daemon = pool.start(*args, config=config, cwd=cwd)
    try:
        code = daemon.wait(20)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"daemon did not exit:\n{daemon.log_text()}") from None
    return code, daemon.log_text()


def test_unknown_config_field_names_file_object_field_and_reason(tmp_path: Path,
                                                                  pool: DaemonPool) -> None:
    config = write_org(tmp_path, extra='[[mailbox]]\nName = "Carol"\nBogusField = 1\n')
    code, log = run_to_exit(pool, config=config)
    assert code == 2
    assert str(config) in log and "Carol" in log and "BogusField" in log
    assert "unknown field" in log
    assert not (tmp_path / "var" / "hubport.lock").exists()  # refused before touching state


def test_missing_config_file_is_a_clear_error(tmp_path: Path, pool: DaemonPool) -> None:
    code, log = run_to_exit(pool, config=tmp_path / "nowhere.toml")
    assert code != 0
    assert "nowhere.toml" in log and "No such file" in log


def test_second_daemon_on_the_same_state_folder_is_refused(tmp_path: Path,
                                                            pool: DaemonPool) -> None:
    config = write_org(tmp_path)
    first = pool.start(config=config)
    first.wait_ready()
    code, log = run_to_exit(pool, config=config)
    assert code == 4
    assert "another hubport daemon" in log
    assert first.alive()  # the first one is not disturbed
    drop_in(tmp_path / "pickup", "a.eml", message())
    wait_for_sync(lambda: maildir(tmp_path, "Bob"))


def test_unusable_pickup_folder_is_refused_at_start(tmp_path: Path, pool: DaemonPool) -> None:
    (tmp_path / "not-a-folder").write_text("I am a file")
    config = write_org(tmp_path)
    config.write_text(config.read_text().replace('PickupDirectoryPath = "pickup"',
                                                 'PickupDirectoryPath = "not-a-folder"'))
    code, log = run_to_exit(pool, config=config)
    assert code == 3
    assert "Pickup directory" in log and "not-a-folder" in log and "not usable" in log
    assert (tmp_path / "not-a-folder").read_text() == "I am a file"


# -- the embedded default ------------------------------------------------------------------


def test_embedded_default_runs_with_no_arguments_in_an_empty_folder(tmp_path: Path,
                                                                     pool: DaemonPool) -> None:
    home = tmp_path / "home"
    home.mkdir()
    daemon = pool.start(cwd=home)  # `hubport run`: no config, no server
    daemon.wait_ready()
    assert "<embedded default>" in daemon.log_text()
    drop_in(home / "pickup", "admin.eml", message(to="administrator@contoso.test",
                                                  message_id="<default-admin@test>"))
    drop_in(home / "pickup", "fax.eml", message(to=FAX, message_id="<default-fax@test>"))
    box = home / "var" / "mailboxes" / "Administrator" / "new"
    got = wait_for_sync(lambda: list(box.iterdir()) if box.is_dir() else [], timeout=20)
    assert read_mail(got[0])["Message-ID"] == "<default-admin@test>"
    files = wait_for_sync(lambda: drop_files(home / "drop" / "Fax Gateway"), timeout=20)
    assert f"X-Receiver: <{FAX}>".encode() in files[0].read_bytes()
    assert not list((tmp_path / "home").glob("*.toml"))  # nothing was written as config

    # the first organization cmdlet writes ./hubport.toml; the running daemon adopts it
    done = hubport("New-Mailbox -Name Hana -PrimarySmtpAddress hana@contoso.test", cwd=home)
    assert done.returncode == 0, done.stderr
    daemon.wait_for_log("configuration reloaded", 30)
    drop_in(home / "pickup", "hana.eml", message(to="hana@contoso.test",
                                                 message_id="<default-hana@test>"))
    hana = home / "var" / "mailboxes" / "Hana" / "new"
    wait_for_sync(lambda: list(hana.iterdir()) if hana.is_dir() else [], timeout=20)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(10) == 0


# -- regressions the crash test found (in process, to control the timing) --------------------


async def test_bifurcated_message_held_by_one_queue_is_not_forgotten_by_the_other(
        hub_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the Maildir queue holds a bifurcated message in flight, the drop queue skips
    it and goes idle; when the Maildir queue commits, the drop queue must be told."""
    from hubport.agents.drop import DropDirectoryAgent
    from hubport.agents.maildir import MaildirAgent

    slow_drop = asyncio.Event()
    drop_many, maildir_many = DropDirectoryAgent.deliver_many, MaildirAgent.deliver_many

    async def drop_slowly(self, items):  # type: ignore[no-untyped-def]
        if any(i.message.message_id == "<first@test>" for i in items):
            slow_drop.set()
            await asyncio.sleep(0.6)  # the drop queue is busy with the first message ...
        return await drop_many(self, items)

    async def maildir_slowly(self, items):  # type: ignore[no-untyped-def]
        await asyncio.sleep(1.5)  # ... while the Maildir queue holds the second one
        return await maildir_many(self, items)

    monkeypatch.setattr(DropDirectoryAgent, "deliver_many", drop_slowly)
    monkeypatch.setattr(MaildirAgent, "deliver_many", maildir_slowly)
    async with hub_factory() as hub:
        drop_in(hub.pickup, "first.eml", message(to=FAX, message_id="<first@test>"))
        await asyncio.wait_for(slow_drop.wait(), 10)
        drop_in(hub.pickup, "second.eml", message(
            to="bob@contoso.test, IMCEAFAX-+2B15550000@contoso.test",
            message_id="<second@test>"))
        await wait_for(lambda: maildir(hub.root, "Bob"), timeout=10)
        await wait_for(lambda: len(drop_files(hub.drop)) == 2, timeout=5)


# -- poison messages --------------------------------------------------------------------------


def test_message_that_kills_the_process_twice_goes_to_poison_and_the_rest_flows(
        tmp_path: Path, pool: DaemonPool) -> None:
    """A categorize agent that SIGKILLs the daemon on one message: after two crashes
    (PoisonThreshold 2) it sits in Poison, never delivered; its batch-mates, in flight
    during the same crashes, are delivered (docs/exchange.md, "Expiry, DSNs and Poison")."""
    (tmp_path / "killer_agent.py").write_text(
        "import os, signal\n"
        "from hubport.core import hookimpl\n\n"
        "@hookimpl\n"
        "def categorize(message, recipient, organization):\n"
        "    if message.subject == 'poison':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n")
    config = write_org(tmp_path, extra='[hubport]\nPlugins = ["killer_agent"]\n')
    for i in range(5):
        subject = "poison" if i == 2 else f"innocent {i}"
        drop_in(tmp_path / "pickup", f"m{i}.eml",
                message(subject=subject, message_id=f"<m{i}@contoso.test>"))
    crashes = 0
    for _ in range(4):
        daemon = pool.start(config=config)
        deadline = time.monotonic() + 15
        while (daemon.alive() and time.monotonic() < deadline
               and len(maildir(tmp_path, "Bob")) < 4):
            time.sleep(0.05)
        if daemon.alive():
            break
        assert daemon.proc.wait(5) == -signal.SIGKILL
        crashes += 1
    assert crashes == 2, f"expected two crashes before Poison, saw {crashes}"
    wait_for_sync(lambda: len(maildir(tmp_path, "Bob")) == 4, timeout=15)
    subjects = sorted(read_mail(p)["Subject"] for p in maildir(tmp_path, "Bob"))
    assert subjects == [f"innocent {i}" for i in (0, 1, 3, 4)]
    assert queues(tmp_path)["HUB01\\Poison"]["message_count"] == 1
    wait_for_sync(lambda: tracking(tmp_path, "-EventId", "POISONMESSAGE"))
    assert tracking(tmp_path, "-EventId", "POISONMESSAGE")[0]["message-id"] == "<m2@contoso.test>"
