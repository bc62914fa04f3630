"""Foreign connector Drop folders: missing folder, quota, file format, exactly-once, disk full.

The daemon cases run a real in-process hub (docs/reliability.md case 72); the recovery
protocol of ``hubport.core.file_commit`` is also checked on its own with a fake delivery context.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hubport.core.file_commit as file_commit
from hubport.core.api import DeliveryContext
from hubport.core.config import parse_organization
from hubport.core.config_fields import ConfigErrors
from hubport.core.file_commit import FilePlan, commit_files
from hubport.core.headers import parse_header_section
from hubport.core.hooks import Hooks
from support import (
    drop_files,
    drop_in,
    event_ids,
    events,
    maildir,
    message,
    wait_for,
)

FAX = "IMCEAFAX-+2B15551234@contoso.test"
FABRIKAM_GATEWAY = """
[[foreign_connector]]
Name = "Fabrikam Gateway"
AddressSpaces = ["fabrikam.test"]
DropDirectory = "fabrikam"
"""
HubFactory = Callable[..., Any]  # conftest's hub_factory: async context manager of a Hub
NAME_RE = re.compile(r"^HUB01-[0-9a-f]+-\d+-\d+-\d+\.eml$")


# -- helpers --------------------------------------------------------------------------------


def all_files(folder: Path) -> list[Path]:
    """Every non-directory entry below ``folder`` (hidden temp files included)."""
    return sorted(p for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def defers(root: Path) -> list[str]:
    return [s for e in events(root, event_id="DEFER") for s in e["recipient-status"]]


def split_drop_file(data: bytes) -> tuple[list[bytes], bytes]:
    """The injected envelope lines (through X-EndOfInjectedXHeaders) and the message."""
    parsed = parse_header_section(data)
    names = [f.lname for f in parsed.fields]
    end = names.index("x-endofinjectedxheaders") + 1
    lines = [f.raw for f in parsed.fields[:end]]
    return lines, data[sum(len(line) for line in lines):]


def split_first_field(content: bytes) -> tuple[bytes, bytes]:
    """The first header field (raw, folding kept) and everything after it."""
    first = parse_header_section(content).fields[0]
    return first.raw, content[len(first.raw):]


async def recipient_rows(hub: Any, like: str) -> list[tuple[str, str | None]]:
    return await hub.store.read(lambda c: [tuple(r) for r in c.execute(
        "SELECT status, drop_intent FROM recipient WHERE address LIKE ?", (like,))])


# -- the drop folder is not there, or full ----------------------------------------------------


async def test_missing_drop_folder_defers_until_created(
        hub_factory: HubFactory, tmp_path: Path) -> None:
    target = tmp_path / "drop" / "fabrikam"
    async with hub_factory(extra=FABRIKAM_GATEWAY) as hub:
        drop_in(hub.pickup, "f.eml", message(to="someone@fabrikam.test", subject="to fabrikam"))
        await wait_for(lambda: len(defers(hub.root)) >= 2)  # deferred, then retried
        status = defers(hub.root)[0]
        assert status.startswith("451 4.3.0") and "does not exist" in status
        assert str(target) in status
        assert not target.exists()  # never created behind the administrator's back
        assert all_files(tmp_path / "drop") == []
        assert not maildir(hub.root, "Bob") and not maildir(hub.root, "Alice")
        rows = await recipient_rows(hub, "someone@fabrikam.test")
        assert rows == [("Retry", None)]  # still queued
        assert "DELIVER" not in event_ids(hub.root)
        target.mkdir(parents=True)  # the administrator creates it
        files = await wait_for(lambda: drop_files(target), timeout=15)
        assert len(files) == 1 and NAME_RE.match(files[0].name)
        assert b"X-Receiver: <someone@fabrikam.test>\r\n" in files[0].read_bytes()
        deliver = await wait_for(lambda: events(hub.root, event_id="DELIVER"))
        assert deliver[0]["source"] == "GATEWAY"
        assert all_files(target) == files  # no temp left beside it


async def test_quota_reached_defers_until_the_gateway_takes_files(
        hub_factory: HubFactory, tmp_path: Path) -> None:
    drop = tmp_path / "drop" / "Fax Gateway"
    drop.mkdir(parents=True)
    backlog = drop / "waiting-for-gateway.eml"
    backlog.write_bytes(b"x" * 2000)
    async with hub_factory(foreign_extra='DropDirectoryQuota = "1KB"') as hub:
        drop_in(hub.pickup, "q.eml", message(to=FAX, subject="over quota"))
        await wait_for(lambda: len(defers(hub.root)) >= 2)
        assert {s for s in defers(hub.root)} == {"452 4.3.1 Drop directory quota exceeded"}
        assert all_files(drop) == [backlog]  # nothing written, not even a temp
        assert (await recipient_rows(hub, "IMCEAFAX%")) == [("Retry", None)]
        backlog.unlink()  # the gateway consumed its file
        files = await wait_for(lambda: drop_files(drop), timeout=15)
        assert len(files) == 1 and b"Subject: over quota" in files[0].read_bytes()
        await wait_for(lambda: "DELIVER" in event_ids(hub.root))


# -- the file itself -------------------------------------------------------------------------

NASTY_MESSAGE = (
    b"From: alice@contoso.test\n"
    b"To: fax <" + FAX.encode() + b">\n"
    b"Subject: ../../etc/x\n"
    b"Message-ID: <../../etc/x@evil>\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\n"
    b"X-MS-Exchange-Organization-Foo: secret\n"
    b"X-Other:   kept   as is\t\n"
    b"X-MS-Exchange-Forest-Bar: also secret\n"
    b"  folded continuation of the forest header\n"
    b"Received: from gw.fabrikam.test by hub.fabrikam.test; Mon, 01 Jan 2024 09:59:00 +0000\n"
    b"\n"
    b"trailing spaces   \n"
    b".\n"
    b"..dot-stuffing is not ours to do\n"
    b"\tcaf\xc3\xa9 8-bit\n"
)


async def test_drop_file_format_and_name(hub_factory: HubFactory) -> None:
    replay = b"X-Sender: <alice@contoso.test>\nX-Receiver: <" + FAX.encode() + (
        b">\nX-CreatedBy: hubport\n") + NASTY_MESSAGE  # trusted: org headers kept in the queue
    async with hub_factory() as hub:
        drop_in(hub.replay, "nasty.eml", replay)
        files = await wait_for(lambda: drop_files(hub.drop))
        assert len(files) == 1
        assert NAME_RE.match(files[0].name), files[0].name  # never from message data
        assert "etc" not in files[0].name and "evil" not in files[0].name
        data = files[0].read_bytes()
        injected, content = split_drop_file(data)
        assert injected[:3] == [b"X-Sender: <alice@contoso.test>\r\n",
                                b"X-Receiver: <" + FAX.encode() + b">\r\n",
                                b"X-CreatedBy: hubport\r\n"]
        assert injected[3] == b"X-EndOfInjectedXHeaders: %d\r\n" % sum(map(len, injected[:3]))
        received, rest = split_first_field(content)
        assert received.startswith(b"Received: from localhost by hub01.contoso.test")
        assert b"hubport Replay" in received
        expected = NASTY_MESSAGE.replace(b"\n", b"\r\n")
        for org_header in (b"X-MS-Exchange-Organization-Foo: secret\r\n",
                           b"X-MS-Exchange-Forest-Bar: also secret\r\n"
                           b"  folded continuation of the forest header\r\n"):
            assert org_header in expected
            expected = expected.replace(org_header, b"")
        assert rest == expected  # every other byte unchanged
        assert b"X-MS-Exchange" not in data
        deliver = await wait_for(lambda: events(hub.root, event_id="DELIVER"))
        assert deliver[0]["source"] == "GATEWAY"
        assert deliver[0]["message-id"] == "<../../etc/x@evil>"


async def test_round_trip_through_replay(hub_factory: HubFactory) -> None:
    async with hub_factory() as hub:
        drop_in(hub.pickup, "rt.eml", message(to=FAX, subject="round trip",
                                              body="line one\n\nline  three\n"))
        first = (await wait_for(lambda: drop_files(hub.drop)))[0]
        original = first.read_bytes()
        drop_in(hub.replay, "again.eml", original)  # the gateway hands the file back
        both = await wait_for(lambda: len(drop_files(hub.drop)) == 2 and drop_files(hub.drop))
        second = next(p for p in both if p != first)
        again = second.read_bytes()
        lines1, content1 = split_drop_file(original)
        lines2, content2 = split_drop_file(again)
        assert lines2 == lines1  # same envelope, line for line
        assert [line.split(b":")[0] for line in lines1] == [
            b"X-Sender", b"X-Receiver", b"X-CreatedBy", b"X-EndOfInjectedXHeaders"]
        received, rest = split_first_field(content2)
        assert received.startswith(b"Received: ") and b"hubport Replay" in received
        assert rest == content1  # the same bytes plus one Received field at the top
        sources = await wait_for(lambda: len(events(hub.root, event_id="RECEIVE")) == 2
                                 and [e["source"] for e in events(hub.root, event_id="RECEIVE")])
        assert sources == ["PICKUP", "ADMIN"]


# -- exactly once: hubport.core.file_commit on its own ----------------------------------------------


class Recorder:
    """A fake queue: ``record_intent`` appends what would be committed."""

    def __init__(self, fail: bool = False) -> None:
        self.intents: list[dict[int, str]] = []
        self.fail = fail

    async def record_intent(self, intents: dict[int, str]) -> None:
        if self.fail:
            raise RuntimeError("queue commit failed")
        self.intents.append(dict(intents))

    def context(self) -> DeliveryContext:
        # only record_intent is used by commit_files
        return DeliveryContext(None, None, None,  # type: ignore[arg-type]
                               self.record_intent, time.time)


def plan(folder: Path, name: str, data: bytes | None, rid: int = 1) -> FilePlan:
    return FilePlan(0, [rid], name, folder / f".{name}.tmp", folder / name, data)


async def test_recovery_intent_and_temp_present_finishes_the_rename(tmp_path: Path) -> None:
    (tmp_path / ".a.eml.tmp").write_bytes(b"written before the crash")
    rec = Recorder()
    p = plan(tmp_path, "a.eml", None)
    await commit_files([p], rec.context(), "Drop directory")
    assert p.error is None and not p.recovered
    assert os.listdir(tmp_path) == ["a.eml"]
    assert (tmp_path / "a.eml").read_bytes() == b"written before the crash"
    assert rec.intents == []  # already recorded before the crash


async def test_recovery_intent_and_temp_gone_is_success_without_a_copy(tmp_path: Path) -> None:
    rec = Recorder()
    p = plan(tmp_path, "a.eml", None)  # renamed before the crash, the gateway took it since
    await commit_files([p], rec.context(), "Drop directory")
    assert p.error is None and p.recovered
    assert os.listdir(tmp_path) == []  # no second file
    assert rec.intents == []


async def test_no_intent_replaces_a_stale_temp(tmp_path: Path) -> None:
    (tmp_path / ".a.eml.tmp").write_bytes(b"half a file from a crashed wri")
    rec = Recorder()
    p = plan(tmp_path, "a.eml", b"the whole message\r\n", rid=7)
    await commit_files([p], rec.context(), "Drop directory")
    assert p.error is None and not p.recovered
    assert os.listdir(tmp_path) == ["a.eml"]
    assert (tmp_path / "a.eml").read_bytes() == b"the whole message\r\n"
    assert rec.intents == [{7: "a.eml"}]


async def test_write_error_sets_error_and_leaves_no_temp(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    rec = Recorder()
    p = plan(missing, "a.eml", b"data")
    ok = plan(tmp_path, "b.eml", b"other data", rid=2)
    await commit_files([p, ok], rec.context(), "Drop directory X")
    assert p.error is not None and p.error.code == 451 and p.error.enhanced == "4.3.0"
    assert "does not exist" in p.error.text
    assert not missing.exists()
    assert rec.intents == [{2: "b.eml"}]  # only the file that was written
    assert ok.error is None and os.listdir(tmp_path) == ["b.eml"]


async def test_intent_commit_failure_removes_the_temps(tmp_path: Path) -> None:
    rec = Recorder(fail=True)
    p = plan(tmp_path, "a.eml", b"data")
    try:
        await commit_files([p], rec.context(), "Drop directory")
    except RuntimeError:
        pass
    else:
        raise AssertionError("the queue failure must reach the caller")
    assert os.listdir(tmp_path) == []  # nothing visible, nothing half-done


async def test_consumer_taking_the_file_at_once_causes_no_second_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync_dir = file_commit.fsync_dir
    taken: list[bytes] = []

    def gateway_takes_it(folder: Path) -> None:
        final = tmp_path / "a.eml"
        taken.append(final.read_bytes())
        final.unlink()  # the gateway consumed the file right after the rename
        real_fsync_dir(folder)

    monkeypatch.setattr(file_commit, "fsync_dir", gateway_takes_it)
    rec = Recorder()
    p = plan(tmp_path, "a.eml", b"message")
    await commit_files([p], rec.context(), "Drop directory")
    assert p.error is None and taken == [b"message"]
    # the process dies before marking the recipient delivered: the retry arrives with the
    # recorded intent and must not write the file again
    retry = plan(tmp_path, "a.eml", None)
    await commit_files([retry], rec.context(), "Drop directory")
    assert retry.error is None and retry.recovered
    assert os.listdir(tmp_path) == [] and taken == [b"message"]
    assert rec.intents == [{1: "a.eml"}]


# -- disk full while writing the drop file --------------------------------------------------


async def test_enospc_while_writing_defers_and_keeps_the_queue_entry(
        hub_factory: HubFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drop = tmp_path / "drop" / "Fax Gateway"
    real_write = os.write
    partial: list[str] = []

    def disk_full_in_drop(fd: int, data: Any) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(str(drop) + "/"):
            real_write(fd, bytes(data[: len(data) // 2]))  # part of it lands on disk
            partial.append(target)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", disk_full_in_drop)
    async with hub_factory() as hub:
        drop_in(hub.pickup, "full.eml", message(to=FAX, subject="disk full"))
        await wait_for(lambda: len(defers(hub.root)) >= 2 and len(partial) >= 2)
        assert set(defers(hub.root)) == {f"452 4.3.1 Drop directory {drop} is full"}
        assert all(os.path.basename(t).startswith(".") for t in partial)  # a temp name
        assert all_files(drop) == []  # the partial temp was removed
        rows = await recipient_rows(hub, "IMCEAFAX%")
        assert rows == [("Retry", None)]  # queue entry kept, no intent recorded
        assert "DELIVER" not in event_ids(hub.root)
        monkeypatch.undo()  # space again
        files = await wait_for(lambda: drop_files(drop), timeout=15)
        await wait_for(lambda: "DELIVER" in event_ids(hub.root))
        assert all_files(drop) == files and len(files) == 1
        assert b"Subject: disk full" in files[0].read_bytes()
        assert (await recipient_rows(hub, "IMCEAFAX%")) in ([], [("Delivered", files[0].name)])


# -- configuration ------------------------------------------------------------------------------


def test_a_relative_drop_directory_needs_a_drop_root_on_every_source_server() -> None:
    """Without RootDropDirectoryPath a server has nowhere to put a relative DropDirectory:
    the load says so, instead of the first delivery failing."""
    hooks = Hooks(entry_points=False)
    text = """
[[accepted_domain]]
Name = "contoso.test"
DomainName = "contoso.test"
Default = true

[[transport_server]]
Name = "HUB01"
RootDropDirectoryPath = ""

[[transport_server]]
Name = "HUB02"

[[foreign_connector]]
Name = "Fax Gateway"
AddressSpaces = ["FAX:*;1"]
SourceTransportServers = ["HUB01", "HUB02"]

[[foreign_connector]]
Name = "Telex Gateway"
AddressSpaces = ["TELEX:*;1"]
SourceTransportServers = ["HUB01"]
DropDirectory = "/srv/telex"

[[foreign_connector]]
Name = "Pager Gateway"
AddressSpaces = ["PAGER:*;1"]
SourceTransportServers = ["HUB02"]
"""
    with pytest.raises(ConfigErrors) as caught:
        parse_organization(text, source="org.toml", base_dir=Path("/srv/hub"),
                           connector_types=hooks.registry.connector_types,
                           delivery_agents=hooks.registry.delivery_agents)
    assert [str(e) for e in caught.value.errors] == [
        'org.toml: foreign_connector "Fax Gateway": DropDirectory: "Fax Gateway" is relative,'
        ' but source transport server "HUB01" has no RootDropDirectoryPath (it is empty);'
        " give an absolute path or set the server's RootDropDirectoryPath"]
    # an absolute DropDirectory, or only servers with a drop root, load
    fixed = text.replace('SourceTransportServers = ["HUB01", "HUB02"]',
                         'SourceTransportServers = ["HUB01", "HUB02"]\nDropDirectory = "/srv/fax"')
    org = parse_organization(fixed, source="org.toml", base_dir=Path("/srv/hub"),
                             connector_types=hooks.registry.connector_types,
                             delivery_agents=hooks.registry.delivery_agents)
    pager = org.connector("Pager Gateway")
    assert pager.drop_path(org.server("HUB02")) == Path("/srv/hub/drop/Pager Gateway")
